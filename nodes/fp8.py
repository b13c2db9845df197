"""SDXLOpt FP8 loaders: a full SDXL checkpoint (MODEL, CLIP, VAE) or a UNet-only file, with the UNet's
Linear/Conv2d weights stored in float8 (half the VRAM of fp16) and upcast per layer at compute time.

The fp8 math is in ops/fp8.py. Here it meets ComfyUI through one extension point: the stock loaders'
model_options["custom_operations"], a comfy.ops.manual_cast subclass whose Linear/Conv2d keep fp8 weights
(the shape of city96/ComfyUI-GGUF's ops). Everything else is the host's own code: weights reach the layers
through load_state_dict; offloading, LoRA weight patches (ModelPatcher.patch_weight_to_device, which
re-rounds patched fp8 weights with comfy.float.stochastic_rounding) and low-VRAM weight functions
(applied to the upcast weight in comfy.ops.cast_bias_weight) all see plain fp8 Parameters.
"""
from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.sd
import folder_paths
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..ops import fp8 as fp8ops
from ..ops import fp8_groups
from ..ops.compiling import is_compiling
from ..ops.cuda_graphs import GraphRunState
from . import CATEGORY
from ._layers import host_free
from ._run import per_run_wrapper
from ._unet_graph import bind_unet_args, graphed_full_call, release_on_detach

log = logging.getLogger(__name__)

GIB = 1024**3
WrappersMP = comfy.patcher_extension.WrappersMP
SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")

# key sets that identify what a file holds (ComfyUI/LDM layout of SD-family UNets, diffusers layout)
UNET_KEYS = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")
DIFFUSERS_UNET_KEYS = ("conv_in.weight", "time_embedding.linear_1.weight", "conv_out.weight")
CHECKPOINT_PREFIX = "model.diffusion_model."
PREQUANTIZED_SUFFIXES = ("scaled_fp8", ".scale_weight", ".weight_scale", ".comfy_quant", ".input_scale")
LORA_MARKERS = ("lora_up", "lora_down", "lora_A.", "lora_B.", ".hada_", ".lokr_", "lora_unet_")


# ---------------------------------------------------------------------------------------------------------
# custom_operations: the stock loaders build the UNet with these classes
# ---------------------------------------------------------------------------------------------------------

def _direct_params(layer, device: torch.device, dtype: torch.dtype | None = None) -> tuple | None:
    """(weight, bias) when the layer can compute without comfy.ops' cast helper: both (where present) on
    `device`, also in `dtype` when one is given, and nothing for the host to apply; else None.
    Reads the parameter dict once: this runs for every layer of every step of an eager, launch-bound UNet."""
    params = layer._parameters
    w, b = params.get("weight"), params.get("bias")
    for t in (w, b):
        if t is not None and (t.device != device or (dtype is not None and t.dtype != dtype)):
            return None
    return (w, b) if host_free(layer) else None


class Fp8Layer(fp8ops.Fp8WeightStorage):
    """ComfyUI side of an fp8-stored layer: `fp8_fused` is fixed per ops class (never per step).

    forward() computes directly when the weights sit on the input's device and the host has nothing to do to
    them (the common case: a fully loaded model): one upcast and the op, without comfy.ops' cast helper,
    whose per-call Python work is what made an eager fp8 SDXL step CPU-bound. Anything else (offloaded
    layers, LoRA weight functions) goes through the host's forward and forward_comfy_cast_weights."""

    fp8_fused = False
    fp8_compute = False  # Linear: fp8 tensor-core matmul (ops/fp8.py scaled_linear) where the call allows
    _fp8_slot: tuple | None = None  # (UpcastGroup, index) when the layer's block upcasts its weights at once

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        fp8_groups.bump_epoch()  # weights, weight functions, devices: grouped upcasts re-check who takes part

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        fp8_groups.bump_epoch()
        return out

    def sdxlopt_direct(self, x: torch.Tensor) -> bool:
        """For CUDA-graph paths (nodes/_layers.computes_plainly): this layer computes on x without the host (its
        fp8 weight, upcast in forward, is as plain as an fp16 one)."""
        return _direct_params(self, x.device) is not None

    def fp8_direct(self, input: torch.Tensor, slot: tuple | None = None) -> tuple | None:
        """(upcast weight, bias in the input's dtype) for a direct forward, or None (take the host's path).
        `slot`: the layer's (group, index), looked up by the caller outside torch.compile."""
        w = None if slot is None else slot[0].view(slot[1], input)  # the block's graph already upcast it
        if w is None:
            wb = _direct_params(self, input.device)  # upcast to the input's dtype unless the layer reads fp8
            if wb is None or wb[0] is None:
                return None
            w = wb[0] if self.fp8_fused or self.fp8_compute else wb[0].to(input.dtype)
        b = self._parameters.get("bias")
        return w, b if b is None or b.dtype == input.dtype else b.to(input.dtype)


