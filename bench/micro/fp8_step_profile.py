"""Micro-benchmark (GPU): where an eager fp8 UNet forward spends its host and device time, against stock fp16.

    python -m bench.micro.fp8_step_profile        (from bench/gpu_run.sh's environment: ComfyUI importable)

Builds the full SDXL UNet (random weights) as stock fp16 and with the fp8 loader's operations (per-layer
upcast), runs batch-2 1024x1024 forwards, and prints per forward: wall and host CPU ms (alternated, medians),
GPU kernel ms and kernel count (torch.profiler), the host-side CUDA runtime calls (malloc/free/sync/launch
counts) and the top host ops by self CPU time. With SDXLOPT_MICRO_ALLOC=async the CUDA allocator is
cudaMallocAsync, as ComfyUI's main.py sets it by default.
"""
from __future__ import annotations

import os
import statistics

if os.environ.get("SDXLOPT_MICRO_ALLOC") == "async":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")

import torch  # noqa: E402


def main() -> None:
    from bench.common import BenchContext, alternated_cuda_times, kernel_count, kernel_us

    ctx = BenchContext(small=False, out_dir=None)
    import comfy.model_management as mm

    from bench.cases.fp8 import _build, _forward_inputs
    from sdxl_optimizer.nodes.fp8 import fp8_operations

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    fp8 = _build(ctx, sd, {"custom_operations": fp8_operations(torch.float8_e4m3fn, False)})
    models = {"fp16": base, "fp8": fp8}
    mm.load_models_gpu(list(models.values()))
    inp = _forward_inputs(ctx)

    def fwd(p):
        with torch.inference_mode():
            return p.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])

    times = alternated_cuda_times({k: (lambda p=p: fwd(p)) for k, p in models.items()}, rounds=20)
    for k, v in times.items():
        print(f"{k}: wall {1e3 * statistics.median(a for a, _ in v):.2f} ms, host CPU until return "
              f"{1e3 * statistics.median(b for _, b in v):.2f} ms per forward (median of 20, alternated)")

    from torch.profiler import ProfilerActivity, profile
    for k, p in models.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd(p)
            torch.cuda.synchronize()
        avg = prof.key_averages()
        gpu_us, kernels = kernel_us(prof), kernel_count(prof)
        runtime = {e.key: e.count for e in avg if e.key.startswith(("cuda", "cudaLaunch"))}
        print(f"\n{k}: GPU kernel time {gpu_us / 3 / 1000:.2f} ms per forward, {kernels / 3:.0f} device ops; "
              f"CUDA runtime calls per forward: " + ", ".join(f"{n} {c / 3:.0f}" for n, c in sorted(runtime.items())))
        print(avg.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
