"""Find or install the headless Chromium that the browser test (tests/test_browser.py) drives.

Playwright must never download a browser build of its own (only package registries are reachable where we
build), so the test drives Debian's `chromium` package instead. `python3 scripts/host.py setup` calls
`ensure_browser()` once; the test calls it again to find the binary. It needs root and apt-get to install;
without them it returns None with the reason logged, and the browser test skips with that reason.
Runs under the system python3 (before the venv exists): standard library only.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

logger = logging.getLogger("sdxl_optimizer.browser_setup")

PACKAGE = "chromium"  # Debian's package; installs /usr/bin/chromium
# without recommends (udev, upower, mesa, ... are not needed headless), but with a font so text renders
APT_PACKAGES = [PACKAGE, "fonts-liberation"]
BINARIES = ("chromium", "chromium-browser")
ENV_OVERRIDE = "SDXLOPT_CHROMIUM"  # path to a Chromium/Chrome binary to use instead of looking one up
APT_TIMEOUT_S = 600

_reason: str | None = None


def find_browser() -> str | None:
    """The Chromium binary: $SDXLOPT_CHROMIUM if set and executable, else the first one on PATH."""
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        logger.warning("%s=%s is not an executable file; looking for %s on PATH instead",
                       ENV_OVERRIDE, override, "/".join(BINARIES))
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


def last_reason() -> str | None:
    """Why the last ensure_browser() call returned None (None if it found a browser)."""
    return _reason


def _give_up(reason: str) -> None:
    global _reason
    _reason = reason
    logger.warning("no headless Chromium for the browser test: %s", reason)


def _apt(args: list[str], what: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", *args]
    logger.info("$ %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _give_up(f"{what} did not finish in {APT_TIMEOUT_S} s (`{' '.join(cmd)}`). Fix: check that Debian's "
                 f"package mirror is reachable, then run `apt-get install -y {PACKAGE}` by hand.")
        return False
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
        _give_up(f"{what} failed (exit code {proc.returncode}, `{' '.join(cmd)}`):\n  " + "\n  ".join(tail)
                 + f"\nFix: make `apt-get install -y {PACKAGE}` work by hand (mirror, disk space), or point "
                   f"{ENV_OVERRIDE} at a Chromium binary.")
        return False
    return True


def _show_progress_if_unconfigured() -> None:
    """Under scripts/host.py nothing configures logging: print our progress there (pytest has its own)."""
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[sdxl-optimizer] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def ensure_browser() -> str | None:
    """Return the path of a headless-capable Chromium, installing Debian's `chromium` if it is missing.

    Installs only as root with apt-get available (`apt-get update`, then
    `apt-get install -y --no-install-recommends chromium fonts-liberation`, ~30-60 s once). Returns None,
    with the reason logged (and kept for last_reason()), when no browser is found and none can be installed.
    """
    global _reason
    _reason = None
    _show_progress_if_unconfigured()
    path = find_browser()
    if path:
        return path
    if shutil.which("apt-get") is None:
        _give_up(f"no {'/'.join(BINARIES)} on PATH and no apt-get to install Debian's `{PACKAGE}` package. "
                 f"Fix: install Chromium with your package manager, or set {ENV_OVERRIDE}=/path/to/chromium.")
        return None
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        _give_up(f"no {'/'.join(BINARIES)} on PATH, and installing Debian's `{PACKAGE}` package needs root "
                 f"(running as uid {os.geteuid()}). Fix: `sudo apt-get install -y {PACKAGE}`, or set "
                 f"{ENV_OVERRIDE}=/path/to/chromium.")
        return None
    logger.warning("installing Debian's `%s` package for the browser test (apt-get, once)", PACKAGE)
    # a fresh machine has empty package lists: update first, then install
    if not _apt(["update", "-q"], "updating the Debian package lists"):
        return None
    if not _apt(["install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES], f"installing `{PACKAGE}`"):
        return None
    path = find_browser()
    if path is None:
        _give_up(f"`apt-get install {PACKAGE}` succeeded but no {'/'.join(BINARIES)} is on PATH "
                 f"(PATH={os.environ.get('PATH', '')}). Fix: set {ENV_OVERRIDE}=/path/to/chromium.")
    return path


if __name__ == "__main__":
    found = ensure_browser()
    print(found or f"none: {last_reason()}")
    raise SystemExit(0 if found else 1)
