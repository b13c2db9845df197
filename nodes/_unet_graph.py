"""A UNet call replayed as one CUDA graph, where nothing in it needs the host: what DeepCache (its full and
shallow calls) and the fp8 loaders (every call) share.

An eager SDXL UNet forward launches ~2,000 kernels from Python and is bound by the host on an H100; captured
once per shape (ops/cuda_graphs.py), the same work is one graph launch and a few input copies. A capture
freezes the Python that ran during it, so a call qualifies only where no Python can differ from one call to
the next: a CUDA device, no ControlNet, no patches but those marked graph-safe (GRAPH_SAFE: this pack's FreeU),
no block replacement or attention override, no extra UNet arguments,
the calling wrapper the innermost one (a wrapper after it would be frozen), and every layer computing on weights that already
sit on the input's device with nothing for the host to do (`computes_plainly`: not offloaded, no low-VRAM
LoRA, no cast; fp8 layers that upcast their own weight count as plain). The per-layer checks run once per
sampling run (the host sets casts and offloading when it loads the model, before sampling); the weights'
addresses are read at every call and are part of the graph's key, so weights replaced at other addresses
(a LoRA merged, hook keyframes) are captured anew while weights updated in place are read as they are.

The callers keep a state object with `graphs` (StaticGraphs), `memo` (dict, per run) and `warned` (set, per
run). A refused capture logs one warning and that kind of call runs eagerly for the rest of the run.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Hashable

import comfy.model_management as model_management
import comfy.patcher_extension
import torch

from ._layers import computes_plainly

ARG_NAMES = ("x", "timesteps", "context", "y", "control", "transformer_options")  # UNetModel.forward's order

# "cuda": graphs where calls qualify; "plain": the same bookkeeping (static buffers, keys) with plain calls,
# also on the CPU (tests); "off": never
GRAPH_MODE = "cuda"
# a graph of a whole forward keeps about one forward's temporaries in its memory pool for as long as its
# owner lives; captured only where the device has this much free memory at the first call of a run
FREE_MEMORY_MIN = 2 * 1024 ** 3
# transformer_options entries whose Python runs inside the forward (ComfyUI 0.3.75 and upstream): block
# replacements and an attention override (e.g. a node that switches attention kernels per step) never
# qualify; patches (transformer_options["patches"]) only where every one says it is graph-safe
FROZEN_BY_CAPTURE = ("patches_replace", "optimized_attention_override")
# attribute of a patch (function or callable object) whose work is the same tensor math at every call, decided
# before sampling (this pack's FreeU and DeepCache's feature copy): a capture holds it exactly
GRAPH_SAFE = "sdxlopt_graph_safe"
_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNSEEN = object()


def bind_unet_args(args: tuple, kwargs: dict) -> tuple[dict, dict] | None:
    """UNetModel.forward's arguments by name, plus the extra ones; None for a call shape we do not know."""
    if len(args) > len(ARG_NAMES):
        return None
    bound = dict(zip(ARG_NAMES, args))
    rest = dict(kwargs)
    for name in ARG_NAMES:
        if name in rest:
            bound[name] = rest.pop(name)
    if not isinstance(bound.get("transformer_options"), dict) or not torch.is_tensor(bound.get("x")):
        return None
    return bound, rest


def full_layers(unet) -> list[torch.nn.Module]:
    """Every module of the UNet (what a full call runs), listed once per UNet."""
    per_unet = _LAYERS.setdefault(unet, {})
    if "full" not in per_unet:
        per_unet["full"] = list(unet.modules())
    return per_unet["full"]


def plain_weights_key(layers, x: torch.Tensor) -> tuple | None:
    """The addresses of the layers' weights when every layer computes plainly on x (the work a CUDA graph can
    hold), else None."""
    if not all(computes_plainly(m, x) for m in layers):
        return None
    return _addresses(layers)


# buffers of this pack's (the fp8 upcast scratch): not part of the key. A graph that captured the grouped
# upcast keeps the scratch it wrote and read alive (ops/cuda_graphs.keep_alive), so it stays right even after
# the model's scratch is replaced; the weights it reads are in the key
OWN_BUFFERS = "_sdxlopt_"


def _addresses(layers) -> tuple:
    """The addresses a graph of these layers reads: parameters and buffers (not this pack's own buffers: see
    OWN_BUFFERS)."""
    return tuple(t.data_ptr() for m in layers
                 for t in (*m._parameters.values(), *(b for n, b in m._buffers.items() if not n.startswith(OWN_BUFFERS)))
                 if t is not None)


def run_weights_key(state, tag: Hashable, layers, x: torch.Tensor) -> tuple | None:
    """plain_weights_key with the per-layer checks done once per run (~2 ms of Python for the whole SDXL
    UNet) and only the addresses read per call."""
    memo_key = (tag, x.device, x.dtype)
    holders = state.memo.get(memo_key, _UNSEEN)
    if holders is _UNSEEN:
        holders = None if plain_weights_key(layers, x) is None else [m for m in layers if m._parameters or m._buffers]
        state.memo[memo_key] = holders
    return None if holders is None else _addresses(holders)


