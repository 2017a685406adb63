"""Paste restored faces back into their image, touching only the pixels around each face.

For one image, every face's restored crop and mask are warped back (inverse similarity, bilinear)
into the face's own window of the image, never the whole frame. Faces composite as GPEN does: a
face takes a pixel where its mask is larger than every earlier face's there (max composite). The
result is ``original * (1 - s * m) + face * s * m`` with ``m`` the winning mask and ``s`` the
strength, computed only inside the faces' windows (grouped where they overlap); where ``m`` is zero the original bytes
come back unchanged, and everything outside the windows is copied, not recomputed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .align import footprint, image_window, union_window, warp_back

Window = tuple[int, int, int, int]

# Masks closer than this count as equal, so the earlier face keeps the pixel: where two faces' masks
# are both ~1, float noise of the bilinear warp (grid_sample on a GPU) must not pick the winner pixel
# by pixel (salt-and-pepper between the two restorations).
_MASK_TIE = 1e-5


def face_windows(matrices: np.ndarray, size: int, image_hw: tuple[int, int]) -> list[Window]:
    """Image window (x0, y0, x1, y1) each face's crop can change."""
    return [footprint(m, size, image_hw) for m in matrices]


def clusters(windows: list[Window]) -> list[tuple[Window, list[int]]]:
    """Group faces whose windows overlap, until the groups' own windows are disjoint.

    Faces in different groups never touch the same pixel, so each group is blended over just its
    own window: far-apart faces in a large photo cost their own pixels, not the area between them.
    Empty windows are left out. Faces keep their order inside a group (ties go to the earlier face).
    """
    groups = [(w, [i]) for i, w in enumerate(windows) if w[2] > w[0] and w[3] > w[1]]
    merged = True
    while merged:
        merged = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                if _overlap(groups[a][0], groups[b][0]):
                    window = union_window([groups[a][0], groups[b][0]])
                    groups[a] = (window, sorted(groups[a][1] + groups[b][1]))
                    del groups[b]
                    merged = True
                    break
            if merged:
                break
    return groups


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
        wins = new_mask > full_mask[sub] + _MASK_TIE
        full_mask[sub] = torch.where(wins, new_mask, full_mask[sub])
        full_face[(slice(None), *sub)] = torch.where(wins, warped[:3], full_face[(slice(None), *sub)])
    m = (full_mask * float(strength)).unsqueeze(-1)
    base = original.to(device=device, dtype=torch.float32)
    out = base * (1.0 - m) + full_face.permute(1, 2, 0) * m
    return out.round_().clamp_(0, 255).to(torch.uint8)


def paste_faces(
    image: np.ndarray, crops: Tensor, masks: Tensor, matrices: np.ndarray, *, strength: float = 1.0,
) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with the restored faces (on any device) pasted in."""
    out = image.copy()
    if len(crops) == 0 or strength <= 0:
        return out
    windows = face_windows(matrices, crops.shape[-1], image.shape[:2])
    for window, members in clusters(windows):
        x0, y0, x1, y1 = window
        pixels = image_window(image, window, crops.device)
        blended = composite(pixels, crops[members], masks[members], matrices[members],
                            [windows[i] for i in members], (x0, y0), strength)
        out[y0:y1, x0:x1] = blended.cpu().numpy()
    return out


def _overlap(a: Window, b: Window) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


__all__ = ["clusters", "composite", "face_windows", "paste_faces"]
