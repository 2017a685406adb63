"""Face detection with facexlib's RetinaFace, batched across images of different sizes.

facexlib's own ``detect_faces`` handles one image per call and ``batched_detect_faces`` needs
same-sized frames, so this module feeds the network itself: each image is scaled by GPEN's rule,
padded to a bucket shape (a few fixed shapes, so cuDNN and the allocator see shapes repeat),
images sharing a bucket run as one batch, and the anchors are decoded and filtered here.

Network facts used (from facexlib's ``retinaface.py`` / ``retinaface_utils.py``): input is BGR
float minus the mean (104, 117, 123); outputs per anchor are box offsets, class softmax and
5 landmark offsets; anchors are laid out level by level (strides 8, 16, 32), row-major, two
anchor sizes per cell; decoding uses variances (0.1, 0.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from .align import image_window
from .options import DetectorName
from .types import Face, ModelFileError

_MEAN_BGR = (104.0, 117.0, 123.0)
_NMS_IOU = 0.4
_PRE_NMS_TOP_K = 5000
_POST_NMS_TOP_K = 750


def load_detector(path: str | Path, name: DetectorName, device: torch.device | str) -> nn.Module:
    """Build facexlib's RetinaFace ``name`` and load its weights from ``path`` (never downloads)."""
    from facexlib.detection.retinaface import RetinaFace

    device = torch.device(device)
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelFileError(f"detector weights not found: {path}") from exc
    except Exception as exc:  # truncated, not a torch file, or holding pickled code
        raise ModelFileError(f"cannot read detector weights {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = RetinaFace(network_name=name, half=False, phase="test", device=device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path} is not a RetinaFace {name} state dict: {exc}") from exc
    return model.to(device).eval()


def detection_scale(
    height: int, width: int, long_side: int = 1000, resize_above: float | None = None,
) -> float:
    """Scale at which an image is searched for faces.

    GPEN's rule: images whose long side exceeds 1500 px are searched at 1000 px, smaller ones at
    full size. Here ``long_side`` plays the part of 1000 and ``resize_above`` (default 1.5 x
    ``long_side``) the part of 1500.
    """
    threshold = 1.5 * long_side if resize_above is None else resize_above
    longest = max(height, width)
    return long_side / longest if longest > threshold else 1.0


def bucket_side(n: int) -> int:
    """Padded length for one side: multiples of 128 up to 512, of 256 up to 1536, then of 512."""
    for step, limit in ((128, 512), (256, 1536)):
        if n <= limit:
            return max(step, math.ceil(n / step) * step)
    return math.ceil(n / 512) * 512


