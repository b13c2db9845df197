"""Replay a small, fixed piece of eager work as a CUDA graph: static input buffers, one capture per shape.

Why this file exists: a DeepCache shallow step runs only the UNet's outermost blocks, a few dozen kernels
whose GPU time is far below the host time it takes to launch them one by one from Python (on a lent H100:
~1.8 ms of host time inside the UNet call for ~1 ms of GPU work, next to a 55 ms full step); a full eager
SDXL step launches ~2,000 kernels and is host-bound on an H100 as well. Captured once per shape, the same
kernels cost one graph launch and a few input copies.

`StaticGraphs` keeps up to `limit` graphs of one function, keyed by the shapes, dtypes and devices of its
tensor inputs plus a caller key (e.g. the addresses of the weights the function reads: a graph reads memory
by address, so weights replaced at other addresses must give a new key; weights updated in place are read
as they are at replay). Inputs are copied into the graph's own buffers before each replay; the caller gets
the graph's output (a tensor or a tuple of them), valid until the next replay of any graph of the set: the
graphs share one memory pool (one forward's temporaries, not one per graph), so a replay may overwrite
what another graph returned; clone what must live longer. The function must
be pure tensor work on CUDA with no host synchronisation and no Python decisions that differ between calls
of the same key: the caller decides what may be captured. A failed capture raises; the caller falls back.

`use_graphs=False` runs the same bookkeeping with a plain call on the static buffers (CPU tests): the call
of the function given at capture, not of the one given now, as a replay would (a key that misses something
the function depends on shows as a wrong result).
Torch only.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

_KEEP: list[list] = []  # per capture in progress: objects its graph reads by address (see keep_alive)


def keep_alive(*objs: Any) -> None:
    """Called by code running inside a StaticGraphs capture: keep `objs` (a buffer, a kernel's address table)
    alive as long as the graph being captured, which reads them by address at every replay whatever their
    owner does with them later. Outside a capture: nothing."""
    if _KEEP:
        _KEEP[-1].extend(objs)


class StaticGraphs:
    def __init__(self, limit: int = 4, use_graphs: bool = True) -> None:
        self.limit = limit
        self.use_graphs = use_graphs
        self.entries: OrderedDict[Hashable, tuple] = OrderedDict()
        self.captures = 0
        self.replays = 0
        self.pool = None  # the memory pool all captures of this set share (created at the first capture)

    def __call__(self, fn: Callable[..., Any], inputs: Sequence[torch.Tensor | None], key: Hashable = ()) -> Any:
        """fn(*inputs) replayed from the graph captured for this key (captured first if there is none)."""
        full_key = (key, tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs))
        entry = self.entries.get(full_key)
        if entry is None:
            entry = self._capture(fn, inputs)
            self.entries[full_key] = entry
            while len(self.entries) > self.limit:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(full_key)
        static_in, out, graph, captured, _kept = entry
        for s, t in zip(static_in, inputs):
            if s is not None:
                s.copy_(t)
        if graph is not None:
            graph.replay()
        else:  # no graphs (tests): the function given at capture, as a graph would replay it
            out = captured(*static_in)
        self.replays += 1
        return out

    def _capture(self, fn, inputs) -> tuple:
        static_in = tuple(None if t is None else t.detach().clone() for t in inputs)
        if not self.use_graphs:
            self.captures += 1
            return static_in, None, None, fn, ()
        device = next(t.device for t in static_in if t is not None)
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, library workspaces, algorithms
            fn(*static_in)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        _KEEP.append([])
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn(*static_in)
        finally:
            kept = tuple(_KEEP.pop())
        self.captures += 1
        return static_in, out, graph, None, kept

    def clear(self) -> None:
        self.entries.clear()
        self.pool = None

    def __deepcopy__(self, memo) -> StaticGraphs:
        """Shared, not copied: ComfyUI's ModelPatcher.clone deep-copies model_options, where the patches keep
        their state; a CUDA graph cannot be copied, and a clone reads the same weights (the keys hold their
        addresses), so clones share one set of graphs and one memory pool."""
        return self


class GraphRunState:
    """Per-run state of a patch that replays whole UNet calls from `graphs` (the fp8 loaders): the graphs are
    shared by every run and clone (keyed by shapes and weight addresses); the rest is per run: facts worked
    out once (`memo`), captures refused (`warned`), counters. The per-run holder protocol of nodes/_run.py."""

    def __init__(self, graphs: StaticGraphs | None = None, limit: int = 4) -> None:
        # four: a CFG cutoff's two batch sizes, each with and without a LoRA merged (other weight addresses)
        self.graphs = graphs if graphs is not None else StaticGraphs(limit=limit)
        self.reset()

    def clone(self) -> GraphRunState:
        return GraphRunState(self.graphs)

    def reset(self) -> None:
        self.memo: dict[Hashable, object] = {}
        self.warned: set = set()
        self.calls = 0
        self.replays = 0
        self.clock = None  # unused: the holder protocol's step clock (not needed here)

    def summary(self) -> str:
        return f"{self.replays}/{self.calls} UNet calls replayed as one CUDA graph"
