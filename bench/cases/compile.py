"""Compiled path (SDXLOpt Compile): 50 steps, cfg 5, compiled (inductor + CUDA graphs), alone, with a CFG cutoff
at 50%, with DeepCache (interval 3) + the cutoff, and with fp8 weights; plus the first-call compile time.

Rows use the node's defaults (regional compilation: repeated transformer blocks as nested compile regions)
unless they say otherwise; `plain_whole` is row 1 with regional compilation off; `*_conds_cpu` rows leave the conditioning on the CPU,
copied at every UNet call (the node moves it to the GPU once per run since session 10).
SDXLOPT_BENCH_COMPILE_ROWS picks rows and their order.

Issue 8 targets on an H100/H200 (same run): compiled <= 1.2 s/image; + cutoff 50% <= 0.9 s; + DeepCache 3 +
cutoff <= 0.5 s; fp8 + compile no slower than fp16 + compile; first-call compile <= 90 s.

Each configuration is sampled once untimed (that run compiles: its wall time and compile seconds are the
`first_run_s` / `compile_s` columns), then measured as usual. Compiled graphs are shared process-wide, so a
configuration only compiles what differs from the ones before it (the cutoff row reuses the batch-2 graph of
the first row and adds the cond-only batch; DeepCache's full steps carry its capture patch, a new graph).
Columns `compiled_calls` / `eager_calls` / `recompiles_mid_run` show that every UNet call that reached the
compiled path ran compiled and none compiled mid-sampling. DeepCache's shallow steps do not reach it (they run
eager and are not counted) unless DeepCache puts them on the compiled path (docs/nodes/compile.md).

Memory: every model is unloaded before each configuration (so a row's peak does not count the models of the
rows before it; files before session 7 did count them: their fp8 row's 7.28 GiB held the fp16 base model
too); `residue_gib` is what stayed allocated then (earlier rows' CUDA-graph pools), `model_peak_gib` the
row's allocated peak minus it (replays allocate nothing: the graph pool's temporaries are not in it), and
`model_held_gib` what the allocator held during one more run, pools included, minus what it held before the row.

Unattended: a configuration that fails adds a FAILED row and the others go on; before each configuration
the case checks its time budget (env SDXLOPT_BENCH_COMPILE_BUDGET_S, default 480 s, so that the case fits a
10-minute command with the boot; full SDXL compiles in 60-90 s per graph, the estimate follows the first
row's measured compile time) and skips a row with a note when it would run over. All rows need about 8-9
minutes: run this case in its own command with the budget raised to get them all. --small (tiny UNet, CPU): the
plain row on the aot_eager backend (traces, no speed-up) and the others through the eager fallback that
inductor takes off CUDA, quickly.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from ..common import BenchContext, rel_err

log = logging.getLogger(__name__)

CASE = "compile"
BUDGET_S = float(os.environ.get("SDXLOPT_BENCH_COMPILE_BUDGET_S", "480"))
# rows to run (comma list of Variant keys; default all): a GPU lease has 10-minute commands
ROWS = [r for r in os.environ.get("SDXLOPT_BENCH_COMPILE_ROWS", "").split(",") if r]
EST_GRAPH_S = 90.0  # one new graph of full SDXL (issue 8: 88 s batch 2, 72 s batch 1 on an H200)
EST_RUN_S = 3.5  # one 50-step eager image, for the budget estimate


@dataclass
class Variant:
    key: str  # for SDXLOPT_BENCH_COMPILE_ROWS
    name: str
    build: Callable[[], object]  # () -> MODEL
    new_graphs: int  # graphs it will compile that earlier rows did not (budget estimate)
    config: str
    notes: list[str] = field(default_factory=list)  # filled by build()
    eager: Callable[[], object] | None = None  # () -> the same stack without Compile (rel_err_vs_eager column)


def _compile(model, backend: str, mode: str, regional: bool = True):
    from sdxl_optimizer.nodes import compile as node
    from sdxl_optimizer.ops.compile import CompileConfig

    node.MOVE_CONDS = True  # every row builds through here; a _conds_cpu row switches it off after (_conds_cpu)
    return node.apply_compile(model, CompileConfig(backend=backend, mode=mode, regional=regional))


def _conds_cpu(v: Variant) -> Variant:
    """Row `v` with the conditioning left on the CPU, copied at every UNet call as before session 10: the same
    graphs as `v` (run it right after `v`), so the pair measures what moving the conds saves."""
    def build():
        from sdxl_optimizer.nodes import compile as node

        model = v.build()
        node.MOVE_CONDS = False
        return model

    return Variant(f"{v.key}_conds_cpu", f"{v.name}, conds copied each call", build, 0,
                   f"{v.config}, conds copied per call", eager=v.eager)


def _cutoff(model, fraction: float):
    from sdxl_optimizer.nodes.cfg_cutoff import apply_cfg_cutoff

    return apply_cfg_cutoff(model, fraction)


def _deepcache(model, interval: int):
    from sdxl_optimizer.nodes.deepcache import apply_deepcache
    from sdxl_optimizer.ops.deepcache import DeepCacheConfig

    return apply_deepcache(model, DeepCacheConfig(interval=interval))


def call_timer(model, sink: list):
    """A clone of `model` that records CUDA events around every model call (batch, start, end): GPU time per
    call by batch size without adding a sync (events are read after the run)."""
    import comfy.patcher_extension
    import torch

    def rec(executor, x, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = executor(x, *args, **kwargs)
        end.record()
        sink.append((int(x.shape[0]), start, end))
        return out

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench_call_timer", rec)
    return m


def call_ms_by_batch(sink: list) -> dict:
    """{'ms_per_call_b2': median ms, ...} from call_timer's events (device synchronized by the caller)."""
    import statistics

    by: dict[int, list[float]] = {}
    for b, start, end in sink:
        by.setdefault(b, []).append(start.elapsed_time(end))
    return {f"ms_per_call_b{b}": round(statistics.median(v), 2) for b, v in sorted(by.items())}


