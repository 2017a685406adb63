"""XMP packets read for what a file promises, and edited to describe the restored photo instead of the source.

Edited as text, in place, as the EXIF block is (``exif.py``): a packet is the writer's own serialisation, and
parsing and re-serialising it would change everything a reader compares it by. Writers put a simple value either
in an attribute (``Camera:MotionPhoto="1"``, as phones do) or in an element of its own
(``<Camera:MotionPhoto>1</Camera:MotionPhoto>``, as exiftool does when it rewrites a packet), and the prefix varies
(``GCamera:`` in older phones), so both forms are handled under any prefix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

_Turn = Callable[[float, float], tuple[float, float]]

_PREFIX = rb"(?:[\w.-]+:)?"
_DIRECTORY = _PREFIX + rb"Directory"  # a container's item list

# What the restored photo no longer has: the source's motion-photo video and HDR gain map stay behind (in the
# backup), so claims of them would make a viewer read the photo's own last bytes as a video.
_MOTION_FLAGS = (b"MotionPhoto", b"MicroVideo")
_MOTION_FIELDS = (b"MotionPhotoVersion", b"MotionPhotoPresentationTimestampUs", b"MicroVideoVersion",
                  b"MicroVideoOffset", b"MicroVideoPresentationTimestampUs")
_SIZES = ((b"exif:PixelXDimension", 0), (b"exif:PixelYDimension", 1), (b"tiff:ImageWidth", 0),
          (b"tiff:ImageLength", 1))


def value(xmp: bytes, name: bytes) -> bytes | None:
    """The first value of the property with local name ``name``, whatever its prefix, or None."""
    key = _PREFIX + re.escape(name)
    found = (re.search(rb"[\s<]%s\s*=\s*[\"']([^\"'<>]{0,64})[\"']" % key, xmp)
             or re.search(rb"<(%s)>\s*([^<>]{0,64}?)\s*</\1>" % key, xmp))
    return None if found is None else found.group(found.lastindex or 1).strip()


def directory(xmp: bytes) -> bytes | None:
    """The container's item list (the ``Directory`` element, whatever its prefix), or None."""
    spans = _elements(xmp, _DIRECTORY)
    return xmp[spans[0][0] : spans[0][1]] if spans else None


def _elements(xmp: bytes, key: bytes) -> list[tuple[int, int]]:
    """Where each element named by the pattern ``key`` starts and ends, with what it holds.

    Each end tag is looked for with ``find`` from its start tag, not by a regex running to it: a packet full of
    start tags without an end (a hostile file) then costs one pass per tag name, not one per start tag."""
    spans, pos = [], 0
    next_close: dict[bytes, int] = {}  # end tag -> where it next occurs (-1: nowhere further on)
    for start in re.finditer(rb"<(%s)(?=[\s/>])[^<>]*>" % key, xmp):
        if start.start() < pos:
            continue
        if start.group().endswith(b"/>"):
            spans.append((start.start(), start.end()))
            pos = start.end()
            continue
        close = b"</" + start.group(1) + b">"
        end = next_close.get(close, 0)
        if 0 <= end < start.end():
            end = next_close[close] = xmp.find(close, start.end())
        if end < 0:
            continue
        spans.append((start.start(), end + len(close)))
        pos = end + len(close)
    return spans


def _without(xmp: bytes, spans: list[tuple[int, int]]) -> bytes:
    out, pos = [], 0
    for start, end in spans:
        out.append(xmp[pos:start])
        pos = end
    return b"".join(out) + xmp[pos:]


def for_result(xmp: bytes, size: tuple[int, int], *, extended_kept: bool = False, turned_from: int = 1) -> bytes:
    """``xmp`` describing the restored photo of ``size`` (width, height), which is a still and upright.

    The orientation becomes 1 and the pixel sizes the result's; regions (the people named in a photo) move with
    the pixels turned upright from EXIF orientation ``turned_from``; a motion photo's video and an Ultra HDR gain
    map are no longer claimed (the container's item list goes, the motion flags become 0); an embedded thumbnail
    of the unrestored photo goes; so does the pointer to Extended XMP unless ``extended_kept`` (the caller carries
    those segments along)."""
    xmp = _set(xmp, b"tiff:Orientation", b"1")
    for name, axis in _SIZES:
        xmp = _set(xmp, name, str(size[axis]).encode())
    xmp = _regions_turned(xmp, turned_from, size)
    for flag in _MOTION_FLAGS:
        xmp = _set(xmp, _PREFIX + flag, b"0", escaped=True)
    dropped = [_PREFIX + re.escape(n) for n in _MOTION_FIELDS] + [rb"hdrgm:\w+", rb"xmp:Thumbnails"]
    if not extended_kept:
        dropped.append(rb"xmpNote:HasExtendedXMP")
    for name in dropped:
        xmp = _drop(xmp, name)
    return _without(xmp, _elements(xmp, _DIRECTORY))


