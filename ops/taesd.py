"""Tiny AutoEncoder for SD1.x/SDXL latents (TAESD, TAESDXL) in plain torch, with loaders for every common layout.

Why: the full SDXL VAE decode is the memory peak at the end of a run; TAESD decodes the same latents with about
1 M parameters per half, at a small loss of detail. Its weights come in several layouts (ComfyUI's
`taesd_encoder.*`/`taesd_decoder.*`, the bare encoder/decoder pair in models/vae_approx, diffusers'
AutoencoderTiny `encoder.layers.*`/`decoder.layers.*`); `load_state_dicts` takes any of them.

Latent scaling: ComfyUI's LATENT holds raw VAE latents (the sampler multiplies by the model's latent scale
factor on the way in and divides on the way out), while TAESD, like the UNet, works on scaled latents
(raw * 0.13025 for SDXL, raw * 0.18215 for SD1.x). `LatentScaling` converts between the two.
Architecture: madebyollin/taesd (https://github.com/madebyollin/taesd), written from its published description.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

LATENT_MAGNITUDE = 3.0  # the decoder soft-clamps its input to +-3: tanh(x / 3) * 3
WIDTH = 64  # channels of every hidden layer


@dataclass(frozen=True)
class LatentScaling:
    """Raw VAE latents (ComfyUI's LATENT) <-> the scaled latents TAESD works on: tiny = (raw - shift) * scale."""

    scale: float
    shift: float = 0.0

    def to_tiny(self, raw: torch.Tensor) -> torch.Tensor:
        """raw latents -> TAESD latents"""
        return (raw - self.shift) * self.scale

    def to_raw(self, tiny: torch.Tensor) -> torch.Tensor:
        """TAESD latents -> raw latents"""
        return tiny / self.scale + self.shift


SDXL = LatentScaling(0.13025)  # comfy/latent_formats.py SDXL.scale_factor
SD15 = LatentScaling(0.18215)  # comfy/latent_formats.py SD15.scale_factor
PRESETS = {"sdxl": SDXL, "sd1.x": SD15}


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    """3x3 convolution that keeps the size (unless strided)."""
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the decoder input to +-LATENT_MAGNITUDE."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / LATENT_MAGNITUDE) * LATENT_MAGNITUDE


class Block(nn.Module):
    """Residual block: three 3x3 convs with ReLUs, a 1x1 skip when the width changes, ReLU after the sum."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def _blocks(n: int) -> list[nn.Module]:
    return [Block(WIDTH, WIDTH) for _ in range(n)]


def Encoder(latent_channels: int = 4) -> nn.Sequential:
    """[0, 1] image -> TAESD latents at 1/8 size."""
    return nn.Sequential(
        conv(3, WIDTH), *_blocks(1),
        conv(WIDTH, WIDTH, stride=2, bias=False), *_blocks(3),
        conv(WIDTH, WIDTH, stride=2, bias=False), *_blocks(3),
        conv(WIDTH, WIDTH, stride=2, bias=False), *_blocks(3),
        conv(WIDTH, latent_channels),
    )


def Decoder(latent_channels: int = 4) -> nn.Sequential:
    """TAESD latents -> [0, 1] image (unclamped) at 8x size."""
    return nn.Sequential(
        Clamp(), conv(latent_channels, WIDTH), nn.ReLU(),
        *_blocks(3), nn.Upsample(scale_factor=2), conv(WIDTH, WIDTH, bias=False),
        *_blocks(3), nn.Upsample(scale_factor=2), conv(WIDTH, WIDTH, bias=False),
        *_blocks(3), nn.Upsample(scale_factor=2), conv(WIDTH, WIDTH, bias=False),
        *_blocks(1), conv(WIDTH, 3),
    )


class TinyAutoencoder(nn.Module):
    """TAESD: `encoder` and `decoder` (either may be None when only one half was loaded)."""

    def __init__(self, latent_channels: int = 4, encoder: bool = True, decoder: bool = True) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = Encoder(latent_channels) if encoder else None
        self.decoder = Decoder(latent_channels) if decoder else None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """TAESD latents -> [0, 1] image (unclamped)"""
        if self.decoder is None:
            raise ValueError("expected a TAESD with decoder weights, got an encoder only. Fix: load the "
                             "*_decoder file too (or a file with both halves).")
        return self.decoder(latents)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """[0, 1] image -> TAESD latents"""
        if self.encoder is None:
            raise ValueError("expected a TAESD with encoder weights, got a decoder only. Fix: load the "
                             "*_encoder file too (or a file with both halves).")
        return self.encoder(image)


def decode_latents(model: TinyAutoencoder, raw: torch.Tensor, scaling: LatentScaling) -> torch.Tensor:
    """Raw latents (B, C, h, w) -> image (B, 3, 8h, 8w) in [0, 1], as the full VAE's decode range."""
    return model.decode(scaling.to_tiny(raw)).clamp(0, 1)


def encode_image(model: TinyAutoencoder, image: torch.Tensor, scaling: LatentScaling) -> torch.Tensor:
    """Image (B, 3, H, W) in [0, 1] -> raw latents (B, C, H/8, W/8), as the full VAE's encode gives."""
    return scaling.to_raw(model.encode(image))


# ------------------------------------------------------------------------------------------------ weight layouts

_INDEXED = re.compile(r"^(\d+)\.(.+)$")


def _part_of_bare(sd: dict[str, torch.Tensor]) -> str | None:
    """'encoder' or 'decoder' for a bare half (keys '0.weight', '1.conv.0.weight', ...), from its first conv."""
    if "0.weight" in sd and sd["0.weight"].ndim == 4 and sd["0.weight"].shape[1] == 3:
        return "encoder"  # conv(3, 64) first
    if "0.weight" not in sd and "1.weight" in sd and sd["1.weight"].ndim == 4:
        return "decoder"  # Clamp (no weights) first, then conv(latent, 64)
    return None


def to_tiny_layout(sd: dict[str, torch.Tensor], name: str = "the weights") -> dict[str, torch.Tensor]:
    """Any known TAESD layout -> TinyAutoencoder's keys (`encoder.N.*`, `decoder.N.*`); ValueError if none fits."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for prefix, part in (("taesd_encoder.", "encoder"), ("taesd_decoder.", "decoder")):
            if key.startswith(prefix):
                out[f"{part}.{key[len(prefix):]}"] = value
        for prefix, part, offset in (("encoder.layers.", "encoder", 0), ("decoder.layers.", "decoder", 1)):
            m = _INDEXED.match(key[len(prefix):]) if key.startswith(prefix) else None
            if m:  # diffusers' DecoderTiny has no Clamp layer: its indices are one lower
                out[f"{part}.{int(m.group(1)) + offset}.{m.group(2)}"] = value
    if out:
        return out
    part = _part_of_bare(sd)
    if part is not None:
        return {f"{part}.{k}": v for k, v in sd.items() if _INDEXED.match(k)}
    hint = ""
    if any(k.startswith(("decoder.conv_in.", "first_stage_model.", "decoder.up.", "decoder.up_blocks.")) for k in sd):
        hint = " It looks like a full VAE (AutoencoderKL): load it with core Load VAE instead."
    raise ValueError(f"expected TAESD weights in {name} (keys taesd_encoder.*/taesd_decoder.*, encoder.layers.*/"
                     f"decoder.layers.*, or a bare taesd*_encoder/_decoder file), got keys like "
                     f"{sorted(sd)[:3]}.{hint} Fix: pick a TAESD file, e.g. taesdxl_decoder.pth from "
                     f"madebyollin/taesdxl in models/vae_approx.")


def load_state_dicts(parts: list[tuple[str, dict[str, torch.Tensor]]]) -> TinyAutoencoder:
    """A TinyAutoencoder from one or more (name, state dict) in any known layout; halves may come from separate files."""
    merged: dict[str, torch.Tensor] = {}
    for name, sd in parts:
        merged.update(to_tiny_layout(sd, name))
    names = ", ".join(n for n, _ in parts)
    has_enc = any(k.startswith("encoder.") for k in merged)
    has_dec = any(k.startswith("decoder.") for k in merged)
    if has_dec:
        channels = merged["decoder.1.weight"].shape[1]
    else:
        last = max(int(k.split(".")[1]) for k in merged if k.startswith("encoder."))
        channels = merged[f"encoder.{last}.weight"].shape[0]
    model = TinyAutoencoder(channels, encoder=has_enc, decoder=has_dec)
    missing, unexpected = model.load_state_dict(merged, strict=False)
    if missing or unexpected:
        raise ValueError(f"expected a TAESD with {channels} latent channels in {names}, got missing keys "
                         f"{missing[:4]} and unexpected keys {unexpected[:4]}. Fix: use the original "
                         f"taesd/taesdxl files (another architecture, e.g. a video TAE, does not fit).")
    return model.eval()
