"""Paste restored faces back into their image, touching only the pixels around each face.

For one image, every face's restored crop and mask are warped back (inverse similarity, bilinear)
into the face's own window of the image, never the whole frame. Faces composite as GPEN does: a
face takes a pixel where its mask is larger than every earlier face's there (max composite). The
result is ``original * (1 - s * m) + face * s * m`` with ``m`` the winning mask and ``s`` the
strength, computed only inside the union of the windows; where ``m`` is zero the original bytes
come back unchanged, and everything outside the windows is copied, not recomputed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .align import footprint, image_window, union_window, warp_back

Window = tuple[int, int, int, int]


def face_windows(matrices: np.ndarray, size: int, image_hw: tuple[int, int]) -> list[Window]:
    """Image window (x0, y0, x1, y1) each face's crop can change."""
    return [footprint(m, size, image_hw) for m in matrices]


def composite(
    original: Tensor, crops: Tensor, masks: Tensor, matrices: np.ndarray, windows: list[Window],
    origin: tuple[int, int], strength: float = 1.0,
) -> Tensor:
    """Blend faces into ``original`` (H, W, 3) uint8, a window of the image whose top-left is ``origin``.

    ``crops`` (N, 3, S, S) RGB in [0, 1] and ``masks`` (N, 1, S, S) in [0, 1] are in crop space;
    ``matrices`` (N, 2, 3) map full-image to crop coordinates; ``windows`` are the faces' windows in
    full-image coordinates and must lie inside the given window. Returns the blended window as uint8.
    """
    h, w = original.shape[:2]
    device = crops.device
    full_mask = torch.zeros((h, w), device=device)
    full_face = torch.zeros((3, h, w), device=device)
    ox, oy = origin
    for crop, mask, matrix, win in zip(crops, masks, matrices, windows, strict=True):
        x0, y0, x1, y1 = win
        if x1 <= x0 or y1 <= y0:
            continue
        warped = warp_back(torch.cat([crop.float() * 255.0, mask.float()]), matrix, win)
        sub = (slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
        new_mask = warped[3].clamp(0.0, 1.0)
        wins = new_mask > full_mask[sub]
        full_mask[sub] = torch.where(wins, new_mask, full_mask[sub])
        full_face[(slice(None), *sub)] = torch.where(wins, warped[:3], full_face[(slice(None), *sub)])
    m = (full_mask * float(strength)).unsqueeze(-1)
    base = original.to(device=device, dtype=torch.float32)
    out = base * (1.0 - m) + full_face.permute(1, 2, 0) * m
    return out.round_().clamp_(0, 255).to(torch.uint8)


def paste_faces(
    image: np.ndarray, crops: Tensor, masks: Tensor, matrices: np.ndarray, *, strength: float = 1.0,
    window_pixels: Tensor | None = None, window: Window | None = None,
) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with the restored faces pasted in.

    ``window_pixels`` may hold ``image[window]`` already on the device (as the aligner uploaded it),
    saving a second upload; the window must contain every face's window.
    """
    if len(crops) == 0 or strength <= 0:
        return image.copy()
    size = crops.shape[-1]
    windows = face_windows(matrices, size, image.shape[:2])
    area = union_window(windows)
    if window is None or window_pixels is None or not _contains(window, area):
        window = area
        window_pixels = image_window(image, window, crops.device)
    x0, y0, x1, y1 = window
    if x1 <= x0 or y1 <= y0:
        return image.copy()
    blended = composite(window_pixels, crops, masks, matrices, windows, (x0, y0), strength)
    out = image.copy()
    out[y0:y1, x0:x1] = blended.cpu().numpy()
    return out


def _contains(outer: Window, inner: Window) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


__all__ = ["composite", "face_windows", "paste_faces"]
