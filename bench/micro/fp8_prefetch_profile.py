"""Micro-benchmark (GPU): where the fp8 prefetch's time goes (host calls, GPU kernels, stream overlap).

    python -m bench.micro.fp8_prefetch_profile        (from bench/gpu_run.sh's environment)

The loaders' fp8 SDXL model, batch-2 1024x1024 eager forwards, upcasts in turn vs prefetched: torch.profiler
per forward (GPU kernel time summed and the span from first to last kernel, the CUDA runtime calls' host
time by name), then a cProfile of each (Python functions whose own time differs most).
"""
from __future__ import annotations

import cProfile
import pstats

import torch


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from bench.cases.fp8 import _build, _forward_inputs
    from bench.common import BenchContext

    ctx = BenchContext(small=False, out_dir=None)
    import comfy.model_management as mm

    from sdxl_optimizer.nodes import fp8 as nfp8

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    del base
    ctx.free_models()
    fp8 = _build(ctx, sd, {"custom_operations": nfp8.fp8_operations(torch.float8_e4m3fn, False)})
    nfp8.attach_upcast_groups(fp8)
    mm.load_models_gpu([fp8])
    inp = _forward_inputs(ctx)
    scratch = fp8.model.diffusion_model.__dict__[nfp8.GROUPS_ATTR][0].scratch

    def fwd():
        with torch.inference_mode():
            return fp8.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])

    for mode in (False, True, False, True):
        scratch.prefetch = mode
        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd()
            torch.cuda.synchronize()
        events = prof.events()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 3e3
        streams = {}
        for e in kernels:
            streams.setdefault(getattr(e, "device_resource_id", None), []).append(e)
        per_stream = ", ".join(f"stream {k}: {len(v) / 3:.0f} ops {sum(e.time_range.elapsed_us() for e in v) / 3e3:.2f} ms"
                               for k, v in streams.items())
        print(f"\n== prefetch {mode}: GPU ops {len(kernels) / 3:.0f}, busy {busy:.2f} ms per forward ({per_stream})")
        avg = prof.key_averages()
        rows = sorted((e for e in avg if e.key.startswith("cuda")), key=lambda e: -e.self_cpu_time_total)[:8]
        for e in rows:
            print(f"  {e.key:32s} {e.count / 3:6.0f} calls {e.self_cpu_time_total / 3e3:7.2f} ms host per forward")
    own = {}
    for mode in (False, True):
        scratch.prefetch = mode
        fwd()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5):
            fwd()
        pr.disable()
        torch.cuda.synchronize()
        own[mode] = {f"{k[0].split('/')[-1]}:{k[1]}({k[2]})": (v[1], v[2]) for k, v in pstats.Stats(pr).stats.items()}
    keys = set(own[False]) | set(own[True])
    diff = sorted(keys, key=lambda k: -abs(own[True].get(k, (0, 0))[1] - own[False].get(k, (0, 0))[1]))
    print("\ncProfile, 5 forwards each: own time (ms per forward) and calls per forward, largest differences")
    for k in diff[:20]:
        a, b = own[False].get(k, (0, 0)), own[True].get(k, (0, 0))
        print(f"  {k[:80]:80s} in turn {a[1] * 200:7.3f} ms {a[0] / 5:6.0f}x   prefetch {b[1] * 200:7.3f} ms {b[0] / 5:6.0f}x")


if __name__ == "__main__":
    main()
