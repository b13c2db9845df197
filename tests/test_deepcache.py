"""DeepCache: the schedule and cache (ops), the shallow forward (exact vs the core forward), parity with the
DeepCache package on identical weights, and stacking inside the real host with the tiny SDXL model."""
from __future__ import annotations

import ast
import logging
import math
import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdxl_optimizer.nodes import _unet_graph as ug
from sdxl_optimizer.nodes import deepcache as dcn
from sdxl_optimizer.ops import deepcache as dco
from tinymodels import bridge, factories, prompts

STEPS = 5  # interval 3: full steps 0 and 3, shallow 1, 2 and 4
SIZE = 8  # latent side (64 px)
POS = factories.random_conditioning(101)
NEG = factories.random_conditioning(202)
SUMMARY = re.compile(r"DeepCache: (\d+)/(\d+) UNet calls took the shallow path")


# ---------------------------------------------------------------- helpers

def core_node(name: str, **inputs):
    """Run a core ComfyUI node by class name (V1 or V3 style) and return its outputs."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[name]
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(**inputs)
    return cls.execute(**inputs).result


def deepcache(model, **kw):
    return dcn.apply_deepcache(model, dco.DeepCacheConfig(**kw))


def sample(model, steps: int = STEPS, cfg: float = 5.0, size: int | tuple = SIZE, batch: int = 1, seed: int = 0,
           pos=None, neg=None, noise=None, callback=None) -> torch.Tensor:
    import comfy.sample

    h, w = (size, size) if isinstance(size, int) else size
    latent = torch.zeros(batch, 4, h, w)
    if noise is None:
        noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos or POS, neg or NEG, latent,
                               callback=callback, disable_pbar=True, seed=seed)


def shallow_counts(caplog) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for r in caplog.records if (m := SUMMARY.search(r.getMessage()))]


def snapshot(model) -> tuple:
    """What a node must not change on its input model."""
    return (repr(model.model_options), repr(model.wrappers), sorted(model.patches), id(model.model))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return factories.tiny_unet(seed=7)


@pytest.fixture(autouse=True, params=["cuda", "plain"])
def graph_mode(request, monkeypatch):
    """Every test twice: as on a CPU user's machine ("cuda" mode: no graphs off CUDA) and with the shallow
    calls going through the CUDA-graph bookkeeping (static input buffers, weight keys) as plain calls, which
    is all of the graph path that runs without a GPU (the capture itself: bench/cases/deepcache.py)."""
    monkeypatch.setattr(ug, "GRAPH_MODE", request.param)
    return request.param


REPLAYED = re.compile(r"took the shallow path \([^)]*\), (\d+) of them replayed as a CUDA graph")
FULL_REPLAYED = re.compile(r"; (\d+) full calls replayed as a CUDA graph")


def replayed(caplog, pattern=REPLAYED) -> list[int]:
    return [int(m[1]) if (m := pattern.search(r.getMessage())) else 0
            for r in caplog.records if SUMMARY.search(r.getMessage())]


# ---------------------------------------------------------------- ops: schedule, mapping, cache

def reference_quad_center():
    """DeepCache's own non-uniform schedule function, read from the installed package (its pipeline module
    does not import with the installed diffusers, so the one function is compiled on its own)."""
    import DeepCache

    src = Path(DeepCache.__file__).parent / "sdxl" / "pipeline_stable_diffusion_xl.py"
    tree = ast.parse(src.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    ns = {"np": np}
    exec(compile(ast.Module([fn], []), str(src), "exec"), ns)
    return ns["sample_from_quad_center"]


def test_uniform_schedule_matches_the_deepcache_helper():
    from DeepCache import DeepCacheSDHelper

    for steps in (1, 5, 7, 50):
        for interval in (1, 2, 3, 5):
            helper = DeepCacheSDHelper(pipe=object())
            helper.set_params(cache_interval=interval, cache_branch_id=0)
            helper.reset_states()
            expected = []
            for i in range(steps):
                helper.cur_timestep = i
                expected.append(not helper.is_skip_step(0, 0, "mid"))  # the middle block runs only on full steps
            got = dco.full_step_mask([True] * steps, dco.DeepCacheConfig(interval=interval))
            assert got == expected, f"steps {steps} interval {interval}: expected {expected}, got {got}"


def test_nonuniform_schedule_matches_the_deepcache_pipeline():
    import warnings

    ref = reference_quad_center()
    for steps in (10, 20, 25, 30, 50, 100):
        for interval in (2, 3, 4, 5):
            n_full = math.ceil(steps / interval)
            center = round(0.3 * steps)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the reference casts complex to int on purpose
                expected = [int(i) for i in ref(steps, n_full, center=center, pow=1.4)[0]]
            got = dco.nonuniform_full_steps(steps, interval, center=0.3, power=1.4)
            assert got == expected, f"steps {steps} interval {interval}: expected {expected}, got {got}"
    # the paper's SDXL example: 50 steps, interval 3, center 15
    assert dco.nonuniform_full_steps(50, 3)[:6] == [0, 3, 6, 8, 11, 13]


def test_window_runs_outside_steps_in_full_and_restarts_the_schedule_inside():
    cfg = dco.DeepCacheConfig(interval=3)
    mask = dco.full_step_mask([False, False, True, True, True, True, True, False], cfg)
    assert mask == [True, True, True, False, False, True, False, True]
    assert dco.full_step_mask([False] * 4, cfg) == [True] * 4
    state = dco.DeepCacheState(cfg).prepare([10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 0.0], sigma_start=7.0, sigma_end=1.5)
    assert state.full_mask == [True, True, True, False, False, True]


def test_cache_follows_the_batch_per_conditioning_chunk():
    state = dco.DeepCacheState(dco.DeepCacheConfig())
    x2 = torch.zeros(2, 4, 8, 8)
    feats = torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 3, 2, 2)
    state.store(["neg", "pos"], x2, feats)
    only_pos = state.lookup(["pos"], torch.zeros(1, 4, 8, 8))
    assert only_pos is not None and torch.equal(only_pos, feats[1:]), "expected the positive chunk alone"
    assert torch.equal(state.lookup(["pos", "neg"], x2), feats.flip(0))
    assert state.lookup(["neg", "pos"], x2) is feats, "the same batch layout must come back without a copy"
    state.store(["pos"], torch.zeros(1, 4, 8, 8), feats[:1] + 5)  # a newer full call of one chunk
    assert torch.equal(state.lookup(["neg", "pos"], x2), torch.cat([feats[:1], feats[:1] + 5]))
    assert state.lookup(["other"], torch.zeros(1, 4, 8, 8)) is None, "an unseen cond must run in full"
    assert state.lookup(["pos"], torch.zeros(1, 4, 16, 8)) is None, "another latent size must run in full"
    assert state.lookup(["pos"], torch.zeros(2, 4, 8, 8)) is None, "another batch size must run in full"
    clone = state.clone()
    assert clone.cache == {} and clone.batches == {} and clone.config == state.config
    state.count(True)
    state.reset()
    assert state.cache == {} and state.batches == {} and state.calls == 0 and not state.prepared


def test_shallow_plan_and_config_errors_say_what_and_how_to_fix():
    assert dco.shallow_plan(0, 9) == (1, 8)
    assert dco.shallow_plan(8, 9) == (9, 0)
    with pytest.raises(ValueError):
        dco.shallow_plan(9, 9)
    with pytest.raises(ValueError, match=r"expected 0\.\.8 .*got 9.*Fix"):
        dco.DeepCacheConfig(branch=9).validate(max_branch=8)
    with pytest.raises(ValueError, match=r"cache_interval: expected an integer >= 1.*got 0.*Fix"):
        dco.DeepCacheConfig(interval=0).validate()
    with pytest.raises(ValueError, match=r"start_percent <= end_percent"):
        dco.DeepCacheConfig(start_percent=0.8, end_percent=0.2).validate()


# ---------------------------------------------------------------- the shallow forward vs the core forward

def patched_for_exactness(model):
    """The tiny model with every kind of UNet patch the shallow forward must honour."""
    from comfy.ldm.modules.attention import optimized_attention

    (m,) = core_node("FreeU_V2", model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    m = m.clone()
    m.set_model_emb_patch(lambda emb, ch, to: emb * 1.01)
    m.set_model_input_block_patch(lambda h, to: h * (1.0 + 0.01 * to["block"][1]))
    m.set_model_input_block_patch_after_skip(lambda h, to: h + 0.001)
    m.set_model_output_block_patch(lambda h, hsp, to: (h, hsp * 0.99))
    # depends on transformer_index: a wrong index in the shallow path changes the output
    m.set_model_attn1_patch(lambda n, c, v, eo: (n * (1.0 + 0.02 * eo["transformer_index"]), c, v))
    for block in (("input", 4), ("output", 3), ("output", 5)):
        m.set_model_attn2_replace(lambda q, k, v, eo: optimized_attention(q, k * 1.1, v, eo["n_heads"]), *block)
    return m


def make_control(shapes: list[torch.Size], mid: torch.Size, seed: int) -> dict:
    """ControlNet/T2I-style residuals: 'output' in input-block order (popped from the end), 'input' reversed."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g) * 0.1 if i % 3 else None for i, s in enumerate(shapes)]
    inp = [torch.randn(s, generator=g) * 0.1 for s in reversed(shapes)]
    return {"output": out, "input": inp, "middle": [torch.randn(mid, generator=g) * 0.1]}


