"""Micro-benchmark (GPU): the fp8 grouped upcast with and without the side-stream prefetch, per forward.

    python -m bench.micro.fp8_prefetch        (from bench/gpu_run.sh's environment: ComfyUI importable)

Full SDXL UNet (random weights), batch-2 1024x1024 eager forwards under inference mode, alternated (25
rounds, medians of wall and host CPU time): stock fp16, the loaders' fp8 model with each block's upcast
replayed in turn, and the same model with the next block's upcast prefetched on a side stream (toggled on
one model: `scratch.prefetch`). Also the prefetch hit count and the outputs' agreement.
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

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    fp8 = _build(ctx, sd, {"custom_operations": nfp8.fp8_operations(torch.float8_e4m3fn, False)})
    nfp8.attach_upcast_groups(fp8)
    mm.load_models_gpu([base, fp8])
    inp = _forward_inputs(ctx)
    scratch = fp8.model.diffusion_model.__dict__[nfp8.GROUPS_ATTR][0].scratch
    assert scratch.prefetch, "expected the loaders' default (prefetch on)"

    def fwd(p):
        with torch.inference_mode():
            return p.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])

    def mode(name):
        scratch.prefetch = name == "fp8 grouped + prefetch"

    mode("fp8 grouped")
    one = fwd(fp8).float()
    mode("fp8 grouped + prefetch")
    fwd(fp8)
    two = fwd(fp8).float()
    torch.cuda.synchronize()
    print(f"prefetch vs in turn: max |diff| = {float((two - one).abs().max()):.3e}; prefetches {scratch.prefetches}, "
          f"hits {scratch.hits}")
    variants = {"fp16": base, "fp8 grouped": fp8, "fp8 grouped + prefetch": fp8}
    times = alternated_cuda_times({k: (lambda p=p: fwd(p)) for k, p in variants.items()}, rounds=25, before=mode)
    wall0 = statistics.median(a for a, _ in times["fp16"])
    for k, v in times.items():
        wall = statistics.median(a for a, _ in v)
        print(f"{k:28s} wall {1e3 * wall:7.2f} ms ({wall / wall0:.3f}x fp16), host CPU until return "
              f"{1e3 * statistics.median(b for _, b in v):7.2f} ms per forward (median of 25, alternated)")
    print(f"prefetches {scratch.prefetches}, hits {scratch.hits}")


if __name__ == "__main__":
    main()
