"""Seam-free tiled decode and encode for AutoencoderKL VAEs (SD1.x, SDXL) inside a memory budget.

Why: the full SDXL VAE decode is the memory peak of a run, and running the whole VAE per tile (core
VAEDecodeTiled) changes what the network computes in three ways: the mid-block self-attention sees one tile,
every GroupNorm normalizes with one tile's statistics, and convolutions see zero padding at tile edges. The
first two show as colour shifts and grid patterns, the third as seams.

Here the network is a list of stages (conv_in + mid block, each resolution level's resnets, each up/down
sample, the output head). The low-resolution stages, where activations are small, run once on the whole latent:
always the mid block with its attention, plus every further stage whose whole-image activations fit in the
memory one tile takes. Only the high-resolution stages run per tile, on windows of at most tile x tile latent
pixels (rectangular when that computes less). Windows reach past their core by the receptive radius of the
tiled stages, so convolutions see real neighbours, and neighbouring cores cross-fade over `overlap`.

GroupNorm ("global" modes): a first pass over large plain tiles records each tiled GroupNorm's per-group mean
and variance on the tile cores and merges them into whole-image statistics (Chan's parallel variance). It
normalizes per tile while doing so, so deeper layers' statistics are an estimate. A refine pass normalizes
with that estimate while recording a new one; the two err on opposite sides, and their mean is kept ("global":
one refine pass, two when the first pass had more than MANY_TILES tiles; "global_fast": none). The output pass
normalizes every tile with the same statistics, so nothing differs from tile to tile: no seam, no colour step.
With exact statistics a tile computes what the full decode computes at its core, to float rounding.

Walks the module structure of ComfyUI's comfy/ldm/modules/diffusionmodules/model.py (Encoder, Decoder,
ResnetBlock, AttnBlock, Upsample, Downsample; ComfyUI 0.3.75) by attribute name and calls its own submodules;
`unsupported_reason` says when a VAE differs. Torch only.
Idea (GroupNorm statistics shared across VAE tiles): pkuliyi2015/multidiffusion-upscaler-for-automatic1111
"Tiled VAE"; written from the idea, no code taken.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# GroupNorm statistics of the tiled stages (see stat_passes): whole-image estimate, its faster variant, per tile
GROUPNORM_MODES = ("global", "global_fast", "tile")
MANY_TILES = 6  # a first pass over more tiles than this estimates further off: "global" adds a refine pass
ATTENTION_CHUNK_ELEMENTS = 1 << 26  # query rows x keys per attention chunk (128 MiB of fp16 scores)
STATS_GROUP_CHUNK = 4  # GroupNorm groups converted to fp32 at once when recording statistics
ALLOCATOR_SLACK = 1.25  # headroom over the counted live activations
Progress = Callable[[int, int], None]
Norm = Callable[[torch.nn.GroupNorm, torch.Tensor], torch.Tensor]


def plain_norm(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """The GroupNorm module itself (statistics of whatever it is given)."""
    return norm(x)


# ---------------------------------------------------------------------------------------------- tiling geometry

@dataclass(frozen=True)
class Tile:
    """One tile in latent pixels: the window [y0, y1) x [x0, x1) it computes, and its core (cores tile the image)."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int


