"""Turn a real workflow's API prompt into one that runs in seconds on the CPU: every checkpoint loader
becomes the tiny seeded model, latents shrink to 64x64 and samplers to a few steps. Used by the workflow
tests and by the tier benchmark's --small smoke mode."""
from __future__ import annotations

import json

# loader -> test stand-in with the same output slots (MODEL, CLIP, VAE)
TINY_LOADERS = {"CheckpointLoaderSimple": "SDXLOptTestTinyCheckpoint",
                "SDXLOptFP8CheckpointLoader": "SDXLOptTestTinyCheckpoint"}
MAX_STEPS = 4


def tiny_prompt(prompt: dict, loaders: dict[str, str] | None = None) -> dict:
    """A copy of `prompt` with the tiny model and small sizes substituted."""
    loaders = {**TINY_LOADERS, **(loaders or {})}
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if node["class_type"] in loaders:
            node["class_type"] = loaders[node["class_type"]]
            node["inputs"] = {"seed": 0, "vae": "kl"}
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            node["inputs"]["steps"] = min(node["inputs"]["steps"], MAX_STEPS)
    return out
