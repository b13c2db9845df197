"""Micro-benchmark (GPU): where a DeepCache shallow step's time goes, host side.

    python -m bench.micro.deepcache_step_split        (from bench/gpu_run.sh's environment: ComfyUI importable)

Full SDXL fp16 (random weights), 1024x1024, Euler, cfg 5, 24-step runs through comfy.sample, uncached and
DeepCache interval 3 / branch 0, alternated. Per step (sampler callback stamps): wall and host CPU time, and
the host CPU time spent inside the UNet call (forward pre-hook to forward hook of the diffusion model, which
holds DeepCache's wrapper and shallow forward); the rest of a step is the host's sampler (Euler, CFG,
conditioning batching, model_sampling) and the callback. GPU time per step from CUDA events recorded at
the callbacks. Then a cProfile of the shallow steps only (switched on and off at the callbacks) of one
DeepCache run: the functions with the most own and cumulative time (cProfile inflates Python time; read
shares, not milliseconds).
"""
from __future__ import annotations

import cProfile
import io
import pstats
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
    dc = dcn.apply_deepcache(base, DeepCacheConfig(interval=3, branch=0))
    dm = base.model.diffusion_model
    inside: list[float] = []
    t_enter = [0.0]
    dm.register_forward_pre_hook(lambda *a: t_enter.__setitem__(0, time.thread_time()))
    dm.register_forward_hook(lambda *a: inside.append(time.thread_time() - t_enter[0]))
    steps = 24

    def run(model, prof=None):
        pos, neg = ctx.conds(1)
        latent = ctx.latent(1)["samples"]
        noise = comfy.sample.prepare_noise(latent, 0)
        stamps: list[tuple[float, float]] = []
        events: list = []
        on = [False]
        inside.clear()

        def callback(i, *a):
            stamps.append((time.perf_counter(), time.thread_time()))
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append(ev)
            if prof is not None:  # profile the next step only if it is a shallow one (full: 0, 3, 6, ...)
                want = bool((i + 1) % 3)
                if want != on[0]:
                    prof.enable() if want else prof.disable()
                    on[0] = want

        with torch.inference_mode():  # as ComfyUI's executor runs prompts
            comfy.sample.sample(model, noise, steps, ctx.cfg, "euler", "normal", pos, neg, latent, seed=0,
                                callback=callback, disable_pbar=True)
        if prof is not None and on[0]:
            prof.disable()
        torch.cuda.synchronize()
        gpu = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
        per = [(b[0] - a[0], b[1] - a[1], inside[i + 1], gpu[i]) for i, (a, b) in enumerate(zip(stamps, stamps[1:]))]
        return per  # entry i: step i + 1 (wall, cpu, cpu inside the UNet call, GPU event time)

    for m in (base, dc, base, dc):
        run(m)
    rows = {"uncached": [], "full": [], "shallow": []}
    for _ in range(4):
        rows["uncached"] += run(base)
        for i, p in enumerate(run(dc)):
            rows["full" if (i + 1) % 3 == 0 else "shallow"].append(p)
    for k, v in rows.items():
        wall, cpu, unet, gpu = (statistics.median(p[j] for p in v) * 1e3 for j in range(4))
        print(f"{k:9s} step: wall {wall:7.2f} ms, host CPU {cpu:7.2f} ms, of which inside the UNet call "
              f"{unet:6.2f} ms, outside (sampler, callback) {cpu - unet:6.2f} ms; GPU events {gpu:7.2f} ms "
              f"[{len(v)} steps]")
    prof = cProfile.Profile()
    run(dc, prof)
    for key, n in (("tottime", 30), ("cumulative", 45)):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(n)
        print(f"--- shallow steps only, by {key}\n" + s.getvalue())


if __name__ == "__main__":
    main()
