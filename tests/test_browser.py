"""End to end in a real browser: every shipped workflow loads in the served ComfyUI frontend (headless
Chromium driven by Playwright) with no missing node type, converts to an API prompt the host validates with
its widget values intact, and leaves a screenshot in docs/screenshots/<workflow>.png.

Chromium is Debian's package (scripts/browser_setup.py installs it); Playwright never downloads a browser.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import time
from pathlib import Path

import browser_setup
import pytest
from browser_setup import ensure_browser, last_reason
from served import PACK, serve

pytestmark = pytest.mark.server
log = logging.getLogger("sdxl_optimizer.tests.browser")

WORKFLOWS = sorted((PACK / "workflows").glob("*.json"))
SCREENSHOTS = PACK / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}
# headless=True adds --headless
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The test host has no model files, so a model-file pick is "not in list" there: exempt values with a model
# file suffix and model pickers (inputs named *_name: ckpt_name, vae_name, lora_name, ... but not sampler_name).
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf", ".onnx")
NOT_MODEL_PICKERS = {"sampler_name"}
# a screenshot whose pixels barely changed is kept as it is, so a test run does not churn the committed PNGs
SCREENSHOT_KEEP_IF_CHANGED_BELOW = 0.002  # fraction of pixels

# Screenshot-friendly UI: full detail at any zoom, no minimap, no FPS overlay, no tab strip (workflow name
# shows in the menu), and the "Nodes 2.0" banner dismissed (best effort: it may be gone in later frontends).
UI_SETUP_JS = """
async () => {
  const s = window.app.extensionManager.setting;
  const wanted = {"LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Minimap.Visible": false,
                  "Comfy.Graph.CanvasInfo": false, "Comfy.Workflow.WorkflowTabsPosition": "Sidebar"};
  for (const [id, value] of Object.entries(wanted)) { try { await s.set(id, value); } catch (e) {} }
  const text = [...document.querySelectorAll("span")].find(e => e.textContent.startsWith("Introducing Nodes 2.0"));
  const close = text?.parentElement?.parentElement?.querySelector(":scope > button");
  if (close) close.click();
}
"""

TEMPLATES_DIALOG = ".p-dialog[aria-labelledby='global-workflow-template-selector']"
VISIBLE_DIALOGS = "[role=dialog]:visible"

# Loads a workflow through the frontend and reports every node of the root graph and its subgraphs.
LOAD_JS = """
async ({wf, name, options}) => {
  const app = window.app;
  await app.loadGraphData(wf, true, true, name, options);
  const registered = LiteGraph.registered_node_types;
  const graphs = [app.graph, ...(app.graph.subgraphs ? app.graph.subgraphs.values() : [])];
  const nodes = [];
  for (const g of graphs) {
    for (const n of g.nodes) {
      const isSubgraph = typeof n.isSubgraphNode === "function" && n.isSubgraphNode();
      nodes.push({graph: g === app.graph ? null : String(g.id), id: n.id, type: n.type, mode: n.mode,
                  registered: n.type in registered || isSubgraph, virtual: !!n.isVirtualNode, subgraph: isSubgraph});
    }
  }
  return nodes;
}
"""

# graphToPrompt, plus what each root node's widgets hold and what the graph serializes back to.
PROMPT_JS = """
async () => {
  const app = window.app;
  const p = await app.graphToPrompt();
  const widgets = {};
  for (const n of app.graph.nodes) widgets[n.id] = (n.widgets || []).map(w => [w.name, w.value]);
  const serialized = {};
  for (const n of app.graph.serialize().nodes) serialized[n.id] = n.widgets_values;
  return {output: p.output, widgets, serialized, lastNodeErrors: app.lastNodeErrors || null};
}
"""

# Fit the whole graph into view, hide the FPS/info overlay, and wait until the (animated) fit has settled:
# the view (scale, offset) unchanged over 3 checks 100 ms apart, 5 s at most.
SETTLE_JS = """
async () => {
  const app = window.app;
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const view = () => JSON.stringify([app.canvas.ds.scale, ...app.canvas.ds.offset]);
  app.canvas.show_info = false;
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));  // the load's own fit first
  try { await app.extensionManager.command.execute("Comfy.Canvas.FitView"); } catch (e) {}
  let last = view(), same = 0;
  for (let i = 0; i < 50 && same < 3; i++) {
    await sleep(100);
    const now = view();
    same = now === last ? same + 1 : 0;
    last = now;
  }
  app.canvas.setDirty(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
}
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    path = ensure_browser()
    if path is None:
        pytest.skip(f"no headless Chromium could be found or installed: {last_reason()}")
    return path


