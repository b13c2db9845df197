"""SDXL Optimizer Pack: the ComfyUI entry point.

ComfyUI imports this file from custom_nodes/ and calls `comfy_entrypoint()` (V3 node API). Everything
that touches ComfyUI lives in `nodes/`; the torch-only math lives in `ops/`.
"""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
