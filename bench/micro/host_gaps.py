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
Set SDXLOPT_MICRO_STACK=plain for the compiled model alone (same split), =fp8_compute_deepcache_cutoff for the
stack on the fp8 loader with fp8 compute.

SDXLOPT_MICRO_IDLE=1 (after the conditioning fix, session 11): where the GPU waits for the host. One run traced
with CUDA activity only (little host overhead): the GPU's busy time (union of kernels), its idle time inside the
span, the largest gaps and the kernels around them; the host time before the first UNet call (setup) and
after the last; Python's garbage collector's pauses during a run (gc.callbacks); and, interleaved in the same
process, the runs' wall time with the two host costs that can be switched off from outside taken away, as
upper bounds of what removing them saves: dynamo's guard evaluation (torch.compiler.set_stance
skip_guard_eval_unsafe) and the collector (gc.disable during the run).
"""
from __future__ import annotations

import collections
import contextlib
import gc
import os
import statistics
import time
import traceback
import warnings
from unittest import mock

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
    if stack == "fp8_compute_deepcache_cutoff":  # the fp8 loader with fp8 compute, as the compile case builds it
        from bench.cases.compile import fp8_model

        base = fp8_model(ctx, base, False, True)[0]
    model = _compile(base, "inductor", "reduce-overhead") if stack == "plain" else \
        _compile(_cutoff(_deepcache(base, 3), 0.5), "inductor", "reduce-overhead")
    calls: list = []
    timed = call_timer(model, calls)
    call_host: list = []  # perf_counter at each UNet call's start and end (host side)

    profiled: dict = {}  # SDXLOPT_MICRO_FIRSTCALL: cProfile of the setup + first UNet call, and of one later call

    def stamp_call(executor, *args, **kwargs):
        n = len(call_host) // 2
        prof = profiled.get(n)
        if prof is not None and n:
            prof.enable()
        call_host.append(time.perf_counter())
        out = executor(*args, **kwargs)
        call_host.append(time.perf_counter())
        if prof is not None:
            prof.disable()
        return out

    import comfy.patcher_extension

    timed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "micro_host_stamps", stamp_call)
    steps = ctx.steps

    def run(sync_debug: bool = False) -> dict:
        pos, neg = ctx.conds(1)
        stamps: list[tuple[float, float]] = []
        events: list = []
        calls.clear()
        call_host.clear()
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
        if 0 in profiled:
            profiled[0].enable()
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
                    step_host_sum_s=sum(host), calls=len(calls),
                    to_first_call_s=call_host[0] - t0 if call_host else 0.0,
                    first_call_s=call_host[1] - call_host[0] if len(call_host) > 1 else 0.0,
                    after_last_call_s=t1 - call_host[-1] if call_host else 0.0, sites=sites)

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
    if os.environ.get("SDXLOPT_MICRO_FIRSTCALL") == "1":
        first_call_report(run, profiled)
    if os.environ.get("SDXLOPT_MICRO_TIMELINE") == "1":
        timeline_report(run)
    if os.environ.get("SDXLOPT_MICRO_IDLE") == "1":
        idle_report(run)
    if quick:
        return
    dbg = run(sync_debug=True)
    print(f"sync debug run: wall {dbg['wall_s']:.3f} s; synchronizing calls by site ({sum(dbg['sites'].values())}):")
    for site, n in dbg["sites"].most_common(15):
        print(f"  {n:5d}  {site}")


def first_call_report(run, profiled: dict) -> None:
    """Host time of the run's setup plus its first UNet call, and of one later (full, batch 2) call: cProfile."""
    import cProfile
    import io
    import pstats

    for n, what in ((0, "run start to the end of the first UNet call"), (3, "UNet call 3 (a full step)")):
        profiled.clear()
        profiled[n] = cProfile.Profile()
        r = run()
        buf = io.StringIO()
        st = pstats.Stats(profiled[n], stream=buf)
        print(f"cProfile, {what} (run wall {r['wall_s']:.4f} s, host before the first call "
              f"{r['to_first_call_s'] * 1e3:.1f} ms, first call {r['first_call_s'] * 1e3:.1f} ms):")
        rows = [(ct, tt, nc, f"{os.path.basename(f)}:{ln}({fn})")
                for (f, ln, fn), (_, nc, tt, ct, _) in st.stats.items() if ct >= 5e-4]
        for ct, tt, nc, name in sorted(rows, reverse=True)[:45]:
            print(f"  cum {ct * 1e3:8.2f} ms  own {tt * 1e3:7.2f} ms  x{nc:<6d} {name}")
        print("  by own time:")
        for ct, tt, nc, name in sorted(rows, key=lambda r: -r[1])[:20]:
            print(f"  own {tt * 1e3:7.2f} ms  cum {ct * 1e3:8.2f} ms  x{nc:<6d} {name}")
    profiled.clear()


