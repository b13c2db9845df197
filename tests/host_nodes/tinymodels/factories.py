"""Tiny SDXL-structured models with seeded random weights: no downloads, same structure as the real thing.

UNet: ComfyUI's own `comfy.supported_models.SDXL` with a small unet_config (3 levels, transformers in the
lower two, linear projections, ADM conditioning), wrapped in a real ModelPatcher. CLIP: ComfyUI's SDXL
CLIP (clip_l + clip_g) with 3 tiny layers each. VAE: a TAESD-shaped VAE or a tiny x8 AutoencoderKL, both
through `comfy.sd.VAE`. comfy.ops layers skip weight init, so every parameter is set here from a seed.
"""
from __future__ import annotations

import math

import torch

POOLED = 32  # clip_g hidden size == pooled width
ADM_IN = POOLED + 6 * 256  # SDXL appends 6 Timestep(256) size/crop embeddings to the pooled output

# tiny SDXL UNet: the real SDXL layout (no attention at the top level, linear transformer projections)
TINY_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": ADM_IN,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "channel_mult": [1, 2, 2],
    "context_dim": 64,
    "num_head_channels": 64,  # ComfyUI forces 64 for SDXL (unet_extra_config)
    "use_linear_in_transformer": True,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

TINY_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": 32}
TINY_CLIP_G = {"hidden_size": POOLED, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": POOLED}


def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter from `seed`: fan-in normal for weights, ~1 for norm scales, small biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            norm_like = p.ndim == 1 and leaf == "weight"
            if p.ndim >= 2:
                fan_in = p[0].numel()
                val = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            elif norm_like:
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 0:
                val = torch.tensor(1.0 if "scale" in leaf else 0.0)
            else:
                val = 0.05 * torch.randn(p.shape, generator=gen)
            p.copy_(val.to(p.dtype))
    return module


def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32, unet_config: dict | None = None,
              model_options: dict | None = None):
    """A ComfyUI SDXL model (BaseModel + ModelPatcher) with a tiny UNet, weights from `seed`."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(unet_config or TINY_UNET_CONFIG)
    model_config = comfy.supported_models.SDXL(cfg)
    model_config.set_inference_dtype(dtype, None)
    if model_options:
        model_config.custom_operations = model_options.get("custom_operations")
    model = model_config.get_model({})
    seeded_init_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device())


def tiny_clip(seed: int = 1):
    """ComfyUI's SDXL CLIP (real tokenizer, clip_l + clip_g), 3 tiny layers each, weights from `seed`."""
    import comfy.sd
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget

    target = ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": TINY_CLIP_L,
                                                       "clip_g_model_config": TINY_CLIP_G})
    seeded_init_(clip.cond_stage_model, seed)
    return clip


def tiny_taesd_state_dict(seed: int = 2, latent_channels: int = 4) -> dict[str, torch.Tensor]:
    """TAESD-shaped weights in ComfyUI's layout (taesd_encoder.* / taesd_decoder.*), from `seed`."""
    import comfy.taesd.taesd

    model = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    seeded_init_(model, seed)
    return {k: v for k, v in model.state_dict().items() if k.startswith("taesd_")}


def tiny_taesd_vae(seed: int = 2):
    import comfy.sd

    return comfy.sd.VAE(sd=tiny_taesd_state_dict(seed))


def conditioning(clip, text: str, width: int = 64, height: int = 64) -> list:
    """CLIPTextEncode's output for `text`, with SDXL's size conditioning."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled, "width": width, "height": height}]]


def random_conditioning(seed: int, context_dim: int = 64, pooled: int = POOLED, tokens: int = 77,
                        width: int = 64, height: int = 64) -> list:
    """Conditioning from random tensors (no CLIP): a fixed-seed stand-in for a prompt."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, context_dim, generator=gen)
    pooled_t = torch.randn(1, pooled, generator=gen)
    return [[cond, {"pooled_output": pooled_t, "width": width, "height": height}]]


# comfy.sd.VAE only auto-detects SD-sized AutoencoderKLs (ch 128, ch_mult [1, 2, 4, 4]) and fails on smaller
# widths with size mismatches. This one has SDXL's VAE layout (4 levels: x8, 32 GroupNorm groups as ComfyUI
# hard-codes) at small widths, and hands comfy.sd.VAE the matching config.
TINY_KL_X8_CONFIG = {
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
}


def tiny_kl_x8_state_dict(seed: int = 3) -> dict[str, torch.Tensor]:
    """Diffusers-format AutoencoderKL weights of TINY_KL_X8_CONFIG (x8 like SDXL's VAE), from `seed`."""
    from diffusers import AutoencoderKL

    n = len(TINY_KL_X8_CONFIG["block_out_channels"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                        up_block_types=["UpDecoderBlock2D"] * n, **TINY_KL_X8_CONFIG)
    return seeded_init_(vae, seed).state_dict()


def tiny_kl_x8_vae(seed: int = 3):
    """A tiny x8 AutoencoderKL as a ComfyUI VAE (comfy.sd.VAE with an explicit config: ComfyUI's own classes)."""
    import comfy.sd

    chans = TINY_KL_X8_CONFIG["block_out_channels"]
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": chans[0],
                "ch_mult": [c // chans[0] for c in chans], "num_res_blocks": TINY_KL_X8_CONFIG["layers_per_block"],
                "attn_resolutions": [], "dropout": 0.0}
    return comfy.sd.VAE(sd=tiny_kl_x8_state_dict(seed), config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def write_taesd_pair(folder, prefix: str = "taesdxl", seed: int = 2) -> list:
    """Random TAESD weights as the encoder/decoder .pth pair users put in models/vae_approx (bare keys)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = tiny_taesd_state_dict(seed)
    paths = []
    for part in ("encoder", "decoder"):
        head = f"taesd_{part}."
        path = folder / f"{prefix}_{part}.pth"
        torch.save({k[len(head):]: v for k, v in sd.items() if k.startswith(head)}, path)
        paths.append(path)
    return paths
