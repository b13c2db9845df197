"""Micro-benchmark (GPU): what the grouped fp8 upcast still costs per eager forward, and what would remove it.

    python -m bench.micro.fp8_grouped_variants        (from bench/gpu_run.sh's environment: ComfyUI importable)

Full SDXL UNet (random weights), batch-2 1024x1024 eager forwards, alternated, medians of wall and host CPU
time, plus GPU kernel time (torch.profiler). Variants marked "timing only" compute wrong values on purpose
(they isolate one cost):
  fp16                      stock ComfyUI fp16 model
  fp8 grouped               the loaders' fp8 model (one CUDA graph of per-weight copies per block)
  fp8 grouped, no replay    timing only: the graphs are not replayed (what the copies cost in all)
  fp8 grouped, packed copy  timing only: one copy kernel per block from a contiguous fp8 buffer (what a
                            packed or multi-tensor upcast would cost)
  fp16 / fp8 grouped + fused qkv
                            attention projections as one matmul (q,k,v of self-attention; k,v of cross-
                            attention) through a patched CrossAttention.forward (what fusing saves)
"""
from __future__ import annotations

import statistics
import time

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
        slot = layer.__dict__.get("_fp8_slot")
        if slot is not None:
            return slot[0].view(slot[1], x)
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
        if cat == "fp16":
            w = self.__dict__["_qkv_w"][context is not None]
        else:  # fp8 grouped: the views sit next to each other in the scratch
            n = ws[0].numel()
            base = ws[0]
            if any(w.data_ptr() != base.data_ptr() + i * n * base.element_size() for i, w in enumerate(ws)):
                return orig(self, x, context, value, mask, transformer_options)
            w = torch.as_strided(base, (n // base.shape[1] * len(ws), base.shape[1]), base.stride())
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
    from bench.common import BenchContext, kernel_count, kernel_us

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
    attn8 = [m for m in fp8.model.diffusion_model.modules() if isinstance(m, CrossAttention)]
    orig_forward = CrossAttention.forward
    fused_forward = _fused_attention_forward(orig_forward)

    def mode(name):
        for g, gr, pk in zip(groups, graphs, packed):
            g.graph = no_replay if "no replay" in name else pk if "packed" in name else gr
        fused = "fused qkv" in name
        CrossAttention.forward = fused_forward if fused else orig_forward
        for m in attn:
            m.__dict__["_qkv"] = "fp16" if fused else None
        for m in attn8:
            m.__dict__["_qkv"] = "fp8" if fused else None
        return fp8 if "fp8" in name else base

    variants = ["fp16", "fp8 grouped", "fp8 grouped, no replay", "fp8 grouped, packed copy",
                "fp16 + fused qkv", "fp8 grouped + fused qkv"]
    for name in ("fp16 + fused qkv", "fp8 grouped + fused qkv"):
        p = mode(name)
        out = fwd(p).float()
        ref = ref8 if "fp8" in name else ref16
        print(f"{name}: max |out - unfused| / max |unfused| = {float((out - ref).abs().max() / ref.abs().max()):.2e}")
    for name in variants:
        p = mode(name)
        for _ in range(3):
            fwd(p)
    torch.cuda.synchronize()
    times = {k: [] for k in variants}
    for _ in range(25):
        for name in variants:
            p = mode(name)
            torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.thread_time()
            fwd(p)
            c1 = time.thread_time()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - w0, c1 - c0))
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
    mode("fp16")


if __name__ == "__main__":
    main()
