"""The served host: main.py with this pack, as a user starts it; nodes, workflows and a prompt over HTTP."""
from __future__ import annotations

import json
import sys
import time
import urllib.request

import pytest
from served import PACK, PACK_NAME, get, serve

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    with serve(host.comfy_dir, tmp_path_factory.mktemp("server")) as served:
        yield served.base


def queue_and_wait(server: str, prompt: dict, timeout: float = 180) -> dict:
    """POST the prompt to /prompt and return its /history entry once the host reports it completed."""
    req = urllib.request.Request(server + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        prompt_id = json.loads(r.read())["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = get(f"{server}/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not complete within {timeout} s")


def test_object_info_lists_the_pack_nodes(server):
    info = get(server + "/object_info", timeout=60)
    ours = sorted(k for k in info if k.startswith("SDXLOpt") and not k.startswith("SDXLOptTest"))
    assert "SDXLOptPatchReport" in ours, f"expected the pack's nodes in /object_info, got {ours}"
    for node_id in ours:
        assert info[node_id]["category"].startswith("sdxl_optimizer"), node_id
        assert info[node_id]["python_module"].endswith(PACK_NAME), info[node_id]["python_module"]


def test_workflow_templates_lists_the_pack_workflows(server):
    templates = get(server + "/workflow_templates")
    shipped = sorted(p.stem for p in (PACK / "workflows").glob("*.json"))
    assert shipped, "expected at least one shipped workflow in workflows/"
    assert sorted(templates.get(PACK_NAME, [])) == shipped, f"got {templates}"
    for name in shipped:
        wf = get(f"{server}/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert wf["nodes"], name


def test_prompt_queued_over_http_samples_and_saves_an_image(server):
    prompt = {
        "1": {"class_type": "SDXLOptTestTinyCheckpoint", "inputs": {"seed": 0, "vae": "taesd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "SDXLOptPatchReport", "inputs": {"model": ["1", 0]}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "sdxlopt_test"}},
    }
    entry = queue_and_wait(server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["7"]["images"]
    assert images and images[0]["filename"].startswith("sdxlopt_test")
    assert "SDXL" in entry["outputs"]["4"]["text"][0]


SHIPPED = sorted((PACK / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_each_shipped_workflow_queued_over_http_gives_an_image(server, path):
    """Every shipped workflow's own graph (UI -> API), tiny model substituted, queued to the served host."""
    sys.path.insert(0, str(PACK / "scripts"))
    from workflow_graph import node_defs, ui_to_api

    from tinymodels.substitution import tiny_prompt

    prompt = tiny_prompt(ui_to_api(json.loads(path.read_text()), node_defs()))
    entry = queue_and_wait(server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    savers = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    if savers:
        assert entry["outputs"][savers[0]]["images"], f"{path.name}: expected a saved image"
    else:
        assert entry["outputs"], f"{path.name}: expected some output"
