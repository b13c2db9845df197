"""Lint is part of the suite: ruff over the pack, the scripts, the bench and the tests."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=PACK, capture_output=True, text=True)
    assert proc.returncode == 0, f"expected no lint findings, got:\n{proc.stdout}{proc.stderr}\nFix: ruff check --fix ."


def test_ops_import_torch_only():
    """ops/ is the torch-only layer: no ComfyUI module may be imported there."""
    banned = ("comfy", "folder_paths", "server", "nodes", "execution", "comfy_api", "comfy_extras")
    for path in sorted((PACK / "ops").glob("*.py")):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ", "from ")):
                mod = s.split()[1].split(".")[0]
                assert mod not in banned, f"{path.name}: expected torch-only imports in ops/, got `{s}`"