def copy_control(c: dict) -> dict:
    return {k: [t.clone() if t is not None else None for t in v] for k, v in c.items()}


def test_shallow_forward_on_the_cached_inputs_reproduces_the_core_forward_exactly(tiny):
    m = patched_for_exactness(tiny)
    unet = m.model.diffusion_model
    inp = bridge.random_unet_inputs(4, batch=2, size=SIZE)
    base_to = m.model_options["transformer_options"]
    shapes = []
    rec = {"patches": {"input_block_patch": [lambda h, to: shapes.append(h.shape) or h]}}
    with torch.no_grad():
        unet(inp["x"], inp["t"], inp["context"], inp["y"], transformer_options=rec)
    control = make_control(shapes, shapes[-1], seed=5)
    for branch in range(dcn.num_skips(unet)):
        n_in, first_out = dco.shallow_plan(branch, dcn.num_skips(unet))
        sink = [first_out, None]
        patches = dict(base_to["patches"])
        patches["output_block_patch"] = [dcn.capture_deep_features, *patches["output_block_patch"]]
        with torch.no_grad():
            full = unet(inp["x"], inp["t"], inp["context"], inp["y"], control=copy_control(control),
                        transformer_options={**base_to, "patches": patches, dcn.CAPTURE_KEY: sink})
            shallow = dcn.shallow_unet_forward(unet, sink[1], n_in, first_out,
                                               dcn.transformer_index_before_output(unet, first_out), inp["x"],
                                               inp["t"], inp["context"], inp["y"], control=copy_control(control),
                                               transformer_options=dict(base_to))
        assert torch.equal(shallow, full), f"branch {branch}: shallow path differs from the core forward " \
                                           f"by {(shallow - full).abs().max():.3e}"


