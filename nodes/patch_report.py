"""SDXLOpt Patch Report: lists the patches, wrappers and object patches a MODEL carries, unchanged."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..ops.patch_report import describe, dtype_histogram, format_report
from . import CATEGORY

# model_options entries that hold a single callable (single-slot hooks: a pack that sets one replaces
# what was there unless it chains to it)
SINGLE_SLOTS = (
    "model_function_wrapper",
    "sampler_cfg_function",
    "sampler_calc_cond_batch_function",
    "denoise_mask_function",
)


def snapshot(model) -> dict[str, dict[str, str]]:
    """The model's patches, named, grouped by the extension point that carries them."""
    opts = model.model_options
    topts = opts.get("transformer_options", {})
    weight_patches = {k: f"{len(v)} patch(es)" for k, v in model.patches.items()}
    sections = {
        "weight patches (LoRA etc.)": ({"keys patched": f"{len(weight_patches)}"} if weight_patches else {}),
        "object patches": {k: describe(v) for k, v in model.object_patches.items()},
        "single-slot hooks": {k: describe(opts[k]) for k in SINGLE_SLOTS if opts.get(k) is not None},
        "cfg functions": {k: describe(opts[k]) for k in ("sampler_pre_cfg_function", "sampler_post_cfg_function")
                          if opts.get(k)},
        "block patches": {k: describe(v) for k, v in topts.get("patches", {}).items()},
        "block replacements": {f"{name}/{block}": describe(fn)
                               for name, blocks in topts.get("patches_replace", {}).items()
                               for block, fn in blocks.items()},
        "wrappers": {f"{wtype}/{key}": describe(fns) for wtype, by_key in model.wrappers.items()
                     for key, fns in by_key.items() if fns},
        "callbacks": {f"{ctype}/{key}": describe(fns) for ctype, by_key in model.callbacks.items()
                      for key, fns in by_key.items() if fns},
        "transformer options": {k: describe(v) for k, v in topts.items()
                                if k not in ("patches", "patches_replace", "wrappers", "callbacks")},
        "custom operations": ({"custom_operations": describe(opts["custom_operations"])}
                              if opts.get("custom_operations") is not None else {}),
    }
    return sections


class PatchReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLOptPatchReport",
            display_name="SDXLOpt Patch Report",
            category=f"{CATEGORY}/diagnostics",
            description="Lists every patch, wrapper, hook and object patch the MODEL carries, and its weight "
                        "dtypes. Changes nothing: the MODEL passes through as it came.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to inspect (any model, patched or not). It is "
                                                 "passed through unchanged."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The same MODEL, unchanged."),
                io.String.Output(display_name="report", tooltip="The report as text."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: io.Model.Type) -> io.NodeOutput:
        inner = model.model
        dtypes = dtype_histogram(inner.parameters())
        title = (f"{type(inner).__name__} ({type(getattr(inner, 'diffusion_model', inner)).__name__}), "
                 f"weights: " + ", ".join(f"{d} {n / 1e6:.1f}M" for d, n in dtypes.items()))
        report = format_report(title, snapshot(model))
        return io.NodeOutput(model, report, ui=ui.PreviewText(report))


NODES = [PatchReport]
