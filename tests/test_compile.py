"""SDXLOpt Compile: compiled == eager for each pack node and the full stack in several orders (tiny UNet, CPU,
backend aot_eager, fullgraph=True: any graph break fails the test), zero recompiles after the first call
(CFG cutoff, DeepCache, LoRA strength, weight patches), compiled graphs reused across runs and clones, one
compile per new resolution, the eager fallbacks, and isolation.

Compile time dominates this file, so the UNet is smaller than the suite's tiny one (2 levels, 1 res block
each, transformers at the lower level and in the middle: ~4x fewer ops), and tests share the process-wide
compiled-graph cache on purpose (that reuse is one of the things tested). Counts are deltas of dynamo's
own counter (`unique_graphs`).
"""
from __future__ import annotations

import logging

import comfy.lora
import comfy.model_management
import comfy.sample
import comfy.sd
import pytest
import torch

from sdxl_optimizer.nodes import compile as ncomp
from sdxl_optimizer.nodes.compile import KEY, Compile, apply_compile, last_run_stats, sdpa_attention_override
from sdxl_optimizer.ops import compile as ocomp
from sdxl_optimizer.ops.compile import CompileConfig, graphs_compiled
from tinymodels import bridge, factories

SMALL_UNET = dict(factories.TINY_UNET_CONFIG, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
                  transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1)
TEST_CONFIG = CompileConfig(backend="aot_eager", mode="default", fullgraph=True)
POS = factories.random_conditioning(11)
NEG = factories.random_conditioning(12)
STEPS = 3
DC_STEPS = 5  # cutoff 0.5 + DeepCache interval 2: full and shallow steps both before and after the cutoff
SIZE = 8
TOL = 1e-4  # compiled vs eager: same kernels under aot_eager, only the order of a few reductions differs


# ---------------------------------------------------------------- helpers

def compiled(model, **kw):
    return apply_compile(model, CompileConfig(**{**TEST_CONFIG.__dict__, **kw}))


def eager(model):
    """The eager reference: the same model with the attention the compiled path uses (SDPA; on CPU the host
    picks sub-quadratic attention, which reads free memory per call and cannot be compiled)."""
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sdpa_attention_override
    return m


def sample(model, steps: int = STEPS, cfg: float = 5.0, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", POS, NEG, latent, disable_pbar=True,
                               seed=seed)


def run_counted(model, **kw) -> tuple[torch.Tensor, int, ocomp.CompileRunStats]:
    """(output, graphs dynamo compiled during the run, the run's compile statistics)."""
    g0 = graphs_compiled()
    out = sample(model, **kw)
    return out, graphs_compiled() - g0, last_run_stats()


def assert_all_compiled(stats: ocomp.CompileRunStats, recompiles: int = 0) -> None:
    assert stats.fallbacks == [], f"expected no eager fallback, got {stats.fallbacks}"
    assert stats.eager_calls == 0 and stats.compiled_calls > 0, \
        f"expected every UNet call compiled, got {stats.compiled_calls} compiled, {stats.eager_calls} eager"
    assert stats.sampling_graphs == recompiles, \
        f"expected {recompiles} compiles during sampling (after the first call), got {stats.sampling_graphs}"


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = bridge.rel_err(a, b)
    assert err < tol, f"expected compiled == eager (rel err < {tol}), got {err:.3g}"


