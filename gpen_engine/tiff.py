"""Classic TIFF structure, read and written by hand where Pillow cannot help.

Pillow has no mode for 16-bit gray+alpha and writes 16 bits only for one sample per pixel, and
OpenCV reads a 16-bit RGB(A) file stored plane by plane as if its first plane held every sample, so
the engine reads such files through copies whose directory (tag list) is rewritten to plain 16-bit
gray, and writes multi-sample 16-bit TIFFs as wide gray rows whose directory is then retagged. It
also checks, before any decoder runs, that a file's directories and strips lie inside it, so a
half-copied TIFF reads as truncated. BigTIFF is left to Pillow throughout.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gpen_engine.types import InputError

ORIENTATION = 0x0112
PHOTOMETRIC = 262
MAX_PAGES = 64  # directories followed before a file is taken as a many-page one


TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}


def incomplete(data: bytes) -> str | None:
    """Why a classic TIFF cannot be whole (a directory, tag value or strip lies past the end), or None.

    Checked before Pillow parses the file, so a half-copied TIFF is named as truncated instead of
    surfacing as warnings about corrupt tags. BigTIFF is left to the decoder.
    """
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8 or struct.unpack(order + "H", data[2:4])[0] != 42:
        return None if len(data) >= 8 else "header cut short"
    size = len(data)
    offset = struct.unpack(order + "I", data[4:8])[0]
    seen: set[int] = set()
    while offset and offset not in seen and len(seen) < MAX_PAGES:
        seen.add(offset)
        if offset + 2 > size:
            return f"directory at byte {offset} lies past the end ({size} bytes)"
        count = struct.unpack(order + "H", data[offset : offset + 2])[0]
        end = offset + 2 + 12 * count
        if end + 4 > size:
            return f"directory at byte {offset} is cut short ({size} bytes)"
        values: dict[int, list[int]] = {}
        for entry in range(offset + 2, end, 12):
            tag, kind, n = struct.unpack(order + "HHI", data[entry : entry + 8])
            length = n * TYPE_SIZES.get(kind, 0)
            where = entry + 8
            if length > 4:
                where = struct.unpack(order + "I", data[entry + 8 : entry + 12])[0]
                if where + length > size:
                    return f"tag {tag} data lies past the end ({size} bytes)"
            if tag in (273, 279, 324, 325) and kind in (3, 4):
                code = order + str(n) + ("H" if kind == 3 else "I")
                values[tag] = list(struct.unpack(code, data[where : where + length]))
        for starts, counts in ((273, 279), (324, 325)):
            for start, length in zip(values.get(starts, []), values.get(counts, []), strict=False):
                if start + length > size:
                    return f"image data ends at byte {start + length}, the file has {size}"
        offset = struct.unpack(order + "I", data[end : end + 4])[0]
    return None


@dataclass(frozen=True)
class Samples16:
    """Where the samples of a 16-bit TIFF that the engine reads itself, as plain 16-bit gray, lie.

    These are gray with one extra sample (gray+alpha), for which Pillow has no mode, and RGB or RGBA
    stored plane by plane ("planar", PlanarConfiguration 2), which OpenCV misreads (it takes the
    first plane for every sample) and Pillow cuts to 8 bits. They are read through copies retagged
    as plain 16-bit gray (:func:`gray_view`): each plane of a planar file, or the rows of an
    interleaved gray+alpha one as gray rows twice as wide.
    """

    width: int
    height: int
    samples: int  # per pixel: 2 for gray+extra, 3 or 4 for RGB(A)
    rgb: bool
    planar: bool
    tiled: bool
    tile_width: int  # the image width for a file in strips
    predictor: int
    extra: int | None  # ExtraSamples: 0 unspecified, 1 associated (premultiplied) alpha, 2 plain alpha
    min_is_white: bool


EXTRA_SAMPLES = 338
SAMPLE_FORMAT = 339
PREDICTOR = 317
SHORT, LONG = 3, 4
Entries = dict[int, tuple[int, int, bytes]]  # tag -> (type, count, 4-byte value field)


def directory(data: bytes, offset: int | None = None) -> tuple[str, int, Entries, int] | None:
    """Byte order, offset, entries and next page's offset of a classic TIFF's directory at ``offset``
    (the first one by default); None if it cannot be read."""
    if len(data) < 8 or data[:2] not in (b"II", b"MM"):
        return None
    order = "<" if data[:2] == b"II" else ">"
    if struct.unpack(order + "H", data[2:4])[0] != 42:
        return None  # BigTIFF
    if offset is None:
        offset = struct.unpack(order + "I", data[4:8])[0]
    if offset + 2 > len(data):
        return None
    count = struct.unpack(order + "H", data[offset : offset + 2])[0]
    end = offset + 2 + 12 * count
    if end + 4 > len(data):
        return None
    entries: Entries = {}
    for entry in range(offset + 2, end, 12):
        tag, kind, n = struct.unpack(order + "HHI", data[entry : entry + 8])
        entries.setdefault(tag, (kind, n, data[entry + 8 : entry + 12]))
    return order, offset, entries, struct.unpack(order + "I", data[end : end + 4])[0]


def page_kinds(data: bytes) -> list[int] | None:
    """NewSubfileType of each page of a classic TIFF (at most one more than we check); None if unreadable."""
    kinds: list[int] = []
    offset: int | None = None
    seen: set[int] = set()
    while (parsed := directory(data, offset)) is not None:
        order, offset, entries, following = parsed
        seen.add(offset)
        kinds.append((ints(data, order, entries, 254) or (0,))[0])
        if not following or following in seen or len(kinds) > MAX_PAGES:
            return kinds  # a page that leads back to an earlier one ends the file, as Pillow reads it
        offset = following
    return None


def ints(data: bytes, order: str, entries: Entries, tag: int) -> tuple[int, ...]:
    """The BYTE, SHORT or LONG values of ``tag``; () when absent or unreadable."""
    if tag not in entries:
        return ()
    kind, count, field = entries[tag]
    code = {1: "B", 3: "H", 4: "I"}.get(kind)
    if code is None:
        return ()
    size = struct.calcsize(code) * count
    if size <= 4:
        raw = field[:size]
    else:
        where = struct.unpack(order + "I", field)[0]
        raw = data[where : where + size]
    return struct.unpack(f"{order}{count}{code}", raw) if len(raw) == size else ()


def raw_value(data: bytes, tag: int) -> bytes | None:
    """The stored bytes of ``tag`` in a classic TIFF's first directory, whatever its type; None if absent or unreadable.

    For byte streams that writers declare as different types (IPTC is BYTE, UNDEFINED or, from Photoshop, LONG).
    """
    parsed = directory(data)
    if parsed is None or tag not in parsed[2]:
        return None
    order, _, entries, _ = parsed
    kind, count, field = entries[tag]
    size = TYPE_SIZES.get(kind, 0) * count
    if size <= 4:
        return field[:size] if size else None
    where = struct.unpack(order + "I", field)[0]
    return data[where : where + size] if where + size <= len(data) else None


DNG_VERSION, SUB_IFDS = 50706, 330
RAW_PHOTOMETRICS = (32803, 34892)  # colour filter array (a sensor's mosaic), linear raw


def raw_camera(data: bytes) -> str | None:
    """The kind of camera raw file a TIFF-structured file is (DNG, CR2, NEF, ARW...), or None for a TIFF photo.

    Raw files open as TIFF, but what Pillow reads of them is a small preview: restoring it would publish a
    thumbnail in place of the photo. Told by DNG's version tag, CR2's own header, or a sensor mosaic in the
    first directory or one of its sub-directories (where NEF, ARW and PEF keep the raw image)."""
    if data[:8] == b"II*\0\x10\0\0\0" and data[8:11] == b"CR\x02":  # its directory at 16, after "CR" 2.x
        return "Canon CR2"
    parsed = directory(data)
    if parsed is None:
        return None
    order, _, entries, _ = parsed
    if DNG_VERSION in entries:
        return "DNG"
    if ints(data, order, entries, PHOTOMETRIC)[:1] in [(p,) for p in RAW_PHOTOMETRICS]:
        return "camera raw"
    for offset in ints(data, order, entries, SUB_IFDS)[:8]:
        sub = directory(data, offset)
        if sub is not None and ints(data, order, sub[2], PHOTOMETRIC)[:1] in [(p,) for p in RAW_PHOTOMETRICS]:
            return "camera raw"
    return None


def unspecified_extra_samples(data: bytes) -> int:
    """How many of the first directory's extra samples are "unspecified" (ExtraSamples 0): not alpha."""
    parsed = directory(data)
    if parsed is None:
        return 0
    order, _, entries, _ = parsed
    return sum(kind == 0 for kind in ints(data, order, entries, EXTRA_SAMPLES))


