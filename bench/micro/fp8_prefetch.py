"""Micro-benchmark (GPU): the fp8 grouped upcast with and without the side-stream prefetch, per forward.

    python -m bench.micro.fp8_prefetch        (from bench/gpu_run.sh's environment: ComfyUI importable)

Full SDXL UNet (random weights), batch-2 1024x1024 eager forwards under inference mode, alternated (25
rounds, medians of wall, host CPU time until return, and GPU span: CUDA events around the forward on the
main stream): stock fp16, the loaders' fp8 model with each block's upcast replayed in turn, and the same
model with the next block's upcast prefetched on a side stream (toggled on one model: `scratch.prefetch`),
plus variants that isolate a cost: the side stream at high priority, and two marked "timing only" that drop
one of the two cross-stream waits (wrong results possible: they show what the waits cost). Also the
prefetch hit count and the outputs' agreement.
"""
from __future__ import annotations

import statistics

import torch


def main() -> None:
    from bench.cases.fp8 import _build, _forward_inputs
    from bench.common import BenchContext, alternated_cuda_times

    ctx = BenchContext(small=False, out_dir=None)
    import comfy.model_management as mm

    from sdxl_optimizer.nodes import fp8 as nfp8
    from sdxl_optimizer.ops import fp8_groups

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    fp8 = _build(ctx, sd, {"custom_operations": nfp8.fp8_operations(torch.float8_e4m3fn, False)})
    nfp8.attach_upcast_groups(fp8)
    mm.load_models_gpu([base, fp8])
    inp = _forward_inputs(ctx)
    scratch = fp8.model.diffusion_model.__dict__[nfp8.GROUPS_ATTR][0].scratch
    assert scratch.prefetch, "expected the loaders' default (prefetch on)"
    spans: dict[str, list] = {}  # per variant: (start, end) CUDA events of each forward, read at the end
    current = ["fp16"]

    def fwd(p):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.inference_mode():
            out = p.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])
        end.record()
        spans.setdefault(current[0], []).append((start, end))
        return out

    class NoFreedWait(fp8_groups.CudaStreams):
        def run_on_side(self, fn, freed, ready):
            with torch.cuda.stream(self.side):
                fn()
            ready.record(self.side)

    class NoMainWait(fp8_groups.CudaStreams):
        def main_after(self, ready):
            pass

    normal = fp8_groups.CudaStreams(torch.device("cuda"))
    high = fp8_groups.CudaStreams(torch.device("cuda"))
    high.side = torch.cuda.Stream(priority=-1)
    no_freed, no_main = NoFreedWait(torch.device("cuda")), NoMainWait(torch.device("cuda"))
    streams = {"fp8 grouped + prefetch": normal, "fp8 prefetch, side high priority": high,
               "fp8 prefetch, no freed wait (timing only)": no_freed,
               "fp8 prefetch, no main wait (timing only)": no_main}

    def mode(name):
        scratch.settle()
        current[0] = name
        scratch.prefetch = name in streams
        if name in streams:
            scratch.streams = streams[name]
            scratch.slots = [fp8_groups._Slot(scratch.streams) for _ in scratch.names]

    mode("fp8 grouped")
    one = fwd(fp8).float()
    mode("fp8 grouped + prefetch")
    fwd(fp8)
    two = fwd(fp8).float()
    torch.cuda.synchronize()
    print(f"prefetch vs in turn: max |diff| = {float((two - one).abs().max()):.3e}; prefetches {scratch.prefetches}, "
          f"hits {scratch.hits}")
    variants = {"fp16": base, "fp8 grouped": fp8, **dict.fromkeys(streams, fp8)}
    spans.clear()
    times = alternated_cuda_times({k: (lambda p=p: fwd(p)) for k, p in variants.items()}, rounds=25, before=mode)
    wall0 = statistics.median(a for a, _ in times["fp16"])
    for k, v in times.items():
        wall = statistics.median(a for a, _ in v)
        print(f"{k:42s} wall {1e3 * wall:7.2f} ms ({wall / wall0:.3f}x fp16), host CPU until return "
              f"{1e3 * statistics.median(b for _, b in v):7.2f} ms, GPU span "
              f"{statistics.median(a.elapsed_time(b) for a, b in spans[k][-25:]):7.2f} ms "
              f"per forward (median of 25, alternated)")
    print(f"prefetches {scratch.prefetches}, hits {scratch.hits}")


if __name__ == "__main__":
    main()
