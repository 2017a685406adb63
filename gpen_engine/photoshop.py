"""Photoshop image resources (``8BIM`` blocks): the ones a restored photo keeps, as the source stored them.

They travel in a JPEG's APP13 segments and in a TIFF's tag 34377. Besides the IPTC record they hold the
copyright flag, the rights URL and clipping paths, which archives rely on; others describe the source's pixels
(thumbnails of the unrestored photo, a second copy of the EXIF or XMP, layer state) and would now be wrong, so
only the resources listed here are kept, each block byte for byte (with its name: a path's name is in it).
"""

from __future__ import annotations

import struct

SIGNATURE = b"8BIM"
IPTC = 0x0404
_KEPT = frozenset({
    IPTC,
    0x040A,  # copyright flag
    0x040B,  # URL of the rights
    0x041E,  # URL list
    0x0425,  # caption digest: the IPTC record's MD5, which stays true as the record is kept as it is
    0x0BB7,  # the name of the clipping path
    *range(0x07D0, 0x0BB7),  # paths (clipping paths among them), in coordinates relative to the image's size
})


def blocks(resources: bytes) -> list[tuple[int, bytes]]:
    """(id, block) for each whole block of ``resources`` (a run of 8BIM blocks), in order; a block cut short, and
    what follows it, is left out."""
    found, pos = [], 0
    while pos + 12 <= len(resources) and resources.startswith(SIGNATURE, pos):
        (ident,) = struct.unpack(">H", resources[pos + 4 : pos + 6])
        name_length = resources[pos + 6]
        name_end = pos + 6 + name_length + 1 + (name_length + 1) % 2  # a Pascal string, padded to even
        if name_end + 4 > len(resources):
            break
        (size,) = struct.unpack(">I", resources[name_end : name_end + 4])
        end = name_end + 4 + size + size % 2
        if name_end + 4 + size > len(resources):
            break
        found.append((ident, resources[pos:end].ljust(end - pos, b"\x00")))  # the last pad byte may be missing
        pos = end
    return found


def data_of(resources: bytes, ident: int) -> bytes | None:
    """The data of the first block ``ident`` of ``resources``, or None."""
    for found, raw in blocks(resources):
        if found == ident:
            start = 6 + raw[6] + 1 + (raw[6] + 1) % 2 + 4  # after the name and the size
            (size,) = struct.unpack(">I", raw[start - 4 : start])
            return raw[start : start + size]
    return None


def kept(resources: bytes) -> bytes:
    """The blocks of ``resources`` that a restored photo keeps, concatenated."""
    return b"".join(raw for ident, raw in blocks(resources) if ident in _KEPT)


def block(ident: int, data: bytes) -> bytes:
    """One unnamed resource block."""
    return SIGNATURE + struct.pack(">HHI", ident, 0, len(data)) + data + bytes(len(data) % 2)


def with_iptc(resources: bytes, iptc: bytes | None) -> bytes:
    """The kept blocks of ``resources``, with ``iptc`` as their IPTC record (in place of one they hold)."""
    if not iptc:
        return kept(resources)
    out = [raw for ident, raw in blocks(resources) if ident in _KEPT and ident != IPTC]
    return block(IPTC, iptc) + b"".join(out)
