"""SDXLOpt FreeU: parity with diffusers' FreeU on identical weights (same blocks, channels, Fourier filter),
V1/V2, the FFT-free filter, presets, compile-friendliness, chaining, bad input and isolation."""
from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import pytest
import torch
from diffusers.utils.torch_utils import apply_freeu as diffusers_apply_freeu
from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter

from sdxl_optimizer.nodes import freeu as freeu_node
from sdxl_optimizer.nodes.freeu import FreeU, FreeUPatch, apply_freeu, resolve_config
from sdxl_optimizer.ops.freeu import (
    PRESETS,
    FreeUConfig,
    backbone_scale,
    decoder_stages,
    filter_compute_dtype,
    fourier_filter,
    fourier_filter_fft,
    fourier_filter_matmul,
    masked_frequencies,
)
from tinymodels import bridge, factories, prompts

# the tiny SDXL with SDXL's channel layout (x1, x2, x4): here channel-keyed and stage-keyed FreeU disagree
SDXL_LAYOUT = dict(factories.TINY_UNET_CONFIG, model_channels=32, channel_mult=[1, 2, 4])


def patched_options(model) -> dict:
    return {"patches": {k: list(v) for k, v in model.model_options["transformer_options"].get("patches", {}).items()}}


def comfy_out(model, inp, transformer_options=None) -> torch.Tensor:
    with torch.no_grad():
        return bridge.run_comfy_unet(model.model.diffusion_model, inp, dict(transformer_options or {}))


def diffusers_out(dunet, inp, config: FreeUConfig | None) -> torch.Tensor:
    if config is not None:
        dunet.enable_freeu(s1=config.s1, s2=config.s2, b1=config.b1, b2=config.b2)
    try:
        with torch.no_grad():
            return bridge.run_diffusers_unet(dunet, inp)
    finally:
        dunet.disable_freeu()


@pytest.fixture(scope="module")
def tiny():
    model = factories.tiny_unet(seed=3)
    return model, bridge.diffusers_unet_from_comfy(model.model.diffusion_model), bridge.random_unet_inputs(4, size=16)


# ---------------------------------------------------------------- ops

@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (1, 3, 7, 5), (2, 4, 1, 1), (1, 2, 1, 6), (2, 3, 2, 3),
                                   (1, 5, 33, 17)])
@pytest.mark.parametrize("threshold", [1, 2])
def test_fourier_filter_matches_diffusers_both_forms(shape, threshold):
    x = torch.randn(shape)
    for scale in (0.2, 0.9, 1.6):
        ref = diffusers_fourier_filter(x, threshold=threshold, scale=scale)
        for fn in (fourier_filter_matmul, fourier_filter_fft):
            err = bridge.rel_err(fn(x, threshold, scale), ref)
            assert err <= 1e-5, f"{fn.__name__} {shape} t={threshold} s={scale}: rel err {err:.2e}"


