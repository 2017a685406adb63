"""Shared data types of the engine: images, faces, per-image results."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DecodedImage:
    """An image as the engine works on it.

    ``rgb`` is always HxWx3 uint8 (the working copy); what is needed to write the
    result back in the input's own form (alpha, bit depth, mode, metadata) rides along.
    """

    rgb: np.ndarray  # HxWx3 uint8, EXIF orientation already applied
    format: str  # Pillow format name of the source: "JPEG", "PNG", "WEBP", "TIFF", "BMP"
    mode: str  # Pillow mode of the source ("RGB", "RGBA", "L", "LA", "I;16", "CMYK", "P", ...)
    alpha: np.ndarray | None = None  # HxW, same bit depth as the source
    high_bit: np.ndarray | None = None  # HxWxC uint16 original pixels for 16-bit sources
    grayscale: bool = False
    exif: bytes | None = None
    icc_profile: bytes | None = None
    info: dict[str, object] = field(default_factory=dict)  # other format-specific metadata (dpi, ...)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the working image."""
        h, w = self.rgb.shape[:2]
        return w, h


@dataclass(frozen=True)
class Face:
    """One detected face in image coordinates."""

    box: np.ndarray  # (4,) x1, y1, x2, y2
    landmarks: np.ndarray  # (5, 2) left eye, right eye, nose, left mouth, right mouth
    score: float

    @property
    def size(self) -> float:
        x1, y1, x2, y2 = self.box
        return float(max(x2 - x1, y2 - y1))

    @property
    def min_side(self) -> float:
        """The box's smaller side (px): GPEN's small-face rule reads this (``min(fh, fw) < 100``)."""
        x1, y1, x2, y2 = self.box
        return float(min(x2 - x1, y2 - y1))


@dataclass
class StageTimes:
    """Milliseconds spent per stage for one image (shared stages are split evenly)."""

    decode: float = 0.0
    detect: float = 0.0
    align: float = 0.0
    generate: float = 0.0
    paste: float = 0.0
    encode: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.__dict__.items()}


@dataclass
class RestoredImage:
    """The result for one input image."""

    rgb: np.ndarray  # HxWx3 uint8, same size as the (possibly downsized) working image
    faces: list[Face]
    times: StageTimes = field(default_factory=StageTimes)


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InputError(EngineError):
    """The input itself is bad (corrupt, not an image, too large): retrying will not help."""


class ImageTooLarge(InputError):
    pass


class UnsupportedImage(InputError):
    """Decided by the file's first bytes (not an image, an unsupported or animated format): more bytes won't help."""


class NoFaceFound(InputError):
    pass


class DeviceOutOfMemory(EngineError):
    """Even one face does not fit in the device's memory now; it may fit later, so this is not bad input."""


class DeviceError(EngineError):
    """The requested device does not work."""


class ModelFileError(EngineError):
    """A weight file is missing, truncated, unsafe or of the wrong architecture."""
