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


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to summation order: joined projection matmuls (one [q;k;v] matrix) may block the same
    sums differently from three matmuls (bitwise equal on the tiny UNet here and on an H100; not promised)."""
    return bridge.rel_err(a, b) <= 1e-6


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
    assert same(out, ref)
    gs = groups(m)
    assert all(g.replays == 1 and g.captures == 1 for g in gs), "expected one upcast per block per forward"
    assert not any(g.live for g in gs) and scratch(m).live is None
    assert same(run(m, inp), ref)
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
        assert same(out, ref), path.__name__
        mm.unload_all_models()
        if path is run:
            assert sum(g.captures for g in groups(grouped)) > captures, "patched weights must be re-captured"
    assert same(run(grouped, inp), run(plain, inp)), "after unpatching: the original weights again"


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
    assert same(run(m, inp), ref)
    assert sum(g.captures for g in groups(m)) == captures + len(groups(m))


# ---------------------------------------------------------------- shared projections (q/k/v in one matmul)

def count_linear(monkeypatch) -> list:
    """Count the matmuls the fp8 layers issue (nodes/fp8.py's F.linear)."""
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def linear(x, w, b=None):
            calls.append(tuple(w.shape))
            return F.linear(x, w, b)

    monkeypatch.setattr(nfp8, "F", Counting())
    return calls


def test_attention_projections_share_one_matmul(monkeypatch):
    """Self-attention q/k/v (and cross-attention k/v) of a block run as one matmul on the joined weights:
    same output as per-layer upcasts, three matmuls fewer per transformer block."""
    inp = bridge.random_unet_inputs(5, batch=2, size=8)
    plain, grouped = tiny_fp8(grouped=False), tiny_fp8()
    ref = run(plain, inp)
    attn = [m for m in grouped.model.diffusion_model.modules() if hasattr(m, "to_q") and hasattr(m, "to_k")]
    assert attn and sum(len(g.chains) for g in groups(grouped)) == len(attn)
    calls = count_linear(monkeypatch)
    run(plain, inp)
    n_plain = len(calls)
    calls.clear()
    out = run(grouped, inp)
    assert same(out, ref)
    self_attn = sum(1 for m in attn if m.to_q.weight.shape[1] == m.to_k.weight.shape[1])
    assert len(calls) == n_plain - 2 * self_attn - (len(attn) - self_attn), (len(calls), n_plain, len(attn))
    assert all(not g.pending and not g.chains_off for g in groups(grouped))


def test_a_projection_called_on_another_input_switches_its_chain_off():
    """An attn1 patch that hands to_k a copy of the input (equal values, another tensor): to_k computes on
    its own input, the chain is switched off, and the output is what the per-layer path gives."""
    inp = bridge.random_unet_inputs(6, batch=1, size=8)

    def patch(n, context, value, extra):
        return n, context * 1.0, value

    opts = {"patches": {"attn1_patch": [patch]}}
    plain, grouped = tiny_fp8(grouped=False), tiny_fp8()
    import comfy.model_management as mm

    mm.load_models_gpu([plain, grouped])
    with torch.no_grad():
        ref = bridge.run_comfy_unet(plain.model.diffusion_model, inp, opts)
        out = bridge.run_comfy_unet(grouped.model.diffusion_model, inp, opts)
    assert same(out, ref)
    off = sum(len(g.chains_off) for g in groups(grouped))
    self_attn = sum(1 for g in groups(grouped) for c in g.chains.values() if len(c) == 3)
    assert off == self_attn, "expected every self-attention chain switched off, cross-attention kept"


def test_a_chain_whose_followers_are_not_called_is_switched_off():
    """ops level: the lead's matmul hands slices to followers called on the same input; followers that keep
    not being called (UNUSED_LIMIT block calls) switch the chain off; a one-off leaves it on."""
    lins = [torch.nn.Linear(8, n, bias=False) for n in (16, 8, 8)]  # 64-element multiples: back to back
    for m in lins:
        m.weight = torch.nn.Parameter(ofp8.quantize(m.weight.detach(), E4M3), requires_grad=False)
    root = torch.nn.Sequential(*lins)
    s = fp8_groups.UpcastScratch(root, 256, use_graphs=False)
    g = fp8_groups.UpcastGroup(lins, s, lambda m, d: True, chains=[(0, 1, 2)])
    x = torch.randn(5, 8)
    s.begin(root, (x,))
    joined = g.joined_view(0, x)
    assert joined is not None and joined.shape == (32, 8)
    q = g.share(0, x, F.linear(x, joined))
    assert same(q, F.linear(x, lins[0].weight.float()))
    assert same(g.shared(1, x), F.linear(x, lins[1].weight.float()))
    assert g.shared(2, x.clone()) is None and g.chains_off == {0}, "another input: chain off"
    g.chains_off.clear()
    for i in range(fp8_groups.UNUSED_LIMIT):
        assert g.joined_view(0, x) is not None
        g.share(0, x, F.linear(x, joined))
        s.end(root, (x,), None)  # followers never called
        s.begin(root, (x,))
        assert (g.chains_off == {0}) == (i == fp8_groups.UNUSED_LIMIT - 1)
    assert g.joined_view(0, x) is None and not g.pending


# ---------------------------------------------------------------- one-kernel grouped upcast (Triton)

_UPCAST_SCRIPT = r"""
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("fp8_ops_interp", sys.argv[1])
m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)
out = []
for sd in (torch.float8_e4m3fn, torch.float8_e5m2):
    for dd in (torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        ws = [m.quantize(torch.randn(n, generator=g), sd) for n in (300, 5000, 64)]
        scratch = torch.full((6000,), -7.0, dtype=dd)
        views, off = [], 0
        for w in ws:
            views.append(scratch[off:off + w.numel()]); off += (w.numel() + 63) // 64 * 64
        table = torch.tensor(m.upcast_table(list(zip(ws, views)), block=1024), dtype=torch.int64)
        m.triton_upcast_many(table, sd, dd, block=1024)
        gaps_kept = bool((scratch[300:320] == -7).all())
        out.append([str(sd), str(dd), all(torch.equal(v, w.to(dd)) for w, v in zip(ws, views)), gaps_kept,
                    table.numel() // 3])
print(json.dumps(out))
"""


def test_one_kernel_upcast_matches_the_copies_in_the_cpu_interpreter():
    """The Triton multi-tensor upcast writes exactly what `.to()` gives, weight by weight, and nothing else."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", _UPCAST_SCRIPT, ofp8.__file__], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=120)
    assert proc.returncode == 0, f"expected the interpreted kernel to run, got:\n{proc.stderr[-3000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 4
    for sd, dd, exact, gaps_kept, n_rows in rows:
        assert exact and gaps_kept, f"{sd} -> {dd}: exact {exact}, alignment gaps untouched {gaps_kept}"
        assert n_rows == 1 + 5 + 1, "one table row per 1024 elements of each weight"


def test_batched_launch_runs_once_before_capture_and_a_failure_falls_back(caplog):
    """The group's one-kernel launch is made and run once outside the capture; a factory that fails switches
    the batched path off for the scratch with one warning (the copies take over); CPU gets none."""
    m = tiny_fp8()
    inp = bridge.random_unet_inputs(7, batch=1, size=8)
    run(m, inp)
    g = groups(m)[0]
    ran = []
    g.scratch.batched = lambda pairs: (lambda: ran.append(len(pairs)))
    assert g._batched_launch(g.views) is not None and ran == [sum(v is not None for v in g.views)]

    def broken(pairs):
        raise RuntimeError("no kernel here")

    g.scratch.batched = broken
    with caplog.at_level(logging.WARNING):
        assert g._batched_launch(g.views) is None and g._batched_launch(g.views) is None
    assert g.scratch.batched is None
    assert len([r for r in caplog.records if "one-kernel grouped upcast failed" in r.getMessage()]) == 1
    pairs = [(layer.weight, v) for layer, v in zip(g.layers, g.views) if v is not None]
    assert nfp8.batched_upcast(pairs) is None, "CPU tensors: no Triton launch"
    assert not ofp8.upcast_available("cpu", E4M3, torch.float16), "the kernel's probe: CUDA only"
    rows = ofp8.upcast_table(pairs[:1], block=96)
    assert rows[2::3] == [min(96, pairs[0][0].numel() - o) for o in range(0, pairs[0][0].numel(), 96)]
    with pytest.raises(ValueError, match="aligned"):
        ofp8.upcast_table([(pairs[0][0].flatten()[1:], pairs[0][1].flatten()[1:])], block=96)


def test_inside_a_larger_capture_each_group_puts_its_one_kernel_in_and_keeps_it_alive(monkeypatch):
    """Inside the capture of a whole UNet call (nodes/_unet_graph.py) a group cannot launch its own graph: the
    one-kernel upcast it made at its last eager build goes into the larger graph, which keeps the launch and
    the scratch alive. A group whose weights moved since, or a scratch not made yet, stands aside (its layers
    upcast themselves): nothing is built or allocated inside a capture. The result never changes."""
    from sdxl_optimizer.ops import cuda_graphs

    inp = bridge.random_unet_inputs(4, batch=1, size=8)
    ref = run(tiny_fp8(grouped=False), inp)
    m = tiny_fp8()
    launched: list[int] = []

    def factory(pairs):  # stands in for the Triton kernel: the same copies, counted
        def launch():
            launched.append(len(pairs))
            for w, v in pairs:
                v.copy_(w)
        return launch

    scratch(m).batched = factory
    assert same(run(m, inp), ref)  # eager: builds every group and its launch (run once there)
    gs = groups(m)
    assert all(g.launch is not None for g in gs) and len(launched) == len(gs)
    assert scratch(m).batched_eager == nfp8.BATCHED_UPCAST, "the loaders' eager groups use it too"

    def captured_forward() -> tuple[torch.Tensor, list]:
        monkeypatch.setattr(fp8_groups.UpcastScratch, "capturing", lambda self, device: True)
        cuda_graphs._KEEP.append([])
        try:
            out = run(m, inp)
        finally:
            kept = cuda_graphs._KEEP.pop()
            monkeypatch.undo()
        return out, kept

    launched.clear()
    out, kept = captured_forward()
    assert same(out, ref)
    assert len(launched) == len(gs) and all(g.captured_into == 1 for g in gs)
    assert all(any(k is g.launch for k in kept) for g in gs) and any(k is scratch(m).buffer for k in kept)

    moved = gs[0].layers[0]  # a weight replaced at another address since the last build (a LoRA merged)
    moved.weight = torch.nn.Parameter(moved.weight.detach().clone(), requires_grad=False)
    launched.clear()
    out, kept = captured_forward()
    assert same(out, ref)
    assert gs[0].captured_into == 1 and len(launched) == len(gs) - 1, "a stale group must stand aside"
    assert same(run(m, inp), ref) and gs[0].launch is not None  # the next eager call rebuilds it

    scratch(m).buffer = None
    launched.clear()
    out, kept = captured_forward()
    assert same(out, ref) and not launched and not kept and scratch(m).buffer is None
