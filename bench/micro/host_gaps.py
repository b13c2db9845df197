"""Micro-benchmark (GPU): where a compiled DeepCache + CFG cutoff image's time goes besides the UNet.

    python -m bench.micro.host_gaps        (from bench/gpu_run.sh's environment: ComfyUI importable)

The compile case's fastest stack (fp16 + SDXLOpt Compile + DeepCache 3 + CFG cutoff 50%, 1024x1024, Euler,
50 steps, cfg 5) takes ~0.68 s per image on a lent H100 while its UNet calls add up to ~0.52 s of GPU time.
This splits one image (the bench's own path, nodes.common_ksampler, under inference mode) into:
  - wall time of the run, and of its parts: before the first step's callback (setup and step 0), the
    steps, after the last callback;
  - GPU time inside the UNet calls (CUDA events around each APPLY_MODEL call) and the whole run's GPU span
    (events at the first and last callback);
  - per-step host time (callback to callback, thread CPU time) by step kind;
  - every call that synchronizes the host with the GPU during a run (torch.cuda.set_sync_debug_mode), by
    Python call site (frames in comfy / sdxl_optimizer / nodes), with counts.
Set SDXLOPT_MICRO_STACK=plain for the compiled model alone (same split).
"""
from __future__ import annotations

import collections
import os
import statistics
import time
import traceback
import warnings

import torch


def _site(stack: list) -> str:
    keep = [f for f in stack if any(k in f.filename for k in ("comfy", "sdxl_optimizer", "nodes.py"))
            and "warnings" not in f.filename]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(keep[-4:])) or "?"


