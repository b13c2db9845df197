"""Run the shipped VRAM-tier workflows as a user's graph would run: UI JSON -> API prompt -> ComfyUI's
executor, on a card emulated by leaving only N GiB free, and compare each with the unoptimized baseline.

    python -m bench.tiers                       # your GPU, random-weight SDXL written to a temp folder
    python -m bench.tiers --checkpoint my.safetensors   # your checkpoint (copied nowhere, read in place)
    python -m bench.tiers --small               # CPU smoke run with the tiny test model

Prints a progress bar, the table, and which tier fits this card. Each tier runs `--rounds` times (default 3),
interleaved with the others (round 1: every tier, round 2: every tier, ...), and its row is the median: eager
SDXL on a fast GPU is launch-bound and drifts by up to ~20% between minutes, so one run per tier, or a block
of runs per tier, would put that drift into the ratios against the baseline. Figures with random weights measure cost
only; the fidelity column (final latent vs the baseline run of the same seed) is a random-weight figure too.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import GIB, ROOT, BenchContext

sys.path.insert(0, str(ROOT / "scripts"))

RANDOM_CKPT = "sdxlopt_random_sdxl.safetensors"
BASELINE = "baseline_fp16"


@dataclass
class TierResult:
    name: str
    budget_gib: float | None
    s_per_image: float
    s_per_step: float
    peak_gib: float
    latent: torch.Tensor
    steps: int
    all_seconds: list[float] | None = None


def median_result(runs: list[TierResult]) -> TierResult:
    """The median run's time, the highest peak of all runs, the first run's latent (same seed every round)."""
    import statistics

    secs = [r.s_per_image for r in runs]
    med = statistics.median(secs)
    r0 = runs[0]
    return TierResult(r0.name, r0.budget_gib, med, med / r0.steps, max(r.peak_gib for r in runs), r0.latent,
                      r0.steps, secs)


class CardEmulator:
    """Holds device memory so that only `free_gib` stays free (what a smaller card would have)."""

    def __init__(self, free_gib: float | None) -> None:
        self.free_gib = free_gib
        self.blocker: torch.Tensor | None = None
        self.blocked = 0
        self.leftover = 0

    def __enter__(self) -> CardEmulator:
        if not torch.cuda.is_available():
            return self
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()
        # left by earlier tiers (e.g. a compiled tier's CUDA-graph pools): not on the emulated card, not in the peak
        self.leftover = torch.cuda.memory_allocated()
        if self.free_gib is None:
            return self
        free, _ = torch.cuda.mem_get_info()
        self.blocked = max(0, int(free - self.free_gib * GIB))
        self.blocker = torch.empty(self.blocked, dtype=torch.uint8, device="cuda")
        return self

    def __exit__(self, *exc) -> None:
        self.blocker = None
        if torch.cuda.is_available():
            import comfy.model_management as mm

            mm.unload_all_models()
            mm.soft_empty_cache()


def prepare_prompt(workflow: dict, ckpt_name: str, seed: int, small: bool) -> tuple[dict, str, int]:
    """API prompt of a tier workflow with our checkpoint and seed; returns (prompt, sampler node id, steps)."""
    from workflow_graph import node_defs, ui_to_api

    from tinymodels.substitution import tiny_prompt

    prompt = ui_to_api(workflow, node_defs())
    if small:
        prompt = tiny_prompt(prompt)
    sampler_id, steps = None, 0
    for nid, node in prompt.items():
        inp = node["inputs"]
        if "ckpt_name" in inp and not small:
            inp["ckpt_name"] = ckpt_name
        if "seed" in inp and node["class_type"].startswith("KSampler"):
            inp["seed"] = seed
        if "noise_seed" in inp:
            inp["noise_seed"] = seed
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            sampler_id, steps = nid, int(inp["steps"])
    if sampler_id is None:
        raise ValueError("expected a KSampler in the tier workflow, found none")
    return prompt, sampler_id, steps


def run_tier(ctx: BenchContext, name: str, workflow: dict, budget_gib: float | None, ckpt_name: str,
             seed: int = 1234) -> TierResult:
    import execution

    import comfy_inprocess

    executor = execution.PromptExecutor(comfy_inprocess._ServerStub(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    with CardEmulator(budget_gib) as card:
        warm, _, _ = prepare_prompt(workflow, ckpt_name, seed + 1, ctx.small)
        comfy_inprocess.run_prompt(warm, executor)  # loads models, warms kernels; loaders stay cached
        prompt, sampler_id, steps = prepare_prompt(workflow, ckpt_name, seed, ctx.small)
        ctx.sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = comfy_inprocess.run_prompt(prompt, executor)
        ctx.sync()
        seconds = time.perf_counter() - t0
        peak = ((torch.cuda.max_memory_allocated() - card.blocked - card.leftover) / GIB
                if torch.cuda.is_available() else 0.0)
    latent = res.output(sampler_id)[0]["samples"].float().cpu()
    return TierResult(name, budget_gib, seconds, seconds / steps, peak, latent, steps)


def fidelity(latent: torch.Tensor, ref: torch.Tensor) -> dict:
    if latent.shape != ref.shape:
        return {"latent_psnr_db": None, "latent_max_err": None}
    mse = float(((latent - ref) ** 2).mean())
    rng = float(ref.max() - ref.min())
    psnr = float("inf") if mse == 0 else 10 * math.log10(rng * rng / mse)
    return {"latent_psnr_db": round(psnr, 2), "latent_max_err": round(float((latent - ref).abs().max()), 4)}


def ensure_checkpoint(ctx: BenchContext, checkpoint: Path | None) -> str:
    """Register the checkpoint's folder with ComfyUI and return the name the loaders will see."""
    import folder_paths

    from tinymodels.factories import write_taesd_pair

    # the fastest tier's Tiny VAE: TAESD-XL's architecture with random weights (its cost is the real one)
    approx = Path("/tmp/sdxlopt_bench/vae_approx")
    if not (approx / "taesdxl_decoder.pth").exists():
        write_taesd_pair(approx, "taesdxl")
    folder_paths.add_model_folder_path("vae_approx", str(approx))
    if checkpoint is not None:
        folder_paths.add_model_folder_path("checkpoints", str(checkpoint.parent.resolve()), is_default=True)
        return checkpoint.name
    if ctx.small:
        return RANDOM_CKPT
    from .sdxl_random import write_checkpoint

    folder = Path("/tmp/sdxlopt_bench/checkpoints")
    path = folder / RANDOM_CKPT
    if not path.exists():
        print(f"[tiers] writing a random-weight SDXL checkpoint to {path} (~7 GB, about a minute)", flush=True)
        write_checkpoint(path, ctx.build_model())
        ctx.free_models()
    folder_paths.add_model_folder_path("checkpoints", str(folder), is_default=True)
    return RANDOM_CKPT


