"""Grouped fp8 upcast (ops/fp8_groups.py, attached by the fp8 loaders): the same output as per-layer upcasts
on the tiny SDXL UNet, whatever happens to the weights between forwards (a LoRA merged, a low-VRAM LoRA,
a layer called outside its block, an error inside a block), one warning and the per-layer path when
capture fails, and no graph break under torch.compile.

CI has no GPU: the bookkeeping runs with plain copies instead of CUDA graph replays (`use_graphs=False`);
the graph itself is a capture of exactly those copies, exercised by the GPU benchmark (bench/cases/fp8.py).
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from sdxl_optimizer.nodes import fp8 as nfp8
from sdxl_optimizer.ops import fp8 as ofp8
from sdxl_optimizer.ops import fp8_groups
from tinymodels import bridge, factories

E4M3 = torch.float8_e4m3fn


def tiny_fp8(seed: int = 0, grouped: bool = True):
    m = factories.tiny_unet(seed, model_options={"custom_operations": nfp8.fp8_operations(E4M3, False)})
    if grouped:
        assert nfp8.attach_upcast_groups(m) > 0
        scratch(m).use_graphs = False  # CPU: plain copies instead of a graph replay, same bookkeeping
    return m


def groups(m) -> list:
    return m.model.diffusion_model.__dict__[nfp8.GROUPS_ATTR]


def scratch(m):
    return groups(m)[0].scratch


def run(patcher, inp) -> torch.Tensor:
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return bridge.run_comfy_unet(patcher.model.diffusion_model, inp).clone()


@pytest.fixture(autouse=True)
def _unload_after():
    yield
    import comfy.model_management as mm

    mm.unload_all_models()


def test_plan_takes_the_coarsest_blocks_under_the_limit():
    lin = lambda: torch.nn.Linear(4, 4)  # noqa: E731  (16 weights each)
    small = torch.nn.Sequential(lin(), lin())  # 32: a group
    big = torch.nn.Sequential(torch.nn.Sequential(lin(), lin()), torch.nn.Sequential(lin(), lin()), lin())  # 80
    lone = torch.nn.Sequential(lin(), torch.nn.ReLU())  # one member: no group
    root = torch.nn.Sequential(small, big, lone)
    planned = fp8_groups.plan_groups(root, lambda m: isinstance(m, torch.nn.Linear), max_params=40)
    assert [b for b, _ in planned] == [small, big[0], big[1]]
    assert all(len(layers) == 2 for _, layers in planned)


def test_attach_groups_the_tiny_unet_blocks_once():
    m = tiny_fp8()
    gs = groups(m)
    assert nfp8.attach_upcast_groups(m) == 0, "attaching twice must not add hooks twice"
    members = {id(layer) for g in gs for layer in g.layers}
    fp8_layers = [x for x in m.model.diffusion_model.modules() if isinstance(x, nfp8.Fp8Layer)]
    assert len(members) > 0.8 * len(fp8_layers), "expected most fp8 layers to sit in a group"
    assert scratch(m).capacity == max(g.numel for g in gs)


def test_grouped_output_equals_per_layer_upcast_and_nothing_stays_live():
    inp = bridge.random_unet_inputs(0, batch=2, size=8)
    ref = run(tiny_fp8(grouped=False), inp)
    m = tiny_fp8()
    out = run(m, inp)
    assert torch.equal(out, ref)
    gs = groups(m)
    assert all(g.replays == 1 and g.captures == 1 for g in gs), "expected one upcast per block per forward"
    assert not any(g.live for g in gs) and scratch(m).live is None
    assert torch.equal(run(m, inp), ref)
    assert all(g.replays == 2 and g.captures == 1 for g in gs), "unchanged weights must not be rebuilt"


def test_a_merged_lora_rebuilds_and_a_lowvram_lora_opts_out(capsys):
    """ComfyUI replaces the patched weights (full load) or applies weight functions at compute time
    (low VRAM): both give exactly what the per-layer path gives with the same LoRA."""
    import comfy.model_management as mm
    import comfy.sd
    from test_fp8 import forward_lowvram, tiny_lora

    inp = bridge.random_unet_inputs(1, batch=1, size=8)
    plain, grouped = tiny_fp8(grouped=False), tiny_fp8()
    lora = tiny_lora(plain, seed=5)
    for path in (run, forward_lowvram):
        ref = path(comfy.sd.load_lora_for_models(plain, None, lora, 1.0, 0.0)[0], inp)
        captures = sum(g.captures for g in groups(grouped))
        out = path(comfy.sd.load_lora_for_models(grouped, None, lora, 1.0, 0.0)[0], inp)
        assert torch.equal(out, ref), path.__name__
        mm.unload_all_models()
        if path is run:
            assert sum(g.captures for g in groups(grouped)) > captures, "patched weights must be re-captured"
    assert torch.equal(run(grouped, inp), run(plain, inp)), "after unpatching: the original weights again"


def test_a_layer_called_outside_its_block_or_after_an_error_upcasts_itself():
    m = tiny_fp8()
    inp = bridge.random_unet_inputs(2, batch=1, size=8)
    run(m, inp)
    g = groups(m)[0]
    layer = g.layers[0]
    x = torch.randn(3, layer.weight.shape[1]) if isinstance(layer, torch.nn.Linear) else None
    if x is not None:
        assert torch.equal(layer(x), F.linear(x, layer.weight.float(), layer.bias))
    # an error inside a block: the post hook still runs (always_call), no group stays live
    boom = RuntimeError("interrupted")

    def raising(*a, **k):
        raise boom

    target = g.layers[-1]
    target.forward = raising
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            run(m, inp)
    finally:
        del target.forward
    assert not any(x.live for x in groups(m)) and scratch(m).live is None


def test_capture_failure_warns_once_and_falls_back(caplog):
    m = tiny_fp8()
    scratch(m).use_graphs = True  # the real capture path ...
    scratch(m).accepts = lambda device: True  # ... on the CPU, where CUDA graphs cannot be made
    inp = bridge.random_unet_inputs(3, batch=1, size=8)
    ref = run(tiny_fp8(grouped=False), inp)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(run(m, inp), ref)
        assert torch.equal(run(m, inp), ref)
    lines = [r for r in caplog.records if "grouped upcast switched off" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert scratch(m).disabled and scratch(m).buffer is None


def test_grouped_block_compiles_fullgraph_and_matches():
    """Under torch.compile the hooks and the layers' group lookup do nothing: no graph break."""
    ops = nfp8.fp8_operations(E4M3, False)
    block = torch.nn.Sequential(ops.Linear(8, 16), torch.nn.GELU(), ops.Linear(16, 8))
    root = torch.nn.Sequential(block)
    for lin in (block[0], block[2]):
        ref = torch.nn.Linear(lin.in_features, lin.out_features)
        lin.load_state_dict(ref.state_dict())
    planned = fp8_groups.plan_groups(root, nfp8._group_member)
    assert [b for b, _ in planned] == [block]
    s = fp8_groups.UpcastScratch(root, max(sum(fp8_groups._aligned(x.weight.numel()) for x in layers)
                                           for _, layers in planned), use_graphs=False)
    g = fp8_groups.UpcastGroup(planned[0][1], s, nfp8._group_eligible)
    for i, lin in enumerate(g.layers):
        lin.__dict__["_fp8_slot"] = (g, i)
    root.register_forward_pre_hook(s.begin)
    root.register_forward_hook(s.end, always_call=True)
    x = torch.randn(4, 8)
    eager = root(x)
    assert g.replays == 1
    compiled = torch.compile(root, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager) and g.replays == 1
    torch._dynamo.reset()
    assert torch.equal(eager, F.linear(F.gelu(F.linear(x, block[0].weight.float(), block[0].bias)),
                                       block[2].weight.float(), block[2].bias))
    assert ofp8.is_fp8(block[0].weight.dtype)


def test_the_scratch_moves_with_the_model_and_is_not_saved():
    """Offloading moves the scratch with the weights (no 70 MB left behind on the GPU); the next forward
    re-captures on the moved tensors and computes the same."""
    m = tiny_fp8()
    inp = bridge.random_unet_inputs(4, batch=1, size=8)
    ref = run(m, inp)
    dm = m.model.diffusion_model
    buf = scratch(m).buffer
    assert buf is not None and any(b is buf for b in dm.buffers())
    assert not any("upcast_scratch" in k for k in dm.state_dict()), "the scratch must not be saved"
    captures = sum(g.captures for g in groups(m))
    dm._apply(lambda t: t.clone())  # what .to(device) does: every parameter and buffer gets new memory
    assert scratch(m).buffer is not buf
    assert torch.equal(run(m, inp), ref)
    assert sum(g.captures for g in groups(m)) == captures + len(groups(m))
