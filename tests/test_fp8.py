"""FP8 weight-cast loaders: fp8 storage math (ops), the custom_operations on a tiny SDXL UNet, LoRA on fp8
weights, and both loader nodes end to end on tiny files (missing, wrong kind, bad dtype, unchanged input).

The stock loaders only detect full-size SDXL; the `tiny_detection` fixture teaches ComfyUI's detector the
tiny test config for one test (monkeypatched, restored after), so files go through the real
comfy.sd.load_checkpoint_guess_config / load_diffusion_model with our model_options.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdxl_optimizer.nodes import fp8 as nfp8
from sdxl_optimizer.ops import fp8 as ofp8
from sdxl_optimizer.ops import fp8_groups
from tinymodels import bridge, factories

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
OPS_FILE = Path(ofp8.__file__)
# Relative error (max|a-b| / max|b|) of one tiny-UNet forward, fp8 weights vs the same fp32 weights, as
# measured here (seed 0, input seed 0, 1x4x8x8, CPU): e4m3fn 0.168, e5m2 0.259 (1x4x16x16 x2: 0.107, 0.259).
# The 5% target is NOT met on this random tiny model. It is the rounding itself (see
# test_fp8_output_is_exactly_the_rounded_weights_output), spread over every layer of a random-weight UNet
# that amplifies it; per-tensor or per-channel scales do not lower it (measured 0.109 / 0.111 at 16x16:
# fp8's relative precision is scale-invariant) and core's all-fp8 cast is no better. The bounds below
# guard against regressions above those figures.
FIDELITY_BOUND = {E4M3: 0.20, E5M2: 0.30}
# Per layer (each fp8 Linear/Conv2d on the very input its fp32 twin gets inside that forward) the error is
# what one rounding gives: e4m3fn median 0.028, max 0.043 over the tiny UNet's 203 layers; e5m2 0.054 / 0.090.
# The 5% target holds layer by layer for e4m3fn; the forward's 0.168 is those errors compounded over depth.
LAYER_BOUND = {E4M3: 0.05, E5M2: 0.10}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def forward(patcher, inp: dict) -> torch.Tensor:
    """One UNet forward of a ModelPatcher with its weight patches applied the host's way (full load)."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return bridge.run_comfy_unet(patcher.model.diffusion_model, inp).clone()


def forward_lowvram(patcher, inp: dict) -> torch.Tensor:
    """One forward with every layer in low-VRAM mode: LoRA patches applied at compute time (weight_function)."""
    import comfy.model_management as mm

    mm.unload_all_models()
    cpu = torch.device("cpu")
    patcher.patch_model(device_to=cpu, lowvram_model_memory=1, load_weights=True)
    try:
        assert patcher.model.model_lowvram, "expected the low-VRAM path (weight functions), got a full load"
        with torch.no_grad():
            return bridge.run_comfy_unet(patcher.model.diffusion_model, inp).clone()
    finally:
        patcher.unpatch_model(cpu)


def tiny_fp8(seed: int = 0, dtype: torch.dtype = E4M3, fused: bool = False):
    return factories.tiny_unet(seed, model_options={"custom_operations": nfp8.fp8_operations(dtype, fused)})


