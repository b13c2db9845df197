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
    import torch

    # tiny models: one thread is as fast and does not oversubscribe the 2 cores with the served host
    torch.set_num_threads(1)
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


@pytest.fixture(scope="session")
def model_dirs(host, tmp_path_factory):
    """ComfyUI model folders holding test files the shipped workflows name (random TAESD-XL pair)."""
    import folder_paths

    from tinymodels import factories

    root = tmp_path_factory.mktemp("models")
    factories.write_taesd_pair(root / "vae_approx", "taesdxl")
    folder_paths.add_model_folder_path("vae_approx", str(root / "vae_approx"))
    return root


@pytest.fixture
def run_prompt(host, model_dirs):
    return comfy_inprocess.run_prompt