def tiny_lora(patcher, seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA on the 2-D transformer weights of the UNet (ComfyUI's own key map)."""
    gen = torch.Generator().manual_seed(seed)
    msd = patcher.model.state_dict()
    sd = {}
    for name, key in comfy.lora.model_lora_keys_unet(patcher.model, {}).items():
        if not name.startswith("lora_unet_") or "transformer_blocks" not in name or msd[key].ndim != 2:
            continue
        out_f, in_f = msd[key].shape
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.5 / rank**0.5
    assert sd, "expected LoRA keys for the tiny UNet, got none"
    return sd


def with_lora(model, lora: dict, strength: float):
    return comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)[0]


def deepcache(model, interval: int = 2):
    from sdxl_optimizer.nodes.deepcache import apply_deepcache
    from sdxl_optimizer.ops.deepcache import DeepCacheConfig

    return apply_deepcache(model, DeepCacheConfig(interval=interval))


def cfg_cutoff(model, fraction: float = 0.5):
    from sdxl_optimizer.nodes.cfg_cutoff import apply_cfg_cutoff

    return apply_cfg_cutoff(model, fraction)


def freeu(model):
    from sdxl_optimizer.nodes.freeu import apply_freeu
    from sdxl_optimizer.ops.freeu import FreeUConfig

    return apply_freeu(model, FreeUConfig.from_preset("SDXL"))


def fp8_model(seed: int = 0):
    from sdxl_optimizer.nodes.fp8 import fp8_operations

    return factories.tiny_unet(seed, unet_config=SMALL_UNET,
                               model_options={"custom_operations": fp8_operations(torch.float8_e4m3fn)})


def options_snapshot(model) -> str:
    return repr((model.model_options, {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in model.wrappers.items()},
                 sorted(model.patches)))


@pytest.fixture(scope="module")
def small():
    return factories.tiny_unet(0, unet_config=SMALL_UNET)


@pytest.fixture(scope="module")
def plain_run(small):
    """The plain model compiled once (the first compile of the file) and its eager reference."""
    out, graphs, stats = run_counted(compiled(small))
    return out, graphs, stats, sample(eager(small))


# ---------------------------------------------------------------- ops (no compile)

def test_config_maps_to_torch_compile_arguments_per_device():
    c = CompileConfig()
    assert c.effective_mode("cuda") == "reduce-overhead" and c.uses_cudagraphs("cuda")
    assert c.effective_mode("cpu") == "default" and not c.uses_cudagraphs("cpu")
    assert CompileConfig(mode="max-autotune").effective_mode("mps") == "max-autotune-no-cudagraphs"
    assert CompileConfig(backend="cudagraphs").uses_cudagraphs("cuda")
    assert CompileConfig(backend="aot_eager").effective_mode("cuda") is None
    kw = ocomp.compile_kwargs(c, "cuda")
    assert "mode" not in kw and kw["options"].get("triton.cudagraphs") is True and kw["dynamic"] is False
    if ocomp.guard_filter_supported():
        assert kw["options"]["guard_filter_fn"] is ocomp.drop_parameter_guards
    for bad, what in ((dict(backend="tensorrt_magic"), "backend"), (dict(mode="fast"), "mode"),
                      (dict(cache_size=0), "cache_size")):
        with pytest.raises(ValueError, match=what) as e:
            CompileConfig(**bad).validate()
        assert "Fix:" in str(e.value)


def test_parameter_guards_are_dropped_and_the_layout_signature_replaces_them():
    p = torch.nn.Parameter(torch.ones(2))
    entries = [type("E", (), {"guard_type": t, "value": v})() for t, v in
               (("TENSOR_MATCH", p), ("TENSOR_MATCH", torch.ones(2)), ("ID_MATCH", p))]
    assert ocomp.drop_parameter_guards(entries) == [False, True, True]
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    assert ocomp.module_layout(a)[0] == ocomp.module_layout(b)[0]  # other values, same layout
    b.weight = torch.nn.Parameter(b.weight.detach().half())
    assert ocomp.module_layout(a)[0] != ocomp.module_layout(b)[0]


def test_module_layout_walks_once_for_the_signature_and_the_region_blocks():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(4, 4)))
    net.register_buffer("scale", torch.ones(4))
    sig, blocks = ocomp.module_layout(net, torch.nn.Linear)
    assert blocks == [net[0], net[1][1]]  # module order
    assert ocomp.module_layout(net) == (sig, [])  # no block type: the same signature, no blocks
    net.scale = torch.ones(4, dtype=torch.float16)  # a buffer's dtype is part of the layout
    assert ocomp.module_layout(net)[0] != sig
    net.scale = torch.ones(4)
    net[1][1].weight = torch.nn.Parameter(torch.zeros(4, 4).t())  # so is a parameter's stride
    assert ocomp.module_layout(net)[0] != sig


def test_cache_is_bounded_per_family_and_each_entry_has_its_own_code_object():
    cache = ocomp.CompileCache(max_families=2)
    made = []

    def comp(fn):
        made.append(fn)
        return fn

    e1 = cache.entry("fam", (8, 8), comp, cache_size=2)
    assert cache.entry("fam", (8, 8), comp, cache_size=2) is e1 and len(made) == 1
    cache.entry("fam", (16, 16), comp, cache_size=2)
    cache.entry("fam", (8, 8), comp, cache_size=2)  # most recent again
    cache.entry("fam", (24, 24), comp, cache_size=2)  # drops (16, 16), the least recently used
    assert list(cache.families["fam"]) == [(8, 8), (24, 24)]
    assert len({f.__code__ for f in made}) == len(made) == 3
    cache.entry("a", None, comp, 1)
    cache.entry("b", None, comp, 1)
    assert list(cache.families) == ["a", "b"]
    assert e1(lambda x, y=0: x + y, (1,), {"y": 2}) == 3


