"""SDXLOpt CFG Cutoff: CFG before the cutoff, the positive prompt only after it (uncond really not computed),
the guide's diffusers step semantics, every sampler entry point, stacking, bad input and isolation."""
from __future__ import annotations

import logging

import comfy.patcher_extension
import comfy.samplers
import nodes
import pytest
import torch

from sdxl_optimizer.nodes.cfg_cutoff import KEY, CFGCutoff, apply_cfg_cutoff
from sdxl_optimizer.ops.cfg_cutoff import (
    CFGCutoffState,
    cutoff_sigma,
    first_unguided_step,
    last_guided_step,
)
from tinymodels import bridge, factories, prompts

WrappersMP = comfy.patcher_extension.WrappersMP
# the cutoff works on the cond batch and is model-agnostic: a smaller UNet than the tiny SDXL keeps these fast
MICRO = dict(factories.TINY_UNET_CONFIG, model_channels=32, channel_mult=[1, 2], num_res_blocks=[2, 2],
             transformer_depth=[0, 0, 1, 1], transformer_depth_output=[0, 0, 0, 1, 1, 1])


# ---------------------------------------------------------------- helpers

def record_batches(model, sink: list):
    """Attach a wrapper that records (UNet batch size, sigma) of every model call; returns the model."""
    def rec(executor, x, t, *args, **kwargs):
        sink.append((int(x.shape[0]), float(t.reshape(-1)[0])))
        return executor(x, t, *args, **kwargs)

    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test_record_batches", rec)
    return model


