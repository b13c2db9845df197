"""A compiled UNet call that keeps every patch: one stable graph per (model layout, latent size, batch).

Why this file exists: on an H100/H200, eager SDXL is bound by kernel-launch overhead, not arithmetic;
torch.compile (and CUDA graphs, mode "reduce-overhead") removes most of it. Compiling the whole diffusion
model the way ComfyUI core does (an APPLY_MODEL wrapper that swaps `diffusion_model` for a compiled copy)
also compiles every DIFFUSION_MODEL wrapper inside it: per-step Python decisions (DeepCache full or
shallow, a CFG cutoff's batch) then become guards that fail every few steps, and dynamo recompiles. Here
the compiled region is only the forward *below* those decisions; the decisions stay in eager Python and
pick between a few compiled entries, each of which is compiled once and stays valid.

This module is the torch-only half:
- `CompileConfig`: what the user chose, and the `torch.compile` arguments it means on a device;
- `compiler_problem()`: whether this torch / device can compile at all (probed once per process);
- `CompileCache`: process-wide compiled entries, one per (entry point, model layout, settings) family and
  per latent size inside it (bounded, least recently used dropped). Each entry compiles a private copy of
  a trampoline function, so it has its own dynamo cache and recompile budget;
- guards: weights are graph *inputs* (dynamo inlines nn.Modules), and the per-parameter tensor guards
  are dropped (`drop_parameter_guards`): the family key carries the layout instead (`module_layout`),
  checked once per run, so a LoRA strength change or a weight patch (new Parameter objects, other
  requires_grad) never recompiles;
- batch helpers for warm-up (the cond-only batch a CFG cutoff will use) and the CUDA-graph output rule
  (tensors that leave a CUDA graph are cloned before anything keeps them).

The ComfyUI wiring (wrappers, warm-up, logging, the node) is in nodes/compile.py.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# inductor presets (torch.compile's `mode`); the CUDA-graph ones fall back to their plain variant off CUDA
MODES = ("reduce-overhead", "default", "max-autotune-no-cudagraphs", "max-autotune")
NO_CUDAGRAPH_MODE = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
# backends the node offers: inductor (Triton kernels), cudagraphs (CUDA graphs of the eager kernels, no
# Triton needed), aot_eager (traces and runs the captured graph eagerly: checks compile-friendliness on
# any device, no speed-up)
BACKENDS = ("inductor", "cudagraphs", "aot_eager")
GPU_BACKENDS = ("inductor", "cudagraphs")  # backends that only pay off (or only run) on a CUDA GPU
DEFAULT_CACHE_SIZE = 4  # latent sizes kept compiled per model layout
MAX_FAMILIES = 16  # (entry point x model layout x patch kinds x settings) kept compiled per process


@dataclass(frozen=True)
class CompileConfig:
    """The user's choices.

    backend: a torch.compile backend ("inductor", "cudagraphs", "aot_eager" or any registered one).
    mode: inductor preset; "reduce-overhead" adds CUDA graphs (CUDA only, plain "default" elsewhere).
    dynamic: one graph for every latent size (symbolic shapes) instead of one per size.
    fullgraph: a graph break is an error (the call then runs eager and the log names the break).
    cache_size: latent sizes kept compiled per model layout (static shapes); the least recently used
        size is dropped beyond it.
    warmup: compile the batches the run will need (the cond-only batch of a CFG cutoff) in the first call.
    regional: mark the repeated blocks as nested compile regions (nested_regions; the caller says which
        blocks) so that one block's graph serves its shape: a shorter first compile, still one graph per
        call. Static shapes only (ignored with dynamic).
    """

    backend: str = "inductor"
    mode: str = "reduce-overhead"
    dynamic: bool = False
    fullgraph: bool = False
    cache_size: int = DEFAULT_CACHE_SIZE
    warmup: bool = True
    regional: bool = True

    def validate(self) -> None:
        """Raise ValueError saying what was expected, what arrived and the fix."""
        known = set(BACKENDS) | set(_registered_backends())
        if self.backend not in known:
            raise ValueError(f"SDXLOpt Compile backend: expected one of {', '.join(BACKENDS)} (or another "
                             f"registered torch.compile backend), got {self.backend!r}. Fix: use inductor.")
        if self.mode not in MODES:
            raise ValueError(f"SDXLOpt Compile mode: expected one of {', '.join(MODES)}, got {self.mode!r}. "
                             f"Fix: use reduce-overhead (CUDA graphs) or default.")
        if int(self.cache_size) != self.cache_size or self.cache_size < 1:
            raise ValueError(f"SDXLOpt Compile cache_size: expected an integer >= 1 (latent sizes kept "
                             f"compiled), got {self.cache_size!r}. Fix: use 4.")

    def effective_mode(self, device_type: str) -> str | None:
        """The inductor mode used on `device_type` (None for other backends)."""
        if self.backend != "inductor":
            return None
        return self.mode if device_type == "cuda" else NO_CUDAGRAPH_MODE.get(self.mode, self.mode)

    def uses_cudagraphs(self, device_type: str) -> bool:
        """Whether compiled calls replay CUDA graphs (their outputs live in a shared pool: clone to keep)."""
        if device_type != "cuda":
            return False
        if self.backend == "cudagraphs":
            return True
        mode = self.effective_mode(device_type)
        return bool(mode and _mode_options(mode).get("triton.cudagraphs"))

    def describe(self, device_type: str) -> str:
        mode = self.effective_mode(device_type)
        shapes = "dynamic shapes" if self.dynamic else "static shapes"
        regional = ", repeated blocks as regions" if self.regional and not self.dynamic and regional_supported() else ""
        return f"{self.backend}{' ' + mode if mode else ''}, {shapes}{regional}"


def _registered_backends() -> list[str]:
    try:
        return list(torch._dynamo.list_backends(exclude_tags=()))
    except Exception:  # an old or stripped torch: only the built-in names are accepted
        return []


@functools.cache
def _mode_options(mode: str) -> dict:
    import torch._inductor

    return dict(torch._inductor.list_mode_options(mode))


def guard_filter_supported() -> bool:
    """torch.compile(options={"guard_filter_fn": ...}) exists (torch >= 2.8)."""
    return hasattr(torch.compiler, "keep_tensor_guards_unsafe")


def drop_parameter_guards(entries: Sequence[Any]) -> list[bool]:
    """Guard filter: keep every guard except the tensor guards on nn.Parameters.

    Weights are graph inputs, read at each call; their guards only check metadata (dtype, shape, stride,
    requires_grad), which ComfyUI changes when it patches a LoRA (a new Parameter, requires_grad False).
    The family key (module_layout) checks dtype/shape/stride/device once per run instead.
    """
    return [not (e.guard_type == "TENSOR_MATCH" and isinstance(e.value, torch.nn.Parameter)) for e in entries]


def compile_kwargs(config: CompileConfig, device_type: str) -> dict:
    """Keyword arguments of torch.compile for `config` on `device_type`."""
    kwargs: dict[str, Any] = {"backend": config.backend, "fullgraph": config.fullgraph,
                              "dynamic": bool(config.dynamic)}
    options: dict[str, Any] = {}
    mode = config.effective_mode(device_type)
    if mode is not None:
        options.update(_mode_options(mode))  # `mode` and `options` are exclusive in torch.compile
    if guard_filter_supported():
        options["guard_filter_fn"] = drop_parameter_guards
    if options:
        kwargs["options"] = options
    elif mode is not None:
        kwargs["mode"] = mode
    return kwargs


# --------------------------------------------------------------------------------------------------------
# can this torch / device compile at all?

def _probe_fn(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x) * 2.0 + 1.0


@functools.cache
def _probe(backend: str, device: str, fullgraph: bool) -> str | None:
    try:
        if not torch._dynamo.is_dynamo_supported():
            return f"torch.compile is not supported by this Python/torch ({torch.__version__})"
    except Exception as e:  # is_dynamo_supported raises on some unsupported platforms
        return f"torch.compile is not supported here ({type(e).__name__}: {e})"
    if backend == "inductor" and device.startswith("cuda"):
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            has_triton = None
        if has_triton is not None and not has_triton():
            return "Triton is not installed or cannot run on this GPU (inductor needs it; the cudagraphs backend does not)"
    try:
        x = torch.linspace(-2.0, 2.0, 64, device=device).reshape(8, 8)
        fn = torch.compile(fresh_function(_probe_fn, "sdxlopt_compile_probe"),
                           **compile_kwargs(CompileConfig(backend=backend, fullgraph=fullgraph), x.device.type))
        got, ref = fn(x), _probe_fn(x)
        if not torch.allclose(got, ref, rtol=1e-3, atol=1e-3):
            return f"the {backend} backend computed a wrong result in its self-test"
    except Exception as e:  # any failure of the toolchain (missing C compiler, broken Triton, ...)
        return f"the {backend} backend failed its self-test ({root_cause(e)})"
    return None


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def compile_error_summary(e: BaseException) -> str:
    """root_cause(e) plus the innermost user-code frame dynamo names in its message (where the graph broke)."""
    frames = _FRAME.findall(str(e))
    where = f" at {frames[-1][0]}:{frames[-1][1]} in {frames[-1][2]}" if frames else ""
    return root_cause(e) + where


def root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost cause (dynamo wraps a backend's error in BackendCompilerFailed)."""
    for _ in range(16):
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if not isinstance(inner, BaseException) or inner is e:
            break
        e = inner
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def compiler_problem(config: CompileConfig, device: torch.device | str) -> str | None:
    """Why `config` cannot compile on `device` (None when it can). Probed once per process."""
    dev = torch.device(device)
    if config.backend in GPU_BACKENDS and dev.type != "cuda":
        return (f"the {config.backend} backend targets CUDA GPUs and the model runs on {dev.type} "
                f"(backend aot_eager checks the compiled path on any device, without a speed-up)")
    return _probe(config.backend, str(dev), bool(config.fullgraph))


