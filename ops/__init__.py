"""Torch-only implementations of the pack's techniques. Nothing here imports ComfyUI."""
