"""SSIM and MS-SSIM with a separable Gaussian window, for losses, validation and metrics.

The definitions are MONAI's (``SSIMMetric`` / ``MultiScaleSSIMMetric``) and scikit-image's
(``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``): a normalised
Gaussian window (11 voxels, sigma 1.5), K1 0.01, K2 0.03, statistics only where the whole window fits
(the "valid" region, no padding), averaged over voxels and channels. MONAI filters with one dense N-D
window (11^3 = 1331 multiply-adds a voxel in 3-D per statistic); a Gaussian is separable, so three 1-D
passes (33) give the same numbers. On a GPU the four statistics (x, y, x^2 + y^2, xy) of every case and
channel are filtered together by grouped 1-D convolutions; on a CPU by sums of shifted views over slabs that
fit in cache (PyTorch's CPU depthwise convolutions are several times slower). Everything stays on the
tensors' device and is differentiable (losses use it).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _per_axis(value, dims: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * dims
    if len(values) != dims:
        raise ValueError(f"{name} needs one value or {dims} (one per spatial axis), got {value!r}")
    return values


def gaussian_window(kernel_size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps centred on the middle tap (MONAI's and scikit-image's window)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    dist = torch.arange((1 - kernel_size) / 2, (1 + kernel_size) / 2, 1.0, dtype=torch.float64)
    g = torch.exp(-((dist / sigma) ** 2) / 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def _shift_sum(x: torch.Tensor, dim: int, taps: Sequence[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """Valid 1-D filtering along ``dim`` as a sum of shifted views (memory-bound, so run on cache-sized slabs)."""
    length = x.shape[dim] - len(taps) + 1
    if out is None:
        out = x.narrow(dim, 0, length) * taps[0]
    else:
        torch.mul(x.narrow(dim, 0, length), taps[0], out=out)
    for i in range(1, len(taps)):
        out.add_(x.narrow(dim, i, length), alpha=taps[i])  # in place: autograd-safe (add saves nothing)
    return out


def _conv_blur(x: torch.Tensor, windows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Valid separable filtering of [N, C, *S] with one grouped 1-D convolution per axis (GPU path)."""
    spatial, channels = x.ndim - 2, x.shape[1]
    conv = getattr(F, f"conv{spatial}d")
    for axis, taps in enumerate(windows):
        shape = [1] * spatial
        shape[axis] = taps.numel()
        weight = taps.view(1, 1, *shape).expand(channels, 1, *shape).contiguous()
        x = conv(x, weight, groups=channels)
    return x


