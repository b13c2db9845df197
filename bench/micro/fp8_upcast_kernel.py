"""Micro-benchmark (GPU): one SDXL transformer block's fp8 weights upcast into a scratch, per CUDA graph replay.

    python -m bench.micro.fp8_upcast_kernel        (any CUDA machine with torch + Triton; no ComfyUI needed)

The ten Linear weights of one 1280-channel SDXL transformer block (34.4 M weights, float8_e4m3fn) are
upcast to float16 views of one scratch, as ops/fp8_groups.py does, three ways: a CUDA graph of one torch copy
per weight (the fallback), a CUDA graph holding ops/fp8.py's one Triton multi-tensor kernel, and the same
kernel launched eagerly. Printed: GPU time per upcast (CUDA events over 200 replays) and the effective
bandwidth (1 byte read + 2 bytes written per weight), plus host time per replay.
"""
from __future__ import annotations

import time

import torch


def main() -> None:
    from ops import fp8 as ofp8  # run from the repository root: the pack's ops package, torch-only

    dev = torch.device("cuda")
    c, ctx = 1280, 2048
    shapes = [(c, c)] * 4 + [(c, c), (c, ctx), (c, ctx), (c, c), (c * 8, c), (c, c * 4)]
    gen = torch.Generator(device=dev).manual_seed(0)
    weights = [(torch.randn(s, device=dev, generator=gen) * 0.02).to(torch.float8_e4m3fn) for s in shapes]
    numel = sum(w.numel() for w in weights)
    scratch = torch.empty(numel + 64 * len(weights), device=dev, dtype=torch.float16)
    views, off = [], 0
    for w in weights:
        views.append(scratch[off:off + w.numel()].view(w.shape))
        off += (w.numel() + 63) // 64 * 64
    table = torch.tensor(ofp8.upcast_table(list(zip(weights, views))), dtype=torch.int64, device=dev)

    def copies():
        for v, w in zip(views, weights):
            v.copy_(w)

    def kernel():
        ofp8.triton_upcast_many(table, torch.float8_e4m3fn, torch.float16)

    kernel()
    assert all(torch.equal(v, w.to(torch.float16)) for v, w in zip(views, weights)), "kernel result differs"

    def graph_of(fn):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay

    variants = {"graph, torch copies": graph_of(copies), "graph, Triton kernel": graph_of(kernel),
                "eager, Triton kernel": kernel, "eager, torch copies": copies}
    moved = numel * 3
    for name, run in variants.items():
        for _ in range(20):
            run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.thread_time()
        start.record()
        for _ in range(200):
            run()
        end.record()
        host = (time.thread_time() - t0) / 200
        torch.cuda.synchronize()
        gpu = start.elapsed_time(end) / 200 / 1e3
        print(f"{name:22s} {gpu * 1e6:8.1f} us per block upcast ({moved / gpu / 1e12:5.2f} TB/s effective), "
              f"host {host * 1e6:6.1f} us per call")
    print(f"one block: {numel / 1e6:.1f} M weights, {len(weights)} tensors, {table.numel() // 3} table rows")
    # the kernel's launch shape: elements per program (one table row) x warps, each as a graph replay
    print(f"sweep (graph replays; default block {ofp8.UPCAST_BLOCK}, {ofp8.UPCAST_WARPS} warps):")
    for block in (4096, 8192, 16384, 32768, 65536):
        t = torch.tensor(ofp8.upcast_table(list(zip(weights, views)), block=block), dtype=torch.int64, device=dev)
        for warps in (4, 8, 16, 32):
            scratch.fill_(0)
            try:
                fn = graph_of(lambda t=t, b=block, w=warps: ofp8.triton_upcast_many(
                    t, torch.float8_e4m3fn, torch.float16, block=b, num_warps=w))
            except Exception as e:  # a shape Triton refuses: say so, go on
                print(f"  block {block:6d} warps {warps:2d}: failed ({type(e).__name__})")
                continue
            exact = all(torch.equal(v, w.to(torch.float16)) for v, w in zip(views, weights))
            gpu = _gpu_time(fn)
            print(f"  block {block:6d} warps {warps:2d}: {gpu * 1e6:7.1f} us ({moved / gpu / 1e12:5.2f} TB/s), "
                  f"exact {exact}")


def _gpu_time(run, reps: int = 200) -> float:
    for _ in range(20):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


if __name__ == "__main__":
    main()
