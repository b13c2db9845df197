"""Micro-benchmark (GPU): how far the compiled fp8-compute SDXL forward is from what the kernels this torch has
can do, and what issue 8's 50-step targets (1.2 s at cfg 5; 0.9 s with the CFG cutoff at 50%) would need.

    python -m bench.micro.kernel_floor          (from bench/gpu_run.sh's environment: ComfyUI importable)
    SDXLOPT_MICRO_BATCHES=2,1                   (the batches to compile and profile, in order; default 2,1)
    SDXLOPT_MICRO_INDUCTOR='default;coordinate_descent_tuning=1'   (inductor settings to compare, see part 3)
    SDXLOPT_MICRO_TOP=15                        (also list each variant's 15 costliest Triton kernels)
    python -m bench.micro.kernel_floor --flops  (part 1 only: runs on CPU, no GPU needed)

1. FLOPs of one 1024x1024 forward by class, counted by torch.utils.flop_counter on the full SDXL UNet (ComfyUI's
   modules, built on the meta device): GEMM (the Linear layers), convolution, attention (QK^T and AV).
2. The best rate any SDXL Linear shape reaches as an fp8 _scaled_mm at that batch (the shapes of
   batch1_kernels' per-matmul table).
3. Per batch (2: cond + uncond; 1: after a CFG cutoff): the fp8-compute UNet (the loaders' ops, as
   `fp8_compute` builds it) compiled with inductor "default" and replayed in a CUDA graph; its GPU kernel time
   by class: GEMM (cuBLAS), convolution (cuDNN), attention (cuDNN/flash), Triton (inductor's fused norms,
   activations and casts, the convolutions' input kernels included), other (memsets, copies); each compute
   class's TFLOP/s; idle = replay time minus kernel time. With SDXLOPT_MICRO_INDUCTOR, once per variant of
   torch._inductor.config (part 4 takes the first).
4. Bounds on 50 x forward(batch 2) and 25 x (forward(batch 2) + forward(batch 1)): (A) as measured; (B) every
   GEMM at part 2's best rate; (C) B, and the convolutions' FLOPs at that rate as well (an fp8 convolution,
   which torch does not have); (D) C, and attention at twice its measured rate (an fp8 attention, which no
   released torch has). Every other kernel and the idle time stay as measured; the host's time between
   steps is not counted, so a real run is slower than each bound.
"""
from __future__ import annotations

import os
import re
import sys
import time

import torch

