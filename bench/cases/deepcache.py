"""DeepCache: the same fp16 SDXL run uncached and with SDXLOpt DeepCache (1024x1024, Euler, 50 steps, cfg 5).

Rows: the uncached run (measured here, same seed, the reference for speed and fidelity), the target setting
with its full steps eager (only shallow steps replayed as CUDA graphs: what DeepCache alone gives), then
DeepCache at interval 3 / branch 0 (the issue's target: <= 1.2 s/image and >= 2.8x on an H100/H200, <= 0.3 GiB extra
peak VRAM), interval 2 / branch 0, interval 3 / branch 0 with the non-uniform schedule, and interval 3 /
branch 3 (a deeper re-join). Each row: s/image, speedup over the uncached run, peak VRAM and the extra over
it (allocated; for the first three rows also the memory the allocator holds, CUDA graph pools included),
the UNet calls that took the shallow path, and the fidelity of the final latent against the uncached
run's: max |error| and PSNR (peak = max |reference latent|). The weights are random: fidelity says how far
the sampling trajectory drifts, not how a picture would look.

A "per step" row splits the target setting's cost: the wall and CPU time of its full and its shallow steps
and of the uncached run's steps (sampler callback stamps of alternated whole runs, the GPU synchronized at
each stamp: graphed steps queue their work without waiting for it), the shallow step as a
share of a full one, and the speed-up those per-step costs give without the per-run fixed costs, next to the
ceiling of the schedule (all steps / full steps: what free shallow steps would give).
"""
from __future__ import annotations

import logging
import math
import re
import statistics

import torch

from ..common import BenchContext

log = logging.getLogger(__name__)

VARIANTS = [  # (row name, DeepCacheConfig kwargs)
    ("interval 3, branch 0", {"interval": 3, "branch": 0}),
    ("interval 2, branch 0", {"interval": 2, "branch": 0}),
    ("interval 3, branch 0, non-uniform", {"interval": 3, "branch": 0, "schedule": "non-uniform"}),
    ("interval 3, branch 3", {"interval": 3, "branch": 3}),
]
SUMMARY = re.compile(r"DeepCache: (\d+)/(\d+) UNet calls took the shallow path")


class _LastSummary(logging.Handler):
    """Keeps the last DeepCache summary line (shallow calls / all calls of the run)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = SUMMARY.search(record.getMessage())
        if m:
            self.last = f"{m[1]}/{m[2]}"


def fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |out - ref| and PSNR in dB with peak = max |ref| (final latents, fp32)."""
    out, ref = out.float().cpu(), ref.float().cpu()
    err = (out - ref).abs()
    mse = float((err ** 2).mean())
    peak = float(ref.abs().max())
    psnr = math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)
    return {"max_abs_err": round(float(err.max()), 4), "psnr_db": round(psnr, 2) if math.isfinite(psnr) else "inf"}


