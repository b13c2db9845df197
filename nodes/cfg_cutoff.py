"""SDXLOpt CFG Cutoff: classifier-free guidance for the first part of sampling only, then the positive
prompt alone, with the uncond half really removed from the UNet batch (not computed and discarded).

Hooked through two multi-slot wrappers: CALC_COND_BATCH (drops the negative from the cond batch once the
run is past the cutoff and hands the positive prediction to every slot, so the CFG formula returns it
unchanged, as a cfg 1.0 step would) and OUTER_SAMPLE (fresh per-run state, one summary line, reset in
`finally`). The decision is made there, outside the UNet forward, from the run's own sigmas.
"""
from __future__ import annotations

import logging

import comfy.patcher_extension
from comfy_api.latest import io

from ..ops.cfg_cutoff import (
    CFGCutoffState,
    drop_guidance_conds,
    has_guidance_conds,
    positive_only_outputs,
    validate_fraction,
    validate_sigma,
)
from . import ADVANCED, CATEGORY
from ._run import per_run_wrapper

log = logging.getLogger(__name__)

KEY = "sdxlopt_cfg_cutoff"  # wrapper key and transformer_options entry holding the CFGCutoffState
WrappersMP = comfy.patcher_extension.WrappersMP


def _sigma_of(timestep) -> float:
    return float(timestep.reshape(-1)[0]) if hasattr(timestep, "reshape") else float(timestep)


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    """Past the cutoff: compute the first (positive) cond only and give its prediction to every slot."""
    topts = model_options.get("transformer_options", {})
    state: CFGCutoffState | None = topts.get(KEY)
    if state is None or not has_guidance_conds(conds):  # cfg 1, or a single-cond call (PAG, SAG, ...)
        return executor(model, conds, x_in, timestep, model_options)
    # the step from the sampler's callback (ops/steps.py); the sigma is read from the device only as a fallback
    sigma, unguided = state.call_past_cutoff(lambda: _sigma_of(timestep), topts.get("sample_sigmas"))
    state.record(sigma, unguided)
    if not unguided:
        return executor(model, conds, x_in, timestep, model_options)
    out = executor(model, drop_guidance_conds(conds), x_in, timestep, model_options)
    return positive_only_outputs(out, len(conds))


def _begin_run(guider, state: CFGCutoffState, sigmas) -> None:
    if guider.model_options.get("disable_cfg1_optimization", False):
        log.warning("SDXLOpt CFG Cutoff: another patch on this model asks for the uncond pass even at "
                    "cfg 1 (disable_cfg1_optimization, e.g. Self-Attention Guidance); after the cutoff "
                    "that pass is skipped and such patches see the positive prediction in its place.")


# per run: a fresh clone of the node's state, the step clock, one summary line, reset in finally
outer_sample_wrapper = per_run_wrapper(KEY, CFGCutoffState, _begin_run, log, "SDXLOpt CFG Cutoff: %s.")


def apply_cfg_cutoff(model, fraction: float, sigma: float = 0.0):
    """A clone of `model` with the CFG cutoff attached (any earlier CFG cutoff on it is replaced)."""
    validate_fraction(fraction)
    validate_sigma(sigma)
    m = model.clone()
    for wtype in (WrappersMP.OUTER_SAMPLE, WrappersMP.CALC_COND_BATCH):
        m.remove_wrappers_with_key(wtype, KEY)  # a second cutoff node replaces the first, never stacks
    m.model_options.get("transformer_options", {}).pop(KEY, None)
    if fraction >= 1.0 and sigma <= 0.0:  # switched off: attach nothing
        return m
    m.model_options.setdefault("transformer_options", {})[KEY] = CFGCutoffState(fraction=float(fraction),
                                                                                 sigma=float(sigma))
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, KEY, calc_cond_batch_wrapper)
    return m


class CFGCutoff(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptCFGCutoff",
            display_name="SDXLOpt CFG Cutoff",
            category=f"{CATEGORY}/speed",
            description="Stops classifier-free guidance after a fraction of the steps: from then on only the "
                        "positive prompt goes through the model (the negative is removed from the batch, so "
                        "those steps cost about half). The result after the cutoff equals a cfg 1.0 step. "
                        "Works with KSampler, KSamplerAdvanced and the custom samplers, any batch size.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to patch (any model that uses CFG). The input "
                                                 "model is not changed; a patched clone is returned."),
                io.Float.Input("fraction", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the sampler's steps that keep CFG (0-1). As in the diffusers "
                                       "guide, step index int(steps x fraction) is the last guided step: with "
                                       "50 steps and 0.5, steps 0-25 use CFG and 26-49 the positive prompt "
                                       "only. Counts the steps of the sampler node it runs in (for "
                                       "KSamplerAdvanced: its start-end range). 1.0 switches the cutoff off."),
                io.Float.Input("sigma", default=0.0, min=0.0, max=1000.0, step=0.01, **ADVANCED,
                               tooltip="Optional noise-level criterion: guidance also stops at any model call "
                                       "whose sigma is at or below this value, whichever comes first with "
                                       "the fraction. Independent of the step count (useful for split "
                                       "samplers). SDXL sigmas run from about 14.6 down to 0.03. 0 switches "
                                       "this criterion off."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone of the MODEL with the cutoff.")],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, fraction: float, sigma: float = 0.0) -> io.NodeOutput:
        return io.NodeOutput(apply_cfg_cutoff(model, fraction, sigma))


NODES = [CFGCutoff]
