"""FP8 weight storage with a per-layer upcast: the SDXL UNet's weights in half the memory of fp16.

Why this file exists: SDXL's UNet holds 2.6 B parameters, 87% of them in Linear layers; stored as fp16
they take 4.8 GiB, which does not fit a 4 GB card without offloading. Stored as float8 (1 byte) they take
2.4 GiB. Each Linear/Conv weight stays in float8 and is upcast to the compute dtype just before its
matmul, so at most one layer's weight exists in fp16 at a time; norms and biases stay in the compute
dtype. The upcast costs an extra kernel and memory pass per layer; on CUDA GPUs with native fp8
conversion (compute capability 8.9+: Ada, Hopper) an optional Triton kernel reads the fp8 weight and
converts it in registers inside the matmul instead (weight-only fp8: activations stay fp16/bf16).

Torch only: the ComfyUI glue (custom_operations classes, loader nodes) lives in nodes/fp8.py.
Storage scheme after KohakuBlueleaf's fp8 storage for A1111
(https://github.com/AUTOMATIC1111/stable-diffusion-webui/pull/14031): plain casts, no scales, so every
host code path that reads a weight (LoRA merging, offloading) sees its true value.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# the choices a user gets; "auto" resolves to the first of FP8_PREFERENCE the device can hold
WEIGHT_DTYPE_CHOICES = ("auto", "float8_e4m3fn", "float8_e5m2")
# e4m3fn first: 3 mantissa bits (max relative rounding error 1/16) against e5m2's 2 bits (1/8);
# weights never need e5m2's range (max 448 is ~1000x the largest SDXL weight)
FP8_PREFERENCE = ("float8_e4m3fn", "float8_e5m2")
FP8_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in FP8_PREFERENCE if hasattr(torch, n)}

# dtypes the fused kernel multiplies in (tensor-core inputs); fp32 activations take the upcast path
FUSED_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
# the fused kernel needs native fp8 <-> fp16 conversion in Triton (float8e4nv): sm_89 (Ada) and newer
FUSED_MIN_CAPABILITY = (8, 9)
# below this many rows a matmul is a few matrix-vector products: the tile kernel wastes most of its work
FUSED_MIN_ROWS = 16


# fp8 compute (torch._scaled_mm): activations rounded to e4m3fn too, both operands on fp8 tensor cores (up to
# 1.5x the fp16 matmul rate on an H100 at SDXL's shapes). The inner and output dimensions must be multiples of
# SCALED_ALIGN (every SDXL Linear's are); other calls take the upcast
SCALED_MIN_CAPABILITY = (8, 9)
SCALED_ALIGN = 16
E4M3_MAX = 448.0


class Fp8UnsupportedError(ValueError):
    """The requested fp8 storage dtype cannot be held by this torch build or device."""


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES.values()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def can_hold(dtype: torch.dtype, device: torch.device | str) -> bool:
    """True if `device` can store `dtype` and convert it to and from float32 (MPS, for one, cannot)."""
    try:
        probe = torch.tensor([0.5, -1.5], device=device).to(dtype)
        return bool(torch.equal(probe.to(torch.float32).cpu(), torch.tensor([0.5, -1.5])))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def resolve_storage_dtype(choice: str, device: torch.device | str) -> torch.dtype:
    """The fp8 dtype for `choice` ("auto" or a dtype name), checked against torch and the device."""
    if choice not in WEIGHT_DTYPE_CHOICES:
        raise Fp8UnsupportedError(
            f"expected weight_dtype to be one of {', '.join(WEIGHT_DTYPE_CHOICES)}, got {choice!r}. "
            "Fix: pick one of those (auto chooses the best one this device can hold).")
    names = FP8_PREFERENCE if choice == "auto" else (choice,)
    for name in names:
        dtype = FP8_DTYPES.get(name)
        if dtype is not None and can_hold(dtype, device):
            return dtype
    have = ", ".join(FP8_DTYPES) or "none"
    if choice == "auto":
        raise Fp8UnsupportedError(
            f"expected a device that can store float8 weights, got {device} with torch {torch.__version__} "
            f"(float8 dtypes in this torch: {have}; none converts on {device}). "
            "Fix: use the stock Load Checkpoint / Load Diffusion Model nodes (fp16 weights), or a newer torch.")
    raise Fp8UnsupportedError(
        f"expected a weight dtype this device can hold, got {choice!r}, which torch {torch.__version__} "
        f"on {device} cannot store (float8 dtypes in this torch: {have}). "
        "Fix: set weight_dtype to auto, or use the stock loaders (fp16 weights).")


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round `weight` to the fp8 `dtype` (nearest), saturating at its largest finite value."""
    big = torch.finfo(dtype).max
    if weight.dtype == dtype:
        return weight
    w = weight.float() if is_fp8(weight.dtype) or not weight.is_floating_point() else weight  # fp8 has no clamp
    return w.clamp(-big, big).to(dtype)