def run(ctx: BenchContext) -> None:
    from sdxl_optimizer.nodes import deepcache as dcn
    from sdxl_optimizer.ops.deepcache import DeepCacheConfig

    base = ctx.base_model()
    dtype = str(ctx.dtype).replace("torch.", "")
    summary = _LastSummary()
    level = dcn.log.level
    dcn.log.setLevel(logging.INFO)  # the summary line is INFO; the host's root logger may sit at WARNING
    dcn.log.addHandler(summary)
    try:
        # the target row and its reference interleaved (eager drifts run to run; bench/common.py)
        # plus the same setting with its full steps eager (what the full-call graphs add)
        name0, kw0 = VARIANTS[0]
        dc0 = dcn.apply_deepcache(base, DeepCacheConfig(**kw0))
        dc0_eager = dcn.apply_deepcache(base, DeepCacheConfig(**kw0))

        def eager_full():
            dcn.FULL_GRAPHS = False
            try:
                return ctx.sample(dc0_eager)
            finally:
                dcn.FULL_GRAPHS = True

        runs = {"ref": lambda: ctx.sample(base), "dc": lambda: ctx.sample(dc0), "dc_eager_full": eager_full}
        pair = ctx.measure_interleaved(runs)
        held = {k: ctx.held_gib(fn) for k, fn in runs.items()}
        ref = pair["ref"]
        ctx.add_row("deepcache", f"uncached comfyui {dtype}, cfg {ctx.cfg}", ref, speedup=1.0, extra_vram_gib=0.0,
                    held_vram_gib=round(held["ref"], 3), extra_held_gib=0.0,
                    shallow_calls=f"0/{ctx.steps}", timing="interleaved with the next two rows",
                    notes="reference run (same seed) for speed and fidelity")
        m = pair["dc_eager_full"]
        ctx.add_row("deepcache", f"DeepCache {name0}, full steps eager, cfg {ctx.cfg}", m,
                    speedup=round(ref.seconds / m.seconds, 3), extra_vram_gib=round(m.peak_gib - ref.peak_gib, 3),
                    held_vram_gib=round(held["dc_eager_full"], 3),
                    extra_held_gib=round(held["dc_eager_full"] - held["ref"], 3), shallow_calls=summary.last,
                    **fidelity(m.result, ref.result),
                    notes="FULL_GRAPHS off: only the shallow steps replayed as CUDA graphs")
        for name, kw in VARIANTS:
            try:
                if name == name0:
                    m = pair["dc"]
                else:
                    model = dcn.apply_deepcache(base, DeepCacheConfig(**kw))
                    m = ctx.measure(lambda model=model: ctx.sample(model))
            except Exception as e:  # one failing setting must not lose the others' figures
                log.exception("deepcache bench: %s failed", name)
                ctx.add_row("deepcache", f"DeepCache {name}", notes=f"FAILED {type(e).__name__}: {e}"[:300])
                continue
            ctx.add_row("deepcache", f"DeepCache {name}, cfg {ctx.cfg}", m,
                        speedup=round(ref.seconds / m.seconds, 3),
                        extra_vram_gib=round(m.peak_gib - ref.peak_gib, 3),
                        **({"held_vram_gib": round(held["dc"], 3), "extra_held_gib": round(held["dc"] - held["ref"], 3)}
                           if name == name0 else {}),
                        shallow_calls=summary.last,
                        **fidelity(m.result, ref.result),
                        notes="fidelity vs the uncached run, random weights")
        per_step_row(ctx, base, dc0, DeepCacheConfig(**kw0), f"DeepCache {name0}, cfg {ctx.cfg}: per step")
    finally:
        dcn.log.removeHandler(summary)
        dcn.log.setLevel(level)


def per_step_row(ctx: BenchContext, base, model, config, name: str, rounds: int = 3) -> None:
    """Full vs shallow step costs of `model` (DeepCache on `base`), from whole runs alternated with `base`."""
    from sdxl_optimizer.ops.deepcache import uniform_full_steps

    if config.schedule != "uniform" or (config.start_percent, config.end_percent) != (0.0, 1.0):
        raise ValueError("per_step_row expects the uniform schedule over the whole run")
    full = set(uniform_full_steps(ctx.steps, config.interval))
    ref, dc_full, dc_shallow = [], [], []
    for _ in range(1 if ctx.small else rounds):
        ref += ctx.step_stamps(base, steps=ctx.steps, sync=True)
        for i, p in enumerate(ctx.step_stamps(model, steps=ctx.steps, sync=True)):
            (dc_full if i + 1 in full else dc_shallow).append(p)  # entry i is step i + 1
    if not dc_full or not dc_shallow:
        return

    def med(pairs, k):
        return statistics.median(p[k] for p in pairs) * 1000

    n_full = len(full)
    ref_ms, full_ms, shallow_ms = med(ref, 0), med(dc_full, 0), med(dc_shallow, 0)
    ctx.add_row("deepcache", name, uncached_ms_per_step=round(ref_ms, 2), uncached_cpu_ms=round(med(ref, 1), 2),
                full_ms_per_step=round(full_ms, 2), full_cpu_ms=round(med(dc_full, 1), 2),
                shallow_ms_per_step=round(shallow_ms, 2), shallow_cpu_ms=round(med(dc_shallow, 1), 2),
                shallow_pct_of_full=round(100 * shallow_ms / full_ms, 1),
                steady_speedup=round(ctx.steps * ref_ms / (n_full * full_ms + (ctx.steps - n_full) * shallow_ms), 3),
                ceiling_speedup=round(ctx.steps / n_full, 3),
                timing=f"medians over {1 if ctx.small else rounds} alternated {ctx.steps}-step runs per model "
                       f"(sampler callback stamps, the GPU synchronized at each; {n_full} full steps per run)")