class Fp8Linear(Fp8Layer, comfy.ops.manual_cast.Linear):
    def forward(self, input, *args, **kwargs):
        slot = None if args or kwargs or is_compiling() else self.__dict__.get("_fp8_slot")
        if slot is not None:  # a projection sharing its input: the chain's lead ran one matmul for all
            group, index = slot
            out = group.shared(index, input)
            if out is not None:
                comfy.ops.run_every_op()
                return out
            joined = group.joined_view(index, input)
            if joined is not None:
                comfy.ops.run_every_op()
                return group.share(index, input, F.linear(input, joined))
        wb = None if args or kwargs else self.fp8_direct(input, slot)
        if wb is None:
            return super().forward(input, *args, **kwargs)
        comfy.ops.run_every_op()
        if self.fp8_compute:  # weight still fp8: fp8 tensor cores where the shapes allow, else the upcast
            if fp8ops.scaled_applicable(input, wb[0]):
                return fp8ops.scaled_linear(input, wb[0], wb[1], self._buffers.get("fp8_scale"))
            return fp8ops.linear(input, wb[0], wb[1])
        if self.fp8_fused:  # weight still fp8: the fused kernel where it applies, else the upcast
            return fp8ops.linear(input, wb[0], wb[1], fused=True)
        return F.linear(input, wb[0], wb[1])

    def forward_comfy_cast_weights(self, input, *args, **kwargs):
        if self.fp8_fused and fp8ops.fused_applicable(input, self.weight) and host_free(self):
            # offloaded: the host brings the fp8 weight to the input's device (offload streams), no upcast
            weight, bias, stream = comfy.ops.cast_bias_weight(self, input, dtype=self.weight.dtype,
                                                              bias_dtype=input.dtype, offloadable=True)
            out = fp8ops.fused_linear(input, weight, bias)
            comfy.ops.uncast_bias_weight(self, weight, bias, stream)
            return out
        # weight functions need the upcast weight (a LoRA applied exactly in the compute dtype): the host's path
        return super().forward_comfy_cast_weights(input, *args, **kwargs)


class Fp8Conv2d(Fp8Layer, comfy.ops.manual_cast.Conv2d):  # fp8_fused is always False (no fused conv kernel)
    def forward(self, input, *args, **kwargs):
        wb = None if args or kwargs else self.fp8_direct(input, None if is_compiling() else
                                                         self.__dict__.get("_fp8_slot"))
        if wb is None:  # offloaded or patched at compute time: manual_cast upcasts in comfy.ops.cast_bias_weight
            return super().forward(input, *args, **kwargs)
        comfy.ops.run_every_op()
        return self._conv_forward(input, wb[0], wb[1])


class DirectNorm:
    """Norm layers of the fp8 model (kept in the compute dtype): when weight and bias already have the input's
    device and dtype and the host has nothing to do to them, the torch op runs directly, as it does in a stock
    fp16 model; otherwise manual_cast's forward (offloaded layers, a compute dtype the weights are not in)."""

    def sdxlopt_direct(self, x: torch.Tensor) -> bool:
        return _direct_params(self, x.device, x.dtype) is not None

    def forward(self, input, *args, **kwargs):
        wb = None if args or kwargs else _direct_params(self, input.device, input.dtype)
        if wb is None:
            return super().forward(input, *args, **kwargs)
        comfy.ops.run_every_op()
        return self.norm(input, *wb)