def test_nested_regions_set_and_restore_block_forwards_and_pass_only_the_kept_options():
    class Block(torch.nn.Module):
        def forward(self, x, transformer_options=None):
            return x + len(transformer_options or {})

    blocks = [Block() for _ in range(3)]
    own = blocks[2].forward = lambda x, transformer_options=None: x * 0  # someone else's instance patch
    x = torch.zeros(2)
    with pytest.raises(RuntimeError, match="boom"):
        with ocomp.nested_regions(blocks, "transformer_options", ["keep"]) as n:
            assert n == 2, f"expected the 2 blocks without an own forward set, got {n}"
            assert blocks[0].forward.__func__ is blocks[1].forward.__func__, "expected one region function"
            out = blocks[0](x, transformer_options={"keep": 1, "block": ("input", 4), "uuids": [1, 2]})
            assert torch.equal(out, x + 1), "expected the block to see only the kept entry"
            assert blocks[2].forward is own
            raise RuntimeError("boom")  # a failing compiled call: the forwards are restored all the same
    assert "forward" not in blocks[0].__dict__ and "forward" not in blocks[1].__dict__
    assert blocks[2].forward is own
    assert torch.equal(blocks[0](x, transformer_options={"a": 1, "b": 2}), x + 2)


def test_chunks_of_a_cond_batch_and_cudagraph_output_copies():
    x = torch.arange(6.0).reshape(6, 1)  # 2 chunks of 3 rows
    assert ocomp.positive_chunks([1, 0]) == [1]
    got = ocomp.chunk_batch({"a": [x, None], "b": torch.ones(2)}, 6, 2, [1])
    assert got["a"][0].tolist() == [[3.0], [4.0], [5.0]] and got["a"][1] is None and got["b"].shape == (2,)

    class Keeper:
        def __init__(self):
            self.kept = None

    k, sink, old = Keeper(), [3, None], torch.zeros(1)
    box = {"old": old}
    before = ocomp.kept_tensors([k, sink, box])
    k.kept = t = torch.ones(3)
    sink[1] = u = torch.ones(2)
    assert ocomp.clone_new_tensors([k, sink, box], before) == 2
    assert k.kept is not t and torch.equal(k.kept, t) and sink[1] is not u and box["old"] is old


# ---------------------------------------------------------------- compiled == eager, recompiles, reuse

def test_plain_model_compiled_equals_eager_and_the_first_call_reports_seconds(plain_run, small, caplog):
    out, graphs, stats, ref = plain_run
    close(out, ref)
    assert_all_compiled(stats)
    assert stats.warmup_graphs >= 1 and stats.warmup_seconds > 0, "expected the compile in the first call"
    caplog.set_level(logging.INFO)
    again, graphs2, stats2 = run_counted(compiled(small))  # another node application, same model: reused
    assert graphs2 == 0 and stats2.warmup_graphs == 0, f"expected the compiled graphs reused, got {graphs2} new"
    assert torch.equal(again, out)
    assert any("no compile (reused compiled graphs)" in r.getMessage() for r in caplog.records)


def test_lora_strength_and_weight_patches_do_not_recompile(plain_run, small):
    lora = tiny_lora(small, seed=5)
    outs = []
    for strength in (0.5, 1.0):
        out, graphs, stats = run_counted(compiled(with_lora(small, lora, strength)))
        assert graphs == 0, f"expected no recompile for LoRA strength {strength}, got {graphs} graphs"
        assert_all_compiled(stats)
        outs.append(out)
    close(outs[1], sample(eager(with_lora(small, lora, 1.0))))
    assert not torch.equal(outs[0], outs[1]), "expected the strength change to reach the compiled graph"
    m = small.clone()  # a plain weight patch ("diff") on one layer
    key = "diffusion_model.input_blocks.0.0.weight"
    m.add_patches({key: (torch.full_like(small.model.state_dict()[key], 0.01),)}, 1.0)
    out, graphs, stats = run_counted(compiled(m))
    assert graphs == 0, f"expected no recompile for a weight patch, got {graphs}"
    close(out, sample(eager(m)))
    assert not torch.equal(out, plain_run[0])


def test_cfg_cutoff_compiles_both_batches_first_and_never_mid_run(plain_run, small):
    m = compiled(cfg_cutoff(small, 0.5))
    out, graphs, stats = run_counted(m)
    close(out, sample(eager(cfg_cutoff(small, 0.5))))
    assert_all_compiled(stats)
    assert graphs == 1 and stats.warmup_graphs == 1, \
        f"expected exactly the cond-only batch compiled, in the first call, got {graphs} ({stats})"
    out2, graphs2, stats2 = run_counted(compiled(cfg_cutoff(small, 0.5)))  # cutoff node before or after
    assert graphs2 == 0 and torch.equal(out2, out)
    out3, graphs3, _ = run_counted(cfg_cutoff(compiled(small), 0.5))
    assert graphs3 == 0 and torch.equal(out3, out)


