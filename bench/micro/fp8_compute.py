"""Micro-benchmark (GPU): what fp8 compute (torch._scaled_mm) gains per matmul and per SDXL forward, and what
quantizing the activations costs, by activation-scale scheme.

    python -m bench.micro.fp8_compute          (from bench/gpu_run.sh's environment: ComfyUI importable)
    SDXLOPT_MICRO_COMPILE=1 ...                (adds inductor-compiled forwards: ~2-3 min of compile each)

Schemes: "dynamic" (one scale per call from the call's largest |x|: a reduction, then the scaled cast; the
first version of the option), "unit" (ops/fp8.py quantize_activation: scale 1, clamp to +-448, one cast, as
ComfyUI's fp8_e4m3fn_fast; the option since this measurement); "unit fast": the same with Hopper's fast
fp8 accumulation (`use_fast_accum`, ops/fp8.py SCALED_FAST_ACCUM).
1. The six Linear shapes of SDXL's transformer blocks at batch 2, 1024x1024: fp16 F.linear vs _scaled_mm on
   pre-quantized input vs the whole fp8 linear per scheme; 20 calls captured in a CUDA graph, median of 15.
2. One batch-2 forward of the full UNet (random weights) captured in a CUDA graph: stock fp16, fp8 storage
   (per-layer upcast), fp8 compute per scheme; relative error of the output vs fp16.
3. (SDXLOPT_MICRO_COMPILE=1) the same forwards compiled (inductor "default", captured the same way): fp16
   and fp8 compute, unit scale (the dynamic scheme compiled: bench/results/gpu_compile_fp8compute_h100.md).
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (rows, in, out): attention projection, GEGLU in, GEGLU out at 64x64 (640 ch) and 32x32 (1280 ch)
    (8192, 640, 640), (8192, 640, 5120), (8192, 2560, 640),
    (2048, 1280, 1280), (2048, 1280, 10240), (2048, 5120, 1280),
]


def dynamic_quantize(x2: torch.Tensor, one: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The measured alternative: one scale per call, the call's largest |x| mapped to e4m3fn's largest value.
    `one` (a layer's unit scale, passed by scaled_linear since session 12) is ignored: the scale is computed."""
    from sdxl_optimizer.ops import fp8 as ofp8

    amax = torch.linalg.vector_norm(x2, ord=float("inf"), dtype=torch.float32).clamp(min=2.0 ** -4)
    inv = ofp8.E4M3_MAX / amax
    return (x2 * inv.to(x2.dtype)).to(torch.float8_e4m3fn), inv.reciprocal()


def graph_ms(fn, calls: int = 20, rounds: int = 15) -> float:
    from bench.micro.unet_kernels import graphed

    replay, _ = graphed(fn, calls)
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1000)
    return statistics.median(times)


def shape_row(m: int, k: int, n: int, gen, schemes) -> None:
    from sdxl_optimizer.ops import fp8 as ofp8

    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev, generator=gen).half()
    w16 = (torch.randn(n, k, device=dev, generator=gen) / k**0.5).half()
    w8 = ofp8.quantize(w16, torch.float8_e4m3fn)
    b = torch.zeros(n, device=dev, dtype=torch.float16)
    xq, scale = dynamic_quantize(x)
    one = ofp8._unit_scale(dev)
    row = {"fp16": graph_ms(lambda: F.linear(x, w16, b))}
    for fast in (False, True):
        row[f"fp8 mm only{' fast' if fast else ''}"] = graph_ms(
            lambda fast=fast: torch._scaled_mm(xq, w8.t(), scale_a=scale, scale_b=one, bias=b,
                                               out_dtype=torch.float16, use_fast_accum=fast))
    for name, q in schemes.items():
        ofp8.quantize_activation = q
        row[f"fp8 {name}"] = graph_ms(lambda: ofp8.scaled_linear(x, w8, b))
    ofp8.quantize_activation = schemes["unit"]
    ofp8.SCALED_FAST_ACCUM = True
    row["fp8 unit fast"] = graph_ms(lambda: ofp8.scaled_linear(x, w8, b))
    ofp8.SCALED_FAST_ACCUM = False
    tflops = 2 * m * k * n / 1e9
    print(f"  {m}x{k}x{n}: " + ", ".join(f"{k_} {v * 1000:.1f} us ({tflops / v:.0f} TFLOP/s)" for k_, v in row.items()))