def orientation(data: bytes) -> int:
    """The first directory's Orientation (1-8), 1 when absent or unreadable."""
    parsed = directory(data)
    if parsed is None:
        return 1
    order, _, entries, _ = parsed
    value = (ints(data, order, entries, ORIENTATION) or (1,))[0]
    return value if 1 <= value <= 8 else 1


def planar(data: bytes) -> bool:
    """True when a classic TIFF's first page stores each sample in a plane of its own (PlanarConfiguration 2)."""
    parsed = directory(data)
    if parsed is None:
        return False
    order, _, entries, _ = parsed
    return ints(data, order, entries, 284)[:1] == (2,)


def samples16(data: bytes) -> Samples16 | None:
    """The layout of a 16-bit unsigned TIFF that Pillow and OpenCV cannot read right, else None.

    That is gray with one extra sample (interleaved or planar) and planar RGB with none or one
    (alpha). Interleaved 16-bit RGB(A), which OpenCV reads, is left to it.
    """
    parsed = directory(data)
    if parsed is None:
        return None
    order, _, entries, _ = parsed

    def first(tag: int, default: int) -> int:
        values = ints(data, order, entries, tag)
        return values[0] if values else default

    samples, photometric, in_planes = first(277, 1), first(PHOTOMETRIC, -1), first(284, 1) == 2
    bits = ints(data, order, entries, 258)
    extra = ints(data, order, entries, EXTRA_SAMPLES)
    if set(bits) != {16} or set(ints(data, order, entries, SAMPLE_FORMAT) or (1,)) != {1}:
        return None
    gray = photometric in (0, 1) and samples == 2 and len(extra) == 1
    rgb = photometric == 2 and in_planes and samples in (3, 4) and len(extra) == samples - 3
    if not (gray or rgb):
        return None
    width = first(256, 0)
    return Samples16(
        width=width,
        height=first(257, 0),
        samples=samples,
        rgb=rgb,
        planar=in_planes,
        tiled=322 in entries,
        tile_width=first(322, width),
        predictor=first(PREDICTOR, 1),
        extra=extra[0] if extra else None,
        min_is_white=photometric == 0,
    )


