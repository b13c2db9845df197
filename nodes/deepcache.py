"""SDXLOpt DeepCache: reuse the UNet's deep features between steps and recompute only the shallow branch.

Attached through ComfyUI's multi-slot wrappers, nothing global: OUTER_SAMPLE gives each sampling run a
fresh clone of the node's DeepCacheState (ops/deepcache.py: schedule, cache, counters), logs one summary
line and resets it in `finally`; DIFFUSION_MODEL decides, outside the UNet forward, whether a call runs
in full or shallow. A full call is ComfyUI's own forward, with one extra output-block patch (first in the
list, so it sees the features before FreeU & co.) that copies the features entering the shallow path's
first output block. A shallow call runs `shallow_unet_forward` below.

No host extension point can run only some of the UNet's blocks, so `shallow_unet_forward` mirrors
ComfyUI's `UNetModel._forward` from comfy/ldm/modules/diffusionmodules/openaimodel.py (ComfyUI 0.3.75,
unchanged in upstream master as read for this pack), restricted to the first input blocks and the last
output blocks. It calls the host's own `forward_timestep_embed`, `apply_control` and `timestep_embedding`
and honours the same patches as the core forward: emb_patch, input_block_patch,
input_block_patch_after_skip, output_block_patch, forward_timestep_embed_patch and patches_replace
(via the blocks), with `block` and `transformer_index` set as the full forward would set them. A UNet-level
patch it does not know makes those calls run in full (one warning per run). tests/test_deepcache.py checks
that a shallow call on the inputs a full call cached reproduces the full forward exactly.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Hashable

import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import SpatialTransformer, SpatialVideoTransformer
from comfy_api.latest import io

from ..ops.deepcache import SCHEDULES, DeepCacheConfig, DeepCacheState, shallow_plan
from . import ADVANCED, CATEGORY
from ._run import per_run_wrapper
from ._unet_graph import (
    ARG_NAMES,
    bind_unet_args,
    graphed_full_call,
    may_graph,
    release_on_detach,
    replay,
    run_weights_key,
)

log = logging.getLogger(__name__)

KEY = "sdxlopt_deepcache"  # wrapper key and transformer_options entry holding the DeepCacheState
WrappersMP = comfy.patcher_extension.WrappersMP

# transformer_options["patches"] keys the shallow path honours: read by UNetModel._forward (mirrored below)
# or inside the blocks it runs through the host's own code
UNET_PATCHES = {"emb_patch", "input_block_patch", "input_block_patch_after_skip", "output_block_patch"}
BLOCK_PATCHES = {"forward_timestep_embed_patch", "attn1_patch", "attn2_patch", "attn1_output_patch",
                 "attn2_output_patch", "middle_patch"}


def unet_of(model) -> torch.nn.Module | None:
    """The model's UNetModel (input_blocks / middle_block / output_blocks), or None for other architectures."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if isinstance(dm, openaimodel.UNetModel) and len(dm.input_blocks) == len(dm.output_blocks) > 0:
        return dm
    return None


def num_skips(unet: torch.nn.Module) -> int:
    """Skip connections of the UNet (one per input block); valid branch ids are 0..num_skips - 1."""
    return len(unet.input_blocks)


_TRANSFORMER_INDEX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def transformer_index_before_output(unet: torch.nn.Module, first_output: int) -> int:
    """`transformer_index` the full forward has reached when output block `first_output` starts (counted once
    per UNet and block: walking the blocks cost ~0.2 ms, a tenth of a shallow step's host time)."""
    per_unet = _TRANSFORMER_INDEX.setdefault(unet, {})
    if first_output not in per_unet:
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks[:first_output]]
        per_unet[first_output] = sum(isinstance(layer, (SpatialTransformer, SpatialVideoTransformer))
                                     for block in blocks if block is not None for layer in block)
    return per_unet[first_output]


# --- the shallow forward: mirrors UNetModel._forward of comfy/ldm/modules/diffusionmodules/openaimodel.py
# (ComfyUI 0.3.75), restricted to input_blocks[:n_input] and output_blocks[first_output:]

