"""Micro-benchmark (GPU): where a batch-2 1024x1024 SDXL UNet forward spends its GPU time, and what layout and
attention choices change it.

    python -m bench.micro.unet_kernels        (from bench/gpu_run.sh's environment: ComfyUI importable)
    SDXLOPT_MICRO_COMPILE=1 ...               (adds inductor-compiled variants: ~1.5-2.5 min of compile each)

Full SDXL UNet, random fp16 weights, ComfyUI's own modules, inference mode. Each variant's forward is captured
in a CUDA graph and replayed (no launch overhead: GPU time only), variants alternated round by round. Variants:
the stock layout (NCHW) with torch's default attention choice; attention pinned to cuDNN's or to flash; every
conv weight and the input in channels_last; cudnn.benchmark. Then a torch.profiler run of one variant's eager
forwards splits kernel time by kind (GEMM, convolution, layout transposes, attention, norm, other) and lists
the top kernels. The compiled variants (inductor, mode "default", captured the same way) show what the
compiler's fusions leave. Prints max |variant - stock| / max |stock| of the output next to each time.
"""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import time

import torch

KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|mha", re.I)),
    ("layout", re.compile(r"nchwToNhwc|nhwcToNchw|transpose|permute|convert.*layout", re.I)),
    ("conv", re.compile(r"conv|fprop|implicit|winograd|cudnn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|sm\d\d_", re.I)),
    ("norm", re.compile(r"norm", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if pat.search(name):
            return kind
    return "other"


def kernel_table(prof, forwards: int) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    from torch.autograd import DeviceType

    by_kind: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        if e.device_type == DeviceType.CPU:
            continue
        us = float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + us / forwards / 1000
        rows.append((e.key, us / forwards / 1000, e.count // forwards))
    rows.sort(key=lambda r: -r[1])
    return by_kind, rows


def profile_kernels(fn, calls: int = 3) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """kernel_table of `calls` calls of fn() under torch.profiler (CUDA activity), after two warm-up calls."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return kernel_table(prof, calls)


def print_split(head: str, kinds: dict[str, float], rows: list[tuple[str, float, int]], top: int,
                indent: str) -> None:
    """One line of kernel time per forward by kind (profile_kernels' output), then the `top` costliest kernels."""
    total = sum(kinds.values())
    print(f"{head} kernels {total:.2f} ms per forward: " + ", ".join(
        f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for key, v, count in rows[:top]:
        print(f"{indent}{v:6.2f} ms  x{count:<4d} [{kind_of(key)}] {key[:110]}")


def graphed(fn, calls: int = 1):
    """Capture `calls` calls of fn() in one CUDA graph (after warm-up on a side stream); returns (replay, the
    last call's output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            out = fn()
    torch.cuda.synchronize()
    return g.replay, out


def replay_ms(replays: dict, rounds: int = 20, inner: int = 5) -> dict[str, float]:
    times = {k: [] for k in replays}
    for _ in range(rounds):
        for k, r in replays.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(inner):
                r()
            torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) / inner * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.cases.fp8 import _forward_inputs
    from bench.common import BenchContext, rel_err

    ctx = BenchContext(small=False, out_dir=None)
    import comfy.model_management as mm

    base = ctx.base_model()
    mm.load_models_gpu([base])
    unet = base.model.diffusion_model
    inp = _forward_inputs(ctx)
    x_cl = inp["x"].contiguous(memory_format=torch.channels_last)
    print(f"torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")

    def fwd(x=None):
        return unet(inp["x"] if x is None else x, timesteps=inp["t"], context=inp["context"], y=inp["y"])

    def attn(backend):
        return contextlib.nullcontext() if backend is None else sdpa_kernel([backend], set_priority=True)

    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    # both layouts' weights stay alive: a captured graph keeps reading the tensors it was captured with
    weights = {torch.contiguous_format: [m.weight.data for m in convs]}
    weights[torch.channels_last] = [w.contiguous(memory_format=torch.channels_last) for w in weights[torch.contiguous_format]]

    def to_layout(fmt):
        for m, w in zip(convs, weights[fmt]):
            m.weight.data = w

    variants = [  # name, attention backend, channels_last, cudnn.benchmark
        ("stock (NCHW, default attention)", None, False, False),
        ("attention cuDNN", SDPBackend.CUDNN_ATTENTION, False, False),
        ("attention flash", SDPBackend.FLASH_ATTENTION, False, False),
        ("channels_last", None, True, False),
        ("channels_last + attention cuDNN", SDPBackend.CUDNN_ATTENTION, True, False),
        ("channels_last + cudnn.benchmark", None, True, True),
        ("channels_last + cuDNN attn + benchmark", SDPBackend.CUDNN_ATTENTION, True, True),
    ]
    replays, outs = {}, {}
    with torch.inference_mode():
        for name, backend, cl, bench in variants:
            to_layout(torch.channels_last if cl else torch.contiguous_format)
            torch.backends.cudnn.benchmark = bench
            print(f"capturing: {name}", flush=True)
            try:
                with attn(backend):
                    replays[name], outs[name] = graphed(lambda cl=cl: fwd(x_cl if cl else None))
            except Exception as e:  # a backend this device lacks
                print(f"{name}: failed ({type(e).__name__}: {str(e)[:160]})")
        to_layout(torch.contiguous_format)
        torch.backends.cudnn.benchmark = False
        ref = outs["stock (NCHW, default attention)"].float()
        ms = replay_ms(replays)
        base_ms = ms["stock (NCHW, default attention)"]
        print("\nCUDA-graph replay of one batch-2 1024x1024 forward (GPU time only), median of 20x5:")
        for name, v in ms.items():
            err = rel_err(outs[name], ref)
            print(f"  {name:42s} {v:7.2f} ms  {v / base_ms:5.3f}x  rel.err {err:.1e}")
        replays.clear()
        outs.clear()

        def split(title, fn):
            print_split(f"\n{title}:", *profile_kernels(fn), top=22, indent="  ")

        split("eager stock (NCHW, default attention)", fwd)
        to_layout(torch.channels_last)
        with attn(SDPBackend.CUDNN_ATTENTION):
            split("eager channels_last + attention cuDNN", lambda: fwd(x_cl))
        to_layout(torch.contiguous_format)

    if os.environ.get("SDXLOPT_MICRO_COMPILE") != "1":
        return
    import torch._dynamo as dynamo

    compiled_variants = [
        ("compiled stock", None, False),
        ("compiled channels_last + cuDNN attn", SDPBackend.CUDNN_ATTENTION, True),
    ]
    replays, outs = {}, {}
    for name, backend, cl in compiled_variants:
        dynamo.reset()
        to_layout(torch.channels_last if cl else torch.contiguous_format)
        cfwd = torch.compile(fwd, mode="default")
        with torch.inference_mode(), attn(backend):
            t0 = time.perf_counter()
            cfwd(x_cl if cl else None)
            torch.cuda.synchronize()
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s")
            replays[name], outs[name] = graphed(lambda cl=cl, f=cfwd: f(x_cl if cl else None))
            split(f"{name} (eager launches)", lambda cl=cl, f=cfwd: f(x_cl if cl else None))
            ms1 = replay_ms({name: replays[name]})
            print(f"{name}: CUDA-graph replay {ms1[name]:.2f} ms")
    ms = replay_ms(replays)
    ref = outs["compiled stock"].float()
    print("\ncompiled, CUDA-graph replay, alternated:")
    for name, v in ms.items():
        err = rel_err(outs[name], ref)
        print(f"  {name:42s} {v:7.2f} ms  {v / ms['compiled stock']:5.3f}x  rel.err {err:.1e}")


if __name__ == "__main__":
    main()
