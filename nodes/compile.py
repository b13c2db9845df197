"""SDXLOpt Compile: the patched MODEL on a compiled path (torch.compile, CUDA graphs where the device allows)
that keeps every patch of the pack and of ComfyUI, with no compile in the middle of sampling.

Where it wraps, and why there: ComfyUI core's compile (comfy_api.torch_helpers.set_torch_compile_wrapper)
swaps `diffusion_model` for a compiled module in an APPLY_MODEL wrapper, so the compiled region starts
above the DIFFUSION_MODEL wrappers and traces them: DeepCache's full/shallow choice, counters and caches
read per step become guards that fail, and dynamo recompiles mid-run. This node compiles *below* them:

- DIFFUSION_MODEL wrapper, moved innermost for each run: the wrappers of other nodes (DeepCache, ...) run
  eager and make their per-step decisions; the innermost call (the UNet's own `_forward`, with whatever
  patches the wrappers put into transformer_options) runs compiled. The CFG cutoff decides in
  CALC_COND_BATCH, above all of this, and only changes the batch.
- A compiled entry per (entry point, model layout, settings) and latent size, kept in a process-wide
  bounded cache (ops/compile.py): later runs, clones with other LoRAs or strengths, and other nodes'
  stacking orders reuse it; parameter guards are replaced by a per-run layout check, so patched weights
  never recompile.
- Warm-up: the first UNet call of a run compiles every batch the run will need before the real call (the
  cond-only batch when a CFG cutoff is on the model), so the cutoff's batch change mid-run hits a
  compiled graph. The first call reports its compile time in one log line.
- `transformer_options[KEY]` is the run's CompiledPath; other patches can put their own sub-forwards on
  the compiled path with `path.region(name, fn)` and warm them with `path.warm(...)` (DeepCache's shallow
  forward is the intended user).
- Fallback: a device or torch that cannot compile (CPU, MPS, no Triton, no working compiler), or a
  compile that fails, runs the eager forward instead with one logged line; never an error mid-sampling.

- Conditioning on the GPU: a SAMPLER_SAMPLE wrapper moves the run's encoded conds to the UNet's device once
  (sampler_sample_wrapper), so no UNet call waits on a host-to-device copy.

Wrapper points used (OUTER_SAMPLE, SAMPLER_SAMPLE, DIFFUSION_MODEL) and transformer_options["optimized_attention_override"]
exist in ComfyUI 0.3.75 and in upstream master.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import comfy.conds
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..ops import compile as cops
from ..ops.compile import CompileConfig, CompileRunStats
from . import ADVANCED, CATEGORY
from ._run import per_run_wrapper

log = logging.getLogger(__name__)

KEY = "sdxlopt_compile"  # wrapper key and transformer_options entry holding the run's CompiledPath
PACK_PREFIX = "sdxlopt_"  # the pack's per-run state entries in transformer_options (never read in the forward)
WrappersMP = comfy.patcher_extension.WrappersMP
CORE_COMPILE_KEY = "torch.compile"  # comfy_api.torch_helpers.torch_compile.COMPILE_KEY (APPLY_MODEL)
CFG_CUTOFF_KEY = "sdxlopt_cfg_cutoff"  # nodes/cfg_cutoff.py's transformer_options entry
UNET_ARGS = ("x", "timesteps", "context", "y", "control", "transformer_options")  # UNetModel.forward order
# regional compilation (CompileConfig.regional): the repeated block and what of transformer_options it reads.
# ComfyUI 0.3.75's BasicTransformerBlock.forward reads its block-level patches and attention replacements (keyed
# by the block's position: "block", "block_index") and hands the dict to the attention function, which reads
# "optimized_attention_override". Where the model has none of those patches and no attention override but ours,
# each block sees only REGION_KEYS: the same for every block of one shape, so they are one region.
REGION_BLOCK = getattr(comfy_attention, "BasicTransformerBlock", None)
REGION_KEYS = ("optimized_attention_override",)
BLOCK_PATCHES = ("attn1_patch", "attn2_patch", "attn1_output_patch", "attn2_output_patch", "middle_patch")

CACHE = cops.CompileCache()  # process-wide: compiled artifacts outlive runs, clones and prompts
_LOGGED: set[str] = set()  # one-per-process log lines already written
_LAST_RUN: list[CompileRunStats] = []


def last_run_stats() -> CompileRunStats | None:
    """Statistics of the most recent finished sampling run on a compiled path (tests, bench)."""
    return _LAST_RUN[-1] if _LAST_RUN else None


def _log_once(key: str, level: int, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.log(level, msg, *args)


# ComfyUI attention functions that read free memory per call (psutil / cuda.mem_get_info): a graph break
_UNTRACEABLE_ATTENTION = tuple(getattr(comfy_attention, n) for n in ("attention_sub_quad", "attention_split")
                               if hasattr(comfy_attention, n))


def sdpa_attention_override(func, *args, **kwargs):
    """optimized_attention_override for the compiled path: PyTorch SDPA (traceable) in place of sub-quadratic
    or split attention, whose chunk sizes come from the free memory read at each call."""
    return comfy_attention.attention_pytorch(*args, **kwargs)


def _needs_attention_override(topts: dict) -> bool:
    return ("optimized_attention_override" not in topts
            and getattr(comfy_attention, "optimized_attention", None) in _UNTRACEABLE_ATTENTION)


def _keepers(topts: dict) -> list:
    """Where a patch may keep a tensor from the forward: the patch callables of transformer_options and its
    list/dict values (e.g. DeepCache's per-call sink for the captured features)."""
    objs = [v for k, v in topts.items() if isinstance(v, (list, dict)) and k not in ("patches", "patches_replace")]
    for v in topts.get("patches", {}).values():
        for p in v if isinstance(v, (list, tuple)) else [v]:
            objs.extend(p if isinstance(p, tuple) else [p])
    for v in topts.get("patches_replace", {}).values():
        objs.extend(v.values() if isinstance(v, dict) else [v])
    return objs


_SIMPLE = (int, float, str, bool, type(None))


def _simple(v: Any) -> bool:
    return isinstance(v, _SIMPLE) or (isinstance(v, tuple) and len(v) <= 64 and all(map(_simple, v)))


def _cell(c: Any) -> Any:
    try:
        return c.cell_contents
    except ValueError:  # an empty cell
        return []


def _kind(obj: Any) -> tuple:
    """A patch by what it does: its type or function name, plus its plain settings (attribute or closure
    values that the compiled graph bakes in as constants, e.g. FreeU's factors), never its identity."""
    f = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    name = f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', repr(f))}"
    if hasattr(obj, "__code__"):
        return name, tuple(v for v in map(_cell, obj.__closure__ or ()) if _simple(v))
    attrs = tuple(sorted((k, v) for k, v in getattr(obj, "__dict__", {}).items() if _simple(v)))
    return name, attrs


def _patch_fingerprint(topts: dict) -> tuple:
    """Which kinds of patches the forward runs (type or function name and plain settings, not identity) and
    the transformer_options keys it sees: stacks that differ here get separate entries, so a patch that
    cannot be compiled sends only its own stack to eager, and each entry's recompile budget (8 graphs per
    dynamo cache) holds just the batches of one stack."""
    patches = tuple((k, tuple(_kind(p[1] if isinstance(p, tuple) else p) for p in v)
                     if isinstance(v, (list, tuple)) else _kind(v))
                    for k, v in sorted(topts.get("patches", {}).items()))
    replace = tuple((k, tuple(sorted(map(str, v))) if isinstance(v, dict) else _kind(v))
                    for k, v in sorted(topts.get("patches_replace", {}).items()))
    keys = tuple(sorted(str(k) for k in topts if not str(k).startswith(PACK_PREFIX)))
    return patches, replace, keys


class CompiledPath:
    """The compile settings of one node application and the state of one sampling run.

    The node stores one as a template in transformer_options[KEY]; each run works on `clone()` (fresh
    run state, same settings) and calls `finish()` in `finally`.
    """

    def __init__(self, config: CompileConfig) -> None:
        self.config = config
        self.reset()

    def clone(self) -> CompiledPath:
        return CompiledPath(replace(self.config))

    def reset(self) -> None:
        self.stats = CompileRunStats()
        self.problem: str | None = None  # why this run is eager (None: compiled)
        self.device_type = "cpu"
        self.warmed: set = set()
        self._layouts: dict[int, tuple[int, list]] = {}  # id(module) -> (signature, region blocks), once per run
        self._first_call_graphs = 0
        self._first_call_seconds = 0.0

    # --- run life cycle

    def begin(self, device: torch.device | str) -> None:
        dev = torch.device(device)
        self.device_type = dev.type
        self.problem = cops.compiler_problem(self.config, dev)
        if self.problem:
            self.stats.fallbacks.append(self.problem)
            _log_once(f"problem:{self.problem}", logging.WARNING,
                      "SDXLOpt Compile: running eager (no compiled path): %s.", self.problem)

    def finish(self) -> CompileRunStats:
        stats = self.stats
        _LAST_RUN[:] = [stats]
        (log.warning if stats.sampling_graphs else log.info)(
            "SDXLOpt Compile: %s (%s).", stats.summary(), self.config.describe(self.device_type))
        self.stats = CompileRunStats()
        return stats

    # --- the compiled call

    def _layout(self, module: torch.nn.Module) -> tuple[int, list]:
        layout = self._layouts.get(id(module))
        if layout is None:  # once per run: weights are patched before the first call, not between calls
            layout = self._layouts[id(module)] = cops.module_layout(module, REGION_BLOCK)
        return layout

    def _signature(self, module: Any) -> Any:
        if not isinstance(module, torch.nn.Module):
            return type(module).__qualname__
        return self._layout(module)[0]

    def _entry(self, name: str, fn: Callable, args: tuple, kwargs: dict) -> tuple[cops.CompiledEntry, tuple]:
        tensors = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
        device = tensors[0].device if tensors else torch.device(self.device_type)
        cfg = self.config
        topts = _transformer_options(args, kwargs)
        family = (name, getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)), id(fn),
                  cfg.backend, cfg.effective_mode(device.type), cfg.dynamic, cfg.fullgraph, cfg.regional, str(device),
                  self._signature(args[0]), _patch_fingerprint(topts) if topts is not None else ())
        size = None if cfg.dynamic else cops.tensor_layout_key(args[1:], kwargs)
        kw = cops.compile_kwargs(cfg, device.type)
        entry = CACHE.entry(family, size, lambda f: torch.compile(f, **kw), cfg.cache_size, label=name)
        return entry, (family, size)

    def call(self, name: str, fn: Callable, args: tuple, kwargs: dict, eager: Callable[[], Any]) -> Any:
        """fn(*args, **kwargs) on the compiled path (args[0] is the module); eager() when it cannot be."""
        why = self._eager_reason(args, kwargs)
        if why is not None:
            self.stats.eager_calls += 1
            return eager()
        try:
            entry, key = self._entry(name, fn, args, kwargs)
        except Exception as e:  # our own bookkeeping must never fail the image either
            self._plumbing_failed("preparing the compiled call", e)
            self.stats.eager_calls += 1
            return eager()
        if entry.failed is None and key not in self.warmed:
            self.warmed.add(key)
            if self.config.warmup:
                try:
                    self._warm_variants(entry, fn, args, kwargs)
                except Exception as e:  # no warm-up: that batch compiles when it first comes, still correct
                    self._plumbing_failed("the warm-up of the cond-only batch", e)
            ok, out = self._invoke(entry, fn, args, kwargs, first=True)
            self._report_first_call(name, args, kwargs)
        elif entry.failed is None:
            ok, out = self._invoke(entry, fn, args, kwargs, first=False)
        else:  # failed in an earlier run: straight to eager, and say why in this run's summary
            ok, out = False, None
            if entry.failed not in self.stats.warned:
                self.stats.warned.add(entry.failed)
                self.stats.fallbacks.append(f"{entry.name}: {entry.failed}")
        if not ok:
            self.stats.eager_calls += 1
            return eager()
        self.stats.compiled_calls += 1
        return out

    def _plumbing_failed(self, what: str, e: Exception) -> None:
        reason = f"{what} failed ({cops.root_cause(e)})"
        if reason not in self.stats.warned:
            self.stats.warned.add(reason)
            self.stats.fallbacks.append(reason)
            log.warning("SDXLOpt Compile: %s; that call runs eager. Please report this with the log.", reason)

    def region(self, name: str, fn: Callable) -> Callable:
        """fn on the compiled path, for a patch's own sub-forward (fn(module, ...)); eager on any failure."""
        def run(*args, **kwargs):
            return self.call(name, fn, args, kwargs, eager=lambda: fn(*args, **kwargs))
        return run

    def warm(self, name: str, fn: Callable, *args, **kwargs) -> None:
        """Compile `region(name, fn)` for these inputs (and the cond-only batch when a CFG cutoff is on),
        discarding the output; a no-op when already compiled this run or when the path is eager."""
        if self._eager_reason(args, kwargs) is not None:
            return
        try:
            entry, key = self._entry(name, fn, args, kwargs)
            if entry.failed is not None or key in self.warmed:
                return
            self.warmed.add(key)
            self._warm_variants(entry, fn, args, kwargs)
            wkey = ("warm", cops.tensor_layout_key(args[1:], kwargs))
            if wkey not in entry.warmed:  # an extra forward only the first time in this process
                ok, _ = self._invoke(entry, fn, args, kwargs, first=True)
                if ok:
                    entry.warmed.add(wkey)
            self._report_first_call(name, args, kwargs)
        except Exception as e:  # a warm-up is an optimization: never fail the image over it
            self._plumbing_failed(f"the warm-up of {name}", e)

    # --- helpers

    def _eager_reason(self, args: tuple, kwargs: dict) -> str | None:
        if self.problem:
            return self.problem
        if torch.is_grad_enabled() and any(torch.is_tensor(v) and v.requires_grad
                                           for v in (*args[1:], *kwargs.values())):
            reason = "an input requires grad (a guidance node differentiates through the UNet)"
            if reason not in self.stats.warned:
                self.stats.warned.add(reason)
                self.stats.fallbacks.append(reason)
            return reason
        return None

    def _warm_variants(self, entry: cops.CompiledEntry, fn: Callable, args: tuple, kwargs: dict) -> None:
        """Before the real first call: the cond-only batch a CFG cutoff will switch to (outputs discarded)."""
        topts = _transformer_options(args, kwargs)
        if topts is None or topts.get(CFG_CUTOFF_KEY) is None:
            return
        chunks = list(topts.get("cond_or_uncond") or [])
        keep = cops.positive_chunks(chunks)
        tensors = [v for v in args[1:] if torch.is_tensor(v) and v.ndim > 0]
        if not keep or len(keep) == len(chunks) or not tensors:
            return
        batch = tensors[0].shape[0]
        v_args = tuple(args[:1]) + tuple(cops.chunk_batch(a, batch, len(chunks), keep) for a in args[1:])
        v_kwargs = {k: cops.chunk_batch(v, batch, len(chunks), keep) for k, v in kwargs.items()}
        v_topts = dict(topts)
        v_topts["cond_or_uncond"] = [chunks[i] for i in keep]
        if isinstance(topts.get("uuids"), list) and len(topts["uuids"]) == len(chunks):
            v_topts["uuids"] = [topts["uuids"][i] for i in keep]
        v_args, v_kwargs = _with_transformer_options(v_args, v_kwargs, v_topts)
        vkey = ("variant", tuple(v_topts["cond_or_uncond"]), cops.tensor_layout_key(v_args[1:], v_kwargs))
        if vkey in entry.warmed:  # compiled by an earlier run of this process: no extra forward
            return
        ok, _ = self._invoke(entry, fn, v_args, v_kwargs, first=True)
        if ok:
            entry.warmed.add(vkey)

    def _invoke(self, entry: cops.CompiledEntry, fn: Callable, args: tuple, kwargs: dict,
                first: bool) -> tuple[bool, Any]:
        topts = _transformer_options(args, kwargs)
        if topts is not None:
            args, kwargs = _with_transformer_options(args, kwargs, topts := _forward_options(topts))
        graphs = self.config.uses_cudagraphs(self.device_type)
        objs = _keepers(topts) if graphs and topts is not None else []
        before = cops.kept_tensors(objs)
        grad = torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()
        blocks = self._region_blocks(entry, args[0], topts)
        t0 = time.perf_counter()
        try:
            with grad, cops.nested_regions(blocks, "transformer_options", REGION_KEYS) as n:
                out, rec = cops.timed_call(lambda: entry(fn, args, kwargs))
            self.stats.regional_blocks = max(self.stats.regional_blocks, n)
        except comfy.model_management.InterruptProcessingException:
            raise
        except Exception as e:
            if blocks:  # nested regions failed to compile: the whole forward, traced inline, once more
                entry.regional_failed = cops.compile_error_summary(e)
                self._regional_off(f"{entry.name}: nested regions failed to compile ({entry.regional_failed})",
                                   logging.WARNING)
                if first:  # the failed attempt is part of this call's compile time
                    spent = time.perf_counter() - t0
                    self.stats.warmup_seconds += spent
                    self._first_call_seconds += spent
                return self._invoke(entry, fn, args, kwargs, first)
            # a compile that fails must not fail the image: this entry runs eager
            entry.failed = cops.compile_error_summary(e)
            self.stats.warned.add(entry.failed)
            self.stats.fallbacks.append(f"{entry.name}: {entry.failed}")
            log.warning("SDXLOpt Compile: compiling the %s failed, it runs eager from now on (the image is "
                        "still made): %s. Fix: update torch, or remove the patch named in the error; "
                        "TORCH_LOGS=graph_breaks shows more.", entry.name, entry.failed)
            return False, None
        entry.calls += 1
        if rec.graphs:
            entry.graphs += rec.graphs
            entry.compile_seconds += rec.seconds
            if first:
                self.stats.warmup_graphs += rec.graphs
                self.stats.warmup_seconds += rec.seconds
                self._first_call_graphs += rec.graphs
                self._first_call_seconds += rec.seconds
            else:
                self.stats.sampling_graphs += rec.graphs
                self.stats.sampling_seconds += rec.seconds
                if "recompile" not in self.stats.warned:
                    self.stats.warned.add("recompile")
                    log.warning("SDXLOpt Compile: %s compiled again during sampling (%.1f s): a patch changed "
                                "what the UNet forward does between steps. TORCH_LOGS=recompiles shows why.",
                                entry.name, rec.seconds)
        if first:
            self.stats.warmup_calls += 1
        if graphs:  # a CUDA graph's outputs are overwritten by its next replay: copy what leaves it
            cops.clone_new_tensors(objs, before)
            if torch.is_tensor(out):
                out = out.clone()
        return True, out

    def _region_blocks(self, entry: cops.CompiledEntry, module: Any, topts: dict | None) -> list:
        """The transformer blocks of `module` to run as nested compile regions in this call ([] for none)."""
        if not self.config.regional or entry.regional_failed or REGION_BLOCK is None \
                or not isinstance(module, torch.nn.Module):
            return []
        if not cops.regional_supported():
            self._regional_off(f"torch {torch.__version__} has no torch.compiler.nested_compile_region")
            return []
        if self.config.dynamic:  # tested: a region with symbolic sizes fails to trace (data-dependent guard)
            self._regional_off("dynamic_shapes is on (nested regions compile static shapes only)")
            return []
        why = _regional_refusal(topts or {})
        if why:
            self._regional_off(why)
            return []
        return self._layout(module)[1]

    def _regional_off(self, why: str, level: int = logging.INFO) -> None:
        if why not in self.stats.warned:
            self.stats.warned.add(why)
            self.stats.regional_off.append(why)
            _log_once(f"regional:{why}", level, "SDXLOpt Compile: compiling whole forwards (each transformer "
                      "block traced on its own: a longer first compile, same speed after it): %s.", why)

    def _report_first_call(self, name: str, args: tuple, kwargs: dict | None = None) -> None:
        if self._first_call_graphs:
            x = (kwargs or {}).get("x")
            x = x if torch.is_tensor(x) else next((a for a in args[1:] if torch.is_tensor(a)), None)
            shape = "x".join(str(s) for s in x.shape[2:]) if x is not None else "?"
            log.info("SDXLOpt Compile: compiled the %s for a %s latent in %.1f s (%d graphs: every batch this run "
                     "needs, before the first step); later calls, runs and LoRA changes reuse it.",
                     name, shape, self._first_call_seconds, self._first_call_graphs)
        self._first_call_graphs, self._first_call_seconds = 0, 0.0


