"""SDXLOpt FreeU: FreeU with SDXL presets, applied to the blocks diffusers applies it to.

One output-block patch (ComfyUI keeps a list of them, so other packs' patches run alongside). Diffusers
applies FreeU to its first two up blocks (resolution_idx 0 and 1: every resnet of the two lowest-resolution
decoder stages); here the same stages are found from the UNet's own output blocks (a stage ends with the
block that upsamples), so the patch matches diffusers block for block. ComfyUI core's FreeU nodes instead
key on the channel count (model_channels * 4 -> b1/s1, * 2 -> b2/s2): on SDXL that also hits the first
block of stage 2 (640 channels in) and gives the first block of stage 1 (1280 in) b1 instead of b2.

The patch decides everything at node time (block table, Fourier method for the device); inside the UNet
forward it is plain tensor math with no try/except and no host syncs, so it compiles without graph breaks.
"""
from __future__ import annotations

import logging

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, Upsample
from comfy_api.latest import io

from ..ops.freeu import FOURIER_METHODS, PRESETS, VERSIONS, FreeUConfig, decoder_stages, fft_supported, freeu_stage
from . import ADVANCED, CATEGORY

log = logging.getLogger(__name__)

CUSTOM = "custom"
PATCHED_STAGES = 2  # FreeU touches the two lowest-resolution decoder stages, as diffusers' apply_freeu


class FreeUPatch:
    """output_block_patch: (h, hsp, transformer_options) -> (h, hsp) with FreeU on the patched stages."""

    # the same tensor math at every call (factors and method fixed at node time, the block id set by the
    # forward itself): the CUDA-graph paths of DeepCache and the fp8 loaders may capture it (nodes/_unet_graph.py)
    sdxlopt_graph_safe = True

    def __init__(self, factors: tuple[tuple[float, float] | None, ...], version: str, threshold: int,
                 method: str) -> None:
        self.factors = factors  # per output block: (b, s) or None
        self.version = version
        self.threshold = threshold
        self.method = method
        self.warned = False

    def __call__(self, h, hsp, transformer_options):
        block = transformer_options.get("block")
        if block is None or block[0] != "output":
            if not self.warned:
                self.warned = True
                log.warning("SDXLOpt FreeU: the UNet forward did not say which output block runs "
                            "(transformer_options['block'] missing); FreeU is skipped there. Another patch "
                            "replaced ComfyUI's UNet forward: put FreeU on the model before it, or remove it.")
            return h, hsp
        factor = self.factors[block[1]] if block[1] < len(self.factors) else None
        if factor is None:
            return h, hsp
        return freeu_stage(h, hsp, factor[0], factor[1], self.version, self.threshold, self.method)



def unet_decoder_factors(model, config: FreeUConfig) -> tuple[tuple[float, float] | None, ...]:
    """(b, s) for each output block of the model's UNet (None outside the two patched stages).

    Raises for models without a UNet decoder (DiT-style models have no output blocks / skip connections)."""
    dm = getattr(model.model, "diffusion_model", None)
    blocks = getattr(dm, "output_blocks", None)
    if not isinstance(dm, UNetModel) or not blocks:
        raise ValueError(
            f"SDXLOpt FreeU: expected a UNet model with decoder output blocks and skip connections (SDXL, "
            f"SD1.x, SD2.x), got {type(model.model).__name__} whose diffusion model is {type(dm).__name__}, "
            f"which has no output_blocks. FreeU rebalances UNet skip features, which this architecture does "
            f"not have. Fix: remove the FreeU node for this model (or use it on an SDXL/SD1.x checkpoint).")
    stages = decoder_stages([any(isinstance(layer, Upsample) for layer in block) for block in blocks])
    per_stage = config.stage_factors()
    return tuple(per_stage[s] if s < PATCHED_STAGES else None for s in stages)


def resolve_config(preset: str, version: str, b1: float, b2: float, s1: float, s2: float) -> FreeUConfig:
    if preset == CUSTOM:
        return FreeUConfig(float(b1), float(b2), float(s1), float(s2), version)
    return FreeUConfig.from_preset(preset, version)


