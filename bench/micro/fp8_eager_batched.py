"""Micro-benchmark (GPU): the eager grouped fp8 upcast with one Triton kernel per block vs one torch copy per
weight, host-bound and GPU-bound.

    python -m bench.micro.fp8_eager_batched        (from bench/gpu_run.sh's environment: ComfyUI importable)

Full SDXL UNet (random weights), eager 1024x1024 forwards under inference mode, alternated (A B C, A B C, ...;
the GPU synchronized around each), median wall time: stock fp16; the loaders' fp8 model with each block's
group graph holding one torch copy per weight (the eager default); the same with the group graph holding the
one-kernel Triton upcast (`batched_eager`, nodes/fp8.py BATCHED_UPCAST). At batch 2 an H100 forward is bound
by the host (kernel launches), at batch 8 by the GPU, as SDXL is on smaller cards: the question is whether the
kernel's lower GPU time (45 vs 127 us per block) shows where the GPU is the bottleneck and costs nothing where
it is not. The two fp8 variants must give the same output (the same matmuls on the same upcast weights).
"""
from __future__ import annotations

import statistics

import torch


def main() -> None:
    from bench.cases.fp8 import _build, _forward_inputs
    from bench.common import BenchContext, alternated_cuda_times

    ctx = BenchContext(small=False, out_dir=None)
    import comfy.model_management as mm

    from sdxl_optimizer.nodes.fp8 import GROUPS_ATTR, attach_upcast_groups, fp8_operations

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    models = {"fp16 (stock)": base}
    for name, batched in (("fp8 grouped, torch copies", False), ("fp8 grouped, one Triton kernel", True)):
        m = _build(ctx, sd, {"custom_operations": fp8_operations(torch.float8_e4m3fn, False)})
        attach_upcast_groups(m)
        m.model.diffusion_model.__dict__[GROUPS_ATTR][0].scratch.batched_eager = batched
        models[name] = m
    mm.load_models_gpu(list(models.values()))
    for batch, rounds in ((2, 20), (8, 10)):
        inp = _forward_inputs(ctx, batch=batch)

        def fwd(p, inp=inp):
            with torch.inference_mode():
                return p.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])

        outs = {n: fwd(m).float() for n, m in models.items()}
        names = list(models)
        same = torch.equal(outs[names[1]], outs[names[2]])
        times = alternated_cuda_times({n: (lambda m=m: fwd(m)) for n, m in models.items()}, rounds=rounds)
        wall = {n: statistics.median(w for w, _ in t) for n, t in times.items()}
        host = {n: statistics.median(c for _, c in t) for n, t in times.items()}
        ref = wall[names[0]]
        print(f"batch {batch} (UNet batch of one CFG step at batch {batch // 2}), median of {rounds}; fp8 outputs "
              f"identical: {same}")
        for n in names:
            print(f"  {n:32s} wall {wall[n] * 1e3:7.2f} ms ({wall[n] / ref:5.3f}x fp16), host {host[n] * 1e3:7.2f} ms")
        del outs


if __name__ == "__main__":
    main()
