"""SDXLOpt Patch Report: names what a model carries and changes nothing."""
from __future__ import annotations

import comfy.patcher_extension
import torch

from sdxl_optimizer.nodes.patch_report import PatchReport
from sdxl_optimizer.ops.patch_report import describe, dtype_histogram, format_report
from tinymodels import factories


def my_wrapper(executor, *args, **kwargs):
    return executor(*args, **kwargs)


def test_describe_names_functions_and_objects():
    assert describe(my_wrapper).endswith("test_patch_report.my_wrapper")
    assert describe([my_wrapper]).startswith("[")
    assert describe(torch.nn.Identity()).endswith("Identity")


def test_dtype_histogram_counts_elements():
    h = dtype_histogram([torch.zeros(3, dtype=torch.float16), torch.zeros(5), torch.zeros(2, 2)])
    assert h == {"float32": 9, "float16": 3}


def test_format_report_lists_sections():
    text = format_report("T", {"a": {"k": "v"}, "b": {}})
    assert text.splitlines() == ["T", "a: 1", "  - k: v", "b: none"]


def test_report_lists_patches_and_leaves_model_unchanged(host):
    import comfy_extras.nodes_freelunch as freelunch

    base = factories.tiny_unet(seed=0)
    (m,) = freelunch.FreeU().patch(base, 1.1, 1.2, 0.9, 0.2)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "test_key", my_wrapper)
    m.add_object_patch("diffusion_model.out", torch.nn.Identity())
    sd = m.model.diffusion_model.input_blocks[0][0].weight
    m.add_patches({"diffusion_model.input_blocks.0.0.weight": (torch.zeros_like(sd),)}, 1.0)
    before = (dict(m.object_patches), {k: list(v) for k, v in m.patches.items()}, repr(m.model_options))

    out = PatchReport.execute(m)
    model_out, report = out.args
    assert model_out is m
    assert (dict(m.object_patches), {k: list(v) for k, v in m.patches.items()}, repr(m.model_options)) == before
    assert "output_block_patch" in report and "nodes_freelunch" in report
    assert "outer_sample/test_key" in report and "my_wrapper" in report
    assert "diffusion_model.out" in report and "Identity" in report
    assert "keys patched: 1" in report
    assert report.startswith("SDXL (UNetModel), weights: float32")
    assert out.ui is not None


def test_report_node_runs_in_a_prompt(run_prompt):
    res = run_prompt({
        "1": {"class_type": "SDXLOptTestTinyCheckpoint", "inputs": {"seed": 0, "vae": "taesd"}},
        "2": {"class_type": "FreeU_V2", "inputs": {"model": ["1", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}},
        "3": {"class_type": "SDXLOptPatchReport", "inputs": {"model": ["2", 0]}},
    })
    text = res.ui["3"]["text"][0]
    assert "block patches: 1" in text and "output_block_patch" in text
    assert res.output("3")[1] == text