def resolve_method(method: str, device) -> str:
    """The Fourier path for `device`, decided once: 'fft' falls back to the exact matmul form (one warning)
    where torch.fft does not run."""
    if method not in FOURIER_METHODS:
        raise ValueError(f"SDXLOpt FreeU fourier: expected one of {FOURIER_METHODS}, got {method!r}. "
                         "Fix: use 'matmul' (default, every device) or 'fft'.")
    if method == "fft" and not fft_supported(device):
        log.warning("SDXLOpt FreeU: torch.fft does not run on %s; using the exact matmul form of the Fourier "
                    "filter instead (same result).", device)
        return "matmul"
    return method


def apply_freeu(model, config: FreeUConfig, method: str = "matmul"):
    """A clone of `model` with the FreeU output-block patch (the input model is not changed)."""
    factors = unet_decoder_factors(model, config)  # validates the model before anything is cloned
    method = resolve_method(method, getattr(model, "load_device", "cpu"))
    m = model.clone()
    if config.is_identity:
        return m
    patched = [i for i, f in enumerate(factors) if f is not None]
    log.info("SDXLOpt FreeU %s: b1 %.3g, b2 %.3g, s1 %.3g, s2 %.3g on output blocks %s (%s Fourier filter).",
             config.version, config.b1, config.b2, config.s1, config.s2, patched, method)
    m.set_model_output_block_patch(FreeUPatch(factors, config.version, config.threshold, method))
    return m


def _preset_help() -> str:
    return "; ".join(f"{k}: b1 {v[0]}, b2 {v[1]}, s1 {v[2]}, s2 {v[3]}" for k, v in PRESETS.items())


class FreeU(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        b1, b2, s1, s2 = PRESETS["SDXL"]
        custom = f" Used only with preset '{CUSTOM}'."
        return io.Schema(
            node_id="SDXLOptFreeU",
            display_name="SDXLOpt FreeU",
            category=f"{CATEGORY}/quality",
            description="FreeU: amplifies the UNet decoder's backbone features and damps the low frequencies of "
                        "its skip features in the two lowest-resolution decoder stages, for better detail at no "
                        "extra cost. Same blocks and formula as diffusers' enable_freeu; SDXL preset by default.",
            inputs=[
                io.Model.Input("model", tooltip="The UNet MODEL to patch (SDXL, SD1.x, SD2.x). Not changed; a "
                                                 "patched clone is returned."),
                io.Combo.Input("preset", options=[*PRESETS, CUSTOM], default="SDXL",
                               tooltip="Published FreeU values per model family (" + _preset_help() + "). "
                                       f"'{CUSTOM}' uses b1, b2, s1, s2 below. All four at 1.0 switches FreeU off."),
                io.Combo.Input("version", options=list(VERSIONS), default="v1",
                               tooltip="v1: backbone times b (diffusers and the SDXL guide). v2: backbone times "
                                       "1 + (b - 1) x the normalized mean feature map (official FreeU v2, "
                                       "ComfyUI's FreeU_V2), gentler on flat regions."),
                io.Float.Input("b1", default=b1, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor of decoder stage 1 (lowest resolution): multiplies half "
                                       "the channels. 1.0 = unchanged; FreeU suggests 1.0-1.3." + custom),
                io.Float.Input("b2", default=b2, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor of decoder stage 2. 1.0 = unchanged; FreeU suggests "
                                       "1.2-1.6." + custom),
                io.Float.Input("s1", default=s1, min=0.0, max=10.0, step=0.01,
                               tooltip="Skip factor of decoder stage 1: scales the lowest frequencies of the "
                                       "skip features. 1.0 = unchanged; FreeU suggests <= 1." + custom),
                io.Float.Input("s2", default=s2, min=0.0, max=10.0, step=0.01,
                               tooltip="Skip factor of decoder stage 2. 1.0 = unchanged; FreeU suggests <= 1."
                                       + custom),
                io.Combo.Input("fourier", options=list(FOURIER_METHODS), default="matmul", **ADVANCED,
                               tooltip="How the skip filter is computed. matmul: exact closed form with small "
                                       "matrix products, every device, compiles cleanly (default). fft: "
                                       "torch.fft as diffusers does; falls back to matmul (one warning) on "
                                       "devices without FFT. Same result either way."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone of the MODEL with FreeU.")],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, preset: str = "SDXL", version: str = "v1", b1: float = 1.3,
                b2: float = 1.4, s1: float = 0.9, s2: float = 0.2, fourier: str = "matmul") -> io.NodeOutput:
        config = resolve_config(preset, version, b1, b2, s1, s2)
        return io.NodeOutput(apply_freeu(model, config, fourier))


NODES = [FreeU]
