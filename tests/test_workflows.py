"""Shipped workflows: generated from scripts/make_workflows.py, loadable, convertible to API format, runnable
with the tiny model substituted for the real checkpoint."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK / "scripts"))

import make_workflows  # noqa: E402
from workflow_graph import node_defs, ui_to_api  # noqa: E402

from tinymodels.substitution import tiny_prompt  # noqa: E402

SHIPPED = sorted((PACK / "workflows").glob("*.json"))
def test_shipped_workflows_are_up_to_date(host):
    built = {name: fn().to_ui(node_defs()) for name, fn in make_workflows.WORKFLOWS.items()}
    assert sorted(built) == [p.stem for p in SHIPPED], "expected one shipped file per description"
    for p in SHIPPED:
        assert json.loads(p.read_text()) == built[p.stem], \
            f"{p.name} is out of date. Fix: .host/venv/bin/python scripts/make_workflows.py"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_ui_to_api_matches_the_description(host, path):
    wf = make_workflows.WORKFLOWS[path.stem]()
    defs = node_defs()
    assert ui_to_api(json.loads(path.read_text()), defs) == wf.to_api(defs)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_workflow_runs_with_the_tiny_model(run_prompt, path):
    prompt = tiny_prompt(ui_to_api(json.loads(path.read_text()), node_defs()))
    res = run_prompt(prompt)
    assert res.ui, f"{path.name}: expected some output node to report"


def test_unknown_node_type_is_named(host):
    wf = {"nodes": [{"id": 1, "type": "NoSuchNode", "mode": 0, "inputs": [], "widgets_values": []}], "links": []}
    with pytest.raises(KeyError, match="NoSuchNode"):
        ui_to_api(wf, node_defs())