def run_all(ctx: BenchContext, checkpoint: Path | None = None, only: list[str] | None = None,
            rounds: int = 3) -> list[dict]:
    import make_workflows
    from tqdm import tqdm

    ckpt = ensure_checkpoint(ctx, checkpoint)
    tiers = [t for t in make_workflows.TIERS if only is None or t.name in only or t.name == BASELINE]
    runs: dict[str, list[TierResult]] = {t.name: [] for t in tiers}
    failed: dict[str, str] = {}
    workflows = {t.name: json.loads((ROOT / "workflows" / f"{t.name}.json").read_text()) if t.shipped else
                 t.build().to_ui(__import__("workflow_graph").node_defs()) for t in tiers}
    with tqdm(total=rounds * len(tiers), desc="tiers", unit="run") as bar:
        for _ in range(rounds):
            for tier in tiers:
                if tier.name not in failed:
                    try:
                        runs[tier.name].append(run_tier(ctx, tier.name, workflows[tier.name],
                                                        None if ctx.small else tier.emulate_gib, ckpt))
                    except Exception as e:  # one failing tier must not lose the others' figures
                        failed[tier.name] = f"FAILED: {type(e).__name__}: {e}"[:300]
                        print(f"[tiers] {tier.name}: {failed[tier.name]}", flush=True)
                bar.update(1)
    results = {name: median_result(r) for name, r in runs.items() if r and name not in failed}
    base = results.get(BASELINE)
    rows = []
    for tier in tiers:
        if tier.name in failed:
            rows.append(ctx.add_row("tiers", tier.name, card_gib=tier.emulate_gib, target=tier.target,
                                    notes=failed[tier.name]))
            continue
        r = results[tier.name]
        extra = {"card_gib": tier.emulate_gib, "target": tier.target}
        if base is not None:
            extra["x_vs_baseline_s_per_step"] = round(base.s_per_step / r.s_per_step, 2)
            extra.update(fidelity(r.latent, base.latent))
        m = type("M", (), {"seconds": r.s_per_image, "peak_gib": r.peak_gib, "all_seconds": r.all_seconds})
        rows.append(ctx.add_row("tiers", tier.name, m, steps=r.steps, **extra))
    return rows


def recommend(rows: list[dict], total_gib: float) -> str:
    sized = [r for r in rows if r["name"] != BASELINE and r.get("card_gib") and r.get("peak_vram_gib") is not None]
    if not sized:
        return ("This run measured no card-sized tier (4/6/8/12 GB); run without --tiers for a recommendation.")
    fitting = [r for r in rows if r["name"] != BASELINE and r.get("card_gib") and r["card_gib"] <= total_gib
               and r["peak_vram_gib"] <= total_gib]
    if not fitting:
        return f"No tier fits {total_gib:.1f} GiB: use the 4 GB workflow with --lowvram and expect offloading."
    best = max(fitting, key=lambda r: r["card_gib"])
    return f"This card has {total_gib:.1f} GiB: use workflows/{best['name']}.json (measured peak {best['peak_vram_gib']} GiB)."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="your SDXL checkpoint (.safetensors); default: random weights")
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU (smoke test)")
    ap.add_argument("--tiers", default=None, help="comma list of tier names (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON (and .md) here")
    ap.add_argument("--rounds", type=int, default=None,
                    help="runs per tier, interleaved across tiers; the row is the median (default 3, --small 1)")
    args = ap.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        print(f"error: expected a checkpoint file, {args.checkpoint} does not exist. Fix: pass the path of an SDXL "
              ".safetensors, or leave --checkpoint out to use random weights.", file=sys.stderr)
        return 2
    if not args.small and not torch.cuda.is_available():
        print("error: the tier benchmark needs a CUDA GPU, none found. Fix: run on a GPU or pass --small.",
              file=sys.stderr)
        return 2
    ctx = BenchContext(small=args.small, out_dir=(args.out or Path(".")).parent)
    rounds = args.rounds or (1 if args.small else 3)
    rows = run_all(ctx, args.checkpoint, args.tiers.split(",") if args.tiers else None, rounds)
    from .run import markdown

    meta = {"command": "python -m bench.tiers " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "mode": "tier workflows"}
    print(markdown(meta, rows))
    if torch.cuda.is_available():
        print(recommend(rows, torch.cuda.get_device_properties(0).total_memory / GIB))
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
