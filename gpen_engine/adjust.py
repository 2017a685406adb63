"""The preset knobs, as batched torch functions on aligned face crops.

Every function takes crops shaped (N, 3, S, S), RGB in [0, 1], on any device and of any floating dtype
(the arithmetic runs in float32 and the result is cast back), and returns a tensor of the same shape,
dtype and device. Masks are (N, 1, S, S) in [0, 1]. Amounts are percentages, 0-100; an amount of 0
returns the input tensor itself, so "off" is exactly off. Any memory format (channels-last too) works.

Cost: the knobs run once per generator batch, so they are written to stay small next to it: blurs are
sums of shifted slices, colour statistics are moments of RGB (YCbCr being linear in it), kernel taps,
the template ellipse and the colour matrices are cached per size or device, and no device value is
read back to the host.

Spatial constants are given for a 512 px crop and scale with S, so a knob means the same thing for
the 256, 512 and 1024 models (the crop covers the same part of the face at every size).

Order in the engine: ``denoise`` -> generator -> ``soften_small`` -> ``restore_detail`` -> ``sharpen``
-> ``protect_skin`` -> ``blend`` (strength) -> paste back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# BT.601 full-range YCbCr, the space the skin statistics live in: luma and two colour differences.
# Kept as plain numbers; device tensors come from _colour_matrices, cached per device.
_RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_CHROMA_OFFSET = (0.0, 0.5, 0.5)  # added to Y, Cb, Cr

# Skin chroma box (Chai & Ngan 1999), in [0, 1] units: Cb in [77, 127] / 255, Cr in [133, 173] / 255.
_SKIN_CB = (77 / 255, 127 / 255)
_SKIN_CR = (133 / 255, 173 / 255)
# The central face area of a GPEN-aligned crop (template at 512: eyes y~242, mouth y~366, x 202..309):
# cheeks to cheeks and brows to chin, as fractions of S.
_FACE_CENTRE = (0.5, 0.585)
_FACE_SEMI_AXES = (0.21, 0.25)

_DENOISE_MAX_SIGMA = 0.08  # noise std (in [0, 1] units) treated as noise at denoise 100 (~20/255)
_MIN_SIGMA = 0.5  # px: a narrower Gaussian is numerically the identity, on crops smaller than 256
_SHARPEN_SIGMA = 1.0  # px at 512: the band unsharp masking boosts
_DETAIL_SIGMA = 2.0  # px at 512: "detail" is the luma band finer than this
_DETAIL_CARRIER_SIGMA = 6.0  # px at 512: the correction's high-pass (see restore_detail)
_DETAIL_ENERGY_SIGMA = 6.0  # px at 512: neighbourhood over which detail energy is compared
_SKIN_STD_RATIO = (0.5, 2.0)  # the skin contrast change protect_skin may apply, at most
_MIN_SKIN_WEIGHT = 16.0  # pixels of skin below which a face's statistics are meaningless
SMALL_FACE_PX = 100  # the official rule: faces smaller than this get a 3x3 blur after restoration


def denoise(crops: torch.Tensor, amount: float) -> torch.Tensor:
    """Edge-preserving denoise of the face crop before restoration.

    A self-guided filter (He et al., guided image filtering) per channel, box radius S/256 px,
    regularisation eps = (0.08 * amount/100)^2. Where the local standard deviation is well below
    sigma = 0.08 * amount/100 (about 20/255 at 100) the pixel goes to its local mean (noise is
    averaged out); where it is well above (edges, eyes, hair) the pixel is kept. 0 = identity.
    """
    fraction = _fraction(amount, "denoise")
    if fraction == 0.0:
        return crops
    x = crops.float()
    taps = _box_taps(max(1, round(x.shape[-1] / 256)))
    eps = (_DENOISE_MAX_SIGMA * fraction) ** 2
    mean = _separable(x, taps)
    var = _separable(x * x, taps).sub_(mean * mean).clamp_min_(0.0)
    gain = var.div_(var + eps)  # var's storage is reused: it is not needed after this
    offset = mean.addcmul_(gain, mean, value=-1.0)  # mean - gain * mean, in mean's storage
    out = torch.addcmul(_separable(offset, taps), _separable(gain, taps), x)
    return out.clamp_(0.0, 1.0).to(crops.dtype)


def sharpen(crops: torch.Tensor, amount: float) -> torch.Tensor:
    """Unsharp mask on the restored face: ``x + (amount/100) * (x - G_sigma(x))``, clamped to [0, 1].

    sigma = 1 px at 512 (S/512 px): at 100 the band finer than ~1 px is doubled. 0 = identity.
    """
    fraction = _fraction(amount, "sharpen")
    if fraction == 0.0:
        return crops
    x = crops.float()
    blurred = gaussian_blur(x, max(_MIN_SIGMA, _SHARPEN_SIGMA * x.shape[-1] / 512))
    # blurred + (1 + f) * (x - blurred) == x + f * (x - blurred), in one pass
    return torch.lerp(blurred, x, 1.0 + fraction).clamp_(0.0, 1.0).to(crops.dtype)


def blend(
    restored: torch.Tensor, original: torch.Tensor, strength: float | torch.Tensor
) -> torch.Tensor:
    """``strength`` percent restored face, the rest original face (per pixel, linear).

    0 returns ``original`` and 100 returns ``restored`` exactly. ``strength`` may be one number or
    a (N,) tensor with one value per face.
    """
    _check_pair(restored, original)
    if not isinstance(strength, torch.Tensor):
        fraction = _fraction(strength, "strength")
        if fraction == 0.0:
            return original
        if fraction == 1.0:
            return restored
        weight: torch.Tensor | float = fraction
    else:
        if strength.numel() != restored.shape[0] or bool(((strength < 0) | (strength > 100)).any()):
            raise ValueError("strength must hold one value in 0..100 per face")
        weight = (strength.float() / 100.0).to(restored.device).view(-1, 1, 1, 1)
    out = torch.lerp(original.float(), restored.float(), weight)
    return out.to(restored.dtype)


def protect_skin(
    restored: torch.Tensor, original: torch.Tensor, skin_mask: torch.Tensor
) -> torch.Tensor:
    """Give the restored face's skin the original's colour statistics, so it does not turn waxy or shift hue.

    In YCbCr (BT.601), per face and channel, the restored skin's mean and standard deviation
    (weighted by ``skin_mask``) are moved to the original's: ``(v - mu_r) * s_o / s_r + mu_o``, with
    the contrast ratio s_o / s_r limited to [0.5, 2]. The result replaces the restored face in
    proportion to the mask; pixels outside it are untouched. Faces with less than 16 px of skin are
    returned unchanged. ``skin_mask`` comes from the parsing model (skin classes) or
    :func:`default_skin_mask` on the original crops.
    """
    _check_pair(restored, original)
    if skin_mask.shape != (restored.shape[0], 1, *restored.shape[2:]):
        raise ValueError(f"skin_mask must be (N, 1, S, S), got {tuple(skin_mask.shape)}")
    # YCbCr is linear in RGB, so the statistics come from RGB's weighted means and covariances and the
    # per-face move (scale and shift in YCbCr) folds into one 3x3 matrix and offset applied in RGB:
    # no YCbCr image is ever built, and pixels with zero weight keep their exact value.
    n, _, height, width = restored.shape
    to_ycc, to_rgb = _colour_matrices(restored.device)
    # contiguous: the reductions then sum in the same order for every memory format (same output)
    rgb_r = restored.float().contiguous().view(n, 3, height * width)
    rgb_o = original.float().contiguous().view(n, 3, height * width)
    weight = skin_mask.float().contiguous().view(n, 1, height * width)
    total = weight.sum(dim=2, keepdim=True)  # (N, 1, 1)
    usable = total > _MIN_SKIN_WEIGHT
    total = total.clamp_min(1e-6)
    mean_r, cov_r = _weighted_moments(rgb_r, weight, total)
    mean_o, cov_o = _weighted_moments(rgb_o, weight, total)
    std_r = torch.einsum("kc,ncd,kd->nk", to_ycc, cov_r, to_ycc).clamp_min(0.0).sqrt()
    std_o = torch.einsum("kc,ncd,kd->nk", to_ycc, cov_o, to_ycc).clamp_min(0.0).sqrt()
    ratio = (std_o / std_r.clamp_min(1e-4)).clamp(*_SKIN_STD_RATIO)  # (N, 3), per YCbCr channel
    # moved - ycc_r = (ratio - 1) * ycc_r + mean_o - ratio * mean_r; back in RGB that is A @ rgb + c:
    matrix = to_rgb @ ((ratio - 1.0).unsqueeze(2) * to_ycc)  # (N, 3, 3)
    shift = mean_o - to_rgb @ (ratio.unsqueeze(2) * (to_ycc @ mean_r))  # (N, 3, 1)
    matrix, shift = matrix * usable, shift * usable  # unusable faces: a zero move
    out = torch.addcmul(rgb_r, weight, torch.baddbmm(shift, matrix, rgb_r))
    return out.clamp_(0.0, 1.0).view(n, 3, height, width).to(restored.dtype)


def default_skin_mask(crops: torch.Tensor) -> torch.Tensor:
    """A skin mask for aligned crops when no parsing model is available; call it on the original crops.

    The central face ellipse of the GPEN template (centre (0.5, 0.585)·S, semi-axes (0.21, 0.25)·S)
    intersected with the classic skin chroma box (Cb 77-127, Cr 133-173 of 255), softened by a
    Gaussian of S/256 px. Gray faces have no skin chroma and get an empty mask.
    """
    x = crops.float()
    height, width = x.shape[-2:]
    to_ycc, _ = _colour_matrices(x.device)
    # Only Cb and Cr are needed; the offset is added (not folded into the bounds) so a pixel on a
    # bound is classified exactly as the full conversion would.
    chroma = torch.einsum("kc,nchw->nkhw", to_ycc[1:], x).add_(_CHROMA_OFFSET[1])
    cb, cr = chroma[:, 0:1], chroma[:, 1:2]
    skin = (cb >= _SKIN_CB[0]) & (cb <= _SKIN_CB[1]) & (cr >= _SKIN_CR[0]) & (cr <= _SKIN_CR[1])
    mask = skin & _face_ellipse(height, width, x.device)
    mask = gaussian_blur(mask.float(), max(0.5, width / 256))
    return mask.clamp_(0.0, 1.0).to(crops.dtype)


def restore_detail(restored: torch.Tensor, original: torch.Tensor, amount: float) -> torch.Tensor:
    """Bring back the original's fine texture where the generator smoothed it away.

    Definition: the *detail band* of a crop is its luma minus the luma blurred with a Gaussian of
    sigma = 2 px at 512 (:func:`detail_band`: pores, hair strands, eyelashes); its local *energy* is
    the band squared, averaged over a Gaussian neighbourhood of 6 px at 512. Where the original has
    more detail energy than the restored face (E_o > E_r), the output's detail band is moved from the
    restored one towards the original one by ``amount/100 * (1 - E_r/E_o)``; where the generator
    already has as much detail or more (a blurry, low-resolution original), nothing changes, so small
    faces keep their restoration. Only luma changes (the same offset goes to R, G and B).

    The correction added is the luma difference original - restored high-passed at 3x the band's
    sigma (6 px at 512), not at the band's own sigma: a Gaussian high-pass applied twice is weaker
    than once, so a correction cut to the band itself would land in it only partly.

    Measurable: the correlation between the output's and the original's detail bands rises with
    ``amount`` and nears 1 at 100 where the generator lost detail. 0 = identity.
    """
    _check_pair(restored, original)
    fraction = _fraction(amount, "detail")
    if fraction == 0.0:
        return restored
    scale = restored.shape[-1] / 512
    x = restored.float()
    luma = torch.cat((_luma(x), _luma(original.float())), dim=1)  # (N, 2, S, S): restored, original
    bands = _high_pass(luma, max(_MIN_SIGMA, _DETAIL_SIGMA * scale))
    energy = gaussian_blur(bands.mul_(bands), _DETAIL_ENERGY_SIGMA * scale)
    energy_r, energy_o = energy[:, 0:1], energy[:, 1:2]
    lost = energy_r.div_(energy_o.clamp_min(1e-8)).neg_().add_(1.0).clamp_(0.0, 1.0)
    difference = luma[:, 1:2] - luma[:, 0:1]
    correction = _high_pass(difference, max(_MIN_SIGMA, _DETAIL_CARRIER_SIGMA * scale))
    out = torch.addcmul(x, lost, correction, value=fraction)  # one luma offset for R, G and B
    return out.clamp_(0.0, 1.0).to(restored.dtype)


def detail_band(crops: torch.Tensor) -> torch.Tensor:
    """The luma detail band of :func:`restore_detail`: Y - G_sigma(Y), sigma = 2 px at 512; (N, 1, S, S)."""
    return _high_pass(_luma(crops.float()), max(_MIN_SIGMA, _DETAIL_SIGMA * crops.shape[-1] / 512))


def soften_small(
    restored: torch.Tensor, face_sizes: Sequence[float] | torch.Tensor, min_size: float = SMALL_FACE_PX
) -> torch.Tensor:
    """The official rule for tiny faces: a 3x3 binomial blur ([1, 2, 1] / 4 each way) after restoration.

    Faces whose smaller box side in the source image (``Face.min_side``, px; GPEN's ``min(fh, fw)``)
    is below ``min_size`` are blurred;
    the generator's detail would be aliased noise once such a face is shrunk back into the photo.
    """
    sizes = torch.as_tensor(face_sizes, dtype=torch.float32).flatten()
    if sizes.numel() != restored.shape[0]:
        raise ValueError(f"need one face size per crop: {sizes.numel()} sizes, {restored.shape[0]} crops")
    # Decided on the host (sizes are host numbers) and applied to runs of consecutive small faces by
    # slicing: no index tensor is copied to the device and no device value is waited for.
    small = (sizes.cpu() < min_size).tolist()
    runs = _runs(small)
    if not runs:
        return restored
    x = restored.float()
    if runs == [(0, len(small))]:
        return _separable(x, _BINOMIAL_3).to(restored.dtype)
    out = x.clone()  # x may be the caller's own tensor
    for start, stop in runs:
        out[start:stop] = _separable(x[start:stop], _BINOMIAL_3)
    return out.to(restored.dtype)


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, stop) of each run of consecutive True flags."""
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        elif flag:
            runs.append((i, i + 1))
    return runs


# ------------------------------------------------------------------------------------- helpers


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel (radius 3 sigma, edges replicated); x is (N, C, H, W) float."""
    if sigma <= 0:
        return x
    return _separable(x, _gaussian_taps(float(sigma)))


_BINOMIAL_3 = (0.25, 0.5, 0.25)


@functools.lru_cache(maxsize=32)
def _gaussian_taps(sigma: float) -> tuple[float, ...]:
    radius = max(1, math.ceil(3.0 * sigma))
    weights = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = sum(weights)
    return tuple(w / total for w in weights)


@functools.lru_cache(maxsize=8)
def _box_taps(radius: int) -> tuple[float, ...]:
    return (1.0 / (2 * radius + 1),) * (2 * radius + 1)


def _separable(x: torch.Tensor, taps: tuple[float, ...]) -> torch.Tensor:
    """Correlate every channel with ``taps`` along W, then along H; edges replicated.

    Written as a sum of shifted slices: for the short kernels used here this is several times faster
    on the CPU than a depthwise convolution, needs no kernel tensor on the device, and works for any
    memory format. The result is a new tensor (never ``x``).
    """
    radius = len(taps) // 2
    height, width = x.shape[-2:]
    padded = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    rows = padded[..., 0:width] * taps[0]
    for i in range(1, len(taps)):
        rows.add_(padded[..., i : i + width], alpha=taps[i])
    padded = F.pad(rows, (0, 0, radius, radius), mode="replicate")
    out = padded[..., 0:height, :] * taps[0]
    for i in range(1, len(taps)):
        out.add_(padded[..., i : i + height, :], alpha=taps[i])
    return out


def _high_pass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x - G_sigma(x)``, as a new tensor."""
    return gaussian_blur(x, sigma).neg_().add_(x)


@functools.lru_cache(maxsize=8)
def _face_ellipse(height: int, width: int, device: torch.device) -> torch.Tensor:
    """The template's central face area as a (1, 1, H, W) bool map (read-only: it is shared)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    dy = (ys[:, None] - _FACE_CENTRE[1]) / _FACE_SEMI_AXES[1]
    dx = (xs[None, :] - _FACE_CENTRE[0]) / _FACE_SEMI_AXES[0]
    return (dx * dx + dy * dy <= 1.0).view(1, 1, height, width)


@functools.lru_cache(maxsize=8)
def _colour_matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB -> YCbCr (offset left out) and its inverse as float32 on ``device`` (read-only: shared)."""
    forward = torch.tensor(_RGB_TO_YCBCR, dtype=torch.float32)
    inverse = torch.tensor(_invert_3x3(_RGB_TO_YCBCR), dtype=torch.float32)
    return forward.to(device), inverse.to(device)


def _invert_3x3(m: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    # Cofactors in Python floats: exact enough, and no float64 kernel on a device that lacks one.
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return (
        ((e * i - f * h) / det, (c * h - b * i) / det, (b * f - c * e) / det),
        ((f * g - d * i) / det, (a * i - c * g) / det, (c * d - a * f) / det),
        ((d * h - e * g) / det, (b * g - a * h) / det, (a * e - b * d) / det),
    )


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    to_ycc, _ = _colour_matrices(rgb.device)
    return torch.einsum("c,nchw->nhw", to_ycc[0], rgb).unsqueeze(1)


def _weighted_moments(
    values: torch.Tensor, weight: torch.Tensor, total: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean (N, C, 1) and covariance (N, C, C) of values (N, C, P) under weight (N, 1, P).

    Two passes (centre, then second moments) rather than E[v v^T] - mu mu^T: the skin's variance is
    tiny next to its squared mean, and float32 would lose it to cancellation.
    """
    mean = torch.bmm(values, weight.transpose(1, 2)) / total
    centred = values - mean
    cov = torch.bmm(centred * weight, centred.transpose(1, 2)) / total
    return mean, cov


def _fraction(amount: float, name: str) -> float:
    value = float(amount)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be within 0..100, got {amount}")
    return value / 100.0


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"restored and original crops differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