class ProbeSampler(comfy.samplers.Sampler):
    """Evaluates the guided model once per step at a fixed x and keeps the predictions (no integration),
    so each step's prediction can be compared with plain CFG / cond-only on the same input."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.outputs: list[torch.Tensor] = []

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        s_in = self.x.new_ones([self.x.shape[0]])
        for i in range(len(sigmas) - 1):
            self.outputs.append(model_wrap(self.x, sigmas[i] * s_in, model_options=extra_args["model_options"],
                                           seed=extra_args.get("seed")))
        return self.x


def probe(model, cfg: float, steps: int, batch: int = 1) -> list[torch.Tensor]:
    pos, neg = factories.random_conditioning(1), factories.random_conditioning(2)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sampler = ProbeSampler(x)
    guider.sample(torch.zeros_like(x), torch.zeros_like(x), sampler, sigmas, seed=0)
    return sampler.outputs


def ksample(model, steps=4, cfg=5.0, batch=1, seed=3, **adv):
    pos, neg = factories.random_conditioning(1), factories.random_conditioning(2)
    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", pos, neg, latent, **adv)
    return out["samples"]


def options_snapshot(model) -> str:
    return repr((model.model_options, {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in model.wrappers.items()}))


@pytest.fixture(scope="module")
def base():
    return factories.tiny_unet(seed=0, unet_config=MICRO)


# ---------------------------------------------------------------- ops: step arithmetic and state

@pytest.mark.parametrize("steps,fraction", [(50, 0.5), (50, 0.75), (10, 0.3), (100, 0.29), (7, 0.0), (20, 1.0)])
def test_step_index_is_the_guides_integer_arithmetic(steps, fraction):
    assert last_guided_step(steps, fraction) == int(steps * fraction)
    k = int(steps * fraction) + 1
    assert first_unguided_step(steps, fraction) == (k if k < steps else None)
    sigmas = torch.linspace(10, 0, steps + 1)
    cut = cutoff_sigma(sigmas, fraction)
    assert cut == (None if k >= steps else float(sigmas[k]))


def test_state_combines_fraction_and_sigma_whichever_first():
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])  # 5 steps; fraction 0.5 -> steps 0-2 guided
    st = CFGCutoffState(fraction=0.5)
    assert [st.is_past_cutoff(float(s), sigmas) for s in sigmas[:-1]] == [False, False, False, True, True]
    st = CFGCutoffState(fraction=1.0, sigma=2.0)  # sigma criterion alone, inclusive
    assert [st.is_past_cutoff(float(s), sigmas) for s in sigmas[:-1]] == [False, False, True, True, True]
    st = CFGCutoffState(fraction=0.5, sigma=3.0)  # the sigma comes first here
    assert [st.is_past_cutoff(float(s), sigmas) for s in sigmas[:-1]] == [False, False, True, True, True]
    st = CFGCutoffState(fraction=1.0, sigma=0.0)
    assert not any(st.is_past_cutoff(float(s), sigmas) for s in sigmas)
    assert not CFGCutoffState(fraction=0.5).is_past_cutoff(0.1, None), "no schedule: fraction cannot apply"


def test_state_clone_and_reset():
    st = CFGCutoffState(fraction=0.25, sigma=1.5)
    st.record(3.0, False)
    st.record(1.0, True)
    assert "1 of 2" in st.summary() and "sigma 1" in st.summary()
    c = st.clone()
    assert (c.fraction, c.sigma, c.guided_calls, c.unguided_calls) == (0.25, 1.5, 0, 0)
    st.reset()
    assert (st.guided_calls, st.unguided_calls, st.first_unguided_sigma) == (0, 0, None)


# ---------------------------------------------------------------- parity: per call, whole run, diffusers

def test_before_cutoff_equals_cfg_after_equals_cond_only_and_uncond_is_not_computed(base):
    steps, fraction = 4, 0.5  # last guided step int(4 * 0.5) = 2
    full = probe(base, cfg=5.0, steps=steps)
    cond_only = probe(base, cfg=1.0, steps=steps)
    batches: list = []
    patched = record_batches(apply_cfg_cutoff(base, fraction), batches)
    cut = probe(patched, cfg=5.0, steps=steps)
    k = int(steps * fraction)
    for i in range(steps):
        ref = full[i] if i <= k else cond_only[i]
        assert torch.equal(cut[i], ref), f"step {i}: expected {'CFG' if i <= k else 'cond-only'} prediction"
    assert not torch.equal(full[k + 1], cond_only[k + 1]), "test is vacuous: CFG and cond-only agree"
    assert [b for b, _ in batches] == [2] * (k + 1) + [1] * (steps - k - 1), \
        f"expected UNet batch 2 up to step {k} and 1 after, got {[b for b, _ in batches]}"


def test_whole_run_equals_a_run_that_switches_to_cfg_1_at_the_same_step(base):
    """Reference: two KSamplerAdvanced runs, cfg 5 for steps 0..k, then cfg 1.0 from k+1 (no uncond)."""
    steps, fraction, cfg = 4, 0.25, 6.0
    k = int(steps * fraction)
    for batch in (2,):  # batch 1 is covered step by step above
        batches: list = []
        out = ksample(record_batches(apply_cfg_cutoff(base, fraction), batches), steps=steps, cfg=cfg, batch=batch)
        first = ksample(base, steps=steps, cfg=cfg, batch=batch, start_step=0, last_step=k + 1)
        pos, neg = factories.random_conditioning(1), factories.random_conditioning(2)
        (ref,) = nodes.common_ksampler(base, 3, steps, 1.0, "euler", "normal", pos, neg, {"samples": first},
                                       disable_noise=True, start_step=k + 1, last_step=10000,
                                       force_full_denoise=True)
        ref = ref["samples"]
        full = ksample(base, steps=steps, cfg=cfg, batch=batch)
        err, change = bridge.rel_err(out, ref), bridge.rel_err(out, full)
        assert err <= 1e-5, f"batch {batch}: expected the cutoff run to equal the cfg->1 split run, rel err {err:.2e}"
        assert change > 30 * max(err, 1e-7), f"test is vacuous: cutoff changed the result by only {change:.2e}"
        assert [b for b, _ in batches] == [2 * batch] * (k + 1) + [batch] * (steps - k - 1)


def diffusers_guide_run(dunet, steps: int, fraction: float) -> list[int]:
    """The guide's callback on a real StableDiffusionXLPipeline; returns the UNet batch size of each step."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=dunet, scheduler=EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    sizes: list[int] = []
    hook = dunet.register_forward_pre_hook(lambda m, a: sizes.append(int(a[0].shape[0])))

    def callback_cfg_cutoff(p, step_index, timestep, kw):  # the guide's callback, verbatim semantics
        if step_index == int(p.num_timesteps * fraction):
            for name in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
                kw[name] = kw[name].chunk(2)[-1]
            p._guidance_scale = 0.0
        return kw

    g = torch.Generator().manual_seed(0)
    emb, pooled = torch.randn(1, 8, 64, generator=g), torch.randn(1, factories.POOLED, generator=g)
    try:
        pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(emb),
             negative_pooled_prompt_embeds=torch.zeros_like(pooled), num_inference_steps=steps,
             guidance_scale=5.0, height=32, width=32, output_type="latent", callback_on_step_end=callback_cfg_cutoff,
             callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds", "add_time_ids"])
    finally:
        hook.remove()
    return sizes