def tiny_lora(patcher, seed: int, rank: int = 4, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA on every 2-D transformer weight of the tiny UNet, one entry per weight, drawn in
    sorted key order (ComfyUI's key map also lists diffusers-style aliases, in an order that varies by run)."""
    import comfy.lora

    gen = torch.Generator().manual_seed(seed)
    msd = patcher.model.state_dict()
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    lora = {}
    for key in sorted(msd):
        if not (key.startswith("diffusion_model.") and key.endswith(".weight") and "transformer_blocks" in key
                and msd[key].ndim == 2):
            continue
        name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        assert key_map.get(name) == key, f"expected ComfyUI to map {name} to {key}, got {key_map.get(name)}"
        out_f, in_f = msd[key].shape
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
        lora[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * scale / rank**0.5
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora


@pytest.fixture(scope="module")
def tiny():
    """The tiny UNet (seed 0) in fp32 and with fp8 weights (factories.tiny_unet + our custom_operations), built
    once for the module (tests restore what they patch), and one small input batch."""
    return {"fp32": factories.tiny_unet(0), E4M3: tiny_fp8(0, E4M3), E5M2: tiny_fp8(0, E5M2),
            "inp": bridge.random_unet_inputs(0, batch=1, size=8)}


def run(patcher_or_unet, inp: dict) -> torch.Tensor:
    inner = getattr(getattr(patcher_or_unet, "model", None), "diffusion_model", patcher_or_unet)
    with torch.no_grad():
        return bridge.run_comfy_unet(inner, inp)


@pytest.fixture(autouse=True)
def _unload_after():
    yield
    import comfy.model_management as mm

    mm.unload_all_models()


# ---------------------------------------------------------------------------------------------------------
# ops: torch only
# ---------------------------------------------------------------------------------------------------------

def test_quantize_rounds_to_nearest_and_saturates():
    w = torch.tensor([0.1, -0.3, 1000.0, -1e6, 2.0**-7, 0.0])
    q = ofp8.quantize(w, E4M3)
    assert q.dtype == E4M3
    assert q.float()[2] == 448 and q.float()[3] == -448, f"expected saturation at +-448, got {q.float()}"
    assert torch.equal(ofp8.quantize(q.float(), E4M3).float(), q.float()), "expected fp8 values to round-trip"
    fine = torch.linspace(-2, 2, 4001)
    err = (ofp8.quantize(fine, E4M3).float() - fine).abs() / fine.abs().clamp_min(2.0**-6)
    assert err.max() <= 2.0**-4 + 1e-6, f"expected nearest rounding (<= 1/16 relative), got {err.max():.4f}"
    assert ofp8.upcast(q, torch.float16).dtype == torch.float16
    assert torch.equal(ofp8.quantize(q, E5M2).float(), ofp8.quantize(q.float(), E5M2).float()), "fp8 -> other fp8"


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_storage_mixin_quantizes_on_load_and_keeps_fp8_through_casts(dtype):
    class Linear(ofp8.Fp8WeightStorage, torch.nn.Linear):
        fp8_storage_dtype = dtype

    class Conv(ofp8.Fp8WeightStorage, torch.nn.Conv2d):
        fp8_storage_dtype = dtype

    for layer, src in ((Linear(8, 4), torch.nn.Linear(8, 4)), (Conv(3, 5, 3), torch.nn.Conv2d(3, 5, 3))):
        assert layer.weight.dtype == dtype and layer.bias.dtype == torch.float32
        layer.load_state_dict(src.state_dict())
        assert layer.weight.dtype == dtype, f"expected the loaded weight in {dtype}, got {layer.weight.dtype}"
        assert torch.equal(layer.weight.float(), ofp8.quantize(src.weight.data, dtype).float())
        assert torch.equal(layer.bias, src.bias.data), "expected the bias kept in the compute dtype, exact"
        before = layer.weight.float().clone()
        for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
            cast(layer)
            assert layer.weight.dtype == dtype, "expected .half()/.to(dtype)/.float() to keep fp8 storage"
            assert torch.equal(layer.weight.float(), before), "expected the fp8 values unchanged by casts"
        assert layer.bias.dtype == torch.float32
    with pytest.raises(RuntimeError, match="size mismatch"):
        Linear(8, 4).load_state_dict(torch.nn.Linear(8, 5).state_dict())


def test_linear_upcast_path_matches_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 24, generator=gen)
    w8 = ofp8.quantize(torch.randn(16, 24, generator=gen) * 0.2, E4M3)
    b = torch.randn(16, generator=gen)
    got = ofp8.linear(x, w8, b, fused=True)  # CPU: the fused path does not apply, upcast is used
    assert torch.equal(got, F.linear(x, w8.float(), b))
    assert not ofp8.fused_applicable(x, w8)


def test_storage_dtype_resolution_and_messages(monkeypatch):
    cpu = torch.device("cpu")
    assert ofp8.resolve_storage_dtype("auto", cpu) == E4M3
    assert ofp8.resolve_storage_dtype("float8_e5m2", cpu) == E5M2
    with pytest.raises(ofp8.Fp8UnsupportedError, match=r"expected weight_dtype to be one of .*got 'fp4'.*Fix"):
        ofp8.resolve_storage_dtype("fp4", cpu)
    # a device that cannot hold e4m3fn: auto falls back to e5m2, the explicit choice fails with the fix
    monkeypatch.setattr(ofp8, "can_hold", lambda dtype, device: dtype == E5M2)
    assert ofp8.resolve_storage_dtype("auto", cpu) == E5M2
    with pytest.raises(ofp8.Fp8UnsupportedError, match=r"got 'float8_e4m3fn'.*cannot store.*Fix: set weight_dtype"):
        ofp8.resolve_storage_dtype("float8_e4m3fn", cpu)
    monkeypatch.setattr(ofp8, "can_hold", lambda dtype, device: False)
    with pytest.raises(ofp8.Fp8UnsupportedError, match=r"expected a device that can store float8.*Fix"):
        ofp8.resolve_storage_dtype("auto", cpu)


def test_plan_on_cpu_is_storage_only_and_says_why():
    p = ofp8.plan("auto", "cpu")
    assert (p.storage_dtype, p.fused) == (E4M3, False)
    assert "cpu" in p.reason and "per-layer upcast" in p.describe()
    off = ofp8.plan("float8_e5m2", "cpu", fused=False)
    assert off.reason == ofp8.SWITCHED_OFF and off.storage_dtype == E5M2


_INTERPRET_SCRIPT = r"""
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("fp8_ops_interp", sys.argv[1])
m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)
out = []
for wd in (torch.float8_e4m3fn, torch.float8_e5m2):
    for xd in (torch.float16, torch.float32):   # the interpreter's bf16 tl.dot is broken (CPU-only issue)
        for (M, N, K, bias) in ((37, 45, 70, True), (64, 32, 64, False), (5, 33, 96, True)):
            g = torch.Generator().manual_seed(M + N + K)
            x = torch.randn(M, K, generator=g).to(xd)
            w = m.quantize(torch.randn(N, K, generator=g) * 0.1, wd)
            b = torch.randn(N, generator=g).to(xd) if bias else None
            y = m.triton_fp8_matmul(x, w, b, autotune=False)
            ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
            out.append([str(wd), str(xd), M, N, K, str(y.dtype) == str(xd), list(y.shape) == [M, N],
                        float((y.float() - ref).abs().max() / ref.abs().max())])
x3 = torch.randn(2, 9, 40).half(); w = m.quantize(torch.randn(24, 40) * 0.1, torch.float8_e4m3fn)
y3 = m._fused_linear_impl(x3, w, None)
out.append(["3d", list(y3.shape) == [2, 9, 24], float((y3.float() - x3.float() @ w.float().t()).abs().max())])
print(json.dumps(out))
"""


def test_triton_kernel_matches_reference_in_the_cpu_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT, str(OPS_FILE)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, f"expected the interpreted kernel to run, got:\n{proc.stderr[-3000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for wd, xd, m, n, k, dtype_ok, shape_ok, err in rows[:-1]:
        tol = 2e-3 if "float16" in xd else 1e-5
        assert dtype_ok and shape_ok, f"{wd} x {xd} {m}x{n}x{k}: wrong output dtype or shape"
        assert err <= tol, f"{wd} x {xd} {m}x{n}x{k}: expected relative error <= {tol}, got {err:.2e}"
    assert rows[-1][1] and rows[-1][2] < 1e-2, f"3-D input: {rows[-1]}"


def test_fused_op_is_one_opaque_node_under_torch_compile_fullgraph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: [torch.zeros(2, 5, 16, dtype=torch.float16)]

    w8 = ofp8.quantize(torch.randn(16, 8), E4M3)
    fn = torch.compile(lambda x, w, b: ofp8.fused_linear(x, w, b) * 2, fullgraph=True, backend=backend)
    fn(torch.randn(2, 5, 8, dtype=torch.float16), w8, torch.zeros(16, dtype=torch.float16))
    code = graphs[0].code
    assert "sdxlopt.fp8_weight_linear" in code, f"expected the custom op in the graph, got:\n{code}"
    torch._dynamo.reset()


def test_upcast_linear_compiles_fullgraph():
    fn = torch.compile(lambda x, w, b: ofp8.linear(x, w, b, fused=True), fullgraph=True, backend="eager")
    x, w8, b = torch.randn(3, 8), ofp8.quantize(torch.randn(4, 8), E4M3), torch.randn(4)
    assert torch.equal(fn(x, w8, b), F.linear(x, w8.float(), b))
    torch._dynamo.reset()


def test_fp8_layers_compile_fullgraph():
    """The layers' forward (host cast + our routing) has no Python state that changes per call: it traces."""
    for fused in (False, True):
        ops = nfp8.fp8_operations(E4M3, fused)
        lin, conv = ops.Linear(16, 8), ops.Conv2d(4, 8, 3, padding=1)
        lin.load_state_dict(torch.nn.Linear(16, 8).state_dict())
        conv.load_state_dict(torch.nn.Conv2d(4, 8, 3, padding=1).state_dict())
        for mod, x in ((lin, torch.randn(3, 16)), (conv, torch.randn(1, 4, 8, 8))):
            assert torch.equal(torch.compile(mod, fullgraph=True, backend="eager")(x), mod(x))
    torch._dynamo.reset()


def test_linear_routes_to_the_fused_kernel_unless_the_host_patches_the_weight(monkeypatch):
    """Routing without a GPU: the fused kernel is stubbed; weight functions (a low-VRAM LoRA) force the host's
    upcast path, so a patch is never applied to an fp8 weight."""
    calls = []

    def fake_fused(x, w, b=None):
        calls.append(tuple(x.shape))
        return F.linear(x, w.to(x.dtype), b)

    monkeypatch.setattr(ofp8, "fused_applicable", lambda x, w: True)
    monkeypatch.setattr(ofp8, "fused_linear", fake_fused)
    src = torch.nn.Linear(16, 8)
    x = torch.randn(32, 16)
    lin = nfp8.fp8_operations(E4M3, fused=True).Linear(16, 8)
    lin.load_state_dict(src.state_dict())
    w = lin.weight.float()
    assert torch.equal(lin(x), F.linear(x, w, src.bias)) and calls == [(32, 16)]
    lin.weight_function = [lambda weight: weight * 2]  # what ModelPatcher attaches in low-VRAM mode
    assert torch.allclose(lin(x), F.linear(x, 2 * w, src.bias)) and len(calls) == 1
    plain = nfp8.fp8_operations(E4M3, fused=False).Linear(16, 8)
    plain.load_state_dict(src.state_dict())
    assert torch.equal(plain(x), F.linear(x, w, src.bias)) and len(calls) == 1


def test_resident_layers_compute_directly_and_the_host_path_stays_for_the_rest(tiny, monkeypatch):
    """A fully loaded fp8 model never calls comfy.ops.cast_bias_weight (its per-call Python made eager fp8
    CPU-bound); a norm whose weights are not in the input's dtype, and a layer with a weight function, still
    go through the host's cast path and compute the same thing."""
    import comfy.ops

    calls = []
    real = comfy.ops.cast_bias_weight

    def counting(s, *args, **kwargs):
        calls.append(type(s).__name__)
        return real(s, *args, **kwargs)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", counting)
    assert torch.equal(run(tiny[E4M3], tiny["inp"]), run(tiny[E4M3], tiny["inp"]))
    assert calls == [], f"expected no host cast on a resident model, got {len(calls)} ({sorted(set(calls))})"

    ops = nfp8.fp8_operations(E4M3)
    x = torch.randn(2, 8, 4, 4)
    ref = torch.nn.GroupNorm(4, 8)
    for p in ref.parameters():
        torch.nn.init.normal_(p)
    gn = ops.GroupNorm(4, 8, dtype=torch.float16)
    gn.load_state_dict(ref.state_dict())
    out = gn(x)  # fp16 weights, fp32 input: manual_cast casts them
    assert calls == ["Fp8GroupNorm"] and out.dtype == torch.float32
    assert torch.allclose(out, F.group_norm(x, 4, ref.weight.half().float(), ref.bias.half().float()), atol=1e-6)
    ln = ops.LayerNorm(8)
    ln.load_state_dict(torch.nn.LayerNorm(8).state_dict())
    ln.weight_function = [lambda w: w * 3]
    y = torch.randn(3, 8)
    assert torch.allclose(ln(y), F.layer_norm(y, (8,), 3 * ln.weight, ln.bias)) and calls[-1] == "Fp8LayerNorm"


# ---------------------------------------------------------------------------------------------------------
# custom_operations on the tiny SDXL UNet (the node's core, without files)
# ---------------------------------------------------------------------------------------------------------

def test_custom_operations_store_linear_and_conv_in_fp8_rest_in_compute_dtype(tiny):
    m = tiny[E4M3]
    inner = m.model.diffusion_model
    assert nfp8.is_fp8_model(m) and not nfp8.is_fp8_model(tiny["fp32"])
    kinds = {}
    for name, mod in inner.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            assert mod.weight.dtype == E4M3, f"{name}: expected fp8 weight, got {mod.weight.dtype}"
            assert mod.bias is None or mod.bias.dtype == torch.float32, f"{name}: bias {mod.bias.dtype}"
            kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
        elif isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            assert mod.weight.dtype == torch.float32, f"{name}: expected the norm in the compute dtype"
    assert kinds.get("Linear", 0) > 20 and kinds.get("Conv2d", 0) > 10, kinds
    sizes = ofp8.weight_bytes(inner)
    ref = ofp8.weight_bytes(tiny["fp32"].model.diffusion_model)["float32"]
    assert sizes["float8_e4m3fn"] + sizes["float32"] < 0.27 * ref, f"expected ~1/4 of fp32 bytes, got {sizes}"
    assert nfp8.fp8_operations(E4M3) is nfp8.fp8_operations(E4M3), "expected one ops class per (dtype, fused)"


def test_fp8_output_is_exactly_the_rounded_weights_output(tiny):
    """Our path adds no error beyond rounding the weights: same output as fp32 layers holding fp8 values."""
    inner = copy.deepcopy(tiny["fp32"].model.diffusion_model)
    with torch.no_grad():
        for mod in inner.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                mod.weight.copy_(ofp8.quantize(mod.weight, E4M3).float())
    assert bridge.rel_err(run(tiny[E4M3], tiny["inp"]), run(inner, tiny["inp"])) < 1e-6


def test_fidelity_vs_fp32_and_fp16(tiny, capsys):
    """One forward, fp8 weights vs the same weights in fp32 (CPU compute dtype) and in fp16 (GPU compute dtype)."""
    inp = tiny["inp"]
    inp16 = {k: v.half() if v.is_floating_point() else v for k, v in inp.items()}
    y32 = run(tiny["fp32"], inp)
    y16 = run(copy.deepcopy(tiny["fp32"].model.diffusion_model).half(), inp16).float()
    lines = [f"fp16 vs fp32 (no fp8): rel err {bridge.rel_err(y16, y32):.5f}"]
    for dtype in (E4M3, E5M2):
        y8 = run(tiny[dtype], inp)
        # fp16 compute: .half() casts norms/biases and keeps the fp8 weights (the storage survives casts)
        m8_16 = copy.deepcopy(tiny[dtype].model.diffusion_model).half()
        assert m8_16.out[2].weight.dtype == dtype and m8_16.out[2].bias.dtype == torch.float16
        y8_16 = run(m8_16, inp16).float()
        assert torch.isfinite(y8).all() and torch.isfinite(y8_16).all()
        err32, err16 = bridge.rel_err(y8, y32), bridge.rel_err(y8_16, y16)
        norm32 = float((y8 - y32).norm() / y32.norm())
        lines.append(f"{ofp8.dtype_name(dtype)}: vs fp32 rel err {err32:.4f} (norm-wise {norm32:.4f}); "
                     f"fp16 compute vs fp16 {err16:.4f}")
        assert err32 <= FIDELITY_BOUND[dtype], f"{dtype}: expected rel err <= {FIDELITY_BOUND[dtype]}, got {err32:.4f}"
        assert err16 <= FIDELITY_BOUND[dtype] + 0.02, f"{dtype}, fp16 compute: got {err16:.4f}"
    with capsys.disabled():
        print("\n[fp8 fidelity] tiny UNet, one forward (max|a-b|/max|b|): " + "; ".join(lines))


def test_each_layer_alone_stays_within_one_rounding(tiny, capsys):
    """Every fp8 layer, run on the input its fp32 twin receives inside one forward of the fp32 model, is
    within LAYER_BOUND of that twin's output: what a single rounding of its weights costs (the whole forward's
    larger error is these compounded over the random UNet's depth)."""
    inp = tiny["inp"]
    twins32 = dict(tiny["fp32"].model.diffusion_model.named_modules())
    lines = []
    for dtype in (E4M3, E5M2):
        twins8 = dict(tiny[dtype].model.diffusion_model.named_modules())
        errs: dict[str, float] = {}

        def compare(module, args, out, name, twins8=twins8, errs=errs):
            with torch.no_grad():
                errs[name] = bridge.rel_err(twins8[name](*args), out)

        hooks = [m.register_forward_hook(lambda m, a, o, n=n, f=compare: f(m, a, o, n)) for n, m in twins32.items()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        try:
            run(tiny["fp32"], inp)
        finally:
            for h in hooks:
                h.remove()
        vals = sorted(errs.values())
        worst = max(errs, key=errs.get)
        lines.append(f"{ofp8.dtype_name(dtype)}: {len(vals)} layers, median {vals[len(vals) // 2]:.4f}, "
                     f"max {vals[-1]:.4f} ({worst})")
        assert len(vals) > 150 and all(ofp8.is_fp8(twins8[n].weight.dtype) for n in errs)
        assert vals[-1] <= LAYER_BOUND[dtype], f"{dtype}: expected every layer <= {LAYER_BOUND[dtype]}, got {lines[-1]}"
    with capsys.disabled():
        print("\n[fp8 fidelity per layer] tiny UNet, each layer on its fp32 twin's input (max|a-b|/max|b|): "
              + "; ".join(lines))


# ---------------------------------------------------------------------------------------------------------
# fp8 compute (torch._scaled_mm): runs on CPU in this torch, so the path itself is tested here; on a GPU the
# plan only chooses it where the device passes its self-test (CUDA sm_89+)
# ---------------------------------------------------------------------------------------------------------

# fp8 compute adds one activation rounding per Linear call: measured on the tiny UNet (seed 0, batch 2, 8x8,
# fp16 on CPU) one forward vs fp32 0.174 (storage only 0.163); per layer (each of the 153 compute Linear
# calls on its fp32 twin's input) median 0.040, max 0.066 (storage only: median 0.028, max 0.043). Until
# session 12 only calls with rows in multiples of 16 took fp8 (72 layers): 0.181, the same per-layer figures.
COMPUTE_FIDELITY_BOUND = 0.25
COMPUTE_LAYER_BOUND = 0.08


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [E4M3, E5M2])
def test_scaled_linear_is_the_rounded_activation_times_the_stored_weight(xdtype, wdtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 16, 64, generator=gen) * 3).to(xdtype)
    w = ofp8.quantize(torch.randn(48, 64, generator=gen) * 0.1, wdtype)
    b = torch.randn(48, generator=gen).to(xdtype)
    assert ofp8.scaled_applicable(x, w)
    y = ofp8.scaled_linear(x, w, b)
    assert y.dtype == xdtype and y.shape == (2, 16, 48)
    xq, scale = ofp8.quantize_activation(x.reshape(-1, 64))
    assert xq.dtype == E4M3 and scale.dtype == torch.float32 and float(scale) == 1.0
    ref = F.linear(xq.float() * scale, w.float(), b.float()).reshape(2, 16, 48)
    assert bridge.rel_err(y.float(), ref) < 1e-2, "expected exactly the rounded operands' product (output rounding)"
    exact = F.linear(x.float(), w.float(), b.float())
    assert bridge.rel_err(y.float(), exact) < 0.06, "expected one e4m3fn rounding of the activations, no more"


def test_activations_beyond_e4m3fn_saturate_instead_of_becoming_nan():
    x = torch.tensor([[3000.0, -3000.0, 1.0, -0.5] * 4] * 16, dtype=torch.float16)
    xq, scale = ofp8.quantize_activation(x)
    assert torch.isfinite(xq.float()).all() and float(scale) == 1.0
    assert xq.float()[0, :4].tolist() == [448.0, -448.0, 1.0, -0.5]
    zeros = ofp8.quantize_activation(torch.zeros(16, 16, dtype=torch.bfloat16))[0]
    assert torch.equal(zeros.float(), torch.zeros(16, 16))


def test_scaled_applicable_needs_half_activations_fp8_weight_and_features_in_multiples_of_16():
    w = ofp8.quantize(torch.randn(48, 64), E4M3)
    x = torch.randn(2, 16, 64, dtype=torch.float16)
    assert ofp8.scaled_applicable(x, w)
    assert not ofp8.scaled_applicable(x.float(), w), "fp32 activations: the upcast"
    assert not ofp8.scaled_applicable(x, w.half()), "an fp16 weight: not ours to scale"
    assert ofp8.scaled_applicable(torch.randn(2, 77, 64, dtype=torch.float16), w), "154 rows (cross-attn k/v)"
    assert ofp8.scaled_applicable(torch.randn(1, 64, dtype=torch.float16), w), "one row (an embedding)"
    assert not ofp8.scaled_applicable(torch.randn(0, 64, dtype=torch.float16), w), "no rows"
    assert not ofp8.scaled_applicable(torch.randn(16, 40, dtype=torch.float16), ofp8.quantize(torch.randn(48, 40), E4M3))
    assert not ofp8.scaled_applicable(x, ofp8.quantize(torch.randn(40, 64), E4M3))


def test_plan_for_fp8_compute_on_cpu_falls_back_with_a_warning_reason():
    p = ofp8.plan("auto", "cpu", fused=False, compute=True)
    assert not p.compute and p.degraded and not p.fused
    assert p.reason.startswith("fp8 compute unavailable: cpu device") and ofp8.SWITCHED_OFF in p.reason
    assert "per-layer upcast" in p.describe()
    ok = ofp8.Fp8Plan(E4M3, False, "probe passed", compute=True)
    assert "fp8 compute" in ok.describe() and not ok.degraded
    assert not ofp8.plan("auto", "cpu", fused=False).degraded, "storage only by choice: no warning"
    assert ofp8.plan("auto", "cpu", fused=True).degraded, "a fused kernel asked for and unavailable: warning"


def tiny_compute(seed: int = 0, dtype: torch.dtype = torch.float16):
    ops = nfp8.fp8_operations(E4M3, compute=True)
    assert ops is nfp8.fp8_operations(E4M3, True, True) and ops.Linear.fp8_compute and not ops.Linear.fp8_fused
    assert not ops.Conv2d.fp8_compute, "convolutions have no fp8 compute kernel: they upcast"
    return factories.tiny_unet(seed, dtype=dtype, model_options={"custom_operations": ops})


def test_fp8_compute_model_multiplies_in_fp8_where_shapes_allow(monkeypatch, capsys):
    """fp16 tiny UNet: every Linear call whose shapes allow runs scaled_linear (the rest upcast); one forward
    stays within COMPUTE_FIDELITY_BOUND of fp32, and each layer within COMPUTE_LAYER_BOUND of its fp32 twin."""
    calls = []
    real = ofp8.scaled_linear
    monkeypatch.setattr(ofp8, "scaled_linear",
                        lambda x, w, *a: calls.append((x.shape, w.data_ptr(), a[1:])) or real(x, w, *a))
    inp = bridge.random_unet_inputs(0, batch=2, size=8)
    inp16 = {k: v.half() if v.is_floating_point() else v for k, v in inp.items()}
    fp32, comp = factories.tiny_unet(0), tiny_compute(0)
    y32 = run(fp32, inp)
    yc = run(comp, inp16).float()
    calls = list(calls)  # this forward's calls (the per-layer check below calls the layers again)
    layers = len({ptr for _, ptr, _ in calls})
    lin = [m for m in comp.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    assert not any(nfp8._group_member(m) for m in lin), "fp8 compute layers read their fp8 weight: no grouped upcast"
    assert layers == len(lin), "every Linear of the tiny UNet has features in multiples of 16: all on fp8"
    assert any(s.numel() // s[-1] == 2 for s, _, _ in calls), "the embeddings' 2 rows (batch 2) too"
    assert all(a and a[0].dtype == torch.float32 and float(a[0]) == 1.0 for _, _, a in calls), "the layer's scale"
    err = bridge.rel_err(yc, y32)
    assert torch.isfinite(yc).all() and err <= COMPUTE_FIDELITY_BOUND, f"fp8 compute vs fp32: {err:.4f}"

    twins = dict(comp.model.diffusion_model.named_modules())
    errs: dict[str, float] = {}

    def compare(module, args, out, name):
        x = args[0].half()
        if isinstance(twins[name], torch.nn.Linear) and ofp8.scaled_applicable(x, twins[name].weight):
            with torch.no_grad():
                errs[name] = bridge.rel_err(twins[name](x).float(), out)

    hooks = [m.register_forward_hook(lambda m, a, o, n=n: compare(m, a, o, n))
             for n, m in fp32.model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        run(fp32, inp)
    finally:
        for h in hooks:
            h.remove()
    vals = sorted(errs.values())
    assert len(vals) > 40 and vals[-1] <= COMPUTE_LAYER_BOUND, f"per layer: max {vals[-1]:.4f}"
    with capsys.disabled():
        print(f"\n[fp8 compute fidelity] tiny UNet fp16, one forward vs fp32 {err:.4f}; {layers} of {len(lin)} "
              f"Linear layers on fp8 tensor cores ({len(calls)} calls); per layer ({len(vals)}) median {vals[len(vals) // 2]:.4f}, "
              f"max {vals[-1]:.4f}")


def test_fp8_compute_layer_compiles_fullgraph_without_breaks():
    ops = nfp8.fp8_operations(E4M3, compute=True)
    lin = ops.Linear(64, 48, dtype=torch.float16)
    lin.load_state_dict(torch.nn.Linear(64, 48).half().state_dict())
    x = torch.randn(2, 16, 64, dtype=torch.float16)
    for backend in ("eager", "aot_eager"):
        got = torch.compile(lin, fullgraph=True, backend=backend)(x)
        assert bridge.rel_err(got.float(), lin(x).float()) < 1e-3
    torch._dynamo.reset()


def test_fp8_compute_graph_reads_the_layers_scale_instead_of_making_one():
    """Under torch.compile a scale made in the forward is a fill kernel per matmul in the graph (1,164 in a
    batch-1 SDXL forward on the H100); the layer's fp8_scale buffer is a graph input instead."""
    ops = nfp8.fp8_operations(E4M3, compute=True)
    lin = ops.Linear(64, 48, dtype=torch.float16)
    lin.load_state_dict(torch.nn.Linear(64, 48).half().state_dict())
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 77, 64, dtype=torch.float16)
    torch._dynamo.reset()
    try:
        got = torch.compile(lin, fullgraph=True, backend=backend)(x)
    finally:
        torch._dynamo.reset()
    assert bridge.rel_err(got.float(), lin(x).float()) < 1e-3
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("_scaled_mm" in t for t in targets), f"expected the fp8 matmul in the graph, got {targets}"
    made = [t for t in targets if any(k in t for k in ("ones", "full", "tensor"))]
    assert not made, f"expected no tensor made in the graph (the scale is the layer's buffer), got {made}"


def test_fp8_linear_keeps_a_unit_scale_through_loads_moves_and_casts():
    ops = nfp8.fp8_operations(E4M3, compute=True)
    src = torch.nn.Linear(64, 48).half().state_dict()

    def one(layer):
        sc = layer.fp8_scale
        return sc.dtype == torch.float32 and sc.shape == () and sc.device == layer.weight.device and float(sc) == 1.0

    lin = ops.Linear(64, 48, dtype=torch.float16)
    lin.load_state_dict(src)
    assert one(lin) and "fp8_scale" not in lin.state_dict(), "a non-persistent buffer: never saved"
    assert one(lin.half()) and one(lin.to(torch.bfloat16)), "a model-wide cast leaves the scale fp32"
    assert one(lin.to_empty(device="cpu")), "an empty-like materialization re-makes it"
    meta = ops.Linear(64, 48, dtype=torch.float16, device="meta")
    assert meta.fp8_scale.is_meta, "a layer built on the meta device holds no memory yet"
    meta.load_state_dict(src)
    assert meta.weight.device.type == "cpu" and one(meta), "the scale follows the weight off the meta device"
    assert "fp8_scale" not in dict(ops.Conv2d(4, 4, 3).named_buffers()), "convolutions upcast: no scale"


def test_norms_and_biases_in_compute_dtype_beat_core_all_fp8_cast(tiny):
    """ComfyUI core's weight_dtype=fp8 (manual_cast, every weight fp8) against ours on the same weights."""
    import comfy.ops
    import comfy.supported_models

    src = tiny["fp32"].model.diffusion_model
    cfg = comfy.supported_models.SDXL(dict(factories.TINY_UNET_CONFIG))
    cfg.set_inference_dtype(E4M3, torch.float32)  # core: unet_dtype fp8, manual cast to the compute dtype
    core = cfg.get_model({})
    assert isinstance(core.diffusion_model.input_blocks[0][0], comfy.ops.manual_cast.Conv2d)
    core.diffusion_model.load_state_dict(src.state_dict())
    assert core.diffusion_model.out[0].weight.dtype == E4M3 and not nfp8.is_fp8_model(core)
    y32 = run(src, tiny["inp"])
    e_core = bridge.rel_err(run(core.diffusion_model, tiny["inp"]), y32)
    e_ours = bridge.rel_err(run(tiny[E4M3], tiny["inp"]), y32)
    assert e_ours <= e_core + 1e-4, f"expected ours <= core's all-fp8 error, got {e_ours:.4f} vs {e_core:.4f}"


# ---------------------------------------------------------------------------------------------------------
# LoRA on fp8 weights: the host's patching (full load: merged + stochastic rounding; low VRAM: compute time)
# ---------------------------------------------------------------------------------------------------------

def test_lora_after_the_loader_takes_effect_like_on_fp32(tiny, capsys):
    """Both host paths: full load (LoRA merged into the fp8 weights with stochastic rounding) and low VRAM
    (LoRA applied to the upcast weight at compute time, through weight_function)."""
    import comfy.sd

    dtype = E4M3
    inp = tiny["inp"]
    base32, base8 = tiny["fp32"], tiny[dtype]
    lora = tiny_lora(base32, seed=5)
    y32, y8 = forward(base32, inp), forward(base8, inp)
    model_err = float((y8 - y32).abs().max())
    scale = float(y32.abs().max())
    w_key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    before = base8.model.state_dict()[w_key].clone()
    for path in (forward, forward_lowvram):
        l32 = comfy.sd.load_lora_for_models(base32, None, lora, 1.0, 0.0)[0]
        l8 = comfy.sd.load_lora_for_models(base8, None, lora, 1.0, 0.0)[0]
        assert len(l8.patches) == len(l32.patches) > 40, "expected the LoRA to patch the same fp8 keys"
        d32, d8 = path(l32, inp) - y32, path(l8, inp) - y8
        effect32, effect8 = float(d32.abs().max()), float(d8.abs().max())
        assert effect32 > 0.2 * scale, "test LoRA too weak to tell anything"
        assert 0.7 < effect8 / effect32 < 1.3, f"{path.__name__}: LoRA effect {effect8:.3f} on fp8 vs {effect32:.3f}"
        # the LoRA's difference deviates from fp32's by the order of the fp8 error itself (measured: full load
        # 1.3x, the stochastic rounding of the merged weights adds its own noise; low VRAM, exact: 0.5x)
        dev = float((d8 - d32).abs().max())
        assert dev <= 1.5 * model_err, (f"{path.__name__}: expected the LoRA difference to match fp32's within "
                                        f"the fp8 error ({model_err / scale:.3f} of the output), got {dev / scale:.3f}")
        cos = float(F.cosine_similarity(d8.flatten(), d32.flatten(), dim=0))
        with capsys.disabled():
            print(f"\n[fp8 LoRA] {path.__name__}: LoRA effect {effect32 / scale:.3f} of the output, fp8/fp32 "
                  f"{effect8 / effect32:.3f}, max|d8-d32| "
                  f"{dev / scale:.3f} of the output (fp8 model error {model_err / scale:.3f}), direction cos {cos:.3f}")
        assert cos > 0.9, f"{path.__name__}: LoRA direction cos {cos:.3f}"
        # the base clone is untouched: weights restored bitwise, output identical
        assert forward(base8, inp).equal(y8)
        assert torch.equal(base8.model.state_dict()[w_key].float(), before.float())
        assert base8.model.state_dict()[w_key].dtype == dtype


# ---------------------------------------------------------------------------------------------------------
# the nodes, end to end on tiny files
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_detection(monkeypatch):
    """Let ComfyUI's model detection map the tiny test UNet to SDXL (it only knows full-size configs)."""
    import comfy.model_detection
    import comfy.supported_models

    original = comfy.model_detection.model_config_from_unet_config

    def detect(unet_config, state_dict=None):
        found = original(unet_config, state_dict)
        if found is None and unet_config.get("model_channels") == factories.TINY_UNET_CONFIG["model_channels"] \
                and unet_config.get("context_dim") == factories.TINY_UNET_CONFIG["context_dim"]:
            return comfy.supported_models.SDXL(unet_config)
        return found

    monkeypatch.setattr(comfy.model_detection, "model_config_from_unet_config", detect)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny):
    """Tiny model files in fresh folders registered as ComfyUI's checkpoints / diffusion_models / loras."""
    import folder_paths
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fp8_models")
    dirs = {k: root / k for k in ("checkpoints", "diffusion_models", "loras")}
    for d in dirs.values():
        d.mkdir()
    unet = tiny["fp32"]
    usd = {k: v.contiguous() for k, v in unet.model.diffusion_model.state_dict().items()}
    vae = factories.tiny_taesd_state_dict(2)
    files = {
        "unet": dirs["diffusion_models"] / "tiny_unet.safetensors",
        "ckpt": dirs["checkpoints"] / "tiny_sdxl.safetensors",
        "ckpt_unet_only": dirs["checkpoints"] / "tiny_unet_only.safetensors",
        "vae": dirs["diffusion_models"] / "tiny_vae.safetensors",
        "random": dirs["diffusion_models"] / "random_tensors.safetensors",
        "damaged": dirs["diffusion_models"] / "damaged.safetensors",
        "scaled": dirs["diffusion_models"] / "scaled_fp8.safetensors",
        "lora": dirs["loras"] / "tiny_lora.safetensors",
        "dangling": dirs["diffusion_models"] / "gone.safetensors",
    }
    save_file(usd, files["unet"])
    save_file({**{"model.diffusion_model." + k: v for k, v in usd.items()},
               **{"first_stage_model." + k: v.contiguous() for k, v in vae.items()}}, files["ckpt"])
    save_file(usd, files["ckpt_unet_only"])
    save_file({k: v.contiguous() for k, v in vae.items()}, files["vae"])
    save_file({"foo.weight": torch.randn(4, 4), "bar.bias": torch.randn(4)}, files["random"])
    files["damaged"].write_bytes(b"\xff" * 64)
    save_file({**usd, "scaled_fp8": torch.zeros(2, dtype=E4M3)}, files["scaled"])
    save_file(tiny_lora(unet, seed=5), files["lora"])
    os.symlink(root / "nowhere.safetensors", files["dangling"])
    saved = {k: list(folder_paths.folder_names_and_paths[k][0]) for k in dirs}
    for k, d in dirs.items():
        folder_paths.add_model_folder_path(k, str(d))
    files["hashes"] = {k: sha256(p) for k, p in files.items() if k != "dangling" and isinstance(p, Path)}
    yield files
    for k in dirs:
        folder_paths.folder_names_and_paths[k][0][:] = saved[k]
        folder_paths.filename_list_cache.pop(k, None)


def assert_files_unchanged(files):
    for k, h in files["hashes"].items():
        assert sha256(files[k]) == h, f"expected {files[k].name} untouched by the loaders, its hash changed"


def test_unet_loader_loads_a_tiny_unet_file_in_fp8(model_files, tiny_detection, tiny, caplog):
    caplog.set_level(logging.INFO)
    out = nfp8.Fp8UNetLoader.execute("tiny_unet.safetensors", "auto", True)
    model = out.args[0]
    assert nfp8.is_fp8_model(model)
    assert isinstance(model.model_options["transformer_options"].get(nfp8.GRAPH_KEY), nfp8.GraphRunState)
    inner = model.model.diffusion_model
    assert inner.input_blocks[4][1].proj_in.weight.dtype == E4M3
    assert inner.input_blocks[4][1].norm.weight.dtype == torch.float32
    assert bridge.rel_err(run(inner, tiny["inp"]), run(tiny["fp32"], tiny["inp"])) <= FIDELITY_BOUND[E4M3]
    lines = [r for r in caplog.records if r.getMessage().startswith("SDXLOpt FP8:")]
    assert len(lines) == 1, f"expected exactly one line saying which path was chosen, got {[r.getMessage() for r in lines]}"
    msg = lines[0].getMessage()
    assert lines[0].levelno == logging.WARNING and "per-layer upcast (storage only)" in msg and "cpu" in msg, msg
    assert "tiny_unet.safetensors" in msg and "float8_e4m3fn" in msg
    assert_files_unchanged(model_files)


def test_fp8_compute_asked_for_where_it_cannot_run_warns_once_and_loads_storage_only(model_files, tiny_detection,
                                                                                     tiny, caplog):
    caplog.set_level(logging.INFO)
    model = nfp8.Fp8UNetLoader.execute("tiny_unet.safetensors", "auto", False, True).args[0]
    lines = [r for r in caplog.records if r.getMessage().startswith("SDXLOpt FP8:")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING, [r.getMessage() for r in lines]
    assert "fp8 compute unavailable: cpu device" in lines[0].getMessage()
    lin = model.model.diffusion_model.input_blocks[4][1].proj_in
    assert not lin.fp8_compute and lin.weight.dtype == E4M3
    assert bridge.rel_err(run(model, tiny["inp"]), run(tiny["fp32"], tiny["inp"])) <= FIDELITY_BOUND[E4M3]
    assert_files_unchanged(model_files)


def test_checkpoint_loader_gives_fp8_model_and_the_vae(model_files, tiny_detection):
    out = nfp8.Fp8CheckpointLoader.execute("tiny_sdxl.safetensors", "float8_e5m2", False)
    model, clip, vae = out.args
    assert nfp8.is_fp8_model(model)
    assert model.model.diffusion_model.out[2].weight.dtype == E5M2
    assert clip is None  # the tiny checkpoint carries no text encoders (ComfyUI warns, as for any such file)
    img = vae.decode(torch.zeros(1, 4, 8, 8))
    assert img.shape[-1] == 3 and torch.isfinite(img).all()
    assert_files_unchanged(model_files)


@pytest.mark.parametrize("node, name, pattern", [
    ("ckpt", "tiny_unet_only.safetensors", r"expected a full SDXL.*a UNet-only file.*Fix: load it with 'SDXLOpt Load Diff"),
    ("unet", "tiny_vae.safetensors", r"expected an SDXL / SD-family UNet.*a VAE.*Fix: load it with Load VAE"),
    ("unet", "random_tensors.safetensors", r"expected an SDXL / SD-family UNet.*no SD-family UNet keys.*Fix"),
    ("unet", "scaled_fp8.safetensors", r"already quantized with per-tensor scales.*Fix: load it with the stock"),
    ("unet", "damaged.safetensors", r"expected damaged.safetensors to be a safetensors model file.*Fix: re-download"),
    ("unet", "no_such_file.safetensors", r"expected the file 'no_such_file.safetensors' in ComfyUI's 'diffusion_mod"),
    ("unet", "gone.safetensors", r"found no such file \(missing, or a link that points nowhere\)\. Fix: put"),
    ("ckpt", "no_such.ckpt", r"'checkpoints' model folder .*Fix"),
])
def test_bad_files_get_a_clear_error_and_stay_unchanged(model_files, tiny_detection, node, name, pattern):
    cls = nfp8.Fp8CheckpointLoader if node == "ckpt" else nfp8.Fp8UNetLoader
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        cls.execute(name, "auto", True)
    assert_files_unchanged(model_files)


def test_lora_file_is_named_as_a_lora(model_files):
    import folder_paths

    with pytest.raises(ValueError, match=r"a LoRA, not a model.*apply the LoRA after it"):
        nfp8.check_kind(folder_paths.get_full_path("loras", "tiny_lora.safetensors"), "tiny_lora.safetensors",
                        accept=("checkpoint",))


def test_detection_failure_is_explained(model_files):
    """Without the test's detection hook, ComfyUI cannot detect the tiny UNet: the message says so."""
    with pytest.raises(ValueError, match=r"expected an SDXL / SD1.x / SD2.x model in 'tiny_unet.safetensors'; "
                                         r"ComfyUI could not detect its model type"):
        nfp8.Fp8UNetLoader.execute("tiny_unet.safetensors", "auto", True)


def test_bad_dtype_through_execute_and_prompt(model_files, tiny_detection, run_prompt, monkeypatch):
    from comfy_inprocess import PromptError

    with pytest.raises(ValueError, match=r"expected weight_dtype to be one of auto, float8_e4m3fn, float8_e5m2, "
                                         r"got 'float8_e4m3fnuz'"):
        nfp8.Fp8UNetLoader.execute("tiny_unet.safetensors", "float8_e4m3fnuz", True)
    monkeypatch.setattr(ofp8, "can_hold", lambda dtype, device: dtype != E4M3)  # a device without e4m3fn
    prompt = {"1": {"class_type": "SDXLOptFP8UNetLoader", "inputs": {
        "unet_name": "tiny_unet.safetensors", "weight_dtype": "float8_e4m3fn", "fused_matmul": True}}}
    with pytest.raises(PromptError, match=r"got 'float8_e4m3fn', which torch .* cannot store.*Fix: set weight_dtype"):
        run_prompt(prompt | {"2": {"class_type": "SDXLOptPatchReport", "inputs": {"model": ["1", 0]}}})
    assert_files_unchanged(model_files)


def test_missing_file_through_a_prompt(model_files, run_prompt):
    from comfy_inprocess import PromptError

    prompt = {"1": {"class_type": "SDXLOptFP8UNetLoader", "inputs": {
        "unet_name": "gone.safetensors", "weight_dtype": "auto", "fused_matmul": True}},
        "2": {"class_type": "SDXLOptPatchReport", "inputs": {"model": ["1", 0]}}}
    with pytest.raises(PromptError, match=r"expected the file 'gone.safetensors' in ComfyUI's 'diffusion_models'"):
        run_prompt(prompt)


def _sampling_prompt(extra: dict, seed: int = 1) -> dict:
    def sampler(model_ref):  # cfg 1: one conditional forward per step (the CPU is slow with fp8 upcasts)
        return {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}

    prompt = {
        "1": {"class_type": "SDXLOptTestTinyCheckpoint", "inputs": {"seed": 0, "vae": "taesd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": sampler(["1", 0]),
    }
    for node_id, node in extra.items():
        prompt[node_id] = sampler(node[1]) if isinstance(node, tuple) else node
    for node_id in [k for k, v in prompt.items() if v["class_type"] == "KSampler"]:  # outputs make them run
        prompt[f"save{node_id}"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id, 0],
                                                                         "filename_prefix": "sdxlopt_fp8_test"}}
    return prompt


FP8_LOADER = {"class_type": "SDXLOptFP8UNetLoader", "inputs": {
    "unet_name": "tiny_unet.safetensors", "weight_dtype": "auto", "fused_matmul": True}}


def test_in_one_prompt_the_original_is_unchanged_and_a_lora_acts_on_the_fp8_model(model_files, tiny_detection,
                                                                                 run_prompt):
    """Original model and fp8 model side by side (plus a LoraLoader after each): the original's output equals
    its output alone; the LoRA changes the fp8 model's output the way it changes the original's."""
    lora = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "tiny_lora.safetensors",
                                                            "strength_model": 1.0}}
    extra = {"10": FP8_LOADER, "11": ("sampler", ["10", 0]),
             "12": {**lora, "inputs": {**lora["inputs"], "model": ["10", 0]}}, "13": ("sampler", ["12", 0]),
             "14": {**lora, "inputs": {**lora["inputs"], "model": ["1", 0]}}, "15": ("sampler", ["14", 0])}
    alone = run_prompt(_sampling_prompt({})).output("5")[0]["samples"]
    res = run_prompt(_sampling_prompt(extra))
    out = {k: res.output(k)[0]["samples"] for k in ("5", "11", "13", "15")}
    assert torch.equal(out["5"], alone), "expected the original model's output unchanged by the fp8 model beside it"
    assert torch.isfinite(out["11"]).all() and not torch.equal(out["11"], out["5"])
    assert bridge.rel_err(out["11"], out["5"]) < 0.5, "expected the fp8 model's sample close to the original's"
    d8, d32 = out["13"] - out["11"], out["15"] - out["5"]
    assert float(d8.abs().max()) > 0.3 * float(d32.abs().max()) > 0, "expected the LoRA to change the fp8 output"
    cos = float(F.cosine_similarity(d8.flatten(), d32.flatten(), dim=0))
    assert cos > 0.8, f"expected the LoRA to act on the fp8 model as on the original, got direction cos {cos:.3f}"
    assert_files_unchanged(model_files)


# ---------------------------------------------------------------------------------------------------------
# the whole-call CUDA graph (nodes/_unet_graph.py): CI has no GPU, so the graph path's bookkeeping (static
# buffers, keys, eligibility, fallbacks) runs in its "plain" mode, with plain calls in place of replays
# ---------------------------------------------------------------------------------------------------------

GRAPH_LINE = re.compile(r"SDXLOpt FP8: (\d+)/(\d+) UNet calls replayed as one CUDA graph")
POS, NEG = factories.random_conditioning(101), factories.random_conditioning(202)


def loaded_like_the_loaders(seed: int = 0):
    """The tiny fp8 UNet with what the loaders attach: grouped upcasts (plain copies on the CPU) and the graph."""
    m = tiny_fp8(seed)
    nfp8.attach_upcast_groups(m)
    m.model.diffusion_model.__dict__[nfp8.GROUPS_ATTR][0].scratch.use_graphs = False
    nfp8.attach_forward_graph(m)
    return m


def sample(model, steps: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", POS, NEG, latent, disable_pbar=True,
                               seed=seed)


def graph_lines(caplog) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for r in caplog.records if (m := GRAPH_LINE.search(r.getMessage()))]