def _forward_options(topts: dict) -> dict:
    """The transformer_options the compiled forward sees: without the pack's own per-run state entries
    (sdxlopt_*: read by wrappers outside the forward, never inside it), so adding a CFG cutoff or DeepCache
    node does not change the key set the forward's attention blocks iterate over (a guard), and with SDPA
    attention where the host's choice cannot be compiled."""
    out = {k: v for k, v in topts.items() if not (isinstance(k, str) and k.startswith(PACK_PREFIX))}
    if _needs_attention_override(out):
        _log_once("attention", logging.INFO, "SDXLOpt Compile: the compiled path uses PyTorch SDPA attention "
                  "(the active %s reads free memory at each call, which cannot be compiled).",
                  comfy_attention.optimized_attention.__name__)
        out["optimized_attention_override"] = sdpa_attention_override
    return out


def _regional_refusal(topts: dict) -> str | None:
    """Why the transformer blocks cannot share one region per shape in this forward (None: they can): a patch
    or attention function that may read more of transformer_options than REGION_KEYS (e.g. the block's
    position), which a region does not pass on."""
    patches = topts.get("patches") or {}
    found = [k for k in BLOCK_PATCHES if patches.get(k)]
    if found:
        return f"transformer-block patches ({', '.join(found)}) see each block's position"
    replace = topts.get("patches_replace") or {}
    if replace.get("attn1") or replace.get("attn2"):
        return "attention replacements (patches_replace attn1/attn2) are chosen per block"
    override = topts.get("optimized_attention_override")
    if override is not None and override is not sdpa_attention_override:
        return "an attention override (optimized_attention_override) may read each block's position"
    return None


