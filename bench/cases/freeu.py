"""FreeU overhead: the same fp16 SDXL run with and without SDXLOpt FreeU (SDXL preset), eager.

FreeU adds a few elementwise ops and the skip filter on 6 of the 9 output blocks; the target is <= 3%
over the baseline. Rows: baseline, v1 with the default matmul filter, v1 with torch.fft (diffusers' form),
v2 with matmul; each with its overhead against the baseline measured in this case. The variants run
interleaved (baseline, v1, v1 fft, v2; five rounds; medians): eager timings on a fast GPU drift by more
than the overhead being measured, and interleaving spreads that drift over every variant. A second row
per variant is the steady-state step cost from many short runs alternated with the baseline
(SDXLOPT_BENCH_STEP_ROUNDS, default 30; median of per-round ratios): whole-image medians of a few rounds
still carry several percent of drift. The compiled overhead (stable to ~0.3%) is a row of the compile case.

A third row per variant accounts for FreeU's cost directly, free of drift: the CPU time spent inside the
patch per step (the patch timed from within the run; in an eager, launch-bound step that CPU time is what
FreeU adds to the step) against the baseline's CPU time per step, and the GPU kernel time per step with and
without FreeU (torch.profiler: the device work it adds, what a GPU-bound configuration would pay).
"""
from __future__ import annotations

import os
import time

from ..common import BenchContext

# which FreeU variants run (default all) and how many interleaved rounds (default 5): a GPU lease is short
VARIANTS = [v for v in os.environ.get("SDXLOPT_BENCH_FREEU_VARIANTS", "v1 matmul,v1 fft,v2 matmul").split(",") if v]
ROUNDS = int(os.environ.get("SDXLOPT_BENCH_FREEU_ROUNDS", "0")) or None
# "a/a": also time an unpatched clone of the baseline, last in each round: what the method reports for no change
AA = "a/a" in os.environ.get("SDXLOPT_BENCH_FREEU_CHECKS", "")
AA_KEY = "unpatched clone"


class _CpuTimed:
    """A patch wrapped to add up the CPU time (this thread) spent inside it, launches included."""

    def __init__(self, fn) -> None:
        self.fn, self.cpu_s, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        t0 = time.thread_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.cpu_s += time.thread_time() - t0
            self.calls += 1


def patch_cpu_ms_per_step(ctx: BenchContext, model, steps: int = 12, runs: int = 3) -> float:
    """Median over `runs` runs of the CPU ms per step spent inside the model's output-block patches."""
    per_run = []
    for _ in range(runs):
        m = model.clone()
        patches = m.model_options["transformer_options"]["patches"]
        timed = [_CpuTimed(p) for p in patches["output_block_patch"]]
        patches["output_block_patch"] = timed
        ctx.step_stamps(m, steps=steps)
        per_run.append(1000 * sum(t.cpu_s for t in timed) / steps)
    return sorted(per_run)[len(per_run) // 2]


def label(key: str) -> str:
    if key == AA_KEY:
        return "unpatched clone of the baseline (A/A check: the method's reading for no change)"
    version, method = key.split()
    return f"FreeU SDXL preset {version}, {method} filter"


def run(ctx: BenchContext) -> None:
    from sdxl_optimizer.nodes.freeu import apply_freeu
    from sdxl_optimizer.ops.freeu import FreeUConfig

    base = ctx.base_model()
    variants = {"baseline": base}
    for key in VARIANTS:
        version, method = key.split()
        variants[key] = apply_freeu(base, FreeUConfig.from_preset("SDXL", version), method)
    if AA:
        variants[AA_KEY] = base.clone()
    m = ctx.measure_interleaved({k: (lambda model=model: ctx.sample(model)) for k, model in variants.items()},
                                rounds=ROUNDS)
    ref = m["baseline"]
    ctx.add_row("freeu", f"baseline (no FreeU), cfg {ctx.cfg}", ref, overhead_pct=0.0, timing="interleaved")
    for key in list(variants)[1:]:
        ctx.add_row("freeu", f"{label(key)}, cfg {ctx.cfg}", m[key],
                    overhead_pct=round(100 * (m[key].seconds / ref.seconds - 1), 2), timing="interleaved")
    per_step = ctx.step_ratio_interleaved(variants, "baseline")
    for key in list(variants)[1:]:
        ctx.add_row("freeu", f"{label(key)}, cfg {ctx.cfg}: per step",
                    s_per_step=round(per_step[key]["step_s"], 5),
                    overhead_pct=round(100 * (per_step[key]["ratio"] - 1), 2),
                    cpu_ms_per_step=round(per_step[key]["cpu_s"] * 1000, 2),
                    cpu_overhead_pct=round(100 * (per_step[key]["cpu_ratio"] - 1), 2),
                    timing=f"per step: {per_step[key]['rounds']} alternated 12-step runs, median of per-round ratios "
                           f"(baseline {per_step['baseline']['step_s'] * 1000:.1f} ms/step wall, "
                           f"{per_step['baseline']['cpu_s'] * 1000:.1f} ms CPU)")
    kernel_ref = ctx.kernel_ms_per_step(base)
    for key in [k for k in variants if k not in ("baseline", AA_KEY)]:
        cpu_ms = patch_cpu_ms_per_step(ctx, variants[key], steps=3 if ctx.small else 12, runs=1 if ctx.small else 3)
        kernel = ctx.kernel_ms_per_step(variants[key])
        ref_cpu_ms = per_step["baseline"]["cpu_s"] * 1000
        ctx.add_row("freeu", f"{label(key)}, cfg {ctx.cfg}: accounted", patch_cpu_ms_per_step=round(cpu_ms, 3),
                    cpu_overhead_pct=round(100 * cpu_ms / ref_cpu_ms, 2),
                    kernel_ms_per_step=None if kernel is None else round(kernel, 3),
                    kernel_ms_per_step_baseline=None if kernel_ref is None else round(kernel_ref, 3),
                    gpu_overhead_pct=None if kernel is None or kernel_ref is None
                    else round(100 * (kernel / kernel_ref - 1), 2),
                    timing=f"CPU inside the patch per step (median of 3 runs) / baseline CPU per step "
                           f"({ref_cpu_ms:.1f} ms); GPU kernel time per step with / without FreeU (torch.profiler)")
