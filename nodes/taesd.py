"""SDXLOpt Tiny VAE: load TAESD/TAESDXL weights in any layout from models/vae_approx or models/vae, decode and encode.

The loader lists the encoder/decoder pairs in vae_approx as one entry (what most users downloaded: two .pth
files), every single file there, and the files in models/vae. The latent scaling preset says whether the
latents are SDXL's or SD1.x's (ComfyUI's LATENT holds raw VAE latents; TAESD wants them scaled).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..ops.taesd import PRESETS, LatentScaling, TinyAutoencoder, decode_latents, encode_image, load_state_dicts
from . import CATEGORY

log = logging.getLogger(__name__)

TinyVAEType = io.Custom("SDXLOPT_TINY_VAE")
PAIR_SUFFIX = " (encoder + decoder)"
NONE_FOUND = "(no TAESD found: put taesdxl_encoder.pth + taesdxl_decoder.pth in models/vae_approx)"
ELEMENTS_PER_PIXEL = 64 * 4  # TAESD activations per output pixel (64 channels, a few live tensors): batch chunking


@dataclass
class TinyVAE:
    """What flows on an SDXLOPT_TINY_VAE wire: the model (managed by ComfyUI), its latent scaling, its source."""

    model: TinyAutoencoder
    patcher: comfy.model_patcher.ModelPatcher
    scaling: LatentScaling
    preset: str
    source: str
    dtype: torch.dtype

    @property
    def latent_channels(self) -> int:
        return self.model.latent_channels


def make_tiny_vae(parts: list[tuple[str, dict]], preset: str, source: str) -> TinyVAE:
    """A TinyVAE from (name, state dict) parts in any TAESD layout, placed on ComfyUI's VAE device and dtype."""
    model = load_state_dicts(parts)
    device = mm.vae_device()
    dtype = mm.vae_dtype(device, [torch.float16, torch.bfloat16, torch.float32])
    model.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.vae_offload_device())
    return TinyVAE(model, patcher, PRESETS[preset], preset, source, dtype)


def tae_choices() -> list[str]:
    """Encoder/decoder pairs in vae_approx (one entry each), then every file in vae_approx and in vae."""
    approx = folder_paths.get_filename_list("vae_approx")
    stems = {os.path.splitext(f)[0]: f for f in approx}
    pairs = sorted(s[:-len("_decoder")] for s in stems if s.endswith("_decoder") and
                   s[:-len("_decoder")] + "_encoder" in stems)
    out = [f"vae_approx/{p}{PAIR_SUFFIX}" for p in pairs]
    out += [f"vae_approx/{f}" for f in approx] + [f"vae/{f}" for f in folder_paths.get_filename_list("vae")]
    return out or [NONE_FOUND]


def resolve_choice(choice: str) -> list[tuple[str, str]]:
    """(name, full path) of the file(s) behind a loader choice; ValueError naming the fix when missing."""
    if choice == NONE_FOUND or "/" not in choice:
        raise ValueError(f"expected a TAESD file in models/vae_approx or models/vae, got {choice!r}. Fix: download "
                         "taesdxl_encoder.pth and taesdxl_decoder.pth (madebyollin/taesd) into models/vae_approx, "
                         "then refresh.")
    folder, name = choice.split("/", 1)
    if name.endswith(PAIR_SUFFIX):
        prefix = name[:-len(PAIR_SUFFIX)]
        files = [f for f in folder_paths.get_filename_list(folder)
                 if os.path.splitext(f)[0] in (prefix + "_encoder", prefix + "_decoder")]
    else:
        files = [name]
    out = []
    for f in files:
        path = folder_paths.get_full_path(folder, f)
        if path is None:
            raise ValueError(f"expected {f} in models/{folder}, found none. Fix: refresh the node list (the file "
                             "moved) or put the file back.")
        out.append((f, path))
    return out


def guess_preset(choice: str) -> str:
    """'sdxl' or 'sd1.x' from a file name: TAESDXL names carry 'xl'; plain 'taesd' is SD1.x; otherwise SDXL."""
    name = os.path.basename(choice).lower()
    if "xl" in name:
        return "sdxl"
    if name.startswith("taesd_") or name.startswith("taesd.") or name.startswith("taesd "):
        return "sd1.x"
    return "sdxl"


def check_latent(samples: torch.Tensor, channels: int, what: str) -> None:
    """A 4-D latent with the channels the model takes, or a ValueError that says which model fits."""
    if samples.ndim != 4:
        raise ValueError(f"{what}: expected an image latent (batch, channels, height, width), got shape "
                         f"{tuple(samples.shape)}. Fix: video/audio latents need their own VAE.")
    if samples.shape[1] != channels:
        raise ValueError(f"{what}: expected a latent with {channels} channels (SDXL / SD1.x), got "
                         f"{samples.shape[1]} channels (shape {tuple(samples.shape)}). Fix: use the VAE (or the "
                         f"TAESD, e.g. taesd3/taef1 for 16 channels) that belongs to the model that made this "
                         f"latent, through core VAE Decode.")


