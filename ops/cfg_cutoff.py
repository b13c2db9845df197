"""Dynamic CFG cutoff: stop classifier-free guidance part-way through sampling and skip the uncond pass.

After the first part of sampling, guidance adds little; from then on only the positive prompt needs the
UNet, which halves the batch of every remaining step. This module holds the decision (which model call
is past the cutoff) and the per-run state; the node layer hooks it into the sampler's cond batch.

Step semantics follow the diffusers callback of the SDXL optimization guide (Félix San, "Ultimate guide to
optimizing Stable Diffusion XL"): the callback runs at the END of step index `int(num_steps * fraction)`
and sets the guidance scale to 0, so that step is still guided and every later step is positive-only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .steps import StepClock

# sigmas of one schedule differ by far more than this; it only absorbs float round-off
SIGMA_REL_TOL = 1e-5


def last_guided_step(num_steps: int, fraction: float) -> int:
    """Index of the last step that keeps CFG: the guide's `int(pipe.num_timesteps * fraction)`."""
    return int(num_steps * fraction)


def first_unguided_step(num_steps: int, fraction: float) -> int | None:
    """Index of the first positive-only step, or None when every step keeps CFG."""
    k = last_guided_step(num_steps, fraction) + 1
    return k if k < num_steps else None


def cutoff_sigma(sigmas: Sequence[float] | torch.Tensor, fraction: float) -> float | None:
    """The sigma at which the first positive-only step starts (steps at or below it skip the uncond pass).

    `sigmas` is the run's schedule, num_steps + 1 values ending with the final sigma (usually 0).
    None when the fraction keeps every step guided (fraction 1.0, or too few steps to reach the cutoff).
    """
    values = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else list(sigmas)
    num_steps = len(values) - 1
    if num_steps < 1:
        return None
    k = first_unguided_step(num_steps, fraction)
    return None if k is None else float(values[k])


def validate_fraction(fraction: float) -> None:
    if not (0.0 <= float(fraction) <= 1.0):
        raise ValueError(f"CFG cutoff fraction: expected a value in [0, 1] (share of the steps that keep CFG), "
                         f"got {fraction}. Fix: use e.g. 0.5 (guide's setting) or 1.0 to switch the cutoff off.")


def validate_sigma(sigma: float) -> None:
    if not (float(sigma) >= 0.0):
        raise ValueError(f"CFG cutoff sigma: expected a sigma >= 0 (0 switches the sigma criterion off), got "
                         f"{sigma}. Fix: use a value inside the schedule, e.g. 1.0 for SDXL (sigmas run ~14.6 -> 0.03).")


@dataclass
class CFGCutoffState:
    """Settings plus the per-run state of one CFG cutoff; clone() per sampling run, reset() in `finally`.

    fraction: share of the steps that keep CFG (guide semantics, see module doc); 1.0 switches it off.
    sigma: guidance also stops at any model call whose sigma is at or below this; 0 switches it off.
    """

    fraction: float = 0.5
    sigma: float = 0.0
    # per run
    guided_calls: int = 0
    unguided_calls: int = 0
    first_unguided_sigma: float | None = None
    _schedule: torch.Tensor | None = field(default=None, repr=False)
    _schedule_cut: float | None = field(default=None, repr=False)
    clock: StepClock | None = field(default=None, repr=False)  # the run's step counter (nodes/_run.py)

    def clone(self) -> CFGCutoffState:
        return CFGCutoffState(fraction=self.fraction, sigma=self.sigma)

    def reset(self) -> CFGCutoffState:
        self.guided_calls = 0
        self.unguided_calls = 0
        self.first_unguided_sigma = None
        self._schedule = None
        self._schedule_cut = None
        self.clock = None
        return self

    def threshold(self, schedule: torch.Tensor | Sequence[float] | None) -> float | None:
        """Largest sigma that is already past the cutoff for this run's schedule (None: never)."""
        cut = None
        if schedule is not None and self.fraction < 1.0:
            if schedule is not self._schedule:  # one host sync per run, not per step
                self._schedule, self._schedule_cut = schedule, cutoff_sigma(schedule, self.fraction)
            cut = self._schedule_cut
        if self.sigma > 0.0:
            cut = self.sigma if cut is None else max(cut, self.sigma)
        return cut

    def is_past_cutoff(self, sigma: float, schedule: torch.Tensor | Sequence[float] | None) -> bool:
        """True when the model call at `sigma` should compute the positive prompt only."""
        cut = self.threshold(schedule)
        return cut is not None and sigma <= cut * (1.0 + SIGMA_REL_TOL)

    def call_past_cutoff(self, read_sigma: Callable[[], float],
                         schedule: torch.Tensor | Sequence[float] | None) -> tuple[float, bool]:
        """(sigma, past the cutoff) for the current model call. With the run's StepClock: the sigma of the
        call's step in the host copy of the schedule (no device read); without one (a call outside a run the
        OUTER_SAMPLE wrapper saw begin): `read_sigma()` (a device sync) against `schedule`."""
        if self.clock is not None:
            sigma = self.clock.sigma_at(self.clock.step_of_call(read_sigma))
            return sigma, self.is_past_cutoff(sigma, self.clock.sigmas)
        sigma = read_sigma()
        return sigma, self.is_past_cutoff(sigma, schedule)

    def record(self, sigma: float, unguided: bool) -> None:
        if unguided:
            self.unguided_calls += 1
            if self.first_unguided_sigma is None:
                self.first_unguided_sigma = sigma
        else:
            self.guided_calls += 1

    def summary(self) -> str:
        total = self.guided_calls + self.unguided_calls
        if total == 0:
            return "no guided model calls (cfg 1 or no negative): nothing to cut"
        if self.unguided_calls == 0:
            return f"full CFG on all {total} model calls (cutoff not reached)"
        return (f"full CFG on {self.guided_calls} of {total} model calls, positive prompt only on "
                f"{self.unguided_calls} (uncond pass skipped from sigma {self.first_unguided_sigma:.4g})")


def drop_guidance_conds(conds: Sequence) -> list:
    """The cond list with only the first (positive) entry kept: the others become None (not computed)."""
    return [conds[0]] + [None] * (len(conds) - 1)


def positive_only_outputs(outputs: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Every slot gets the positive prediction, so any guidance built on (cond - uncond) vanishes:
    uncond + (cond - uncond) * scale == cond exactly, which is what a cfg 1.0 step returns."""
    return [outputs[0]] * n


def has_guidance_conds(conds: Sequence) -> bool:
    """True when a cond batch carries a positive entry plus at least one other (negative) entry to compute."""
    return len(conds) >= 2 and conds[0] is not None and any(c is not None for c in conds[1:])
