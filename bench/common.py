"""What every benchmark case shares: the host, a random-weight SDXL, conditioning, timing and peak memory.

Full mode: the real SDXL base architecture (ComfyUI's SDXL unet_config: 2.6 B UNet parameters) with
seeded random weights on CUDA, fp16, 1024x1024, Euler, 50 steps, cfg 5. Small mode (`--small`): the
tiny test UNet on the CPU, for CI smoke. Random weights make the pictures noise, but the cost is real.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "host_nodes"))

GIB = 1024**3
# alternated short runs per model in step_ratio_interleaved (a GPU lease is short: set lower to save time)
STEP_ROUNDS = int(os.environ.get("SDXLOPT_BENCH_STEP_ROUNDS", "30"))

# ComfyUI's detected config for SDXL base (comfy/model_detection.py), i.e. diffusers' SDXL base UNet
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


@dataclass
class Measured:
    seconds: float  # median wall time of one call
    peak_gib: float  # peak allocated device memory during the calls (0 on CPU)
    result: Any
    all_seconds: list[float] = field(default_factory=list)


@dataclass
class BenchContext:
    small: bool
    out_dir: Path
    steps: int = 50
    cfg: float = 5.0
    width: int = 1024
    height: int = 1024
    repeat: int = 3
    rows: list[dict] = field(default_factory=list)
    _base: Any = None

    def __post_init__(self) -> None:
        if self.small:
            self.steps, self.width, self.height, self.repeat = 3, 64, 64, 1
        import comfy_inprocess

        from . import av_stub

        if av_stub.install():
            print("[bench] PyAV missing: using a stub (video nodes unused here)", flush=True)
        # small mode runs workflows with the tiny test model, which lives in a test-only node folder
        tiny_nodes = (ROOT / "tests" / "host_nodes" / "tinymodels",) if self.small else ()
        self.host = comfy_inprocess.boot(cpu=self.small or not torch.cuda.is_available(), extra_node_dirs=tiny_nodes)
        import comfy.model_management as mm

        self.device = mm.get_torch_device()
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32

    @property
    def unet_config(self) -> dict:
        from tinymodels.factories import TINY_UNET_CONFIG

        return dict(TINY_UNET_CONFIG if self.small else SDXL_UNET_CONFIG)

    @property
    def context_dim(self) -> int:
        return self.unet_config["context_dim"]

    @property
    def pooled_dim(self) -> int:
        return self.unet_config["adm_in_channels"] - 6 * 256

    def build_model(self, seed: int = 0, dtype: torch.dtype | None = None, model_options: dict | None = None):
        """A fresh ComfyUI SDXL ModelPatcher with seeded random weights (fan-in normal), built on the device."""
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models

        dtype = dtype or self.dtype
        cfg = comfy.supported_models.SDXL(self.unet_config)
        cfg.set_inference_dtype(dtype, None)
        if model_options and model_options.get("custom_operations") is not None:
            cfg.custom_operations = model_options["custom_operations"]
        model = cfg.get_model({}, device=self.device)
        init_random_(model.diffusion_model, seed)
        model.diffusion_model.to(self.device)
        return comfy.model_patcher.ModelPatcher(model, load_device=self.device, offload_device=mm.unet_offload_device())

    def base_model(self):
        """The shared fp16 SDXL (built once); clone() it before patching."""
        if self._base is None:
            self._base = self.build_model()
        return self._base

    def conds(self, batch: int = 1, seed: int = 0) -> tuple[list, list]:
        """Positive/negative conditioning of SDXL's shapes (77 tokens x context_dim, pooled) from random tensors."""
        g = torch.Generator().manual_seed(seed)

        def one():
            c = torch.randn(batch, 77, self.context_dim, generator=g)
            p = torch.randn(batch, self.pooled_dim, generator=g)
            return [[c, {"pooled_output": p, "width": self.width, "height": self.height}]]

        return one(), one()

    def latent(self, batch: int = 1) -> dict:
        return {"samples": torch.zeros(batch, 4, self.height // 8, self.width // 8)}

    def sample(self, model, steps: int | None = None, cfg: float | None = None, seed: int = 0,
               sampler: str = "euler", scheduler: str = "normal", batch: int = 1) -> torch.Tensor:
        """One image (batch) through ComfyUI's own KSampler path (nodes.common_ksampler), under
        torch.inference_mode() as ComfyUI's executor runs every prompt (execution.py): without it each op pays
        autograd's version and view bookkeeping, ~35% more host time per eager step on a lent H100."""
        import nodes

        pos, neg = self.conds(batch)
        with torch.inference_mode():
            (out,) = nodes.common_ksampler(model, seed, steps or self.steps, self.cfg if cfg is None else cfg,
                                           sampler, scheduler, pos, neg, self.latent(batch))
        return out["samples"]

    def measure(self, fn: Callable[[], Any], warmup: int = 1, repeat: int | None = None) -> Measured:
        """Median wall time of fn() after warm-up, with the device synchronized, and peak allocated memory."""
        for _ in range(warmup):
            fn()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, result = [], None
        for _ in range(repeat or self.repeat):
            t0 = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / GIB if self.device.type == "cuda" else 0.0
        return Measured(statistics.median(times), peak, result, times)

    def held_gib(self, fn: Callable[[], Any]) -> float:
        """Peak device memory the allocator holds during one fn() call, cached blocks emptied first (0 on CPU):
        unlike the allocated peak it counts memory that CUDA graphs keep in their private pools, which is
        allocated once at capture (before the timed calls) and held from then on."""
        if self.device.type != "cuda":
            return 0.0
        self.sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return torch.cuda.max_memory_reserved() / GIB

    def measure_interleaved(self, fns: dict[str, Callable[[], Any]], rounds: int | None = None,
                            warmup: int = 1) -> dict[str, Measured]:
        """Like measure() for several variants, run in rounds (A B C, A B C, ...): eager SDXL on a fast GPU is
        launch-bound and drifts run to run by up to ~20% (host load, clocks), and drift between back-to-back
        blocks of one variant would show up as a difference between variants. Median per variant; peak per
        variant over its own calls."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        self.sync()
        cuda = self.device.type == "cuda"
        times: dict[str, list[float]] = {k: [] for k in fns}
        peaks: dict[str, float] = dict.fromkeys(fns, 0.0)
        results: dict[str, Any] = {}
        for _ in range(rounds or (1 if self.small else 5)):
            for k, fn in fns.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                results[k] = fn()
                self.sync()
                times[k].append(time.perf_counter() - t0)
                if cuda:
                    peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated() / GIB)
        return {k: Measured(statistics.median(times[k]), peaks[k], results[k], times[k]) for k in fns}

    def step_stamps(self, model, steps: int = 12, seed: int = 0, batch: int = 1,
                    sync: bool = False) -> list[tuple[float, float]]:
        """(wall, cpu) of each step after the first, from one run: the time between the sampler's per-step
        callbacks (ComfyUI's), in wall time and in this thread's CPU time. Entry i is step i + 1's cost; the
        first step, which includes the run's setup, is left out. Under inference mode, as sample(). The
        sampler does not wait for the GPU at each step: where steps queue more GPU work than host work (CUDA
        graph replays), a step's wall time is only its host time unless `sync` makes each callback wait for
        the device first (then each step's GPU work is in its own stamp, at one synchronization per step)."""
        import comfy.sample

        pos, neg = self.conds(batch)
        latent = comfy.sample.fix_empty_latent_channels(model, self.latent(batch)["samples"])
        noise = comfy.sample.prepare_noise(latent, seed)
        stamps: list[tuple[float, float]] = []

        def stamp(*_):
            if sync:
                self.sync()
            stamps.append((time.perf_counter(), time.thread_time()))

        with torch.inference_mode():
            comfy.sample.sample(model, noise, steps, self.cfg, "euler", "normal", pos, neg, latent, seed=seed,
                                callback=stamp, disable_pbar=True)
        self.sync()
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]

    def step_period(self, model, steps: int = 12, seed: int = 0, batch: int = 1,
                    sync: bool = False) -> tuple[float, float]:
        """(wall, cpu): median seconds per sampler step of one run (step_stamps). Wall is the steady-state
        cost of a step, free of the per-run fixed costs that whole-image times include; CPU time is what an
        eager, launch-bound step is made of, and it does not count the time a loaded host spends running
        someone else. `sync`: see step_stamps (needed where a model replays CUDA graphs)."""
        pairs = self.step_stamps(model, steps, seed, batch, sync=sync)
        return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)

    def kernel_ms_per_step(self, model, steps: int = 6) -> float | None:
        """Summed GPU kernel time per sampler step of one run (torch.profiler, CUDA activity): the device work a
        step issues, whatever the host's load; None off CUDA or where the profiler gives no kernel times."""
        if self.device.type != "cuda":
            return None
        from torch.profiler import ProfilerActivity, profile

        self.step_period(model, steps=2)  # warm: nothing lazy inside the profiled run
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.step_period(model, steps=steps)
        total_us = kernel_us(prof)
        return total_us / 1000 / steps if total_us > 0 else None

    def step_ratio_interleaved(self, models: dict[str, Any], reference: str, rounds: int | None = None,
                               steps: int = 12, sync: bool = False) -> dict[str, dict]:
        """Per-step cost of each model against `reference`, from many short runs alternated model by model
        (A B C, A B C, ...). Eager timings drift between minutes by more than a few-percent difference; short
        alternated runs and the median of the per-round ratios cancel most of that drift. Returns, per model:
        step_s / cpu_s (median step period, wall and CPU), ratio / cpu_ratio (median over rounds of the
        model's period / the reference's in the same round) and rounds (default SDXLOPT_BENCH_STEP_ROUNDS or
        30; 1 with --small). `sync`: the GPU synchronized at each step (see step_stamps)."""
        rounds = 1 if self.small else rounds or STEP_ROUNDS
        periods: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
        for m in models.values():  # warm-up: kernels, autotuning, model loads
            self.step_period(m, steps=3, sync=sync)
        for _ in range(rounds):
            for k, m in models.items():
                periods[k].append(self.step_period(m, steps=3 if self.small else steps, sync=sync))
        ref = periods[reference]
        out = {}
        for k, v in periods.items():
            out[k] = {"step_s": statistics.median(p[0] for p in v), "cpu_s": statistics.median(p[1] for p in v),
                      "ratio": statistics.median(a[0] / b[0] for a, b in zip(v, ref)),
                      "cpu_ratio": statistics.median(a[1] / b[1] for a, b in zip(v, ref)), "rounds": rounds}
        return out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def free_models(self) -> None:
        """Unload everything ComfyUI holds on the device, so the next case starts clean."""
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()

    def clean_start(self) -> tuple[float, float]:
        """free_models, then what stays allocated and held on the device (GiB; 0 on CPU): what a row that loads
        its own model next must subtract from its peaks (other models' leftovers, CUDA-graph pools kept alive)."""
        self.free_models()
        gc.collect()
        if self.device.type != "cuda":
            return 0.0, 0.0
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / GIB, torch.cuda.memory_reserved() / GIB

    def add_row(self, case: str, name: str, m: Measured | None = None, steps: int | None = None, **extra) -> dict:
        row = {"case": case, "name": name}
        if m is not None:
            steps = steps or self.steps
            row.update(steps=steps, s_per_image=round(m.seconds, 4), s_per_step=round(m.seconds / steps, 5),
                       peak_vram_gib=round(m.peak_gib, 3), runs_s=[round(t, 4) for t in m.all_seconds])
        row.update(extra)
        self.rows.append(row)
        print(f"  {case}/{name}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("case", "name")),
              flush=True)
        return row


def alternated_cuda_times(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 3,
                          before: Callable[[str], Any] | None = None) -> dict[str, list[tuple[float, float]]]:
    """(wall, host CPU until return) seconds of each call, the functions alternated round by round (A B C,
    A B C, ...), the GPU synchronized around each call (micro benchmarks of one forward). `before(name)` runs
    ahead of each call, outside the timing (switching a shared model into that variant)."""
    for k, fn in fns.items():
        for _ in range(warmup):
            if before is not None:
                before(k)
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if before is not None:
                before(k)
            torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            c1 = time.thread_time()
            torch.cuda.synchronize()
            times[k].append((time.perf_counter() - w0, c1 - c0))
    return times


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in float64): how the bench and the micros compare an output with its reference."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def kernel_us(prof) -> float:
    """Total GPU kernel time (us) of a torch.profiler run: the device entries only. With CPU activity on, each
    CPU op also carries its kernels' time as self device time; summing every entry would count kernels twice."""
    from torch.autograd import DeviceType

    return sum(float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
               for e in prof.key_averages() if e.device_type != DeviceType.CPU)


def kernel_count(prof) -> int:
    """Kernels (and other device ops) launched in a torch.profiler run."""
    from torch.autograd import DeviceType

    return sum(e.count for e in prof.key_averages() if e.device_type != DeviceType.CPU)


def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Seeded fan-in normal weights, ~1 norm scales, small biases; on the module's own device (fast on GPU)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
