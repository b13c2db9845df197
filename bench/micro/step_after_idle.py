"""Micro-benchmark (GPU): is a full SDXL step slower when the GPU idled just before it?

    python -m bench.micro.step_after_idle        (from bench/gpu_run.sh's environment: ComfyUI importable)

DeepCache's full steps measured ~10% slower than the uncached run's steps on lent H100s, though they run
the same forward. A DeepCache run alternates one full step with shallow steps that leave the GPU nearly idle.
This runs the plain fp16 model (no DeepCache) three ways, 24-step runs under inference mode, alternated:
  plain       nothing between steps
  idle gap    after every third step the host sleeps 6 ms in the callback (the GPU idles, like 2 shallow steps)
  busy gap    the same 6 ms, the host spinning instead of sleeping
and prints per-step wall and host CPU medians for the steps right after a gap and the others; plus the CUDA
allocator's device allocations (cudaMalloc calls) per run, uncached vs a DeepCache run.
"""
from __future__ import annotations

import statistics
import time

import torch


def main() -> None:
    from bench.common import BenchContext

    ctx = BenchContext(small=False, out_dir=None)
    import comfy.sample

    from sdxl_optimizer.nodes import deepcache as dcn
    from sdxl_optimizer.ops.deepcache import DeepCacheConfig

    base = ctx.base_model()
    steps = 24

    def run(model, gap: str | None = None):
        pos, neg = ctx.conds(1)
        latent = ctx.latent(1)["samples"]
        noise = comfy.sample.prepare_noise(latent, 0)
        stamps = []

        def callback(i, *a):
            if gap is not None and i % 3 == 2:
                t = time.perf_counter()
                if gap == "idle":
                    time.sleep(0.006)
                else:
                    while time.perf_counter() - t < 0.006:
                        pass
            stamps.append((time.perf_counter(), time.thread_time(), i))

        with torch.inference_mode():
            comfy.sample.sample(model, noise, steps, ctx.cfg, "euler", "normal", pos, neg, latent, seed=0,
                                callback=callback, disable_pbar=True)
        torch.cuda.synchronize()
        # step i+1 runs between the callbacks of steps i and i+1; the gap (if any) sits at the end of step i
        out = []
        for a, b in zip(stamps, stamps[1:]):
            after_gap = a[2] % 3 == 2
            wall = b[0] - a[0] - (0.006 if gap is not None and b[2] % 3 == 2 else 0.0)
            out.append((after_gap, wall, b[1] - a[1]))
        return out

    for m in (base, base):
        run(m)
    rows = {k: [] for k in ("plain", "idle", "busy")}
    for _ in range(4):
        rows["plain"] += run(base)
        rows["idle"] += run(base, "idle")
        rows["busy"] += run(base, "busy")
    for k, v in rows.items():
        for after in (True, False):
            sel = [p for p in v if p[0] == after]
            print(f"{k:5s} steps {'after a gap' if after else 'otherwise  '}: wall {1e3 * statistics.median(p[1] for p in sel):6.2f}"
                  f" ms (excluding the gap), host CPU {1e3 * statistics.median(p[2] for p in sel):6.2f} ms [{len(sel)}]")
    dc = dcn.apply_deepcache(base, DeepCacheConfig(interval=3, branch=0))
    for name, model in (("uncached", base), ("deepcache", dc), ("uncached", base), ("deepcache", dc)):
        before = torch.cuda.memory_stats()
        run(model)
        after = torch.cuda.memory_stats()
        print(f"{name:9s} run: cudaMalloc calls {after.get('num_device_alloc', 0) - before.get('num_device_alloc', 0)}, "
              f"cudaFree calls {after.get('num_device_free', 0) - before.get('num_device_free', 0)}, "
              f"alloc retries {after.get('num_alloc_retries', 0) - before.get('num_alloc_retries', 0)}")


if __name__ == "__main__":
    main()