def test_guidance_stops_at_the_same_step_as_the_guides_diffusers_callback(base):
    steps, fraction = 4, 0.5
    dunet = bridge.diffusers_unet_from_comfy(base.model.diffusion_model, MICRO)
    diffusers_sizes = diffusers_guide_run(dunet, steps, fraction)
    batches: list = []
    ksample(record_batches(apply_cfg_cutoff(base, fraction), batches), steps=steps)
    ours = [b for b, _ in batches]
    assert ours == diffusers_sizes, f"expected the guide's per-step UNet batches {diffusers_sizes}, got {ours}"


@pytest.mark.parametrize("steps,fraction", [(50, 0.5), (50, 0.75), (30, 0.4), (100, 0.29), (8, 0.0)])
def test_cut_index_against_real_diffusers_scheduler_timesteps(base, steps, fraction):
    """The guide counts pipe.num_timesteps (the scheduler's timesteps); we count the run's sigmas."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler()
    sched.set_timesteps(steps)
    guide_first_unguided = int(len(sched.timesteps) * fraction) + 1
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "normal", steps)
    st = CFGCutoffState(fraction=fraction)
    flags = [st.is_past_cutoff(float(s), sigmas) for s in sigmas[:-1]]
    ours = flags.index(True) if any(flags) else None
    assert ours == (guide_first_unguided if guide_first_unguided < steps else None)
    assert all(flags[ours:]) if ours is not None else True


# ---------------------------------------------------------------- sampler entry points, cfg values

def test_ksampler_advanced_counts_the_steps_of_its_own_range(base):
    batches: list = []
    m = record_batches(apply_cfg_cutoff(base, 0.5), batches)
    ksample(m, steps=6, start_step=1, last_step=5)  # 4 steps run here -> int(4 * 0.5) = 2 is the last guided
    assert [b for b, _ in batches] == [2, 2, 2, 1]


def test_sampler_custom_and_sigma_criterion(base):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    ms = base.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 4)
    threshold = float(sigmas[2])  # sigma criterion alone: steps at sigmas[2] and below are cond-only
    batches: list = []
    m = record_batches(CFGCutoff.execute(base, 1.0, threshold).args[0], batches)
    sampler = comfy.samplers.sampler_object("euler")
    pos, neg = factories.random_conditioning(1), factories.random_conditioning(2)
    out = SamplerCustom.execute(m, True, 0, 5.0, pos, neg, sampler, sigmas, {"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.isfinite(out.args[0]["samples"]).all()
    assert [b for b, _ in batches] == [2, 2, 1, 1]


def test_cfg_1_is_untouched(base):
    batches: list = []
    out = ksample(record_batches(apply_cfg_cutoff(base, 0.5), batches), steps=3, cfg=1.0)
    assert torch.equal(out, ksample(base, steps=3, cfg=1.0))
    assert [b for b, _ in batches] == [1] * 3


def test_fraction_one_switches_off_and_replaces_an_earlier_cutoff(base):
    once = apply_cfg_cutoff(base, 0.25)
    twice = apply_cfg_cutoff(once, 0.75)
    assert len(twice.get_wrappers(WrappersMP.CALC_COND_BATCH, KEY)) == 1
    assert twice.model_options["transformer_options"][KEY].fraction == 0.75
    off = apply_cfg_cutoff(once, 1.0)
    assert not off.get_wrappers(WrappersMP.CALC_COND_BATCH, KEY) and KEY not in off.model_options["transformer_options"]
    assert not off.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY)


def test_heun_second_evaluation_keeps_batch_arithmetic(base):
    """A 2nd-order sampler calls the model twice per step; every call after the cutoff sigma is cond-only."""
    batches: list = []
    pos, neg = factories.random_conditioning(1), factories.random_conditioning(2)
    m = record_batches(apply_cfg_cutoff(base, 0.5), batches)
    nodes.common_ksampler(m, 0, 3, 5.0, "heun", "normal", pos, neg, {"samples": torch.zeros(1, 4, 8, 8)})
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "normal", 3)
    cut = float(sigmas[2])
    for b, s in batches:
        assert b == (1 if s <= cut * (1 + 1e-5) else 2), f"sigma {s}: got batch {b}"


# ---------------------------------------------------------------- stacking with other patches

def test_chains_with_other_cond_batch_hooks(base):
    calls = {"wrapper": 0, "single_slot": 0}

    def other_wrapper(executor, *args, **kwargs):
        calls["wrapper"] += 1
        return executor(*args, **kwargs)

    def other_single_slot(args):  # another pack's single-slot hook that delegates to the host
        calls["single_slot"] += 1
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    m = base.clone()
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, "other_pack", other_wrapper)
    m.set_model_sampler_calc_cond_batch_function(other_single_slot)
    batches: list = []
    m = record_batches(apply_cfg_cutoff(m, 0.5), batches)
    assert m.model_options["sampler_calc_cond_batch_function"] is other_single_slot, "single slot must be kept"
    ksample(m, steps=3)
    assert calls == {"wrapper": 3, "single_slot": 3}
    assert [b for b, _ in batches] == [2, 2, 1]


def test_post_cfg_functions_see_the_positive_prediction_after_the_cutoff_and_one_summary_line(base, caplog):
    seen = []

    def post_cfg(args):
        seen.append(torch.equal(args["uncond_denoised"], args["cond_denoised"]))
        return args["denoised"]

    m = base.clone()
    m.set_model_sampler_post_cfg_function(post_cfg)
    with caplog.at_level(logging.INFO):
        ksample(apply_cfg_cutoff(m, 0.5), steps=3)
    assert seen == [False, False, True]
    lines = [r.getMessage() for r in caplog.records if "CFG Cutoff" in r.getMessage()]
    assert len(lines) == 1 and "2 of 3" in lines[0], f"expected one summary line per run, got {lines}"


def sample_counting_sigma_reads(base, sampler: str, steps: int, monkeypatch) -> tuple[list, list]:
    """A cutoff-50% run with `sampler`: (UNet batch and sigma of every call, one entry per device read of a
    call's sigma by the cutoff)."""
    import sdxl_optimizer.nodes.cfg_cutoff as ccn

    reads: list = []
    real = ccn._sigma_of
    monkeypatch.setattr(ccn, "_sigma_of", lambda t: reads.append(1) or real(t))
    batches: list = []
    pos, neg = factories.random_conditioning(1), factories.random_conditioning(2)
    m = record_batches(apply_cfg_cutoff(base, 0.5), batches)
    nodes.common_ksampler(m, 0, steps, 5.0, sampler, "normal", pos, neg, {"samples": torch.zeros(1, 4, 8, 8)})
    return batches, reads


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "uni_pc"])
def test_decisions_come_from_the_sampler_callback_without_reading_the_sigma(base, sampler, monkeypatch):
    """A device read per call (float(timestep)) is a GPU sync per step; the run's step clock counts the
    sampler's callbacks instead, with the same decisions as the sigma (batch 1 exactly past the cutoff)."""
    batches, reads = sample_counting_sigma_reads(base, sampler, 4, monkeypatch)
    sigmas = comfy.samplers.KSampler(base, steps=4, device="cpu", sampler=sampler, scheduler="normal").sigmas
    cut = float(sigmas[first_unguided_step(4, 0.5)])
    assert [b for b, _ in batches] == [1 if s <= cut * (1 + 1e-5) else 2 for _, s in batches]
    assert 1 in [b for b, _ in batches]
    assert len(reads) <= (1 if sampler == "uni_pc" else 0), f"{sampler}: {len(reads)} sigma reads"


