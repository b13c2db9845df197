"""Plain-text report of what a model carries: turns a snapshot of a model's patches into readable lines.

Stacks of patches from several packs are hard to debug when one of them silently replaces another. The
node layer takes a snapshot of the model (plain dicts of names -> callables/tensors) and this module names
every entry, so the report is testable without ComfyUI.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def describe(obj: Any) -> str:
    """Short human name of a patch: `module.qualname` for functions, the class name for objects."""
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(describe(o) for o in obj) + "]"
    fn = getattr(obj, "func", obj)  # functools.partial
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    mod = mod.rsplit(".", 2)[-2:] if mod else []
    return ".".join([*mod, name]) if mod else name


def dtype_histogram(params: Iterable[torch.Tensor]) -> dict[str, int]:
    """Number of parameter elements per dtype, largest first."""
    counts: Counter[str] = Counter()
    for p in params:
        counts[str(p.dtype).replace("torch.", "")] += p.numel()
    return dict(counts.most_common())


def format_report(title: str, sections: Mapping[str, Mapping[str, Any]]) -> str:
    """One header line, then one indented line per entry of every non-empty section."""
    lines = [title]
    for section, entries in sections.items():
        if not entries:
            lines.append(f"{section}: none")
            continue
        lines.append(f"{section}: {len(entries)}")
        for key, value in entries.items():
            lines.append(f"  - {key}: {value}")
    return "\n".join(lines)