# --------------------------------------------------------------------------------------------------------
# compiled entries

def _trampoline(fn, args, kwargs):
    return fn(*args, **kwargs)


def fresh_function(fn: Callable, name: str) -> Callable:
    """A copy of `fn` with its own code object: dynamo keeps its compiled graphs (and counts recompiles) per
    code object, so each copy is an independent cache."""
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") \
        else fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def module_layout(module: torch.nn.Module, block_type: type | None = None) -> tuple[int, list[torch.nn.Module]]:
    """One walk over `module` (once per run, before its first compiled call, while the GPU waits): a hash of
    every parameter's and buffer's dtype, shape, stride and device in module order (the layout a graph
    assumes), and the submodules that are `block_type` instances. Reads each submodule's own tensor dicts
    instead of named_parameters(): ~2x faster on SDXL's 2,000 modules, and one walk instead of two."""
    items, blocks = [], []
    for m in module.modules():
        if block_type is not None and isinstance(m, block_type):
            blocks.append(m)
        for tensors in (m._parameters, m._buffers):
            for t in tensors.values():
                if t is not None:
                    items.append((t.dtype, t.shape, t.stride(), t.device))
    return hash(tuple(items)), blocks


def tensor_layout_key(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple:
    """(shape without batch, dtype) of every top-level tensor argument: which latent size an entry is for."""
    parts = []
    for v in [*args, *(kwargs[k] for k in sorted(kwargs))]:
        if torch.is_tensor(v):
            parts.append((tuple(v.shape[1:]), str(v.dtype)))
    return tuple(parts)


@dataclass
class CompiledEntry:
    """One compiled callable (one dynamo cache): an entry point for one family and latent size."""

    name: str
    fn: Callable
    failed: str | None = None  # why this entry runs eager from now on
    regional_failed: str | None = None  # why this entry compiles whole forwards (no nested regions) from now on
    compile_seconds: float = 0.0
    graphs: int = 0
    calls: int = 0
    warmed: set = field(default_factory=set)  # warm-up inputs already compiled (no extra forward next run)

    def __call__(self, target: Callable, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        return self.fn(target, tuple(args), dict(kwargs))


class CompileCache:
    """Process-wide compiled entries: families (entry point x model layout x settings), each with a bounded
    LRU of latent sizes. Dropping an entry drops its code object and with it dynamo's compiled graphs."""

    def __init__(self, max_families: int = MAX_FAMILIES) -> None:
        self.max_families = max_families
        self.families: OrderedDict[Hashable, OrderedDict[Hashable, CompiledEntry]] = OrderedDict()
        self._count = 0

    def entry(self, family: Hashable, size: Hashable, compile_fn: Callable[[Callable], Callable],
              cache_size: int, label: str = "unet") -> CompiledEntry:
        """The entry for (family, size), compiled lazily (the first call traces it) and marked most recent."""
        sizes = self.families.get(family)
        if sizes is None:
            sizes = self.families[family] = OrderedDict()
            while len(self.families) > self.max_families:
                self.families.popitem(last=False)
        self.families.move_to_end(family)
        e = sizes.get(size)
        if e is None:
            self._count += 1
            name = f"sdxlopt_compiled_{label}_{self._count}"
            e = sizes[size] = CompiledEntry(name, compile_fn(fresh_function(_trampoline, name)))
            while len(sizes) > max(1, cache_size):
                dropped = sizes.popitem(last=False)[1]
                log.info("SDXLOpt Compile: dropped the compiled %s (least recently used of %d sizes kept).",
                         dropped.name, cache_size)
        sizes.move_to_end(size)
        return e

    def entries(self) -> list[CompiledEntry]:
        return [e for sizes in self.families.values() for e in sizes.values()]

    def clear(self) -> None:
        self.families.clear()


# --------------------------------------------------------------------------------------------------------
# regional compilation: repeated blocks marked as nested compile regions, so one graph serves each shape

def regional_supported() -> bool:
    """torch.compiler.nested_compile_region exists (torch >= 2.8)."""
    return hasattr(torch.compiler, "nested_compile_region")


@functools.cache
def region_forward(cls: type, options_kwarg: str, keep: frozenset[str]) -> Callable:
    """The forward a `cls` instance runs inside a compiled call: cls.forward as a nested compile region, fed
    only the `keep` entries of its `options_kwarg` dict. A region's inputs are guarded entry by entry, so every
    other entry (per-block positions, per-run ids, other nodes' wrappers) would make blocks differ, or runs
    recompile; the caller keeps what the block reads. One function per (class, keys): the function a guard
    sees is the same at every call."""
    marked = torch.compiler.nested_compile_region(cls.forward)

    def forward(self, *args, **kwargs):
        options = kwargs.get(options_kwarg)
        if isinstance(options, dict):
            kwargs = {**kwargs, options_kwarg: {k: v for k, v in options.items() if k in keep}}
        return marked(self, *args, **kwargs)

    forward.__name__ = forward.__qualname__ = f"sdxlopt_region_{cls.__name__}"
    return forward


@contextlib.contextmanager
def nested_regions(blocks: Sequence[torch.nn.Module], options_kwarg: str, keep: Iterable[str]):
    """While the block is open (around a compiled call, outside the compiled region), each of `blocks` runs
    region_forward, so the compiler can reuse one block's graph for the others of its shape. The blocks'
    own forward is restored on exit; a block that already has an instance-level forward (someone else's patch)
    is left alone and traced inline. Yields how many were set."""
    keys = frozenset(keep)
    installed = []
    try:
        for b in blocks:
            if "forward" in b.__dict__:
                continue
            b.forward = types.MethodType(region_forward(type(b), options_kwarg, keys), b)
            installed.append(b)
        yield len(installed)
    finally:
        for b in installed:
            b.__dict__.pop("forward", None)


# --------------------------------------------------------------------------------------------------------
# dynamo's counters: compiled graphs and graph breaks (process-wide, monotonic)

def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


@dataclass
class CallRecord:
    """What one compiled call cost: new graphs, seconds when it compiled."""

    graphs: int
    seconds: float


def timed_call(fn: Callable[[], Any]) -> tuple[Any, CallRecord]:
    """Run fn(); report the graphs it compiled and its wall time."""
    g0, t0 = graphs_compiled(), time.perf_counter()
    out = fn()
    return out, CallRecord(graphs_compiled() - g0, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------------
# per-run statistics

@dataclass
class CompileRunStats:
    """Per sampling run: how the UNet calls went. clone() per run, reset() in `finally`."""

    compiled_calls: int = 0
    eager_calls: int = 0
    warmup_calls: int = 0
    warmup_graphs: int = 0
    warmup_seconds: float = 0.0
    sampling_graphs: int = 0  # graphs compiled after the warm-up: a recompile mid-sampling
    sampling_seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)
    regional_blocks: int = 0  # blocks that ran as nested compile regions in a compiled call (most in one call)
    regional_off: list[str] = field(default_factory=list)  # why calls compiled without nested regions
    conds_moved: int = 0  # conditioning tensors put on the GPU before the first step (see nodes/compile.py)
    warned: set[str] = field(default_factory=set)

    def clone(self) -> CompileRunStats:
        return CompileRunStats()

    def reset(self) -> CompileRunStats:
        self.__init__()
        return self

    @property
    def calls(self) -> int:
        return self.compiled_calls + self.eager_calls

    def summary(self) -> str:
        if self.calls == 0:
            return "no UNet call reached the compiled path (this model type has no DIFFUSION_MODEL wrapper point)"
        line = f"{self.compiled_calls}/{self.calls} UNet calls compiled"
        if self.warmup_graphs:
            line += f", {self.warmup_graphs} graphs compiled in the first call ({self.warmup_seconds:.1f} s)"
        else:
            line += ", no compile (reused compiled graphs)"
        if self.sampling_graphs:
            line += f", {self.sampling_graphs} recompiled during sampling ({self.sampling_seconds:.1f} s)"
        if self.regional_blocks:
            line += f", {self.regional_blocks} blocks as reused regions"
        if self.conds_moved:
            line += f", {self.conds_moved} conditioning tensors moved to the GPU once (not copied each step)"
        if self.regional_off:
            line += f"; whole forwards traced because: {'; '.join(self.regional_off)}"
        if self.fallbacks:
            line += f"; eager because: {'; '.join(self.fallbacks)}"
        return line


# --------------------------------------------------------------------------------------------------------
# batches: the chunks of a cond batch (warm-up of the cond-only batch)

def chunk_batch(value: Any, batch: int, n_chunks: int, keep: Sequence[int]) -> Any:
    """`value` with only the chunks `keep` of its batch dimension, for tensors of `batch` rows (nested in
    lists, tuples and dicts, e.g. a ControlNet's residuals); everything else unchanged."""
    if torch.is_tensor(value):
        if value.ndim == 0 or value.shape[0] != batch or batch % n_chunks:
            return value
        per = batch // n_chunks
        return torch.cat([value[i * per:(i + 1) * per] for i in keep]).contiguous()
    if isinstance(value, dict):
        return {k: chunk_batch(v, batch, n_chunks, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [chunk_batch(v, batch, n_chunks, keep) for v in value]
        return out if isinstance(value, list) else type(value)(out)
    return value


def positive_chunks(cond_or_uncond: Sequence[int]) -> list[int]:
    """Indices of the positive-prompt chunks (cond_or_uncond entry 0) of a cond batch."""
    return [i for i, c in enumerate(cond_or_uncond) if c == 0]


# --------------------------------------------------------------------------------------------------------
# CUDA graphs: tensors kept from inside a replayed graph must be copied out of its memory pool

def _slots(c: Any) -> Iterable[tuple[Hashable, Any]]:
    if isinstance(c, list):
        return enumerate(c)
    if isinstance(c, dict):
        return c.items()
    return getattr(c, "__dict__", {}).items()


def kept_tensors(containers: Iterable[Any]) -> dict[tuple[int, Hashable], int]:
    """{(id(container), slot): id(tensor)} of the tensors directly inside `containers`: lists and dicts (a
    patch's sink in transformer_options) and objects' attributes (a patch object's fields)."""
    snap = {}
    for c in containers:
        for k, v in _slots(c):
            if torch.is_tensor(v):
                snap[(id(c), k)] = id(v)
    return snap


def clone_new_tensors(containers: Iterable[Any], before: dict[tuple[int, Hashable], int]) -> int:
    """Clone every tensor put into `containers` since `before`: a patch that keeps a tensor from inside a
    CUDA graph would otherwise see it overwritten by the graph's next replay. Returns how many."""
    n = 0
    for c in containers:
        for k, v in list(_slots(c)):
            if torch.is_tensor(v) and before.get((id(c), k)) != id(v):
                if isinstance(c, (list, dict)):
                    c[k] = v.clone()
                else:
                    setattr(c, k, v.clone())
                n += 1
    return n
