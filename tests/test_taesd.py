"""Tiny VAE (TAESD): parity with diffusers' AutoencoderTiny on identical weights, every weight layout, latent
scaling for SDXL and SD1.x against ComfyUI's own TAESD path, the loader's file discovery, the nodes inside a
prompt next to core VAE Decode/Encode, and bad input."""
from __future__ import annotations

import folder_paths
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderTiny

from sdxl_optimizer.nodes import taesd as nt
from sdxl_optimizer.ops import taesd as ot
from tinymodels import factories, prompts

PAIR = "vae_approx/tinyxl (encoder + decoder)"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_tiny(seed: int) -> AutoencoderTiny:
    return factories.seeded_init_(AutoencoderTiny(), seed).eval()


def comfy_to_diffusers(sd: dict) -> dict:
    """ComfyUI layout -> diffusers' AutoencoderTiny keys (its decoder has no Clamp layer: indices one lower)."""
    out = {}
    for k, v in sd.items():
        part, idx, rest = k.split(".", 2)
        if part == "taesd_encoder":
            out[f"encoder.layers.{idx}.{rest}"] = v
        elif part == "taesd_decoder":
            out[f"decoder.layers.{int(idx) - 1}.{rest}"] = v
    return out


@pytest.fixture
def model_folder(tmp_path, monkeypatch):
    """Empty models/vae_approx and models/vae in tmp_path, in place of the host's (restored after)."""
    for name in ("vae_approx", "vae"):
        (tmp_path / name).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(tmp_path / name)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.clear()
    yield tmp_path
    folder_paths.filename_list_cache.clear()


def test_matches_diffusers_autoencoder_tiny_on_identical_weights():
    d = diffusers_tiny(5)
    ours = ot.load_state_dicts([("diffusers", d.state_dict())])
    z = torch.randn(2, 4, 8, 12) * 2
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        dec_ref, dec = d.decode(z).sample, ours.decode(z) * 2 - 1  # diffusers decodes to [-1, 1]
        enc_ref, enc = d.encode(x * 2 - 1).latents, ours.encode(x)
    assert rel_err(dec, dec_ref) <= 1e-4, f"expected decode parity with AutoencoderTiny, got {rel_err(dec, dec_ref)}"
    assert rel_err(enc, enc_ref) <= 1e-4, f"expected encode parity with AutoencoderTiny, got {rel_err(enc, enc_ref)}"

    # ComfyUI's layout of the same architecture maps onto diffusers' one for one
    sd = factories.tiny_taesd_state_dict(2)
    d2 = AutoencoderTiny().eval()
    d2.load_state_dict(comfy_to_diffusers(sd), strict=True)
    ours2 = ot.load_state_dicts([("comfy", sd)])
    with torch.no_grad():
        err = rel_err(ours2.decode(z) * 2 - 1, d2.decode(z).sample)
    assert err <= 1e-4, f"expected ComfyUI-layout weights to decode as diffusers does, got rel err {err}"


@pytest.mark.parametrize("preset,factor", [("sdxl", 0.13025), ("sd1.x", 0.18215)])
def test_latent_scaling_matches_comfyui_and_diffusers(preset, factor):
    """LATENT holds raw VAE latents: SDXL decodes raw * 0.13025, SD1.x raw * 0.18215, like core's taesd(xl)."""
    import comfy.sd

    sd = factories.tiny_taesd_state_dict(2)
    ours = ot.load_state_dicts([("comfy", sd)])
    scaling = ot.PRESETS[preset]
    core = comfy.sd.VAE(sd=dict(sd, vae_scale=torch.tensor(factor), vae_shift=torch.tensor(0.0)))
    d = AutoencoderTiny().eval()
    d.load_state_dict(comfy_to_diffusers(sd))
    raw = torch.randn(1, 4, 8, 8) / factor  # raw latents are ~1/scale_factor times the UNet's
    image = torch.rand(1, 32, 48, 3)
    with torch.no_grad():
        ours_img = ot.decode_latents(ours, raw, scaling)
        core_img = core.decode(raw).movedim(-1, 1)
        diff_img = (d.decode(raw * factor).sample * 0.5 + 0.5).clamp(0, 1)
        ours_lat = ot.encode_image(ours, image.movedim(-1, 1), scaling)
        core_lat = core.encode(image)
        diff_lat = d.encode(image.movedim(-1, 1) * 2 - 1).latents / factor
    assert ours_img.min() >= 0 and ours_img.max() <= 1, "expected the full VAE's [0, 1] IMAGE range"
    assert (ours_img - core_img).abs().max() < 1e-5, "expected core VAELoader's taesd(xl) decode"
    assert (ours_img - diff_img).abs().max() < 1e-5, "expected diffusers' decode of raw * scaling_factor"
    assert rel_err(ours_lat, core_lat) < 1e-5, "expected core's taesd(xl) encode (raw latents)"
    assert rel_err(ours_lat, diff_lat) < 1e-5, "expected diffusers' encode / scaling_factor"