def _freeu(model):
    from sdxl_optimizer.nodes.freeu import apply_freeu
    from sdxl_optimizer.ops.freeu import FreeUConfig

    return apply_freeu(model, FreeUConfig.from_preset("SDXL", "v1"), "matmul")


def fp8_model(ctx: BenchContext, base, fused: bool, compute: bool = False) -> tuple[object, str]:
    """The base model's weights as an SDXLOpt FP8 model: e4m3fn Linear/Conv storage (fused Triton matmul,
    per-layer upcast or fp8 compute), built through the loaders' path (model_options custom_operations)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    from sdxl_optimizer.nodes.fp8 import attach_upcast_groups, make_plan, operations_for

    plan = make_plan("auto", fused, compute)
    options = {"custom_operations": operations_for(plan)}
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    if not ctx.small:  # what the UNet loaders do after reading the file
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
        if model is None:
            raise RuntimeError("ComfyUI did not detect the benchmark state dict as SDXL")
        attach_upcast_groups(model)  # as the loaders do (no-ops under compile)
        return model, plan.describe()
    cfg = comfy.supported_models.SDXL(ctx.unet_config)  # the tiny UNet: detection knows full-size SDXL only
    cfg.set_inference_dtype(ctx.dtype, None)
    cfg.custom_operations = options["custom_operations"]
    model = cfg.get_model({})
    model.diffusion_model.load_state_dict(sd)  # quantized on load
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=ctx.device, offload_device=mm.unet_offload_device())
    return patcher, plan.describe()


def variants(ctx: BenchContext, base, cuda: bool) -> list[Variant]:
    backend, mode = ("inductor", "reduce-overhead") if cuda else ("aot_eager", "default")
    # off CUDA only the first row traces (aot_eager); the rest show the eager fallback of the node's default
    later = (backend, mode) if cuda else ("inductor", "reduce-overhead")
    cfg = f"{backend} {mode}" if cuda else "aot_eager (traced, no speed-up)"
    fallback = cfg if cuda else "inductor on CPU -> eager fallback"
    fp8_notes: list[str] = []
    upcast_notes: list[str] = []

    def fp8(fused: bool, notes: list[str], compute: bool = False, patch=lambda m: m):
        model, note = fp8_model(ctx, base, fused, compute)
        notes.append(note)
        return _compile(patch(model), *later)

    compute_notes: list[str] = []

    out = [
        Variant("plain", f"compiled, cfg {ctx.cfg}", lambda: _compile(base, backend, mode), 1, cfg,
                eager=lambda: base),
        # the node's regional compilation off: every transformer block traced on its own (files before session 9)
        Variant("plain_whole", f"compiled, whole forward traced (regional off), cfg {ctx.cfg}",
                lambda: _compile(base, backend, mode, regional=False), 1, f"{cfg}, regional off", eager=lambda: base),
        Variant("cutoff", f"compiled + CFG cutoff 50%, cfg {ctx.cfg}", lambda: _compile(_cutoff(base, 0.5), *later), 1,
                fallback, eager=lambda: _cutoff(base, 0.5)),
        Variant("deepcache_cutoff", f"compiled + DeepCache 3 + CFG cutoff 50%, cfg {ctx.cfg}",
                lambda: _compile(_cutoff(_deepcache(base, 3), 0.5), *later), 2, fallback,
                eager=lambda: _cutoff(_deepcache(base, 3), 0.5)),
        # FreeU's overhead where timings are stable (eager drifts by more than the 3% target)
        Variant("freeu", f"compiled + FreeU SDXL v1 (matmul filter), cfg {ctx.cfg} (vs row 1)",
                lambda: _compile(_freeu(base), *later), 1, fallback),
        # per-layer upcast first: in eager (bench fp8 case, H200) it beat the fused Triton matmul, and compiled
        # its cost is the upcast's memory traffic only (the per-layer Python and launches are gone)
        Variant("fp8", f"fp8 (per-layer upcast) + compiled, cfg {ctx.cfg} (vs fp16 + compiled, row 1)",
                lambda: fp8(False, upcast_notes), 1, fallback, upcast_notes),
    ]
    # fp8 compute (Linear layers on fp8 tensor cores; each row after the first adds only its new batches)
    out += [
        Variant("fp8_compute", f"fp8 compute + compiled, cfg {ctx.cfg} (vs fp16 + compiled, row 1)",
                lambda: fp8(False, compute_notes, True), 1, fallback, compute_notes),
        Variant("fp8_compute_cutoff", f"fp8 compute + compiled + CFG cutoff 50%, cfg {ctx.cfg}",
                lambda: fp8(False, compute_notes, True, lambda m: _cutoff(m, 0.5)), 1, fallback, compute_notes),
        Variant("fp8_compute_deepcache_cutoff", f"fp8 compute + compiled + DeepCache 3 + CFG cutoff 50%, cfg {ctx.cfg}",
                lambda: fp8(False, compute_notes, True, lambda m: _cutoff(_deepcache(m, 3), 0.5)), 2, fallback,
                compute_notes),
    ]
    if cuda:  # lower priority: only if the time budget allows
        out.append(Variant("cudagraphs", f"compiled, cudagraphs backend (no Triton), cfg {ctx.cfg}",
                           lambda: _compile(base, "cudagraphs", "default"), 1, "cudagraphs"))
        out.append(Variant("fp8_fused", f"fp8 (fused Triton matmul) + compiled, cfg {ctx.cfg}", lambda: fp8(True, fp8_notes),
                           1, fallback, fp8_notes))
    out += [_conds_cpu(v) for v in out if v.key in ("plain", "cutoff", "deepcache_cutoff")]
    if not ROWS:
        return out
    by_key = {v.key: v for v in out}  # in the order given: the first row compiles on empty in-process caches
    return [by_key[k] for k in ROWS if k in by_key]


def run(ctx: BenchContext) -> None:
    from sdxl_optimizer.nodes.compile import last_run_stats

    t_start = time.perf_counter()
    cuda = ctx.device.type == "cuda"
    base = ctx.base_model()
    if cuda:  # built on the device: hand it to ComfyUI, so that unloading before each row offloads it too
        import comfy.model_management as mm

        mm.load_models_gpu([base])
    steps = ctx.steps
    per_graph_s = EST_GRAPH_S
    for v in variants(ctx, base, cuda):
        elapsed = time.perf_counter() - t_start
        estimate = (v.new_graphs * per_graph_s if cuda else 0.0) + (2 + ctx.repeat) * EST_RUN_S
        if cuda and elapsed + estimate > BUDGET_S:
            ctx.add_row(CASE, v.name, config=v.config,
                        notes=f"skipped: time budget ({elapsed:.0f} s used, ~{estimate:.0f} s more needed, budget "
                              f"{BUDGET_S:.0f} s; raise SDXLOPT_BENCH_COMPILE_BUDGET_S)")
            continue
        try:
            # a row's peaks count the models of the rows before unless they are unloaded; what stays (earlier
            # rows' CUDA-graph pools, kept by the process-wide compile cache) is subtracted
            residue, residue_held = ctx.clean_start()
            model = v.build()
            t0 = time.perf_counter()
            ctx.sample(model)  # the first run: compiles what this configuration needs
            ctx.sync()
            first_s = time.perf_counter() - t0
            first = last_run_stats()
            later = []

            calls: list = []
            timed = call_timer(model, calls) if cuda else model

            def once(model=timed, later=later, calls=calls):
                calls.clear()
                out = ctx.sample(model)
                later.append(last_run_stats())
                return out

            m = ctx.measure(once)
            extra = {}
            if v.eager is not None:  # the compiled image against the same stack's eager one (same seed)
                extra["rel_err_vs_eager"] = rel_err(m.result, ctx.sample(v.eager()))
            held = ctx.held_gib(lambda m=model: ctx.sample(m))  # counts the CUDA-graph pool a replay runs in
            per_call = call_ms_by_batch(calls) if cuda else {}
            last = later[-1]
            if first.warmup_graphs and first.warmup_seconds > 0:
                per_graph_s = first.warmup_seconds / first.warmup_graphs
            notes = "; ".join([*v.notes[-1:], *first.fallbacks])
            ctx.add_row(CASE, v.name, m, steps=steps, config=v.config,
                        residue_gib=round(residue, 3), model_peak_gib=round(m.peak_gib - residue, 3),
                        model_held_gib=round(held - residue_held, 3) if cuda else 0.0,
                        first_run_s=round(first_s, 2),
                        compile_s=round(first.warmup_seconds, 2),
                        graphs_first_run=first.warmup_graphs + first.sampling_graphs,
                        graphs_later_runs=sum(r.warmup_graphs + r.sampling_graphs for r in later),
                        recompiles_mid_run=first.sampling_graphs + sum(r.sampling_graphs for r in later),
                        compiled_calls=last.compiled_calls, eager_calls=last.eager_calls, **per_call, **extra,
                        notes=notes)
            if os.environ.get("SDXLOPT_BENCH_COMPILE_TIMES") == "1":  # where compile time goes (cumulative)
                import torch._dynamo.utils

                print(f"[compile times after {v.key}]\n{torch._dynamo.utils.compile_times(repr='str', aggregate=True)}",
                      flush=True)
        except Exception as e:  # one broken configuration must not lose the others' figures
            traceback.print_exc()
            ctx.add_row(CASE, v.name, config=v.config, notes=f"FAILED: {type(e).__name__}: {e}"[:300])
    first_rows = [r for r in ctx.rows if r.get("case") == CASE and r.get("compile_s")]
    if first_rows:
        r = first_rows[0]
        ctx.add_row(CASE, "first-call compile (row 1: batch 2, before the first step)", config=r.get("config"),
                    compile_s=r["compile_s"], first_run_s=r["first_run_s"],
                    notes="reported once in the log: 'SDXLOpt Compile: compiled the unet for a ... latent in N s'")