def shallow_unet_forward(unet, cached: torch.Tensor, n_input: int, first_output: int, transformer_index: int,
                         x, timesteps=None, context=None, y=None, control=None, transformer_options=None,
                         **kwargs) -> torch.Tensor:
    """UNetModel._forward with `cached` as the features entering output block `first_output`: runs the
    time embedding, input blocks 0..n_input-1 and output blocks first_output.. only."""
    if transformer_options is None:
        transformer_options = {}
    transformer_options["original_shape"] = list(x.shape)
    transformer_options["transformer_index"] = 0
    transformer_patches = transformer_options.get("patches", {})

    num_video_frames = kwargs.get("num_video_frames", unet.default_num_video_frames)
    image_only_indicator = kwargs.get("image_only_indicator", None)
    time_context = kwargs.get("time_context", None)

    assert (y is not None) == (unet.num_classes is not None), \
        "must specify y if and only if the model is class-conditional"
    hs = []
    t_emb = openaimodel.timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype)
    emb = unet.time_embed(t_emb)

    if "emb_patch" in transformer_patches:
        for p in transformer_patches["emb_patch"]:
            emb = p(emb, unet.model_channels, transformer_options)

    if unet.num_classes is not None:
        assert y.shape[0] == x.shape[0]
        emb = emb + unet.label_emb(y)

    h = x
    for id in range(n_input):
        transformer_options["block"] = ("input", id)
        h = openaimodel.forward_timestep_embed(unet.input_blocks[id], h, emb, context, transformer_options,
                                               time_context=time_context, num_video_frames=num_video_frames,
                                               image_only_indicator=image_only_indicator)
        h = openaimodel.apply_control(h, control, "input")
        if "input_block_patch" in transformer_patches:
            for p in transformer_patches["input_block_patch"]:
                h = p(h, transformer_options)
        hs.append(h)
        if "input_block_patch_after_skip" in transformer_patches:
            for p in transformer_patches["input_block_patch_after_skip"]:
                h = p(h, transformer_options)

    # skipped: the deeper input blocks, the middle block and the output blocks before first_output; their
    # control residuals belong to the cached features (dropped here as the full forward would consume them)
    if control is not None and control.get("output"):
        del control["output"][max(len(control["output"]) - first_output, 0):]
    h = cached
    transformer_options["transformer_index"] = transformer_index

    for id in range(first_output, len(unet.output_blocks)):
        transformer_options["block"] = ("output", id)
        hsp = hs.pop()
        hsp = openaimodel.apply_control(hsp, control, "output")

        if "output_block_patch" in transformer_patches:
            for p in transformer_patches["output_block_patch"]:
                h, hsp = p(h, hsp, transformer_options)

        h = torch.cat([h, hsp], dim=1) if hsp is not None else h
        del hsp
        output_shape = hs[-1].shape if len(hs) > 0 else None
        h = openaimodel.forward_timestep_embed(unet.output_blocks[id], h, emb, context, transformer_options,
                                               output_shape, time_context=time_context,
                                               num_video_frames=num_video_frames,
                                               image_only_indicator=image_only_indicator)
    h = h.type(x.dtype)
    if unet.predict_codebook_ids:
        return unet.id_predictor(h)
    return unet.out(h)


# --- the wrappers

CAPTURE_KEY = "deepcache_capture"  # a full call's transformer_options: [output block id, captured features]


def capture_deep_features(h, hsp, transformer_options):
    """Output-block patch of a full call: copies the features entering the block named in
    transformer_options[CAPTURE_KEY], unchanged. A module-level function, so its identity is the same at
    every call (stable for torch.compile guards); the sink is per call."""
    sink = transformer_options.get(CAPTURE_KEY)
    if sink is not None and transformer_options.get("block") == ("output", sink[0]):
        sink[1] = h.clone()  # later patches (FreeU) may edit h in place
    return h, hsp


capture_deep_features.sdxlopt_graph_safe = True  # one copy at a fixed block: a capture holds it exactly


def with_capture_patch(topts: dict, sink: list) -> dict:
    """transformer_options of a full call: the feature copy first among the output-block patches (it sees the
    features before FreeU & co.), and the call's sink."""
    patches = dict(topts.get("patches", {}))
    patches["output_block_patch"] = [capture_deep_features, *patches.get("output_block_patch", [])]
    return {**topts, "patches": patches, CAPTURE_KEY: sink}


