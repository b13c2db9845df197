"""Start ComfyUI's main.py with this pack as a user would (a subprocess on a free local port, --cpu, a fresh
user directory) for the tests that talk to a served host: tests/test_server.py (HTTP) and
tests/test_browser.py (the real frontend in headless Chromium).

The test-only tiny-model nodes (tests/host_nodes) are added through an extra_model_paths.yaml, so prompts
can run without checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PACK = TESTS.parent
PACK_NAME = "sdxl_optimizer"
BOOT_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10):
    """GET a JSON document."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Served:
    base: str  # e.g. http://127.0.0.1:PORT
    proc: subprocess.Popen
    log_path: Path
    user_dir: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _write_taesd_pair(folder: Path) -> None:
    from tinymodels.factories import write_taesd_pair

    write_taesd_pair(folder, "taesdxl")


@contextlib.contextmanager
def serve(comfy_dir: Path, tmp: Path) -> Iterator[Served]:
    """Run main.py from `comfy_dir` with working files under `tmp`; yields once /system_stats answers,
    stops the server on exit. Fails the test (with the server's log) if it exits or does not answer."""
    extra = tmp / "extra_model_paths.yaml"
    approx = tmp / "vae_approx"  # the fastest workflow's Tiny VAE pair (random TAESD-XL weights)
    _write_taesd_pair(approx)
    extra.write_text(f"sdxlopt_tests:\n  custom_nodes: {TESTS / 'host_nodes'}\n  vae_approx: {approx}\n")
    user_dir = tmp / "user"
    user_dir.mkdir(exist_ok=True)
    port = free_port()
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--user-directory", str(user_dir), "--output-directory", str(tmp / "output"),
             "--extra-model-paths-config", str(extra), "--disable-auto-launch"],
            cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        served = Served(base=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, user_dir=user_dir)
        try:
            deadline = time.time() + BOOT_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"main.py exited with {proc.returncode}:\n{served.log_tail()}")
                try:
                    get(served.base + "/system_stats", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        pytest.fail(f"main.py did not answer in {BOOT_TIMEOUT_S} s:\n{served.log_tail()}")
                    time.sleep(0.5)
            yield served
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