def gray_view(data: bytes, layout: Samples16, plane: int | None = None, *, header: bool = False) -> bytes:
    """``data`` retagged so that Pillow reads it as plain 16-bit gray.

    ``header``: for the size and metadata only (the pixels would not read right), orientation kept.
    Otherwise the orientation is left out (Pillow would turn the pixels; decode turns them itself):
    ``plane`` n of a planar file, or (``plane`` None) the interleaved rows of every pixel's samples
    as gray rows that many times as wide, without the predictor, which :func:`_read_samples16` undoes
    per sample.
    """
    # "Min is white" is tagged away (the caller inverts): Pillow has no big-endian mode for it.
    changes: dict[int, tuple[int, tuple[int, ...]] | None] = {
        258: (SHORT, (16,)), PHOTOMETRIC: (SHORT, (1,)), 277: (SHORT, (1,)),
        EXTRA_SAMPLES: None, SAMPLE_FORMAT: None, 280: None, 281: None,
    }
    if not header:
        changes[ORIENTATION] = None
    if layout.planar:
        parsed = directory(data)
        assert parsed is not None  # samples16 read it
        order, _, entries, _ = parsed
        changes[284] = (SHORT, (1,))
        planes = layout.samples
        for tag in (273, 279, 324, 325):  # strip or tile offsets and byte counts, plane after plane
            values = ints(data, order, entries, tag)
            if tag in entries and (not values or len(values) % planes):
                raise InputError(f"corrupt TIFF: the strips do not divide into {planes} planes")
            if values:
                part = len(values) // planes
                changes[tag] = (LONG, values[(plane or 0) * part : ((plane or 0) + 1) * part])
    elif not header:
        changes[256] = (LONG, (layout.samples * layout.width,))
        if layout.tiled:
            changes[322] = (LONG, (layout.samples * layout.tile_width,))
        if layout.predictor == 2:
            changes[PREDICTOR] = None
    return with_tags(data, changes)


