"""Architecture-true SDXL with seeded random weights: UNet, both CLIPs and the VAE, and a checkpoint file of
them that the stock loaders (and ours) read unchanged. No download: the cost is real, the pictures are noise.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .common import init_random_

log = logging.getLogger("sdxl_optimizer.bench")

# ComfyUI's SD/SDXL AutoencoderKL (comfy/sd.py): the SDXL VAE architecture
SDXL_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def random_vae_state_dict(seed: int = 3, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The SDXL VAE (ldm layout, 83.7 M parameters) with seeded random weights."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(ddconfig=SDXL_VAE_DDCONFIG, embed_dim=4)
    init_random_(vae, seed)
    return {k: v.detach().to("cpu", torch.float32) for k, v in vae.state_dict().items()}


def random_vae(seed: int = 3, device: str = "cpu"):
    import comfy.sd

    return comfy.sd.VAE(sd=random_vae_state_dict(seed, device))


def random_clip(seed: int = 1):
    """ComfyUI's SDXL CLIP (clip_l + clip_g, full size) with seeded random weights."""
    import comfy.sd
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget

    clip = comfy.sd.CLIP(target=ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel))
    init_random_(clip.cond_stage_model, seed)
    return clip


def write_checkpoint(path: Path, model, seed: int = 0) -> Path:
    """Save UNet (from `model`), random CLIPs and a random VAE as one SDXL checkpoint (fp16, ~7 GB)."""
    import comfy.sd

    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(path), model, random_clip(seed + 1), random_vae(seed + 3))
    log.info("wrote random SDXL checkpoint %s (%.1f GB) in %.0f s", path, path.stat().st_size / 1e9,
             time.perf_counter() - t0)
    return path