def may_graph(state, kind: str, call: dict, extra: dict, executor=None) -> bool:
    """A call whose work a capture can hold: CUDA (or the "plain" test mode), no ControlNet, no patches but
    graph-safe ones (others' Python would be frozen), no block replacement or attention override, no extra
    UNet arguments, no refused capture of this kind in this run, and, where
    `executor` is given (the call runs the host's forward through it), the innermost UNet wrapper."""
    x, topts = call["x"], call["transformer_options"]
    if GRAPH_MODE == "off" or (GRAPH_MODE == "cuda" and not x.is_cuda):
        return False
    if (extra or call.get("control") is not None or any(topts.get(k) for k in FROZEN_BY_CAPTURE)
            or not graph_safe_patches(topts) or ("graph", kind) in state.warned):
        return False
    if executor is not None and executor.idx + 1 != len(executor.wrappers):
        return False
    state.graphs.use_graphs = GRAPH_MODE == "cuda"
    return True


def graph_safe_patches(topts: dict) -> bool:
    """Every patch in transformer_options["patches"] is marked GRAPH_SAFE (none at all: True)."""
    return all(getattr(p, GRAPH_SAFE, False) for ps in (topts.get("patches") or {}).values() for p in ps)


def roomy(state, x: torch.Tensor) -> bool:
    """Enough free device memory for a whole-forward graph's pool (checked once per run; always in the plain
    test mode)."""
    if not state.graphs.use_graphs:
        return True
    if "free_memory" not in state.memo:
        state.memo["free_memory"] = model_management.get_free_memory(x.device) >= FREE_MEMORY_MIN
    return state.memo["free_memory"]


def patches_key(topts: dict) -> tuple:
    """The call's patches as part of a graph's key: the patch objects themselves (kept alive by the key, so an
    id is never reused), per patch point. Clones of a model share its graphs, and a clone may carry other
    (graph-safe) patches than the model its graph was captured for: another key, another capture."""
    return tuple((name, tuple(ps)) for name, ps in sorted((topts.get("patches") or {}).items()))


def replay(state, kind: str, fn, inputs: tuple, key: Hashable, log: logging.Logger, who: str, topts: dict):
    """state.graphs(fn, inputs, key), or None after logging once when the device or driver refuses a capture
    (this run's calls of that kind then run eagerly; the owner's graphs are dropped and captured again). The
    graph's key adds the call's patches (`topts`) and inference mode to `key` (the caller's: weights)."""
    # buffers made in inference mode take no copies outside it
    key = (kind, key, patches_key(topts), torch.is_inference_mode_enabled())
    try:
        return state.graphs(fn, inputs, key)
    except Exception as e:
        state.warned.add(("graph", kind))
        state.graphs.clear()
        log.warning("%s: could not capture a %s UNet call as a CUDA graph (%s: %s); this run's %s calls run "
                    "eagerly (same result, more host time).", who, kind, type(e).__name__, str(e)[:200], kind)
        return None


def graphed_full_call(state, executor, call: dict, extra: dict, own_key: str, body, log: logging.Logger, who: str):
    """A whole UNet call, run through the host's forward (`executor`), replayed as one CUDA graph: at capture
    body(executor, x, timesteps, context, y, options) runs with the call's transformer_options less `own_key`
    (the caller's per-run state: not held by the graph). Its result (the graph's buffers: clone what is kept),
    or None where the call does not qualify (may_graph with the executor, roomy, plain weights) or the capture
    was refused."""
    x, topts = call["x"], call["transformer_options"]
    if not may_graph(state, "full", call, extra, executor) or not roomy(state, x):
        return None
    unet = executor.class_obj
    key = run_weights_key(state, ("full", id(unet)), full_layers(unet), x)
    if key is None:
        return None
    options = {k: v for k, v in topts.items() if k != own_key}

    def full(x, timesteps, context, y):
        return body(executor, x, timesteps, context, y, options)

    return replay(state, "full", full, (x, call.get("timesteps"), call.get("context"), call.get("y")), key, log,
                  who, topts)


def release_on_detach(model, key: str) -> None:
    """When the host unloads `model` from the device (ModelPatcher.detach with unpatch_all: another model needs
    the memory, or everything is unloaded), drop the graphs of transformer_options[key] with their memory pool,
    which the host's memory manager cannot see; the next run captures again. Not on the detach without
    unpatching that load_models_gpu does at every run to re-register a model that stays loaded (weights stay
    where they are). CallbacksMP.ON_DETACH, the same in ComfyUI 0.3.75 and upstream; clones carry it."""

    def drop_graphs(patcher, unpatch_all=True, *args, **kwargs) -> None:
        if not unpatch_all:
            return
        state = patcher.model_options.get("transformer_options", {}).get(key)
        graphs = getattr(state, "graphs", None)
        if graphs is not None:
            graphs.clear()

    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, key, drop_graphs)