@pytest.fixture
def plain_graphs(monkeypatch):
    from sdxl_optimizer.nodes import _unet_graph as ug

    monkeypatch.setattr(ug, "GRAPH_MODE", "plain")
    return ug


def test_forward_graph_replays_every_call_and_matches_eager(plain_graphs, monkeypatch, caplog):
    """Every UNet call of a loader's model goes through the graph path: one capture per shape kept for later
    runs, the same samples as eager; a CPU user ("cuda" mode off CUDA) gets the eager path and no line."""
    caplog.set_level(logging.INFO)
    m = loaded_like_the_loaders()
    graphs = m.model_options["transformer_options"][nfp8.GRAPH_KEY].graphs
    first, second = sample(m), sample(m)
    assert graphs.captures == 1, "expected one capture for both runs (same shape, same weights)"
    sample(m, size=12)
    assert graphs.captures == 2, "expected one more capture for another resolution"
    monkeypatch.setattr(plain_graphs, "GRAPH_MODE", "off")
    ref = sample(m)
    monkeypatch.setattr(plain_graphs, "GRAPH_MODE", "cuda")
    cpu = sample(m)
    assert torch.equal(first, ref) and torch.equal(second, ref) and torch.equal(cpu, ref)
    assert graph_lines(caplog) == [(4, 4)] * 3
    # the upcast scratch is left out of the key (a graph that captured it keeps the one it used alive)
    assert fp8_groups.BUFFER_NAME.startswith(plain_graphs.OWN_BUFFERS)
    # a clone (ComfyUI deep-copies model_options) shares the graphs: a CUDA graph cannot be copied
    clone = m.clone()
    assert clone.model_options["transformer_options"][nfp8.GRAPH_KEY].graphs is graphs
    # unloading the model (ModelPatcher.detach) drops its graphs and their pool
    import comfy.model_management as mm

    assert graphs.entries
    mm.unload_all_models()
    assert not graphs.entries


