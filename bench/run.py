"""Benchmark entry point: python -m bench.run [--small] [--cases baseline,fp8,...] [--out FILE.json]

Writes a JSON file with every row and a Markdown table beside it (same name, .md), with the command,
the device and the torch version, so each committed figure carries the command that made it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from .common import BenchContext

RESULTS = Path(__file__).resolve().parent / "results"


def available_cases() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "cases").glob("*.py") if not p.stem.startswith("_"))


def markdown(meta: dict, rows: list[dict]) -> str:
    cols = ["case", "name", "s_per_image", "s_per_step", "peak_vram_gib", "notes"]
    extra = sorted({k for r in rows for k in r} - set(cols) - {"runs_s"})
    cols = cols[:-1] + extra + ["notes"]
    lines = [f"Device: {meta['device']} · torch {meta['torch']} · {meta['mode']} · {meta['date']}",
             "", f"Command: `{meta['command']}`", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny UNet on the CPU (CI smoke), not full SDXL")
    ap.add_argument("--cases", default="baseline", help=f"comma list or 'all' (have: {', '.join(available_cases())})")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/<mode>.json)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args(argv)

    names = available_cases() if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in available_cases()]
    if unknown:
        print(f"error: unknown case(s) {unknown}; expected some of {available_cases()}", file=sys.stderr)
        return 2
    if not args.small and not torch.cuda.is_available():
        print("error: full SDXL benchmark expects a CUDA GPU, found none. Fix: run on a GPU, or pass --small "
              "for the CPU smoke run.", file=sys.stderr)
        return 2
    out = args.out or RESULTS / ("small.json" if args.small else "gpu.json")
    ctx = BenchContext(small=args.small, out_dir=out.parent)
    if args.steps:
        ctx.steps = args.steps
    if args.repeat:
        ctx.repeat = args.repeat
    dev = torch.cuda.get_device_name() if ctx.device.type == "cuda" else platform.processor() or "cpu"
    meta = {"command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "mode": f"{'small (tiny UNet, CPU)' if args.small else 'full SDXL, random weights'}, "
                    f"{ctx.width}x{ctx.height}, euler, {ctx.steps} steps, cfg {ctx.cfg}"}
    failed = []
    for name in names:
        print(f"[bench] {name}", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"bench.cases.{name}").run(ctx)
        except Exception as e:  # one broken case must not lose the others' figures
            traceback.print_exc()
            failed.append(name)
            ctx.add_row(name, "FAILED", notes=f"{type(e).__name__}: {e}"[:300])
        ctx.free_models()
        print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": ctx.rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, ctx.rows))
    print(markdown(meta, ctx.rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
