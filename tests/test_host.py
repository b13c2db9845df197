"""The pack inside the real ComfyUI host: registration, schema rules, a full tiny-model prompt."""
from __future__ import annotations

import nodes
import torch
from comfy_api.latest import io

PACK_PREFIX = "SDXLOpt"


def pack_nodes():
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith(PACK_PREFIX)
            and not k.startswith("SDXLOptTest")}


def test_pack_nodes_are_registered_in_the_host(host):
    found = pack_nodes()
    assert "SDXLOptPatchReport" in found, f"expected SDXLOptPatchReport in the host, got {sorted(found)}"
    assert host.pack_module.comfy_entrypoint is not None


def test_no_pack_module_or_node_failed_to_load(host):
    from sdxl_optimizer import nodes as pack_nodes_pkg

    assert not pack_nodes_pkg.FAILED, "expected every pack module and node to load, these failed:\n" + "\n".join(
        f"{k}: {v}" for k, v in pack_nodes_pkg.FAILED.items())


def test_every_node_follows_the_schema_rules(host):
    for node_id, cls in pack_nodes().items():
        assert issubclass(cls, io.ComfyNode), f"{node_id}: expected a V3 io.ComfyNode, got {cls.__mro__}"
        schema = cls.GET_SCHEMA()
        assert schema.category == "sdxl_optimizer" or schema.category.startswith("sdxl_optimizer/"), \
            f"{node_id}: expected category under sdxl_optimizer/, got {schema.category!r}"
        assert schema.display_name, f"{node_id}: expected a display name"
        for inp in schema.inputs:
            assert inp.tooltip, f"{node_id}.{inp.id}: expected a tooltip on every input"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id) == schema.display_name


def test_tiny_prompt_samples_and_decodes_an_image(run_prompt):
    prompt = {
        "1": {"class_type": "SDXLOptTestTinyCheckpoint", "inputs": {"seed": 0, "vae": "taesd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "SDXLOptPatchReport", "inputs": {"model": ["1", 0]}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    res = run_prompt(prompt)
    latent = res.output("6")[0]["samples"]
    image = res.output("7")[0]
    assert latent.shape == (1, 4, 8, 8)
    assert torch.isfinite(latent).all()
    assert latent.std() > 0
    assert image.shape == (1, 64, 64, 3), f"expected a 64x64 RGB IMAGE, got {tuple(image.shape)}"
    assert res.ui["8"]["images"], "expected PreviewImage to write an image"
    assert "SDXLOptPatchReport" in str(prompt["5"]) and "SDXL" in res.ui["5"]["text"][0]


def test_same_seed_same_image(run_prompt):
    prompt = {
        "1": {"class_type": "SDXLOptTestTinyCheckpoint", "inputs": {"seed": 0, "vae": "taesd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "x"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["4", 0],
            "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "t"}},
    }
    a = run_prompt(prompt).output("6")[0]["samples"]
    b = run_prompt(prompt).output("6")[0]["samples"]
    assert torch.equal(a, b)
