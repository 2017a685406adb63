"""XMP packets read for what a file promises, and edited to describe the restored photo instead of the source.

Edited as text, in place, as the EXIF block is (``exif.py``): a packet is the writer's own serialisation, and
parsing and re-serialising it would change everything a reader compares it by. Writers put a simple value either
in an attribute (``Camera:MotionPhoto="1"``, as phones do) or in an element of its own
(``<Camera:MotionPhoto>1</Camera:MotionPhoto>``, as exiftool does when it rewrites a packet), and the prefix varies
(``GCamera:`` in older phones), so both forms are handled under any prefix.
"""

from __future__ import annotations

import re

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


def for_result(xmp: bytes, size: tuple[int, int], *, extended_kept: bool = False) -> bytes:
    """``xmp`` describing the restored photo of ``size`` (width, height), which is a still and upright.

    The orientation becomes 1 and the pixel sizes the result's; a motion photo's video and an Ultra HDR gain map
    are no longer claimed (the container's item list goes, the motion flags become 0); an embedded thumbnail of
    the unrestored photo goes; so does the pointer to Extended XMP unless ``extended_kept`` (the caller carries
    those segments along)."""
    xmp = _set(xmp, b"tiff:Orientation", b"1")
    for name, axis in _SIZES:
        xmp = _set(xmp, name, str(size[axis]).encode())
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
