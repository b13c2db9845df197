"""Micro-benchmark (GPU): what the grouped fp8 upcast still costs per eager forward, and what would remove it.

    python -m bench.micro.fp8_grouped_variants        (from bench/gpu_run.sh's environment: ComfyUI importable)

Full SDXL UNet (random weights), batch-2 1024x1024 eager forwards, alternated, medians of wall and host CPU
time, plus GPU kernel time (torch.profiler). Variants marked "timing only" compute wrong values on purpose
(they isolate one cost):
  fp16                      stock ComfyUI fp16 model
  fp8 grouped               the loaders' fp8 model (one CUDA graph of per-weight copies per block, joined
                            attention projections)
  fp8 grouped, unjoined     the same with every projection chain switched off (one matmul per layer)
  fp8 grouped, no replay    timing only: the graphs are not replayed (what the copies cost in all)
  fp8 grouped, packed copy  timing only: one copy kernel per block from a contiguous fp8 buffer (what a
                            packed or multi-tensor upcast would cost)
  fp16 + fused qkv          stock fp16 with the attention projections as one matmul (q,k,v of self-
                            attention; k,v of cross-attention) through a patched CrossAttention.forward:
                            what the same fusion gives a stock model
Then a cProfile of fp16 and fp8 grouped forwards: the Python functions whose own time differs most.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F


class _NoReplay:
    def replay(self) -> None:
        pass


class _PackedCopy:
    def __init__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.dst, self.src = dst, src

    def replay(self) -> None:
        self.dst.copy_(self.src)


def _fused_attention_forward(orig):
    """CrossAttention.forward with one projection matmul where the inputs allow it (same math)."""
    from comfy.ldm.modules.attention import optimized_attention

    def weights(layer, x):
        w = layer.weight
        return w if w.dtype == x.dtype else None

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        cat = self.__dict__.get("_qkv")
        if cat is None or value is not None or mask is not None:
            return orig(self, x, context, value, mask, transformer_options)
        layers = (self.to_q, self.to_k, self.to_v) if context is None else (self.to_k, self.to_v)
        ws = [weights(m, x) for m in layers]
        if any(w is None for w in ws):
            return orig(self, x, context, value, mask, transformer_options)
        w = self.__dict__["_qkv_w"][context is not None]
        if context is None:
            q, k, v = F.linear(x, w).chunk(3, dim=-1)
        else:
            q = self.to_q(x)
            k, v = F.linear(context, w).chunk(2, dim=-1)
        out = optimized_attention(q, k, v, self.heads, attn_precision=self.attn_precision,
                                  transformer_options=transformer_options)
        return self.to_out(out)
    return forward


def main() -> None:
    from bench.cases.fp8 import _build, _forward_inputs
    from bench.common import BenchContext, alternated_cuda_times, kernel_count, kernel_us

    ctx = BenchContext(small=False, out_dir=None)
    import comfy.model_management as mm
    from comfy.ldm.modules.attention import CrossAttention

    from sdxl_optimizer.nodes.fp8 import GROUPS_ATTR, attach_upcast_groups, fp8_operations

    base = ctx.base_model()
    sd = {k: v.to("cpu") for k, v in base.model.diffusion_model.state_dict().items()}
    fp8 = _build(ctx, sd, {"custom_operations": fp8_operations(torch.float8_e4m3fn, False)})
    attach_upcast_groups(fp8)
    mm.load_models_gpu([base, fp8])
    inp = _forward_inputs(ctx)
    groups = fp8.model.diffusion_model.__dict__[GROUPS_ATTR]

    def fwd(p):
        with torch.inference_mode():
            return p.model.diffusion_model(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"])

    ref16, ref8 = fwd(base).float(), fwd(fp8).float()
    graphs = [g.graph for g in groups]
    assert all(g is not None for g in graphs), "expected every group captured"
    no_replay = _NoReplay()
    scratch = groups[0].scratch.buffer
    packed = []
    for g in groups:
        n = sum(v.numel() for v in g.views if v is not None)
        packed.append(_PackedCopy(scratch[:n], torch.empty(n, dtype=torch.float8_e4m3fn, device=scratch.device)))

    attn = [m for m in base.model.diffusion_model.modules() if isinstance(m, CrossAttention)]
    for m in attn:
        m.__dict__["_qkv_w"] = (torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight])
                                if m.to_q.weight.shape == m.to_k.weight.shape else None,
                                torch.cat([m.to_k.weight, m.to_v.weight]))
    orig_forward = CrossAttention.forward
    fused_forward = _fused_attention_forward(orig_forward)

    def mode(name):
        for g, gr, pk in zip(groups, graphs, packed):
            g.graph = no_replay if "no replay" in name else pk if "packed" in name else gr
            g.chains_off = set(g.chains) if "unjoined" in name else set()
        fused = "fused qkv" in name
        CrossAttention.forward = fused_forward if fused else orig_forward
        for m in attn:
            m.__dict__["_qkv"] = "fp16" if fused else None
        return fp8 if "fp8" in name else base

    variants = ["fp16", "fp8 grouped", "fp8 grouped, unjoined", "fp8 grouped, no replay",
                "fp8 grouped, packed copy", "fp16 + fused qkv"]
    for name, ref in (("fp16 + fused qkv", ref16), ("fp8 grouped, unjoined", ref8)):
        out = fwd(mode(name)).float()
        print(f"{name}: max |out - other| / max |other| = {float((out - ref).abs().max() / ref.abs().max()):.2e}"
              f" (other: {'fp16' if ref is ref16 else 'fp8 grouped'})")
    models = {name: mode(name) for name in variants}
    times = alternated_cuda_times({name: (lambda p=models[name]: fwd(p)) for name in variants}, rounds=25,
                                  before=mode)
    wall0 = statistics.median(a for a, _ in times["fp16"])
    for k, v in times.items():
        wall = statistics.median(a for a, _ in v)
        print(f"{k:28s} wall {1e3 * wall:7.2f} ms ({wall / wall0:.3f}x fp16), host CPU until return "
              f"{1e3 * statistics.median(b for _, b in v):7.2f} ms per forward (median of 25, alternated)")

    from torch.profiler import ProfilerActivity, profile
    for name in variants:
        p = mode(name)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd(p)
            torch.cuda.synchronize()
        avg = prof.key_averages()
        graph_launch = [e for e in avg if e.key == "cudaGraphLaunch"]
        gl = (f"; cudaGraphLaunch {graph_launch[0].count / 3:.0f} calls, {graph_launch[0].self_cpu_time_total / 3e3:.2f}"
              " ms host" if graph_launch else "")
        print(f"{name}: GPU kernel time {kernel_us(prof) / 3e3:.2f} ms per forward, "
              f"{kernel_count(prof) / 3:.0f} device ops{gl}")
    import cProfile
    import pstats
    own = {}
    for name in ("fp16", "fp8 grouped"):
        p = mode(name)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            fwd(p)
        prof.disable()
        torch.cuda.synchronize()
        st = pstats.Stats(prof).stats
        own[name] = {f"{k[0].split('/')[-1]}:{k[1]}({k[2]})": (v[1], v[2]) for k, v in st.items()}
    keys = set(own["fp16"]) | set(own["fp8 grouped"])
    diff = sorted(keys, key=lambda k: -abs(own["fp8 grouped"].get(k, (0, 0))[1] - own["fp16"].get(k, (0, 0))[1]))
    print("\ncProfile, 10 forwards each: own time (ms per forward) and calls per forward, largest differences")
    for k in diff[:30]:
        a, b = own["fp16"].get(k, (0, 0)), own["fp8 grouped"].get(k, (0, 0))
        print(f"  {k[:90]:90s} fp16 {a[1] * 100:7.3f} ms {a[0] / 10:6.0f}x   fp8 {b[1] * 100:7.3f} ms {b[0] / 10:6.0f}x")
    mode("fp16")


if __name__ == "__main__":
    main()