# --------------------------------------------------------------------------------------------------------
# argument plumbing: UNetModel.forward(x, timesteps, context, y, control, transformer_options, **kwargs)

def _transformer_options(args: tuple, kwargs: dict) -> dict | None:
    topts = kwargs.get("transformer_options")
    if topts is None:
        topts = next((a for a in args[1:] if isinstance(a, dict) and ("patches" in a or "wrappers" in a
                                                                       or KEY in a)), None)
    return topts if isinstance(topts, dict) else None


def _with_transformer_options(args: tuple, kwargs: dict, topts: dict) -> tuple[tuple, dict]:
    if "transformer_options" in kwargs:
        return args, {**kwargs, "transformer_options": topts}
    old = _transformer_options(args, kwargs)
    return tuple(topts if a is old else a for a in args), kwargs


# --------------------------------------------------------------------------------------------------------
# the wrappers

def diffusion_model_wrapper(executor, *args, **kwargs):
    """Innermost DIFFUSION_MODEL wrapper: the UNet's own forward, compiled."""
    module = executor.class_obj
    topts = kwargs.get("transformer_options")
    if topts is None and len(args) > 5:
        topts = args[5]
    path = topts.get(KEY) if isinstance(topts, dict) else None
    original = getattr(executor, "original", None)
    fn = getattr(original, "__func__", None)
    if not isinstance(path, CompiledPath) or fn is None or getattr(original, "__self__", None) is not module:
        return executor(*args, **kwargs)
    if executor.idx != len(executor.wrappers) - 1:  # a wrapper was added inside ours after the run began
        path.stats.eager_calls += 1
        if "not_innermost" not in path.stats.warned:
            path.stats.warned.add("not_innermost")
            path.stats.fallbacks.append("another DIFFUSION_MODEL wrapper runs inside the compiled one")
        return executor(*args, **kwargs)
    if len(args) > len(UNET_ARGS):  # a call shape we do not know
        return executor(*args, **kwargs)
    return path.call("unet", fn, (module, *args), kwargs, eager=lambda: executor(*args, **kwargs))


