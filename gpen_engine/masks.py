"""Paste-back masks in crop space: GPEN's blurred rectangle, or a face-parsing mask.

GPEN works out its masks at 512 px whatever the model size: a filled rectangle 26..486, or the
parsing model's face classes with a 26 px border cleared, each blurred twice by a 101x101
Gaussian with sigma 4 (OpenCV's default reflect-101 border), then resized to the crop size.
Both are done here the same way, on the device, batched; the blur runs as two 1-D passes.

Parsing classes (the 19 of CelebAMask-HQ as GPEN's face parser numbers them): 0 background,
1 skin, 2 nose, 3 eyeglasses, 4/5 eyes, 6/7 brows, 8/9 ears, 10 mouth, 11/12 lips, 13 hair,
14 hat, 15 earring, 16 necklace, 17 neck, 18 cloth. GPEN pastes every class except background,
hat and cloth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_into

MASK_SIZE = 512  # GPEN builds its masks at this size for every model size
BORDER = 26  # rectangle 26..486 at 512; parsing masks lose a 26 px border
BLUR_KSIZE, BLUR_SIGMA = 101, 4.0
FACE_CLASSES = tuple(c for c in range(19) if c not in (0, 14, 18))  # all but background, hat, cloth
SKIN_CLASSES = (1, 2)  # skin and nose: the bare skin whose colour skin protection keeps


def gaussian_taps(ksize: int = BLUR_KSIZE, sigma: float = BLUR_SIGMA) -> Tensor:
    """1-D Gaussian weights as OpenCV's ``getGaussianKernel`` makes them, minus negligible tails.

    With sigma 4 the taps more than 24 px from the centre are each below 1e-10 of the sum, far below
    float32 resolution, so dropping them changes no result while halving the work.
    """
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    w /= w.sum()
    keep = w >= 1e-10
    w = w[keep] / w[keep].sum()
    return torch.from_numpy(w.astype(np.float32))


def gaussian_blur(masks: Tensor, passes: int = 2) -> Tensor:
    """Blur (N, 1, H, W) masks ``passes`` times with GPEN's Gaussian (separable, reflect-101 border)."""
    taps = gaussian_taps().to(masks.device, masks.dtype)
    r = taps.numel() // 2
    kx, ky = taps.view(1, 1, 1, -1), taps.view(1, 1, -1, 1)
    out = masks
    for _ in range(passes):
        out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="reflect"), kx)
        out = F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), ky)
    return out


def _resize(masks: Tensor, size: int) -> Tensor:
    if masks.shape[-1] == size:
        return masks
    return F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < masks.shape[-1])


def rectangle_mask(size: int, device: torch.device | str = "cpu") -> Tensor:
    """GPEN's paste mask without parsing: (1, 1, size, size) in [0, 1]."""
    m = torch.zeros((1, 1, MASK_SIZE, MASK_SIZE), device=device)
    m[..., BORDER : MASK_SIZE - BORDER + 1, BORDER : MASK_SIZE - BORDER + 1] = 1.0
    return _resize(gaussian_blur(m), size).clamp_(0.0, 1.0)


def create_parser() -> nn.Module:
    """facexlib's ParseNet (512 px, 19 classes) with random weights: to be loaded, or to time (``bench``)."""
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(in_size=MASK_SIZE, out_size=MASK_SIZE, parsing_ch=19)


def load_parser(path: str | Path | None, device: torch.device | str) -> nn.Module:
    """ParseNet with its weights from ``path`` (None: random weights, for speed figures only).

    Kept channels-last, the layout oneDNN and tensor cores are fast in: 1.2-1.3x per face on the CPU here
    (4.3-4.7 s instead of 5.6-5.9 s on two cores), with the same labels.
    """
    model = create_parser() if path is None else load_into(create_parser(), path, name="ParseNet")
    return model.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)


@torch.inference_mode()
def parse_labels(parser: nn.Module, faces: Tensor) -> Tensor:
    """Per-pixel class (N, 512, 512) of RGB faces (N, 3, S, S) in [0, 1]."""
    x = _resize(faces.float(), MASK_SIZE) * 2.0 - 1.0  # the parser reads RGB in [-1, 1]
    x = x.contiguous(memory_format=torch.channels_last)
    logits = parser(x)[0]
    return logits.argmax(dim=1)


def _classes(labels: Tensor, classes: tuple[int, ...]) -> Tensor:
    table = torch.zeros(19, dtype=torch.float32, device=labels.device)
    table[list(classes)] = 1.0
    return table[labels].unsqueeze(1)


def face_mask_from_labels(labels: Tensor, size: int) -> Tensor:
    """GPEN's parsing paste mask (N, 1, size, size) from labels (N, 512, 512)."""
    m = _classes(labels, FACE_CLASSES)
    m[..., :BORDER, :] = 0
    m[..., -BORDER:, :] = 0
    m[..., :, :BORDER] = 0
    m[..., :, -BORDER:] = 0
    return _resize(gaussian_blur(m), size).clamp_(0.0, 1.0)


def skin_mask_from_labels(labels: Tensor, size: int) -> Tensor:
    """Skin pixels (N, 1, size, size) in [0, 1] (fractional only where resizing blends edges)."""
    return _resize(_classes(labels, SKIN_CLASSES), size).clamp_(0.0, 1.0)


def parse_masks(parser: nn.Module, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Paste mask and skin mask, each (N, 1, S, S), for restored faces (N, 3, S, S) in [0, 1]."""
    labels = parse_labels(parser, faces)
    size = faces.shape[-1]
    return face_mask_from_labels(labels, size), skin_mask_from_labels(labels, size)


__all__ = [
    "FACE_CLASSES", "SKIN_CLASSES", "face_mask_from_labels", "gaussian_blur", "gaussian_taps", "load_parser",
    "parse_labels", "parse_masks", "rectangle_mask", "skin_mask_from_labels",
]