def _combine(mu_x, mu_y, mu_sq, mu_xy, c1: float, c2: float, offset) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and CS from local moments of images shifted by ``-offset`` (variances are shift-invariant; the
    shift makes E[x^2] - E[x]^2 cancel far less in float32, at coarse MS-SSIM scales above all).

    SSIM only needs the sum of the two variances, so ``mu_sq`` is the one filtered E[x^2 + y^2]: four
    statistics to filter instead of five.
    """
    variances = mu_sq - mu_x * mu_x - mu_y * mu_y
    sigma_xy = mu_xy - mu_x * mu_y
    cs = (2 * sigma_xy + c2) / (variances + c2)
    mu_x, mu_y = mu_x + offset, mu_y + offset
    return (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs, cs


# CPU slabs of about this many voxels (8 MB of float32) keep the shifted sums in cache: 2-3x faster than
# filtering whole volumes, and the peak memory no longer grows with the four full-size statistics.
_SLAB_VOXELS = 2 ** 21
def _check_pair(x: torch.Tensor, y: torch.Tensor, kernel_size: tuple) -> None:
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs two tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim not in (4, 5):
        raise ValueError(f"SSIM needs [B, C, H, W] or [B, C, H, W, D] tensors, got shape {tuple(x.shape)}")
    small = [(s, k) for s, k in zip(x.shape[2:], kernel_size) if s < k]
    if small:
        raise ValueError(f"image of spatial shape {tuple(x.shape[2:])} is smaller than the SSIM window "
                         f"{kernel_size}; use a smaller kernel_size")


def _ssim_and_cs(x, y, data_range, kernel_size, sigma, k1, k2, means: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel SSIM and contrast-sensitivity maps on the valid region, [B, C, *valid]; with ``means`` their
    averages per case and channel [B, C] (on a CPU without autograd the maps are then never held whole)."""
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    # one offset per case and channel: the mean of both images
    offset = ((x.flatten(2).mean(2) + y.flatten(2).mean(2)) / 2).detach()
    if x.is_cuda:  # all cases, contrasts and statistics in one tensor: one grouped convolution per axis
        channels = x.shape[1]
        off = offset.view(*offset.shape, *([1] * (x.ndim - 2)))
        x, y = x - off, y - off
        windows = [gaussian_window(k, s, dtype, x.device) for k, s in zip(kernel_size, sigma)]
        stats = _conv_blur(torch.cat([x, y, torch.addcmul(x * x, y, y), x * y], dim=1), windows)
        return _averaged(_combine(*stats.split(channels, dim=1), c1, c2, off), means)
    taps = [gaussian_window(k, s, torch.float64).tolist() for k, s in zip(kernel_size, sigma)]
    halo = kernel_size[0] - 1
    rows_out = x.shape[2] - halo
    per_row = max(1, x[0, 0, 0].numel())
    step = max(1, min(rows_out, _SLAB_VOXELS // per_row - halo))
    valid = (*x.shape[:2], rows_out, *(s - k + 1 for s, k in zip(x.shape[3:], kernel_size[1:])))
    if x.requires_grad or y.requires_grad:
        return _averaged(_ssim_and_cs_autograd(x, y, offset, taps, step, halo, valid, c1, c2), means)
    scratch = _Scratch(x)
    if means:
        sums = torch.zeros(2, *x.shape[:2], dtype=torch.float64)
    else:
        ssim_out, cs_out = x.new_empty(valid), x.new_empty(valid)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            off = float(offset[b, c])
            for r0 in range(0, rows_out, step):
                r1 = min(r0 + step, rows_out)
                xs = torch.sub(x[b, c, r0:r1 + halo], off, out=scratch("x", (r1 + halo - r0, *x.shape[3:])))
                ys = torch.sub(y[b, c, r0:r1 + halo], off, out=scratch("y", xs.shape))
                squares = torch.mul(xs, xs, out=scratch("squares", xs.shape)).addcmul_(ys, ys)
                products = torch.mul(xs, ys, out=scratch("products", xs.shape))
                stats = [_filter(stat, taps, scratch, f"mu{i}")
                         for i, stat in enumerate((xs, ys, squares, products))]
                if means:
                    s_map, cs_map = scratch("ssim", stats[0].shape), scratch("cs", stats[0].shape)
                else:
                    s_map, cs_map = ssim_out[b, c, r0:r1], cs_out[b, c, r0:r1]
                _combine_into(*stats, c1, c2, off, s_map, cs_map)
                if means:
                    sums[0, b, c] += float(s_map.sum())  # float32 sums are pairwise: exact enough
                    sums[1, b, c] += float(cs_map.sum())
    if means:
        means_ssim, means_cs = (sums / math.prod(valid[2:])).to(x.dtype)
        return means_ssim, means_cs
    return ssim_out, cs_out


def _averaged(maps: tuple[torch.Tensor, torch.Tensor], means: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(m.flatten(2).mean(2) for m in maps) if means else maps


class _Scratch:
    """Reused flat buffers, one per name: without them every slab and pass allocates (and the OS zero-fills)
    fresh megabytes, which costs as much as the filtering itself."""

    def __init__(self, like: torch.Tensor):
        self.like, self.store = like, {}

    def __call__(self, name: str, shape) -> torch.Tensor:
        size = math.prod(shape)
        flat = self.store.get(name)
        if flat is None or flat.numel() < size:
            flat = self.store[name] = self.like.new_empty(size)
        return flat[:size].view(shape)


def _filter(stat: torch.Tensor, taps, scratch: _Scratch | None = None, name: str = "") -> torch.Tensor:
    """Valid separable filtering of one slab [R, *S], innermost axis first (the slab shrinks); the last pass
    writes into the buffer ``name``, the others into buffers shared by every statistic."""
    for axis in range(stat.ndim - 1, -1, -1):
        out = None
        if scratch is not None:
            shape = list(stat.shape)
            shape[axis] -= len(taps[axis]) - 1
            out = scratch(name if axis == 0 else f"pass{axis}", shape)
        stat = _shift_sum(stat, axis, taps[axis], out)
    return stat


def _combine_into(mu_x, mu_y, mu_sq, mu_xy, c1: float, c2: float, offset: float, ssim_out, cs_out) -> None:
    """``_combine`` in place (no autograd), writing SSIM and CS into the given output views."""
    mu_sq.addcmul_(mu_x, mu_x, value=-1).addcmul_(mu_y, mu_y, value=-1).add_(c2)  # variances + c2
    mu_xy.addcmul_(mu_x, mu_y, value=-1).mul_(2).add_(c2)  # 2 covariance + c2
    torch.div(mu_xy, mu_sq, out=cs_out)
    mu_x.add_(offset)
    mu_y.add_(offset)
    torch.mul(mu_x, mu_y, out=mu_xy).mul_(2).add_(c1)  # luminance numerator
    mu_x.mul_(mu_x).addcmul_(mu_y, mu_y).add_(c1)  # luminance denominator
    torch.div(mu_xy, mu_x, out=ssim_out).mul_(cs_out)


def _ssim_and_cs_autograd(x, y, offset, taps, step, halo, valid, c1, c2) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path for losses: the same slabs with fresh tensors, so autograd can trace every step."""
    rows_out = valid[2]
    ssim_rows, cs_rows = [], []
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            ssim_parts, cs_parts = [], []
            for r0 in range(0, rows_out, step):
                r1 = min(r0 + step, rows_out)
                off = offset[b, c]
                xs, ys = x[b, c, r0:r1 + halo] - off, y[b, c, r0:r1 + halo] - off
                stats = [_filter(stat, taps) for stat in (xs, ys, torch.addcmul(xs * xs, ys, ys), xs * ys)]
                s_map, cs_map = _combine(*stats, c1, c2, off)
                ssim_parts.append(s_map)
                cs_parts.append(cs_map)
            ssim_rows.append(torch.cat(ssim_parts))
            cs_rows.append(torch.cat(cs_parts))
    return torch.stack(ssim_rows).view(valid), torch.stack(cs_rows).view(valid)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, kernel_size: int | Sequence[int] = 11,
             sigma: float | Sequence[float] = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-voxel SSIM [B, C, *valid]: each side shorter by kernel_size - 1 (half a window at each border)."""
    dims = x.ndim - 2
    kernel_size, sigma = _per_axis(kernel_size, dims, "kernel_size"), _per_axis(sigma, dims, "sigma")
    _check_pair(x, y, kernel_size)
    return _ssim_and_cs(x, y, data_range, kernel_size, sigma, k1, k2)[0]


def crop_valid(t: torch.Tensor, kernel_size: int | Sequence[int] = 11) -> torch.Tensor:
    """Crop a full-size tensor [B, C, *S] (e.g. a region mask) to the valid region of ``ssim_map``."""
    dims = t.ndim - 2
    for axis, k in enumerate(_per_axis(kernel_size, dims, "kernel_size")):
        t = t.narrow(axis + 2, k // 2, t.shape[axis + 2] - (k - 1))
    return t


def _reduce(per_channel: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "channel":
        return per_channel
    if reduction == "none":
        return per_channel.mean(1)
    if reduction == "mean":
        return per_channel.mean()
    raise ValueError(f"reduction must be 'mean', 'none' (per sample) or 'channel' (per sample and channel), "
                     f"got {reduction!r}")


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, kernel_size: int | Sequence[int] = 11,
         sigma: float | Sequence[float] = 1.5, k1: float = 0.01, k2: float = 0.03, reduction: str = "mean",
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean SSIM: a scalar ("mean"), per sample [B] ("none", averaged over channels) or [B, C] ("channel").

    ``mask`` (boolean, [B, 1 or C, *S] at full size) averages the whole-image SSIM map over the mask voxels
    that lie in the valid region, so a region's score sees the real image around it (no artificial edge);
    a sample/channel whose mask has no valid voxel gives NaN.
    """
    dims = x.ndim - 2
    kernel_size, sigma = _per_axis(kernel_size, dims, "kernel_size"), _per_axis(sigma, dims, "sigma")
    _check_pair(x, y, kernel_size)
    if mask is None:
        per_channel = _ssim_and_cs(x, y, data_range, kernel_size, sigma, k1, k2, means=True)[0]
    else:
        smap = _ssim_and_cs(x, y, data_range, kernel_size, sigma, k1, k2)[0]
        if mask.ndim != x.ndim or mask.shape[2:] != x.shape[2:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match images {tuple(x.shape)}")
        m = crop_valid(mask.to(torch.bool), kernel_size)
        m = m.expand_as(smap).to(smap.dtype)
        per_channel = (smap * m).flatten(2).sum(2) / m.flatten(2).sum(2)
    return _reduce(per_channel, reduction)


def _halve(x: torch.Tensor) -> torch.Tensor:
    """2x average pooling of every spatial axis (``avg_pool`` with kernel 2: an odd last voxel is dropped) as
    sums of strided views, about 3x faster than PyTorch's CPU ``avg_pool3d``."""
    for axis in range(2, x.ndim):
        even = x.narrow(axis, 0, x.shape[axis] // 2 * 2)
        pick = [slice(None)] * x.ndim
        pick[axis] = slice(0, None, 2)
        first = even[tuple(pick)]
        pick[axis] = slice(1, None, 2)
        x = first + even[tuple(pick)]
    return x.mul_(0.5 ** (x.ndim - 2))


def ms_ssim_min_size(kernel_size: int = 11, n_scales: int = 5) -> int:
    """Smallest side MONAI accepts for MS-SSIM: side // (n_scales - 1)^2 must exceed kernel_size - 1."""
    return kernel_size * max(1, n_scales - 1) ** 2


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, kernel_size: int | Sequence[int] = 11,
            sigma: float | Sequence[float] = 1.5, weights: Sequence[float] = MS_SSIM_WEIGHTS, k1: float = 0.01,
            k2: float = 0.03, reduction: str = "mean") -> torch.Tensor:
    """MS-SSIM (Wang et al. 2003) as MONAI computes it: one scale per weight, 2x average pooling between.

    Per scale the contrast term is averaged over voxels and channels ("none"/"mean"; per channel with
    "channel") and clipped at 0; the last scale uses the full SSIM. Same size check as MONAI: every side
    must be at least ``ms_ssim_min_size`` (176 at the defaults).
    """
    dims = x.ndim - 2
    kernel_size, sigma = _per_axis(kernel_size, dims, "kernel_size"), _per_axis(sigma, dims, "sigma")
    _check_pair(x, y, kernel_size)
    div = max(1, len(weights) - 1) ** 2
    for side, k in zip(x.shape[2:], kernel_size):
        if side // div <= k - 1:
            raise ValueError(f"MS-SSIM with {len(weights)} scales and a {k}-voxel window needs every side >= "
                             f"{k * div}, got spatial shape {tuple(x.shape[2:])}: use fewer scales "
                             f"or a smaller window")
    if reduction not in ("mean", "none", "channel"):
        _reduce(x, reduction)  # raises the message
    per_channel = reduction == "channel"
    w = torch.as_tensor(weights, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype, device=x.device)
    terms = []
    for scale in range(len(weights)):
        s, cs = _ssim_and_cs(x, y, data_range, kernel_size, sigma, k1, k2, means=True)
        value = s if scale == len(weights) - 1 else cs
        value = value if per_channel else value.mean(1)  # every channel has the same number of voxels
        terms.append(torch.relu(value))
        if scale < len(weights) - 1:
            x, y = _halve(x), _halve(y)
    stacked = torch.stack(terms)  # [scales, B] or [scales, B, C]
    value = torch.prod(stacked ** w.view(-1, *([1] * (stacked.ndim - 1))), dim=0)
    if reduction == "mean":
        return value.mean()
    return value