@pytest.fixture(scope="module")
def frontend(host, chromium, tmp_path_factory):
    """A served ComfyUI (fresh user directory) open in headless Chromium, first-visit Templates dialog closed."""
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"expected the `playwright` package in the test venv ({e}). Fix: python3 scripts/host.py "
                    "setup (requirements-test.txt pins it); never run `playwright install`, we use Debian's "
                    "chromium.")
    tmp = tmp_path_factory.mktemp("browser")
    t0 = time.monotonic()
    with serve(host.comfy_dir, tmp) as served, sync_playwright() as pw:
        log.info("server up after %.1f s", time.monotonic() - t0)
        ctx = pw.chromium.launch_persistent_context(
            str(tmp / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport=VIEWPORT)
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(45_000)
            page.goto(served.base)
            page.wait_for_function("window.app && window.app.graph && window.app.canvas && window.LiteGraph")
            log.info("frontend up after %.1f s", time.monotonic() - t0)
            # first visit of a fresh user: the Templates dialog opens over the canvas; close it as a user would
            dialog = page.locator(TEMPLATES_DIALOG)
            dialog.wait_for(state="visible")
            close = dialog.locator("button:has(i.pi-times), button[aria-label='Close']").first
            if close.count():
                close.click()
            else:
                page.keyboard.press("Escape")
            dialog.wait_for(state="hidden", timeout=10_000)
            page.evaluate(UI_SETUP_JS)
            log.info("templates dialog closed after %.1f s", time.monotonic() - t0)
            yield page, served
        finally:
            ctx.close()


def close_dialogs(page) -> None:
    for _ in range(5):
        dialogs = page.locator(VISIBLE_DIALOGS)
        if not dialogs.count():
            return
        close = dialogs.first.locator("button:has(i.pi-times), button[aria-label='Close']").first
        if close.count():
            close.click()
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def load(page, workflow: dict, name: str, **options) -> list[dict]:
    """Load `workflow` as a new workflow called `name`; every node of it, with whether its type is registered."""
    close_dialogs(page)
    return page.evaluate(LOAD_JS, {"wf": workflow, "name": name, "options": options})


def missing_types(nodes: list[dict]) -> list[str]:
    return sorted({n["type"] for n in nodes if not n["registered"]})


def host_validation_errors(prompt: dict) -> list[str]:
    """Validate the API prompt with the host's own validate_prompt; model-file combos are exempt (no models)."""
    import execution

    # Playwright's sync API keeps an event loop on this thread: validate on a fresh one elsewhere
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ok, error, _, node_errors = pool.submit(
            asyncio.run, execution.validate_prompt("browser-test", prompt, None)).result()
    found = []
    for node_id, entry in node_errors.items():
        for err in entry["errors"]:
            extra = err.get("extra_info") or {}
            name, value = str(extra.get("input_name", "")), str(extra.get("received_value", ""))
            model_pick = value.lower().endswith(MODEL_FILE_SUFFIXES) or (
                name.endswith("_name") and name not in NOT_MODEL_PICKERS)
            if err["type"] == "value_not_in_list" and model_pick:
                continue
            found.append(f"node {node_id} ({entry['class_type']}): {err['message']}: {err['details']}")
    if not ok and not node_errors:
        found.append(f"{error['message']}: {error['details']}")
    return found


def save_screenshot(page, name: str) -> Path:
    import io

    import numpy as np
    from PIL import Image

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # the UI is flat colors: a 256-color palette keeps it sharp at a fraction of the size
    img = Image.open(io.BytesIO(page.screenshot())).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    if path.exists():
        old = Image.open(path).convert("RGB")
        if old.size == img.size:
            changed = (np.asarray(old) != np.asarray(img.convert("RGB"))).any(axis=-1).mean()
            if changed < SCREENSHOT_KEEP_IF_CHANGED_BELOW:
                return path
    img.save(path, optimize=True)
    return path


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflow_loads_converts_and_validates_in_the_frontend(frontend, path):
    page, served = frontend
    workflow = json.loads(path.read_text())
    # no model files on the test host: keep the missing-models dialog shut; a missing node still opens its own
    nodes = load(page, workflow, path.stem, showMissingModelsDialog=False)
    page.evaluate(SETTLE_JS)
    page.mouse.move(70, VIEWPORT["height"] - 10)  # off the buttons (no tooltip), into a corner of the canvas
    shot = save_screenshot(page, path.stem)

    missing = missing_types(nodes)
    assert not missing, (f"{path.name}: node types not registered in the served ComfyUI: {missing}. Fix: add "
                         f"the node or correct the type in the workflow; see the screenshot {shot} and the "
                         f"server log:\n{served.log_tail()}")
    dialogs = page.locator(VISIBLE_DIALOGS)
    assert not dialogs.count(), f"{path.name}: expected no dialog after loading, got: {dialogs.first.inner_text()[:500]}"
    assert len(nodes) >= len(workflow["nodes"]), f"{path.name}: loaded {len(nodes)} nodes, the file has {len(workflow['nodes'])}"

    res = page.evaluate(PROMPT_JS)
    prompt = res["output"]
    assert prompt, f"{path.name}: graphToPrompt gave an empty API prompt"
    assert res["lastNodeErrors"] is None, f"{path.name}: the frontend reports node errors: {res['lastNodeErrors']}"

    # every executable root node is in the prompt, as its own type
    for n in nodes:
        if n["graph"] is None and n["mode"] == 0 and not n["virtual"] and not n["subgraph"]:
            entry = prompt.get(str(n["id"]))
            assert entry is not None, f"{path.name}: node {n['id']} ({n['type']}) is missing from the API prompt"
            assert entry["class_type"] == n["type"], (path.name, n, entry)

    # widget values survive: the file's widgets_values round-trip, and the prompt carries the widgets' values
    for node in workflow["nodes"]:
        if "widgets_values" in node:
            assert res["serialized"][str(node["id"])] == node["widgets_values"], (
                f"{path.name}: node {node['id']} ({node['type']}) widgets_values changed on load: file "
                f"{node['widgets_values']!r}, frontend {res['serialized'][str(node['id'])]!r}")
    for node_id, entry in prompt.items():
        widgets = res["widgets"].get(node_id)
        if widgets is None:  # a node inside a subgraph (id path): covered by the host validation below
            continue
        for name, value in widgets:
            if name in entry["inputs"] and not isinstance(entry["inputs"][name], list):
                assert entry["inputs"][name] == value, (
                    f"{path.name}: node {node_id} ({entry['class_type']}) input {name!r}: widget holds "
                    f"{value!r}, the API prompt has {entry['inputs'][name]!r}")

    errors = host_validation_errors(prompt)
    assert not errors, f"{path.name}: the host rejects the frontend's API prompt:\n" + "\n".join(errors)


def test_unknown_node_type_is_reported_missing(frontend):
    page, _ = frontend
    bogus = "SDXLOptNoSuchNodeForTheBrowserTest"
    workflow = {
        "last_node_id": 2, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {}, "version": 0.4,
        "nodes": [
            {"id": 1, "type": bogus, "pos": [40, 40], "size": [300, 100], "flags": {}, "order": 0, "mode": 0,
             "inputs": [], "outputs": [], "properties": {}, "widgets_values": [1]},
            {"id": 2, "type": "EmptyLatentImage", "pos": [400, 40], "size": [300, 120], "flags": {}, "order": 1,
             "mode": 0, "inputs": [], "outputs": [{"name": "LATENT", "type": "LATENT", "links": []}],
             "properties": {}, "widgets_values": [512, 512, 1]},
        ],
    }
    try:
        nodes = load(page, workflow, "bogus")
        assert missing_types(nodes) == [bogus], nodes
        # the frontend tells the user too
        dialog = page.locator(VISIBLE_DIALOGS).filter(has_text=bogus)
        dialog.first.wait_for(state="visible", timeout=10_000)
    finally:
        close_dialogs(page)


def test_no_browser_is_a_skip_reason_with_a_fix(monkeypatch):
    """Non-root without chromium: ensure_browser() installs nothing and says why (the fixture skips with it)."""
    monkeypatch.delenv(browser_setup.ENV_OVERRIDE, raising=False)
    monkeypatch.setattr(browser_setup.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    monkeypatch.setattr(browser_setup.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(browser_setup, "_apt", lambda *a: pytest.fail("expected no apt-get call as non-root"))
    assert ensure_browser() is None
    assert "needs root" in last_reason() and "Fix:" in last_reason()