def test_cache_off_equals_the_unpatched_model_exactly(tiny):
    ref = sample(tiny)
    for kw in ({"interval": 1}, {"interval": 3, "start_percent": 0.5, "end_percent": 0.5}):
        off = deepcache(tiny, **kw)
        assert dcn.KEY not in off.model_options["transformer_options"], f"{kw}: switched off attaches nothing"
        assert torch.equal(sample(off), ref), f"{kw}: expected the unpatched result exactly"
    # a window holding at most the last step (the first step of a window is full): wrappers attached, every
    # call full through them (capture patch included)
    late = deepcache(tiny, interval=3, start_percent=0.999, end_percent=1.0)
    assert torch.equal(sample(late), ref), "full calls through the wrapper must equal the unpatched model"
    # with caching on, the result moves (else the tests below would prove nothing)
    assert not torch.equal(sample(deepcache(tiny, interval=3)), ref)


# ---------------------------------------------------------------- parity with the DeepCache package

@pytest.mark.parametrize("interval,branches", [(3, (0, 1, 3, 8)), (2, (5,))])
def test_parity_with_deepcache_helper_on_identical_weights(interval, branches):
    from DeepCache import DeepCacheSDHelper

    model = factories.tiny_unet(seed=11)
    cunet = model.model.diffusion_model.eval()
    dunet = bridge.diffusers_unet_from_comfy(cunet)
    ms = model.get_model_object("model_sampling")
    steps = 5
    ts = torch.linspace(999, 1, steps).round()  # unique: the helper finds the step by the timestep
    sample_sigmas = torch.cat([ms.sigma(ts), torch.zeros(1)])
    base = bridge.random_unet_inputs(0, batch=2, size=SIZE)
    xs = [torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(50 + i)) for i in range(steps)]
    uuids = [uuid.uuid4(), uuid.uuid4()]  # uncond and cond chunks, as ComfyUI batches CFG
    for branch in branches:
        patched = deepcache(model, interval=interval, branch=branch)
        state = patched.model_options["transformer_options"][dcn.KEY].clone()
        state.prepare(sample_sigmas.tolist(), 1e9, 0.0)
        helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=dunet, scheduler=SimpleNamespace(timesteps=ts)))
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        try:
            for i in range(steps):
                inp = dict(base, x=xs[i], t=ts[i].expand(2))
                to = {"wrappers": {k: dict(v) for k, v in patched.wrappers.items()}, dcn.KEY: state,
                      "sigmas": sample_sigmas[i:i + 1], "sample_sigmas": sample_sigmas, "uuids": uuids,
                      "cond_or_uncond": [1, 0]}
                with torch.no_grad():
                    ours = bridge.run_comfy_unet(cunet, inp, to)
                    ref = dunet(xs[i], ts[i], encoder_hidden_states=base["context"],
                                added_cond_kwargs={"text_embeds": base["pooled"], "time_ids": base["time_ids"]}).sample
                if i == 0:  # a full call through the wrapper is the core forward, bit for bit
                    with torch.no_grad():
                        assert torch.equal(ours, bridge.run_comfy_unet(cunet, inp))
                err = bridge.rel_err(ours, ref)
                assert err <= 1e-4, f"interval {interval} branch {branch} step {i}: rel err {err:.2e} > 1e-4"
                if i == 1:  # a cached step: must really differ from the uncached UNet
                    with torch.no_grad():
                        plain = bridge.run_comfy_unet(cunet, inp)
                    assert bridge.rel_err(ours, plain) > 1e-3, f"branch {branch} step {i} was not cached"
        finally:
            helper.disable()
        assert (state.shallow_calls, state.calls) == (steps - math.ceil(steps / interval), steps)


# ---------------------------------------------------------------- the cache follows the batch (CFG 2 -> 1)

