"""FreeU: rebalance the UNet decoder's backbone and skip features, for better images at no extra cost.

In the first two decoder stages (the two lowest-resolution up blocks) the backbone features are amplified
(first half of the channels times b) and the low-frequency part of the skip features is scaled by s
(a Fourier filter). This module is the math, written to match diffusers' `apply_freeu` / `fourier_filter`
(which up blocks, which channels, the threshold-1 square of frequencies after fftshift); the node layer
maps it onto ComfyUI's output blocks.

The Fourier filter changes only a handful of frequencies (a 2x2 square for threshold 1), so besides the
FFT form it has an exact closed form of small real matmuls: no complex tensors, no torch.fft, so it runs
on every device and compiles without graph breaks; it is the default. Both are tested against each other.

FreeU: Si, Huang, Jiang, Liu, "FreeU: Free Lunch in Diffusion U-Net", CVPR 2024, arXiv:2309.11497
(github.com/ChenyangSi/FreeU); V1 as in diffusers, V2 (structure-aware backbone factor) as in the official repo.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .compiling import is_compiling as _is_compiling

# (b1, b2, s1, s2) published for each model family (FreeU repository README; SDXL is also the values of
# the SDXL optimization guide by Félix San)
PRESETS: dict[str, tuple[float, float, float, float]] = {
    "SDXL": (1.3, 1.4, 0.9, 0.2),
    "SD1.5": (1.5, 1.6, 0.9, 0.2),
    "SD1.4": (1.3, 1.4, 0.9, 0.2),
    "SD2.1": (1.4, 1.6, 0.9, 0.2),
}
VERSIONS = ("v1", "v2")
FOURIER_METHODS = ("matmul", "fft")
THRESHOLD = 1  # half-width of the low-frequency square, as in FreeU and diffusers


@dataclass(frozen=True)
class FreeUConfig:
    """b1/b2 amplify the backbone of decoder stages 1/2, s1/s2 scale the low frequencies of their skips.

    All four at 1.0 is the unpatched UNet. version "v1" scales the backbone by b (diffusers, the guide);
    "v2" scales it by 1 + (b - 1) * (normalized mean feature map), the official repository's FreeU v2.
    """

    b1: float = 1.3
    b2: float = 1.4
    s1: float = 0.9
    s2: float = 0.2
    version: str = "v1"
    threshold: int = THRESHOLD

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"FreeU version: expected one of {VERSIONS}, got {self.version!r}. Fix: pick v1 or v2.")
        for name in ("b1", "b2", "s1", "s2"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"FreeU {name}: expected a finite factor >= 0 (1.0 = unchanged), got {v}. "
                                 f"Fix: use the SDXL preset values (b1 1.3, b2 1.4, s1 0.9, s2 0.2).")
        if self.threshold < 1:
            raise ValueError(f"FreeU threshold: expected >= 1, got {self.threshold}. Fix: use 1 (as FreeU).")

    @classmethod
    def from_preset(cls, name: str, version: str = "v1") -> FreeUConfig:
        if name not in PRESETS:
            raise ValueError(f"FreeU preset: expected one of {sorted(PRESETS)}, got {name!r}. Fix: pick one of "
                             "those, or 'custom' with your own b1, b2, s1, s2.")
        b1, b2, s1, s2 = PRESETS[name]
        return cls(b1, b2, s1, s2, version)

    def stage_factors(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(b, s) of decoder stage 0 (deepest, lowest resolution) and stage 1."""
        return (self.b1, self.s1), (self.b2, self.s2)

    @property
    def is_identity(self) -> bool:
        return self.b1 == self.b2 == self.s1 == self.s2 == 1.0


def decoder_stages(block_has_upsample: Sequence[bool]) -> list[int]:
    """Decoder stage (0 = lowest resolution) of each output block, given which blocks end with an upsampler.

    A stage is the run of output blocks up to and including one that upsamples: the same grouping as
    diffusers' up_blocks (each ends with its upsampler), whose index is FreeU's resolution_idx.
    """
    stages, stage = [], 0
    for up in block_has_upsample:
        stages.append(stage)
        stage += int(bool(up))
    return stages


# --- backbone factor

_FACTORS: dict[tuple, torch.Tensor] = {}


