"""Typed, frozen options the engine runs with.

The daemon builds these from its settings; the engine never reads config files or
environment variables itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Precision = Literal["fp32", "fp16", "bf16"]
DetectorName = Literal["resnet50", "mobile0.25"]


@dataclass(frozen=True)
class Preset:
    """How one hot folder's images are restored.

    strength, denoise, sharpen and detail are percentages (0-100); their exact
    meaning is documented in ``gpen_engine/adjust.py`` and config/gpen-watch.toml.
    """

    name: str
    model: str = "GPEN-BFR-512"
    batch_size: int = 4
    max_long_side: int | None = 1920
    strength: float = 50.0
    denoise: float = 30.0
    sharpen: float = 40.0
    skin_protection: bool = True
    detail: float = 0.0
    precision: Precision = "fp16"
    device: str = "auto"
    detector: DetectorName = "resnet50"
    detect_long_side: int = 1000
    det_confidence: float = 0.9
    min_face_size: int = 16
    max_faces: int = 100
    use_parsing: bool = True
    faces_required: bool = False

    def with_(self, **changes: object) -> Preset:
        return replace(self, **changes)  # type: ignore[arg-type]


# Values from the studio workflow the product is built for (DESIGN.md, "Presets").
BUILTIN_PRESETS: dict[str, Preset] = {
    "fast": Preset(
        name="fast", model="GPEN-BFR-512", batch_size=4, max_long_side=1920,
        strength=50, denoise=30, sharpen=40, skin_protection=True, detail=0,
    ),
    "quality": Preset(
        name="quality", model="GPEN-BFR-1024", batch_size=8, max_long_side=2560,
        strength=70, denoise=50, sharpen=60, skin_protection=True, detail=50,
    ),
    "low-spec": Preset(
        name="low-spec", model="GPEN-BFR-256", batch_size=1, max_long_side=1280,
        strength=40, denoise=20, sharpen=30, skin_protection=False, detail=0,
        precision="fp32", detector="mobile0.25", use_parsing=False,
    ),
}


@dataclass(frozen=True)
class EncodeOptions:
    """How results are written: same format as the input unless ``format`` is set."""

    format: str | None = None  # "JPEG", "PNG", "WEBP", "TIFF", "BMP" or None = as input
    jpeg_quality: int = 95
    webp_quality: int = 95
    keep_metadata: bool = True


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int = 100_000_000


@dataclass(frozen=True)
class EngineOptions:
    """Everything one Restorer needs besides the model files."""

    preset: Preset
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    encode: EncodeOptions = field(default_factory=EncodeOptions)