def test_cache_follows_the_batch_when_the_uncond_leaves_mid_run(tiny):
    patched = deepcache(tiny, interval=3, branch=2)
    cunet = tiny.model.diffusion_model
    ms = tiny.get_model_object("model_sampling")
    sample_sigmas = torch.tensor([14.0, 9.0, 5.0, 0.0])
    inp = bridge.random_unet_inputs(8, batch=2, size=SIZE)
    u_neg, u_pos = uuid.uuid4(), uuid.uuid4()

    def call(state, step, rows, uuids, t_step):
        sub = {k: v[rows] for k, v in inp.items() if k in ("x", "context", "y")}
        sub["t"] = ms.timestep(sample_sigmas[t_step]).expand(len(rows))
        to = {"wrappers": {k: dict(v) for k, v in patched.wrappers.items()}, dcn.KEY: state,
              "sigmas": sample_sigmas[step:step + 1], "sample_sigmas": sample_sigmas, "uuids": uuids}
        with torch.no_grad():
            return bridge.run_comfy_unet(cunet, sub, to)

    template = patched.model_options["transformer_options"][dcn.KEY]
    a = template.clone().prepare(sample_sigmas.tolist(), 1e9, 0.0)
    call(a, 0, [0, 1], [u_neg, u_pos], 0)
    both = call(a, 1, [0, 1], [u_neg, u_pos], 1)  # shallow, batch 2
    b = template.clone().prepare(sample_sigmas.tolist(), 1e9, 0.0)
    call(b, 0, [0, 1], [u_neg, u_pos], 0)
    pos_only = call(b, 1, [1], [u_pos], 1)  # shallow, batch 1: the cached positive chunk follows
    assert b.shallow_calls == 1, "expected the batch-1 call to take the shallow path"
    assert bridge.rel_err(pos_only, both[1:]) <= 1e-5, "the batch-1 shallow call must match its batch-2 row"
    new_cond = call(b, 2, [1], [uuid.uuid4()], 2)  # a chunk never computed in full: runs in full
    assert b.shallow_calls == 1 and torch.isfinite(new_cond).all()


# ---------------------------------------------------------------- node, prompts, isolation, bad input

def test_node_in_a_prompt_leaves_the_original_model_unchanged(run_prompt):
    original, cached = prompts.original_and_patched(run_prompt, {"class_type": "SDXLOptDeepCache", "inputs": {
        "cache_interval": 3, "cache_branch_id": 0, "start_percent": 0.0, "end_percent": 1.0, "schedule": "uniform",
        "nonuniform_center": 0.3, "nonuniform_power": 1.4}}, steps=STEPS, seed=3, prefix="dc")
    assert torch.isfinite(cached).all() and not torch.equal(cached, original)


def test_bad_input_fails_at_node_time_and_leaves_the_model_unchanged(tiny, run_prompt):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    before = snapshot(tiny)
    with pytest.raises(ValueError, match=r"cache_branch_id: expected 0\.\.8 .*got 9.*Fix"):
        dcn.DeepCache.execute(tiny, cache_interval=3, cache_branch_id=9)
    with pytest.raises(ValueError, match=r"cache_interval: expected an integer >= 1.*got 0"):
        dcn.DeepCache.execute(tiny, cache_interval=0, cache_branch_id=0)
    once = deepcache(tiny)
    with pytest.raises(ValueError, match=r"already has it.*Fix"):
        deepcache(once)
    assert snapshot(tiny) == before

    dit_cfg = comfy.supported_models.SD3({
        "in_channels": 16, "patch_size": 2, "depth": 2, "pos_embed_max_size": 16, "num_patches": 256,
        "adm_in_channels": 32,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}}})
    dit = comfy.model_patcher.ModelPatcher(dit_cfg.get_model({}), load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device())
    dit_before = snapshot(dit)
    with pytest.raises(ValueError, match=r"expected a UNet model.*got SD3 with a OpenAISignatureMMDITWrapper.*Fix"):
        dcn.DeepCache.execute(dit, cache_interval=3, cache_branch_id=0)
    assert snapshot(dit) == dit_before

    bad = {
        "1": {"class_type": "SDXLOptTestTinyCheckpoint", "inputs": {"seed": 0, "vae": "taesd"}},
        "5": {"class_type": "SDXLOptDeepCache", "inputs": {
            "model": ["1", 0], "cache_interval": 3, "cache_branch_id": 11, "start_percent": 0.0,
            "end_percent": 1.0, "schedule": "uniform", "nonuniform_center": 0.3, "nonuniform_power": 1.4}},
        "9": {"class_type": "SDXLOptPatchReport", "inputs": {"model": ["5", 0]}},
    }
    with pytest.raises(AssertionError, match=r"expected 0\.\.8"):
        run_prompt(bad)


def test_per_run_state_is_cloned_logged_and_reset(tiny, caplog):
    caplog.set_level(logging.INFO)
    patched = deepcache(tiny, interval=3)
    sample(patched)
    sample(patched)
    assert shallow_counts(caplog) == [(STEPS - 2, STEPS)] * 2, "expected one summary line per run"
    template = patched.model_options["transformer_options"][dcn.KEY]
    assert template.calls == 0 and template.cache == {} and not template.prepared, "the template was used"


