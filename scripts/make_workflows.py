"""Regenerate the shipped workflows (workflows/*.json, frontend UI format) from their descriptions here.

    .host/venv/bin/python scripts/make_workflows.py            # write all
    .host/venv/bin/python scripts/make_workflows.py --check    # fail if a shipped file is out of date

Runs inside the in-process host so each node's widget order comes from its real definition.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACK = HERE.parent
sys.path.insert(0, str(HERE))

from workflow_graph import Workflow, node_defs  # noqa: E402

CHECKPOINT = "sd_xl_base_1.0.safetensors"
POSITIVE = "a photograph of an old lighthouse on a cliff at sunset, dramatic clouds, highly detailed, 35mm"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
STEPS, CFG, SIZE = 30, 5.0, 1024
RESULTS = PACK / "bench" / "results" / "tiers.json"


def patch_report() -> Workflow:
    wf = Workflow()
    wf.note("SDXL Optimizer Pack - Patch Report\n\nPut any stack of patch nodes (ours, core, other packs) between "
            "the loader and the report, queue, and read which patches, wrappers and hooks the MODEL carries. "
            f"Nothing is changed.\n\nNeeds: an SDXL checkpoint in models/checkpoints (default name {CHECKPOINT}).")
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    wf.add("SDXLOptPatchReport", model=ckpt[0])
    return wf


def sdxl_graph(wf: Workflow, fp8: bool = False, patches: tuple = (), decode: str = "full", steps: int = STEPS,
               prefix: str = "sdxlopt") -> None:
    """Loader -> model patches -> text encode -> KSampler -> decode -> SaveImage."""
    if fp8:
        ckpt = wf.add("SDXLOptFP8CheckpointLoader", ckpt_name=CHECKPOINT, weight_dtype="auto")
    else:
        ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    model = ckpt[0]
    for node_type, values in patches:
        model = wf.add(node_type, model=model, **values)[0]
    pos = wf.add("CLIPTextEncode", text=POSITIVE, clip=ckpt[1])
    neg = wf.add("CLIPTextEncode", text=NEGATIVE, clip=ckpt[1])
    latent = wf.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    sampled = wf.add("KSampler", model=model, positive=pos[0], negative=neg[0], latent_image=latent[0], seed=0,
                     steps=steps, cfg=CFG, sampler_name="euler", scheduler="normal", denoise=1.0)
    vae = ckpt[2]
    if decode == "full":
        image = wf.add("VAEDecode", samples=sampled[0], vae=vae)
    elif decode == "tiled":  # tile size 0: chosen from free VRAM; one statistics pass (<= 2/255 at 1024 px)
        image = wf.add("SDXLOptTiledVAEDecode", samples=sampled[0], vae=vae, tile_size=0, overlap=64,
                       groupnorm="global_fast")
    elif decode == "taesd":
        tiny = wf.add("SDXLOptTinyVAELoader", tae_name=TAESDXL, latent_type="auto")
        image = wf.add("SDXLOptTinyVAEDecode", samples=sampled[0], tiny_vae=tiny[0])
    else:
        raise ValueError(f"unknown decode {decode!r}")
    wf.add("SaveImage", images=image[0], filename_prefix=prefix)


TAESDXL = "vae_approx/taesdxl (encoder + decoder)"  # the Tiny VAE loader's entry for the .pth pair

FREEU = ("SDXLOptFreeU", {"preset": "SDXL", "version": "v1"})
DEEPCACHE = ("SDXLOptDeepCache", {"cache_interval": 3, "cache_branch_id": 0})
DEEPCACHE_MILD = ("SDXLOptDeepCache", {"cache_interval": 2, "cache_branch_id": 0})  # less detail traded
CFG_CUTOFF = ("SDXLOptCFGCutoff", {"fraction": 0.5})
COMPILE = ("SDXLOptCompile", {})  # defaults: inductor, CUDA graphs, warm-up


@dataclass
class Tier:
    name: str
    title: str
    emulate_gib: float | None  # the card the benchmark emulates (free VRAM left), None: unconstrained
    target: str
    needs: str
    graph: dict
    shipped: bool = True

    def build(self) -> Workflow:
        wf = Workflow()
        wf.note(self.note_text())
        sdxl_graph(wf, prefix=self.name, **self.graph)
        return wf

    def note_text(self) -> str:
        text = f"SDXL Optimizer Pack - {self.title}\n\n{self.needs}\n\nTarget: {self.target}."
        measured = measured_row(self.name)
        if measured:
            text += (f"\n\nMeasured ({measured['device']}, random SDXL weights, {SIZE}x{SIZE}, {self.graph.get('steps', STEPS)} "
                     f"steps, card emulated with {self.emulate_gib} GiB free): {measured['s_per_image']} s/image, "
                     f"{measured['s_per_step']} s/step, peak {measured['peak_vram_gib']} GiB; "
                     f"{measured.get('x_vs_baseline_s_per_step')}x the unconstrained fp16 speed; latent PSNR vs "
                     f"the unoptimized run {measured.get('latent_psnr_db')} dB (random weights).")
        return text


def measured_row(name: str) -> dict | None:
    if not RESULTS.exists():
        return None
    data = json.loads(RESULTS.read_text())
    row = next((r for r in data["rows"] if r["name"] == name and r.get("s_per_image") is not None), None)
    return {**row, "device": data["meta"]["device"]} if row else None


NEEDS = f"Needs: an SDXL checkpoint in models/checkpoints (set its name in the loader; default {CHECKPOINT})."
TIERS = [
    Tier("baseline_fp16", "unoptimized fp16 baseline (benchmark reference, not shipped)", None, "reference",
         NEEDS, {}, shipped=False),
    Tier("sdxl_4gb", "4 GB cards: fp8 weights, DeepCache, CFG cutoff 50%, tiled VAE decode", 4.0,
         "peak <= 3.5 GiB including decode, <= 1.1x the unconstrained fp16 s/step",
         NEEDS + " UNet weights are stored in float8 (half the VRAM; each layer is upcast when it runs, which "
         "costs time), so DeepCache (some detail traded for speed) and a CFG cutoff win that time back; the "
         "VAE decodes in tiles. For more detail and more time, remove DeepCache.",
         {"fp8": True, "patches": (DEEPCACHE, CFG_CUTOFF), "decode": "tiled"}),
    Tier("sdxl_6gb", "6 GB cards: fp8 weights, FreeU, mild DeepCache, tiled VAE decode", 6.0,
         "peak <= 5.5 GiB, no slower than the fp16 baseline",
         NEEDS + " fp8 weights leave room for FreeU's quality boost; DeepCache at interval 2 (a full UNet "
         "every other step) pays for the fp8 upcast; full CFG; the VAE decodes in tiles.",
         {"fp8": True, "patches": (FREEU, DEEPCACHE_MILD), "decode": "tiled"}),
    Tier("sdxl_8gb", "8 GB cards: fp16, DeepCache, CFG cutoff 50%, compiled, tiled VAE decode", 8.0,
         "peak <= 7.5 GiB, >= 2x faster than the fp16 baseline",
         NEEDS + " DeepCache reuses deep UNet features (some detail traded for speed); guidance stops at 50%; "
         "SDXLOpt Compile removes the per-layer launch overhead that bounds an eager step on a fast GPU. The "
         "first image after starting ComfyUI compiles (about 1.5-3 min, once per session and image size); "
         "where torch.compile cannot run (e.g. no Triton on Windows) the node logs one line and runs eager "
         "(still DeepCache + cutoff; remove the node to skip the attempt).",
         {"patches": (DEEPCACHE, CFG_CUTOFF, COMPILE), "decode": "tiled"}),
    # the same tier without SDXLOpt Compile (bench row): what the 8 GB workflow gives where compile cannot run
    Tier("sdxl_8gb_eager", "8 GB tier without SDXLOpt Compile (benchmark row, not shipped)", 8.0,
         "peak <= 7.5 GiB, >= 2x faster than the fp16 baseline (eager)", NEEDS,
         {"patches": (DEEPCACHE, CFG_CUTOFF), "decode": "tiled"}, shipped=False),
    Tier("sdxl_12gb_quality", "12 GB+ cards, quality: fp16, FreeU, full VAE decode", 12.0,
         "best quality; no speed target",
         NEEDS + " Full precision, FreeU (SDXL preset), the full VAE.",
         {"patches": (FREEU,), "decode": "full"}),
    Tier("sdxl_fastest", "fastest: DeepCache, CFG cutoff, SDXLOpt Compile, Tiny VAE", None,
         "<= 1.0 s/image (30 steps)",
         NEEDS + " Tiny VAE: put taesdxl_encoder.pth and taesdxl_decoder.pth (madebyollin/taesd) into "
         "models/vae_approx. SDXLOpt Compile: the first image after starting ComfyUI compiles (about 1.5-3 min, "
         "once per session and image size); where torch.compile cannot run (e.g. no Triton on Windows) the node "
         "logs one line and runs eager (remove the node to skip the attempt).",
         {"patches": (DEEPCACHE, CFG_CUTOFF, COMPILE), "decode": "taesd"}),
    # the same tier without SDXLOpt Compile (bench row): what the fastest workflow gives where compile cannot run
    Tier("sdxl_fastest_eager", "fastest without SDXLOpt Compile (benchmark row, not shipped)", None,
         "<= 1.0 s/image (30 steps), eager", NEEDS,
         {"patches": (DEEPCACHE, CFG_CUTOFF), "decode": "taesd"}, shipped=False),
]

WORKFLOWS = {"sdxl_patch_report": patch_report, **{t.name: t.build for t in TIERS if t.shipped}}


def build_all() -> dict[str, dict]:
    import comfy_inprocess

    comfy_inprocess.boot(cpu=True)
    defs = node_defs()
    return {name: fn().to_ui(defs) for name, fn in WORKFLOWS.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    built = build_all()
    stale = []
    for name, wf in built.items():
        path = PACK / "workflows" / f"{name}.json"
        text = json.dumps(wf, indent=1) + "\n"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {stale}. Fix: .host/venv/bin/python scripts/make_workflows.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