def gpu_gaps(kernels: list) -> tuple[list, float, float]:
    """Idle gaps between the (start, end, name) kernel intervals sorted by start: ([(length, at, name before,
    name after)], busy time (their union), end of the last one); times as the profiler gives them (us)."""
    gaps, busy, end, prev = [], 0.0, kernels[0][0], ""
    for s0, s1, name in kernels:
        if s0 > end:
            gaps.append((s0 - end, end, prev, name))
        busy += max(0.0, s1 - max(s0, end))
        if s1 > end:
            end, prev = s1, name
    return gaps, busy, end


def timeline_report(run) -> None:
    """The start and the end of one run on one clock (CPU + CUDA activity, no stacks): our own ranges
    (record_function around the layout walk, the compiled call, the UNet call), the CUDA runtime calls of
    >= 0.3 ms, and the GPU's idle gaps of >= 0.5 ms, in time order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from sdxl_optimizer.nodes import compile as node
    from sdxl_optimizer.ops import compile as cops

    def ranged(obj, attr, label):
        orig = getattr(obj, attr)

        def wrapped(*a, **k):
            with record_function(label):
                return orig(*a, **k)
        return mock.patch.object(obj, attr, wrapped)

    with contextlib.ExitStack() as patches:
        for obj, attr, label in ((node.CompiledPath, "_layout", "## layout walk"),
                                 (node.CompiledPath, "_invoke", "## _invoke"),
                                 (cops.CompiledEntry, "__call__", "## compiled call (guards + graph)"),
                                 (node.CompiledPath, "call", "## CompiledPath.call")):
            patches.enter_context(ranged(obj, attr, label))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r = run()
    evs = list(prof.events())
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in evs if e.device_type == DeviceType.CUDA
                     and e.time_range.end > e.time_range.start)
    cpu = [e for e in evs if e.device_type != DeviceType.CUDA]
    t0 = min([e.time_range.start for e in cpu] + [k[0] for k in kernels])
    rows = []
    for e in cpu:
        d = e.time_range.elapsed_us()
        if e.name.startswith("##") or (e.name.startswith("cuda") and d >= 300):
            rows.append((e.time_range.start - t0, d, "host", e.name))
    gaps, _, end = gpu_gaps(kernels) if kernels else ([], 0.0, t0)
    rows += [(at - t0, d, "GPU idle", "") for d, at, _, _ in gaps if d >= 500]
    total = end - t0
    print(f"timeline of one run (CPU + CUDA activity; wall {r['wall_s']:.4f} s; offsets from the first event, "
          f"trace length {total / 1e3:.1f} ms):")
    for at, d, who, name in sorted(rows):
        if at <= 130e3 or at >= total - 60e3:
            print(f"  {at / 1e3:8.2f} ms  {d / 1e3:7.2f} ms  {who:8s} {name}")


def idle_report(run) -> None:
    """GPU idle gaps of one run (CUDA activity only), the collector's pauses, and the upper-bound A/B."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = run()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    print(f"traced run (CUDA activity only): wall {r['wall_s']:.4f} s, host before the first UNet call "
          f"{r['to_first_call_s'] * 1e3:.1f} ms, after the last {r['after_last_call_s'] * 1e3:.1f} ms")
    if kernels:
        gaps, busy, end = gpu_gaps(kernels)
        gaps = [(d, at - kernels[0][0], a, b) for d, at, a, b in gaps]  # at: from the first kernel
        span = end - kernels[0][0]
        idle = [g for g in gaps if g[0] >= 20]
        print(f"  GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms "
              f"({len(gaps)} gaps; {len(idle)} of >= 20 us hold {sum(g[0] for g in idle) / 1e3:.1f} ms)")
        print("  largest gaps (us, at ms from the first kernel, kernel before -> after):")
        for d, at, a, b in sorted(gaps, reverse=True)[:15]:
            print(f"    {d:8.0f} us at {at / 1e3:7.1f} ms  {a[:60]} -> {b[:60]}")
        bins: collections.Counter = collections.Counter()
        spent: dict = collections.defaultdict(float)
        for d, at, _, _ in idle:
            bins[int(at / 1e3 // 50)] += 1
            spent[int(at / 1e3 // 50)] += d
        print("  idle (>= 20 us gaps) by 50 ms window of the span: " +
              ", ".join(f"{k * 50}-{k * 50 + 50} ms: {spent[k] / 1e3:.1f} ({bins[k]})" for k in sorted(spent)))

    pauses: list = []
    started: dict = {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses.append((info.get("generation"), time.perf_counter() - started.pop("t")))

    gc.callbacks.append(on_gc)
    try:
        r = run()
    finally:
        gc.callbacks.remove(on_gc)
    by_gen = collections.defaultdict(lambda: [0, 0.0])
    for g, dt in pauses:
        by_gen[g][0] += 1
        by_gen[g][1] += dt
    print(f"garbage collector during one run (wall {r['wall_s']:.4f} s): " + (", ".join(
        f"gen {g}: {n} x, {dt * 1e3:.1f} ms" for g, (n, dt) in sorted(by_gen.items())) or "no collection"))

    @contextlib.contextmanager
    def no_gc():
        gc.disable()
        try:
            yield
        finally:
            gc.enable()

    def skip_guards():
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    def skip_guards_after_first():  # full guards on the run's first UNet call only
        from sdxl_optimizer.nodes import compile as node

        orig = node.CompiledPath._invoke
        seen = []

        def invoke(self, *a, **k):
            seen.append(1)
            with skip_guards() if len(seen) > 1 else contextlib.nullcontext():
                return orig(self, *a, **k)
        return mock.patch.object(node.CompiledPath, "_invoke", invoke)

    def named_walk():  # the signature walk before session 11: named_parameters(), then a second walk for blocks
        from sdxl_optimizer.ops import compile as cops

        def slow(module, block_type=None):
            items = [(n, p.dtype, tuple(p.shape), p.stride(), str(p.device)) for n, p in module.named_parameters()]
            items += [(n, t.dtype, tuple(t.shape), t.stride(), str(t.device)) for n, t in module.named_buffers()]
            blocks = [m for m in module.modules() if block_type is not None and isinstance(m, block_type)]
            return hash(tuple(items)), blocks
        return mock.patch.object(cops, "module_layout", slow)

    variants = {"as is": contextlib.nullcontext, "guards skipped": skip_guards,
                "guards skipped after call 0": skip_guards_after_first, "gc off": no_gc,
                "old signature walk": named_walk}
    walls: dict = collections.defaultdict(list)
    firsts: dict = collections.defaultdict(list)
    for _ in range(int(os.environ.get("SDXLOPT_MICRO_ROUNDS", "5"))):
        for name, cm in variants.items():
            try:
                with cm():
                    r = run()
            except Exception as e:  # a torch without the stance option: say so, keep the others
                print(f"  {name}: {type(e).__name__}: {e}"[:200])
                continue
            walls[name].append(r["wall_s"])
            firsts[name].append(r["first_call_s"])
    print("interleaved runs (median wall s; median host ms of the first UNet call):")
    for name in variants:
        if walls[name]:
            print(f"  {name:16s} {statistics.median(walls[name]):.4f}  ({', '.join(f'{w:.4f}' for w in walls[name])})"
                  f"  first call {1e3 * statistics.median(firsts[name]):.1f} ms")


if __name__ == "__main__":
    main()
