"""Face detection with facexlib's RetinaFace, batched across images of different sizes.

facexlib's own ``detect_faces`` handles one image per call and ``batched_detect_faces`` needs
same-sized frames, so this module feeds the network itself: each image is scaled by GPEN's rule,
padded to a bucket shape (a few fixed shapes, so cuDNN and the allocator see shapes repeat),
images sharing a bucket run as one batch, and the anchors of the whole batch are decoded and
filtered here, on the device, with a single copy of the survivors back to the host.

Network facts used (from facexlib's ``retinaface.py`` / ``retinaface_utils.py``): input is BGR
float minus the mean (104, 117, 123); outputs per anchor are box offsets, class softmax and
5 landmark offsets; anchors are laid out level by level (strides 8, 16, 32), row-major, two
anchor sizes per cell; decoding uses variances (0.1, 0.2).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from .checkpoint import load_into
from .options import DetectorName
from .types import Face

_MEAN_BGR = (104.0, 117.0, 123.0)
_NMS_IOU = 0.4
_PRE_NMS_TOP_K = 5000
_POST_NMS_TOP_K = 750


def load_detector(path: str | Path, name: DetectorName, device: torch.device | str) -> nn.Module:
    """Build facexlib's RetinaFace ``name`` and load its weights from ``path`` (never downloads).

    Kept channels-last (``detect_faces`` feeds it so), the layout oneDNN and tensor cores are fast in: per
    image on the CPU here, 1.2-1.3x for mobile0.25 and 1.15-1.6x for ResNet50, outputs equal to 3e-5.
    """
    from facexlib.detection.retinaface import RetinaFace

    device = torch.device(device)
    model = RetinaFace(network_name=name, half=False, phase="test", device=device)
    load_into(model, path, name=f"RetinaFace {name}")
    return model.to(device, memory_format=torch.channels_last).eval()


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
    """Anchor offsets -> corner boxes (..., 4) and landmarks (..., 10), both normalised.

    ``priors`` is (A, 4) for offsets laid out per anchor, or one prior per row of gathered offsets.
    """
    centre = priors[:, :2] + loc[..., :2] * variance[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * variance[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    offsets = landm.unflatten(-1, (5, 2)) * variance[0]
    points = priors[:, :2].unsqueeze(1) + offsets * priors[:, 2:].unsqueeze(1)
    return boxes, points.flatten(-2)


@functools.lru_cache(maxsize=16)
def _cached_priors(
    steps: tuple[int, ...], min_sizes: tuple[tuple[int, ...], ...], height: int, width: int, device: torch.device,
) -> Tensor:
    # Keyed by plain values (the network's cfg is a dict); callers only read the tensor.
    return prior_boxes({"steps": steps, "min_sizes": min_sizes}, height, width, device)


@functools.lru_cache(maxsize=4)
def _mean_bgr(device: torch.device) -> Tensor:
    return torch.tensor(_MEAN_BGR, device=device).view(3, 1, 1)


def _search_shape(height: int, width: int, long_side: int, resize_above: float | None) -> tuple[float, int, int]:
    scale = detection_scale(height, width, long_side, resize_above)
    return scale, max(1, round(height * scale)), max(1, round(width * scale))


def search_copy(image: np.ndarray, long_side: int = 1000, resize_above: float | None = None) -> np.ndarray:
    """The image as the detector searches it: scaled by ``detection_scale`` with OpenCV's area filter.

    The image itself when no scaling is needed. Pure CPU work: callers with a thread pool make
    these copies there and hand them to ``detect_faces`` so the device's thread does not wait
    on a full-frame resize.
    """
    scale, dh, dw = _search_shape(image.shape[0], image.shape[1], long_side, resize_above)
    if scale == 1.0:
        return image
    return cv2.resize(image, (dw, dh), interpolation=cv2.INTER_AREA)


def _input_batch(images: Sequence[np.ndarray], bucket: tuple[int, int], device: torch.device) -> Tensor:
    """RGB uint8 images (already at detection scale) -> BGR mean-subtracted (N, 3, bucket) batch.

    On CUDA the pixels travel as uint8 in one copy from pinned memory (so the copy does not stall
    the host); conversion, channel order, mean subtraction and padding happen on the device.
    """
    if device.type == "cuda":
        host = torch.empty((len(images), *bucket, 3), dtype=torch.uint8, pin_memory=True)
        packed = host.numpy()
        for row, image in enumerate(images):
            packed[row, :image.shape[0], :image.shape[1]] = image
        pixels = host.to(device, non_blocking=True)
        views = [pixels[row, :image.shape[0], :image.shape[1]] for row, image in enumerate(images)]
    else:  # already where the network runs: read the arrays in place where torch can
        arrays = [np.ascontiguousarray(image) for image in images]
        views = [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]
    # Zero after mean subtraction is what the first convolution's own padding sees, so the pad is
    # as neutral as the network allows.
    batch = torch.empty((len(images), 3, *bucket), device=device, memory_format=torch.channels_last).zero_()
    mean = _mean_bgr(device)
    for row, view in enumerate(views):
        h, w = view.shape[:2]
        batch[row, :, :h, :w].copy_(view.permute(2, 0, 1).flip(0)).sub_(mean)
    return batch


def _survivors(loc: Tensor, conf: Tensor, landm: Tensor, priors: Tensor, variance: Sequence[float],
               confidence: float) -> np.ndarray:
    """Detections of a whole batch after threshold, top-k and per-image NMS, as one host array.

    Rows are (image row, x1, y1, x2, y2, score, 10 landmark coordinates), float32, boxes and
    landmarks normalised by the bucket size; each image's rows come in decreasing score.

    Reads from the device three times whatever the batch size: the candidate count (``nonzero``),
    the overlap mask inside torchvision's CUDA NMS, and the survivors.
    """
    scores = conf[..., 1].float()
    # The best-scoring anchors per image first (facexlib's pre-NMS cap), so that cap holds per
    # image without a per-image loop; then the threshold, which keeps a subset of them.
    k = min(_PRE_NMS_TOP_K, scores.shape[1])
    top_scores, top_anchor = scores.topk(k, dim=1, sorted=False) if k < scores.shape[1] else (
        scores, torch.arange(scores.shape[1], device=scores.device).expand_as(scores))
    img, col = torch.nonzero(top_scores > confidence, as_tuple=True)
    if img.numel() == 0:
        return np.zeros((0, 16), np.float32)
    anchor = top_anchor[img, col]
    score = top_scores[img, col]
    boxes, points = _decode(loc[img, anchor].float(), landm[img, anchor].float(), priors[anchor], variance)
    # Per-image NMS in one call: each image's boxes are moved by a multiple of the span of all
    # boxes, so boxes of two images never overlap (batched_nms's coordinate trick, done here so it
    # never falls back to a loop with a sync per image, as batched_nms does for many boxes). In
    # float64 the offsets cost no precision: IoUs are those of the image alone.
    wide = boxes.double()
    span = wide.max() - wide.min() + 1.0
    kept = torchvision.ops.nms(wide + img.unsqueeze(1) * span, score.double(), _NMS_IOU)
    rows = torch.cat([img.unsqueeze(1).float(), boxes, score.unsqueeze(1), points], dim=1)
    return rows[kept].cpu().numpy()


def _faces(
    rows: np.ndarray, *, to_image: np.ndarray, image_hw: tuple[int, int], min_face_size: float, max_faces: int,
) -> list[Face]:
    """One image's NMS survivors (score order) -> its faces, largest first."""
    rows = rows[:_POST_NMS_TOP_K]
    # float32 products, as the device would compute them, then float64 for the Face.
    boxes = (rows[:, 1:5] * to_image[:4]).astype(np.float64)
    points = (rows[:, 6:16] * to_image).astype(np.float64).reshape(-1, 5, 2)
    h, w = image_hw
    faces = []
    for box, pts, score in zip(boxes, points, rows[:, 5].astype(np.float64), strict=True):
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
    search: Sequence[np.ndarray] | None = None,
) -> list[list[Face]]:
    """Faces in each RGB uint8 image, in that image's own pixel coordinates.

    Each image is searched at ``detection_scale`` and padded to its bucket shape; images with the
    same bucket run in one forward pass and are decoded and filtered together on the device, so
    an image's faces do not depend on which other images share the call (beyond float rounding:
    convolution kernels may sum in another order for another batch size, moving a landmark by
    about 1e-4 px). Faces scoring above
    ``confidence`` survive NMS (IoU 0.4, per image); those whose larger box side is below
    ``min_face_size`` are dropped; the ``max_faces`` largest are returned, largest first.

    ``search`` optionally gives each image's ``search_copy`` (same ``long_side``), made ahead of
    time; a copy of the wrong size is an error.
    """
    if search is not None and len(search) != len(images):
        raise ValueError(f"{len(search)} search copies for {len(images)} images")
    device = next(detector.parameters()).device
    cfg: object = detector.cfg
    if not isinstance(cfg, Mapping):
        raise TypeError(f"detector.cfg must be RetinaFace's config mapping, got {type(cfg).__name__}")
    plans = []
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
        _, dh, dw = _search_shape(image.shape[0], image.shape[1], long_side, resize_above)
        if search is not None and search[i].shape != (dh, dw, 3):
            raise ValueError(f"search copy {search[i].shape} does not match {(dh, dw, 3)} for "
                             f"an image of {image.shape} at long side {long_side}")
        plans.append(((dh, dw), (bucket_side(dh), bucket_side(dw))))

    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, bucket) in enumerate(plans):
        groups.setdefault(bucket, []).append(i)

    steps = tuple(cfg["steps"])
    min_sizes = tuple(tuple(s) for s in cfg["min_sizes"])
    results: list[list[Face]] = [[] for _ in images]
    for bucket, members in groups.items():
        copies = [search[i] if search is not None else search_copy(images[i], long_side, resize_above) for i in members]
        batch = _input_batch(copies, bucket, device)
        loc, conf, landm = detector(batch)
        priors = _cached_priors(steps, min_sizes, *bucket, device)
        rows = _survivors(loc, conf, landm, priors, cfg["variance"], confidence)
        owner = rows[:, 0].astype(np.int64)
        bh, bw = bucket
        for row, i in enumerate(members):
            h, w = images[i].shape[:2]
            dh, dw = plans[i][0]
            # Normalised bucket coordinates -> detection pixels -> original pixels (continuous
            # coordinates, so scaling by the exact size ratio maps edges onto edges).
            to_image = np.array([bw * w / dw, bh * h / dh] * 5, dtype=np.float32)
            results[i] = _faces(rows[owner == row], to_image=to_image, image_hw=(h, w),
                                min_face_size=min_face_size, max_faces=max_faces)
    return results


__all__ = ["bucket_side", "detect_faces", "detection_scale", "load_detector", "prior_boxes", "search_copy"]