def main() -> None:
    from bench.cases.fp8 import _build, _forward_inputs
    from bench.common import BenchContext, rel_err

    ctx = BenchContext(small=False, out_dir=None)  # boots ComfyUI, which makes the pack importable
    from sdxl_optimizer.ops import fp8 as ofp8

    schemes = {"dynamic": dynamic_quantize, "unit": ofp8.quantize_activation}
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("\n1. per matmul (ms per call, CUDA graph of 20 calls):")
    gen = torch.Generator(device=dev).manual_seed(0)
    for m, k, n in SHAPES:
        shape_row(m, k, n, gen, schemes)

    import comfy.model_management as mm

    from sdxl_optimizer.nodes.fp8 import fp8_operations

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    models = {"fp16 (stock)": base,
              "fp8 storage (per-layer upcast)": _build(ctx, sd, {"custom_operations": fp8_operations(torch.float8_e4m3fn)}),
              "fp8 compute": _build(ctx, sd, {"custom_operations": fp8_operations(torch.float8_e4m3fn, False, True)})}
    mm.load_models_gpu(list(models.values()))
    inp = _forward_inputs(ctx)

    def fwd(p):
        return p.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])

    print("\n2. one batch-2 1024x1024 forward, eager kernels in one CUDA graph (ms; rel. err vs fp16):")
    with torch.inference_mode():
        ref = fwd(base).float()
        rows = [("fp16 (stock)", base, None), ("fp8 storage (per-layer upcast)", models["fp8 storage (per-layer upcast)"], None)]
        rows += [(f"fp8 compute, {s}", models["fp8 compute"], s) for s in schemes]
        rows += [("fp8 compute, unit, fast accum", models["fp8 compute"], "unit fast")]
        res = {}
        for name, p, scheme in rows:
            ofp8.quantize_activation = schemes[(scheme or "unit").split()[0]]
            ofp8.SCALED_FAST_ACCUM = bool(scheme and scheme.endswith("fast"))
            out = fwd(p).float()
            err = rel_err(out, ref)
            res[name] = (graph_ms(lambda p=p: fwd(p), calls=3, rounds=10), err)
        ofp8.quantize_activation = schemes["unit"]
        ofp8.SCALED_FAST_ACCUM = False
        for name, (ms, err) in res.items():
            print(f"  {name:34s} {ms:7.2f} ms  {ms / res['fp16 (stock)'][0]:.3f}x  rel.err {err:.3f}")

    if os.environ.get("SDXLOPT_MICRO_COMPILE") != "1":
        return
    import torch._dynamo as dynamo

    print("\n3. compiled (inductor default), one CUDA graph per forward:")
    out_rows = {}
    for name, p, scheme in [("fp16 (stock)", base, None), ("fp8 compute, unit", models["fp8 compute"], "unit")]:
        dynamo.reset()
        ofp8.quantize_activation = schemes[scheme or "unit"]
        cf = torch.compile(lambda p=p: fwd(p), mode="default")
        with torch.inference_mode():
            t0 = time.perf_counter()
            cf()
            torch.cuda.synchronize()
            c_s = time.perf_counter() - t0
            out_rows[name] = (graph_ms(cf, calls=3, rounds=10), c_s)
        print(f"  {name:34s} {out_rows[name][0]:7.2f} ms  {out_rows[name][0] / out_rows['fp16 (stock)'][0]:.3f}x  "
              f"(compiled in {c_s:.0f} s)", flush=True)
    ofp8.quantize_activation = schemes["unit"]


if __name__ == "__main__":
    main()
