"""API prompts on the tiny test checkpoint: a sampled latent for the VAE tests, and the isolation graphs of the
model-patch nodes.

One graph samples the original model and the patched one (two KSamplers on one loader); the same graph
without the patch is the reference: the original's output must be the same in both, i.e. the patch node did
not change the model it was given."""
from __future__ import annotations

from collections.abc import Callable

import torch

ORIGINAL, PATCHED = "6", "7"  # the two KSamplers' node ids
SAMPLED = "4"  # sampled_latent's KSampler: its output 0 is the latent


def sampled_latent(vae: str, size: int = 64, batch: int = 1, steps: int = 2) -> dict:
    """Nodes 1-4: the tiny checkpoint with `vae` ("taesd" or "kl") -> "a cat" -> KSampler SAMPLED (cfg 1) on an
    empty size x size latent. Its VAE is ["1", 2]; add the decode/encode nodes under ids from "5" on."""
    return {
        "1": {"class_type": "SDXLOptTestTinyCheckpoint", "inputs": {"seed": 0, "vae": vae}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        SAMPLED: {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 1,
            "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    }


def two_samplers(patch: dict | None, negative: str | None = "", cfg: float = 5.0, steps: int = 2, seed: int = 1,
                 prefix: str = "isolation") -> dict:
    """Tiny checkpoint -> KSampler ORIGINAL on its model; with `patch` (a node of {"class_type", "inputs"}
    without "model", which is filled in) also KSampler PATCHED on the patched model. Both save their latent.
    `negative` None: the positive conditioning is the negative too."""
    p = {
        "1": {"class_type": "SDXLOptTestTinyCheckpoint", "inputs": {"seed": 0, "vae": "taesd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        ORIGINAL: {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": [ORIGINAL, 0], "filename_prefix": prefix}},
    }
    if negative is not None:
        p["3"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": negative}}
        p[ORIGINAL]["inputs"]["negative"] = ["3", 0]
    if patch is not None:
        p["5"] = {"class_type": patch["class_type"], "inputs": {"model": ["1", 0], **patch["inputs"]}}
        p[PATCHED] = {"class_type": "KSampler", "inputs": {**p[ORIGINAL]["inputs"], "model": ["5", 0]}}
        p["9"] = {"class_type": "SaveLatent", "inputs": {"samples": [PATCHED, 0], "filename_prefix": prefix}}
    return p


def original_and_patched(run_prompt: Callable, patch: dict, **graph) -> tuple[torch.Tensor, torch.Tensor]:
    """Run two_samplers with and without the patch; assert the original's latent is the same in both; return
    (original latent, patched latent)."""
    both = run_prompt(two_samplers(patch, **graph))
    alone = run_prompt(two_samplers(None, **graph))
    original = alone.output(ORIGINAL)[0]["samples"]
    assert torch.equal(both.output(ORIGINAL)[0]["samples"], original), "the original model's output changed"
    return original, both.output(PATCHED)[0]["samples"]
