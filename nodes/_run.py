"""Per-run state for the pack's sampling patches (DeepCache, CFG cutoff): one OUTER_SAMPLE wrapper shape.

Each patch keeps a template state object in transformer_options[key]. For every sampling run the wrapper
made by `per_run_wrapper` puts a fresh `clone()` of it into a cloned model_options (so two runs, two
samplers in one graph, or an interrupted run never share state), gives it a StepClock fed by the
sampler's per-step callback (so the patch knows each call's step without a GPU sync, see ops/steps.py),
lets the patch plan the run, and in `finally` logs the state's summary and resets it.

The state object provides: clone(), reset(), summary() and an attribute `clock`. Wrapper point
(OUTER_SAMPLE) and CFGGuider.outer_sample's arguments (sigmas, callback, sampler) are the same in ComfyUI
0.3.75 and upstream; they are bound by name, so a reordering would not break this.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import comfy.model_patcher
import torch

from ..ops.steps import StepClock

# samplers that evaluate the model at sigmas of their own choosing (ComfyUI's ksampler() local functions):
# their callback's step index does not index the schedule
OFF_SCHEDULE_SAMPLERS = ("dpm_fast_function", "dpm_adaptive_function")


def _bind(fn: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments | None:
    try:
        return inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):  # a signature we do not know: no clock, the patch reads sigmas
        return None


def _counting(sampler: Any) -> bool:
    fn = getattr(sampler, "sampler_function", None)
    return getattr(fn, "__name__", "") not in OFF_SCHEDULE_SAMPLERS


def _clock_callback(clock: StepClock, callback: Callable | None) -> Callable:
    def callback_with_clock(step, *args, **kwargs):
        clock.report(step)
        if callback is not None:
            return callback(step, *args, **kwargs)
        return None

    return callback_with_clock


def per_run_wrapper(key: str, state_type: type, begin: Callable[[Any, Any, torch.Tensor | None], None],
                    log: logging.Logger, fmt: str = "%s", end: Callable[[Any], None] | None = None,
                    clock: bool = True) -> Callable:
    """An OUTER_SAMPLE wrapper: fresh state of `state_type` from transformer_options[key] for each run, with
    a StepClock on the run's sigmas (unless clock=False); begin(guider, state, sigmas) plans the run; in
    finally end(state) (default: log its summary()), then state.reset()."""

    def outer_sample_wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        orig_options = guider.model_options
        state = None
        try:
            guider.model_options = comfy.model_patcher.create_model_options_clone(orig_options)
            topts = guider.model_options.setdefault("transformer_options", {})
            if isinstance(topts.get(key), state_type):
                state = topts[key] = topts[key].clone()
                bound = _bind(guider.outer_sample, args, kwargs)
                sigmas = bound.arguments.get("sigmas") if bound is not None else None
                if (clock and torch.is_tensor(sigmas) and sigmas.numel() > 1
                        and "callback" in bound.signature.parameters):
                    # one host copy of the schedule per run; from then on the callback counts the steps
                    state.clock = StepClock(sigmas.reshape(-1).tolist(), _counting(bound.arguments.get("sampler")))
                    bound.arguments["callback"] = _clock_callback(state.clock, bound.arguments.get("callback"))
                    args, kwargs = bound.args, bound.kwargs
                begin(guider, state, sigmas if torch.is_tensor(sigmas) else None)
            return executor(*args, **kwargs)
        finally:
            if state is not None:
                if end is not None:
                    end(state)
                else:
                    log.info(fmt, state.summary())
                    run_clock = getattr(state, "clock", None)
                    if run_clock is not None and run_clock.why_reading:
                        log.info("%s", fmt % run_clock.why_reading)
                state.reset()
            guider.model_options = orig_options

    outer_sample_wrapper.__qualname__ = f"outer_sample_wrapper[{key}]"
    return outer_sample_wrapper
