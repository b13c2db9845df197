"""Stand-in for PyAV on machines without it (the GPU bench box): ComfyUI's comfy_api imports `av` at module
level for its video types, which the benchmark never uses. Installed only when `import av` fails."""
from __future__ import annotations

import sys
import types


def install() -> bool:
    try:
        import av  # noqa: F401
        return False
    except ImportError:
        pass
    names = ["av", "av.container", "av.subtitles", "av.subtitles.stream", "av.audio", "av.video"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["av.container"].InputContainer = type("InputContainer", (), {})
    mods["av.container"].OutputContainer = type("OutputContainer", (), {})
    mods["av.subtitles.stream"].SubtitleStream = type("SubtitleStream", (), {})
    for n, m in mods.items():
        if "." in n:
            parent, child = n.rsplit(".", 1)
            setattr(mods[parent], child, m)
    sys.modules.update(mods)
    return True
