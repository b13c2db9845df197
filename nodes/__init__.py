"""ComfyUI nodes of the pack: one module per technique, each exporting `NODES` (a list of io.ComfyNode).

Modules are discovered here, so a new technique is one new file. A module that fails to import, or a node
whose schema fails, is left out with one logged error naming it and the fix; the rest of the pack still
loads (as ComfyUI does for whole packs). `FAILED` lists what was left out; the test suite requires it empty.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import traceback

from comfy_api.latest import ComfyExtension, io

CATEGORY = "sdxl_optimizer"
log = logging.getLogger(__name__)
FAILED: dict[str, str] = {}

# `advanced=True` (expert inputs folded away in the UI) exists only in newer ComfyUI; older hosts ignore it
_SUPPORTS_ADVANCED = "advanced" in inspect.signature(io.Float.Input.__init__).parameters
ADVANCED: dict = {"advanced": True} if _SUPPORTS_ADVANCED else {}


def node_modules() -> list:
    """Every module of this package that exports NODES, in name order; failures go to FAILED."""
    mods = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:
            FAILED[info.name] = "".join(traceback.format_exception(e))
            log.error("SDXL Optimizer Pack: nodes/%s.py failed to import, its nodes are missing: %s. Fix: update "
                      "the pack and its requirements (pip install -r requirements.txt).\n%s", info.name, e,
                      FAILED[info.name])
            continue
        if hasattr(mod, "NODES"):
            mods.append(mod)
    return mods


def all_nodes() -> list[type[io.ComfyNode]]:
    """The pack's nodes whose schema builds on this host."""
    out = []
    for mod in node_modules():
        for node in mod.NODES:
            try:
                node.GET_SCHEMA()
            except Exception as e:
                FAILED[f"{mod.__name__}.{node.__name__}"] = "".join(traceback.format_exception(e))
                log.error("SDXL Optimizer Pack: node %s left out, its schema failed on this ComfyUI: %s. Fix: "
                          "update ComfyUI or the pack.", node.__name__, e)
                continue
            out.append(node)
    return out


class SDXLOptimizerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> SDXLOptimizerExtension:
    return SDXLOptimizerExtension()
