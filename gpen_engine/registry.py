"""The weight files gpen-watch knows: file name, architecture, where to get it, and its licence.

Pure data: nothing here opens a file or the network. The daemon resolves where files live and fetches them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .arch import VARIANTS, GpenArch
from .options import DetectorName, Preset

ModelKind = Literal["gpen", "detector", "parser"]

_GPEN_OSS = "https://public-vigen-video.oss-cn-shanghai.aliyuncs.com/robin/models/"
# GPEN's README (2023-02-15): 1024 and 2048 are published on ModelScope as pytorch_model.pt and
# pytorch_model-2048.pt of this model; the URL is ModelScope's per-file download endpoint.
_MODELSCOPE_HIRES = (
    "https://www.modelscope.cn/api/v1/models/damo/cv_gpen_image-portrait-enhancement-hires/repo"
    "?Revision=master&FilePath="
)
MODELSCOPE_HIRES_PAGE = "https://www.modelscope.cn/models/damo/cv_gpen_image-portrait-enhancement-hires/files"
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download/"

GPEN_LICENCE = "non-commercial use only (GPEN weights, (c) Alibaba)"


@dataclass(frozen=True)
class ModelSpec:
    """One weight file. ``filename`` is relative to the models folder unless absolute."""

    name: str
    filename: str
    kind: ModelKind
    arch: GpenArch | None
    urls: tuple[str, ...]
    licence: str
    key: str | None = None  # where the state dict sits inside the file, if wrapped
    sha256: str | None = None
    size_bytes: int | None = None
    source: str | None = None  # a page to get the file by hand when ``urls`` fail or are empty


def builtin_models() -> dict[str, ModelSpec]:
    """The official GPEN BFR generators and the facexlib detector/parser files, by name."""
    specs = [
        ModelSpec("GPEN-BFR-256", "GPEN-BFR-256.pth", "gpen", VARIANTS["GPEN-BFR-256"],
                  (_GPEN_OSS + "GPEN-BFR-256.pth",), GPEN_LICENCE),
        ModelSpec("GPEN-BFR-512", "GPEN-BFR-512.pth", "gpen", VARIANTS["GPEN-BFR-512"],
                  (_GPEN_OSS + "GPEN-BFR-512.pth",), GPEN_LICENCE),
        ModelSpec("GPEN-BFR-1024", "GPEN-BFR-1024.pth", "gpen", VARIANTS["GPEN-BFR-1024"],
                  (_MODELSCOPE_HIRES + "pytorch_model.pt",), GPEN_LICENCE,
                  source=MODELSCOPE_HIRES_PAGE + " (file pytorch_model.pt)"),
        ModelSpec("GPEN-BFR-2048", "GPEN-BFR-2048.pth", "gpen", VARIANTS["GPEN-BFR-2048"],
                  (_MODELSCOPE_HIRES + "pytorch_model-2048.pt",), GPEN_LICENCE,
                  source=MODELSCOPE_HIRES_PAGE + " (file pytorch_model-2048.pt)"),
        ModelSpec("retinaface-resnet50", "detection_Resnet50_Final.pth", "detector", None,
                  (_FACEXLIB + "v0.1.0/detection_Resnet50_Final.pth",),
                  "MIT (RetinaFace, via facexlib)"),
        ModelSpec("retinaface-mobile0.25", "detection_mobilenet0.25_Final.pth", "detector", None,
                  (_FACEXLIB + "v0.1.0/detection_mobilenet0.25_Final.pth",),
                  "MIT (RetinaFace, via facexlib)"),
        ModelSpec("parsenet", "parsing_parsenet.pth", "parser", None,
                  (_FACEXLIB + "v0.2.2/parsing_parsenet.pth",),
                  "facexlib release (MIT); network from PSFRGAN: check its terms for commercial use"),
    ]
    return {spec.name: spec for spec in specs}


def model_table(extra: Iterable[ModelSpec] = ()) -> dict[str, ModelSpec]:
    """Built-ins plus the config's own entries; an entry with a built-in's name replaces it."""
    table = builtin_models()
    for spec in extra:
        table[spec.name] = spec
    return table


def detector_spec(name: DetectorName, table: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """The weight file of facexlib's RetinaFace ``resnet50`` or ``mobile0.25`` detector."""
    return (table or builtin_models())[f"retinaface-{name}"]


def parser_spec(table: dict[str, ModelSpec] | None = None) -> ModelSpec:
    return (table or builtin_models())["parsenet"]


def preset_models(preset: Preset) -> tuple[str, ...]:
    """Names of the files a preset needs: its generator, its detector and, with parsing, the parser."""
    names = [preset.model, f"retinaface-{preset.detector}"]
    if preset.use_parsing:
        names.append("parsenet")
    return tuple(names)


def detector_network(spec: ModelSpec) -> DetectorName:
    """facexlib's ``network_name`` for a detector entry (``retinaface-mobile0.25`` -> ``mobile0.25``)."""
    if spec.kind != "detector":
        raise ValueError(f"{spec.name} is a {spec.kind}, not a detector")
    network = spec.name.removeprefix("retinaface-")
    if network not in ("resnet50", "mobile0.25"):
        raise ValueError(f"{spec.name}: unknown detector network (use resnet50 or mobile0.25)")
    return network  # type: ignore[return-value]
