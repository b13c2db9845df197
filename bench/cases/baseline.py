"""Baseline: stock ComfyUI fp16 SDXL, Euler, 50 steps, cfg 5 (the row every other case is compared to)."""
from __future__ import annotations

from ..common import BenchContext


def run(ctx: BenchContext) -> None:
    model = ctx.base_model()
    m = ctx.measure(lambda: ctx.sample(model))
    ctx.add_row("baseline", f"comfyui {str(ctx.dtype).replace('torch.', '')} cfg {ctx.cfg}", m)
    m1 = ctx.measure(lambda: ctx.sample(model, cfg=1.0))
    ctx.add_row("baseline", f"comfyui {str(ctx.dtype).replace('torch.', '')} cfg 1 (no uncond)", m1)
