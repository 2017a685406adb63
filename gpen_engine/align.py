"""Face alignment: GPEN's 5-point crop, warped on the device.

A face is cropped by the similarity transform (rotation, uniform scale, translation) that maps
its five landmarks onto GPEN's template in the least-squares sense. In 2-D that transform has a
closed form, identical to Umeyama's estimate with scaling (the case GPEN uses), so no SVD is
needed. Crops of all faces of an image are sampled by one ``grid_sample`` call, and restored
crops are warped back with the inverse transform.

Pixel convention (as OpenCV's ``warpAffine``): integer coordinates are pixel centres; a matrix
maps image coordinates to crop coordinates.
"""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "torch", "opencv"]

# GPEN's template at 512 px: left eye, right eye, nose tip, left and right mouth corners.
GPEN_TEMPLATE_512 = np.array(
    [[202.04, 242.88], [309.43, 242.29], [256.08, 303.96], [211.96, 366.83], [300.89, 366.34]],
    dtype=np.float64,
)


def template(size: int) -> np.ndarray:
    """GPEN's 5-point template for a ``size`` x ``size`` crop (scaled linearly from 512)."""
    return GPEN_TEMPLATE_512 * (size / 512.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity mapping points ``src`` (K, 2) onto ``dst`` (K, 2).

    Closed form: with centred points, ``a = sum(p . q) / sum(|p|^2)`` and
    ``b = sum(p x q) / sum(|p|^2)`` give the matrix ``[[a, -b], [b, a]]`` (scale times a proper
    rotation); reflections are never produced, exactly as Umeyama's method with its sign fix.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    p, q = src - ms, dst - md
    norm = float((p**2).sum())
    if norm <= 0.0:
        raise ValueError("landmarks are degenerate (all points coincide)")
    a = float((p * q).sum()) / norm
    b = float((p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]).sum()) / norm
    rot = np.array([[a, -b], [b, a]])
    return np.hstack([rot, (md - rot @ ms)[:, None]])


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix, or of a stack (N, 2, 3)."""
    return np.linalg.inv(_to_homogeneous(np.asarray(m, dtype=np.float64)))[..., :2, :]


def face_matrices(landmarks: np.ndarray, size: int) -> np.ndarray:
    """(N, 2, 3) image -> crop matrices for landmarks (N, 5, 2) and a ``size`` crop."""
    ref = template(size)
    return np.stack([similarity_transform(pts, ref) for pts in np.asarray(landmarks).reshape(-1, 5, 2)]) \
        if len(landmarks) else np.zeros((0, 2, 3))


def footprint(matrix: np.ndarray, size: int, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) image window holding every pixel that the ``size`` crop of ``matrix`` touches.

    Bilinear sampling gives weight to crop coordinates in (-1, size), so the window is the bounding
    box of that square mapped into the image, rounded outwards and clipped. It may be empty
    (x1 <= x0) when the crop lies outside the image.
    """
    inv = invert_affine(matrix)
    corners = np.array([[-1, -1, 1], [size, -1, 1], [-1, size, 1], [size, size, 1]], dtype=np.float64)
    pts = corners @ inv.T
    h, w = image_hw
    x0 = min(max(math.floor(pts[:, 0].min()), 0), w)
    y0 = min(max(math.floor(pts[:, 1].min()), 0), h)
    x1 = max(min(math.ceil(pts[:, 0].max()) + 1, w), x0)
    y1 = max(min(math.ceil(pts[:, 1].max()) + 1, h), y0)
    return x0, y0, x1, y1