def _set(xmp: bytes, name: bytes, new: bytes, *, escaped: bool = False) -> bytes:
    key = name if escaped else re.escape(name)
    xmp = re.sub(rb"([\s<]%s\s*=\s*)([\"'])[^\"'<>]*\2" % key, lambda m: m[1] + m[2] + new + m[2], xmp)
    return re.sub(rb"<(%s)>[^<>]*</\1>" % key, lambda m: b"<" + m[1] + b">" + new + b"</" + m[1] + b">", xmp)


def _drop(xmp: bytes, key: bytes) -> bytes:
    """Without the property ``key`` (a pattern): its attribute, or its element with whatever it holds."""
    xmp = re.sub(rb"\s%s\s*=\s*([\"'])[^\"'<>]*\1" % key, b"", xmp)
    return _without(xmp, _elements(xmp, key))


# Where each EXIF orientation puts a point (x, y) of the stored image, in fractions of its sides, once upright.
_UPRIGHT: dict[int, _Turn] = {
    2: lambda x, y: (1 - x, y),
    3: lambda x, y: (1 - x, 1 - y),
    4: lambda x, y: (x, 1 - y),
    5: lambda x, y: (y, x),
    6: lambda x, y: (1 - y, x),
    7: lambda x, y: (1 - y, 1 - x),
    8: lambda x, y: (y, 1 - x),
}


def _regions_turned(xmp: bytes, orientation: int, size: tuple[int, int]) -> bytes:
    """MWG regions (``mwg-rs:Area``, in which Lightroom, digiKam and photo libraries keep the people in a photo:
    centre, width and height as fractions of the stored image, not of the turned one a viewer shows) moved with
    the pixels; the size they apply to (``AppliedToDimensions``) made the result's."""
    out, pos = [], 0
    dimensions = _elements(xmp, _PREFIX + rb"AppliedToDimensions")
    upright = orientation in (5, 6, 7, 8) and dimensions and _upright_already(xmp[slice(*dimensions[0])], size)
    for start, end in dimensions:
        span = xmp[start:end]
        if value(span, b"unit") in (None, b"pixel"):
            span = _set(_set(span, _PREFIX + rb"w", str(size[0]).encode(), escaped=True),
                        _PREFIX + rb"h", str(size[1]).encode(), escaped=True)
        out += [xmp[pos:start], span]
        pos = end
    xmp = b"".join(out) + xmp[pos:]
    turn = _UPRIGHT.get(orientation)
    if turn is None or upright:
        return xmp
    out, pos = [], 0
    for start, end in _elements(xmp, _PREFIX + rb"Area"):
        out += [xmp[pos:start], _area_turned(xmp[start:end], turn)]
        pos = end
    return b"".join(out) + xmp[pos:]


def _upright_already(dimensions: bytes, size: tuple[int, int]) -> bool:
    """Whether regions that apply to ``dimensions`` were placed on the turned image a viewer shows, as some writers
    do: its width and height have the upright result's proportions, not the stored image's (turned a quarter)."""
    try:
        w, h = (float(value(dimensions, name) or b"") for name in (b"w", b"h"))
    except ValueError:
        return False
    if w <= 0 or h <= 0 or size[0] <= 0 or size[1] <= 0:
        return False
    shape, upright = w / h, size[0] / size[1]
    return abs(math.log(shape / upright)) < abs(math.log(shape * upright))


def _box_turned(left: float, top: float, width: float, height: float, turn: _Turn
                ) -> tuple[float, float, float, float]:
    (x0, y0), (x1, y1) = turn(left, top), turn(left + width, top + height)
    return min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0)


def _number(x: float) -> bytes:
    text = f"{x:.6f}".rstrip("0").rstrip(".")
    return (text if text not in ("", "-0") else "0").encode()


def _area_turned(area: bytes, turn: _Turn) -> bytes:
    """One ``Area`` (attributes or elements) with its centre, width and height moved by ``turn``."""
    if value(area, b"unit") not in (None, b"normalized"):
        return area
    try:
        x, y = (float(value(area, name) or b"") for name in (b"x", b"y"))
    except ValueError:
        return area  # a number not written as one
    if value(area, b"w") is None and value(area, b"h") is None:  # a point, or a circle's centre (its d stays)
        for name, new in zip((b"x", b"y"), turn(x, y), strict=True):
            area = _set(area, _PREFIX + name, _number(new), escaped=True)
        return area
    try:
        w, h = (float(value(area, name) or b"") for name in (b"w", b"h"))
    except ValueError:
        return area
    left, top, w, h = _box_turned(x - w / 2, y - h / 2, w, h, turn)
    for name, new in ((b"x", left + w / 2), (b"y", top + h / 2), (b"w", w), (b"h", h)):
        area = _set(area, _PREFIX + name, _number(new), escaped=True)
    return area
