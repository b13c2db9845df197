"""Grouped fp8 upcast: one CUDA graph launch upcasts all the fp8 weights of a block into a shared scratch buffer.

Why this file exists: eager SDXL on a fast GPU is bound by the host, not the GPU (measured on a lent H100:
a batch-2 1024x1024 UNet forward issues ~43 ms of kernels but takes ~60 ms of host time). Storing weights
in fp8 and upcasting each one before its matmul adds ~800 `.to()` calls per forward, each an allocation and a
kernel launch: +19 ms of host time per forward there (+30%), while the upcast kernels themselves add only
~9 ms of GPU time, which the idle GPU absorbs. The upcasts of one block (an SDXL transformer block holds 10
Linear layers) are independent copies of fixed shapes between fixed addresses, so they are captured once
into a CUDA graph that writes every weight of the block into a scratch buffer; each step then pays one graph
launch per block, and each layer reads its fp16/bf16 weight as a view of the scratch.

Safety: all groups of a model share one scratch buffer (the largest group's size: ~70 MB for SDXL) and at
most one group is "live" (its weights in the scratch). Inside a forward of the model (between the root
module's pre- and post-forward hooks) the first member layer of a group that runs replays the group's graph
and makes it live; the other members then read their views. A group made live replaces the one before, so
members called in any order still read their own weights (at worst with extra replays); outside a forward,
and at the start and end of each, no group is live and a layer upcasts itself as before. Before a replay
the group compares
the weights' current addresses with the captured ones (weights replaced by a LoRA patch, moved by
offloading) and re-captures when they differ; in-place weight updates need nothing (the graph reads the
weights' memory at replay time). Which layers may take part (on the block's device, nothing for the host
to apply at compute time) is decided by the caller's `eligible` function, re-evaluated whenever any fp8
layer's attributes or parameters change (`bump_epoch`). Any failure to capture switches grouping off for
that model with one logged line. Under torch.compile the hooks do nothing (the compiler fuses the upcasts).

One kernel per block: where the caller gives the scratch a `batched` factory (nodes/fp8.py: the Triton
multi-tensor upcast of ops/fp8.py, on GPUs where the fp8 Triton kernels pass their self-test), each group
makes that one-kernel launch when it builds its views (run once there; if it fails, the copies take over for
the whole scratch with one logged line). Its conversion runs near memory bandwidth (45 against 127 us per
SDXL block for torch's fp8 copies on an H100). Where it is used:
- inside the capture of a larger graph (a whole UNet call, nodes/_unet_graph.py), which cannot launch the
  group's own graph: a group built by an eager call before (the capture's warm-up) puts its one kernel into
  the larger graph, and the graph keeps the launch's address table and the scratch alive
  (ops/cuda_graphs.keep_alive). There GPU time is what counts, and the per-layer copies it replaces cost
  ~8 ms per batch-2 1024x1024 forward on an H100. A group not yet built, or with no launch, stands aside
  and its layers upcast themselves inside the capture, as before.
- in the group's own graph with `batched_eager` (on in the loaders: eager forwards on an H100 went from 1.03x
  to 0.99x stock fp16 where the GPU is the bottleneck, and were no slower where the host is).

Shared projections: attention's q/k/v projections read the same input (k/v alone in cross-attention). A
group can be told such chains of members (`chains`: member indices, lead first); when every member of a
chain takes part and their views sit back to back in the scratch (same input width), the lead's call runs
one matmul with the chain's weights as one matrix and hands each follower its slice of the output, for a
call on the very same input tensor (identity, not equality). A follower called on anything else switches
its chain off for good (one wasted matmul), as do followers that keep not being called; nothing changes in
what any layer returns. Three matmul launches fewer per SDXL transformer block: on a lent H100 a batch-2
1024x1024 eager forward took 62.4 ms grouped, 59.6 ms grouped and joined (stock fp16: 58.0 ms;
bench/results/micro_fp8_grouped_variants_h100.txt).

Torch only; the ComfyUI side (which layers, hooks on which blocks) is nodes/fp8.py.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from .compiling import is_compiling as _is_compiling
from .cuda_graphs import keep_alive

# a group holds at most this many weights: one SDXL transformer block (34.7 M) or 1280-channel res block (31 M);
# the shared scratch is this size in the compute dtype (~70 MB in fp16)
GROUP_MAX_PARAMS = 36_000_000
log = logging.getLogger(__name__)
UNUSED_LIMIT = 3  # a chain whose followers were not called this many times is switched off
ALIGN = 64  # elements: every view starts 128-byte aligned (fp16), as cuBLAS / cuDNN kernels prefer

_EPOCH = [0]  # bumped whenever an fp8 layer's attributes or parameters change anywhere


def bump_epoch() -> None:
    _EPOCH[0] += 1


def plan_groups(root: torch.nn.Module, is_member: Callable[[torch.nn.Module], bool],
                max_params: int = GROUP_MAX_PARAMS) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """(block, member layers) for the coarsest submodules of `root` whose member layers hold <= max_params
    weights in all and number at least two; members outside every such block are left out (they upcast
    themselves)."""
    out: list[tuple[torch.nn.Module, list[torch.nn.Module]]] = []

    def visit(m: torch.nn.Module) -> None:
        members = [x for x in m.modules() if is_member(x)]
        if len(members) < 2:
            return
        if m is not root and sum(x.weight.numel() for x in members) <= max_params:
            out.append((m, members))
            return
        for child in m.children():
            visit(child)

    visit(root)
    return out


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


BUFFER_NAME = "_sdxlopt_fp8_upcast_scratch"


class UpcastScratch:
    """The buffer every group of one model writes into, and which group's views it holds now (`live`).

    The buffer is a non-persistent buffer of the model's root module (not in its state dict), made on the
    first grouped forward: moving the model (offloading it to the CPU, loading it back) moves the scratch
    with it instead of leaving it on the GPU; a moved buffer has a new address, so every group re-captures."""

    def __init__(self, root: torch.nn.Module, capacity: int, on_disable: Callable[[str], None] | None = None,
                 use_graphs: bool = True, batched: Callable | None = None, batched_eager: bool = False) -> None:
        self.capacity = capacity  # elements
        # batched(pairs of (fp8 weight, scratch view)) -> a zero-argument launch doing all of a group's upcasts
        # in one kernel, or None where it cannot; what a group puts into a larger graph's capture, and into its
        # own graph instead of one copy per weight with batched_eager
        self.batched = batched
        self.batched_eager = batched_eager
        self.root = root
        self.root.register_buffer(BUFFER_NAME, None, persistent=False)
        self.live: UpcastGroup | None = None
        self.disabled: str | None = None
        self.on_disable = on_disable
        self.use_graphs = use_graphs  # False: plain copies (CPU tests of the bookkeeping); never faster
        self.in_forward = False  # between the root module's pre- and post-forward hooks

    # forward hooks of the root module (the UNet): groups are live only inside one of its forwards
    def begin(self, module, args, kwargs=None) -> None:
        self._reset(not _is_compiling())

    def end(self, module, args, *rest) -> None:
        self._reset(False)

    def _reset(self, in_forward: bool) -> None:
        if self.live is not None:
            self.live.deactivate()
            self.live = None
        self.in_forward = in_forward

    @property
    def buffer(self) -> torch.Tensor | None:
        return self.root._buffers.get(BUFFER_NAME)

    @buffer.setter
    def buffer(self, value: torch.Tensor | None) -> None:
        self.root._buffers[BUFFER_NAME] = value

    def get(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The buffer for `device` and `dtype`, made (again) where it is missing or does not fit."""
        if self.ready(device, dtype) is None:
            self.buffer = None  # free the old one first
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: writable in and out of it
                self.buffer = torch.empty(self.capacity, device=device, dtype=dtype)
        return self.buffer

    def accepts(self, device: torch.device) -> bool:
        """CUDA graphs need a CUDA device; elsewhere each layer upcasts itself (no launch overhead to save)."""
        return not self.use_graphs or device.type == "cuda"

    def capturing(self, device: torch.device) -> bool:
        """Inside the capture of a larger graph on `device` (no graph launch possible: see UpcastGroup.activate)."""
        return device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def ready(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The buffer if it exists for `device` and `dtype` (never allocates: for use inside a capture)."""
        b = self.buffer
        if b is None or b.device != device or b.dtype != dtype or b.numel() < self.capacity:
            return None
        return b

    def disable(self, why: str) -> None:
        if self.disabled is None:
            self.disabled = why
            if self.on_disable is not None:
                self.on_disable(why)
        if self.live is not None:
            self.live.deactivate()
            self.live = None
        self.buffer = None


class UpcastGroup:
    """The member layers of one block, upcast together by `activate(x)` (one graph replay)."""

    def __init__(self, layers: Iterable[torch.nn.Module], scratch: UpcastScratch,
                 eligible: Callable[[torch.nn.Module, torch.device], bool],
                 chains: Iterable[tuple[int, ...]] = ()) -> None:
        self.layers = list(layers)
        self.params = [m._parameters for m in self.layers]  # read per replay: the weights' current addresses
        self.chains = {c[0]: tuple(c) for c in chains if len(c) > 1}  # lead index -> member indices
        self.chains_off: set[int] = set()  # leads of chains switched off (followers took other inputs)
        self.unused: dict[int, int] = {}  # lead -> how often its followers were not called at all
        self.joined: dict[int, torch.Tensor] = {}  # lead index -> the chain's weights as one view
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # follower -> (input, its output)
        self.scratch = scratch
        self.eligible = eligible
        self.views: list[torch.Tensor | None] = [None] * len(self.layers)
        self.live = False
        self.mask: tuple[bool, ...] = ()
        self.mask_for: tuple | None = None  # (epoch, device) the mask was computed for
        self.key: tuple | None = None  # what the views / graph were made for
        self.graph = None
        # the one-kernel upcast made at the last build (None: none); holds the address table its kernel reads,
        # so it lives as long as the group's graph (and any larger graph that captured it keeps it: keep_alive)
        self.launch = None
        self.replays = 0
        self.captures = 0
        self.captured_into = 0  # times its one kernel went into a larger graph's capture

    @property
    def numel(self) -> int:
        return sum(_aligned(m.weight.numel()) for m in self.layers)

    def view(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `index`'s weight upcast to x's dtype, for a call on `x` inside a forward of the model (the
        group made live first if it is not); None when the member computes on its own."""
        if not self.live:
            if not self.scratch.in_forward:
                return None
            self.activate(x)
            if not self.live:
                return None
        v = self.views[index]
        return v if v is not None and v.dtype == x.dtype and v.device == x.device else None

    def deactivate(self) -> None:
        """No longer live. Outputs a lead kept for followers that were not called are dropped; a chain whose
        followers keep not being called (UNUSED_LIMIT times: a patch that calls only the lead, say) is
        switched off, while a one-off (an error or an interrupt between the calls) changes nothing."""
        self.live = False
        if self.pending:
            for lead in self._leads_of(self.pending):
                self.unused[lead] = self.unused.get(lead, 0) + 1
                if self.unused[lead] >= UNUSED_LIMIT:
                    self.chains_off.add(lead)
            self.pending.clear()

    def joined_view(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """For the lead of a chain: the chain's weights as one [sum of outputs, inputs] matrix in x's dtype
        (the group made live first), or None (no chain, switched off, or a member computes on its own)."""
        if index not in self.chains or index in self.chains_off or self.view(index, x) is None:
            return None
        return self.joined.get(index)

    def share(self, index: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The lead's output of the joined matmul on x: keep each follower's slice, return the lead's."""
        chain = self.chains[index]
        parts = out.split([self.layers[i].weight.shape[0] for i in chain], dim=-1)
        for i, part in zip(chain[1:], parts[1:]):
            self.pending[i] = (x, part)
        return parts[0]

    def shared(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """A follower's output kept by its lead for this very input, or None (then it computes itself). A
        follower called on another input switches its chain off for good."""
        if not self.pending:
            return None
        got = self.pending.pop(index, None)
        if got is None:
            return None
        if got[0] is x:
            return got[1]
        self.chains_off.update(self._leads_of((index,)))
        self.pending.clear()
        return None

    def _leads_of(self, followers) -> list[int]:
        return [lead for lead, chain in self.chains.items() if any(i in chain for i in followers)]

    def activate(self, x) -> None:
        """Upcast the eligible members' weights into the scratch for a block call on `x` (one graph replay)."""
        scratch = self.scratch
        if scratch.live is not None:
            scratch.live.deactivate()
            scratch.live = None
        if scratch.disabled or not torch.is_tensor(x) or not x.is_floating_point():
            return
        if not scratch.accepts(x.device):
            return
        device, dtype = x.device, x.dtype
        if self.mask_for != (_EPOCH[0], device):
            self.mask = tuple(bool(self.eligible(m, device)) for m in self.layers)
            self.mask_for = (_EPOCH[0], device)
        if not any(self.mask):
            return
        if scratch.capturing(device):
            self._activate_in_capture(device, dtype)
            return
        buffer = scratch.get(device, dtype)
        key = self._key(buffer, dtype)
        if key != self.key and not self._build(buffer, key):
            return
        if self.graph is not None:
            self.graph.replay()
        else:  # no graphs (tests): the same copies, one by one
            for v, m in zip(self.views, self.layers):
                if v is not None:
                    v.copy_(m._parameters["weight"])
        self.replays += 1
        self.live = True
        scratch.live = self

    def _key(self, buffer: torch.Tensor, dtype: torch.dtype) -> tuple:
        ptrs = tuple([p["weight"].data_ptr() if ok else 0 for p, ok in zip(self.params, self.mask)])
        return buffer.data_ptr(), dtype, ptrs

    def _activate_in_capture(self, device: torch.device, dtype: torch.dtype) -> None:
        """Inside the capture of a larger graph: the one-kernel launch this group made for exactly these
        weights and this scratch goes into that graph, which keeps both alive. Nothing is built or allocated
        here; without a matching launch the group stands aside (its layers upcast themselves)."""
        buffer = self.scratch.ready(device, dtype)
        if buffer is None or self.launch is None or self._key(buffer, dtype) != self.key:
            return
        self.launch()
        keep_alive(self.launch, buffer)
        self.captured_into += 1
        self.live = True
        self.scratch.live = self

    def _build(self, buffer: torch.Tensor, key: tuple) -> bool:
        self.key, self.graph, self.launch = None, None, None
        self.views = [None] * len(self.layers)
        self.joined = {}
        views: list[torch.Tensor | None] = []
        offset = 0
        for m, ok in zip(self.layers, self.mask):
            w = m._parameters["weight"]
            if not ok:
                views.append(None)
                continue
            views.append(buffer[offset:offset + w.numel()].view(w.shape))
            offset += _aligned(w.numel())
        if offset > buffer.numel():  # cannot happen with the planned capacity; never write past the buffer
            self.scratch.disable(f"a group needs {offset} elements, the scratch holds {buffer.numel()}")
            return False
        self.launch = self._batched_launch(views)  # run once here: compiled and checked outside any capture
        if self.scratch.use_graphs:
            try:
                self.graph = self._capture(views, buffer.device)
            except Exception as e:  # a device or driver that cannot capture: every layer upcasts itself
                self.scratch.disable(f"CUDA graph capture failed ({type(e).__name__}: {e})")
                return False
        self.views, self.key = views, key
        self.joined = self._join(views)
        self.captures += 1
        return True

    def _join(self, views: list[torch.Tensor | None]) -> dict[int, torch.Tensor]:
        """Per chain whose members all take part, with views back to back and one input width: one view."""
        out = {}
        for lead, chain in self.chains.items():
            vs = [views[i] for i in chain]
            if any(v is None or v.dim() != 2 for v in vs) or len({v.shape[1] for v in vs}) != 1:
                continue
            if any(b.data_ptr() != a.data_ptr() + a.numel() * a.element_size() for a, b in zip(vs, vs[1:])):
                continue
            rows = sum(v.shape[0] for v in vs)
            out[lead] = vs[0].as_strided((rows, vs[0].shape[1]), vs[0].stride())
        return out

    def _capture(self, views: list[torch.Tensor | None], device: torch.device):
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                if self.launch is not None and self.scratch.batched_eager:
                    self.launch()
                else:
                    for v, m in zip(views, self.layers):
                        if v is not None:
                            v.copy_(m._parameters["weight"])
            finally:
                graph.capture_end()
        current.wait_stream(side)
        return graph

    def _batched_launch(self, views: list[torch.Tensor | None]) -> Callable[[], None] | None:
        """The scratch's one-kernel upcast of this group's weights, run once; None (one copy per weight) where
        there is none or it failed (then switched off for the scratch, with one logged line)."""
        batched = self.scratch.batched
        if batched is None:
            return None
        try:
            launch = batched([(m._parameters["weight"], v) for v, m in zip(views, self.layers) if v is not None])
            if launch is not None:
                launch()
            return launch
        except Exception as e:
            self.scratch.batched = None
            log.warning("SDXLOpt FP8: the one-kernel grouped upcast failed (%s: %s); grouped upcasts use one copy "
                        "per weight (same result, more GPU time).", type(e).__name__, str(e)[:200])
            return None