class Fp8GroupNorm(DirectNorm, comfy.ops.manual_cast.GroupNorm):
    def norm(self, input, weight, bias):
        return F.group_norm(input, self.num_groups, weight, bias, self.eps)


class Fp8LayerNorm(DirectNorm, comfy.ops.manual_cast.LayerNorm):
    def norm(self, input, weight, bias):
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)


def _group_member(m) -> bool:  # fused and fp8-compute layers read their fp8 weight directly
    return isinstance(m, Fp8Layer) and not m.fp8_fused and not m.fp8_compute


def _group_eligible(layer, device: torch.device) -> bool:
    """A member takes part in its block's grouped upcast when it would compute directly on `device` (weight
    and bias there, nothing for the host to apply) with an fp8 weight; else it takes its own path."""
    wb = _direct_params(layer, device)
    return wb is not None and wb[0] is not None and fp8ops.is_fp8(wb[0].dtype)


GROUPS_ATTR = "_sdxlopt_fp8_upcast_groups"


# the one-kernel Triton upcast per group (45 vs 127 us per SDXL block on an H100) is made wherever it passes
# its self-test and used inside whole-call graph captures; BATCHED_UPCAST: also in each group's own graph on
# eager calls, for models attached from here on (SDXLOPT_FP8_BATCHED=0: one torch copy per weight there). On:
# eager forwards where the GPU is the bottleneck went from 1.03x to 0.99x stock fp16 (an H100 at batch 8),
# and host-bound ones were no slower (1.08 vs 1.09x, 1.069 vs 1.069x at batch 2;
# bench/results/micro_fp8_eager_batched_h100.txt). (An earlier kernel, 61 us per block, measured 1.109x vs
# 1.068x per sampler step on a host-bound lease: bench/results/gpu_fp8_kernel_h100_b.md.)
BATCHED_UPCAST = os.environ.get("SDXLOPT_FP8_BATCHED", "1") != "0"
# attention projections of one input as one matmul (see _projection_chains); SDXLOPT_FP8_JOIN=0 switches it
# off for models loaded from then on (a diagnostic switch: same results, more host time)
JOIN_PROJECTIONS = os.environ.get("SDXLOPT_FP8_JOIN", "1") != "0"


def batched_upcast(pairs):
    """The grouped upcast's one-kernel path (ops/fp8.py triton_upcast_many) for (fp8 weight, view) pairs on
    a CUDA device where that kernel passed its self-test; None elsewhere (one copy per weight)."""
    if not pairs:
        return None
    src_dtype, dst = pairs[0][0].dtype, pairs[0][1]
    if dst.device.type != "cuda" or any(s.dtype != src_dtype or d.dtype != dst.dtype for s, d in pairs):
        return None
    if not fp8ops.upcast_available(dst.device, src_dtype, dst.dtype):
        return None
    table = torch.tensor(fp8ops.upcast_table(pairs), dtype=torch.int64, device=dst.device)
    return lambda: fp8ops.triton_upcast_many(table, src_dtype, dst.dtype)


def _projection_chains(block, layers) -> list[tuple[int, ...]]:
    """Member indices of the attention projections in `block` that read one input: to_q/to_k/to_v of a
    self-attention (all three the same width, as SDXL's attn1), to_k/to_v of a cross-attention; only
    bias-free fp8 Linear members (ComfyUI's CrossAttention: to_q(x), to_k(context or x), to_v(value or
    context or x), one call each)."""
    index = {id(m): i for i, m in enumerate(layers)}
    chains = []
    for attn in block.modules():
        proj = [getattr(attn, n, None) for n in ("to_q", "to_k", "to_v")]
        if not all(isinstance(p, Fp8Linear) and id(p) in index and p.bias is None for p in proj):
            continue
        q, k, v = proj
        if k.weight.shape[1] != v.weight.shape[1]:
            continue
        chain = (q, k, v) if q.weight.shape[1] == k.weight.shape[1] else (k, v)
        chains.append(tuple(index[id(p)] for p in chain))
    return chains