def upcast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 -> compute dtype (exact: every fp8 value is representable in fp16, bf16 and fp32)."""
    return weight.to(dtype)


def fused_applicable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused kernel handles this call: CUDA activations in fp16/bf16, >= 16 rows, an fp8 weight (the
    caller brings the weight to x's device)."""
    return (x.is_cuda and x.dtype in FUSED_ACTIVATION_DTYPES and is_fp8(weight.dtype)
            and x.shape[-1] == weight.shape[-1] and x.numel() >= FUSED_MIN_ROWS * x.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           fused: bool = False) -> torch.Tensor:
    """y = x @ W^T + b for an fp8-stored W: the fused kernel when asked and applicable, else upcast W."""
    if fused and fused_applicable(x, weight) and weight.device == x.device:
        return fused_linear(x, weight, bias)
    return F.linear(x, upcast(weight, x.dtype), bias)


class Fp8WeightStorage:
    """Mixin for nn.Linear / nn.Conv2d subclasses: `weight` is stored in `fp8_storage_dtype`, `bias` in the
    dtype the layer was built with (the compute dtype).

    Weights arriving through load_state_dict are quantized on the layer's device; `.to(dtype)` / `.half()`
    keep the fp8 storage (the round trip fp8 -> wider -> fp8 is exact), so a model-wide cast never
    silently brings fp16 weights back.
    """

    fp8_storage_dtype: torch.dtype = FP8_DTYPES.get("float8_e4m3fn", torch.float16)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        w = self.weight
        if w is not None and w.dtype != self.fp8_storage_dtype:
            # the base class allocated an uninitialized compute-dtype weight: swap it for fp8 storage
            self.weight = torch.nn.Parameter(torch.empty(w.shape, dtype=self.fp8_storage_dtype, device=w.device),
                                             requires_grad=False)
        if isinstance(self, torch.nn.Linear):
            self._set_unit_scale()

    def _set_unit_scale(self) -> None:
        """`fp8_scale`: the weight's scale for fp8 compute (scaled_linear), 1 (weights are plain casts), fp32 on
        the weight's device. A non-persistent buffer, not in state dicts: under torch.compile a graph input,
        where a scale made in the forward is one fill kernel per matmul in the graph (1,164 of them in a
        batch-1 SDXL forward, ~1 ms of GPU time: bench/results/micro_batch1_kernels_h100.txt). Re-made after
        every move or cast (_apply), so it is 1 whatever the cast or an empty-like materialization left."""
        device = None if self.weight is None else self.weight.device  # meta too: re-made when the weight lands
        self.register_buffer("fp8_scale", torch.ones((), dtype=torch.float32, device=device), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        loaded = []
        for name in ("weight", "bias"):
            key = prefix + name
            current = getattr(self, name, None)
            src = state_dict.get(key)
            if current is None or src is None:
                continue
            if tuple(src.shape) != tuple(current.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(src.shape)} from "
                                  f"checkpoint, the shape in current model is {tuple(current.shape)}.")
                loaded.append(key)
                continue
            device = src.device if current.is_meta else current.device
            src = src.detach().to(device)
            value = quantize(src, self.fp8_storage_dtype) if name == "weight" else src.to(current.dtype)
            setattr(self, name, torch.nn.Parameter(value, requires_grad=False))
            loaded.append(key)
        rest = {k: v for k, v in state_dict.items() if k not in loaded}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for key in loaded:
            if key in missing_keys:
                missing_keys.remove(key)
        if "fp8_scale" in self._buffers:  # the weight may have left the meta device: the scale follows it
            self._set_unit_scale()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        w = self.weight
        if w is not None and w.dtype != self.fp8_storage_dtype and w.is_floating_point() and not w.is_meta:
            self.weight = torch.nn.Parameter(quantize(w.detach(), self.fp8_storage_dtype), requires_grad=False)
        if "fp8_scale" in self._buffers:
            self._set_unit_scale()
        return out


