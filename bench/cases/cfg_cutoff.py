"""CFG cutoff: full CFG vs guidance stopped at 50% / 75% of the steps (SDXLOpt CFG Cutoff), fp16, eager.

Two configurations: batch 1 at the bench resolution (on a fast GPU eager SDXL is launch-bound there, so
halving the UNet batch saves less than half the step) and batch 4 (UNet batch 8 with CFG: compute-bound).
Every row also reports the UNet batch size of each model call, the number of per-image UNet forwards
(sum of batch sizes) and the FLOPs that saves, from a FlopCounterMode count of one batch-1 forward.
"""
from __future__ import annotations

import itertools
import logging
import os

from ..common import BenchContext

log = logging.getLogger(__name__)


def batch_trace(model, sink: list):
    """A clone of `model` recording the UNet batch size of every model call (no host sync)."""
    import comfy.patcher_extension

    def rec(executor, x, *args, **kwargs):
        sink.append(int(x.shape[0]))
        return executor(x, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench_batch_trace", rec)
    return m


def compact(sizes: list[int]) -> str:
    """[2, 2, 2, 1] -> '2x3,1x1' (batch size x number of consecutive model calls)."""
    return ",".join(f"{b}x{len(list(g))}" for b, g in itertools.groupby(sizes))


def sig(value: float, digits: int = 4) -> float:
    """Rounded to `digits` significant digits (tiny-model FLOPs in --small mode would round to 0 otherwise)."""
    return float(f"{value:.{digits}g}")


def flops_per_sample(ctx: BenchContext, model) -> float | None:
    """FLOPs of one batch-1 model call (a 1-step cfg-1 sampling run under FlopCounterMode)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            ctx.sample(model, steps=1, cfg=1.0)
        return float(counter.get_total_flops())
    except Exception as e:  # counting is a report extra; never lose the timing rows over it
        log.warning("cfg_cutoff bench: FLOP count failed (%s); rows carry no FLOP figures", e)
        return None


def run(ctx: BenchContext) -> None:
    from sdxl_optimizer.nodes.cfg_cutoff import apply_cfg_cutoff

    base = ctx.base_model()
    per_sample = flops_per_sample(ctx, base)
    fractions = [float(f) for f in os.environ.get("SDXLOPT_BENCH_CUTOFF_FRACTIONS", "0.5,0.75").split(",") if f]
    variants = [("full CFG", None)] + [(f"cutoff {round(100 * f)}%", f) for f in fractions]
    batches = [int(b) for b in os.environ.get("SDXLOPT_BENCH_CUTOFF_BATCHES", "1,4").split(",") if b]
    for batch in batches:
        config = "eager" if batch == 1 else f"eager, compute-bound (UNet batch {2 * batch} with CFG)"
        runs, traces = {}, {}
        for name, fraction in variants:
            sizes: list[int] = []
            model = batch_trace(base if fraction is None else apply_cfg_cutoff(base, fraction), sizes)

            def once(model=model, sizes=sizes, batch=batch):
                sizes.clear()
                return ctx.sample(model, cfg=ctx.cfg, batch=batch)

            runs[name], traces[name] = once, sizes
        if batch == 1:  # launch-bound and drifting: interleaved rounds (bench/common.py)
            measured = ctx.measure_interleaved(runs)
            config += ", interleaved"
        else:  # compute-bound: stable, one block per variant
            measured = {name: ctx.measure(fn) for name, fn in runs.items()}
        full_forwards = None
        full_s = None
        for name, _ in variants:
            m, sizes = measured[name], traces[name]
            forwards = sum(sizes) / batch  # UNet sample-forwards per image
            full_forwards = full_forwards or forwards
            full_s = full_s or m.seconds
            extra = {
                "batch": batch,
                "config": config,
                "unet_batches": compact(sizes),
                "unet_forwards_per_image": forwards,
                "forwards_saved_pct": round(100 * (1 - forwards / full_forwards), 1),
                "time_saved_pct": round(100 * (1 - m.seconds / full_s), 1),
            }
            if batch > 1:
                extra["s_per_image_in_batch"] = round(m.seconds / batch, 4)
            if per_sample:
                extra["tflop_per_image"] = sig(forwards * per_sample / 1e12)
                extra["tflop_saved_per_image"] = sig((full_forwards - forwards) * per_sample / 1e12)
            ctx.add_row("cfg_cutoff", f"{name}, batch {batch}, cfg {ctx.cfg}", m, **extra)
