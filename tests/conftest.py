"""Test harness: boots the real ComfyUI host in-process once per session, with this pack and the test-only
tiny-model nodes loaded; seeds the RNGs for every test.

Import pack code in tests as `sdxl_optimizer.<sub>` (aliased to the very modules the host loaded) and tiny
models from `tinymodels` (tests/host_nodes/tinymodels).
"""
from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PACK = TESTS.parent
sys.path.insert(0, str(PACK / "scripts"))
sys.path.insert(0, str(TESTS / "host_nodes"))

import comfy_inprocess  # noqa: E402

_USER_DIR = tempfile.mkdtemp(prefix="sdxlopt-user-")


def pytest_configure(config):
    # boot before collection so test modules can import the pack's modules at top level
    comfy_inprocess.boot(user_dir=Path(_USER_DIR), extra_node_dirs=(TESTS / "host_nodes" / "tinymodels",))


@pytest.fixture(scope="session")
def host() -> comfy_inprocess.Host:
    """The in-process ComfyUI host (booted in pytest_configure)."""
    return comfy_inprocess.boot()


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def run_prompt(host):
    return comfy_inprocess.run_prompt