def test_full_or_shallow_comes_from_the_sampler_callback_without_reading_the_sigma(tiny, caplog, monkeypatch):
    """The per-call sigma read (a GPU sync per step) is replaced by the run's step clock: same schedule."""
    reads = []
    real = dcn._sigma_of
    monkeypatch.setattr(dcn, "_sigma_of", lambda s: reads.append(1) or real(s))
    caplog.set_level(logging.INFO)
    sample(deepcache(tiny, interval=3))
    assert shallow_counts(caplog) == [(STEPS - 2, STEPS)] and reads == []


def test_nonuniform_schedule_and_window_in_a_real_run(tiny, caplog):
    caplog.set_level(logging.INFO)
    sample(deepcache(tiny, interval=2, schedule="non-uniform"), steps=10)
    sample(deepcache(tiny, interval=3, start_percent=0.3, end_percent=0.9), steps=10)
    (nu, win) = shallow_counts(caplog)
    assert nu == (10 - len(dco.nonuniform_full_steps(10, 2)), 10)
    assert 0 < win[0] < 10 - math.ceil(10 / 3)


# ---------------------------------------------------------------- stacking in the host

def test_batch_of_two_matches_two_single_runs(tiny):
    import comfy.sample

    patched = deepcache(tiny, interval=3)
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, SIZE, SIZE), 9)
    pair = sample(patched, batch=2, noise=noise)
    for i in range(2):
        single = sample(patched, batch=1, noise=noise[i:i + 1])
        assert bridge.rel_err(pair[i:i + 1], single) <= 1e-5, f"image {i} of the batch differs from its own run"


def test_freeu_stacks_in_either_order(tiny):
    def core_freeu(m):
        return core_node("FreeU_V2", model=m, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]

    def pack_freeu(m):
        from sdxl_optimizer.nodes import freeu

        return freeu.FreeU.execute(model=m).result[0]

    alone = sample(deepcache(tiny, interval=3, branch=5))
    try:
        from sdxl_optimizer.nodes import freeu  # noqa: F401  (the pack's FreeU, when this tree has it)
        freeus = {"core FreeU_V2": core_freeu, "SDXLOpt FreeU": pack_freeu}
    except ImportError:
        freeus = {"core FreeU_V2": core_freeu}
    for name, freeu_fn in freeus.items():
        a = sample(deepcache(freeu_fn(tiny), interval=3, branch=5))
        b = sample(freeu_fn(deepcache(tiny, interval=3, branch=5)))
        assert torch.equal(a, b), f"{name}: DeepCache and FreeU must give the same result in either order"
        assert not torch.equal(a, alone), f"{name} had no effect"


