"""DeepCache for UNets: which steps run the whole UNet, where the shallow path re-joins, and the per-run cache.

A UNet's deep features change little between adjacent denoising steps. On a *full* step the whole UNet runs
and the features entering the first output block of the shallow path are kept; on the *shallow* steps in
between only the first `branch + 1` input blocks and the last `branch + 1` output blocks run, and the kept
deep features re-join at skip connection `branch`. This module is the torch-only half: the step schedule
(uniform, or the paper's non-uniform one), the sigma -> step mapping, the block plan of a branch, and the
per-run state that keeps one cache entry per conditioning chunk, so the cache follows the batch when CFG
conds come and go. The ComfyUI wiring (wrappers, the shallow forward) lives in nodes/deepcache.py.

Indexing: UNet skip connections are numbered in input-block order (0 = the stem conv). For UNets with two
res blocks per level (SD1.x, SD2.x, SDXL) skip `i` is exactly DeepCache's `cache_branch_id = i`
(block i // 3, layer i % 3): the down layer cached first is input block i + 1, and the up layer fed by skip i
is the first one recomputed.

Ported from DeepCache (Ma, Fang, Wang, CVPR 2024, https://arxiv.org/abs/2312.00858,
https://github.com/horseee/DeepCache).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace

import torch

from .cuda_graphs import StaticGraphs
from .steps import StepClock, step_index

SCHEDULES = ("uniform", "non-uniform")
NONUNIFORM_POWER_STEP = 0.02  # the paper's search lowers the exponent by this until the count fits
# CUDA graphs kept per node, full and shallow path (sharing one memory pool: about one full forward's
# temporaries): four cover a CFG cutoff's two batch sizes on both paths; anything more re-captures (one
# extra forward or two, once)
GRAPH_LIMIT = 4


@dataclass(frozen=True)
class DeepCacheConfig:
    """What the user chose. Percentages are fractions of sampling (0.0 = first step, 1.0 = last)."""

    interval: int = 3  # one full step every `interval` steps; 1 = every step full (off)
    branch: int = 0  # skip connection where the shallow path re-joins the cached deep features
    start_percent: float = 0.0  # before this, every step is full
    end_percent: float = 1.0  # after this, every step is full
    schedule: str = "uniform"  # "uniform" or "non-uniform" (full steps denser around `center`)
    center: float = 0.3  # non-uniform only: where full steps are densest, as a fraction of the steps
    power: float = 1.4  # non-uniform only: starting exponent of the quadratic spacing

    def validate(self, max_branch: int | None = None) -> None:
        """Raise ValueError saying what was expected, what arrived and the fix."""
        if int(self.interval) != self.interval or self.interval < 1:
            raise ValueError(f"DeepCache cache_interval: expected an integer >= 1 (1 = every step full), got "
                             f"{self.interval!r}. Fix: use 2-5 (3 is the paper's setting) or 1 to switch it off.")
        if self.branch < 0 or (max_branch is not None and self.branch > max_branch):
            expected = f"0..{max_branch} for this UNet ({max_branch + 1} skip connections)" \
                if max_branch is not None else "an integer >= 0"
            raise ValueError(f"DeepCache cache_branch_id: expected {expected}, got {self.branch}. Fix: use a "
                             f"branch in that range (0 = shallowest and fastest).")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"DeepCache window: expected 0 <= start_percent <= end_percent <= 1, got "
                             f"start {self.start_percent}, end {self.end_percent}. Fix: 0.0 and 1.0 cache the "
                             f"whole run.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"DeepCache schedule: expected one of {SCHEDULES}, got {self.schedule!r}.")
        if not 0.0 <= self.center <= 1.0 or not self.power > 1.0:
            raise ValueError(f"DeepCache non-uniform schedule: expected 0 <= center <= 1 and power > 1, got "
                             f"center {self.center}, power {self.power}. Fix: center 0.3, power 1.4.")


def shallow_plan(branch: int, num_skips: int) -> tuple[int, int]:
    """(input blocks to run, first output block to run) of the shallow path re-joining at skip `branch`.

    Output block m consumes skip num_skips - 1 - m, so the output blocks fed by skips 0..branch are the last
    branch + 1; the cached tensor is what enters the first of them.
    """
    if not 0 <= branch < num_skips:
        raise ValueError(f"expected a branch in 0..{num_skips - 1}, got {branch}")
    return branch + 1, num_skips - 1 - branch


def uniform_full_steps(num_steps: int, interval: int) -> list[int]:
    """Steps 0, interval, 2 * interval, ... run in full (DeepCache's uniform 1:N strategy)."""
    return list(range(0, num_steps, interval))


def nonuniform_full_steps(num_steps: int, interval: int, center: float = 0.3, power: float = 1.4) -> list[int]:
    """The paper's non-uniform 1:N schedule: as many full steps as uniform, spaced quadratically around `center`.

    Points are spaced evenly on x**(1/p) between -center and num_steps - center (complex roots for the
    negative side, real parts kept), mapped back by x**p and truncated; the extremes are dropped and step 0
    always runs in full. If the distinct steps do not number ceil(num_steps / interval), p is lowered by 0.02
    and tried again. Raises ValueError when no p > 1 fits (the caller falls back to uniform).
    """
    n_full = math.ceil(num_steps / interval)
    if interval <= 1 or n_full >= num_steps:
        return list(range(num_steps))
    c = round(center * num_steps)
    p = power
    while p > 1:
        lo = complex(-c) ** (1 / p)
        hi = complex(num_steps - c) ** (1 / p)
        step = (hi - lo) / n_full
        points = [j * step + lo for j in range(n_full)] + [hi]
        distinct = sorted({int((v ** p).real) for v in points})
        steps = [0] + [i + c for i in distinct[1:-1]]
        if len(steps) == n_full:
            return steps
        p -= NONUNIFORM_POWER_STEP
    raise ValueError(f"no non-uniform DeepCache schedule with {n_full} full steps out of {num_steps} "
                     f"(center {c}, power {power})")


def full_step_mask(in_window: Sequence[bool], cfg: DeepCacheConfig) -> list[bool]:
    """Per step: True = run the whole UNet. Outside the window every step is full; inside it, the schedule
    counts from the first step in the window (which is full)."""
    window = [i for i, w in enumerate(in_window) if w]
    mask = [True] * len(in_window)
    if cfg.interval <= 1 or not window:
        return mask
    n = len(window)
    if cfg.schedule == "non-uniform":
        full = set(nonuniform_full_steps(n, cfg.interval, cfg.center, cfg.power))
    else:
        full = set(uniform_full_steps(n, cfg.interval))
    for j, i in enumerate(window):
        mask[i] = j in full
    return mask


@dataclass
class _Entry:
    features: torch.Tensor  # deep features entering the first shallow output block
    latent_shape: tuple[int, ...]  # x.shape[1:] of the call that made it


class DeepCacheState:
    """Per-run DeepCache state: the step schedule and one cache entry per conditioning chunk.

    The node keeps one unprepared instance as a template; each sampling run works on `clone()`, `prepare()`d
    with that run's sigmas, and calls `reset()` in `finally`. A call's batch is a concatenation of chunks,
    one per conditioning (`keys`, e.g. ComfyUI's cond uuids), so a shallow call finds each of its chunks'
    features whatever else was batched with them when they were computed.
    """

    def __init__(self, config: DeepCacheConfig, graphs: StaticGraphs | None = None) -> None:
        self.config = config
        # the full and shallow paths as CUDA graphs (nodes/deepcache.py decides when), shared by the runs of one node:
        # keyed by shapes and weight addresses, so a run reuses what an earlier one captured instead of
        # capturing again and re-allocating the graphs' memory (~30 device allocations per run otherwise)
        self.graphs = graphs if graphs is not None else StaticGraphs(limit=GRAPH_LIMIT)
        self.reset()

    def clone(self) -> DeepCacheState:
        """A fresh state with the same settings and nothing cached (the captured graphs are shared)."""
        return DeepCacheState(replace(self.config), self.graphs)

    def reset(self) -> None:
        """Drop the cache, the schedule and the counters (frees the cached tensors)."""
        self.sample_sigmas: list[float] = []
        self.full_mask: list[bool] = []
        self.cache: dict[Hashable, _Entry] = {}  # per conditioning chunk
        self.batches: dict[tuple, _Entry] = {}  # per batch layout of the full calls (the common fast path)
        self.calls = 0
        self.shallow_calls = 0
        self.fallback: str | None = None  # why the schedule differs from the one asked for, if it does
        self.warned: set[str] = set()  # one-per-run warnings already logged by the caller
        self.clock: StepClock | None = None  # the run's step counter (set by nodes/_run.py)
        self.graph_replays = 0  # this run's shallow calls replayed from self.graphs
        self.full_graph_replays = 0  # this run's full calls replayed from self.graphs
        self.memo: dict[Hashable, object] = {}  # facts the node works out once per run (which weights are plain)

    @property
    def prepared(self) -> bool:
        return bool(self.full_mask)

    def prepare(self, sample_sigmas: Sequence[float], sigma_start: float, sigma_end: float) -> DeepCacheState:
        """Plan the run: steps with sigma_end < sigma <= sigma_start are in the window (sigmas of the run's
        schedule, including the final one)."""
        self.sample_sigmas = [float(s) for s in sample_sigmas]
        steps = self.sample_sigmas[:-1]
        in_window = [sigma_end < s <= sigma_start for s in steps]
        try:
            self.full_mask = full_step_mask(in_window, self.config)
        except ValueError as e:
            self.fallback = f"{e}; using the uniform schedule"
            self.full_mask = full_step_mask(in_window, replace(self.config, schedule="uniform"))
        return self

    def is_full_call(self, read_sigma: Callable[[], float]) -> bool:
        """Whether the current UNet call runs the whole UNet (True when unprepared): its step from the run's
        StepClock (no device read) when there is one, else from its sigma (`read_sigma()`, a device sync)."""
        if not self.prepared:
            return True
        if self.clock is None:
            return self.full_mask[step_index(read_sigma(), self.sample_sigmas)]
        return self.full_mask[self.clock.step_of_call(read_sigma)]

    def lookup(self, keys: Sequence[Hashable], latent: torch.Tensor) -> torch.Tensor | None:
        """The cached deep features for a call on `latent` batched as `keys`, or None when any chunk has none
        of the right batch size and latent shape (then the call must run in full)."""
        if not keys or latent.shape[0] % len(keys):
            return None
        shape = tuple(latent.shape[1:])
        whole = self.batches.get(tuple(keys))
        if whole is not None and whole.latent_shape == shape and whole.features.shape[0] == latent.shape[0]:
            return whole.features if whole.features.device == latent.device else None  # same batch as stored
        per_key = latent.shape[0] // len(keys)
        parts = []
        for k in keys:
            e = self.cache.get(k)
            if e is None or e.latent_shape != shape or e.features.shape[0] != per_key:
                return None
            parts.append(e.features)
        if parts[0].device != latent.device:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def store(self, keys: Sequence[Hashable], latent: torch.Tensor, features: torch.Tensor) -> None:
        """Keep `features` (a full call's deep features, batch laid out like `latent`) per chunk, and whole for
        calls batched the same way (no copy)."""
        if not keys or features.shape[0] != latent.shape[0] or latent.shape[0] % len(keys):
            return
        per_key = latent.shape[0] // len(keys)
        shape = tuple(latent.shape[1:])
        for i, k in enumerate(keys):
            self.cache[k] = _Entry(features[i * per_key:(i + 1) * per_key], shape)
        fresh = set(keys)
        self.batches = {t: e for t, e in self.batches.items() if fresh.isdisjoint(t)}
        self.batches[tuple(keys)] = _Entry(features, shape)

    def count(self, shallow: bool) -> None:
        self.calls += 1
        self.shallow_calls += int(shallow)

    def summary(self) -> str:
        cfg = self.config
        line = (f"DeepCache: {self.shallow_calls}/{self.calls} UNet calls took the shallow path "
                f"(interval {cfg.interval}, branch {cfg.branch}, {cfg.schedule}, "
                f"window {cfg.start_percent:g}-{cfg.end_percent:g})")
        if self.graph_replays:
            line += f", {self.graph_replays} of them replayed as a CUDA graph"
        if self.full_graph_replays:
            line += f"; {self.full_graph_replays} full calls replayed as a CUDA graph"
        return line + (f"; {self.fallback}" if self.fallback else "")