def main() -> None:
    from bench.cases.compile import _compile, _cutoff, _deepcache, call_timer
    from bench.common import BenchContext

    ctx = BenchContext(small=False, out_dir=None)

    base = ctx.base_model()
    stack = os.environ.get("SDXLOPT_MICRO_STACK", "deepcache_cutoff")
    model = _compile(base, "inductor", "reduce-overhead") if stack == "plain" else \
        _compile(_cutoff(_deepcache(base, 3), 0.5), "inductor", "reduce-overhead")
    calls: list = []
    timed = call_timer(model, calls)
    steps = ctx.steps

    def run(sync_debug: bool = False) -> dict:
        pos, neg = ctx.conds(1)
        stamps: list[tuple[float, float]] = []
        events: list = []
        calls.clear()
        sites: collections.Counter = collections.Counter()

        def callback(step, x0, x, total):
            stamps.append((time.perf_counter(), time.thread_time()))
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append(ev)

        import latent_preview  # common_ksampler's callback factory, replaced below
        import nodes

        orig = latent_preview.prepare_callback
        latent_preview.prepare_callback = lambda *a, **k: callback
        old_show = warnings.showwarning
        if sync_debug:
            def show(message, category, filename, lineno, file=None, line=None):
                if "synchroniz" in str(message):
                    sites[_site(traceback.extract_stack()[:-1])] += 1
                else:
                    old_show(message, category, filename, lineno, file, line)
            warnings.showwarning = show
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        ctx.sync()
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                nodes.common_ksampler(timed, 0, steps, ctx.cfg, "euler", "normal", pos, neg, ctx.latent(1))
            t_end_host = time.perf_counter()
            if sync_debug:
                torch.cuda.set_sync_debug_mode(0)
            ctx.sync()
            t1 = time.perf_counter()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old_show
            latent_preview.prepare_callback = orig
        unet_ms = sum(a.elapsed_time(b) for _, a, b in calls)
        span_ms = events[0].elapsed_time(events[-1]) if len(events) > 1 else 0.0
        host = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
        wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
        return dict(wall_s=t1 - t0, host_return_s=t_end_host - t0, to_first_cb_s=stamps[0][0] - t0,
                    after_last_cb_s=t1 - stamps[-1][0], unet_gpu_s=unet_ms / 1e3, span_gpu_s=span_ms / 1e3,
                    step_wall_ms=1e3 * statistics.median(wall), step_host_ms=1e3 * statistics.median(host),
                    step_host_sum_s=sum(host), calls=len(calls), sites=sites)

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, stack {stack}", flush=True)
    t = time.perf_counter()
    run()
    print(f"first run (compiles): {time.perf_counter() - t:.1f} s", flush=True)
    run()
    quick = os.environ.get("SDXLOPT_MICRO_QUICK") == "1"  # profile only
    results = [run() for _ in range(1 if quick else 3)]
    keys = [k for k in results[0] if k != "sites"]
    print("three runs (median):")
    for k in keys:
        vals = [r[k] for r in results]
        print(f"  {k:18s} {statistics.median(vals):9.4f}   ({', '.join(f'{v:.4f}' for v in vals)})")
    if os.environ.get("SDXLOPT_MICRO_PROFILE") == "1":  # the CUDA runtime calls the host spends its time in
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            run()
        rt = [e for e in prof.key_averages() if e.key.startswith("cuda")]
        print("CUDA runtime calls during one run (host time):")
        for e in sorted(rt, key=lambda e: -e.cpu_time_total)[:8]:
            print(f"  {e.cpu_time_total / 1e3:9.1f} ms  x{e.count:<5d} {e.key}")
        by_site: dict = collections.defaultdict(lambda: [0, 0.0])
        for e in prof.events():  # each blocking copy: the ops it ran under and the nearest Python frames
            if e.name != "cudaMemcpyAsync":
                continue
            chain, p, stack = [], e.cpu_parent, []
            while p is not None and len(chain) < 3:
                chain.append(p.name)
                stack = stack or [f for f in (p.stack or []) if "torch/" not in f][:4]
                p = p.cpu_parent
            key = " < ".join(chain) + " @ " + " <- ".join(stack)
            by_site[key][0] += 1
            by_site[key][1] += e.cpu_time_total
        print("cudaMemcpyAsync by site (count, host ms):")
        for key, (n, us) in sorted(by_site.items(), key=lambda kv: -kv[1][1])[:10]:
            print(f"  {n:5d} {us / 1e3:8.1f} ms  {key}")
        from torch.autograd import DeviceType

        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels)
        print(f"GPU time in the {len(kernels)} device events the profiler saw (CUDA-graph kernels included where "
              f"CUPTI reports them): {busy / 1e3:.1f} ms")
    if os.environ.get("SDXLOPT_MICRO_COPIES") == "1":  # Python call sites of the copies / moves, host time
        spent: dict = collections.defaultdict(lambda: [0, 0.0])
        originals = {n: getattr(torch.Tensor, n) for n in ("copy_", "to", "item", "cpu", "tolist", "__bool__")}

        def spy(name, fn):
            def wrapped(*a, **k):
                t = time.perf_counter()
                out = fn(*a, **k)
                dt = time.perf_counter() - t
                if dt > 5e-5:  # ignore calls that did not wait
                    site = _site(traceback.extract_stack()[:-1])
                    spent[(name, site)][0] += 1
                    spent[(name, site)][1] += dt
                return out
            return wrapped

        for n, fn in originals.items():
            setattr(torch.Tensor, n, spy(n, fn))
        try:
            r = run()
        finally:
            for n, fn in originals.items():
                setattr(torch.Tensor, n, fn)
        print(f"run with spies: wall {r['wall_s']:.3f} s; calls that took > 50 us, by site (count, host ms):")
        for (n, site), (c, dt) in sorted(spent.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"  {c:5d} {dt * 1e3:8.1f} ms  {n:8s} {site}")
    if quick:
        return
    dbg = run(sync_debug=True)
    print(f"sync debug run: wall {dbg['wall_s']:.3f} s; synchronizing calls by site ({sum(dbg['sites'].values())}):")
    for site, n in dbg["sites"].most_common(15):
        print(f"  {n:5d}  {site}")


if __name__ == "__main__":
    main()
