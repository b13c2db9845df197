"""VAE: full decode vs core tiled vs SDXLOpt tiled (each GroupNorm mode) vs TAESD on the SDXL VAE architecture.

Per row: seconds per image, peak VRAM above what was resident before the call (the VAE weights), and the
largest/mean 8-bit error against the full decode of the same latent (16 px away from the border), in the run's
dtype (max_err_255) and, for the tiled decodes, with the same weights in fp32 (max_err_255_fp32: what the
tiling itself changes; bf16 rounding alone moves a random-weight decode by several levels). Full mode:
1024x1024 (and 2048x2048 for the tiled peaks) with random weights; --small: a tiny x8 VAE on the CPU. Built
without diffusers: ComfyUI's own AutoencoderKL (comfy/ldm/models/autoencoder.py) with the SDXL VAE config,
seeded random weights, loaded through comfy.sd.VAE.
"""
from __future__ import annotations

import torch

from ..common import GIB, BenchContext, init_random_

CASE = "vae"
SDXL_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
SMALL_VAE_DDCONFIG = dict(SDXL_VAE_DDCONFIG, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1)
BORDER = 16  # px left out of the error: the image border, where zero padding differs by construction


def build_vae(ddconfig: dict, seed: int = 0, dtype: torch.dtype | None = None):
    """comfy.sd.VAE holding ComfyUI's AutoencoderKL with `ddconfig` and seeded random weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=ddconfig["z_channels"])
    init_random_(model, seed)
    sd = model.state_dict()
    del model
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": ddconfig["z_channels"]}},
                        dtype=dtype)


def build_taesd(seed: int = 1):
    """SDXLOpt Tiny VAE (TAESD architecture) with seeded random weights, SDXL latent scaling."""
    from sdxl_optimizer.nodes.taesd import make_tiny_vae
    from sdxl_optimizer.ops.taesd import TinyAutoencoder

    model = TinyAutoencoder(4)
    init_random_(model, seed)
    sd = {f"taesd_{k}": v for k, v in model.state_dict().items()}
    return make_tiny_vae([("random TAESD", sd)], "sdxl", "random TAESD")


def err8(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """Largest and mean 8-bit difference of two IMAGE batches, BORDER px away from the edges."""
    qa, qb = (x.float().mul(255).round() for x in (a, b))
    d = (qa - qb).abs()[:, BORDER:-BORDER, BORDER:-BORDER]
    return int(d.max().item()), round(d.mean().item(), 4)


def run(ctx: BenchContext) -> None:
    import nodes

    from sdxl_optimizer.nodes.taesd import TinyVAEDecode
    from sdxl_optimizer.nodes.tiled_vae import TiledVAEDecode, TiledVAEEncode

    cuda = ctx.device.type == "cuda"
    ddconfig = SMALL_VAE_DDCONFIG if ctx.small else SDXL_VAE_DDCONFIG
    side = 192 if ctx.small else 1024
    large = 384 if ctx.small else 2048
    tile, overlap = (128, 16) if ctx.small else (512, 64)
    g = torch.Generator().manual_seed(0)
    latents = {n: {"samples": torch.randn(1, 4, n // 8, n // 8, generator=g)} for n in (side, large)}

    def core_tiled(vae, latent, t: int):
        return lambda: nodes.VAEDecodeTiled().decode(vae, latent, t, overlap)[0]

    def ours(vae, latent, t: int, mode: str):
        return lambda: TiledVAEDecode.execute(samples=latent, vae=vae, tile_size=t, overlap=overlap,
                                              groupnorm=mode).result[0]

    # what each tiled decode is compared on: (size, row name, decode given a VAE)
    variants = [(side, f"core VAEDecodeTiled {tile}/{overlap}", lambda v, lat: core_tiled(v, lat, tile))]
    variants += [(side, f"SDXLOpt tiled {tile}/{overlap} {m}", lambda v, lat, m=m: ours(v, lat, tile, m))
                 for m in ("global", "global_fast", "tile")]
    variants += [(side, "SDXLOpt tiled auto global", lambda v, lat: ours(v, lat, 0, "global")),
                 (large, f"core VAEDecodeTiled {tile}/{overlap}", lambda v, lat: core_tiled(v, lat, tile)),
                 (large, f"SDXLOpt tiled {tile}/{overlap} global", lambda v, lat: ours(v, lat, tile, "global")),
                 (large, f"SDXLOpt tiled {tile}/{overlap} global_fast",
                  lambda v, lat: ours(v, lat, tile, "global_fast")),
                 (large, f"SDXLOpt tiled {2 * tile}/{overlap} global", lambda v, lat: ours(v, lat, 2 * tile, "global")),
                 (large, f"SDXLOpt tiled {2 * tile}/{overlap} tile", lambda v, lat: ours(v, lat, 2 * tile, "tile"))]

    with torch.inference_mode():
        # fidelity in fp32: bf16/fp16 rounding alone moves a random-weight decode by several 8-bit levels
        fp32 = {}
        vae32 = build_vae(ddconfig, dtype=torch.float32)
        refs = {n: nodes.VAEDecode().decode(vae32, latents[n])[0] for n in (side, large)}
        for n, name, make in variants:
            fp32[(n, name)] = err8(make(vae32, latents[n])(), refs[n])
        del vae32, refs
        ctx.free_models()

        def timed(n: int, name: str, fn, ref: torch.Tensor | None = None, **extra) -> torch.Tensor:
            out = fn()  # warm-up: loads the model, first-call kernels
            ctx.sync()
            resident = torch.cuda.memory_allocated() if cuda else 0
            m = ctx.measure(fn, warmup=0)
            if ref is not None:
                extra["max_err_255"], extra["mean_err_255"] = err8(out, ref)
            if (n, name) in fp32:
                extra["max_err_255_fp32"], extra["mean_err_255_fp32"] = fp32[(n, name)]
            ctx.add_row(CASE, f"{n}px {name}", m, steps=1,
                        peak_above_resident_gib=round(m.peak_gib - resident / GIB, 3), **extra)
            return out

        vae = build_vae(ddconfig)
        dt = str(vae.vae_dtype).replace("torch.", "")
        full = {side: timed(side, f"full decode (VAEDecode, {dt})",
                            lambda: nodes.VAEDecode().decode(vae, latents[side])[0])}
        for n, name, make in variants[:5]:
            timed(n, name, make(vae, latents[n]), full[n])

        if cuda:  # the other half-precision dtype
            other = torch.float16 if vae.vae_dtype != torch.float16 else torch.bfloat16
            vae_h = build_vae(ddconfig, dtype=other)
            timed(side, f"full decode (VAEDecode, {str(other).replace('torch.', '')})",
                  lambda: nodes.VAEDecode().decode(vae_h, latents[side])[0], full[side])
            del vae_h
            ctx.free_models()

        tiny = build_taesd()
        timed(side, "TAESD decode (SDXLOpt Tiny VAE Decode, random weights)",
              lambda: TinyVAEDecode.execute(samples=latents[side], tiny_vae=tiny).result[0])

        image = full[side].clone()
        ref_lat = timed(side, f"full encode (VAEEncode, {dt})",
                        lambda: nodes.VAEEncode().encode(vae, image)[0]["samples"])

        def core_enc() -> torch.Tensor:
            return nodes.VAEEncodeTiled().encode(vae, image, tile, overlap)[0]["samples"]

        def ours_enc() -> torch.Tensor:
            return TiledVAEEncode.execute(pixels=image, vae=vae, tile_size=tile, overlap=overlap,
                                          groupnorm="global").result[0]["samples"]

        for name, fn in ((f"core VAEEncodeTiled {tile}/{overlap}", core_enc),
                         (f"SDXLOpt tiled encode {tile}/{overlap} global", ours_enc)):
            rel = ((fn() - ref_lat).abs().max() / ref_lat.std()).item()
            timed(side, name, fn, max_err_latent_rel=round(rel, 5))
        ctx.free_models()

        full[large] = timed(large, f"full decode (VAEDecode, {dt})",
                            lambda: nodes.VAEDecode().decode(vae, latents[large])[0])
        for n, name, make in variants[5:]:
            timed(n, name, make(vae, latents[n]), full[n])