def test_loader_finds_and_loads_every_layout(model_folder):
    sd = factories.tiny_taesd_state_dict(2)
    factories.write_taesd_pair(model_folder / "vae_approx", "tinyxl")  # bare keys, as madebyollin ships them
    dec_only = {k: v for k, v in sd.items() if k.startswith("taesd_decoder.")}
    safetensors.torch.save_file(dec_only, str(model_folder / "vae_approx" / "taesd_one.safetensors"))
    d = diffusers_tiny(5)
    safetensors.torch.save_file({k: v.contiguous() for k, v in d.state_dict().items()},
                                str(model_folder / "vae" / "tiny_diffusers.safetensors"))

    choices = nt.tae_choices()
    assert choices[0] == PAIR, f"expected the pair first as one entry, got {choices}"
    assert {"vae_approx/tinyxl_decoder.pth", "vae_approx/taesd_one.safetensors",
            "vae/tiny_diffusers.safetensors"} <= set(choices)
    assert set(nt.TinyVAELoader.GET_SCHEMA().inputs[0].options) == set(choices)

    z = torch.randn(1, 4, 8, 8)
    ref = ot.load_state_dicts([("ref", sd)])
    with torch.inference_mode():
        pair = nt.TinyVAELoader.execute(tae_name=PAIR, latent_type="auto").result[0]
        assert pair.preset == "sdxl" and pair.model.encoder is not None and pair.model.decoder is not None
        assert torch.equal(pair.model.decode(z), ref.decode(z)), "expected the pair to load the same weights"
        one = nt.TinyVAELoader.execute(tae_name="vae_approx/taesd_one.safetensors", latent_type="auto").result[0]
        assert one.preset == "sd1.x" and one.model.encoder is None, "plain 'taesd' names are SD1.x; decoder only"
        diff = nt.TinyVAELoader.execute(tae_name="vae/tiny_diffusers.safetensors", latent_type="sdxl").result[0]
        assert rel_err(diff.model.decode(z) * 2 - 1, d.decode(z).sample) <= 1e-4
        with pytest.raises(ValueError, match="decoder only.*Fix"):
            nt.TinyVAEEncode.execute(pixels=torch.rand(1, 16, 16, 3), tiny_vae=one)


def test_clear_errors_for_files_that_are_not_taesd(model_folder):
    kl = {"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3), "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}
    safetensors.torch.save_file(kl, str(model_folder / "vae" / "sdxl_vae.safetensors"))
    with pytest.raises(ValueError, match="expected TAESD weights.*full VAE.*Fix"):
        nt.TinyVAELoader.execute(tae_name="vae/sdxl_vae.safetensors", latent_type="auto")
    folder_paths.filename_list_cache.clear()
    (model_folder / "vae" / "sdxl_vae.safetensors").unlink()
    assert nt.tae_choices() == [nt.NONE_FOUND]
    with pytest.raises(ValueError, match="vae_approx.*Fix"):
        nt.TinyVAELoader.execute(tae_name=nt.NONE_FOUND, latent_type="auto")


def test_wrong_channel_count_is_a_clear_error_and_the_latent_is_untouched():
    tv = nt.make_tiny_vae([("t", factories.tiny_taesd_state_dict(2))], "sdxl", "t")
    latent = {"samples": torch.randn(1, 16, 8, 8)}
    before = latent["samples"].clone()
    with pytest.raises(ValueError, match="expected a latent with 4 channels.*got 16 channels.*Fix"):
        nt.TinyVAEDecode.execute(samples=latent, tiny_vae=tv)
    with pytest.raises(ValueError, match="expected an image latent"):
        nt.TinyVAEDecode.execute(samples={"samples": torch.randn(1, 4, 2, 8, 8)}, tiny_vae=tv)
    assert torch.equal(latent["samples"], before)


def test_nodes_in_a_prompt_match_core_vae_loader_taesdxl(run_prompt, model_folder):
    """Same weights through core Load VAE 'taesdxl' + VAE Decode/Encode and through ours: same image, same latent."""
    factories.write_taesd_pair(model_folder / "vae_approx", "taesdxl")
    prompt = {
        **prompts.sampled_latent("taesd", size=64, batch=2, steps=2),
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "taesdxl"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["5", 0]}},
        "7": {"class_type": "SDXLOptTinyVAELoader",
              "inputs": {"tae_name": "vae_approx/taesdxl (encoder + decoder)", "latent_type": "auto"}},
        "8": {"class_type": "SDXLOptTinyVAEDecode", "inputs": {"samples": ["4", 0], "tiny_vae": ["7", 0]}},
        "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["5", 0]}},
        "10": {"class_type": "SDXLOptTinyVAEEncode", "inputs": {"pixels": ["6", 0], "tiny_vae": ["7", 0]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "t"}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "t"}},
    }
    res = run_prompt(prompt)
    core_img, ours_img = res.output("6")[0], res.output("8")[0]
    assert ours_img.shape == core_img.shape == (2, 64, 64, 3)
    assert (ours_img - core_img).abs().max() < 1e-5, "expected core's taesdxl decode of the same latent"
    core_lat, ours_lat = res.output("9")[0]["samples"], res.output("10")[0]["samples"]
    assert rel_err(ours_lat, core_lat) < 1e-5, "expected core's taesdxl encode (raw latent scale)"
