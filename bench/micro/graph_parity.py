"""GPU check (not a timing): the CUDA-graph paths give the eager result, on the full SDXL architecture.

    python -m bench.micro.graph_parity        (from bench/gpu_run.sh's environment: ComfyUI importable)

CI has no GPU, so the tests run the graph paths' bookkeeping with plain calls; this script runs the real
captures and replays. Random-weight fp16 SDXL at 512x512, Euler, 8 steps, cfg 5, through ComfyUI's KSampler
under inference mode; each stack sampled with the graph paths on ("cuda") and off (eager), same seed; prints
max |graph - eager| / max |eager| of the final latent and how many calls replayed. Stacks: DeepCache interval 3
(full and shallow graphs); DeepCache + CFG cutoff at 50% (the batch drops from 2 to 1 mid-run: new captures);
DeepCache with a LoRA-like weight patch (new weight addresses: new captures); the same DeepCache node after the
host unloaded every model (graphs dropped, captured again); the fp8 loaders' model (whole-call graph) alone,
with a CFG cutoff, and under DeepCache; DeepCache and the fp8 model with SDXLOpt FreeU (a graph-safe patch).
The fp8 rows also say how many upcast groups put their one-kernel Triton upcast into a whole-call graph.
Exit status 1 if any differs by more than 1e-3.
"""
from __future__ import annotations

import logging
import re
import sys

import torch

TOL = 1e-3


def main() -> int:
    from bench.cases.fp8 import _build
    from bench.common import BenchContext

    ctx = BenchContext(small=False, out_dir=None)
    ctx.width = ctx.height = 512
    ctx.steps = 8
    import comfy.model_management as mm

    from sdxl_optimizer.nodes import _unet_graph as ug
    from sdxl_optimizer.nodes import cfg_cutoff as ncut
    from sdxl_optimizer.nodes import deepcache as dcn
    from sdxl_optimizer.nodes import fp8 as nfp8
    from sdxl_optimizer.nodes import freeu as nfreeu
    from sdxl_optimizer.ops import fp8 as ofp8
    from sdxl_optimizer.ops.deepcache import DeepCacheConfig

    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    for lg in (dcn.log, nfp8.log):
        lg.setLevel(logging.INFO)
        lg.addHandler(Grab())

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    fp8 = _build(ctx, sd, {"custom_operations": nfp8.fp8_operations(torch.float8_e4m3fn, False)})
    nfp8.attach_upcast_groups(fp8)
    nfp8.attach_forward_graph(fp8)
    # the loaders' fp8 compute option (Linear on fp8 tensor cores), where this device passes the probe
    compute = None
    if ofp8.plan("float8_e4m3fn", ctx.device, fused=False, compute=True).compute:
        compute = _build(ctx, sd, {"custom_operations": nfp8.fp8_operations(torch.float8_e4m3fn, False, True)})
        nfp8.attach_upcast_groups(compute)
        nfp8.attach_forward_graph(compute)

    def dc(model, **kw):
        return dcn.apply_deepcache(model, DeepCacheConfig(interval=3, **kw))

    lora = base.clone()
    gen = torch.Generator().manual_seed(3)
    keys = [k for k in lora.get_key_patches() if "transformer_blocks.0.attn1.to_q.weight" in k][:4]
    msd = lora.model.state_dict()
    lora.add_patches({k: (torch.randn(msd[k].shape, generator=gen) * 0.01,) for k in keys}, 1.0)
    dc_base = dc(base)
    freeu_cfg = nfreeu.resolve_config("SDXL", "v1", 1.3, 1.4, 0.9, 0.2)
    stacks = {
        "DeepCache i3": lambda: dc_base,
        "DeepCache i3 + CFG cutoff 50%": lambda: dc(ncut.apply_cfg_cutoff(base, 0.5)),
        "DeepCache i3 + weight patch (LoRA-like)": lambda: dc(lora),
        "DeepCache i3 after unloading every model": lambda: (mm.unload_all_models(), dc_base)[1],
        "fp8 loader model": lambda: fp8,
        "fp8 loader model + CFG cutoff 50%": lambda: ncut.apply_cfg_cutoff(fp8, 0.5),
        "fp8 loader model + DeepCache i3": lambda: dc(fp8),
        "DeepCache i3 + SDXLOpt FreeU (graph-safe patch)": lambda: dc(nfreeu.apply_freeu(base, freeu_cfg)),
        "fp8 loader model + SDXLOpt FreeU": lambda: nfreeu.apply_freeu(fp8, freeu_cfg),
    }
    if compute is not None:
        stacks["fp8 compute model"] = lambda: compute
        stacks["fp8 compute model + CFG cutoff 50% + DeepCache i3"] = lambda: dc(ncut.apply_cfg_cutoff(compute, 0.5))
    else:
        print("fp8 compute: unavailable on this device (no stacks)")
    failed = 0
    for name, make in stacks.items():
        model = make()
        ug.GRAPH_MODE = "off"
        ref = ctx.sample(model).float()
        ug.GRAPH_MODE = "cuda"
        del lines[:]
        out = ctx.sample(model).float()
        again = ctx.sample(model).float()
        err = max(float((o - ref).abs().max() / ref.abs().max()) for o in (out, again))
        replays = [m.group(0) for s in lines for m in [re.search(r"\d+ of them replayed.*|\d+/\d+ UNet calls replayed.*", s)] if m]
        ok = err <= TOL and torch.isfinite(out).all()
        failed += not ok
        groups = fp8.model.diffusion_model.__dict__[nfp8.GROUPS_ATTR]
        kernels = f"; fp8 groups with their Triton upcast in a whole-call graph so far: " \
                  f"{sum(g.captured_into > 0 for g in groups)} of {len(groups)}" if "fp8 loader" in name else ""
        print(f"{'PASS' if ok else 'FAIL'} {name}: max |graph - eager| / max |eager| = {err:.2e}; {replays[:2]}"
              f"{kernels}", flush=True)
    print(f"{len(stacks) - failed} of {len(stacks)} stacks equal eager within {TOL}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