def attach_upcast_groups(model) -> int:
    """Group the fp8 layers of a freshly loaded MODEL's UNet per block (ops/fp8_groups.py): each block's
    eager CUDA forward upcasts its layers' weights with one CUDA graph launch. Returns the number of groups
    (0 when already attached or nothing to group). Only for models this pack's loaders just built."""
    dm = model.model.diffusion_model
    if dm.__dict__.get(GROUPS_ATTR) is not None:
        return 0
    planned = fp8_groups.plan_groups(dm, _group_member)
    if not planned:
        return 0

    def on_disable(why: str) -> None:
        log.warning("SDXLOpt FP8: grouped upcast switched off for this model: %s. Each layer upcasts its own "
                    "weight (same result, more host time per step).", why)

    groups = []
    scratch = fp8_groups.UpcastScratch(dm, 0, on_disable, batched=batched_upcast, batched_eager=BATCHED_UPCAST)
    for block, layers in planned:
        chains = _projection_chains(block, layers) if JOIN_PROJECTIONS else []
        g = fp8_groups.UpcastGroup(layers, scratch, _group_eligible, chains)
        for i, m in enumerate(layers):
            m.__dict__["_fp8_slot"] = (g, i)  # plain dict write: no nn.Module bookkeeping, no epoch bump
        groups.append(g)
    scratch.capacity = max(g.numel for g in groups)
    dm.register_forward_pre_hook(scratch.begin)
    dm.register_forward_hook(scratch.end, always_call=True)
    dm.__dict__[GROUPS_ATTR] = groups
    return len(groups)


GRAPH_KEY = "sdxlopt_fp8_graph"  # wrapper key and transformer_options entry holding the GraphRunState
# every qualifying UNet call of a model from these loaders replayed as one CUDA graph (nodes/_unet_graph.py);
# SDXLOPT_FP8_GRAPH=0 keeps them eager (the bench's like-for-like rows)
FORWARD_GRAPH = os.environ.get("SDXLOPT_FP8_GRAPH", "1") != "0"


def forward_graph_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the call replayed from the model's graphs where it qualifies (innermost wrapper,
    no patches or ControlNet, every layer resident with nothing for the host to do, CUDA, free memory), else
    the host's forward. The graph runs the host's own forward (the executor), captured once per shape."""
    bound = bind_unet_args(args, kwargs)
    state = bound[0]["transformer_options"].get(GRAPH_KEY) if bound else None
    if not isinstance(state, GraphRunState) or not FORWARD_GRAPH:
        return executor(*args, **kwargs)
    call, extra = bound
    state.calls += 1

    def full(executor, x, timesteps, context, y, options):
        return executor(x, timesteps, context, y, None, dict(options))

    out = graphed_full_call(state, executor, call, extra, GRAPH_KEY, full, log, "SDXLOpt FP8")
    if out is None:
        return executor(*args, **kwargs)
    state.replays += 1
    return out.clone()  # the graph's output buffer is rewritten by the next replay


def _log_graph_run(state: GraphRunState) -> None:
    if state.replays or state.warned:
        log.info("SDXLOpt FP8: %s", state.summary())


graph_outer_sample_wrapper = per_run_wrapper(GRAPH_KEY, GraphRunState, lambda guider, state, sigmas: None, log,
                                             end=_log_graph_run, clock=False)


def attach_forward_graph(model) -> None:
    """Give a freshly loaded MODEL the whole-call CUDA graph path (per-run state, graphs shared by its runs and
    clones). Only for models this pack's loaders just built."""
    model.model_options.setdefault("transformer_options", {})[GRAPH_KEY] = GraphRunState()
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, GRAPH_KEY, graph_outer_sample_wrapper)
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, GRAPH_KEY, forward_graph_wrapper)
    release_on_detach(model, GRAPH_KEY)