def prior_boxes(cfg: dict, height: int, width: int, device: torch.device) -> Tensor:
    """RetinaFace anchors (cx, cy, w, h) normalised by the input size, in the network's output order."""
    parts = []
    for step, sizes in zip(cfg["steps"], cfg["min_sizes"], strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) * step / height
        cx = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) * step / width
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack([gx, gy], dim=-1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        wh = torch.tensor([[s / width, s / height] for s in sizes], device=device)
        wh = wh.unsqueeze(0).expand(centres.shape[0], -1, -1)
        parts.append(torch.cat([centres, wh], dim=-1).reshape(-1, 4))
    return torch.cat(parts)


def _decode(loc: Tensor, landm: Tensor, priors: Tensor, variance: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Anchor offsets -> corner boxes (N, A, 4) and landmarks (N, A, 10), both normalised."""
    centre = priors[:, :2] + loc[..., :2] * variance[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * variance[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    offsets = landm.unflatten(-1, (5, 2)) * variance[0]
    points = priors[:, :2].unsqueeze(1) + offsets * priors[:, 2:].unsqueeze(1)
    return boxes, points.flatten(-2)


def _to_input(image: np.ndarray, scale: float, bucket: tuple[int, int], device: torch.device) -> Tensor:
    """RGB uint8 image -> BGR mean-subtracted (3, bucket) tensor, zero-padded at bottom/right."""
    if scale != 1.0:
        h, w = image.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    h, w = image.shape[:2]
    t = image_window(image, (0, 0, w, h), device)
    t = t.permute(2, 0, 1).flip(0).float() - torch.tensor(_MEAN_BGR, device=device).view(3, 1, 1)
    # Zero after mean subtraction is what the first convolution's own padding sees, so the pad is
    # as neutral as the network allows.
    out = torch.zeros((3, *bucket), device=device)
    out[:, :h, :w] = t
    return out


def _select(
    boxes: Tensor, points: Tensor, scores: Tensor, *, confidence: float, to_image: Tensor,
    image_hw: tuple[int, int], min_face_size: float, max_faces: int,
) -> list[Face]:
    keep = scores > confidence
    boxes, points, scores = boxes[keep], points[keep], scores[keep]
    order = scores.argsort(descending=True)[:_PRE_NMS_TOP_K]
    boxes, points, scores = boxes[order], points[order], scores[order]
    kept = torchvision.ops.nms(boxes, scores, _NMS_IOU)[:_POST_NMS_TOP_K]
    boxes = (boxes[kept] * to_image[:4]).double().cpu().numpy()
    points = (points[kept] * to_image).double().cpu().numpy().reshape(-1, 5, 2)
    scores_np = scores[kept].double().cpu().numpy()
    h, w = image_hw
    faces = []
    for box, pts, score in zip(boxes, points, scores_np, strict=True):
        face = Face(box=box, landmarks=pts, score=float(score))
        clipped = np.clip(box, 0, [w, h, w, h])
        if face.size >= min_face_size and clipped[2] > clipped[0] and clipped[3] > clipped[1]:
            faces.append(face)
    # Largest first, ties by position, so the same image always lists its faces in the same order.
    faces.sort(key=lambda f: (-round(f.size, 3), round(float(f.box[1]), 3), round(float(f.box[0]), 3)))
    return faces[:max_faces]


@torch.inference_mode()
def detect_faces(
    detector: nn.Module,
    images: Sequence[np.ndarray],
    *,
    long_side: int = 1000,
    resize_above: float | None = None,
    confidence: float = 0.9,
    min_face_size: float = 16,
    max_faces: int = 100,
) -> list[list[Face]]:
    """Faces in each RGB uint8 image, in that image's own pixel coordinates.

    Each image is searched at ``detection_scale`` and padded to its bucket shape; images with the
    same bucket run in one forward pass, so an image's faces do not depend on which other images
    share the call. Faces scoring above ``confidence`` survive NMS (IoU 0.4); those whose larger box
    side is below ``min_face_size`` are dropped; the ``max_faces`` largest are returned, largest first.
    """
    device = next(detector.parameters()).device
    cfg = detector.cfg
    plans = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        scale = detection_scale(h, w, long_side, resize_above)
        dh, dw = max(1, round(h * scale)), max(1, round(w * scale))
        plans.append((scale, (dh, dw), (bucket_side(dh), bucket_side(dw))))

    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, _, bucket) in enumerate(plans):
        groups.setdefault(bucket, []).append(i)

    results: list[list[Face]] = [[] for _ in images]
    for bucket, members in groups.items():
        batch = torch.stack([_to_input(images[i], plans[i][0], bucket, device) for i in members])
        loc, conf, landm = detector(batch)
        priors = prior_boxes(cfg, *bucket, device=device)
        boxes, points = _decode(loc.float(), landm.float(), priors, cfg["variance"])
        bh, bw = bucket
        for row, i in enumerate(members):
            h, w = images[i].shape[:2]
            dh, dw = plans[i][1]
            # Normalised bucket coordinates -> detection pixels -> original pixels (continuous
            # coordinates, so scaling by the exact size ratio maps edges onto edges).
            sx, sy = bw * w / dw, bh * h / dh
            to_image = torch.tensor([sx, sy] * 5, device=device)
            results[i] = _select(
                boxes[row], points[row], conf[row, :, 1].float(), confidence=confidence, to_image=to_image,
                image_hw=(h, w), min_face_size=min_face_size, max_faces=max_faces,
            )
    return results


__all__ = ["bucket_side", "detect_faces", "detection_scale", "load_detector", "prior_boxes"]
