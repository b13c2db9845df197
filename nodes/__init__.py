"""ComfyUI nodes of the pack: one module per technique, each exporting `NODES` (a list of io.ComfyNode).

Modules are discovered here, so a new technique is one new file. An import error in any of them is
raised, not swallowed: a half-loaded pack would hide the broken node from the user.
"""
from __future__ import annotations

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io

CATEGORY = "sdxl_optimizer"


def node_modules() -> list:
    """Every module of this package that exports NODES, in name order."""
    mods = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "NODES"):
            mods.append(mod)
    return mods


class SDXLOptimizerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for mod in node_modules() for node in mod.NODES]


async def comfy_entrypoint() -> SDXLOptimizerExtension:
    return SDXLOptimizerExtension()
