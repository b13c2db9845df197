"""Micro-benchmark (GPU): why fp8 compute speeds up the batch-2 (cond + uncond) SDXL forward but not the
batch-1 (cond-only) one a CFG cutoff switches to (bench/results/gpu_compile_s11_h100.md: 19.97 vs 19.96 ms per
batch-1 call, 30.22 vs 33.86 ms per batch-2 call), and what a batch-1 forward spends its GPU time on.

    python -m bench.micro.batch1_kernels        (from bench/gpu_run.sh's environment: ComfyUI importable)
    SDXLOPT_MICRO_COMPILE=0 ...                 (skips part 3, its ~2-3-minute compiles)
    SDXLOPT_MICRO_VARIANTS=fp16,fp8,fp8_before  (part 3's variants, in order; default fp16,fp8)

1. The Linear shapes of SDXL's transformer blocks at batch 1 and 2 (1024x1024): fp16 F.linear, fp8 _scaled_mm
   on pre-quantized input (fast accumulation, as ops/fp8.py), and the same with q, k, v joined into one matmul
   (one weight of 3x the rows: what a fused QKV projection would run); 20 calls in a CUDA graph, median.
2. One forward of the full UNet (random weights, ComfyUI's modules) at batch 1 and 2, eager kernels in a CUDA
   graph: fp16 and fp8 compute (the loaders' ops).
3. (default on) the batch-1 forward compiled (inductor "default", captured the same way) for fp16 and fp8
   compute, with the GPU time split by kernel kind and the top kernels of each. `fp8_before`: fp8 compute as
   it was before session 12 (a scale made in the forward for each matmul, and only calls with rows in
   multiples of 16 on fp8: cross-attention keys/values and the embeddings upcast their weight instead).
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.nn.functional as F

# (tokens per image, channels, ff inner): the two transformer levels of SDXL at 1024x1024
LEVELS = [(4096, 640, 2560), (1024, 1280, 5120)]


def _linear_times(m: int, k: int, n: int, gen) -> tuple[float, float, float]:
    """ms per call of an (m x k) @ (k x n) Linear: fp16, fp8 _scaled_mm on pre-quantized input, ops/fp8.py's
    scaled_linear (the clamp-and-cast of the activation as its own kernel, as in eager)."""
    from bench.micro.fp8_compute import graph_ms
    from sdxl_optimizer.ops import fp8 as ofp8

    dev = torch.device("cuda")
    one = ofp8._unit_scale(dev)
    x = torch.randn(m, k, device=dev, generator=gen).half()
    w16 = (torch.randn(n, k, device=dev, generator=gen) / k**0.5).half()
    w8 = ofp8.quantize(w16, torch.float8_e4m3fn)
    xq = ofp8.quantize_activation(x, one)[0]
    b = torch.zeros(n, device=dev, dtype=torch.float16)
    return (graph_ms(lambda: F.linear(x, w16, b)),
            graph_ms(lambda: torch._scaled_mm(xq, w8.t(), scale_a=one, scale_b=one, bias=b,
                                              out_dtype=torch.float16, use_fast_accum=True)),
            graph_ms(lambda: ofp8.scaled_linear(x, w8, b)))


def gemm_rows(batch: int, gen) -> None:
    for tokens, ch, inner in LEVELS:
        m = tokens * batch
        for label, k, n in (("proj", ch, ch), ("qkv", ch, 3 * ch), ("ff in", ch, 2 * inner), ("ff out", inner, ch)):
            t16, t8, tq = _linear_times(m, k, n, gen)
            tf = 2 * m * k * n / 1e9
            print(f"  batch {batch} {label:6s} {m}x{k}x{n}: fp16 {t16 * 1000:6.1f} us ({tf / t16:4.0f} TFLOP/s), "
                  f"fp8 mm {t8 * 1000:6.1f} us ({tf / t8:4.0f}), fp8 with the eager cast {tq * 1000:6.1f} us",
                  flush=True)


def main() -> None:
    from bench.cases.fp8 import _build, _forward_inputs
    from bench.common import BenchContext, rel_err
    from bench.micro.fp8_compute import graph_ms
    from bench.micro.unet_kernels import print_split, profile_kernels

    ctx = BenchContext(small=False, out_dir=None)  # boots ComfyUI, which makes the pack importable
    import comfy.model_management as mm

    from sdxl_optimizer.nodes.fp8 import fp8_operations
    from sdxl_optimizer.ops import fp8 as ofp8

    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for rows in (1, 154):  # fp8 compute takes any row count since session 12: check the CUDA kernel does
        x = torch.randn(rows, 2048, device=dev, dtype=torch.float16)
        w = ofp8.quantize(torch.randn(1280, 2048, device=dev) / 45, torch.float8_e4m3fn)
        b = torch.randn(1280, device=dev, dtype=torch.float16)
        ref = F.linear(x.clamp(-448, 448).to(torch.float8_e4m3fn).float(), w.float(), b.float())
        got = ofp8.scaled_linear(x, w, b, torch.ones((), device=dev))
        print(f"scaled_linear, {rows} rows x 2048 -> 1280 on CUDA: rel.err vs the rounded operands' product "
              f"{rel_err(got.float(), ref):.1e}")
    print("\n1. per matmul (CUDA graph of 20 calls; qkv = q, k and v joined; 3x 'proj' is the three apart):")
    gen = torch.Generator(device=dev).manual_seed(0)
    for batch in (1, 2):
        gemm_rows(batch, gen)

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    models = {"fp16": base,
              "fp8 compute": _build(ctx, sd, {"custom_operations": fp8_operations(torch.float8_e4m3fn, False, True)})}
    mm.load_models_gpu(list(models.values()))
    inputs = {b: _forward_inputs(ctx, b) for b in (1, 2)}

    def fwd(p, b):
        inp = inputs[b]
        return p.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])

    print("\n2. one 1024x1024 forward, eager kernels in one CUDA graph (ms):")
    with torch.inference_mode():
        for b in (1, 2):
            ref = fwd(base, b).float()
            t = {name: graph_ms(lambda p=p, b=b: fwd(p, b), calls=3, rounds=10) for name, p in models.items()}
            err = rel_err(fwd(models["fp8 compute"], b).float(), ref)
            print(f"  batch {b}: fp16 {t['fp16']:.2f} ms, fp8 compute {t['fp8 compute']:.2f} ms "
                  f"({t['fp8 compute'] / t['fp16']:.3f}x, rel.err {err:.3f})", flush=True)

    if os.environ.get("SDXLOPT_MICRO_COMPILE", "1") != "1":
        return
    from unittest import mock

    import torch._dynamo as dynamo

    scaled, applicable = ofp8.scaled_linear, ofp8.scaled_applicable
    before = (mock.patch.object(ofp8, "scaled_linear", lambda x, w, b=None, scale=None: scaled(x, w, b)),
              mock.patch.object(ofp8, "scaled_applicable",
                                lambda x, w: applicable(x, w) and (x.numel() // x.shape[-1]) % 16 == 0))
    variants = {"fp16": (base, ()), "fp8": (models["fp8 compute"], ()), "fp8_before": (models["fp8 compute"], before)}
    chosen = os.environ.get("SDXLOPT_MICRO_VARIANTS", "fp16,fp8").split(",")
    print("\n3. batch-1 forward compiled (inductor default), one CUDA graph per forward:")
    res = {}
    for name in chosen:
        p, patches = variants[name]
        dynamo.reset()
        cf = torch.compile(lambda p=p: fwd(p, 1), mode="default")
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            t0 = time.perf_counter()
            cf()
            torch.cuda.synchronize()
            c_s = time.perf_counter() - t0
            res[name] = graph_ms(cf, calls=3, rounds=10)
            print(f"  {name}: {res[name]:.2f} ms ({res[name] / res[chosen[0]]:.3f}x {chosen[0]}), compiled in "
                  f"{c_s:.0f} s", flush=True)
            kinds, rows = profile_kernels(cf)
        print_split(f"  {name}", kinds, rows, top=24, indent="    ")


if __name__ == "__main__":
    main()