def with_tags(data: bytes, changes: dict[int, tuple[int, tuple[int, ...]] | None]) -> bytes:
    """``data`` (a classic TIFF) with its first directory's tags changed: (type, values), or None to drop.

    The new directory (after any values too long to sit in it) is appended and the header pointed at
    it. The old directory stays behind unused, so every offset in the file stays valid, and the
    following pages stay linked.
    """
    parsed = directory(data)
    if parsed is None:
        raise InputError("corrupt TIFF: the image directory cannot be read")
    order, offset, entries, following = parsed
    next_page = struct.pack(order + "I", following)
    fields = {tag: struct.pack(order + "HHI", tag, kind, n) + value for tag, (kind, n, value) in entries.items()}
    tail = bytearray(len(data) % 2)  # values and directories start on a word boundary
    for tag, change in changes.items():
        if change is None:
            fields.pop(tag, None)
            continue
        kind, values = change
        payload = struct.pack(f"{order}{len(values)}{'H' if kind == SHORT else 'I'}", *values)
        if len(payload) > 4:
            tail += bytes((len(data) + len(tail)) % 2)
            value = struct.pack(order + "I", len(data) + len(tail))
            tail += payload
        else:
            value = payload.ljust(4, b"\0")
        fields[tag] = struct.pack(order + "HHI", tag, kind, len(values)) + value
    tail += bytes((len(data) + len(tail)) % 2)
    new_offset = len(data) + len(tail)
    tail += struct.pack(order + "H", len(fields)) + b"".join(fields[tag] for tag in sorted(fields)) + next_page
    return b"".join((data[:4], struct.pack(order + "I", new_offset), memoryview(data)[8:], tail))


PHOTOMETRIC_NAMES = {0: "gray", 1: "gray", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK", 6: "YCbCr", 8: "CIELab",
                      9: "ICCLab", 10: "ITULab", 32844: "LogL", 32845: "LogLuv", 34892: "linear raw"}


def layout_text(data: bytes) -> str:
    """E.g. "CMYK with 1 extra sample, 5 samples of 16 bits" (", stored in planes") for a message."""
    parsed = directory(data)
    if parsed is None:
        return "not one Pillow can read"
    order, _, entries, _ = parsed
    photometric = ints(data, order, entries, PHOTOMETRIC)
    name = PHOTOMETRIC_NAMES.get(photometric[0], f"photometric {photometric[0]}") if photometric else "unknown"
    samples = (ints(data, order, entries, 277) or (1,))[0]
    bits = sorted(set(ints(data, order, entries, 258) or (1,)))
    kind = {2: "signed ", 3: "floating-point "}.get((ints(data, order, entries, SAMPLE_FORMAT) or (1,))[0], "")
    extra = len(ints(data, order, entries, EXTRA_SAMPLES))
    extra_text = f" with {extra} extra sample{'s' * (extra != 1)}" if extra else ""
    stored = ", stored in planes" if planar(data) else ""
    return f"{name}{extra_text}, {samples} {kind}samples of {'/'.join(map(str, bits))} bits{stored}"
