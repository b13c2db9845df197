"""SDXLOpt Tiled VAE Decode / Encode: the full VAE in tiles, without seams or colour shifts, inside free VRAM.

Thin layer over ops/tiled_vae.py: validate, load the VAE through ComfyUI's memory manager, choose the tile
size (auto: from free VRAM), run per image with a progress bar over tiles. The VAE is only read, never changed.
A VAE this cannot tile (TAESD, video VAEs, other architectures) falls back to what the host does for it.
"""
from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.utils
import torch
from comfy_api.latest import io

from ..ops.tiled_vae import (
    GROUPNORM_MODES,
    auto_tile,
    decode_tiled,
    decoder_stages,
    encode_tiled,
    encoder_stages,
    plan,
    scale_factor,
    unsupported_reason,
)
from . import CATEGORY

log = logging.getLogger(__name__)

AUTO_BUDGET = 0.5  # share of the free VRAM (after loading the VAE) that auto tiling may fill (margin: conv workspaces)
MIN_AUTO_TILE = 64  # latent px (512 px): the memory asked of ComfyUI up front when tiling is auto


def tiling_inputs(what: str) -> list:
    """The tile_size / overlap / groupnorm inputs of the decode ("Decode") and encode ("Encode") nodes."""
    tips = {
        "tile_size": (f"Tile side in image pixels (a multiple of 8): the memory one tile takes. 0 = auto: the "
                      f"largest tile that fits the free VRAM, and no tiling at all when the whole image fits (then "
                      f"it equals plain VAE {what}). 512 uses about as much memory as core VAE {what} (Tiled) at "
                      f"512."),
        "overlap": ("Pixels over which neighbouring tiles cross-fade (a multiple of 8; at most half the tile). "
                    "Tiles also read a few latent pixels past their edge on their own, so 0 leaves no seam with "
                    "whole-image GroupNorm; more overlap hides per-tile differences in 'tile' mode."),
        "groupnorm": ("How the tiles normalize. global: statistics of the whole image, estimated in two extra "
                      "passes over the tiles (closest to the untiled result, no colour shift; slowest). "
                      "global_fast: one estimation pass (close, faster). tile: each tile uses its own statistics "
                      "(one pass, fastest; may show colour shifts between tiles)."),
    }
    return [
        io.Int.Input("tile_size", default=0, min=0, max=8192, step=64, tooltip=tips["tile_size"]),
        io.Int.Input("overlap", default=64, min=0, max=4096, step=8, tooltip=tips["overlap"]),
        io.Combo.Input("groupnorm", options=list(GROUPNORM_MODES), default="global", tooltip=tips["groupnorm"]),
    ]


def fsm_reason(vae, decoding: bool) -> str | None:
    """Why this VAE cannot be tiled here (None when it can)."""
    fsm = getattr(vae, "first_stage_model", None)
    if fsm is None:
        return "it holds no model"
    if getattr(fsm, "bn", None) is not None:
        return "its latents are batch-normalized (a VAE of another family)"
    net = getattr(fsm, "decoder" if decoding else "encoder", None)
    if net is None:
        return f"it is a {type(fsm).__name__}, not an AutoencoderKL"
    return unsupported_reason(decoder=net) if decoding else unsupported_reason(encoder=net)


def check_settings(tile_size: int, overlap: int, groupnorm: str, node: str) -> None:
    """Pixel tile/overlap: multiples of 8, overlap >= 0, tile 0 (auto) or at least twice the overlap; a known
    GroupNorm mode."""
    for name, v in (("tile_size", tile_size), ("overlap", overlap)):
        if v < 0 or v % 8:
            raise ValueError(f"{node}: expected {name} to be a multiple of 8 pixels (the VAE's scale) and >= 0, "
                             f"got {v}. Fix: use {max(0, v // 8 * 8)}.")
    if tile_size and tile_size < 2 * overlap:
        raise ValueError(f"{node}: expected tile_size at least twice the overlap, got tile_size {tile_size} and "
                         f"overlap {overlap}. Fix: raise tile_size to {2 * overlap} or lower overlap to "
                         f"{tile_size // 2 // 8 * 8}.")
    if groupnorm not in GROUPNORM_MODES:
        raise ValueError(f"{node}: expected groupnorm in {list(GROUPNORM_MODES)}, got {groupnorm!r}.")