def _groups_text(model) -> str:
    """What the load line says about grouped upcasts (nothing where they cannot run: not CUDA, fused only)."""
    groups = model.model.diffusion_model.__dict__.get(GROUPS_ATTR)
    device = comfy.model_management.get_torch_device()
    if not groups or device.type != "cuda":
        return ""
    scratch = groups[0].scratch
    if fp8ops.upcast_available(device, groups[0].layers[0].weight.dtype, torch.float16):
        in_graphs = "one Triton upcast kernel per block"
        eager = in_graphs if scratch.batched_eager else "one copy per weight"
    else:
        in_graphs = eager = "one copy per weight (the Triton upcast kernel cannot run here)"
    return (f"; other upcasts grouped ({len(groups)} blocks, {scratch.capacity * 2 / 1e6:.0f} MB scratch): eager "
            f"calls replay one CUDA graph per block holding {eager}, whole-call graphs hold {in_graphs}")


_OPS_CACHE: dict[tuple[torch.dtype, bool, bool], type] = {}


def fp8_operations(storage_dtype: torch.dtype, fused: bool = False, compute: bool = False) -> type:
    """The custom_operations class for model_options: Linear/Conv2d stored in `storage_dtype`, the rest
    (norms, embeddings) as comfy.ops.manual_cast builds them, in the compute dtype. `compute`: Linear layers
    multiply on fp8 tensor cores (takes precedence over `fused`)."""
    fused = bool(fused) and not compute
    key = (storage_dtype, fused, bool(compute))
    if key not in _OPS_CACHE:
        attrs = {"fp8_storage_dtype": storage_dtype, "fp8_fused": fused, "fp8_compute": bool(compute),
                 "__module__": __name__}
        suffix = fp8ops.dtype_name(storage_dtype) + ("_fused" if fused else "") + ("_compute" if compute else "")
        _OPS_CACHE[key] = type(f"SDXLOptFp8Ops_{suffix}", (comfy.ops.manual_cast,), {
            **attrs,
            "Linear": type("Linear", (Fp8Linear,), dict(attrs)),
            # no fused or fp8-compute conv kernel: convolutions upcast
            "Conv2d": type("Conv2d", (Fp8Conv2d,), {**attrs, "fp8_fused": False, "fp8_compute": False}),
            "GroupNorm": Fp8GroupNorm,
            "LayerNorm": Fp8LayerNorm,
        })
    return _OPS_CACHE[key]


def is_fp8_model(model) -> bool:
    """True if the MODEL's diffusion model was built with these operations."""
    inner = getattr(getattr(model, "model", model), "diffusion_model", None)
    return inner is not None and any(isinstance(m, Fp8Layer) for m in inner.modules())


# ---------------------------------------------------------------------------------------------------------
# files: find, inspect (header only), load through the stock loaders
# ---------------------------------------------------------------------------------------------------------