def channel_factors(channels: int, half: int, b: float, ndim: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """(1, C, 1, ...) with b on the first `half` channels and exactly 1 on the rest; cached per shape/dtype/device
    (built on the device: no host-to-device copy per call)."""
    def build() -> torch.Tensor:
        f = torch.ones((1, channels) + (1,) * (ndim - 2), dtype=dtype, device=device)
        f[:, :half] = b
        return f

    return _memo(_FACTORS, (channels, half, float(b), ndim, dtype, str(device)), build)


def backbone_scale(h: torch.Tensor, b: float, version: str = "v1") -> torch.Tensor:
    """Amplify the first half of h's channels by b (v1), or by 1 + (b - 1) * normalized mean map (v2).

    Out of place (the input tensor may be cached by another patch); the second half is passed through."""
    half = h.shape[1] // 2
    if version == "v1":  # one multiply by a cached per-channel factor (b, ..., b, 1, ..., 1): one kernel
        return h * channel_factors(h.shape[1], half, b, h.ndim, h.dtype, h.device)
    else:
        mean = h.mean(1, keepdim=True)
        flat = mean.reshape(mean.shape[0], -1)
        view = (mean.shape[0],) + (1,) * (h.ndim - 1)
        lo = flat.min(dim=-1).values.reshape(view)
        hi = flat.max(dim=-1).values.reshape(view)
        norm = (mean - lo) / (hi - lo).clamp_min(torch.finfo(mean.dtype).tiny)  # flat map: factor 1, not NaN
        scaled = h[:, :half] * ((b - 1) * norm + 1)
    return torch.cat((scaled, h[:, half:]), dim=1)


# --- skip factor: the Fourier filter

def masked_frequencies(n: int, threshold: int = THRESHOLD) -> list[int]:
    """DFT indices along an axis of length n that FreeU's mask scales.

    FreeU sets mask[..., c - t:c + t, ...] = scale on the fftshift-ed spectrum (c = n // 2), so with
    Python slice semantics; shifted position r holds DFT index (r - c) mod n.
    """
    c = n // 2
    return [(r - c) % n for r in range(n)[slice(c - threshold, c + threshold)]]


def _real_basis(n: int, threshold: int, device: torch.device) -> torch.Tensor:
    """(4K, n) fp32: cos and sin rows of the masked frequencies, then the same rotated ([sin; -cos])."""
    # built on `device`: under torch.compile a CPU tensor here would put CPU ops in the GPU graph (no CUDA graphs)
    wide = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
    c, rows = n // 2, range(n)[slice(n // 2 - threshold, n // 2 + threshold)]  # as masked_frequencies, a range
    k = (torch.arange(rows.start, rows.stop, rows.step, dtype=wide, device=device) - c) % n
    angle = (2 * math.pi / n) * torch.outer(k, torch.arange(n, dtype=wide, device=device))
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.cat((cos, sin, sin, -cos)).to(device=device, dtype=torch.float32)


def _memo(store: dict, key: tuple, build):
    """build(), cached in `store` under `key`; under torch.compile built in the graph each trace (constant-
    folded there) and never cached: a Python-side cache would hold traced tensors."""
    if _is_compiling():
        return build()
    value = store.get(key)
    if value is None:
        value = store[key] = build()
    return value


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.kron of two matrices, written with broadcasting (traces to plain pointwise ops)."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def _lowpass_operators(h: int, w: int, threshold: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, U), fp32, with (x_flat @ V) @ U = the masked frequencies of x, x_flat = x.reshape(-1, h * w).

    The masked part of the (h, w) spectrum is Ay^T (Q - Q') Ax / (h w) with Q = Ay1 x Ax1^T and Q' = Ay2 x Ax2^T
    (the cos/sin rows of _real_basis and their rotation); flattened, that is a rank-r product with
    V = (Ay1 (x) Ax1 - Ay2 (x) Ax2)^T / (h w) (h w x r) and U = Ay1 (x) Ax1 (r x h w), r = ky kx rows of
    the two bases (16 for threshold 1): two small matmuls and a handful of kernels per call, where the separable form needs ~80 ops."""
    ay, ax = _real_basis(h, threshold, device), _real_basis(w, threshold, device)
    ky, kx = ay.shape[0] // 2, ax.shape[0] // 2
    top = _kron(ay[:ky], ax[:kx])  # (ky kx, h w): the cos/sin rows, also the synthesis rows
    # the 1 / (h w) goes into the analysis side: x_flat @ V is then a mean over the pixels, bounded by
    # ~2 max|x|, where a sum over 4096 pixels overflows fp16 (65504) for activations averaging above ~16
    v = ((top - _kron(ay[ky:], ax[kx:])) / (h * w)).transpose(0, 1).contiguous()
    return v, top


_OPERATORS: dict[tuple[int, int, int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def lowpass_operators(h: int, w: int, threshold: int, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, U) of _lowpass_operators in `dtype` (built in fp32, then rounded), cached per size/device/dtype."""
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        v, u = _lowpass_operators(h, w, threshold, device)
        return v.to(dtype), u.to(dtype)

    return _memo(_OPERATORS, (h, w, threshold, str(device), dtype), build)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def filter_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp16/bf16 on CUDA: the filter's two GEMMs in x's dtype (fp32 accumulation in cuBLAS), no conversion
    kernels; everywhere else fp32 (CPU half-precision GEMMs are slow and accumulate less exactly)."""
    return x.dtype if x.is_cuda and x.dtype in HALF_DTYPES else torch.float32


def fourier_filter_matmul(x: torch.Tensor, threshold: int, scale: float,
                          compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """FreeU's Fourier filter without FFT: x + (scale - 1) * (the masked frequencies of x).

    The masked part is Re(F_y^H (F_y x F_x^T) conj F_x) / (H W) with F the DFT rows of the few masked
    frequencies; in real arithmetic a rank-16 (threshold 1) linear map of the flattened x (lowpass_operators),
    applied as one matmul and one fused multiply-add: 2 kernels per call in eager mode on CUDA (fp16/bf16
    GEMMs accumulating in fp32), 4 in fp32 (conversions in and out)."""
    h, w = x.shape[-2:]
    dtype = compute_dtype or filter_compute_dtype(x)
    v, u = lowpass_operators(h, w, threshold, x.device, dtype)
    xf = x.to(dtype).reshape(-1, h * w)
    return torch.addmm(xf, xf @ v, u, alpha=scale - 1.0).reshape(x.shape).to(x.dtype)


def fourier_filter_fft(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """FreeU's Fourier filter as diffusers computes it (fp32 FFT, fftshift, square mask, inverse)."""
    xf = x.float()  # FFT of fp16/bf16 is unsupported or unstable: always fp32, as diffusers does
    freq = torch.fft.fftshift(torch.fft.fftn(xf, dim=(-2, -1)), dim=(-2, -1))
    h, w = xf.shape[-2:]
    mask = torch.ones((h, w), device=x.device)
    c_row, c_col = h // 2, w // 2
    mask[c_row - threshold:c_row + threshold, c_col - threshold:c_col + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def fourier_filter(x: torch.Tensor, threshold: int, scale: float, method: str = "matmul") -> torch.Tensor:
    """Scale the low-frequency square of x's spectrum by `scale` (FreeU's skip factor)."""
    if method == "fft":
        return fourier_filter_fft(x, threshold, scale)
    return fourier_filter_matmul(x, threshold, scale)


def fft_supported(device: torch.device) -> bool:
    """Whether torch.fft runs on `device` (probed once with a tiny tensor; some backends lack it)."""
    try:
        torch.fft.ifftn(torch.fft.fftn(torch.ones(1, 1, 2, 2, device=device), dim=(-2, -1)), dim=(-2, -1))
        return True
    except Exception:  # any failure means: do not use FFT on this device
        return False


# --- one decoder stage

def freeu_stage(h: torch.Tensor, hsp: torch.Tensor, b: float, s: float, version: str = "v1",
                threshold: int = THRESHOLD, method: str = "matmul") -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU on one output block of a patched stage: (backbone h, skip hsp) -> (h', hsp').
    A factor of exactly 1.0 leaves its tensor untouched (no work)."""
    if b != 1.0:
        h = backbone_scale(h, b, version)
    if s != 1.0:
        hsp = fourier_filter(hsp, threshold, s, method)
    return h, hsp