# ---------------------------------------------------------------------------------------------------------
# Fused weight-only fp8 matmul (Triton): y = x @ upcast(W)^T + b with W read as fp8 and converted in registers
# ---------------------------------------------------------------------------------------------------------

def _autotune_configs(triton) -> list:
    """A handful of tile shapes: large tiles for SDXL's big matmuls (8192 x 640..10240), small for short M."""
    c = triton.Config
    return [
        c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        c({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
    ]


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Skip tiles much taller than the matmul (they only add compile time): M=154 needs no 128-row tile."""
    m = named_args["M"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, 1 << max(m - 1, 1).bit_length())]
    return keep or configs[-1:]


@functools.cache
def _kernels():
    """(tile kernel with EVEN_K heuristic, autotuned kernel), defined on first use so torch-only users never
    import Triton; under TRITON_INTERPRET=1 these run on the CPU (how the tests check the math)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_weight_matmul(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                          HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # grouped tile order: GROUP_M row-tiles share the same weight columns while they sit in L2
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)  # wrapped rows: loads need no mask
        rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn  # W^T tile: [BLOCK_K, BLOCK_N]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
                b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b.to(a.dtype), acc=acc)  # fp8 -> fp16/bf16 in registers, fp32 accumulate
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    tile = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(fp8_weight_matmul)
    tune = {"configs": _autotune_configs(triton), "key": ["M", "N", "K"],
            "prune_configs_by": {"early_config_prune": _prune_configs}}
    try:  # keep the tuning results on disk across processes (Triton >= 3.2)
        tuned = triton.autotune(**tune, cache_results=True)(tile)
    except TypeError:
        tuned = triton.autotune(**tune)(tile)
    return tile, tuned


def triton_fp8_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      autotune: bool = True) -> torch.Tensor:
    """2-D x [M, K] (fp16/bf16/fp32) @ fp8 weight [N, K]^T + bias [N] -> [M, N] in x's dtype, one kernel.

    autotune=False runs one fixed small tile (the CPU interpreter in tests, the load-time self-test).
    """
    import triton

    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    tile, tuned = _kernels()
    b = bias if bias is not None else y  # any pointer: never read when HAS_BIAS is False
    args = (x, weight, b, y, m, n, k, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            y.stride(0), y.stride(1))
    if autotune:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        tuned[grid](*args, HAS_BIAS=bias is not None)
    else:
        bm, bn, bk = 32, 32, 32
        tile[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](*args, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                                                         BLOCK_K=bk, GROUP_M=4, num_warps=4, num_stages=2)
    return y


