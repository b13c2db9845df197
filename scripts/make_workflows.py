"""Regenerate the shipped workflows (workflows/*.json, frontend UI format) from their descriptions here.

    .host/venv/bin/python scripts/make_workflows.py            # write all
    .host/venv/bin/python scripts/make_workflows.py --check    # fail if a shipped file is out of date

Runs inside the in-process host so each node's widget order comes from its real definition.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACK = HERE.parent
sys.path.insert(0, str(HERE))

from workflow_graph import Workflow, node_defs  # noqa: E402

CHECKPOINT = "sd_xl_base_1.0.safetensors"


def patch_report() -> Workflow:
    wf = Workflow()
    wf.note("SDXL Optimizer Pack - Patch Report\n\nPut any stack of patch nodes (ours, core, other packs) between "
            "the loader and the report, queue, and read which patches, wrappers and hooks the MODEL carries. "
            f"Nothing is changed.\n\nNeeds: an SDXL checkpoint in models/checkpoints (default name {CHECKPOINT}).")
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    wf.add("SDXLOptPatchReport", model=ckpt[0])
    return wf


WORKFLOWS = {
    "sdxl_patch_report": patch_report,
}


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
