"""Micro-benchmark (torch only): the fp8 loader's per-layer upcast against grouped upcasts, for the Linear
weights of SDXL's 70 transformer blocks (10 per block), on the GPU.

    python -m bench.micro.fp8_upcast_groups

per_layer: w.to(fp16) for each weight (what the loader does: one allocation + one kernel per layer).
grouped_cat: per block, cat the block's fp8 weights (1 kernel), one .to(fp16), split into views.
foreach_copy: per block, one flat fp16 buffer, views, torch._foreach_copy_(views, fp8 weights).
Prints host (CPU) and wall ms per UNet pass of upcasts; no matmuls, so it isolates the upcast cost.
"""
from __future__ import annotations

import time

import torch


def block_shapes(c: int, ctx: int = 2048) -> list[tuple[int, int]]:
    return [(c, c)] * 4 + [(c, c), (c, ctx), (c, ctx), (c, c)] + [(8 * c, c), (c, 4 * c)]


def main() -> None:
    dev = torch.device("cuda")
    f8 = torch.float8_e4m3fn
    blocks = [[torch.randn(s, device=dev).to(f8) for s in block_shapes(c)] for c in [640] * 10 + [1280] * 60]

    def per_layer():
        for ws in blocks:
            for w in ws:
                w.to(torch.float16)

    def grouped_cat():
        for ws in blocks:
            flat = torch.cat([w.reshape(-1) for w in ws]).to(torch.float16)
            [v.view(w.shape) for v, w in zip(flat.split([w.numel() for w in ws]), ws)]

    sizes = [[w.numel() for w in ws] for ws in blocks]

    def foreach_copy():
        for ws, sz in zip(blocks, sizes):
            flat = torch.empty(sum(sz), dtype=torch.float16, device=dev)
            views = [v.view(w.shape) for v, w in zip(flat.split(sz), ws)]
            torch._foreach_copy_(views, ws)

    for name, fn in (("per_layer", per_layer), ("grouped_cat", grouped_cat), ("foreach_copy", foreach_copy)):
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            reps = 30
            c0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(reps):
                fn()
            c1 = time.thread_time()
            torch.cuda.synchronize()
            w1 = time.perf_counter()
            print(f"{name:13s} host {1e3 * (c1 - c0) / reps:6.2f} ms  wall {1e3 * (w1 - w0) / reps:6.2f} ms per UNet pass")
        except Exception as e:  # a path this torch lacks
            print(f"{name:13s} failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