def plan_axis(size: int, n: int, window: int) -> list[tuple[int, int, int, int]]:
    """`n` evenly spaced windows of `window` over [0, size): (start, end, core_start, core_end); cores split overlaps."""
    if n == 1 or window >= size:
        return [(0, size, 0, size)]
    starts = [round(i * (size - window) / (n - 1)) for i in range(n)]
    ends = [s + window for s in starts]
    cuts = [0] + [(starts[i + 1] + ends[i]) // 2 for i in range(n - 1)] + [size]
    return [(starts[i], ends[i], cuts[i], cuts[i + 1]) for i in range(n)]


def plan_1d(size: int, window: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Fewest windows of `window` covering [0, size) with neighbours sharing >= `overlap`."""
    if window >= size:
        return [(0, size, 0, size)]
    return plan_axis(size, math.ceil((size - overlap) / (window - overlap)), window)


def _span(size: int, n: int, shared: int) -> int:
    """Window length so that n windows cover `size` with neighbours sharing `shared`."""
    return size if n == 1 else math.ceil((size + (n - 1) * shared) / n)


def plan_grid(height: int, width: int, area: int, shared: int, edge: float = 0.0) -> list[Tile] | None:
    """A rows x cols grid of windows of at most `area` latent px each, neighbours sharing >= `shared`: the least
    total window area (compute) plus `edge` x total window perimeter (edge effects); rectangular windows when that
    is less. None when no window can be that small."""
    if height * width <= area:
        return [Tile(0, height, 0, width, 0, height, 0, width)]
    best = None
    for ny in range(1, height + 1):
        wy = _span(height, ny, shared)
        if ny > 1 and wy <= shared:
            break
        max_wx = area // wy
        if max_wx <= shared and max_wx < width:
            continue
        nx = 1 if width <= max_wx else math.ceil((width - shared) / (max_wx - shared))
        while _span(width, nx, shared) > max_wx:
            nx += 1
        wx = _span(width, nx, shared)
        cost = (ny * wy * nx * wx + edge * 2 * (ny * nx) * (wy + wx), ny * nx)
        if best is None or cost < best[0]:
            best = (cost, ny, wy, nx, wx)
    if best is None:
        return None
    _, ny, wy, nx, wx = best
    rows, cols = plan_axis(height, ny, wy), plan_axis(width, nx, wx)
    return [Tile(y0, y1, x0, x1, cy0, cy1, cx0, cx1) for (y0, y1, cy0, cy1) in rows for (x0, x1, cx0, cx1) in cols]


def check_tiling(tile: int, overlap: int) -> None:
    """Tile and overlap in latent pixels: overlap >= 0 and the tile at least twice the overlap."""
    if overlap < 0:
        raise ValueError(f"expected overlap >= 0, got {overlap} latent px. Fix: set the overlap to 0 or more.")
    if tile < 1 or tile < 2 * overlap:
        raise ValueError(f"expected a tile of at least twice the overlap, got tile {tile} and overlap {overlap} "
                         f"latent px. Fix: raise the tile to >= {max(1, 2 * overlap)} or lower the overlap to "
                         f"<= {tile // 2}.")


def feather(t: Tile, height: int, width: int, margin: int, fade: int, scale: int,
            device: torch.device) -> torch.Tensor:
    """Blend weight of a tile's output (`scale` px per latent px): 0 on the `margin` at inner edges, then a ramp over `fade`."""

    def axis(a0: int, a1: int, size: int) -> torch.Tensor:
        d = torch.arange((a1 - a0) * scale, device=device, dtype=torch.float32) + 0.5 - margin * scale
        w = torch.ones_like(d)
        r = max(fade * scale, 1)
        if a0 > 0:
            w = torch.minimum(w, (d / r).clamp(min=0))
        if a1 < size:
            w = torch.minimum(w, (d.flip(0) / r).clamp(min=0))
        return w

    return axis(t.y0, t.y1, height)[:, None] * axis(t.x0, t.x1, width)[None, :]


# ---------------------------------------------------------------------------------------------- GroupNorm state

@dataclass
class GroupNormStats:
    """Per-run GroupNorm state of the tiled stages: per-tile statistics, or whole-image ones recorded over tiles.

    mode "tile": each tile normalizes itself; "record": the same, recording core statistics into `new`;
    "refine": normalize with `stats` while recording `new`; "apply": normalize with `stats`.
    """

    mode: str = "tile"
    tile: Tile | None = None
    stats: list[list[torch.Tensor]] = field(default_factory=list)  # per GroupNorm call: count, mean, M2 (B, G) f64
    new: list[list[torch.Tensor]] = field(default_factory=list)
    index: int = 0
    fused_failed: bool = False

    def start_tile(self, t: Tile) -> None:
        self.tile, self.index = t, 0

    def finish_pass(self, damp: bool = False) -> None:
        """The statistics recorded over the pass become the ones applied; damped: the mean of them and the last.

        Successive estimates alternate around the whole-image statistics (each pass over-corrects the last: the
        error changes sign, shrinking by a factor of about 0.4-0.7), so the mean of two is closer than either.
        """
        if damp and self.stats:
            self.new = [[n1, (m0 + m1) / 2, (q0 / n0 + q1 / n1) / 2 * n1]
                        for (n0, m0, q0), (n1, m1, q1) in zip(self.stats, self.new)]
        self.stats, self.new = self.new, []

    def reset(self) -> None:
        self.mode, self.tile, self.stats, self.new, self.index = "tile", None, [], [], 0

    def __call__(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        i, self.index = self.index, self.index + 1
        if self.mode in ("record", "refine"):
            self._record(norm, x, i)
        if self.mode in ("refine", "apply"):
            return self._apply(norm, x, i)
        return norm(x)

    def _core(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tile
        s = x.shape[-2] // (t.y1 - t.y0)
        return x[..., (t.cy0 - t.y0) * s:(t.cy1 - t.y0) * s, (t.cx0 - t.x0) * s:(t.cx1 - t.x0) * s]

    def _record(self, norm: torch.nn.GroupNorm, x: torch.Tensor, i: int) -> None:
        core = self._core(x).unflatten(1, (norm.num_groups, -1))  # (B, G, C/G, h, w), a view
        means, m2s = [], []
        for g in range(0, norm.num_groups, STATS_GROUP_CHUNK):
            var, mean = torch.var_mean(core[:, g:g + STATS_GROUP_CHUNK].float(), dim=(2, 3, 4), correction=0)
            means.append(mean.double())
            m2s.append(var.double())
        n = core[0, 0].numel()
        mean, m2 = torch.cat(means, 1), torch.cat(m2s, 1) * n
        count = torch.full_like(mean, float(n))
        if i == len(self.new):
            self.new.append([count, mean, m2])
            return
        c0, mu0, m20 = self.new[i]
        total = c0 + count
        delta = mean - mu0
        self.new[i] = [total, mu0 + delta * count / total, m20 + m2 + delta.square() * c0 * count / total]

    def _apply(self, norm: torch.nn.GroupNorm, x: torch.Tensor, i: int) -> torch.Tensor:
        count, mean, m2 = self.stats[i]
        b, c = x.shape[:2]
        per = c // norm.num_groups
        mean_c = mean.repeat_interleave(per, 1).flatten().to(device=x.device, dtype=torch.float32)
        var_c = (m2 / count).repeat_interleave(per, 1).flatten().to(device=x.device, dtype=torch.float32)
        w, bias = _affine(norm, x)
        w, bias = w.repeat(b), bias.repeat(b)
        if not self.fused_failed:
            try:  # eval-mode batch norm with fixed statistics: one fused kernel, fp32 math, output in x.dtype
                y = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), mean_c, var_c, w, bias, training=False,
                                 eps=norm.eps)
                return y.view_as(x)
            except RuntimeError as e:
                self.fused_failed = True
                log.warning("tiled VAE: fused normalization unavailable for %s on %s (%s); using the elementwise "
                            "path", x.dtype, x.device, e)
        scale = ((var_c + norm.eps).rsqrt() * w).view(b, c, 1, 1)
        shift = bias.view(b, c, 1, 1) - mean_c.view(b, c, 1, 1) * scale
        y = torch.empty_like(x)
        for ci in range(0, c, 32):  # fp32 math in channel chunks bounds the temporary
            sl = slice(ci, ci + 32)
            y[:, sl] = (x[:, sl].float() * scale[:, sl] + shift[:, sl]).to(x.dtype)
        return y


def _affine(norm: torch.nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GroupNorm's weight and bias in fp32 on x's device, through any weight functions the host attached."""
    c = norm.num_channels
    w = norm.weight if norm.weight is not None else torch.ones(c)
    b = norm.bias if norm.bias is not None else torch.zeros(c)
    w, b = w.to(device=x.device, dtype=torch.float32), b.to(device=x.device, dtype=torch.float32)
    for fn in getattr(norm, "weight_function", None) or []:
        w = fn(w)
    for fn in getattr(norm, "bias_function", None) or []:
        b = fn(b)
    return w.float(), b.float()


# ---------------------------------------------------------------------------------------------- the network walk

def resnet(block: torch.nn.Module, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """ComfyUI ResnetBlock forward (no timestep embedding, eval-mode dropout) with GroupNorm through `norm`."""
    h = block.conv1(F.silu(norm(block.norm1, x), inplace=True))
    h = block.conv2(F.silu(norm(block.norm2, h), inplace=True))
    if block.in_channels != block.out_channels:
        x = block.conv_shortcut(x) if block.use_conv_shortcut else block.nin_shortcut(x)
    return x + h


def attention(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ComfyUI AttnBlock forward (one head over all pixels), query-chunked so the score matrix stays bounded."""
    h = block.norm(x)
    b, c, hh, ww = h.shape
    q, k, v = (m(h).view(b, 1, c, -1).transpose(2, 3) for m in (block.q, block.k, block.v))
    del h
    n = q.shape[2]
    chunk = max(1, ATTENTION_CHUNK_ELEMENTS // n)
    if chunk >= n:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = torch.empty_like(q)
        for i in range(0, n, chunk):
            out[:, :, i:i + chunk] = F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v)
    return x + block.proj_out(out.transpose(2, 3).reshape(b, c, hh, ww))


@dataclass
class Stage:
    """A run of layers at one resolution: `run(h, norm)`, its scale after (px per latent px), cost and reach."""

    name: str
    run: Callable[[torch.Tensor, Norm], torch.Tensor]
    scale: int  # pixels per latent pixel of the stage's output
    cost: int  # peak live activation elements per latent pixel while the stage runs
    radius: float  # how far past a tile edge the stage's convolutions read, in latent pixels
    channels: int  # output channels
    whole_image_only: bool = False  # self-attention: never tiled


def _conv_reach(conv: torch.nn.Module, scale: int) -> float:
    k = conv.weight.shape[-1]
    return (k // 2) / scale if k > 1 else 0.0


def _resnets_stage(name: str, blocks: torch.nn.ModuleList, scale: int) -> Stage:
    def run(h: torch.Tensor, norm: Norm) -> torch.Tensor:
        for block in blocks:
            h = resnet(block, h, norm)
        return h

    cost = max((2 * b.in_channels + b.out_channels) * scale * scale for b in blocks)
    reach = sum(_conv_reach(b.conv1, scale) + _conv_reach(b.conv2, scale) for b in blocks)
    return Stage(name, run, scale, cost, reach, blocks[-1].out_channels)


def decoder_stages(decoder: torch.nn.Module, post_quant_conv: torch.nn.Module | None = None) -> list[Stage]:
    """ComfyUI Decoder (plus the VAE's post_quant_conv) as stages, latent first."""

    def mid(z: torch.Tensor, norm: Norm) -> torch.Tensor:
        h = post_quant_conv(z) if post_quant_conv is not None else z
        h = decoder.conv_in(h)
        h = decoder.mid.block_1(h, None)
        h = attention(decoder.mid.attn_1, h)
        return decoder.mid.block_2(h, None)

    c_mid = decoder.conv_in.out_channels
    stages = [Stage("mid", mid, 1, 6 * c_mid, 0.0, c_mid, whole_image_only=True)]
    scale = 1
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        stages.append(_resnets_stage(f"up{level}", up.block, scale))
        if level != 0:
            c = up.block[-1].out_channels
            stages.append(Stage(f"upsample{level}", lambda h, norm, m=up.upsample: m(h), scale * 2,
                                c * scale * scale + 2 * c * 4 * scale * scale, _conv_reach(up.upsample.conv, scale * 2),
                                c))
            scale *= 2

    def head(h: torch.Tensor, norm: Norm) -> torch.Tensor:
        h = decoder.conv_out(F.silu(norm(decoder.norm_out, h), inplace=True))
        return torch.tanh(h) if getattr(decoder, "tanh_out", False) else h

    c = decoder.norm_out.num_channels
    stages.append(Stage("out", head, scale, (2 * c + 3) * scale * scale, _conv_reach(decoder.conv_out, scale),
                        decoder.conv_out.out_channels))
    return stages


def encoder_stages(encoder: torch.nn.Module, quant_conv: torch.nn.Module | None = None) -> list[Stage]:
    """ComfyUI Encoder (plus the VAE's quant_conv) as stages, pixels first; the output is the moments."""
    top = scale_factor(encoder)
    c0 = encoder.conv_in.out_channels
    stages = [Stage("conv_in", lambda x, norm: encoder.conv_in(x), top, (3 + c0) * top * top,
                    _conv_reach(encoder.conv_in, top), c0)]
    scale = top
    for level in range(encoder.num_resolutions):
        down = encoder.down[level]
        stages.append(_resnets_stage(f"down{level}", down.block, scale))
        if level != encoder.num_resolutions - 1:
            c = down.block[-1].out_channels
            stages.append(Stage(f"downsample{level}", lambda h, norm, m=down.downsample: m(h), scale // 2,
                                c * scale * scale + 2 * c * (scale // 2) ** 2, 1.0 / scale, c))
            scale //= 2

    def mid(h: torch.Tensor, norm: Norm) -> torch.Tensor:
        h = encoder.mid.block_1(h, None)
        h = attention(encoder.mid.attn_1, h)
        h = encoder.mid.block_2(h, None)
        h = encoder.conv_out(F.silu(encoder.norm_out(h), inplace=True))
        return quant_conv(h) if quant_conv is not None else h

    c_mid = encoder.norm_out.num_channels
    stages.append(Stage("mid", mid, 1, 6 * c_mid, 0.0, encoder.conv_out.out_channels, whole_image_only=True))
    return stages


def scale_factor(net: torch.nn.Module) -> int:
    """Pixels per latent pixel of an Encoder/Decoder (2 ** (levels - 1); 8 for SD/SDXL)."""
    return 2 ** (net.num_resolutions - 1)


def unsupported_reason(decoder: torch.nn.Module | None = None, encoder: torch.nn.Module | None = None) -> str | None:
    """Why this VAE cannot be tiled here, None when it can: the walk needs ComfyUI's 2-D AutoencoderKL layout."""
    for name, net in (("decoder", decoder), ("encoder", encoder)):
        if net is None:
            continue
        expected = name.title()
        if type(net).__name__ != expected:
            return f"its {name} is a {type(net).__name__}, not ComfyUI's AutoencoderKL {expected}"
        conv_in = getattr(net, "conv_in", None)
        if conv_in is None or getattr(conv_in, "weight", None) is None or conv_in.weight.ndim != 4:
            return f"its {name} is not 2-D (a video/3-D VAE)"
        levels = net.up if name == "decoder" else net.down
        blocks = [b for lv in levels for b in lv.block] + [net.mid.block_1, net.mid.block_2]
        if any(type(b).__name__ != "ResnetBlock" or getattr(b, "temb_proj", None) is not None for b in blocks):
            return f"its {name} has resnet blocks of another kind"
        if any(len(lv.attn) > 0 for lv in levels):
            return f"its {name} has attention outside the mid block"
        if type(net.mid.attn_1).__name__ != "AttnBlock":
            return f"its {name} mid attention is a {type(net.mid.attn_1).__name__}"
        if getattr(net, "give_pre_end", False):
            return "its decoder returns pre-activation features (give_pre_end)"
    return None


# ---------------------------------------------------------------------------------------------- planning

@dataclass
class Plan:
    """How one decode/encode runs: the stages on the whole image, the tiled stages, their tiles and blend."""

    whole: list[Stage]  # decode: run first on the whole latent; encode: run last
    tiled: list[Stage]
    tiles: list[Tile]  # the output pass: neighbours share overlap + 2 x margin
    record_tiles: list[Tile]  # first statistics pass (per-tile normalization): the largest tiles, no overlap
    refine_tiles: list[Tile]  # further statistics passes: neighbours share 2 x margin (exact inputs at the cores)
    margin: int  # latent px each window reaches past its core into its neighbours (receptive radius)
    fade: int  # latent px of cross-fade between neighbouring cores
    peak_bytes: int  # estimated peak activation memory


def plan(stages: list[Stage], height: int, width: int, tile: int, overlap: int, dtype_size: int,
         decoding: bool, offload: bool = False) -> Plan:
    """Split the stages into a whole-image part and a tiled part, and lay out the tiles.

    `tile` is the memory unit: windows hold at most tile x tile latent px (rectangular when that computes less),
    and a stage runs on the whole image when its whole-image activations fit in what one such window holds.
    `offload`: the whole-image tensor the tiles read and the blend buffers are not in device memory.
    """
    area = height * width
    if area > tile * tile:  # an image that fits one tile needs no overlap, whatever it is set to
        check_tiling(tile, overlap)
    budget = max(s.cost for s in stages) * tile * tile  # what one window of the highest-resolution stage holds
    order = stages if decoding else stages[::-1]  # the whole-image part grows from the latent end
    n_whole = 0
    for s in order:
        if s.whole_image_only or s.cost * area <= budget:
            n_whole += 1
        else:
            break
    if n_whole == len(stages) or area <= tile * tile:
        peak = int(max(s.cost for s in stages) * area * dtype_size * ALLOCATOR_SLACK)
        one = [Tile(0, height, 0, width, 0, height, 0, width)]
        return Plan(list(stages), [], one, one, one, 0, 0, peak)
    whole, tiled = order[:n_whole], order[n_whole:]
    if not decoding:
        whole, tiled = whole[::-1], tiled[::-1]
    margin = math.ceil(sum(s.radius for s in tiled) - 1e-9)
    tiles = plan_grid(height, width, tile * tile, overlap + 2 * margin) if tile > overlap + 2 * margin else None
    if tiles is None:
        raise ValueError(f"expected a tile larger than overlap + 2 x {margin} latent px (the convolutions' reach "
                         f"past a tile edge in this VAE), got tile {tile} and overlap {overlap}. Fix: raise the "
                         f"tile size to at least {(overlap + 2 * margin + 8) * 8} px or lower the overlap.")
    # per-tile statistics estimate the whole image's better the larger the tile, while an edge band read from
    # zero padding biases them little; once the statistics are shared, exact inputs at the cores matter more
    record_tiles = plan_grid(height, width, tile * tile, 0, edge=margin)
    refine_tiles = plan_grid(height, width, tile * tile, 2 * margin)
    window = max((t.y1 - t.y0) * (t.x1 - t.x0) for t in tiles + record_tiles + refine_tiles)
    work = max(max(s.cost for s in tiled) * window, max(s.cost for s in whole) * area)
    handoff = (whole[-1] if decoding else tiled[-1])  # kept whole while the tiles run: input, or fp32 blend buffer
    kept = handoff.channels * handoff.scale ** 2 * area * (dtype_size if decoding else 4)
    blend = tiled[-1].channels * tiled[-1].scale ** 2 * area * 4 if decoding else 0
    peak = int(work * dtype_size * ALLOCATOR_SLACK) + (0 if offload else kept + blend)
    return Plan(whole, tiled, tiles, record_tiles, refine_tiles, margin, overlap, peak)


def auto_tile(stages: list[Stage], height: int, width: int, overlap: int, dtype_size: int, budget_bytes: float,
              decoding: bool, align: int = 8, offload: bool = False) -> int:
    """Largest tile side (latent px, a multiple of `align`) whose plan fits `budget_bytes`; the whole image if it fits."""
    whole = max(height, width)
    if plan(stages, height, width, whole, overlap, dtype_size, decoding, offload).peak_bytes <= budget_bytes:
        return whole
    best = smallest = None
    for side in range(max(align, math.ceil(2 * overlap / align) * align), whole, align):
        try:
            p = plan(stages, height, width, side, overlap, dtype_size, decoding, offload)
        except ValueError:  # too small for the tiled stages' reach
            continue
        smallest = smallest or side
        if p.peak_bytes > budget_bytes:
            break
        best = side
    if best is None:
        log.warning("tiled VAE: even the smallest workable tile (%s latent px) exceeds the memory budget of "
                    "%.2f GiB; using it anyway", smallest or whole, budget_bytes / 1024**3)
    return best or smallest or whole


# ---------------------------------------------------------------------------------------------- running

def stat_passes(groupnorm: str, record_tiles: int = 1) -> int:
    """Statistics passes before the output pass: tile 0; global_fast 1; global 2, or 3 over more than MANY_TILES."""
    if groupnorm not in GROUPNORM_MODES:
        raise ValueError(f"expected groupnorm in {list(GROUPNORM_MODES)}, got {groupnorm!r}. Fix: pick one of those.")
    if groupnorm == "global":
        return 2 if record_tiles <= MANY_TILES else 3
    return 1 if groupnorm == "global_fast" else 0


def _run_tiled(p: Plan, h: torch.Tensor, height: int, width: int, in_scale: int, stat_passes: int,
               progress: Progress | None, device: torch.device) -> torch.Tensor:
    """Run the tiled stages over the tiles and blend the outputs; first `stat_passes` passes of GroupNorm statistics.

    0: every tile normalizes with its own statistics (one pass). 1: a first pass records whole-image statistics on
    the tile cores (with per-tile normalization upstream, so an estimate); the output pass applies them. 2+: each
    further pass normalizes with the last estimate while recording a new one, and the mean of the two is kept.
    `h` and the blend buffers stay where `h` is (e.g. CPU memory); each window runs on `device`.
    """
    if stat_passes < 0:
        raise ValueError(f"expected stat_passes >= 0, got {stat_passes}")
    out_scale = p.tiled[-1].scale
    norm = GroupNormStats()
    total = (len(p.record_tiles) if stat_passes else 0) + max(stat_passes - 1, 0) * len(p.refine_tiles) + len(p.tiles)
    done = 0

    def run(t: Tile) -> torch.Tensor:
        nonlocal done
        norm.start_tile(t)
        x = h[:, :, t.y0 * in_scale:t.y1 * in_scale, t.x0 * in_scale:t.x1 * in_scale].to(device)
        for s in p.tiled:
            x = s.run(x, norm)
        done += 1
        if progress:
            progress(done, total)
        return x

    try:
        for i in range(stat_passes):
            norm.mode = "record" if i == 0 else "refine"
            for t in p.record_tiles if i == 0 else p.refine_tiles:
                run(t)
            norm.finish_pass(damp=i > 0)
        norm.mode = "apply" if stat_passes else "tile"
        acc = wsum = None
        for t in p.tiles:
            out = run(t)
            if acc is None:
                acc = torch.zeros(out.shape[0], out.shape[1], height * out_scale, width * out_scale,
                                  device=h.device, dtype=torch.float32)
                wsum = torch.zeros(height * out_scale, width * out_scale, device=h.device, dtype=torch.float32)
            w = feather(t, height, width, p.margin, p.fade, out_scale, out.device)
            ys, xs = slice(t.y0 * out_scale, t.y1 * out_scale), slice(t.x0 * out_scale, t.x1 * out_scale)
            acc[:, :, ys, xs].add_((out.float() * w).to(h.device))
            wsum[ys, xs].add_(w.to(h.device))
            del out
    finally:
        norm.reset()
    return acc.div_(wsum)


def decode_tiled(decoder: torch.nn.Module, z: torch.Tensor, tile: int, overlap: int, groupnorm: str = "global",
                 post_quant_conv: torch.nn.Module | None = None, progress: Progress | None = None,
                 store: torch.device | None = None) -> torch.Tensor:
    """Latents (B, C, h, w) as the VAE takes them -> decoder output (B, 3, 8h, 8w), about [-1, 1], fp32.

    `tile` and `overlap` are latent pixels; `tile` is the memory unit (a window holds at most tile x tile).
    Computes on z's device; with `store` (e.g. the CPU), the whole-image tensor the tiles read and the blend
    buffers live there instead, and so does the result. One tile: the decoder's own forward, as VAE Decode runs it.
    """
    stat_passes(groupnorm)  # validates the mode before any work
    height, width = z.shape[-2:]
    stages = decoder_stages(decoder, post_quant_conv)
    p = plan(stages, height, width, tile, overlap, z.element_size(), decoding=True, offload=store is not None)
    if not p.tiled:
        out = decoder(post_quant_conv(z) if post_quant_conv is not None else z)
        if progress:
            progress(1, 1)
        return out.float()
    h = z
    for s in p.whole:
        h = s.run(h, plain_norm)
    if store is not None:
        h = h.to(store)
    passes = stat_passes(groupnorm, len(p.record_tiles))
    return _run_tiled(p, h, height, width, p.whole[-1].scale, passes, progress, z.device)


def encode_tiled(encoder: torch.nn.Module, x: torch.Tensor, tile: int, overlap: int, groupnorm: str = "global",
                 quant_conv: torch.nn.Module | None = None, progress: Progress | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1], sides multiples of 8 -> moments (B, 2C, H/8, W/8) of the latent, fp32.

    `tile` and `overlap` are latent pixels (x8 in the image). The high-resolution stages are tiled; the rest,
    with the mid-block attention, runs on the whole (downsampled) image. Computes on `device` (default: x's);
    x and the blend buffer stay where x is. One tile: the encoder's own forward, as VAE Encode runs it.
    """
    stat_passes(groupnorm)  # validates the mode before any work
    device = device or x.device
    top = scale_factor(encoder)
    if x.shape[-2] % top or x.shape[-1] % top:
        raise ValueError(f"expected an image whose sides are multiples of {top}, got {tuple(x.shape[-2:])}. "
                         f"Fix: crop or resize the image to a multiple of {top}.")
    height, width = x.shape[-2] // top, x.shape[-1] // top
    stages = encoder_stages(encoder, quant_conv)
    p = plan(stages, height, width, tile, overlap, x.element_size(), decoding=False, offload=x.device != device)
    if not p.tiled:
        h = encoder(x.to(device))
        if progress:
            progress(1, 1)
        return (quant_conv(h) if quant_conv is not None else h).float()
    passes = stat_passes(groupnorm, len(p.record_tiles))
    h = _run_tiled(p, x, height, width, top, passes, progress, device).to(device=device, dtype=x.dtype)
    for s in p.whole:
        h = s.run(h, plain_norm)
    return h.float()