def test_deepcache_runs_full_steps_compiled_and_never_recompiles(plain_run, small, caplog):
    caplog.set_level(logging.INFO)
    ref = sample(eager(deepcache(small, 2)), steps=DC_STEPS)
    out, graphs, stats = run_counted(compiled(deepcache(small, 2)), steps=DC_STEPS)
    close(out, ref)
    assert_all_compiled(stats)
    # every call on the compiled path: the 3 full steps and the 2 shallow ones (DeepCache's own region)
    assert stats.compiled_calls == 5, f"expected all 5 UNet calls (3 full, 2 shallow) compiled, got {stats}"
    assert stats.sampling_graphs == 0, f"expected no compile during sampling, got {stats}"
    assert any("2/5 UNet calls took the shallow path" in r.getMessage() for r in caplog.records)
    out2, graphs2, _ = run_counted(deepcache(compiled(small), 2), steps=DC_STEPS)  # the other order
    assert graphs2 == 0 and torch.equal(out2, out)


def test_freeu_compiled_equals_eager(plain_run, small):
    out, graphs, stats = run_counted(compiled(freeu(small)))
    close(out, sample(eager(freeu(small))))
    assert_all_compiled(stats)
    out2, graphs2, _ = run_counted(freeu(compiled(small)))
    assert graphs2 == 0 and torch.equal(out2, out)


def test_fp8_weights_compiled_equal_eager():
    m8 = fp8_model(0)
    out, graphs, stats = run_counted(compiled(m8))
    close(out, sample(eager(m8)))
    assert_all_compiled(stats)
    assert graphs >= 1, "expected the fp8 layout compiled as its own family"


def test_fp8_compute_compiled_equals_eager_with_scaled_mm_in_the_graph():
    """The fp8-compute layers (torch._scaled_mm, fp16 activations) trace without a break and compute on the
    compiled path what they compute eagerly; the compiled graph holds the fp8 matmuls."""
    from sdxl_optimizer.nodes.fp8 import fp8_operations

    ops = fp8_operations(torch.float8_e4m3fn, compute=True)
    m = factories.tiny_unet(0, unet_config=SMALL_UNET, dtype=torch.float16, model_options={"custom_operations": ops})
    storage = factories.tiny_unet(0, unet_config=SMALL_UNET, dtype=torch.float16,
                                  model_options={"custom_operations": fp8_operations(torch.float8_e4m3fn)})
    out, graphs, stats = run_counted(compiled(m))
    ref = sample(eager(m))
    close(out, ref, tol=2e-3)  # fp16 compute: a few reductions in another order
    assert_all_compiled(stats)
    assert bridge.rel_err(ref, sample(eager(storage))) > 1e-3, "expected the fp8 compute path to have run"
    ops_seen = []

    def backend(gm, example_inputs):
        ops_seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    unet = m.model.diffusion_model
    inp = {k: v.half() if v.is_floating_point() else v for k, v in bridge.random_unet_inputs(0, 2, 16).items()}
    topts = {"optimized_attention_override": sdpa_attention_override}
    fn = torch.compile(ocomp.fresh_function(ocomp._trampoline, "sdxlopt_fp8_compute_probe"), backend=backend,
                       fullgraph=True)
    with torch.no_grad():
        fn(type(unet)._forward, (unet, inp["x"], inp["t"], inp["context"], inp["y"], None, topts), {})
    assert any("_scaled_mm" in t for t in ops_seen), "expected torch._scaled_mm in the traced UNet forward"
    linears = sum(isinstance(mod, torch.nn.Linear) for mod in unet.modules())
    assert sum("_scaled_mm" in t for t in ops_seen) == linears, "every Linear on fp8, whatever its row count"
    made = [t for t in ops_seen if "ones" in t or "full" in t]
    assert not made, f"expected no scale made in the graph (each layer's fp8_scale is an input), got {made[:3]}"