def _move_innermost(topts: dict) -> None:
    """Our DIFFUSION_MODEL wrapper last in the run's wrapper dict: innermost, below every other node's."""
    dm = topts.get("wrappers", {}).get(WrappersMP.DIFFUSION_MODEL)
    if isinstance(dm, dict) and KEY in dm:
        dm[KEY] = dm.pop(KEY)


def _drop_core_compile(topts: dict) -> None:
    am = topts.get("wrappers", {}).get(WrappersMP.APPLY_MODEL)
    if isinstance(am, dict) and am.pop(CORE_COMPILE_KEY, None) is not None:
        _log_once("core_compile", logging.WARNING,
                  "SDXLOpt Compile: the model also carries ComfyUI's TorchCompileModel; SDXLOpt Compile replaces "
                  "it for this run (compiling twice would retrace every step). Fix: remove one of the two nodes.")


def _begin_run(guider, path: CompiledPath, sigmas) -> None:
    """Our wrapper innermost, core's compile dropped, the compiler checked for this device."""
    topts = guider.model_options["transformer_options"]
    _move_innermost(topts)
    _drop_core_compile(topts)
    path.begin(guider.model_patcher.load_device)


# per run: a fresh CompiledPath, one summary line (finish), reset in finally
outer_sample_wrapper = per_run_wrapper(KEY, CompiledPath, _begin_run, log, end=lambda path: path.finish(),
                                       clock=False)