CLASSES = (  # first match wins; Triton kernels first: inductor names them after the ops they fused
    ("triton", re.compile(r"^triton_", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|mha", re.I)),
    ("conv", re.compile(r"fprop|implicit|winograd|conv", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|cublas|xmma|sm\d\d_", re.I)),
)
FLOP_CLASSES = (("attention", re.compile(r"attention|bmm")), ("conv", re.compile(r"conv")),
                ("gemm", re.compile(r"mm")))


def class_of(kernel: str) -> str:
    for name, pat in CLASSES:
        if pat.search(kernel):
            return name
    return "other"


def flops_by_class(batch: int) -> dict[str, float]:
    """TFLOP of one 1024x1024 forward of the full SDXL UNet at `batch`, by class (meta device: nothing runs)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from torch.utils.flop_counter import FlopCounterMode

    from bench.common import SDXL_UNET_CONFIG

    cfg = dict(SDXL_UNET_CONFIG)
    model = UNetModel(**cfg, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.float16)

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(meta(batch, 4, 128, 128), timesteps=torch.empty(batch, device="meta"),
              context=meta(batch, 77, cfg["context_dim"]), y=meta(batch, cfg["adm_in_channels"]))
    out: dict[str, float] = {}
    for op, n in counter.get_flop_counts()["Global"].items():
        kind = next((k for k, pat in FLOP_CLASSES if pat.search(str(op))), "other")
        out[kind] = out.get(kind, 0.0) + n / 1e12
    return out


def best_fp8_rate(batch: int, gen) -> float:
    """The highest TFLOP/s of an fp8 _scaled_mm over SDXL's Linear shapes at `batch` (1024x1024)."""
    from bench.micro.batch1_kernels import LEVELS, _linear_times

    best = 0.0
    for tokens, ch, inner in LEVELS:
        m = tokens * batch
        for k, n in ((ch, ch), (ch, 3 * ch), (ch, 2 * inner), (inner, ch)):
            t8 = _linear_times(m, k, n, gen)[1]
            best = max(best, 2 * m * k * n / 1e9 / t8)
    return best


def inductor_variants() -> dict[str, dict]:
    """SDXLOPT_MICRO_INDUCTOR: variants separated by ';', each 'default' or comma-separated torch._inductor.config
    settings (name=value; 1/0 for booleans), e.g. 'default;coordinate_descent_tuning=1'."""
    out = {}
    for text in os.environ.get("SDXLOPT_MICRO_INDUCTOR", "default").split(";"):
        settings = {}
        for item in filter(None, text.split(",")):
            if item == "default":
                continue
            key, value = item.split("=", 1)
            settings[key] = {"1": True, "0": False}.get(value, int(value) if value.isdigit() else value)
        out[text] = settings
    return out


def profile_compiled(fwd, batch: int, settings: dict | None = None) -> tuple[float, float, list]:
    """(compile s, CUDA-graph replay ms, kernel_table rows) of fwd(batch) compiled with inductor "default" and
    `settings` of torch._inductor.config."""
    import torch._dynamo as dynamo
    import torch._inductor.config as inductor_config

    from bench.micro.fp8_compute import graph_ms
    from bench.micro.unet_kernels import profile_kernels

    dynamo.reset()
    compiled = torch.compile(lambda: fwd(batch), mode="default")
    with torch.inference_mode(), inductor_config.patch(settings or {}):
        t0 = time.perf_counter()
        compiled()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        replay_ms = graph_ms(compiled, calls=3, rounds=10)
        rows = profile_kernels(compiled)[1]
    return compile_s, replay_ms, rows


def by_class(rows: list) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, ms, _count in rows:
        out[class_of(key)] = out.get(class_of(key), 0.0) + ms
    return out


def bound_ms(replay_ms: float, kernels: dict[str, float], tflop: dict[str, float], rate: float,
             scenario: str) -> float:
    """One forward's time (ms) under one of SCENARIOS: the replay time, with the kernel time of the classes the
    scenario speeds up replaced by their FLOPs / rate (TFLOP / (TFLOP/s) * 1000 = ms)."""
    t = replay_ms
    if scenario in ("B", "C", "D"):
        t += tflop.get("gemm", 0.0) / rate * 1000 - kernels.get("gemm", 0.0)
    if scenario in ("C", "D"):
        t += tflop.get("conv", 0.0) / rate * 1000 - kernels.get("conv", 0.0)
    if scenario == "D":
        t -= kernels.get("attention", 0.0) / 2
    return t


SCENARIOS = {"A": "as measured", "B": "every GEMM at the best fp8 rate",
             "C": "B + an fp8 convolution at that rate", "D": "C + an fp8 attention at 2x"}


def main() -> None:
    if "--flops" in sys.argv:
        sys.path.insert(0, os.environ.get("SDXLOPT_COMFYUI", ".host/ComfyUI"))
        sys.argv = [sys.argv[0], "--cpu", "--use-pytorch-cross-attention"]
        import comfy.options

        comfy.options.enable_args_parsing()
        for b in (2, 1):
            print(f"batch {b}: " + ", ".join(f"{k} {v:.3f} TFLOP" for k, v in sorted(flops_by_class(b).items())))
        return

    from bench.cases.fp8 import _build, _forward_inputs
    from bench.common import BenchContext

    ctx = BenchContext(small=False, out_dir=None)  # boots ComfyUI, which makes the pack importable
    import comfy.model_management as mm

    from sdxl_optimizer.nodes.fp8 import fp8_operations

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    batches = [int(b) for b in os.environ.get("SDXLOPT_MICRO_BATCHES", "2,1").split(",")]
    tflop = {b: flops_by_class(b) for b in batches}
    gen = torch.Generator(device="cuda").manual_seed(0)
    rate = {b: best_fp8_rate(b, gen) for b in batches}
    print("\n1-2. FLOPs per 1024x1024 forward; the best fp8 _scaled_mm rate over SDXL's Linear shapes:")
    for b in batches:
        print(f"  batch {b}: " + ", ".join(f"{k} {v:.3f} TFLOP" for k, v in sorted(tflop[b].items()))
              + f"; best fp8 GEMM {rate[b]:.0f} TFLOP/s", flush=True)

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    del base
    ctx._base = None
    mm.unload_all_models()
    torch.cuda.empty_cache()
    model = _build(ctx, sd, {"custom_operations": fp8_operations(torch.float8_e4m3fn, False, True)})
    del sd
    mm.load_models_gpu([model])
    inputs = {b: _forward_inputs(ctx, b) for b in batches}

    def fwd(b):
        inp = inputs[b]
        return model.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])

    variants = inductor_variants()
    print("\n3. fp8-compute forward compiled (inductor default), replayed in a CUDA graph; GPU kernel time by class:")
    per = {}
    for b in batches:
        for name, settings in variants.items():
            compile_s, replay_ms, rows = profile_compiled(fwd, b, settings)
            kernels = by_class(rows)
            per.setdefault(b, (replay_ms, kernels))  # the bounds take the first variant
            total = sum(kernels.values())
            rates = ", ".join(f"{k} {tflop[b][k] / kernels[k] * 1000:.0f}" for k in ("gemm", "conv", "attention")
                              if kernels.get(k))
            label = "" if len(variants) == 1 else f" [{name}]"
            print(f"  batch {b}{label}: {replay_ms:.2f} ms per forward (compiled in {compile_s:.0f} s); kernels "
                  f"{total:.2f} ms: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
                  + f"; idle {replay_ms - total:.2f} ms; TFLOP/s: {rates}", flush=True)
            if os.environ.get("SDXLOPT_MICRO_TOP"):
                for key, ms, count in [r for r in rows if class_of(r[0]) == "triton"][:int(os.environ["SDXLOPT_MICRO_TOP"])]:
                    print(f"      {ms:6.3f} ms  x{count:<4d} {key[:110]}")

    if 1 not in per or 2 not in per:
        return
    print("\n4. lower bounds (GPU time only; host time between steps not counted):")
    for s, text in SCENARIOS.items():
        t2 = bound_ms(*per[2], tflop[2], rate[2], s)
        t1 = bound_ms(*per[1], tflop[1], rate[1], s)
        print(f"  ({s}) {text:38s} batch 2 {t2:6.2f} ms, batch 1 {t1:6.2f} ms: 50 steps cfg 5 {50 * t2 / 1000:.3f} s "
              f"(target 1.2), cutoff 50% {25 * (t2 + t1) / 1000:.3f} s (target 0.9)")


if __name__ == "__main__":
    main()