def fit_overlap(overlap: int, height: int, width: int) -> int:
    """The overlap (latent px) for an image of this size: an image no larger than two overlaps fits in one
    tile, where there is no seam to blend, so the overlap shrinks to half the image instead of failing."""
    return min(overlap, max(height, width) // 2)


def offloads(vae) -> bool:
    """Whether the whole-image buffers of a tiled run can live in the output device's memory (usually the CPU)."""
    return torch.device(vae.output_device) != torch.device(vae.device)


def make_room(vae, wanted_bytes: float) -> None:
    """Before auto tiling reads the free VRAM: let ComfyUI unload models the decode does not need (text
    encoders, ...) until `wanted_bytes` are free (the whole image in one window), keeping the VAE and every
    diffusion model loaded (the next run needs the UNet; reloading it costs more than small tiles). Core VAE
    Decode asks for its whole decode in the same way, but may unload the UNet too."""
    import comfy.model_base

    keep = [lm for lm in mm.current_loaded_models
            if lm.model is vae.patcher or isinstance(getattr(lm.model, "model", None), comfy.model_base.BaseModel)]
    mm.free_memory(int(wanted_bytes), vae.device, keep_loaded=keep)


def choose_tile(vae, stages, height: int, width: int, tile: int, overlap: int, decoding: bool) -> int:
    """Tile side in latent px: `tile`, or when 0 (auto) what fits the free VRAM; loads the VAE either way."""
    dtype_size = torch.finfo(vae.vae_dtype).bits // 8
    off = offloads(vae)
    first = tile or max(min(MIN_AUTO_TILE, max(height, width)), 2 * overlap + 1)
    p = plan(stages, height, width, first, overlap, dtype_size, decoding=decoding, offload=off)  # validates too
    mm.load_models_gpu([vae.patcher], memory_required=p.peak_bytes)
    if tile:
        return tile
    make_room(vae, plan(stages, height, width, max(height, width), overlap, dtype_size, decoding=decoding,
                        offload=off).peak_bytes / AUTO_BUDGET)
    free = mm.get_free_memory(vae.device)
    tile = auto_tile(stages, height, width, overlap, dtype_size, free * AUTO_BUDGET, decoding, offload=off)
    # ask ComfyUI to make room for the chosen plan too (it may offload the UNet), with margin for conv workspaces
    chosen = plan(stages, height, width, tile, overlap, dtype_size, decoding=decoding, offload=off)
    mm.load_models_gpu([vae.patcher], memory_required=int(chosen.peak_bytes / AUTO_BUDGET))
    log.debug("SDXLOpt tiled VAE: auto tile %d latent px (free %.2f GiB)", tile, free / 1024**3)
    return tile


class Progress:
    """One ComfyUI progress bar over the tiles of every image of the batch."""

    def __init__(self, images: int) -> None:
        self.images, self.index, self.bar = images, 0, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total * self.images)
        self.bar.update_absolute(self.index * total + done, total * self.images)


class TiledVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptTiledVAEDecode",
            display_name="SDXLOpt Tiled VAE Decode",
            category=f"{CATEGORY}/vae",
            description="Decodes a LATENT with the full VAE in tiles, for large images or small GPUs, without the "
                        "seams and colour shifts of tiled decoding: the low-resolution part (with the attention) "
                        "runs on the whole latent, tiles read past their edges, and GroupNorm can use whole-image "
                        "statistics. TAESD and non-AutoencoderKL VAEs fall back to the host's own decode.",
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode. It is not modified."),
                io.Vae.Input("vae", tooltip="The full VAE (AutoencoderKL: SDXL, SD1.x). It is not modified."),
                *tiling_inputs("Decode"),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, samples: dict, vae, tile_size: int, overlap: int, groupnorm: str) -> io.NodeOutput:
        node = "SDXLOpt Tiled VAE Decode"
        check_settings(tile_size, overlap, groupnorm, node)
        vae.throw_exception_if_invalid()
        z = samples["samples"]
        reason = fsm_reason(vae, decoding=True)
        if reason is not None:
            return io.NodeOutput(fallback_decode(vae, z, tile_size, overlap, reason))
        if z.ndim != 4 or z.shape[1] != vae.latent_channels:
            raise ValueError(f"{node}: expected a latent of shape (batch, {vae.latent_channels}, height, width) for "
                             f"this VAE, got {tuple(z.shape)}. Fix: decode with the VAE of the model that made the "
                             f"latent.")
        fsm = vae.first_stage_model
        s = scale_factor(fsm.decoder)
        stages = decoder_stages(fsm.decoder, getattr(fsm, "post_quant_conv", None))
        ov = fit_overlap(overlap // s, z.shape[2], z.shape[3])
        tile = choose_tile(vae, stages, z.shape[2], z.shape[3], tile_size // s, ov, decoding=True)
        progress, images = Progress(z.shape[0]), []
        for i in range(z.shape[0]):
            progress.index = i
            x = z[i:i + 1].to(device=vae.device, dtype=vae.vae_dtype)
            out = decode_tiled(fsm.decoder, x, tile, ov, groupnorm, post_quant_conv=getattr(fsm, "post_quant_conv", None),
                               progress=progress, store=vae.output_device if offloads(vae) else None)
            images.append(vae.process_output(out).to(vae.output_device))
        return io.NodeOutput(torch.cat(images).movedim(1, -1))


def fallback_decode(vae, z: torch.Tensor, tile_size: int, overlap: int, reason: str) -> torch.Tensor:
    """What the host does for a VAE this node cannot tile: TAESD decodes whole, others with core tiling."""
    if type(vae.first_stage_model).__name__ == "TAESD":
        log.info("SDXLOpt Tiled VAE Decode: a TAESD VAE needs no tiling; decoding it whole")
        return vae.decode(z)
    log.warning("SDXLOpt Tiled VAE Decode: cannot tile this VAE here (%s); using the host's tiled decode", reason)
    comp = vae.spacial_compression_decode()
    tile = tile_size or 512
    overlap = overlap if tile >= 4 * overlap else tile // 4  # as core VAE Decode (Tiled) does
    return vae.decode_tiled(z, tile_x=tile // comp, tile_y=tile // comp, overlap=overlap // comp)


class TiledVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptTiledVAEEncode",
            display_name="SDXLOpt Tiled VAE Encode",
            category=f"{CATEGORY}/vae",
            description="Encodes an IMAGE with the full VAE in tiles (img2img / upscaling of large images) without "
                        "seams: the high-resolution part is tiled, the rest (with the attention) runs on the whole "
                        "image. Sides that are not multiples of 8 are center-cropped, as VAE Encode does.",
            inputs=[
                io.Image.Input("pixels", tooltip="The image to encode (RGB; alpha is ignored). It is not modified."),
                io.Vae.Input("vae", tooltip="The full VAE (AutoencoderKL: SDXL, SD1.x). It is not modified."),
                *tiling_inputs("Encode"),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, pixels: torch.Tensor, vae, tile_size: int, overlap: int, groupnorm: str) -> io.NodeOutput:
        node = "SDXLOpt Tiled VAE Encode"
        check_settings(tile_size, overlap, groupnorm, node)
        vae.throw_exception_if_invalid()
        reason = fsm_reason(vae, decoding=False)
        if reason is not None:
            if type(vae.first_stage_model).__name__ == "TAESD":
                return io.NodeOutput({"samples": vae.encode(pixels[..., :3])})
            log.warning("%s: cannot tile this VAE here (%s); using the host's tiled encode", node, reason)
            return io.NodeOutput({"samples": vae.encode_tiled(pixels[..., :3], tile_x=tile_size or 512,
                                                              tile_y=tile_size or 512, overlap=overlap)})
        pixels = vae.vae_encode_crop_pixels(pixels)
        if pixels.shape[1] < 8 or pixels.shape[2] < 8:
            raise ValueError(f"{node}: expected an image of at least 8x8 pixels, got {tuple(pixels.shape[1:3])}.")
        fsm = vae.first_stage_model
        s = scale_factor(fsm.encoder)
        stages = encoder_stages(fsm.encoder, getattr(fsm, "quant_conv", None))
        ov = fit_overlap(overlap // s, pixels.shape[1] // s, pixels.shape[2] // s)
        tile = choose_tile(vae, stages, pixels.shape[1] // s, pixels.shape[2] // s, tile_size // s, ov,
                           decoding=False)
        progress, latents = Progress(pixels.shape[0]), []
        for i in range(pixels.shape[0]):
            progress.index = i
            x = vae.process_input(pixels[i:i + 1, :, :, :3].movedim(-1, 1)).to(dtype=vae.vae_dtype)
            if not offloads(vae):
                x = x.to(vae.device)
            moments = encode_tiled(fsm.encoder, x, tile, ov, groupnorm, quant_conv=getattr(fsm, "quant_conv", None),
                                   progress=progress, device=vae.device)
            z = fsm.regularization(moments)[0] if hasattr(fsm, "regularization") else moments.chunk(2, 1)[0]
            latents.append(z.float().to(vae.output_device))
        return io.NodeOutput({"samples": torch.cat(latents)})


NODES = [TiledVAEDecode, TiledVAEEncode]