MOVE_CONDS = True  # sampler_sample_wrapper's move (the bench switches it off to measure what it saves)


def conds_to_device(conds: Any, device: torch.device) -> int:
    """Put the tensors of each cond's model inputs (`model_conds`: the cross-attention context, SDXL's `y`, ...)
    on `device`, in the run's own cond dicts (new CONDRegular objects, values unchanged; the user's
    conditioning is not touched). Returns how many tensors moved."""
    moved = 0
    for entries in (conds.values() if isinstance(conds, dict) else ()):
        for c in (entries if isinstance(entries, list) else ()):
            mc = c.get("model_conds") if isinstance(c, dict) else None
            if not isinstance(mc, dict):
                continue
            new = dict(mc)
            for name, v in mc.items():
                t = getattr(v, "cond", None)
                if isinstance(v, comfy.conds.CONDRegular) and torch.is_tensor(t) and t.device != device:
                    new[name] = v._copy_with(t.to(device))
                    moved += 1
            c["model_conds"] = new
    return moved


def sampler_sample_wrapper(executor, guider, *args, **kwargs):
    """SAMPLER_SAMPLE (after the run's conds are encoded, before the first step): the conds' model inputs on the
    UNet's device, once per run. ComfyUI keeps them where the text encoder left them (CPU) and copies them in
    every UNet call (model_base._apply_model's cast_to_device); a copy from pageable host memory first waits for
    the GPU to finish its queue, so every step the GPU idles while the host prepares the next call. Compiled
    calls are short enough for that to matter (measured: bench/micro/host_gaps.py)."""
    device = getattr(getattr(guider, "model_patcher", None), "load_device", None)
    if device is not None and MOVE_CONDS:
        try:
            moved = conds_to_device(getattr(guider, "conds", None), torch.device(device))
        except Exception as e:  # an optimization: never fail the image over it
            moved = 0
            _log_once("conds", logging.WARNING, "SDXLOpt Compile: could not move the conditioning to the GPU "
                      "(%s); each step copies it, as without this node.", cops.root_cause(e))
        path = (guider.model_options.get("transformer_options") or {}).get(KEY)
        if isinstance(path, CompiledPath):
            path.stats.conds_moved += moved
    return executor(guider, *args, **kwargs)


