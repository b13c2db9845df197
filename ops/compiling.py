"""Whether torch.compile is tracing the current call (False on torches without torch.compiler)."""
from __future__ import annotations

import torch


def is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())