def resolve_file(folder: str, name: str) -> str:
    """Full path of `name` in ComfyUI's model folder `folder`, or a FileNotFoundError that says where we looked."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        places = ", ".join(folder_paths.get_folder_paths(folder)) or "(no folder configured)"
        raise FileNotFoundError(
            f"SDXLOpt FP8 loader: expected the file {name!r} in ComfyUI's '{folder}' model folder ({places}), "
            "found no such file (missing, or a link that points nowhere). Fix: put the file there and refresh "
            "the node list (press R in the UI), or pick another file.")
    return path


def file_keys(path: str) -> list[str] | None:
    """Tensor names from a safetensors header (no tensor is read); None for other formats (.ckpt, .pt)."""
    if not path.lower().endswith(SAFETENSORS_EXTENSIONS):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(
            f"SDXLOpt FP8 loader: expected {os.path.basename(path)} to be a safetensors model file, but its header "
            f"could not be read ({type(e).__name__}: {e}). Fix: re-download or re-save the file.") from e


def classify(keys: list[str]) -> str:
    """What a state dict's key names say it holds: checkpoint, unet, unet_diffusers, prequantized, lora,
    vae, other_diffusion (a checkpoint of another family) or unknown."""
    ks = set(keys)
    if any(k.endswith(PREQUANTIZED_SUFFIXES) for k in ks):
        return "prequantized"
    if all(CHECKPOINT_PREFIX + k in ks for k in UNET_KEYS):
        return "checkpoint"
    if all(k in ks for k in UNET_KEYS):
        return "unet"
    if all(k in ks for k in DIFFUSERS_UNET_KEYS) and any(k.startswith("down_blocks.") for k in ks):
        return "unet_diffusers"
    if any(m in k for k in ks for m in LORA_MARKERS):
        return "lora"
    if any(k.startswith(CHECKPOINT_PREFIX) for k in ks):
        return "other_diffusion"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.", "taesd_")) for k in ks):
        return "vae"
    return "unknown"


KIND_TEXT = {
    "unet": "a UNet-only file (no CLIP or VAE inside)",
    "unet_diffusers": "a UNet-only file in diffusers layout (no CLIP or VAE inside)",
    "prequantized": "a model already quantized with per-tensor scales (scaled fp8 / comfy_quant)",
    "lora": "a LoRA, not a model",
    "vae": "a VAE, not a diffusion model",
    "other_diffusion": "a checkpoint whose diffusion model is not an SD-family UNet (no input_blocks/out keys)",
    "unknown": "no SD-family UNet keys at all",
}
KIND_FIX = {
    "unet": "load it with 'SDXLOpt Load Diffusion Model (FP8)' and add CLIP and VAE loaders",
    "unet_diffusers": "load it with 'SDXLOpt Load Diffusion Model (FP8)' and add CLIP and VAE loaders",
    "prequantized": "load it with the stock loaders, which keep its fp8 weights and scales",
    "lora": "load the model with this node and apply the LoRA after it with a Load LoRA node",
    "vae": "load it with Load VAE",
    "other_diffusion": "this loader handles SDXL / SD1.x / SD2.x UNets only; use the stock loaders for this model",
    "unknown": "pick an SDXL / SD1.x / SD2.x checkpoint or UNet file",
}


def check_kind(path: str, name: str, accept: tuple[str, ...]) -> None:
    """Raise a ValueError (what was expected, what arrived, the fix) unless the header says one of `accept`."""
    keys = file_keys(path)
    if keys is None:  # pickled formats: checked after loading (is_fp8_model / UNet class)
        return
    kind = classify(keys)
    if kind in accept:
        return
    expected = "a full SDXL / SD-family checkpoint (UNet + CLIP + VAE)" if accept == ("checkpoint",) else \
        "an SDXL / SD-family UNet (a UNet-only file or a full checkpoint)"
    raise ValueError(f"SDXLOpt FP8 loader: expected {expected}, got {name!r}, which is {KIND_TEXT[kind]}. "
                     f"Fix: {KIND_FIX[kind]}.")


def _check_loaded(model, name: str) -> None:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(inner, UNetModel) or not is_fp8_model(model):
        got = type(getattr(model, "model", model)).__name__
        raise ValueError(f"SDXLOpt FP8 loader: expected an SDXL / SD-family UNet in {name!r}, got a {got} model "
                         f"({type(inner).__name__} diffusion model), which this loader cannot store in fp8. "
                         "Fix: use the stock loaders for this model.")


def _detection_error(e: RuntimeError, name: str) -> ValueError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ValueError(f"SDXLOpt FP8 loader: expected an SDXL / SD1.x / SD2.x model in {name!r}; ComfyUI could not "
                      f"detect its model type ({first}). Fix: check that the file is a complete, uncorrupted "
                      "SD-family model; other families load with the stock loaders.")


def _log_plan(name: str, plan: fp8ops.Fp8Plan, model) -> None:
    sizes = fp8ops.weight_bytes(model.model.diffusion_model)
    total = sum(sizes.values()) / GIB
    parts = ", ".join(f"{d} {b / GIB:.2f} GiB" for d, b in sorted(sizes.items(), key=lambda kv: -kv[1]))
    line = f"SDXLOpt FP8: {name}: UNet {total:.2f} GiB ({parts}); {plan.describe()}{_groups_text(model)}"
    (log.warning if plan.degraded else log.info)(line)


def operations_for(plan: fp8ops.Fp8Plan) -> type:
    return fp8_operations(plan.storage_dtype, plan.fused, plan.compute)


def load_checkpoint_fp8(path: str, plan: fp8ops.Fp8Plan, name: str | None = None):
    """MODEL, CLIP, VAE of a checkpoint through comfy.sd.load_checkpoint_guess_config, UNet in fp8."""
    name = name or os.path.basename(path)
    try:
        out = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"),
            model_options={"custom_operations": operations_for(plan)})
    except RuntimeError as e:
        if "detect model type" in str(e):
            raise _detection_error(e, name) from e
        raise
    model, clip, vae = out[0], out[1], out[2]
    _check_loaded(model, name)
    attach_upcast_groups(model)
    attach_forward_graph(model)
    _log_plan(name, plan, model)
    return model, clip, vae


def load_unet_fp8(path: str, plan: fp8ops.Fp8Plan, name: str | None = None):
    """MODEL of a UNet-only file (or a checkpoint's UNet) through comfy.sd.load_diffusion_model, in fp8."""
    name = name or os.path.basename(path)
    try:
        model = comfy.sd.load_diffusion_model(path, model_options={"custom_operations": operations_for(plan)})
    except RuntimeError as e:
        if "detect model type" in str(e):
            raise _detection_error(e, name) from e
        raise
    _check_loaded(model, name)
    attach_upcast_groups(model)
    attach_forward_graph(model)
    _log_plan(name, plan, model)
    return model


def make_plan(weight_dtype: str, fused_matmul: bool, fp8_compute: bool = False) -> fp8ops.Fp8Plan:
    """The plan for ComfyUI's compute device (raises Fp8UnsupportedError, a ValueError, with the fix)."""
    return fp8ops.plan(weight_dtype, comfy.model_management.get_torch_device(), fused=fused_matmul,
                       compute=fp8_compute)


# ---------------------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------------------

WEIGHT_DTYPE_TOOLTIP = (
    "How the UNet's Linear and Conv2d weights are stored (norms and biases stay in the compute dtype). "
    "float8_e4m3fn: 3 mantissa bits, the more precise; float8_e5m2: 2 mantissa bits, wider range; auto: "
    "e4m3fn when this device and torch can hold it, else e5m2. Either halves the UNet's weight memory versus "
    "fp16 (SDXL: 4.8 -> 2.4 GiB). To switch fp8 off, use the stock loader instead.")
FUSED_TOOLTIP = (
    "On: Linear layers multiply with a fused Triton kernel that reads the fp8 weights directly, where it can "
    "run (CUDA GPU of compute capability 8.9+, i.e. RTX 40xx / Ada / Hopper, with Triton); elsewhere the "
    "per-layer upcast is used and the log says why. Off: always the per-layer upcast (storage only). "
    "Both give the same result within fp16 rounding. Default off: on an H200 the fused kernel measured slower "
    "than upcast + cuBLAS (bench/results/gpu_core.md).")


COMPUTE_TOOLTIP = (
    "On: Linear layers (87% of SDXL's weights) multiply on fp8 tensor cores: each call clamps its input "
    "activations to +-448 and rounds them to float8_e4m3fn, as ComfyUI's fp8_e4m3fn_fast does. This adds error "
    "on top of the fp8 weights (README: fp8 compute), so it is off by default. It pays under SDXLOpt Compile "
    "(which fuses the rounding into the op before): 0.90x the compiled fp16 time on an H100; without Compile "
    "the rounding is a separate pass and a forward measured 1.08x fp16 there: leave it off. Needs an RTX 40xx / Ada or Hopper GPU "
    "and a torch with _scaled_mm; elsewhere the load line warns once and the other matmul path runs. Takes "
    "precedence over fused_matmul. Convolutions always upcast.")


def _advanced(inp):
    """Mark an input as an expert knob (the `advanced` flag; older hosts take it through extra_dict)."""
    if hasattr(inp, "advanced"):
        inp.advanced = True
    else:
        inp.extra_dict["advanced"] = True
    return inp


def _dtype_input() -> io.Combo.Input:
    return io.Combo.Input("weight_dtype", options=list(fp8ops.WEIGHT_DTYPE_CHOICES), default="auto",
                          tooltip=WEIGHT_DTYPE_TOOLTIP)


def _fused_input() -> io.Boolean.Input:
    return _advanced(io.Boolean.Input("fused_matmul", default=False, tooltip=FUSED_TOOLTIP))


def _compute_input() -> io.Boolean.Input:
    # optional: prompts and workflows saved before this input existed still validate (and mean off)
    return _advanced(io.Boolean.Input("fp8_compute", default=False, optional=True, tooltip=COMPUTE_TOOLTIP))


class Fp8CheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptFP8CheckpointLoader",
            display_name="SDXLOpt Load Checkpoint (FP8)",
            category=f"{CATEGORY}/loaders",
            description="Loads an SDXL (or SD1.x/SD2.x) checkpoint from models/checkpoints with the UNet's weights "
                        "stored in float8: half the UNet VRAM of fp16. CLIP and VAE load as with the stock node. "
                        "LoRAs apply after it as usual. The file is only read.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="The checkpoint file (UNet + CLIP + VAE) in ComfyUI's models/checkpoints "
                                       "folder. For a UNet-only file use SDXLOpt Load Diffusion Model (FP8)."),
                _dtype_input(),
                _fused_input(),
                _compute_input(),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The UNet, Linear/Conv2d weights in float8."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoders, as the stock loader gives them."),
                io.Vae.Output(display_name="VAE", tooltip="The VAE, as the stock loader gives it."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name: str, weight_dtype: str = "auto", fused_matmul: bool = False,
                fp8_compute: bool = False) -> io.NodeOutput:
        plan = make_plan(weight_dtype, fused_matmul, fp8_compute)
        path = resolve_file("checkpoints", ckpt_name)
        check_kind(path, ckpt_name, accept=("checkpoint",))
        model, clip, vae = load_checkpoint_fp8(path, plan, ckpt_name)
        return io.NodeOutput(model, clip, vae)


