"""The preset knobs, as batched torch functions on aligned face crops.

Every function takes crops shaped (N, 3, S, S), RGB in [0, 1], on any device and of any floating dtype
(the arithmetic runs in float32 and the result is cast back), and returns a tensor of the same shape,
dtype and device. Masks are (N, 1, S, S) in [0, 1]. Amounts are percentages, 0-100; an amount of 0
returns the input tensor itself, so "off" is exactly off.

Spatial constants are given for a 512 px crop and scale with S, so a knob means the same thing for
the 256, 512 and 1024 models (the crop covers the same part of the face at every size).

Order in the engine: ``denoise`` -> generator -> ``soften_small`` -> ``restore_detail`` -> ``sharpen``
-> ``protect_skin`` -> ``blend`` (strength) -> paste back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# BT.601 full-range YCbCr, the space the skin statistics live in: luma and two colour differences.
_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_CHROMA_OFFSET = torch.tensor([0.0, 0.5, 0.5])

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
    radius = max(1, round(x.shape[-1] / 256))
    eps = (_DENOISE_MAX_SIGMA * fraction) ** 2
    mean = _box(x, radius)
    var = (_box(x * x, radius) - mean * mean).clamp_min(0.0)
    gain = var / (var + eps)
    offset = mean - gain * mean
    out = _box(gain, radius) * x + _box(offset, radius)
    return out.clamp(0.0, 1.0).to(crops.dtype)


def sharpen(crops: torch.Tensor, amount: float) -> torch.Tensor:
    """Unsharp mask on the restored face: ``x + (amount/100) * (x - G_sigma(x))``, clamped to [0, 1].

    sigma = 1 px at 512 (S/512 px): at 100 the band finer than ~1 px is doubled. 0 = identity.
    """
    fraction = _fraction(amount, "sharpen")
    if fraction == 0.0:
        return crops
    x = crops.float()
    blurred = gaussian_blur(x, max(_MIN_SIGMA, _SHARPEN_SIGMA * x.shape[-1] / 512))
    return (x + fraction * (x - blurred)).clamp(0.0, 1.0).to(crops.dtype)


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
    weight = skin_mask.float()
    total = weight.sum(dim=(2, 3), keepdim=True)
    usable = total > _MIN_SKIN_WEIGHT
    total = total.clamp_min(1e-6)
    ycc_r = _to_ycbcr(restored.float())
    ycc_o = _to_ycbcr(original.float())
    mean_r, std_r = _weighted_stats(ycc_r, weight, total)
    mean_o, std_o = _weighted_stats(ycc_o, weight, total)
    ratio = (std_o / std_r.clamp_min(1e-4)).clamp(*_SKIN_STD_RATIO)
    moved = (ycc_r - mean_r) * ratio + mean_o
    mixed = ycc_r + (weight * usable) * (moved - ycc_r)
    return _from_ycbcr(mixed).clamp(0.0, 1.0).to(restored.dtype)


def default_skin_mask(crops: torch.Tensor) -> torch.Tensor:
    """A skin mask for aligned crops when no parsing model is available; call it on the original crops.

    The central face ellipse of the GPEN template (centre (0.5, 0.585)·S, semi-axes (0.21, 0.25)·S)
    intersected with the classic skin chroma box (Cb 77-127, Cr 133-173 of 255), softened by a
    Gaussian of S/256 px. Gray faces have no skin chroma and get an empty mask.
    """
    x = crops.float()
    n, _, height, width = x.shape
    ys = (torch.arange(height, device=x.device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=x.device, dtype=torch.float32) + 0.5) / width
    dy = (ys[:, None] - _FACE_CENTRE[1]) / _FACE_SEMI_AXES[1]
    dx = (xs[None, :] - _FACE_CENTRE[0]) / _FACE_SEMI_AXES[0]
    ellipse = (dx * dx + dy * dy <= 1.0).float()
    ycc = _to_ycbcr(x)
    cb, cr = ycc[:, 1:2], ycc[:, 2:3]
    chroma = (cb >= _SKIN_CB[0]) & (cb <= _SKIN_CB[1]) & (cr >= _SKIN_CR[0]) & (cr <= _SKIN_CR[1])
    mask = chroma.float() * ellipse.expand(n, 1, height, width)
    mask = gaussian_blur(mask, max(0.5, width / 256))
    return mask.clamp(0.0, 1.0).to(crops.dtype)


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
    band_r = detail_band(restored)
    band_o = detail_band(original)
    energy_sigma = _DETAIL_ENERGY_SIGMA * scale
    energy_r = gaussian_blur(band_r * band_r, energy_sigma)
    energy_o = gaussian_blur(band_o * band_o, energy_sigma)
    lost = (1.0 - energy_r / energy_o.clamp_min(1e-8)).clamp(0.0, 1.0)
    carrier = max(_MIN_SIGMA, _DETAIL_CARRIER_SIGMA * scale)
    difference = _luma(original.float()) - _luma(restored.float())
    correction = difference - gaussian_blur(difference, carrier)
    return (restored.float() + fraction * lost * correction).clamp(0.0, 1.0).to(restored.dtype)


def detail_band(crops: torch.Tensor) -> torch.Tensor:
    """The luma detail band of :func:`restore_detail`: Y - G_sigma(Y), sigma = 2 px at 512; (N, 1, S, S)."""
    luma = _luma(crops.float())
    return luma - gaussian_blur(luma, max(_MIN_SIGMA, _DETAIL_SIGMA * crops.shape[-1] / 512))


def soften_small(
    restored: torch.Tensor, face_sizes: Sequence[float] | torch.Tensor, min_size: float = SMALL_FACE_PX
) -> torch.Tensor:
    """The official rule for tiny faces: a 3x3 binomial blur ([1, 2, 1] / 4 each way) after restoration.

    Faces whose size in the source image (``Face.size``, px) is below ``min_size`` are blurred;
    the generator's detail would be aliased noise once such a face is shrunk back into the photo.
    """
    sizes = torch.as_tensor(face_sizes, dtype=torch.float32).flatten()
    if sizes.numel() != restored.shape[0]:
        raise ValueError(f"need one face size per crop: {sizes.numel()} sizes, {restored.shape[0]} crops")
    small = sizes < min_size
    if not bool(small.any()):
        return restored
    x = restored.float()
    taps = torch.tensor([0.25, 0.5, 0.25], device=x.device)
    blurred = _separable(x, taps)
    pick = small.to(x.device).view(-1, 1, 1, 1)
    return torch.where(pick, blurred, x).to(restored.dtype)


# ------------------------------------------------------------------------------------- helpers


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel (radius 3 sigma, edges replicated); x is (N, C, H, W) float."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3.0 * sigma))
    positions = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    taps = torch.exp(-0.5 * (positions / sigma) ** 2)
    return _separable(x, taps / taps.sum())


def _separable(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    radius = taps.numel() // 2
    kernel_x = taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1).to(x.dtype)
    kernel_y = taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1).to(x.dtype)
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel_x, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel_y, groups=channels)


def _box(x: torch.Tensor, radius: int) -> torch.Tensor:
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.avg_pool2d(padded, kernel_size=2 * radius + 1, stride=1)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return torch.einsum("c,nchw->nhw", _RGB_TO_YCBCR[0].to(rgb.device), rgb).unsqueeze(1)


def _to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    matrix = _RGB_TO_YCBCR.to(rgb.device)
    return torch.einsum("kc,nchw->nkhw", matrix, rgb) + _CHROMA_OFFSET.to(rgb.device).view(1, 3, 1, 1)


def _from_ycbcr(ycc: torch.Tensor) -> torch.Tensor:
    matrix = torch.linalg.inv(_RGB_TO_YCBCR.double()).float().to(ycc.device)
    centred = ycc - _CHROMA_OFFSET.to(ycc.device).view(1, 3, 1, 1)
    return torch.einsum("ck,nkhw->nchw", matrix, centred)


def _weighted_stats(
    values: torch.Tensor, weight: torch.Tensor, total: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mean = (values * weight).sum(dim=(2, 3), keepdim=True) / total
    var = (((values - mean) ** 2) * weight).sum(dim=(2, 3), keepdim=True) / total
    return mean, var.clamp_min(0.0).sqrt()


def _fraction(amount: float, name: str) -> float:
    value = float(amount)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be within 0..100, got {amount}")
    return value / 100.0


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"restored and original crops differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
