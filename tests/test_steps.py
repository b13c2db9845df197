"""ops/steps.py: the step of each model call from the sampler's callback, with no device read; the sigma
read as the fallback (first step, samplers off the schedule)."""
from __future__ import annotations

import pytest

from sdxl_optimizer.ops.steps import StepClock, step_index

SIGMAS = [14.6, 9.0, 5.0, 2.0, 0.0]  # 4 steps


class Reader:
    """A read_sigma stand-in that counts how often the clock asked for the device value."""

    def __init__(self, value: float) -> None:
        self.value, self.reads = value, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.value


def test_step_index_maps_sigmas_and_midpoints_to_steps():
    assert [step_index(s, SIGMAS) for s in SIGMAS[:-1]] == [0, 1, 2, 3]
    assert step_index(7.0, SIGMAS) == 1
    assert step_index(3.0, SIGMAS) == 2  # a 2S/SDE midpoint belongs to the step that started above it
    assert step_index(100.0, SIGMAS) == 0 and step_index(0.0, SIGMAS) == 3
    assert step_index(9.0 * (1 - 1e-6), SIGMAS) == 1  # float noise around a listed sigma


def test_first_order_sampler_never_reads_the_sigma():
    clock, read = StepClock(SIGMAS), Reader(-1.0)  # a wrong value: any read would show in the steps
    steps = []
    for i in range(4):
        steps.append(clock.step_of_call(read))
        clock.report(i)
    assert steps == [0, 1, 2, 3] and read.reads == 0 and clock.sigma_reads == 0


def test_calls_before_the_first_report_read_the_sigma_then_the_count_takes_over():
    clock = StepClock(SIGMAS)
    assert clock.step_of_call(Reader(14.6)) == 0  # first call of the run: step 0, no read
    r = Reader(14.6)
    assert clock.step_of_call(r) == 0 and r.reads == 1  # a second call in step 0 (split batch): read
    clock.report(0)
    r = Reader(-1.0)
    assert clock.step_of_call(r) == 1 and clock.step_of_call(r) == 1 and r.reads == 0  # two calls, step 1
    clock.report(1)
    clock.report(1)  # a repeated report is harmless
    assert clock.step_of_call(r) == 2 and r.reads == 0
    clock.report(3)
    assert clock.step_of_call(r) == 3, "clamped to the last step"


@pytest.mark.parametrize("bad", [4, 7, -1])
def test_a_report_outside_the_schedule_switches_to_reading_sigmas(bad):
    clock = StepClock(SIGMAS)
    clock.step_of_call(Reader(14.6))
    clock.report(0)
    clock.report(bad)
    assert not clock.counting and "reported step" in clock.why_reading
    r = Reader(5.0)
    assert clock.step_of_call(r) == 2 and r.reads == 1


def test_a_report_going_backwards_switches_to_reading_sigmas():
    clock = StepClock(SIGMAS)
    clock.report(2)
    clock.report(0)
    assert not clock.counting


def test_not_counting_reads_every_call_but_the_first():
    clock = StepClock(SIGMAS, counting=False)
    r = Reader(9.0)
    assert clock.step_of_call(r) == 1 and r.reads == 1
    clock.report(0)
    assert clock.step_of_call(r) == 1 and r.reads == 2
    assert clock.sigma_at(99) == 0.0 and clock.sigma_at(-3) == 14.6 and clock.num_steps == 4
