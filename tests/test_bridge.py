"""The diffusers bridge: ComfyUI's tiny SDXL UNet and diffusers' UNet2DConditionModel, same weights, same output."""
from __future__ import annotations

import torch

from tinymodels import bridge, factories


def test_diffusers_config_maps_every_key():
    import comfy.utils

    key_map = comfy.utils.unet_to_diffusers(factories.TINY_UNET_CONFIG)
    assert len(key_map) > 400


def test_comfy_and_diffusers_unets_agree_on_identical_weights(host):
    model = factories.tiny_unet(seed=11)
    cunet = model.model.diffusion_model.eval()
    dunet = bridge.diffusers_unet_from_comfy(cunet)
    n_c = sum(p.numel() for p in cunet.parameters())
    n_d = sum(p.numel() for p in dunet.parameters())
    assert n_c == n_d, f"expected the same parameter count, got ComfyUI {n_c} vs diffusers {n_d}"
    for seed in (0, 1):
        inp = bridge.random_unet_inputs(seed, batch=2, size=16)
        with torch.no_grad():
            ref = bridge.run_diffusers_unet(dunet, inp)
            out = bridge.run_comfy_unet(cunet, inp)
        assert ref.abs().max() > 1e-3, "reference output is degenerate"
        err = bridge.rel_err(out, ref)
        assert err <= 1e-4, f"expected max relative error <= 1e-4, got {err:.2e}"


def test_diffusers_weights_load_into_comfy(host):
    """The reverse direction: weights born in diffusers, loaded into ComfyUI's UNet, same outputs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(5)
    dunet = UNet2DConditionModel(**bridge.diffusers_config()).eval()
    model = factories.tiny_unet(seed=99)
    bridge.load_diffusers_into_comfy(dunet, model.model.diffusion_model)
    inp = bridge.random_unet_inputs(3)
    with torch.no_grad():
        out = bridge.run_comfy_unet(model.model.diffusion_model, inp)
        ref = bridge.run_diffusers_unet(dunet, inp)
    err = bridge.rel_err(out, ref)
    assert err <= 1e-4, f"expected max relative error <= 1e-4, got {err:.2e}"