class Fp8UNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptFP8UNetLoader",
            display_name="SDXLOpt Load Diffusion Model (FP8)",
            category=f"{CATEGORY}/loaders",
            description="Loads an SDXL (or SD1.x/SD2.x) UNet-only file from models/diffusion_models (or models/unet) "
                        "with its weights stored in float8: half the VRAM of fp16. Unlike the stock loader's fp8 "
                        "option, norms and biases stay in the compute dtype, and on Ada/Hopper GPUs the Linear "
                        "layers can use a fused fp8 matmul. The file is only read.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="The UNet file in ComfyUI's models/diffusion_models (or models/unet) folder. "
                                       "A full checkpoint works too (only its UNet is loaded)."),
                _dtype_input(),
                _fused_input(),
                _compute_input(),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The UNet, Linear/Conv2d weights in float8.")],
        )

    @classmethod
    def execute(cls, unet_name: str, weight_dtype: str = "auto", fused_matmul: bool = False,
                fp8_compute: bool = False) -> io.NodeOutput:
        plan = make_plan(weight_dtype, fused_matmul, fp8_compute)
        path = resolve_file("diffusion_models", unet_name)
        check_kind(path, unet_name, accept=("unet", "unet_diffusers", "checkpoint"))
        return io.NodeOutput(load_unet_fp8(path, plan, unet_name))


NODES = [Fp8CheckpointLoader, Fp8UNetLoader]