def _fused_linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            y = triton_fp8_matmul(x2, weight, bias)
    else:
        y = triton_fp8_matmul(x2, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


_OP_NAME = "sdxlopt::fp8_weight_linear"


def _register_op():
    """The fused kernel as a torch custom op, so torch.compile(fullgraph=True) treats it as one opaque node."""
    if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):
        return None
    try:
        return torch.ops.sdxlopt.fp8_weight_linear  # registered by an earlier import of this module
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op(_OP_NAME, mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    def fp8_weight_linear(x, weight, bias):
        return _fused_linear_impl(x, weight, bias)

    @fp8_weight_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return torch.ops.sdxlopt.fp8_weight_linear


_FUSED_OP = _register_op()


def _is_compiling() -> bool:
    # ops/compiling.py's is_compiling, kept here: this file also runs standalone (the Triton interpreter test)
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ upcast(W)^T + b in one Triton kernel (CUDA; see fused_available). Any leading dims on x."""
    if _FUSED_OP is not None and _is_compiling():
        return _FUSED_OP(x, weight, bias)
    return _fused_linear_impl(x, weight, bias)  # eager: skip the dispatcher's per-call overhead


def scaled_applicable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._scaled_mm takes this call: fp16/bf16 activations and an fp8 weight on one device, the inner and
    the output dimension multiples of SCALED_ALIGN (any number of rows: cross-attention keys/values over 77
    tokens and the embeddings' few rows too, as ComfyUI's fp8_e4m3fn_fast does)."""
    k = x.shape[-1]
    return (x.dtype in FUSED_ACTIVATION_DTYPES and is_fp8(weight.dtype) and x.device == weight.device
            and k == weight.shape[-1] and k % SCALED_ALIGN == 0 and weight.shape[0] % SCALED_ALIGN == 0
            and x.numel() > 0)


# fast fp8 accumulation (use_fast_accum: no periodic promotion of the partial sums to fp32), read when a call is
# made or traced. H100, batch 2 at 1024x1024: one forward in a CUDA graph 46.0 vs 47.3 ms, rel. err vs fp16 0.215
# vs 0.218; per SDXL matmul 0.75-1.03x the time (bench/results/micro_fp8_fast_accum_h100.txt)
SCALED_FAST_ACCUM = True
_ONES: dict[tuple[str, int | None], torch.Tensor] = {}


def _unit_scale(device: torch.device) -> torch.Tensor:
    """The weight's scale (1: weights are stored as plain casts), one tensor per device, made on its first
    (eager) call: no per-call fill, nothing allocated inside a CUDA-graph capture that an eager call preceded.
    Under torch.compile a new tensor in the graph instead (filling the cache there would change a global the
    compiled code guards on: a recompile on the next call), one fill kernel per call: fp8 Linear layers pass
    their fp8_scale buffer instead (Fp8WeightStorage)."""
    if _is_compiling():
        return torch.ones((), device=device, dtype=torch.float32)
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    one = _ONES.get((device.type, index))
    if one is None:
        one = _ONES[(device.type, index)] = torch.ones((), device=device, dtype=torch.float32)
    return one


def quantize_activation(x2: torch.Tensor, one: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D fp16/bf16 activation -> (e4m3fn values, fp32 scale 1): clamped to +-E4M3_MAX (saturates, never
    NaN) and cast, as ComfyUI's fp8_e4m3fn_fast does; the scale is `one` when given (a layer's fp8_scale), else
    _unit_scale's. One pointwise pass, which torch.compile fuses into the op that made x. A scale per call
    from the call's largest |x| was measured too: its reduction pass cost more than the fp8 matmul saves
    (batch 2, 1024x1024, H100: 60.6 vs 47.5 ms per forward in a CUDA graph, fp16 43.0; compiled 36.7 vs
    31.1 ms, fp16 33.2-33.8; bench/results/micro_fp8_compute_h100.txt) and gave no smaller error on the
    random SDXL (0.243 vs 0.218 against fp16)."""
    return x2.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), _unit_scale(x2.device) if one is None else one


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b on fp8 tensor cores: x clamped and rounded to e4m3fn (quantize_activation), W as stored
    (fp8, scale 1), accumulated in fp32, returned in x's dtype. The caller checks scaled_applicable.
    `scale`: a float32 1 on x's device to use for both operands (the layer's fp8_scale buffer), else
    _unit_scale's, also for both."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    usable = scale is not None and scale.device == x.device and scale.dtype == torch.float32
    one = scale if usable else _unit_scale(x.device)
    xq, scale_a = quantize_activation(x2, one)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=one, bias=bias, out_dtype=x.dtype,
                         use_fast_accum=SCALED_FAST_ACCUM)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@functools.cache
def _scaled_status(device: str, dtype: torch.dtype) -> tuple[bool, str]:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False, f"{dev.type} device (fp8 tensor cores are a CUDA feature)"
    if getattr(torch.version, "hip", None):
        return False, "ROCm build (its fp8 types differ)"
    cap = torch.cuda.get_device_capability(dev)
    if cap < SCALED_MIN_CAPABILITY:
        return False, (f"compute capability {cap[0]}.{cap[1]} < {SCALED_MIN_CAPABILITY[0]}."
                       f"{SCALED_MIN_CAPABILITY[1]} (no fp8 tensor cores)")
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no _scaled_mm"
    def reference(x, w, b):  # the same rounding done by hand
        xq, scale = quantize_activation(x)
        return F.linear(xq.float() * scale, w.float(), b.float())

    failed = _self_test(dev, dtype, (32, 48, 64), scaled_linear, reference, "_scaled_mm")
    return failed or (True, f"compute capability {cap[0]}.{cap[1]}, _scaled_mm self-test passed")


def _self_test(dev: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], run, reference,
               what: str) -> tuple[bool, str] | None:
    """run(x, w, b) against reference(x, w, b) on seeded fp16 inputs (rows, out, in) and an fp8 `dtype`
    weight: None when they agree within 1%, else (False, why)."""
    m, n, k = shape
    try:
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.float16)
        w = quantize(torch.randn(n, k, device=dev, generator=gen) * 0.1, dtype)
        b = torch.randn(n, device=dev, generator=gen).to(torch.float16)
        got, ref = run(x, w, b).float(), reference(x, w, b)
        err = float((got - ref).abs().max() / ref.abs().max())
        if not err < 1e-2:
            return False, f"self-test mismatch (relative error {err:.2e})"
    except Exception as e:
        return False, f"{what} failed its self-test ({type(e).__name__}: {str(e)[:200]})"
    return None


def scaled_available(device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
    """(usable, why) for fp8 compute on `device` with weights in `dtype`; probed once per process."""
    return _scaled_status(str(torch.device(device)), dtype)


def _triton_fp8_problem(dev: torch.device) -> str | None:
    """Why this pack's fp8 Triton kernels cannot run on `dev` (None: they may; each still self-tests)."""
    if dev.type != "cuda" or not torch.cuda.is_available():
        return f"{dev.type} device (the Triton fp8 kernels are CUDA-only)"
    if getattr(torch.version, "hip", None):
        return "ROCm build (the Triton fp8 kernels target NVIDIA fp8 conversion)"
    cap = torch.cuda.get_device_capability(dev)
    if cap < FUSED_MIN_CAPABILITY:
        return (f"compute capability {cap[0]}.{cap[1]} < {FUSED_MIN_CAPABILITY[0]}.{FUSED_MIN_CAPABILITY[1]} "
                "(no native fp8 conversion)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set"
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"Triton unavailable ({type(e).__name__}: {e})"
    return None


@functools.cache
def _fused_status(device: str, dtype: torch.dtype) -> tuple[bool, str]:
    dev = torch.device(device)
    problem = _triton_fp8_problem(dev)
    if problem is not None:
        return False, problem
    cap = torch.cuda.get_device_capability(dev)
    # self-test: compile one tile and compare with the upcast reference
    failed = _self_test(dev, dtype, (48, 40, 80), lambda x, w, b: triton_fp8_matmul(x, w, b, autotune=False),
                        lambda x, w, b: F.linear(x.float(), w.float(), b.float()), "Triton kernel")
    return failed or (True, f"compute capability {cap[0]}.{cap[1]}, Triton self-test passed")


def fused_available(device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
    """(usable, why) for the fused kernel on `device` with weights in `dtype`; probed once per process."""
    return _fused_status(str(torch.device(device)), dtype)


# ---------------------------------------------------------------------------------------------------------
# Multi-tensor upcast (Triton): many fp8 weights -> their compute-dtype copies in one kernel launch
# ---------------------------------------------------------------------------------------------------------

UPCAST_BLOCK = 8192  # elements per program (one table row); 8192 x 8 warps: 45 us per SDXL block on an H100, 2.3 TB/s
# (16384 x 8: 61 us; bench/results/micro_fp8_upcast_sweep_h100.txt)
UPCAST_WARPS = 8


@functools.cache
def _upcast_kernel():
    """One program per table row (source address, destination address, element count): loads up to BLOCK
    fp8 values, converts them in registers, stores them. Used inside the grouped upcast's CUDA graph, where
    it replaces one torch copy kernel per weight (torch's fp8 conversion copy runs at ~1 TB/s on an H100)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_upcast_many(table, SRC_E5M2: tl.constexpr, DST_BF16: tl.constexpr, BLOCK: tl.constexpr,
                        ALIGN: tl.constexpr):
        row = table + tl.program_id(0) * 3
        src_addr, dst_addr, n = tl.load(row), tl.load(row + 1), tl.load(row + 2)
        # every row starts ALIGN-byte aligned (upcast_table checks): lets the loads and stores vectorize
        src_addr = tl.multiple_of(src_addr, ALIGN)
        dst_addr = tl.multiple_of(dst_addr, ALIGN)
        if SRC_E5M2:
            src = src_addr.to(tl.pointer_type(tl.float8e5))
        else:
            src = src_addr.to(tl.pointer_type(tl.float8e4nv))
        if DST_BF16:
            dst = dst_addr.to(tl.pointer_type(tl.bfloat16))
        else:
            dst = dst_addr.to(tl.pointer_type(tl.float16))
        offs = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)
        mask = offs < n
        x = tl.load(src + offs, mask=mask, other=0.0)
        tl.store(dst + offs, x.to(dst.dtype.element_ty), mask=mask)

    return fp8_upcast_many


UPCAST_ALIGN = 16  # bytes: every table row's source and destination start on this boundary


def upcast_table(pairs, block: int = UPCAST_BLOCK) -> list[int]:
    """Rows (source address, destination address, elements) covering each (fp8 source, destination) pair of
    contiguous tensors in `block`-element pieces, flattened. Raises ValueError for tensors that are not
    contiguous, differ in size or do not start UPCAST_ALIGN-byte aligned (the kernel's vector accesses)."""
    rows: list[int] = []
    if block % UPCAST_ALIGN:
        raise ValueError(f"expected a block that is a multiple of {UPCAST_ALIGN}, got {block}")
    for src, dst in pairs:
        if src.numel() != dst.numel() or not src.is_contiguous() or not dst.is_contiguous():
            raise ValueError(f"expected contiguous tensors of one size, got {tuple(src.shape)} -> {tuple(dst.shape)}")
        if src.data_ptr() % UPCAST_ALIGN or dst.data_ptr() % UPCAST_ALIGN:
            raise ValueError(f"expected {UPCAST_ALIGN}-byte aligned tensors, got addresses {src.data_ptr()} and "
                             f"{dst.data_ptr()}")
        s0, d0, n = src.data_ptr(), dst.data_ptr(), src.numel()
        for off in range(0, n, block):
            rows += [s0 + off * src.element_size(), d0 + off * dst.element_size(), min(block, n - off)]
    return rows


@functools.cache
def _upcast_status(device: str, src_dtype: torch.dtype, dst_dtype: torch.dtype) -> bool:
    dev = torch.device(device)
    if _triton_fp8_problem(dev) is not None:
        return False
    try:  # self-test: two weights (one spanning several rows) against .to()
        gen = torch.Generator(device=dev).manual_seed(0)
        ws = [quantize(torch.randn(n, device=dev, generator=gen), src_dtype) for n in (3000, 100)]
        out = torch.full((3000 + 128,), -1.0, device=dev, dtype=dst_dtype)
        pairs = [(ws[0], out[:3000]), (ws[1], out[3008:3108])]
        triton_upcast_many(torch.tensor(upcast_table(pairs, block=1024), dtype=torch.int64, device=dev),
                           src_dtype, dst_dtype, block=1024)
        return all(torch.equal(d, w.to(dst_dtype)) for w, d in pairs) and bool((out[3000:3008] == -1).all())
    except Exception:
        return False


def upcast_available(device: torch.device | str, src_dtype: torch.dtype, dst_dtype: torch.dtype) -> bool:
    """Whether the multi-tensor upcast runs and gives exactly `.to()` on `device`; probed once per process."""
    return _upcast_status(str(torch.device(device)), src_dtype, dst_dtype)


def triton_upcast_many(table: torch.Tensor, src_dtype: torch.dtype, dst_dtype: torch.dtype,
                       block: int = UPCAST_BLOCK, num_warps: int = UPCAST_WARPS) -> None:
    """Run the multi-tensor upcast over an int64 table from upcast_table (on the tensors' device)."""
    if dst_dtype not in (torch.float16, torch.bfloat16) or not is_fp8(src_dtype):
        raise ValueError(f"expected fp8 -> float16/bfloat16, got {src_dtype} -> {dst_dtype}")
    kernel = _upcast_kernel()
    kernel[(table.numel() // 3,)](table, SRC_E5M2=src_dtype == FP8_DTYPES.get("float8_e5m2"),
                                  DST_BF16=dst_dtype == torch.bfloat16, BLOCK=block, ALIGN=UPCAST_ALIGN,
                                  num_warps=num_warps)


SWITCHED_OFF = "fused matmul switched off"


@dataclass(frozen=True)
class Fp8Plan:
    """How a model's weights are stored and multiplied.

    storage_dtype: fp8 dtype of every Linear/Conv2d weight.
    fused: Linear layers run the fused Triton kernel (else: per-layer upcast, "storage only").
    reason: why this path (the one line the loader logs).
    compute: Linear layers multiply on fp8 tensor cores, activations rounded to e4m3fn (scaled_linear).
    degraded: a path the user asked for cannot run here (the load line is a warning).
    """

    storage_dtype: torch.dtype
    fused: bool
    reason: str
    compute: bool = False
    degraded: bool = False

    @property
    def path(self) -> str:
        if self.compute:
            return "fp8 compute (activations clamped to +-448 and rounded to e4m3fn)"
        return "fused Triton fp8 matmul" if self.fused else "per-layer upcast (storage only)"

    def describe(self) -> str:
        return f"weights {dtype_name(self.storage_dtype)}, Linear matmuls: {self.path} ({self.reason})"


def plan(weight_dtype: str, device: torch.device | str, fused: bool = True, compute: bool = False) -> Fp8Plan:
    """Resolve the user's choices for `device`: storage dtype (raises Fp8UnsupportedError) and matmul path.
    fp8 compute, where asked for and available, takes precedence over the fused kernel; where it cannot
    run, the plan falls back to the other choice and says why."""
    storage = resolve_storage_dtype(weight_dtype, device)
    compute_ok, compute_why = scaled_available(device, storage) if compute else (False, "")
    if compute_ok:
        return Fp8Plan(storage, False, compute_why, compute=True)
    if not fused:
        base = Fp8Plan(storage, False, SWITCHED_OFF)
    else:
        ok, why = fused_available(device, storage)
        base = Fp8Plan(storage, ok, why, degraded=not ok)
    if compute:
        return Fp8Plan(storage, base.fused, f"fp8 compute unavailable: {compute_why}; {base.reason}", degraded=True)
    return base


def weight_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters per dtype name (what the model occupies, for the load log and the docs)."""
    out: dict[str, int] = {}
    for p in module.parameters():
        name = dtype_name(p.dtype)
        out[name] = out.get(name, 0) + p.numel() * p.element_size()
    return out