def union_window(windows: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """Smallest window holding all ``windows``."""
    return (min(w[0] for w in windows), min(w[1] for w in windows),
            max(w[2] for w in windows), max(w[3] for w in windows))


def _to_homogeneous(m: np.ndarray) -> np.ndarray:
    full = np.zeros((*m.shape[:-2], 3, 3))
    full[..., :2, :] = m
    full[..., 2, 2] = 1.0
    return full


def _pixel_to_unit(width: int, height: int) -> np.ndarray:
    """Pixel-centre coordinates -> grid_sample's [-1, 1] (align_corners=False)."""
    return np.array([[2.0 / width, 0, 1.0 / width - 1], [0, 2.0 / height, 1.0 / height - 1], [0, 0, 1]])


def _unit_to_pixel(width: int, height: int) -> np.ndarray:
    return np.linalg.inv(_pixel_to_unit(width, height))


def _theta(out_to_in: np.ndarray, out_wh: tuple[int, int], in_wh: tuple[int, int]) -> np.ndarray:
    """affine_grid's theta for a pixel map ``out_to_in`` (N, 2, 3) from output to input pixels."""
    full = _pixel_to_unit(*in_wh) @ _to_homogeneous(out_to_in) @ _unit_to_pixel(*out_wh)
    return full[..., :2, :]


def image_window(image: np.ndarray, window: tuple[int, int, int, int], device: torch.device) -> Tensor:
    """``image[y0:y1, x0:x1]`` (H, W, C) as a tensor on ``device`` (one copy of just that window)."""
    x0, y0, x1, y1 = window
    part = np.ascontiguousarray(image[y0:y1, x0:x1])
    if not part.flags.writeable:  # torch refuses to wrap read-only memory without a warning
        part = part.copy()
    return torch.from_numpy(part).to(device)


def _backend(t: Tensor, backend: Backend) -> Backend:
    # OpenCV's warpAffine is about ten times faster than grid_sample on a CPU; on a GPU the
    # batched grid_sample keeps the pixels on the device.
    if backend == "auto":
        return "opencv" if t.device.type == "cpu" else "torch"
    return backend


def warp_crops(
    image: Tensor, matrices: np.ndarray, size: int, origin: tuple[int, int] = (0, 0), *,
    backend: Backend = "auto",
) -> Tensor:
    """Crops (N, C, size, size) float of ``image`` (H, W, C) under image -> crop ``matrices``.

    ``image`` (uint8 or float, values kept as they are) may be a window of the full image whose
    top-left pixel is ``origin`` (x, y); ``matrices`` are always in full-image coordinates. Pixels
    outside the window read as zero, as OpenCV's constant border does.
    """
    n = len(matrices)
    h, w, c = image.shape
    if n == 0:
        return torch.zeros((0, c, size, size), device=image.device)
    shift = np.array([[1.0, 0, origin[0]], [0, 1.0, origin[1]], [0, 0, 1]])
    window_to_crop = (_to_homogeneous(np.asarray(matrices, dtype=np.float64)) @ shift)[..., :2, :]
    if _backend(image, backend) == "opencv":
        src = image.contiguous().numpy()
        crops = [cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
                 for m in window_to_crop]
        out = torch.from_numpy(np.stack(crops).reshape(n, size, size, c))
        return out.permute(0, 3, 1, 2).float()
    theta = torch.as_tensor(_theta(invert_affine(window_to_crop), (size, size), (w, h)), dtype=torch.float32,
                            device=image.device)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    # Stacking the grids vertically lets one call sample every crop from the single image.
    src_t = image.permute(2, 0, 1).unsqueeze(0).float()
    out = F.grid_sample(src_t, grid.reshape(1, n * size, size, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.view(c, n, size, size).transpose(0, 1)


def warp_back(crop: Tensor, matrix: np.ndarray, window: tuple[int, int, int, int], *,
              backend: Backend = "auto") -> Tensor:
    """Warp one crop (C, S, S) float back into the image ``window`` (x0, y0, x1, y1): (C, y1-y0, x1-x0).

    Pixels that map outside the crop read as zero (so a mask channel is zero there).
    """
    c, s, _ = crop.shape
    x0, y0, x1, y1 = window
    shift = np.array([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1]])
    window_to_crop = (_to_homogeneous(np.asarray(matrix, dtype=np.float64)) @ shift)[:2, :]
    if _backend(crop, backend) == "opencv":
        src = crop.float().permute(1, 2, 0).contiguous().numpy()
        out = cv2.warpAffine(src, window_to_crop, (x1 - x0, y1 - y0),
                             flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
        return torch.from_numpy(out.reshape(y1 - y0, x1 - x0, c)).permute(2, 0, 1)
    theta = torch.as_tensor(_theta(window_to_crop[None], (x1 - x0, y1 - y0), (s, s)), dtype=torch.float32,
                            device=crop.device)
    grid = F.affine_grid(theta, [1, c, y1 - y0, x1 - x0], align_corners=False)
    warped = F.grid_sample(crop.float().unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return warped[0]


__all__ = [
    "GPEN_TEMPLATE_512", "face_matrices", "footprint", "image_window", "invert_affine",
    "similarity_transform", "template", "union_window", "warp_back", "warp_crops",
]