def _chunk(tv: TinyVAE, pixels_per_image: int, batch: int) -> int:
    """Loads the model; images per step so TAESD's activations fit the free memory."""
    per = pixels_per_image * ELEMENTS_PER_PIXEL * (torch.finfo(tv.dtype).bits // 8)
    mm.load_models_gpu([tv.patcher], memory_required=per)
    free = mm.get_free_memory(tv.patcher.load_device)
    return max(1, min(batch, int(free * 0.8 // per)))


class TinyVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptTinyVAELoader",
            display_name="SDXLOpt Tiny VAE Loader (TAESD)",
            category=f"{CATEGORY}/vae",
            description="Loads TAESD / TAESDXL, the tiny VAE (about 1 M parameters per half): a much lighter and "
                        "faster stand-in for the full VAE at a small loss of detail. Takes ComfyUI's layout "
                        "(the two files in models/vae_approx, or one file), and diffusers' AutoencoderTiny.",
            inputs=[
                io.Combo.Input("tae_name", options=tae_choices(), tooltip=(
                    "The TAESD weights. 'name (encoder + decoder)' loads the pair of files in models/vae_approx "
                    "(e.g. taesdxl_encoder.pth + taesdxl_decoder.pth); a single file may hold both halves or one "
                    "(a decoder alone decodes; encoding needs the encoder). Files in models/vae are listed too "
                    "(e.g. diffusers' AutoencoderTiny diffusion_pytorch_model.safetensors, renamed).")),
                io.Combo.Input("latent_type", options=["auto", *PRESETS], default="auto", tooltip=(
                    "Which model's latents these are, for the latent scaling: sdxl (x0.13025) or sd1.x "
                    "(x0.18215). auto: from the file name (names with 'xl' are SDXL, plain 'taesd' is SD1.x, "
                    "anything else SDXL). Wrong scaling gives washed-out or over-saturated images.")),
            ],
            outputs=[TinyVAEType.Output(display_name="tiny_vae", tooltip="The tiny VAE, for SDXLOpt Tiny VAE "
                                                                         "Decode / Encode.")],
        )

    @classmethod
    def execute(cls, tae_name: str, latent_type: str) -> io.NodeOutput:
        files = resolve_choice(tae_name)
        parts = [(name, comfy.utils.load_torch_file(path, safe_load=True)) for name, path in files]
        preset = guess_preset(tae_name) if latent_type == "auto" else latent_type
        if preset not in PRESETS:
            raise ValueError(f"expected latent_type in {['auto', *PRESETS]}, got {latent_type!r}. Fix: pick one.")
        tv = make_tiny_vae(parts, preset, tae_name)
        log.info("SDXLOpt Tiny VAE: %s, %s latents (x%s), %s, encoder %s, decoder %s", tae_name, preset,
                 tv.scaling.scale, tv.dtype, tv.model.encoder is not None, tv.model.decoder is not None)
        return io.NodeOutput(tv)


class TinyVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptTinyVAEDecode",
            display_name="SDXLOpt Tiny VAE Decode",
            category=f"{CATEGORY}/vae",
            description="Decodes a LATENT to an IMAGE with the tiny VAE (TAESD): a fraction of the full VAE's time "
                        "and memory, slightly softer detail. Same value range as VAE Decode.",
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode (SDXL or SD1.x, 4 channels), as a "
                                                   "sampler outputs it. It is not modified."),
                TinyVAEType.Input("tiny_vae", tooltip="From SDXLOpt Tiny VAE Loader; its latent_type sets the "
                                                      "scaling."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, samples: dict, tiny_vae: TinyVAE) -> io.NodeOutput:
        z = samples["samples"]
        check_latent(z, tiny_vae.latent_channels, "SDXLOpt Tiny VAE Decode")
        if tiny_vae.model.decoder is None:
            raise ValueError(f"SDXLOpt Tiny VAE Decode: expected decoder weights in {tiny_vae.source}, got an "
                             "encoder only. Fix: load the pair (name (encoder + decoder)) or the *_decoder file.")
        step = _chunk(tiny_vae, z.shape[2] * z.shape[3] * 64, z.shape[0])
        device, out = tiny_vae.patcher.load_device, []
        for part in z.split(step):
            img = decode_latents(tiny_vae.model, part.to(device=device, dtype=tiny_vae.dtype), tiny_vae.scaling)
            out.append(img.float().to(mm.intermediate_device()))
        return io.NodeOutput(torch.cat(out).movedim(1, -1))


class TinyVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptTinyVAEEncode",
            display_name="SDXLOpt Tiny VAE Encode",
            category=f"{CATEGORY}/vae",
            description="Encodes an IMAGE to a LATENT with the tiny VAE (TAESD), in the same raw latent scale as VAE "
                        "Encode gives. Sides that are not multiples of 8 are center-cropped, as VAE Encode does.",
            inputs=[
                io.Image.Input("pixels", tooltip="The image to encode (RGB; an alpha channel is ignored)."),
                TinyVAEType.Input("tiny_vae", tooltip="From SDXLOpt Tiny VAE Loader, with its encoder weights."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, pixels: torch.Tensor, tiny_vae: TinyVAE) -> io.NodeOutput:
        if tiny_vae.model.encoder is None:
            raise ValueError(f"SDXLOpt Tiny VAE Encode: expected encoder weights in {tiny_vae.source}, got a "
                             "decoder only. Fix: load the pair (name (encoder + decoder)) or the *_encoder file.")
        h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
        if h == 0 or w == 0:
            raise ValueError(f"SDXLOpt Tiny VAE Encode: expected an image of at least 8x8 pixels, got "
                             f"{tuple(pixels.shape[1:3])}. Fix: upscale the image first.")
        y0, x0 = (pixels.shape[1] - h) // 2, (pixels.shape[2] - w) // 2
        x = pixels[:, y0:y0 + h, x0:x0 + w, :3].movedim(-1, 1)
        step = _chunk(tiny_vae, h * w, x.shape[0])
        device, out = tiny_vae.patcher.load_device, []
        for part in x.split(step):
            z = encode_image(tiny_vae.model, part.to(device=device, dtype=tiny_vae.dtype), tiny_vae.scaling)
            out.append(z.float().to(mm.intermediate_device()))
        return io.NodeOutput({"samples": torch.cat(out)})


NODES = [TinyVAELoader, TinyVAEDecode, TinyVAEEncode]
