"""Benchmarks: speed and memory of the pack's nodes through real ComfyUI sampling (not tests)."""
