"""FreeU overhead: the same fp16 SDXL run with and without SDXLOpt FreeU (SDXL preset), eager.

FreeU adds a few elementwise ops and the skip filter on 6 of the 9 output blocks; the target is <= 3%
over the baseline. Rows: baseline, v1 with the default matmul filter, v1 with torch.fft (diffusers' form),
v2 with matmul; each with its overhead against the baseline measured in this case.
"""
from __future__ import annotations

from ..common import BenchContext


def run(ctx: BenchContext) -> None:
    from sdxl_optimizer.nodes.freeu import apply_freeu
    from sdxl_optimizer.ops.freeu import FreeUConfig

    base = ctx.base_model()
    baseline = ctx.measure(lambda: ctx.sample(base))
    ctx.add_row("freeu", f"baseline (no FreeU), cfg {ctx.cfg}", baseline, overhead_pct=0.0)
    for version, method in (("v1", "matmul"), ("v1", "fft"), ("v2", "matmul")):
        model = apply_freeu(base, FreeUConfig.from_preset("SDXL", version), method)
        m = ctx.measure(lambda model=model: ctx.sample(model))
        ctx.add_row("freeu", f"FreeU SDXL preset {version}, {method} filter, cfg {ctx.cfg}", m,
                    overhead_pct=round(100 * (m.seconds / baseline.seconds - 1), 2))