def test_a_sampler_off_the_schedule_falls_back_to_reading_sigmas(base, monkeypatch):
    """dpm_fast picks its own sigmas: its callback steps do not index the schedule, so each call's sigma is
    read (the old exact behaviour) and the cutoff still follows the sigma."""
    batches, reads = sample_counting_sigma_reads(base, "dpm_fast", 6, monkeypatch)
    assert len(reads) == len(batches)
    assert {b for b, _ in batches} == {1, 2}


def deepcache_node():
    try:
        from sdxl_optimizer.nodes import deepcache
    except ImportError:
        return None
    return next((n for n in deepcache.NODES if "DeepCache" in n.GET_SCHEMA().node_id), None)


@pytest.mark.skipif(deepcache_node() is None, reason="nodes/deepcache.py is not in the tree yet")
def test_stacks_with_deepcache_in_either_order(base):
    """4 steps, DeepCache interval 3 (full UNet at steps 0 and 3, cached at 1 and 2), cutoff 0.25 (step 1 is
    the last guided): step 2 is cached from a batch-2 full step but runs at batch 1, so DeepCache must hand
    the positive prompt its own cached features. Reference: DeepCache with full CFG batches whose guided
    result is replaced by the positive prediction after the cutoff (uncond computed but unused)."""
    node = deepcache_node()

    def deep(m, interval=3):
        return node.execute(m, cache_interval=interval, cache_branch_id=0).args[0]

    steps, fraction = 4, 0.25
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "normal", steps)
    cut = float(sigmas[int(steps * fraction) + 1])

    def cond_after_cut(args):
        return args["cond_denoised"] if float(args["sigma"].reshape(-1)[0]) <= cut * (1 + 1e-5) else args["denoised"]

    ref_model = base.clone()
    ref_model.set_model_sampler_post_cfg_function(cond_after_cut)
    ref = ksample(deep(ref_model), steps=steps)
    outs = {}
    for order in ("cutoff_then_deepcache", "deepcache_then_cutoff"):
        batches: list = []
        m = deep(apply_cfg_cutoff(base, fraction)) if order == "cutoff_then_deepcache" else \
            apply_cfg_cutoff(deep(base), fraction)
        outs[order] = ksample(record_batches(m, batches), steps=steps)
        assert [b for b, _ in batches] == [2, 2, 1, 1], f"{order}: {batches}"
        err = bridge.rel_err(outs[order], ref)
        assert err <= 1e-5, f"{order}: expected DeepCache + cutoff to equal the reference, rel err {err:.2e}"
    assert torch.equal(outs["cutoff_then_deepcache"], outs["deepcache_then_cutoff"])
    assert bridge.rel_err(ref, ksample(apply_cfg_cutoff(base, fraction), steps=steps)) > 1e-4, \
        "test is vacuous: DeepCache changed nothing"


# ---------------------------------------------------------------- bad input, isolation

@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_fraction_outside_0_1_is_a_clear_error_and_the_model_is_unchanged(base, fraction):
    before = options_snapshot(base)
    with pytest.raises(ValueError) as e:
        CFGCutoff.execute(base, fraction)
    msg = str(e.value)
    assert "expected" in msg and "got" in msg and "Fix" in msg, msg
    assert options_snapshot(base) == before


def test_negative_sigma_is_a_clear_error(base):
    with pytest.raises(ValueError, match="expected a sigma >= 0"):
        CFGCutoff.execute(base, 0.5, -1.0)


def test_node_never_changes_the_model_it_was_given(base):
    before = options_snapshot(base)
    patched = CFGCutoff.execute(base, 0.5).args[0]
    assert patched is not base and options_snapshot(base) == before
    assert patched.get_wrappers(WrappersMP.CALC_COND_BATCH, KEY)


def test_original_and_patched_model_in_one_prompt(run_prompt):
    original, patched = prompts.original_and_patched(
        run_prompt, {"class_type": "SDXLOptCFGCutoff", "inputs": {"fraction": 0.0, "sigma": 0.0}},
        negative="blurry", prefix="cfgcut")
    assert not torch.equal(original, patched)