def chunk_keys(transformer_options: dict, batch: int) -> list[Hashable]:
    """One key per conditioning chunk of the batch: ComfyUI's cond uuids, or the whole batch as one."""
    uuids = transformer_options.get("uuids")
    if uuids and batch % len(uuids) == 0:
        return list(uuids)
    return [("batch", batch)]


def unknown_unet_patches(transformer_options: dict) -> list[str]:
    return sorted(set(transformer_options.get("patches", {})) - UNET_PATCHES - BLOCK_PATCHES)


COMPILE_KEY = "sdxlopt_compile"  # nodes/compile.py's transformer_options entry (its CompiledPath for the run)
SHALLOW_REGION = "deepcache_shallow"


def _sigma_of(sigmas: torch.Tensor) -> float:
    """The call's sigma on the host: a device sync, only when the run's StepClock cannot tell the step."""
    return float(sigmas.reshape(-1)[0])


# full calls too (not only shallow ones): the whole UNet forward as one graph launch; switched off for the
# bench row that shows what the graphs of the full steps add
FULL_GRAPHS = True
_SHALLOW_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shallow_layers(unet, n_input: int, first_output: int) -> list[torch.nn.Module]:
    """Every module a shallow call runs: time/label embeddings, the first input and last output blocks, out."""
    per_unet = _SHALLOW_LAYERS.setdefault(unet, {})
    if (n_input, first_output) not in per_unet:
        parts = [unet.time_embed, getattr(unet, "label_emb", None), *unet.input_blocks[:n_input],
                 *unet.output_blocks[first_output:], unet.out]
        per_unet[n_input, first_output] = [m for part in parts if part is not None for m in part.modules()]
    return per_unet[n_input, first_output]


def _graphed_shallow(state: DeepCacheState, unet, cached: torch.Tensor, n_input: int, first_output: int,
                     t_index: int, call: dict, extra: dict) -> torch.Tensor | None:
    """A shallow call replayed as a CUDA graph (captured on the first such call per shape and weights, kept
    for later runs of the same node), or None when it does not qualify (nodes/_unet_graph.py: no patches or
    ControlNet, weights resident with nothing for the host to do). Replaces the ~1.8 ms of launches of
    a shallow SDXL call by one graph launch. The replayed call leaves `transformer_options` as the caller
    passed it (the eager path writes its block bookkeeping there; nothing reads it after the UNet call)."""
    if not may_graph(state, "shallow", call, extra):
        return None
    x, topts = call["x"], call["transformer_options"]
    key = run_weights_key(state, ("shallow", id(unet), n_input, first_output),
                          shallow_layers(unet, n_input, first_output), x)
    if key is None:
        return None
    options = {k: v for k, v in topts.items() if k != KEY}  # the state is per run: not held by the graph

    def shallow(x, timesteps, context, y, cached):
        return shallow_unet_forward(unet, cached, n_input, first_output, t_index, x, timesteps, context, y,
                                    None, dict(options))

    out = replay(state, "shallow", shallow, (x, call.get("timesteps"), call.get("context"), call.get("y"), cached),
                 key, log, "SDXLOpt DeepCache", topts)
    if out is None:
        return None
    state.graph_replays += 1
    return out.clone()  # the graph's output buffer is rewritten by the next replay