def test_full_stack_in_any_order_equals_eager_with_one_compile_per_batch():
    base = fp8_model(0)
    lora = tiny_lora(base, seed=7)
    stacks = {
        "compile last": lambda m: compiled(cfg_cutoff(deepcache(freeu(with_lora(m, lora, 0.8)), 2), 0.5)),
        "compile first": lambda m: with_lora(deepcache(cfg_cutoff(freeu(compiled(m)), 0.5), 2), lora, 0.8),
        "compile middle": lambda m: cfg_cutoff(freeu(compiled(deepcache(with_lora(m, lora, 0.8), 2))), 0.5),
    }
    ref = sample(eager(cfg_cutoff(deepcache(freeu(with_lora(base, lora, 0.8)), 2), 0.5)), steps=DC_STEPS)
    outs, total = [], 0
    for name, build in stacks.items():
        out, graphs, stats = run_counted(build(base), steps=DC_STEPS)
        try:
            assert_all_compiled(stats)
            close(out, ref)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        outs.append(out)
        total += graphs
    # full and shallow DeepCache paths, each at batch 2 and the cond-only batch, all in the first order's run
    assert total == 4, f"expected 4 compiles in all (full/shallow x batch 2/cond-only, first order), got {total}"
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_deepcache_shallow_forward_compiles_as_a_region_without_graph_breaks(small):
    """DeepCache's shallow UNet forward (nodes/deepcache.py) through CompiledPath.region with fullgraph=True:
    the entry point DeepCache can use to put its shallow steps on the compiled path."""
    from sdxl_optimizer.nodes import deepcache as dcn
    from sdxl_optimizer.ops.deepcache import shallow_plan

    unet = small.model.diffusion_model
    path = ncomp.CompiledPath(TEST_CONFIG)
    path.begin("cpu")
    n_input, first_output = shallow_plan(0, dcn.num_skips(unet))
    tidx = dcn.transformer_index_before_output(unet, first_output)
    inp = bridge.random_unet_inputs(3, 2, SIZE)
    kept = []

    def capture(h, hsp, transformer_options):  # the features entering the shallow path's first output block
        if transformer_options["block"] == ("output", first_output):
            kept.append(h.clone())
        return h, hsp

    with torch.no_grad():
        unet._forward(inp["x"], inp["t"], inp["context"], inp["y"], None,
                      {"patches": {"output_block_patch": [capture]},
                       "optimized_attention_override": sdpa_attention_override})
        cached = kept[0]

        def args(seed):
            x = inp["x"] + 0.01 * torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(seed))
            return (unet, cached, n_input, first_output, tidx, x), dict(
                timesteps=inp["t"], context=inp["context"], y=inp["y"], control=None,
                transformer_options={"patches": {}, "optimized_attention_override": sdpa_attention_override})

        region = path.region("deepcache_shallow", dcn.shallow_unet_forward)
        g0 = graphs_compiled()
        for seed in (1, 2, 3):
            a, k = args(seed)
            close(region(*a, **k), dcn.shallow_unet_forward(*args(seed)[0], **args(seed)[1]))
    assert graphs_compiled() - g0 == 1, "expected one graph for the shallow forward, reused on later calls"
    assert path.stats.compiled_calls == 3 and path.stats.fallbacks == []


def test_a_new_resolution_compiles_once_and_known_ones_are_reused(plain_run, small):
    out, graphs, stats = run_counted(compiled(small), size=12)
    assert graphs == 1 and stats.warmup_graphs == 1, f"expected one compile for 12x12, got {graphs}"
    close(out, sample(eager(small), size=12))
    _, graphs8, _ = run_counted(compiled(small))
    _, graphs12, _ = run_counted(compiled(small), size=12)
    assert graphs8 == graphs12 == 0, f"expected known sizes reused, got {graphs8}, {graphs12} new graphs"


# ---------------------------------------------------------------- regional compilation (repeated blocks once)

REGIONAL_UNET = dict(SMALL_UNET, transformer_depth=[0, 3], transformer_depth_output=[0, 0, 3, 3],
                     transformer_depth_middle=3)  # 12 transformer blocks of one shape


