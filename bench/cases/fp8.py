"""FP8 weight-cast loader (issue 3): fp16 vs ComfyUI core's weight_dtype fp8_e4m3fn vs ours, same run.

Rows (full mode: SDXL with random weights, 1024x1024, Euler, 50 steps, cfg 5, on the GPU):
  fp16                              the stock model (the same weights every other row starts from)
  core fp8_e4m3fn                   core's way: load_diffusion_model_state_dict(model_options={"dtype": fp8}),
                                    what UNETLoader's weight_dtype=fp8_e4m3fn does (every weight fp8, manual cast)
  ours e4m3fn, per-layer upcast     our custom_operations, fused matmul off, no grouped upcast
  ours e4m3fn, loader default       what the SDXLOpt FP8 loaders give: every UNet call that qualifies replayed
                                    as one CUDA graph (nodes/_unet_graph.py) holding one Triton upcast kernel
                                    per block (ops/fp8_groups.py); eager calls use the grouped upcast
  ours e4m3fn, whole-call graph, one copy per weight   the same graph (and the eager groups' graphs) with one
                                    torch copy per weight inside it: the loaders before this release
  ours e4m3fn, eager (grouped ...)  the same model without the whole-call graph: the grouped upcast (one CUDA
                                    graph replay per block holding one Triton upcast kernel, ops/fp8_groups.py,
                                    and joined attention projections): like for like with stock fp16 eager
  fp16 (stock) + our whole-call graph  the stock model with the same whole-call graph: like for like with the
                                    loader default (what the graph alone gives)
  ours e4m3fn, fused Triton matmul  our custom_operations with the fused weight-only fp8 kernel (Ada/Hopper)
  ours e5m2, ...                    the same for float8_e5m2 (fused where available, else per-call upcast)
Columns: s_per_image (median over interleaved rounds after one warm-up run, which also autotunes the fused
kernel; SDXLOPT_BENCH_FP8_ROUNDS sets the rounds), peak_vram_gib (peak allocated during sampling with only
that model loaded: weights + activations), model_held_gib (the peak the allocator held in such a run, CUDA
graph pools included), x_fp16 (s/image over the fp16 row's), x_fp16_per_step and ms_per_step_steady
(steady-state step cost from many short runs alternated with fp16, the GPU synchronized at each step, median
of per-round ratios: less drift than whole-image medians),
model_peak_gib (peak_vram_gib minus residue_gib, what was still allocated before that model loaded),
rel_err (one UNet forward, batch 2 at the benchmark resolution, max|y - y_fp16| / max|y_fp16|),
weights_gib (UNet parameter bytes), path (what ran, and why).

Unattended: a row that fails (a Triton compile error,
out of memory) becomes a FAILED row and the others go on; the fused rows say why when they cannot run.
--small: the tiny UNet on the CPU (fp32 compute; the tiny config is not detectable by ComfyUI's loaders,
so the models are built by hand the same way); the fused rows report "skipped" there.
"""
from __future__ import annotations

import os
import traceback

import torch

from ..common import GIB, BenchContext, rel_err

# SDXLOPT_BENCH_FP8_FUSED=0: the fused Triton rows report their error only (their timing, ~2x fp16 on an
# H100, is in earlier results; leaves room for more rows in one 10-minute device command)
TIME_FUSED = os.environ.get("SDXLOPT_BENCH_FP8_FUSED", "1") != "0"

CASE = "fp8"


def _forward_inputs(ctx: BenchContext, batch: int = 2) -> dict:
    """Seeded UNet inputs at the benchmark resolution: latents, timestep 500, context, SDXL's y."""
    gen = torch.Generator().manual_seed(1234)
    cfg = ctx.unet_config
    x = torch.randn(batch, cfg["in_channels"], ctx.height // 8, ctx.width // 8, generator=gen)
    context = torch.randn(batch, 77, cfg["context_dim"], generator=gen)
    y = torch.randn(batch, cfg["adm_in_channels"], generator=gen)
    t = torch.full((batch,), 500.0)
    return {k: v.to(ctx.device, ctx.dtype) for k, v in {"x": x, "t": t, "context": context, "y": y}.items()}


def _forward(patcher, inp: dict) -> torch.Tensor:
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    with torch.inference_mode():
        out = patcher.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])
    return out.float().cpu()


