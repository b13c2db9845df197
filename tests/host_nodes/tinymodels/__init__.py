"""Test-only ComfyUI nodes that provide the tiny models (stock loaders only detect full-size SDXL).

This folder is loaded by the test host in-process and by the server test's main.py (through an extra
model paths config). It is never shipped to users: it lives under tests/.
"""
from __future__ import annotations

from . import factories


class TinySDXLCheckpoint:
    """MODEL, CLIP and VAE of the tiny SDXL with seeded random weights."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "vae": (["taesd", "kl"], {"default": "taesd"}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "sdxl_optimizer_tests"

    def load(self, seed, vae):
        vae_model = factories.tiny_taesd_vae(seed + 2) if vae == "taesd" else factories.tiny_kl_x8_vae(seed + 3)
        return factories.tiny_unet(seed), factories.tiny_clip(seed + 1), vae_model


NODE_CLASS_MAPPINGS = {"SDXLOptTestTinyCheckpoint": TinySDXLCheckpoint}
NODE_DISPLAY_NAME_MAPPINGS = {"SDXLOptTestTinyCheckpoint": "Tiny SDXL checkpoint (tests)"}