def _graphed_full(state: DeepCacheState, executor, first_output: int, call: dict,
                  extra: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A full call replayed as a CUDA graph, with the deep features it caches: (output, features), or None when
    it does not qualify: as `_graphed_shallow`, plus DeepCache's is the innermost UNet wrapper (any wrapper
    after it would be frozen) and the device has FREE_MEMORY_MIN free at the first call of the run. The
    graph runs the host's own forward (the executor) with the feature-copying patch; one launch instead of
    ~2,000 on SDXL."""
    if not FULL_GRAPHS:
        return None

    def full(executor, x, timesteps, context, y, options):
        sink = [first_output, None]
        return executor(x, timesteps, context, y, None, with_capture_patch(options, sink)), sink[1]

    outs = graphed_full_call(state, executor, call, extra, KEY, full, log, "SDXLOpt DeepCache")
    if outs is None or outs[1] is None:
        return None
    state.full_graph_replays += 1
    return outs[0].clone(), outs[1].clone()  # the graphs' buffers are rewritten by the next replay


def diffusion_model_wrapper(executor, *args, **kwargs):
    """Per UNet call: shallow when the schedule says so and every chunk has cached features, else full (and
    cache the features)."""
    unet = executor.class_obj
    bound = bind_unet_args(args, kwargs)
    state = bound[0]["transformer_options"].get(KEY) if bound else None
    if not isinstance(state, DeepCacheState) or not state.prepared or not isinstance(unet, openaimodel.UNetModel):
        return executor(*args, **kwargs)
    call, extra = bound
    topts, x = call["transformer_options"], call["x"]
    sigmas = topts.get("sigmas")
    if sigmas is None:
        return executor(*args, **kwargs)
    n_input, first_output = shallow_plan(state.config.branch, num_skips(unet))
    keys = chunk_keys(topts, x.shape[0])

    unknown = unknown_unet_patches(topts)
    if unknown and "unknown_patches" not in state.warned:
        state.warned.add("unknown_patches")
        log.warning("SDXLOpt DeepCache: the model carries UNet patches %s that the shallow path does not know; "
                    "those calls run in full (no speed-up). Fix: remove the node that adds them, or remove "
                    "DeepCache (it cannot run part of the UNet around a patch it does not know).", unknown)
    if not unknown and not state.is_full_call(lambda: _sigma_of(sigmas)):
        cached = state.lookup(keys, x)
        if cached is not None:
            state.count(shallow=True)
            compiled = topts.get(COMPILE_KEY)  # SDXLOpt Compile on the model: the shallow forward is compiled too
            t_index = transformer_index_before_output(unet, first_output)
            if compiled is None:
                out = _graphed_shallow(state, unet, cached.to(x.dtype), n_input, first_output, t_index, call, extra)
                if out is not None:
                    return out
            forward = shallow_unet_forward if compiled is None else compiled.region(SHALLOW_REGION, shallow_unet_forward)
            return forward(unet, cached.to(x.dtype), n_input, first_output, t_index, **call, **extra)

    sink = [first_output, None]
    graphed = None if topts.get(COMPILE_KEY) is not None or unknown else \
        _graphed_full(state, executor, first_output, call, extra)
    if graphed is not None:
        out, sink[1] = graphed
    else:
        call["transformer_options"] = with_capture_patch(topts, sink)
        out = executor(*(call.get(n) for n in ARG_NAMES), **extra)
    if sink[1] is not None:
        state.store(keys, x, sink[1])
        compiled = topts.get(COMPILE_KEY)
        if compiled is not None and not unknown:  # compile the shallow path now, not in the middle of sampling
            compiled.warm(SHALLOW_REGION, shallow_unet_forward, unet, sink[1].to(x.dtype), n_input, first_output,
                          transformer_index_before_output(unet, first_output), **{**call, "transformer_options": topts},
                          **extra)
    state.count(shallow=False)
    return out


def _begin_run(guider, state: DeepCacheState, sigmas) -> None:
    """Plan the run on its sigmas (the window in sigma from start/end percent)."""
    if sigmas is not None and sigmas.numel() > 1:
        ms = guider.model_patcher.get_model_object("model_sampling")
        cfg = state.config
        schedule = state.clock.sigmas if state.clock is not None else sigmas.reshape(-1).tolist()
        state.prepare(schedule, float(ms.percent_to_sigma(cfg.start_percent)),
                      float(ms.percent_to_sigma(cfg.end_percent)))
    else:
        log.warning("SDXLOpt DeepCache: this sampler gave no sigma schedule; every step runs in full.")


# per run: a fresh clone of the node's state planned on this run's sigmas, the step clock, one summary line
outer_sample_wrapper = per_run_wrapper(KEY, DeepCacheState, _begin_run, log)


def apply_deepcache(model, config: DeepCacheConfig):
    """A clone of `model` with DeepCache attached; raises ValueError (model unchanged) on bad input."""
    unet = unet_of(model)
    if unet is None:
        dm = getattr(getattr(model, "model", None), "diffusion_model", None)
        raise ValueError(f"SDXLOpt DeepCache: expected a UNet model (SDXL, SD1.x, SD2.x: input_blocks / "
                         f"middle_block / output_blocks), got {type(model.model).__name__} with a "
                         f"{type(dm).__name__} diffusion model. Fix: use it on an SDXL or SD1.x checkpoint; for "
                         f"DiT models (Flux, SD3, ...) use ComfyUI's EasyCache instead.")
    config.validate(max_branch=num_skips(unet) - 1)
    if KEY in model.model_options.get("transformer_options", {}):
        raise ValueError("SDXLOpt DeepCache: expected a model without DeepCache, got one that already has it. "
                         "Fix: remove one of the two DeepCache nodes (they would nest).")
    m = model.clone()
    if config.interval == 1 or config.start_percent == config.end_percent:  # switched off: attach nothing
        return m
    m.model_options.setdefault("transformer_options", {})[KEY] = DeepCacheState(config)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    release_on_detach(m, KEY)
    return m


class DeepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptDeepCache",
            display_name="SDXLOpt DeepCache",
            category=f"{CATEGORY}/speed",
            description="DeepCache for SDXL / SD1.x UNets: one step in `cache_interval` runs the whole UNet; "
                        "the steps in between reuse its deep features and run only the outer blocks "
                        "(about 2.5x faster at interval 3, branch 0, with some loss of fine detail). "
                        "Stacks with LoRA, FreeU, ControlNet, CFG cutoff and any sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to patch: an SDXL, SD1.x or SD2.x UNet (not a DiT "
                                                 "such as Flux or SD3). The input model is not changed; a "
                                                 "patched clone is returned."),
                io.Int.Input("cache_interval", default=3, min=1, max=50,
                             tooltip="One full UNet step every N steps (DeepCache's cache_interval); the N-1 "
                                     "steps in between reuse the cached deep features. 2 = closest to the "
                                     "uncached image, 3 = the paper's setting, 5+ = fastest and roughest. "
                                     "1 switches DeepCache off."),
                io.Int.Input("cache_branch_id", default=0, min=0, max=11,
                             tooltip="Skip connection where the shallow path re-joins the cached features "
                                     "(DeepCache's cache_branch_id): 0 = only the outermost blocks run on "
                                     "cached steps (fastest), higher = more blocks run (slower, closer to the "
                                     "uncached image). SDXL has 0-8, SD1.x 0-11. To switch DeepCache off use "
                                     "cache_interval 1."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where caching starts, as a fraction of the denoising schedule like "
                                       "ControlNet's start_percent (0.0 = the first step). Steps before it "
                                       "run in full. start_percent = end_percent switches it off."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where caching ends, as a fraction of the denoising schedule (1.0 = the "
                                       "last step). Steps after it run in full, e.g. 0.9 keeps the last "
                                       "detail steps exact. end_percent = start_percent switches it off."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="uniform",
                               tooltip="Which steps run in full. uniform: every cache_interval-th step. "
                                       "non-uniform: the paper's schedule, the same number of full steps "
                                       "packed around nonuniform_center (better detail at the same speed "
                                       "in the paper). cache_interval 1 switches either off."),
                io.Float.Input("nonuniform_center", default=0.3, min=0.0, max=1.0, step=0.01, **ADVANCED,
                               tooltip="non-uniform only: where full steps are densest, as a fraction of the "
                                       "cached steps (0.3 = the paper's center 15 of 50). Ignored by "
                                       "uniform."),
                io.Float.Input("nonuniform_power", default=1.4, min=1.02, max=3.0, step=0.02, **ADVANCED,
                               tooltip="non-uniform only: starting exponent of the quadratic spacing (the "
                                       "paper's pow, 1.4); higher packs full steps tighter around the center. "
                                       "Lowered automatically until the step count fits. Ignored by "
                                       "uniform."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone of the MODEL with DeepCache.")],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, cache_interval: int, cache_branch_id: int, start_percent: float = 0.0,
                end_percent: float = 1.0, schedule: str = "uniform", nonuniform_center: float = 0.3,
                nonuniform_power: float = 1.4) -> io.NodeOutput:
        config = DeepCacheConfig(interval=int(cache_interval), branch=int(cache_branch_id),
                                 start_percent=float(start_percent), end_percent=float(end_percent),
                                 schedule=schedule, center=float(nonuniform_center), power=float(nonuniform_power))
        return io.NodeOutput(apply_deepcache(model, config))


NODES = [DeepCache]