def test_forward_graph_stands_aside_for_patches_and_inner_wrappers(plain_graphs, caplog):
    """A patch (FreeU) or an attention override would be frozen by a capture: eager. DeepCache on top of the fp8 model wraps the UNet
    inside ours: ours stands aside and DeepCache's own graphs take the calls (fp8 layers count as plain)."""
    import nodes as core

    from sdxl_optimizer.nodes import deepcache as dcn
    from sdxl_optimizer.ops.deepcache import DeepCacheConfig

    caplog.set_level(logging.INFO)
    m = loaded_like_the_loaders()
    freeu = core.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(m, 1.3, 1.4, 0.9, 0.2)[0]
    sample(freeu)
    override = m.clone()  # an attention override may pick kernels per step: frozen by a capture too
    override.model_options["transformer_options"]["optimized_attention_override"] = lambda f, *a, **k: f(*a, **k)
    sample(override)
    dc = dcn.apply_deepcache(m, DeepCacheConfig(interval=2))
    sample(dc)
    assert graph_lines(caplog) == []
    summary = [r.getMessage() for r in caplog.records if "DeepCache:" in r.getMessage()]
    assert len(summary) == 1 and "2 full calls replayed as a CUDA graph" in summary[0], summary


def test_forward_graph_takes_this_packs_freeu(plain_graphs, monkeypatch, caplog):
    """SDXLOpt FreeU's patch is graph-safe: an fp8 model with it still replays every call, as eager, and its
    graph is not the one of the model without FreeU (they share the graphs: the patches are in the key)."""
    from sdxl_optimizer.nodes import freeu as nfreeu

    caplog.set_level(logging.INFO)
    plain = loaded_like_the_loaders()
    m = nfreeu.apply_freeu(plain, nfreeu.resolve_config("SDXL", "v1", 1.3, 1.4, 0.9, 0.2))
    graphs = m.model_options["transformer_options"][nfp8.GRAPH_KEY].graphs
    assert plain.model_options["transformer_options"][nfp8.GRAPH_KEY].graphs is graphs  # clones share graphs
    without, out = sample(plain), sample(m)  # the same shapes and weights: the patches tell the graphs apart
    assert graphs.captures == 2
    monkeypatch.setattr(plain_graphs, "GRAPH_MODE", "off")
    assert torch.equal(out, sample(m)) and torch.equal(without, sample(plain))
    assert not torch.equal(out, without)
    assert graph_lines(caplog) == [(4, 4)] * 2


def test_a_refused_capture_warns_and_samples_eagerly(plain_graphs, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    m = loaded_like_the_loaders()
    graphs = m.model_options["transformer_options"][nfp8.GRAPH_KEY].graphs

    def refuse(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", refuse)
    out = sample(m)
    monkeypatch.setattr(plain_graphs, "GRAPH_MODE", "off")
    assert torch.equal(out, sample(m))
    warnings = [r for r in caplog.records if "could not capture a full UNet call" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING and "SDXLOpt FP8" in warnings[0].getMessage()
    assert graph_lines(caplog) == [(0, 4)]