def apply_compile(model, config: CompileConfig):
    """A clone of `model` on the compiled path; raises ValueError (model unchanged) on bad settings.

    Applying it again replaces the earlier settings (never two compiled paths)."""
    config.validate()
    m = model.clone()
    for wtype in (WrappersMP.OUTER_SAMPLE, WrappersMP.SAMPLER_SAMPLE, WrappersMP.DIFFUSION_MODEL):
        m.remove_wrappers_with_key(wtype, KEY)
    m.model_options.setdefault("transformer_options", {})[KEY] = CompiledPath(config)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, KEY, sampler_sample_wrapper)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    return m


class Compile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptCompile",
            display_name="SDXLOpt Compile (torch.compile + CUDA graphs)",
            category=f"{CATEGORY}/speed",
            description="Runs the UNet compiled (torch.compile; CUDA graphs with reduce-overhead), keeping every "
                        "patch: LoRA, FP8 weights, FreeU, DeepCache, CFG cutoff, in any order. The first step "
                        "of the first run compiles (about 70-90 s per graph for SDXL on an H100 host; the log says how long), including "
                        "the smaller batch a CFG cutoff switches to; later runs, LoRA changes and known sizes "
                        "reuse it. Put it anywhere after the loader. CPU/MPS and failed compiles run eager.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to compile, with any patches. The input model is not "
                                                 "changed; a clone on the compiled path is returned."),
                io.Combo.Input("mode", options=list(cops.MODES), default="reduce-overhead",
                               tooltip="inductor preset. reduce-overhead: compiled kernels replayed as CUDA "
                                       "graphs (fastest for SDXL: removes kernel-launch overhead). default: "
                                       "compiled kernels, no CUDA graphs (less memory). max-autotune(-no-"
                                       "cudagraphs): also benchmarks matmul kernels (compiles several times "
                                       "longer). Off CUDA, the CUDA-graph modes run as their plain variant."),
                io.Boolean.Input("dynamic_shapes", default=False,
                                 tooltip="Off: one graph per latent size (fastest kernels; each new size compiles "
                                         "once, then stays cached). On: one graph for all sizes (no compile on "
                                         "a size change, somewhat slower kernels). Leave off for a fixed "
                                         "resolution."),
                io.Combo.Input("backend", options=list(cops.BACKENDS), default="inductor", **ADVANCED,
                               tooltip="inductor: generated Triton kernels (needs Triton, CUDA). cudagraphs: "
                                       "CUDA graphs of the stock kernels, no Triton needed, short compile. "
                                       "aot_eager: traces and runs the graph without a speed-up (checks that "
                                       "the patches compile, any device)."),
                io.Int.Input("cache_size", default=cops.DEFAULT_CACHE_SIZE, min=1, max=32, **ADVANCED,
                             tooltip="Latent sizes kept compiled per model (static shapes); the least "
                                     "recently used size is dropped beyond it (it would compile again). "
                                     "Ignored with dynamic_shapes."),
                io.Boolean.Input("warmup", default=True, **ADVANCED,
                                 tooltip="On: the first step also compiles the smaller batch a CFG cutoff will "
                                         "use, so no compile happens in the middle of sampling. Off: each "
                                         "batch compiles when first used."),
                io.Boolean.Input("fullgraph", default=False, **ADVANCED,
                                 tooltip="On: any graph break (a patch that cannot be compiled) makes the model "
                                         "run eager and the log names the line; for checking patches. Off: "
                                         "compile around breaks."),
                io.Boolean.Input("regional", default=True, optional=True, **ADVANCED,
                                 tooltip="On: SDXL's 70 transformer blocks are marked as repeated regions "
                                         "(torch.compiler.nested_compile_region), so the compiler reuses one "
                                         "block's work for the others of its shape: a shorter first compile (H100: "
                                         "79 vs 108 s), still one CUDA graph per call, same speed. Models whose "
                                         "attention patches see the block's position compile whole forwards (the "
                                         "log says why), and so does dynamic_shapes. Off: every block traced on its own."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone of the MODEL on the compiled path.")],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, mode: str = "reduce-overhead", dynamic_shapes: bool = False,
                backend: str = "inductor", cache_size: int = cops.DEFAULT_CACHE_SIZE, warmup: bool = True,
                fullgraph: bool = False, regional: bool = True) -> io.NodeOutput:
        config = CompileConfig(backend=backend, mode=mode, dynamic=bool(dynamic_shapes), fullgraph=bool(fullgraph),
                               cache_size=int(cache_size), warmup=bool(warmup), regional=bool(regional))
        return io.NodeOutput(apply_compile(model, config))


NODES = [Compile]