def tiny_lora(model, seed: int = 3, rank: int = 4) -> dict:
    """A random LoRA (kohya key names) on every attention projection of the tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, w in model.model.diffusion_model.state_dict().items():
        if ".attn" in k and k.endswith(("to_q.weight", "to_v.weight")):
            name = "lora_unet_" + k[:-len(".weight")].replace(".", "_")
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.3
            sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.3
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return sd


def test_lora_stacks_in_either_order(tiny):
    import comfy.sd

    lora = tiny_lora(tiny)
    a = sample(deepcache(comfy.sd.load_lora_for_models(tiny, None, lora, 1.0, 0.0)[0], interval=3))
    b = sample(comfy.sd.load_lora_for_models(deepcache(tiny, interval=3), None, lora, 1.0, 0.0)[0])
    assert torch.equal(a, b), "LoRA and DeepCache must give the same result in either order"
    assert not torch.equal(a, sample(deepcache(tiny, interval=3))), "the LoRA had no effect"


def test_resolution_change_between_runs(tiny):
    patched = deepcache(tiny, interval=3)
    sample(patched, size=SIZE)
    second = sample(patched, size=(12, 8))
    fresh = sample(deepcache(tiny, interval=3), size=(12, 8))
    assert torch.equal(second, fresh), "the second run must not see the first run's cache"


def test_interrupted_run_then_a_new_run(tiny, caplog):
    import comfy.model_management as mm

    caplog.set_level(logging.INFO)
    patched = deepcache(tiny, interval=3)
    ref = sample(deepcache(tiny, interval=3))

    def stop(step, x0, x, total):
        if step == 2:
            raise mm.InterruptProcessingException()

    with pytest.raises(mm.InterruptProcessingException):
        sample(patched, callback=stop)
    template = patched.model_options["transformer_options"][dcn.KEY]
    assert template.cache == {} and template.calls == 0
    assert len(shallow_counts(caplog)) == 2, "the interrupted run must still log its summary"
    assert torch.equal(sample(patched), ref), "the run after an interrupt must equal a fresh run"


def tiny_controlnet(seed: int = 21):
    """A random-weight ControlNet (ComfyUI's own cldm) shaped like the tiny SDXL UNet."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm

    cfg = dict(factories.TINY_UNET_CONFIG)
    cfg.pop("out_channels")
    cfg["hint_channels"] = 3
    net = comfy.cldm.cldm.ControlNet(**cfg, dtype=torch.float32)
    factories.seeded_init_(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def with_control(conds: list, cnet, strength: float = 1.0) -> list:
    hint = torch.rand(1, 3, SIZE * 8, SIZE * 8, generator=torch.Generator().manual_seed(4))
    c = cnet.copy().set_cond_hint(hint, strength, (0.0, 1.0))
    return [[t, dict(d, control=c, control_apply_to_uncond=True)] for t, d in conds]


def test_controlnet_runs_with_deepcache(tiny, caplog):
    caplog.set_level(logging.INFO)
    cnet = tiny_controlnet()
    patched = deepcache(tiny, interval=3, branch=4)
    out = sample(patched, pos=with_control(POS, cnet), neg=with_control(NEG, cnet))
    plain = sample(patched)
    assert torch.isfinite(out).all() and not torch.equal(out, plain), "the control had no effect"
    assert not [r for r in caplog.records if "control could not be applied" in r.getMessage()], \
        "control residuals were misaligned with the blocks"
    # separate control objects on the two conds keep cond and uncond in separate UNet calls: each finds its
    # own chunk in the cache
    assert shallow_counts(caplog)[0] == (2 * (STEPS - 2), 2 * STEPS)


def test_cfg_cutoff_shrinks_the_batch_and_the_cache_follows(tiny, caplog):
    try:
        from sdxl_optimizer.nodes import cfg_cutoff
    except ImportError:
        pytest.skip("nodes/cfg_cutoff.py is not in this tree")
    caplog.set_level(logging.INFO)
    steps = 8
    both = cfg_cutoff.apply_cfg_cutoff(deepcache(tiny, interval=3), 0.5)
    out = sample(both, steps=steps)
    assert torch.isfinite(out).all()
    # calls after the cutoff carry the positive chunk only, and still take the shallow path
    assert shallow_counts(caplog) == [(steps - math.ceil(steps / 3), steps)]
    other_order = deepcache(cfg_cutoff.apply_cfg_cutoff(tiny, 0.5), interval=3)
    assert torch.equal(sample(other_order, steps=steps), out)


def test_fp8_weights_with_deepcache(caplog):
    try:
        from sdxl_optimizer.nodes import fp8 as nfp8
    except ImportError:
        pytest.skip("nodes/fp8.py is not in this tree")
    caplog.set_level(logging.INFO)
    m = factories.tiny_unet(7, model_options={"custom_operations": nfp8.fp8_operations(torch.float8_e4m3fn)})
    assert nfp8.is_fp8_model(m)
    out = sample(deepcache(m, interval=3))
    assert torch.isfinite(out).all() and shallow_counts(caplog) == [(STEPS - 2, STEPS)]
    # the shallow path runs the fp8 layers exactly as the full forward does
    unet = m.model.diffusion_model
    inp = bridge.random_unet_inputs(4, batch=2, size=SIZE)
    n_in, first_out = dco.shallow_plan(3, dcn.num_skips(unet))
    sink = [first_out, None]
    to = {"patches": {"output_block_patch": [dcn.capture_deep_features]}, dcn.CAPTURE_KEY: sink}
    with torch.no_grad():
        full = unet(inp["x"], inp["t"], inp["context"], inp["y"], transformer_options=to)
        shallow = dcn.shallow_unet_forward(unet, sink[1], n_in, first_out,
                                           dcn.transformer_index_before_output(unet, first_out), inp["x"],
                                           inp["t"], inp["context"], inp["y"], transformer_options={})
    assert torch.equal(shallow, full)


# ---------------------------------------------------------------- the shallow path as a CUDA graph

def test_graphed_calls_replay_and_match_eager(tiny, caplog, graph_mode, monkeypatch):
    """Plain model, no patches: every call, full and shallow, goes through the graph path (static buffers, one
    capture per path and shape) and the run's output equals the eager run's exactly; the features a graphed
    full call caches are the ones the eager full call caches."""
    caplog.set_level(logging.INFO)
    out = sample(deepcache(tiny, interval=3), steps=7)
    monkeypatch.setattr(ug, "GRAPH_MODE", "off")
    ref = sample(deepcache(tiny, interval=3), steps=7)
    assert torch.equal(out, ref)
    counts = shallow_counts(caplog)
    assert counts[0] == (4, 7) and counts[1] == (4, 7)
    assert replayed(caplog) == ([4, 0] if graph_mode == "plain" else [0, 0])
    assert replayed(caplog, FULL_REPLAYED) == ([3, 0] if graph_mode == "plain" else [0, 0])


def test_full_graphs_stand_aside_for_inner_wrappers_and_the_switch(tiny, caplog, graph_mode, monkeypatch):
    """A UNet wrapper after DeepCache's would be frozen by a full-call capture: those full calls run eagerly
    (the shallow path, which does not call the executor, still replays); FULL_GRAPHS = False keeps every full
    call eager. Same output either way."""
    caplog.set_level(logging.INFO)
    seen = []

    def inner(executor, *args, **kwargs):
        seen.append(1)
        return executor(*args, **kwargs)

    m = deepcache(tiny, interval=3)
    m.add_wrapper_with_key(dcn.WrappersMP.DIFFUSION_MODEL, "zz_inner_test", inner)
    out = sample(m, steps=7)
    monkeypatch.setattr(dcn, "FULL_GRAPHS", False)
    ref = sample(deepcache(tiny, interval=3), steps=7)
    assert torch.equal(out, ref) and len(seen) == 3, "the inner wrapper ran at every full call (not frozen)"
    assert replayed(caplog, FULL_REPLAYED) == [0, 0]
    assert replayed(caplog) == ([4, 4] if graph_mode == "plain" else [0, 0])


def test_graph_path_stands_aside_for_patches_and_control_and_takes_fp8(tiny, caplog, graph_mode):
    """Anything whose Python would be frozen by a capture keeps the eager path: patches (FreeU), ControlNet.
    fp8 layers upcast their own resident weights: nothing for the host to do, so their calls replay too."""
    import nodes as core

    from sdxl_optimizer.nodes import fp8 as nfp8

    caplog.set_level(logging.INFO)
    freeu = core.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(tiny, 1.3, 1.4, 0.9, 0.2)[0]
    sample(deepcache(freeu, interval=3, branch=5))
    cnet = tiny_controlnet()
    sample(deepcache(tiny, interval=3, branch=4), pos=with_control(POS, cnet), neg=with_control(NEG, cnet))
    m8 = factories.tiny_unet(7, model_options={"custom_operations": nfp8.fp8_operations(torch.float8_e4m3fn)})
    sample(deepcache(m8, interval=3))
    assert [c[0] > 0 for c in shallow_counts(caplog)] == [True, True, True]
    assert replayed(caplog) == ([0, 0, 3] if graph_mode == "plain" else [0, 0, 0])
    assert replayed(caplog, FULL_REPLAYED) == ([0, 0, 2] if graph_mode == "plain" else [0, 0, 0])


def test_graphs_take_this_packs_freeu_in_either_order(tiny, caplog, graph_mode, monkeypatch):
    """SDXLOpt FreeU's patch is marked graph-safe (fixed tensor math per block): with it on the model, before
    or after DeepCache, full and shallow calls still replay, with the eager run's output; core FreeU_V2's
    patch is not marked and keeps the eager path (the test above)."""
    from sdxl_optimizer.nodes import freeu as nfreeu

    caplog.set_level(logging.INFO)
    config = nfreeu.resolve_config("SDXL", "v1", 1.3, 1.4, 0.9, 0.2)
    before = deepcache(nfreeu.apply_freeu(tiny, config), interval=3)
    plain = deepcache(tiny, interval=3)
    without = sample(plain, steps=7)  # captured without FreeU: the FreeU clone below shares these graphs
    after = nfreeu.apply_freeu(plain, config)
    outs = [sample(before, steps=7), sample(after, steps=7)]
    monkeypatch.setattr(ug, "GRAPH_MODE", "off")
    ref = sample(deepcache(nfreeu.apply_freeu(tiny, config), interval=3), steps=7)
    assert all(torch.equal(o, ref) for o in outs) and not torch.equal(without, ref)
    expected = [4, 4, 4, 0] if graph_mode == "plain" else [0, 0, 0, 0]
    assert replayed(caplog) == expected
    assert replayed(caplog, FULL_REPLAYED) == ([3, 3, 3, 0] if graph_mode == "plain" else [0, 0, 0, 0])


def test_graph_safe_patches_need_every_patch_marked():
    def plain(h, hsp, to):
        return h, hsp

    def marked(h, hsp, to):
        return h, hsp

    marked.sdxlopt_graph_safe = True
    assert ug.graph_safe_patches({})
    assert ug.graph_safe_patches({"patches": {"output_block_patch": [marked, dcn.capture_deep_features]}})
    assert not ug.graph_safe_patches({"patches": {"output_block_patch": [marked, plain]}})
    assert not ug.graph_safe_patches({"patches": {"attn1_patch": [plain]}})


def test_plain_weights_key_follows_replaced_weights_and_refuses_cast_layers(tiny):
    import comfy.model_management as mm

    unet = tiny.model.diffusion_model
    n_in, first_out = dco.shallow_plan(0, dcn.num_skips(unet))
    layers = dcn.shallow_layers(unet, n_in, first_out)
    assert unet.out[2] in layers and unet.input_blocks[0][0] in layers and unet.middle_block[0] not in layers
    mm.load_models_gpu([tiny])
    x = torch.zeros(1, 4, SIZE, SIZE)
    key = ug.plain_weights_key(layers, x)
    assert key is not None and key == ug.plain_weights_key(layers, x)
    conv = unet.out[2]
    old = conv.weight
    try:  # what a LoRA merged at full load does: a new parameter at a new address
        conv.weight = torch.nn.Parameter(old.detach().clone(), requires_grad=False)
        assert ug.plain_weights_key(layers, x) not in (None, key)
        conv.weight_function = [lambda w: w]  # a low-VRAM LoRA: applied at compute time
        assert ug.plain_weights_key(layers, x) is None
    finally:
        conv.weight = old
        del conv.weight_function
    assert ug.plain_weights_key(layers, x) == key
    assert ug.plain_weights_key(layers, x.half()) is None, "weights in another dtype are cast per call"


def test_a_refused_full_capture_warns_once_and_leaves_the_shallow_graphs(tiny, caplog, graph_mode,
                                                                         monkeypatch):
    """A capture the device refuses (here: every full-path capture raises) costs one warning per run; the
    full calls run eagerly, the shallow ones still replay, and the output is the eager run's."""
    if graph_mode != "plain":
        pytest.skip("the graph path runs on CUDA or in the plain test mode only")
    caplog.set_level(logging.INFO)
    m = deepcache(tiny, interval=3)
    graphs = m.model_options["transformer_options"][dcn.KEY].graphs
    capture = graphs._capture

    def refuse_full(fn, inputs):
        if len(inputs) == 4:  # the full path's (x, timesteps, context, y); the shallow one adds the features
            raise RuntimeError("operation not permitted when stream is capturing")
        return capture(fn, inputs)

    monkeypatch.setattr(graphs, "_capture", refuse_full)
    out = sample(m, steps=7)
    monkeypatch.setattr(ug, "GRAPH_MODE", "off")
    ref = sample(deepcache(tiny, interval=3), steps=7)
    assert torch.equal(out, ref)
    warnings = [r for r in caplog.records if "could not capture a full UNet call" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert replayed(caplog, FULL_REPLAYED) == [0, 0] and replayed(caplog)[0] > 0


def test_run_weights_key_checks_layers_once_and_reads_addresses_per_call(tiny):
    """Per run, the cast/offload checks run at the first call; every call still reads the weights' addresses,
    so a weight replaced during the run (hook keyframes) gives a new key, and a new run checks again."""
    import comfy.model_management as mm

    unet = tiny.model.diffusion_model
    mm.load_models_gpu([tiny])
    layers = ug.full_layers(unet)
    assert len(layers) == len(list(unet.modules()))
    x = torch.zeros(1, 4, SIZE, SIZE)
    state = dco.DeepCacheState(dco.DeepCacheConfig())
    key = ug.run_weights_key(state, "t", layers, x)
    assert key == ug.plain_weights_key(layers, x)
    conv = unet.out[2]
    old = conv.weight
    try:
        conv.weight = torch.nn.Parameter(old.detach().clone(), requires_grad=False)
        assert ug.run_weights_key(state, "t", layers, x) not in (None, key)
        conv.weight_function = [lambda w: w]  # set by the host at load time, never during a run
        assert ug.run_weights_key(state, "t", layers, x) is not None
        assert ug.run_weights_key(state.clone(), "t", layers, x) is None  # the next run checks again
    finally:
        conv.weight = old
        del conv.weight_function
    assert ug.run_weights_key(state, "t", layers, x.half()) is None


def test_static_graphs_copy_inputs_and_keep_a_bounded_set():
    from sdxl_optimizer.ops.cuda_graphs import StaticGraphs

    g = StaticGraphs(limit=2, use_graphs=False)
    calls = []

    def fn(a, b):
        calls.append(a.shape)
        return a * 2 + (0 if b is None else b)

    a = torch.ones(3)
    assert torch.equal(g(fn, (a, None), key="w1"), a * 2)
    out = g(fn, (a + 1, None), key="w1")
    assert torch.equal(out, (a + 1) * 2) and g.captures == 1 and g.replays == 2
    g(fn, (torch.ones(4), torch.ones(4)), key="w1")  # another shape: another entry
    g(fn, (a, None), key="w2")  # another key: another entry, the oldest one goes
    assert g.captures == 3 and len(g.entries) == 2
    g.clear()
    assert not g.entries


def test_captured_graphs_are_reused_by_later_runs_of_the_node(tiny, caplog, graph_mode):
    """The node's runs share its captured graphs (keyed by shapes and weight addresses): a second run with the
    same shapes captures nothing; another resolution captures once more; outputs as eager."""
    caplog.set_level(logging.INFO)
    m = deepcache(tiny, interval=3)
    graphs = m.model_options["transformer_options"][dcn.KEY].graphs
    first = sample(m, steps=7)
    captures = graphs.captures
    second = sample(m, steps=7)
    assert torch.equal(first, second)
    assert graphs.captures == captures
    sample(m, steps=7, size=(8, 12))
    expected = [4, 4, 4] if graph_mode == "plain" else [0, 0, 0]
    assert replayed(caplog) == expected
    assert graphs.captures == (captures + 2 if graph_mode == "plain" else 0)  # full and shallow path


def test_unloading_the_model_drops_its_graphs(tiny, graph_mode):
    """The host's memory manager cannot see a graph pool: when it unloads the model (ModelPatcher.detach), the
    node's graphs go with it, and the next run captures again."""
    import comfy.model_management as mm

    m = deepcache(tiny, interval=3)
    graphs = m.model_options["transformer_options"][dcn.KEY].graphs
    out = sample(m, steps=7)
    assert bool(graphs.entries) == (graph_mode == "plain")
    # a node cloning the model afterwards (ComfyUI deep-copies model_options) shares the graphs
    assert m.clone().model_options["transformer_options"][dcn.KEY].graphs is graphs
    mm.unload_all_models()
    assert not graphs.entries
    assert torch.equal(sample(m, steps=7), out)
    assert bool(graphs.entries) == (graph_mode == "plain")