def _build(ctx: BenchContext, sd: dict, model_options: dict):
    """A MODEL from the fp16 model's UNet state dict through the loaders' path, with `model_options`."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    if not ctx.small:  # what UNETLoader / our UNet loader do after reading the file
        model = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=model_options)
        if model is None:
            raise RuntimeError("ComfyUI did not detect the benchmark state dict as SDXL")
        return model
    # tiny UNet: ComfyUI's detection knows only full-size SDXL; the same steps by hand
    cfg = comfy.supported_models.SDXL(ctx.unet_config)
    unet_dtype = model_options.get("dtype", ctx.dtype)
    cfg.set_inference_dtype(unet_dtype, mm.unet_manual_cast(unet_dtype, ctx.device, cfg.supported_inference_dtypes))
    cfg.custom_operations = model_options.get("custom_operations")
    model = cfg.get_model({})
    model.diffusion_model.load_state_dict(sd)
    return comfy.model_patcher.ModelPatcher(model, load_device=ctx.device, offload_device=mm.unet_offload_device())


def _weights_gib(patcher) -> float:
    return round(sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters()) / GIB, 3)


def _peak_gib(ctx: BenchContext, model) -> tuple[float, float, float]:
    """(peak, residue, held): peak allocated memory of one sampling run with only `model` loaded (weights +
    activations), what stayed allocated before the model was loaded (other models' leftovers: the model's
    own peak is the difference), and the peak the allocator held in that run, cached blocks emptied first
    (counts CUDA graph pools, allocated at capture in the run before and held from then on)."""
    residue = ctx.clean_start()[0]
    if ctx.device.type != "cuda":
        return 0.0, 0.0, 0.0
    ctx.sample(model)
    held = ctx.held_gib(lambda: ctx.sample(model))  # resets the peak statistics before its run
    return torch.cuda.max_memory_allocated() / GIB, residue, held


def run(ctx: BenchContext) -> None:
    """Every timed path (stock fp16 included) runs interleaved in rounds (A B C, A B C, ...; median), because
    eager SDXL on a fast GPU is launch-bound and drifts between minutes by more than the differences measured
    here; each row's peak comes from a separate run with only that model loaded."""
    from sdxl_optimizer.nodes.fp8 import GROUPS_ATTR, attach_forward_graph, attach_upcast_groups, fp8_operations
    from sdxl_optimizer.ops import fp8 as ofp8

    base = ctx.base_model()
    inp = _forward_inputs(ctx)
    ref = _forward(base, inp)
    base_name = f"{str(ctx.dtype).replace('torch.', '')} (stock)"
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}

    variants = [("core weight_dtype fp8_e4m3fn", {"dtype": torch.float8_e4m3fn},
                 "core manual_cast: every weight (norms, biases too) fp8, upcast per call", True)]
    for name in ("float8_e4m3fn", "float8_e5m2"):
        short = name.replace("float8_", "")
        upcast = ofp8.plan(name, ctx.device, fused=False)
        fused = ofp8.plan(name, ctx.device, fused=True)
        timed_upcast = short == "e4m3fn" or not fused.fused  # e5m2: time the faster path only
        variants.append((f"ours {short}, per-layer upcast", {"custom_operations": fp8_operations(
            upcast.storage_dtype, False)}, upcast.describe() + ", no grouped upcast", timed_upcast))
        if short == "e4m3fn":
            variants.append((f"ours {short}, loader default", {"custom_operations": fp8_operations(
                upcast.storage_dtype, False), "grouped": True, "graph": True},
                upcast.describe() + ", each UNet call replayed as one CUDA graph holding one Triton upcast "
                "kernel per block (eager calls: grouped upcast)", True))
            variants.append((f"ours {short}, whole-call graph, one copy per weight", {"custom_operations":
                fp8_operations(upcast.storage_dtype, False), "grouped": True, "graph": True, "copies": True},
                upcast.describe() + ", each UNet call replayed as one CUDA graph, one torch copy per weight "
                "inside it (the loaders before this release)", True))
            compute = ofp8.plan(name, ctx.device, fused=False, compute=True)
            if compute.compute:
                variants.append((f"ours {short}, fp8 compute (loader option)", {"custom_operations": fp8_operations(
                    compute.storage_dtype, False, True), "grouped": True, "graph": True},
                    compute.describe() + ", each UNet call replayed as one CUDA graph (convolutions: grouped "
                    "upcast)", True))
            else:
                ctx.add_row(CASE, f"ours {short}, fp8 compute (loader option)", notes=f"skipped: {compute.reason}")
            variants.append((f"ours {short}, eager (grouped upcast)", {"custom_operations": fp8_operations(
                upcast.storage_dtype, False), "grouped": True},
                upcast.describe() + ", eager: grouped upcast, one CUDA graph replay per block holding one "
                "Triton upcast kernel", True))
        if fused.fused:
            variants.append((f"ours {short}, fused Triton matmul", {"custom_operations": fp8_operations(
                fused.storage_dtype, True), "grouped": True}, fused.describe(), short == "e4m3fn" and TIME_FUSED))
        else:
            ctx.add_row(CASE, f"ours {short}, fused Triton matmul", notes=f"skipped: {fused.reason}")

    models: dict[str, object] = {base_name: base}
    extras: dict[str, dict] = {base_name: {"rel_err": 0.0, "weights_gib": _weights_gib(base),
                                           "path": "stock ComfyUI, " + base_name.split()[0] + " weights"}}
    # like for like with the loader default: the stock model with the same whole-call graph
    graphed16 = f"{base_name.split()[0]} (stock) + our whole-call graph"
    models[graphed16] = base.clone()
    attach_forward_graph(models[graphed16])
    extras[graphed16] = {"rel_err": 0.0, "weights_gib": _weights_gib(base),
                         "path": "stock model, each UNet call replayed as one CUDA graph (nodes/_unet_graph.py)"}
    for name, options, path, timed in variants:
        try:
            options = dict(options)
            grouped = options.pop("grouped", False)
            graph = options.pop("graph", False)
            copies = options.pop("copies", False)
            model = _build(ctx, sd, options)
            if grouped:  # as the loaders do (on the fused rows it groups the convs)
                attach_upcast_groups(model)
            if copies:  # no one-kernel upcast for this model: per-weight copies inside the whole-call graph
                model.model.diffusion_model.__dict__[GROUPS_ATTR][0].scratch.batched = None
            if graph:
                attach_forward_graph(model)
            err = rel_err(_forward(model, inp), ref)
            extras[name] = {"rel_err": round(err, 5), "weights_gib": _weights_gib(model), "path": path}
            if timed:
                models[name] = model
            else:
                ctx.add_row(CASE, name, notes="error only (same kernels as the e4m3fn row)", **extras[name])
                del model
        except Exception as e:  # one broken path must not lose the other rows
            traceback.print_exc()
            ctx.add_row(CASE, name, notes=f"FAILED: {type(e).__name__}: {e}"[:300], path=path)
    peaks: dict[str, tuple[float, float, float]] = {}
    for name, model in list(models.items()):
        try:
            peaks[name] = _peak_gib(ctx, model)
        except Exception as e:
            traceback.print_exc()
            ctx.add_row(CASE, name, notes=f"FAILED: {type(e).__name__}: {e}"[:300], **extras[name])
            del models[name]
    ctx.free_models()
    rounds = int(os.environ.get("SDXLOPT_BENCH_FP8_ROUNDS", "0")) or None
    measured = ctx.measure_interleaved({n: (lambda m=m: ctx.sample(m)) for n, m in models.items()}, rounds=rounds)
    per_step = ctx.step_ratio_interleaved(models, base_name, sync=True)
    base_s = measured[base_name].seconds
    for name, m in measured.items():
        m.peak_gib = peaks[name][0]
        ctx.add_row(CASE, name, m, x_fp16=round(m.seconds / base_s, 3), residue_gib=round(peaks[name][1], 3),
                    model_peak_gib=round(peaks[name][0] - peaks[name][1], 3),
                    model_held_gib=round(peaks[name][2] - peaks[name][1], 3),
                    x_fp16_per_step=round(per_step[name]["ratio"], 3),
                    ms_per_step_steady=round(per_step[name]["step_s"] * 1000, 2),
                    cpu_x_fp16_per_step=round(per_step[name]["cpu_ratio"], 3), **extras[name])
    models.clear()
    ctx.clean_start()