def test_masked_frequencies_are_the_fftshift_square():
    assert masked_frequencies(16) == [15, 0]  # frequencies -1 and 0
    assert masked_frequencies(7) == [6, 0]
    assert masked_frequencies(1) == [0]  # the slice [-1:1] of a length-1 axis is the one element
    assert masked_frequencies(2) == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fourier_filter_half_precision_input_runs_in_fp32_on_cpu(dtype):
    x = torch.randn(2, 6, 8, 8)
    ref = diffusers_fourier_filter(x, threshold=1, scale=0.2)
    for method in ("matmul", "fft"):
        out = fourier_filter(x.to(dtype), 1, 0.2, method)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert bridge.rel_err(out.float(), ref) <= 2 * torch.finfo(dtype).eps, method
    assert filter_compute_dtype(x.to(dtype)) == torch.float32  # CPU: fp32 GEMMs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fourier_filter_half_precision_gemms_are_as_exact_as_fp32(dtype):
    """The CUDA path for fp16/bf16 activations (GEMMs in that dtype, no conversion kernels), run here on the CPU:
    within the same 2 eps of diffusers' fp32 FFT as the fp32 path, at SDXL's two patched shapes."""
    for shape in ((2, 640, 64, 64), (2, 1280, 32, 32)):
        x = torch.randn(shape)
        for scale in (0.2, 0.9):
            ref = diffusers_fourier_filter(x, threshold=1, scale=scale)
            out = fourier_filter_matmul(x.to(dtype), 1, scale, compute_dtype=dtype)
            assert out.dtype == dtype
            assert bridge.rel_err(out.float(), ref) <= 2 * torch.finfo(dtype).eps, (shape, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fourier_filter_half_precision_does_not_overflow_on_large_activations(dtype):
    """Activations averaging ~30 over a 64x64 map: the spectrum's DC term is a sum of ~120k, beyond fp16's
    65504. The half-precision GEMMs must stay finite and as exact as on unit-scale inputs (a lent H100 gave
    NaN latents with FreeU in fp16 on random SDXL weights before the normalization moved into the analysis)."""
    g = torch.Generator().manual_seed(3)
    for shape in ((2, 640, 64, 64), (2, 1280, 32, 32)):
        x = torch.randn(shape, generator=g) * 5 + 30
        ref = diffusers_fourier_filter(x, threshold=1, scale=0.9)
        out = fourier_filter_matmul(x.to(dtype), 1, 0.9, compute_dtype=dtype)
        assert torch.isfinite(out).all(), (shape, dtype)
        assert bridge.rel_err(out.float(), ref) <= 2 * torch.finfo(dtype).eps, shape


def test_backbone_scale_v1_is_diffusers_and_v2_the_official_formula():
    h = torch.randn(2, 8, 4, 4)
    ref, _ = diffusers_apply_freeu(0, h.clone(), torch.zeros(1, 1, 2, 2), b1=1.3, b2=1.4, s1=1.0, s2=1.0)
    assert torch.equal(backbone_scale(h, 1.3, "v1"), ref)
    # FreeU v2 as in github.com/ChenyangSi/FreeU (README): structure-aware factor on the first half
    mean = h.mean(1).unsqueeze(1)
    hi = mean.view(2, -1).max(-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
    lo = mean.view(2, -1).min(-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
    ref2 = h.clone()
    ref2[:, :4] = ref2[:, :4] * ((1.3 - 1) * (mean - lo) / (hi - lo) + 1)
    assert torch.allclose(backbone_scale(h, 1.3, "v2"), ref2, rtol=1e-6, atol=1e-6)
    assert torch.equal(backbone_scale(torch.ones(1, 4, 2, 2), 2.0, "v2"), torch.ones(1, 4, 2, 2)), "flat map: no NaN"
    before = h.clone()
    backbone_scale(h, 1.3, "v1")
    assert torch.equal(h, before), "must not modify its input in place"


def test_decoder_stages_group_blocks_by_upsampler():
    assert decoder_stages([False, False, True, False, False, True, False, False, False]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_config_validates():
    with pytest.raises(ValueError, match="expected a finite factor"):
        FreeUConfig(b1=float("nan"))
    with pytest.raises(ValueError, match="expected one of"):
        FreeUConfig(version="v3")
    assert FreeUConfig(1.0, 1.0, 1.0, 1.0).is_identity


# ---------------------------------------------------------------- parity with diffusers on identical weights

@pytest.mark.parametrize("method", ["matmul", "fft"])
def test_v1_matches_diffusers_enable_freeu(tiny, method):
    model, dunet, inp = tiny
    config = FreeUConfig.from_preset("SDXL")
    ours = comfy_out(model, inp, patched_options(apply_freeu(model, config, method)))
    ref = diffusers_out(dunet, inp, config)
    err = bridge.rel_err(ours, ref)
    assert err <= 1e-4, f"expected FreeU parity with diffusers (rel err <= 1e-4), got {err:.2e}"
    assert bridge.rel_err(ref, diffusers_out(dunet, inp, None)) > 1e-2, "test is vacuous: FreeU changed nothing"


def test_v2_matches_diffusers_blocks_with_the_official_v2_formula(tiny, monkeypatch):
    """diffusers has only v1; with its apply_freeu swapped for the official v2 formula, same blocks."""
    import diffusers.models.unets.unet_2d_blocks as blocks

    def apply_freeu_v2(resolution_idx, hidden_states, res_hidden_states, **kw):
        if resolution_idx in (0, 1):
            b, s = (kw["b1"], kw["s1"]) if resolution_idx == 0 else (kw["b2"], kw["s2"])
            mean = hidden_states.mean(1).unsqueeze(1)
            n = mean.shape[0]
            hi = mean.view(n, -1).max(-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
            lo = mean.view(n, -1).min(-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
            half = hidden_states.shape[1] // 2
            hidden_states = hidden_states.clone()
            hidden_states[:, :half] = hidden_states[:, :half] * ((b - 1) * (mean - lo) / (hi - lo) + 1)
            res_hidden_states = diffusers_fourier_filter(res_hidden_states, threshold=1, scale=s)
        return hidden_states, res_hidden_states

    monkeypatch.setattr(blocks, "apply_freeu", apply_freeu_v2)
    model, dunet, inp = tiny
    config = FreeUConfig(1.2, 1.5, 0.7, 0.3, version="v2")
    err = bridge.rel_err(comfy_out(model, inp, patched_options(apply_freeu(model, config))),
                         diffusers_out(dunet, inp, config))
    assert err <= 1e-4, f"expected v2 parity (rel err <= 1e-4), got {err:.2e}"


def test_sdxl_channel_layout_matches_diffusers_where_core_freeu_does_not():
    """Core FreeU keys on channel counts (mc*4 -> b1, mc*2 -> b2): on SDXL's layout it scales the first block
    of stage 1 with b1 and the first block of stage 2 with b2/s2; diffusers (and this node) do neither."""
    import comfy_extras.nodes_freelunch as freelunch

    model = factories.tiny_unet(seed=5, unet_config=SDXL_LAYOUT)
    dunet = bridge.diffusers_unet_from_comfy(model.model.diffusion_model, SDXL_LAYOUT)
    inp = bridge.random_unet_inputs(6, size=16, unet_config=SDXL_LAYOUT)
    config = FreeUConfig.from_preset("SDXL")
    ref = diffusers_out(dunet, inp, config)
    ours = comfy_out(model, inp, patched_options(apply_freeu(model, config)))
    (core,) = freelunch.FreeU().patch(model, config.b1, config.b2, config.s1, config.s2)
    assert bridge.rel_err(ours, ref) <= 1e-4
    assert bridge.rel_err(comfy_out(core, inp, patched_options(core)), ref) > 1e-3


def test_patched_blocks_on_sdxl_full_size_layout():
    """The block table on the real SDXL config (3 stages of 3 output blocks), built without weights."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    from bench.common import SDXL_UNET_CONFIG

    with torch.device("meta"):
        unet = openaimodel.UNetModel(**SDXL_UNET_CONFIG, operations=comfy.ops.disable_weight_init)

    class Holder:
        class model:
            diffusion_model = unet

    factors = freeu_node.unet_decoder_factors(Holder, FreeUConfig.from_preset("SDXL"))
    assert factors == ((1.3, 0.9),) * 3 + ((1.4, 0.2),) * 3 + (None,) * 3


# ---------------------------------------------------------------- node behaviour

def test_presets_custom_and_off(tiny):
    model, _, _ = tiny
    for name, values in PRESETS.items():
        c = resolve_config(name, "v1", 9, 9, 9, 9)
        assert (c.b1, c.b2, c.s1, c.s2) == values, name
    assert resolve_config("custom", "v2", 1.1, 1.2, 0.5, 0.6) == FreeUConfig(1.1, 1.2, 0.5, 0.6, "v2")
    off = FreeU.execute(model, "custom", "v1", 1.0, 1.0, 1.0, 1.0).args[0]
    assert not off.model_options["transformer_options"].get("patches"), "all factors 1.0 attaches nothing"
    on = FreeU.execute(model).args[0]
    (patch,) = on.model_options["transformer_options"]["patches"]["output_block_patch"]
    assert patch.factors == ((1.3, 0.9),) * 3 + ((1.4, 0.2),) * 3 + (None,) * 3


def test_fft_on_a_device_without_fft_degrades_with_one_warning(tiny, monkeypatch, caplog):
    model, _, inp = tiny
    monkeypatch.setattr(freeu_node, "fft_supported", lambda device: False)
    with caplog.at_level(logging.WARNING):
        m = apply_freeu(model, FreeUConfig.from_preset("SDXL"), "fft")
    (patch,) = m.model_options["transformer_options"]["patches"]["output_block_patch"]
    assert patch.method == "matmul"
    assert len([r for r in caplog.records if "torch.fft does not run" in r.getMessage()]) == 1


def test_patch_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) raises on any graph break; the eager backend keeps this CPU-cheap."""
    factors = ((1.3, 0.9),) * 3 + ((1.4, 0.2),) * 3 + (None,) * 3
    h, hsp = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    for version in ("v1", "v2"):
        patch = FreeUPatch(factors, version, 1, "matmul")
        topts = {"block": ("output", 4)}
        compiled = torch.compile(lambda a, b, o, p=patch: p(a, b, o), fullgraph=True, backend="eager")
        got = compiled(h, hsp, topts)
        want = patch(h, hsp, topts)
        assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-6) for g, w in zip(got, want))


def test_chains_with_other_output_block_patches_and_never_mutates_inputs(tiny):
    import comfy_extras.nodes_freelunch as freelunch

    model, _, inp = tiny
    seen = []

    def recorder(h, hsp, transformer_options):
        seen.append(transformer_options["block"][1])
        return h, hsp

    m = model.clone()
    m.set_model_output_block_patch(recorder)
    (m,) = freelunch.FreeU_V2().patch(m, 1.1, 1.1, 0.9, 0.9)
    m = apply_freeu(m, FreeUConfig.from_preset("SDXL"))
    patches = m.model_options["transformer_options"]["patches"]["output_block_patch"]
    assert len(patches) == 3 and isinstance(patches[-1], FreeUPatch)
    out = comfy_out(m, inp, patched_options(m))
    assert torch.isfinite(out).all() and seen == list(range(9))
    h, hsp = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    h0, hsp0 = h.clone(), hsp.clone()
    patches[-1](h, hsp, {"block": ("output", 0)})
    assert torch.equal(h, h0) and torch.equal(hsp, hsp0)


def tiny_dit():
    """A tiny SD3 (MMDiT): a diffusion model with no UNet output blocks."""
    cfg = {"in_channels": 16, "patch_size": 2, "depth": 1, "pos_embed_max_size": 8, "num_patches": 64,
           "adm_in_channels": 32, "pos_embed_scaling_factor": None,
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 64}}}
    mc = comfy.supported_models.SD3(cfg)
    mc.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(mc.get_model({}), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def test_a_model_without_output_blocks_is_a_clear_error_and_unchanged():
    dit = tiny_dit()
    before = repr(dit.model_options)
    with pytest.raises(ValueError) as e:
        FreeU.execute(dit)
    msg = str(e.value)
    assert "expected a UNet" in msg and "got SD3" in msg and "Fix:" in msg, msg
    assert repr(dit.model_options) == before


def test_node_never_changes_the_model_it_was_given(tiny):
    model, _, _ = tiny
    before = repr(model.model_options)
    patched = FreeU.execute(model).args[0]
    assert patched is not model and repr(model.model_options) == before


def test_original_and_patched_model_in_one_prompt(run_prompt):
    original, patched = prompts.original_and_patched(run_prompt, {"class_type": "SDXLOptFreeU", "inputs": {
        "preset": "SDXL", "version": "v1", "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2, "fourier": "matmul"}},
        negative=None, cfg=1.0, prefix="freeu")
    assert not torch.equal(original, patched)
