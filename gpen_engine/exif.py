"""EXIF blocks edited in place, byte for byte, instead of being re-serialized.

A camera's EXIF is a small TIFF file whose values are found by offset, and maker notes (Canon's,
for one) hold offsets of their own that only hold while every byte stays where the camera put it.
Re-serializing the block with Pillow moves values and changes tag types, so the few values that
must change when the restored photo is written (Orientation, PixelX/YDimension) are overwritten
where they lie, and tags that must go are taken out of IFD0's entry table without moving anything
else. When that is impossible (a value of a type or size it cannot hold), :func:`patched` says so
and the caller re-serializes instead.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

HEADER = b"Exif\x00\x00"
ORIENTATION = 0x0112
EXIF_IFD = 0x8769
PIXEL_X, PIXEL_Y = 0xA002, 0xA003
X_RESOLUTION, Y_RESOLUTION = 0x011A, 0x011B
FOCAL_PLANE_X, FOCAL_PLANE_Y = 0xA20E, 0xA20F
_SHORT, _LONG, _RATIONAL, _DOUBLE, _IFD = 3, 4, 5, 12, 13
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_THUMBNAIL_OFFSET, _THUMBNAIL_LENGTH = 0x0201, 0x0202  # JPEGInterchangeFormat(Length), in IFD1


def tiff_bytes(block: bytes) -> bytes:
    """The TIFF structure inside an EXIF block, without the APP1 header (which some writers repeat)."""
    while block.startswith(HEADER):
        block = block[len(HEADER) :]
    return block


def patched(block: bytes, *, drop: Collection[int] = (), size: tuple[int, int] | None = None,
            transposed: bool = False) -> bytes | None:
    """``block`` as ``Exif\\0\\0`` + TIFF, edited in place; None if that cannot be done.

    In IFD0 the tags in ``drop`` are removed (the entries after them move up within the entry table,
    nothing else moves), Orientation is set to 1 and the link to IFD1, the thumbnail of the unrestored
    photo, is cut (and the thumbnail's bytes zeroed, or cut off where they end the block). ``transposed``
    (the pixels were turned by a quarter): each horizontal value trades places with its vertical one
    (resolutions, focal-plane resolutions, pixel sizes). With ``size`` (width, height), PixelX/YDimension in
    the Exif sub-IFD are set to it, and the focal-plane resolutions (pixels per unit of the sensor, from which
    readers work out the sensor's size and the 35 mm focal length) scaled with them. Tags are never added.
    None when the block is not a readable TIFF structure or a value cannot be set without changing its type
    or place (an Orientation stored as text, a width above 65535 in a SHORT).
    """
    data = bytearray(tiff_bytes(block))
    if len(data) < 8 or data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "<" if data[:2] == b"II" else ">"
    ifd0 = struct.unpack(order + "I", data[4:8])[0]
    entries = _entries(data, order, ifd0)
    if entries is None:
        return None
    _blank_thumbnail(data, order, ifd0 + 2 + 12 * len(entries))
    kept = [entry for entry in entries if _tag(data, order, entry) not in drop]
    if len(kept) != len(entries):
        table = b"".join(bytes(data[entry : entry + 12]) for entry in kept)
        end = ifd0 + 2 + 12 * len(entries) + 4
        data[ifd0:end] = struct.pack(order + "H", len(kept)) + table + bytes(4 + 12 * (len(entries) - len(kept)))
        entries = [ifd0 + 2 + 12 * i for i in range(len(kept))]
    else:
        data[ifd0 + 2 + 12 * len(entries) : ifd0 + 6 + 12 * len(entries)] = bytes(4)
    if not entries:
        return None
    if transposed:
        _swap(data, order, entries, (X_RESOLUTION, Y_RESOLUTION))
    for entry in entries:
        tag = _tag(data, order, entry)
        if tag == ORIENTATION and not _set(data, order, entry, 1):
            return None
        if tag == EXIF_IFD and (sub := _sub_entries(data, order, entry)) is not None:
            if transposed:
                _swap(data, order, sub, (PIXEL_X, PIXEL_Y))
                _swap(data, order, sub, (FOCAL_PLANE_X, FOCAL_PLANE_Y))
            if size is not None and not _set_size(data, order, sub, size):
                return None
    return HEADER + bytes(data)


def _blank_thumbnail(data: bytearray, order: str, link: int) -> None:
    """Zero the thumbnail IFD1 (linked from ``link``) points to: a small JPEG of the unrestored photo, faces and
    all, which cutting the link alone would leave in the file for anyone who looks."""
    ifd1 = struct.unpack(order + "I", data[link : link + 4])[0] if link + 4 <= len(data) else 0
    entries = _entries(data, order, ifd1) if ifd1 else None
    values = {}
    for entry in entries or []:
        kind, count, value = struct.unpack(order + "HII", data[entry + 2 : entry + 12])
        if kind == _LONG and count == 1:
            values[_tag(data, order, entry)] = value
    start, length = values.get(_THUMBNAIL_OFFSET), values.get(_THUMBNAIL_LENGTH)
    if start is None or not length or start < 8 or start + length > len(data) or data[start : start + 2] != b"\xff\xd8":
        return  # not a JPEG where it says: leave whatever is there
    tables = [(ifd1, ifd1 + 6 + 12 * len(entries or []))]
    ifd0 = struct.unpack(order + "I", data[4:8])[0]
    tables.append((ifd0, link + 4))
    if any(start < end and begin < start + length for begin, end in tables):
        return  # it overlaps a directory: a damaged or hostile block, not a thumbnail to blank
    data[start : start + length] = bytes(length)
    cut = max(start, _values_end(data, order, ifd0))
    if not any(data[cut:]):
        # Nothing but the thumbnail (and padding) after the values, as cameras lay it out: cut it off. A big
        # thumbnail can push a block past the 64 KB of one JPEG segment, and zeros alone would keep it there.
        del data[cut:]


_SUB_IFDS = (EXIF_IFD, 0x8825, 0xA005)  # Exif, GPS, Interoperability


def _values_end(data: bytearray, order: str, ifd: int, seen: set[int] | None = None) -> int:
    """Where the last value (or directory) that the directory at ``ifd`` and its sub-directories hold ends."""
    seen = set() if seen is None else seen
    entries = _entries(data, order, ifd) if ifd not in seen and len(seen) < 16 else None
    if entries is None:
        return 0
    seen.add(ifd)
    end = ifd + 6 + 12 * len(entries)
    for entry in entries:
        tag, kind, count, value = struct.unpack(order + "HHII", data[entry : entry + 12])
        size = _TYPE_SIZES.get(kind, 0) * count
        if size > 4:
            end = max(end, value + size)
        if tag in _SUB_IFDS and kind in (_LONG, _IFD) and count == 1:
            end = max(end, _values_end(data, order, value, seen))
    return end


def _entries(data: bytearray, order: str, offset: int) -> list[int] | None:
    """Where each 12-byte entry of the directory at ``offset`` starts; None if it does not fit in ``data``."""
    if offset < 8 or offset + 2 > len(data):
        return None
    count = struct.unpack(order + "H", data[offset : offset + 2])[0]
    if offset + 6 + 12 * count > len(data):
        return None
    return [offset + 2 + 12 * i for i in range(count)]


def _tag(data: bytearray, order: str, entry: int) -> int:
    return int(struct.unpack(order + "H", data[entry : entry + 2])[0])


def _set(data: bytearray, order: str, entry: int, value: int) -> bool:
    """Overwrite a single SHORT or LONG value held in the entry itself; False if it is not one."""
    kind, count = struct.unpack(order + "HI", data[entry + 2 : entry + 8])
    if count != 1 or kind not in (_SHORT, _LONG) or (kind == _SHORT and value > 0xFFFF):
        return False
    code = "H" if kind == _SHORT else "I"
    data[entry + 8 : entry + 8 + struct.calcsize(code)] = struct.pack(order + code, value)
    return True


def _sub_entries(data: bytearray, order: str, pointer: int) -> list[int] | None:
    kind, count, offset = struct.unpack(order + "HII", data[pointer + 2 : pointer + 12])
    return _entries(data, order, offset) if kind in (_LONG, _IFD) and count == 1 else None


def _swap(data: bytearray, order: str, entries: list[int], pair: tuple[int, int]) -> None:
    """The values of the two tags of ``pair`` traded (types, counts and where they lie), where both are there."""
    found = {_tag(data, order, entry): entry for entry in entries}
    if pair[0] in found and pair[1] in found:
        first, second = found[pair[0]] + 2, found[pair[1]] + 2
        data[first : first + 10], data[second : second + 10] = data[second : second + 10], data[first : first + 10]


def _set_size(data: bytearray, order: str, entries: list[int], size: tuple[int, int]) -> bool:
    found = {_tag(data, order, entry): entry for entry in entries}
    for axis, (pixels, focal_plane) in enumerate(((PIXEL_X, FOCAL_PLANE_X), (PIXEL_Y, FOCAL_PLANE_Y))):
        if pixels not in found:
            continue
        was = _value(data, order, found[pixels])
        if not _set(data, order, found[pixels], size[axis]):
            return False
        if focal_plane in found and was:
            _scale_resolution(data, order, found[focal_plane], size[axis] / was)
    return True


def _value(data: bytearray, order: str, entry: int) -> int | None:
    """A single SHORT or LONG held in the entry itself, or None."""
    kind, count = struct.unpack(order + "HI", data[entry + 2 : entry + 8])
    if count != 1 or kind not in (_SHORT, _LONG):
        return None
    code = "H" if kind == _SHORT else "I"
    return int(struct.unpack(order + code, data[entry + 8 : entry + 8 + struct.calcsize(code)])[0])


def _scale_resolution(data: bytearray, order: str, entry: int, factor: float) -> None:
    """A single RATIONAL (its denominator kept) or DOUBLE, where it lies, multiplied by ``factor``; left as it is
    if it would not fit."""
    kind, count, offset = struct.unpack(order + "HII", data[entry + 2 : entry + 12])
    if kind not in (_RATIONAL, _DOUBLE) or count != 1 or offset < 8 or offset + 8 > len(data):
        return
    if kind == _DOUBLE:
        (was,) = struct.unpack(order + "d", data[offset : offset + 8])
        data[offset : offset + 8] = struct.pack(order + "d", was * factor)
        return
    (numerator,) = struct.unpack(order + "I", data[offset : offset + 4])
    if 0 < (scaled := round(numerator * factor)) <= 0xFFFFFFFF:
        data[offset : offset + 4] = struct.pack(order + "I", scaled)