def traced_ops() -> int:
    """Calls dynamo has traced into graphs in this process so far (its `calls_captured` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["calls_captured"])


def blocks_of(model) -> list:
    import comfy.ldm.modules.attention as attention

    return [m for m in model.model.diffusion_model.modules() if isinstance(m, attention.BasicTransformerBlock)]


@pytest.fixture(scope="module")
def deep():
    return factories.tiny_unet(1, unet_config=REGIONAL_UNET)


def test_regional_traces_one_block_per_shape_and_equals_the_whole_forward(deep):
    """12 transformer blocks as nested compile regions: dynamo traces about a quarter of the ops the whole
    forward needs, the output is the eager one, a second run and a LoRA reuse the graphs, and no block keeps
    the forward the compiled call gave it."""
    ref = sample(eager(deep))
    t0 = traced_ops()
    whole, _, whole_stats = run_counted(compiled(deep, regional=False))
    t1 = traced_ops()
    out, graphs, stats = run_counted(compiled(deep))
    t2 = traced_ops()
    close(whole, ref)
    close(out, ref)
    assert_all_compiled(stats)
    assert whole_stats.regional_blocks == 0 and stats.regional_blocks == 12 and stats.regional_off == [], \
        f"expected 12 blocks as regions (none when off), got {stats.regional_blocks} ({stats.regional_off})"
    whole_ops, regional_ops = t1 - t0, t2 - t1
    assert regional_ops < 0.5 * whole_ops, \
        f"expected the regional trace under half the whole one, got {regional_ops} vs {whole_ops} ops"
    assert graphs == 1, f"expected the regional forward to be one graph, got {graphs}"
    assert all("forward" not in b.__dict__ for b in blocks_of(deep)), "expected every block's forward restored"
    again, graphs2, _ = run_counted(compiled(with_lora(deep, tiny_lora(deep, seed=3), 0.7)))
    assert graphs2 == 0, f"expected a LoRA to reuse the regional graph, got {graphs2} new graphs"
    close(again, sample(eager(with_lora(deep, tiny_lora(deep, seed=3), 0.7))))


def test_regional_stacks_with_cutoff_deepcache_and_freeu_without_recompiles(deep):
    build = lambda m: cfg_cutoff(deepcache(freeu(m), 2), 0.5)  # noqa: E731
    ref = sample(eager(build(deep)), steps=DC_STEPS)
    out, graphs, stats = run_counted(compiled(build(deep)), steps=DC_STEPS)
    close(out, ref)
    assert_all_compiled(stats)
    assert stats.regional_blocks == 12
    out2, graphs2, stats2 = run_counted(compiled(build(deep)), steps=DC_STEPS)
    assert graphs2 == 0 and stats2.sampling_graphs == 0 and torch.equal(out2, out)


def test_dynamic_shapes_compile_whole_forwards_one_graph_for_two_sizes(deep):
    """A nested region with symbolic sizes fails to trace (tested: a data-dependent guard), so dynamic_shapes
    skips regions, says so, and still serves two latent sizes with one graph."""
    assert ocomp.compiler_problem(TEST_CONFIG, "cpu") is None  # the one-time self-test: not counted below
    out14, graphs14, stats = run_counted(compiled(deep, dynamic=True), size=14)
    out16, graphs16, stats16 = run_counted(compiled(deep, dynamic=True), size=16)
    close(out14, sample(eager(deep), size=14))
    close(out16, sample(eager(deep), size=16))
    assert_all_compiled(stats)
    assert_all_compiled(stats16)
    assert stats.regional_blocks == 0 and stats.regional_off == ["dynamic_shapes is on (nested regions compile "
                                                                 "static shapes only)"], stats.regional_off
    assert graphs14 == 1 and graphs16 == 0, f"expected one symbolic graph for both sizes, got {graphs14} + {graphs16}"


def test_regional_is_refused_where_a_block_patch_reads_the_position_and_the_log_says_why(deep, caplog):
    caplog.set_level(logging.INFO)

    def attn1_patch(n, context_attn1, value_attn1, extra_options):  # reads the block's position
        return n * (1.0 + 0.1 * extra_options["block_index"]), context_attn1, value_attn1

    m = deep.clone()
    m.set_model_attn1_patch(attn1_patch)
    ref = sample(eager(m))
    out, _, stats = run_counted(compiled(m))
    close(out, ref)
    assert_all_compiled(stats)
    assert stats.regional_blocks == 0 and len(stats.regional_off) == 1 and "attn1_patch" in stats.regional_off[0]
    assert bridge.rel_err(ref, sample(eager(deep))) > 1e-3, "expected the patch to change the output"
    assert any("compiling whole forwards" in r.getMessage() and "attn1_patch" in r.getMessage()
               for r in caplog.records)


def test_a_region_that_fails_to_compile_compiles_the_whole_forward_instead(deep, monkeypatch, caplog):
    """A nested region whose trace breaks (fullgraph=True makes it an error): the same call retries without
    regions, the image is the eager one, every call compiled, and the blocks are restored."""
    import contextlib

    import torch._dynamo

    real = ocomp.nested_regions

    @contextlib.contextmanager
    def breaking_regions(blocks, options_kwarg, keep):
        def broken(self, *args, **kwargs):
            torch._dynamo.graph_break()
            return type(self).forward(self, *args, **kwargs)

        with real(blocks, options_kwarg, keep) as n:
            for b in blocks:
                b.forward = broken.__get__(b)
            yield n

    monkeypatch.setattr(ocomp, "nested_regions", breaking_regions)
    caplog.set_level(logging.WARNING)
    m = eager(deep)
    m.set_model_input_block_patch(lambda h, transformer_options: h * 1.0)  # a stack of its own
    out, _, stats = run_counted(compiled(m))
    close(out, sample(m))
    assert_all_compiled(stats)
    assert len(stats.regional_off) == 1 and "nested regions failed" in stats.regional_off[0], stats.regional_off
    assert any("nested regions failed" in r.getMessage() for r in caplog.records)
    assert all("forward" not in b.__dict__ for b in blocks_of(deep))


def test_conds_move_to_the_unet_device_once_per_run_in_new_cond_objects():
    import comfy.conds

    ctx, y = torch.randn(1, 77, 8), torch.randn(1, 16)
    const = comfy.conds.CONDConstant(3)
    original = {"c_crossattn": comfy.conds.CONDCrossAttn(ctx), "y": comfy.conds.CONDRegular(y), "n": const}
    cond = {"model_conds": original, "cross_attn": ctx}
    conds = {"positive": [cond], "negative": [{"model_conds": {}}]}
    assert ncomp.conds_to_device(conds, torch.device("meta")) == 2
    moved = cond["model_conds"]
    assert moved is not original and original["c_crossattn"].cond is ctx and original["y"].cond is y
    assert isinstance(moved["c_crossattn"], comfy.conds.CONDCrossAttn) and moved["c_crossattn"].cond.is_meta
    assert moved["y"].cond.is_meta and moved["n"] is const and cond["cross_attn"] is ctx
    assert ncomp.conds_to_device(conds, torch.device("meta")) == 0  # already there


def test_the_run_hands_its_encoded_conds_to_the_device_move_before_the_first_step(small, monkeypatch):
    seen = []
    real = ncomp.conds_to_device

    def spy(conds, device):
        seen.append({k: [sorted(c["model_conds"]) for c in v] for k, v in conds.items()})
        return real(conds, device)

    monkeypatch.setattr(ncomp, "conds_to_device", spy)
    out, _, stats = run_counted(compiled(small))
    assert len(seen) == 1, f"expected one move per run, got {len(seen)}"
    assert all("c_crossattn" in names and "y" in names for v in seen[0].values() for names in v), seen
    assert stats.conds_moved == 0  # CPU: already on the UNet's device


def _cpu_tensors_in_graph(model, transformer_options: dict) -> list[str]:
    """Trace the model's forward on the meta device (a stand-in for a GPU) with a capturing backend and list
    the graph nodes that make CPU tensors: inductor skips CUDA graphs for a graph with any."""
    import torch._dynamo

    found = []

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            v = n.meta.get("example_value", n.meta.get("val"))
            if torch.is_tensor(v) and v.device.type == "cpu":
                frame = (n.meta.get("stack_trace") or "").strip().splitlines()
                found.append(f"{n.target} at {frame[-2].strip() if len(frame) > 1 else '?'}")
        return gm.forward

    unet = model.model.diffusion_model.to("meta")  # a fresh model of this test, nobody else's
    inp = {k: v.to("meta") for k, v in bridge.random_unet_inputs(0, 2, 16).items()}
    topts = {**transformer_options, "optimized_attention_override": sdpa_attention_override}
    fn = torch.compile(ocomp.fresh_function(ocomp._trampoline, "sdxlopt_meta_probe"), backend=backend,
                       fullgraph=True)
    with torch.no_grad():
        fn(type(unet)._forward, (unet, inp["x"], inp["t"], inp["context"], inp["y"], None, topts), {})
    return found


@pytest.mark.parametrize("stack", [
    "fp8",  # the fp8 layers' cast path plus every op of the plain forward
    "freeu",
])
def test_graph_has_no_cpu_ops_on_another_device_so_cuda_graphs_apply(stack):
    model = fp8_model(0) if stack == "fp8" else factories.tiny_unet(0, unet_config=SMALL_UNET)
    if stack == "freeu":
        model = freeu(model)
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    found = _cpu_tensors_in_graph(model, {"patches": patches})
    assert found == [], f"expected no CPU tensors in the {stack} graph (CUDA graphs would be skipped), got {found}"


# ---------------------------------------------------------------- fallbacks

def test_cpu_without_a_compiler_backend_runs_eager_with_one_log_line(small, caplog):
    caplog.set_level(logging.INFO)
    ncomp._LOGGED.discard("problem:" + (ocomp.compiler_problem(CompileConfig(), "cpu") or ""))
    m = apply_compile(eager(small), CompileConfig(backend="inductor"))  # the node's default; CPU here
    out1, g1, s1 = run_counted(m)
    out2, g2, _ = run_counted(m)
    assert g1 == g2 == 0 and s1.compiled_calls == 0 and s1.eager_calls == STEPS
    assert torch.equal(out1, sample(eager(small))) and torch.equal(out2, out1)
    lines = [r for r in caplog.records if "running eager" in r.getMessage()]
    assert len(lines) == 1 and "CUDA" in lines[0].getMessage() and lines[0].levelno == logging.WARNING


def test_a_failing_compile_falls_back_to_eager_and_still_makes_the_image(small, caplog):
    """A patch that breaks the graph under fullgraph=True: the compile fails inside the first UNet call; the
    image is still made (eager), the log names the cause once, and later runs go straight to eager."""
    caplog.set_level(logging.WARNING)
    m = eager(small)

    def host_sync_patch(h, transformer_options):
        if float(h.abs().max()) > -1.0:  # a host sync: data-dependent Python control flow
            return h
        return h

    m.set_model_input_block_patch(host_sync_patch)
    ref = sample(m)  # the host's own eager forward: what the fallback runs
    out, graphs, stats = run_counted(compiled(m))
    assert torch.equal(out, ref)
    assert stats.compiled_calls == 0 and stats.eager_calls == STEPS and len(stats.fallbacks) == 1
    msgs = [r.getMessage() for r in caplog.records if "failed, it runs eager" in r.getMessage()]
    assert len(msgs) == 1 and "still made" in msgs[0]
    out2, _, stats2 = run_counted(compiled(m))
    assert torch.equal(out2, out) and stats2.eager_calls == STEPS
    assert len([r for r in caplog.records if "failed, it runs eager" in r.getMessage()]) == 1
    assert stats2.fallbacks and "host_sync_patch" in stats2.fallbacks[0]  # each run's summary says why
    _, _, plain = run_counted(compiled(small))  # the failure stays with its own stack
    assert_all_compiled(plain)


def test_a_broken_compiler_is_caught_by_the_self_test(small, caplog):
    import torch._dynamo

    @torch._dynamo.register_backend(name="sdxlopt_test_broken")
    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler found")

    caplog.set_level(logging.WARNING)
    cfg = CompileConfig(backend="sdxlopt_test_broken")
    assert "no C compiler found" in ocomp.compiler_problem(cfg, "cpu")
    out, graphs, stats = run_counted(apply_compile(eager(small), cfg))
    assert torch.equal(out, sample(eager(small))) and stats.eager_calls == STEPS
    assert any("self-test" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- node, isolation

def test_node_leaves_the_input_model_unchanged_and_replaces_core_compile(small, caplog):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    before = options_snapshot(small)
    weights = {k: v.clone() for k, v in small.model.state_dict().items()}
    m = Compile.execute(small, mode="reduce-overhead", backend="inductor").result[0]
    assert options_snapshot(small) == before and KEY not in small.model_options.get("transformer_options", {})
    assert m is not small and isinstance(m.model_options["transformer_options"][KEY], ncomp.CompiledPath)
    core = small.clone()
    set_torch_compile_wrapper(core, backend="inductor")  # ComfyUI's TorchCompileModel on the same model
    caplog.set_level(logging.WARNING)
    out = sample(compiled(core))
    close(out, sample(eager(small)))
    assert last_run_stats().compiled_calls == STEPS
    assert any("TorchCompileModel" in r.getMessage() for r in caplog.records)
    assert options_snapshot(small) == before
    assert all(torch.equal(v, weights[k]) for k, v in small.model.state_dict().items())
    with pytest.raises(ValueError, match="mode"):
        Compile.execute(small, mode="turbo")


def test_node_in_a_prompt(run_prompt):
    prompt = {
        "1": {"class_type": "SDXLOptTestTinyCheckpoint", "inputs": {"seed": 0, "vae": "taesd"}},
        "2": {"class_type": "SDXLOptCompile", "inputs": {"model": ["1", 0], "mode": "reduce-overhead",
                                                          "dynamic_shapes": False, "backend": "inductor",
                                                          "cache_size": 4, "warmup": True, "fullgraph": False}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "sdxlopt_compile"}},
    }
    res = run_prompt(prompt)
    samples = res.output("6")[0]["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    assert last_run_stats().eager_calls == 2  # inductor on the CPU: the eager fallback, in a real prompt
