"""Boot a real ComfyUI inside this Python process (tests, benchmark) and run API-format prompts through
the real `execution.PromptExecutor`.

The pitfalls this handles (see the host notes): cli args are never parsed from sys.argv; `--cpu` must be set
before `comfy.model_management` is imported on a machine without CUDA; `utils.extra_config` must be
imported before `nodes`; node init is async; a pack loaded by the host lives in sys.modules under its path.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACK = Path(__file__).resolve().parent.parent
PACK_ALIAS = "sdxl_optimizer"
log = logging.getLogger("sdxl_optimizer.host")


def default_comfy_dir() -> Path:
    return Path(os.environ.get("SDXLOPT_COMFYUI", PACK / ".host" / "ComfyUI"))


@dataclass
class Host:
    comfy_dir: Path
    pack_module: Any
    pack_module_name: str
    device: str
    messages: list = field(default_factory=list)


_HOST: Host | None = None


def boot(comfy_dir: Path | None = None, user_dir: Path | None = None, cpu: bool | None = None,
         extra_node_dirs: tuple[Path, ...] = ()) -> Host:
    """Import ComfyUI from `comfy_dir`, load builtin + custom nodes (this pack included); idempotent."""
    global _HOST
    if _HOST is not None:
        return _HOST
    comfy_dir = Path(comfy_dir or default_comfy_dir()).resolve()
    if not (comfy_dir / "main.py").exists():
        raise RuntimeError(f"expected a ComfyUI tree (with main.py) at {comfy_dir}, found none. Fix: run "
                           "`python3 scripts/host.py setup`, or set SDXLOPT_COMFYUI to your ComfyUI folder.")
    sys.path.insert(0, str(comfy_dir))
    import comfy.options  # noqa: F401  (arg parsing stays off: sys.argv belongs to pytest/bench)
    import torch
    from comfy.cli_args import args

    args.cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    if user_dir is not None:
        args.user_directory = str(user_dir)
    import folder_paths
    import utils.extra_config  # noqa: F401  (before `nodes`, as main.py does)

    if user_dir is not None:
        folder_paths.set_user_directory(str(user_dir))
    import comfy.model_management as mm
    import nodes

    with _QuietInit() as init_log:  # builtin extras that need absent optional deps (torchaudio) only warn
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        name = _find_pack(nodes)
        if name is None:  # ComfyUI without the pack linked in custom_nodes: load it from here
            asyncio.run(nodes.load_custom_node(str(PACK)))
            name = _find_pack(nodes)
    if name is None:
        raise RuntimeError(f"ComfyUI at {comfy_dir} did not load the pack from {PACK}:\n{init_log.about('sdxl_optimizer')}"
                           "\nFix the import error, or link the pack into custom_nodes/ (scripts/host.py setup).")
    if "SDXLOptPatchReport" not in nodes.NODE_CLASS_MAPPINGS:  # module imported but the entrypoint failed
        try:
            asyncio.run(asyncio.run(sys.modules[name].comfy_entrypoint()).get_node_list())
        except Exception as e:
            raise RuntimeError(f"the pack at {PACK} imported but registered no nodes: {e!r}. Fix that error.") from e
        raise RuntimeError(f"the pack at {PACK} imported but registered no nodes; the log above says why.")
    for d in extra_node_dirs:
        asyncio.run(nodes.load_custom_node(str(d)))
    _alias_pack(name)
    _HOST = Host(comfy_dir, sys.modules[name], name, str(mm.get_torch_device()))
    return _HOST


class _QuietInit(logging.Handler):
    """Collects the host's warnings during node init instead of printing them; errors still print."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            sys.stderr.write(self.format(record) + "\n")
        self.records.append(record)

    def about(self, word: str) -> str:
        return "\n".join(self.format(r) for r in self.records if word in r.getMessage())

    def __enter__(self) -> _QuietInit:
        root = logging.getLogger()
        self._saved = (root.handlers[:], root.level)
        root.handlers[:] = [self]
        root.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        root.handlers[:], level = self._saved
        root.setLevel(level)


def _find_pack(nodes) -> str | None:
    for mod_name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == (PACK / "__init__.py").resolve() and mod_name != PACK_ALIAS:
            return mod_name
    return None


def _alias_pack(name: str) -> None:
    """Make `import sdxl_optimizer.ops.x` reach the very modules the host loaded (no second copy)."""
    for mod_name, mod in list(sys.modules.items()):
        if mod_name == name or mod_name.startswith(name + "."):
            sys.modules[PACK_ALIAS + mod_name[len(name):]] = mod


def pack_import(sub: str):
    """The host-loaded pack's submodule, e.g. pack_import('ops.freeu')."""
    return importlib.import_module(f"{PACK_ALIAS}.{sub}")


class _ServerStub:
    """What PromptExecutor needs of PromptServer."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


@dataclass
class PromptResult:
    ui: dict
    messages: list
    executor: Any

    def output(self, node_id: str) -> list:
        """The node's return values (as the executor cached them)."""
        entry = self.executor.caches.outputs.get(str(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} produced no output (not executed or not in the prompt)")
        outs = entry.outputs if hasattr(entry, "outputs") else entry
        return [o[0] if isinstance(o, list) and len(o) == 1 else o for o in outs]


class PromptError(AssertionError):
    pass


def run_prompt(prompt: dict, executor=None) -> PromptResult:
    """Validate and execute an API-format prompt with the real executor; raise with the host's message."""
    import execution

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise PromptError(f"prompt did not validate: {valid[1]} {valid[3]}")
    if executor is None:
        executor = execution.PromptExecutor(_ServerStub(), cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": 0, "ram": 0})
    executor.execute(prompt, prompt_id, {}, valid[2])
    msgs = list(executor.status_messages)
    if not executor.success:
        err = next((d for e, d in msgs if e == "execution_error"), msgs[-1:])
        raise PromptError(f"prompt failed: {err}")
    return PromptResult(executor.history_result["outputs"], msgs, executor)
