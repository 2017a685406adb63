"""JPEG structure read and written by hand: marker segments, the end of the first image, what a file promises
after it (MPF indexes, motion photos' videos, gain maps), damage in the compressed data, and segments Pillow
does not carry (Extended XMP, Photoshop's APP13).

Pixels are Pillow's and libjpeg's business (``imageio``); this module only walks markers, so it can judge a
file that is still being written or that libjpeg would decode with a warning nobody sees.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

import simplejpeg

from gpen_engine import photoshop
from gpen_engine import xmp as xmp_packet

APP13_PHOTOSHOP = b"Photoshop 3.0\x00"


def has_end(data: bytes) -> bool:
    return image_end(data) is not None


def image_end(data: bytes, start: int = 0) -> int | None:
    """The offset just past the end marker of the JPEG at ``start``, or None if its headers do not parse
    or no EOI marker follows its first scan.

    Entropy-coded data cannot contain FF D9 (an FF there is always stuffed with 00), so an EOI
    after the first SOS belongs to the image structure, not to pixel data.
    """
    for marker, pos, length in header_segments(data, start):
        if marker == 0xDA:
            eoi = data.find(b"\xff\xd9", pos + 2 + length)
            return None if eoi < 0 else eoi + 2
    return None


def header_segments(data: bytes, start: int = 0) -> Iterator[tuple[int, int, int]]:
    """(marker, offset, length) of each segment of the JPEG at ``start``, up to and including its first scan
    header (SOS); it stops early where the headers do not parse or end."""
    pos, size = start + 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            pos += 2
            continue
        if marker == 0xD9:
            return
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        yield marker, pos, length
        if marker == 0xDA:
            return
        pos += 2 + length


def incomplete_trailer(data: bytes) -> str | None:
    """What is still missing after a JPEG's first image, or None.

    Phones write more after the photo's end marker: further images indexed by MPF (a depth or gain map,
    an MPO's second view), a motion photo's video (XMP ``Container:Directory`` or ``MicroVideoOffset``,
    Samsung's trailer ending in ``SEFT``), or a plain second JPEG. A writer that pauses after the first
    image leaves a file whose first image decodes whole. Only what the file itself promises is checked;
    unknown trailing bytes pass. The readiness gate waits on this; ``decode`` does not (the photo is whole).
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    end = image_end(data)
    size = len(data)
    if end is None:  # the photo itself is not whole: check_complete says why
        return None
    mpf, xmp = index_segments(data)
    if mpf is not None and (promised := mpf_extent(data, mpf)) is not None and promised > size:
        return f"its MPF index places an image up to byte {promised}, but the file has {size} bytes"
    if xmp is not None:
        # The primary item is the photo itself: its length, where a writer gives one, is not after it. A motion
        # flag of 0 says the video is gone (an editor may leave its item listed).
        no_motion = b"0" in (xmp_packet.value(xmp, b"MotionPhoto"), xmp_packet.value(xmp, b"MicroVideo"))
        skip = (b"Primary", b"MotionPhoto") if no_motion else (b"Primary",)
        directory = xmp_packet.directory(xmp)
        items = (directory or xmp).split(b"<rdf:li")[1:]
        lengths = [int(length) for item in items if xmp_packet.value(item, b"Semantic") not in skip
                   if (length := xmp_packet.value(item, b"Length")) is not None and length.isdigit()]
        if lengths and end + sum(lengths) > size:
            return f"its XMP container lists {sum(lengths)} bytes after the photo, but {size - end} are there"
        # Readers ignore the older MicroVideo fields next to a container.
        offset = None if directory or no_motion else xmp_packet.value(xmp, b"MicroVideoOffset")
        if offset is not None and offset.isdigit():
            video = size - int(offset)
            if video < end or data[video + 4 : video + 8] != b"ftyp":
                return "its motion photo's video (XMP MicroVideoOffset) is not all there"
    if data.find(b"MotionPhoto_Data", end) >= 0 and not data.endswith(b"SEFT"):
        return "its Samsung motion photo trailer has no end (SEFT) yet"
    after = end
    while after < size and data[after] == 0:  # padding between the images
        after += 1
    if data.startswith(b"\xff\xd8\xff", after) and image_end(data, after) is None:
        return f"the second image (from byte {after}) has no end marker yet"
    return None


XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"


def index_segments(data: bytes) -> tuple[int | None, bytes | None]:
    """Where the first image's MPF payload starts (after ``MPF\\0``), and its XMP packet, if any."""
    mpf, xmp = None, None
    for marker, pos, length in header_segments(data):
        body = pos + 4
        if marker == 0xE2 and data.startswith(b"MPF\x00", body):
            mpf = body + 4
        elif marker == 0xE1 and xmp is None and data.startswith(XMP_ID, body):
            xmp = data[body + len(XMP_ID) : pos + 2 + length]
    return mpf, xmp


def mpf_entries(data: bytes, base: int) -> list[tuple[int, int, int]] | None:
    """(attribute, length, offset) of each image an MPF index (a TIFF structure at ``base``) lists, or None if
    unreadable. Offsets of the images after the first count from ``base``; the first image's entry has offset 0."""
    try:
        order = {b"II": "<", b"MM": ">"}[data[base : base + 2]]
        ifd = base + struct.unpack(order + "I", data[base + 4 : base + 8])[0]
        (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
        for i in range(min(count, 64)):
            tag, _type, n, value = struct.unpack(order + "HHII", data[ifd + 2 + 12 * i : ifd + 14 + 12 * i])
            if tag != 0xB002:  # MPEntry: 16 bytes per image
                continue
            entries = data[base + value : base + value + n]
            return [(attr, length, offset) for attr, length, offset, _d1, _d2
                    in struct.iter_unpack(order + "IIIHH", entries[: len(entries) // 16 * 16])]
    except (KeyError, struct.error):
        return None
    return None


def mpf_extent(data: bytes, base: int) -> int | None:
    """The end of the last image an MPF index at ``base`` names, or None if unreadable."""
    entries = mpf_entries(data, base)
    ends = [base + offset + length for _attr, length, offset in entries or [] if offset]
    return max(ends, default=None)


# MP type codes (CIPA DC-007) of a "multi-frame" image: a panorama's frames, a stereo pair's views (disparity),
# a multi-angle series. Every view is the picture; the other classes are previews or undefined (a gain map).
_MP_MULTI_FRAME_CLASS = 0x02


def mpf_views(data: bytes) -> int:
    """How many images a JPEG's MPF index lists where any of them is a frame of a multi-frame picture, else 0.

    Writers differ in whether the primary image carries the multi-frame type too, so one such entry is enough."""
    mpf, _ = index_segments(data)
    entries = (mpf_entries(data, mpf) if mpf is not None else None) or []
    multi = any((attr & 0xFFFFFF) >> 16 == _MP_MULTI_FRAME_CLASS for attr, _length, _offset in entries)
    return len(entries) if multi else 0


# A marker inside compressed data: 0xFF not followed by a stuffed 0x00 or by fill (another 0xFF).
_SCAN_MARKER = re.compile(rb"\xff[^\x00\xff]")


# Markers that may follow a scan's compressed data: tables, restart interval, the next scan, comments, APPn, DNL.
_BETWEEN_SCANS = frozenset({0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)})


def damage(data: bytes) -> str | None:
    """Where the first image's compressed data is visibly broken, or None.

    libjpeg only warns about such data (Pillow does not pass the warning on) and shows the rest of the
    image as grey or garbage. Two looks, the cheap one first: markers no encoder writes inside a scan
    (``_marker_damage``), then libjpeg's own warnings from a decode at 1/8 scale (``_decoder_warning``),
    which catches Huffman data that falls out of step without a single 0xFF byte in it. Damage that keeps
    the Huffman decoding in step cannot be told from pixels; a missing end is ``check_complete``'s business.
    """
    return _marker_damage(data) or _decoder_warning(data)


def _decoder_warning(data: bytes) -> str | None:
    """libjpeg-turbo's warning about the compressed data, or None (also when it cannot decode this JPEG).

    simplejpeg's strict mode turns the warnings Pillow drops into errors. At 1/8 scale libjpeg still
    decodes every Huffman code (which is where damage shows) but skips most of the inverse DCT: ~15 ms
    for 12 megapixels, outside the GIL. A strict failure counts only if the lenient decode then works:
    a JPEG simplejpeg cannot read at all (12-bit, arithmetic coding) says nothing about damage.
    """
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=True, fastupsample=True,
                               min_height=1, min_width=1, strict=True)
        return None
    except ValueError as exc:
        warning = str(exc).strip()
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=True, fastupsample=True,
                               min_height=1, min_width=1, strict=False)
    except ValueError:
        return None
    return f"libjpeg: {warning.rstrip('.')}"


def _marker_damage(data: bytes) -> str | None:
    """Damage that shows as markers no encoder writes inside a scan: a reserved or out-of-place marker, a
    restart marker without a restart interval or out of its 0-7 cycle, or bytes after a table segment that
    are not the next marker."""
    pos, size, interval, in_scans = 2, len(data), 0, False
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return f"bytes that are no marker at byte {pos}, after the compressed data" if in_scans else None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDD and length >= 4 and pos + 6 <= size:
            interval = struct.unpack(">H", data[pos + 4 : pos + 6])[0]
        pos += 2 + length
        if marker != 0xDA:
            continue
        in_scans, restart = True, 0  # restart markers count 0-7 again in every scan
        while True:
            found = _SCAN_MARKER.search(data, pos)  # in C: a 12-megapixel scan holds ~25,000 stuffed 0xFF bytes
            if found is None:
                return None
            ff, following = found.start(), data[found.start() + 1]
            if 0xD0 <= following <= 0xD7:
                if not interval or following != 0xD0 + restart:
                    return f"a restart marker out of place at byte {ff}"
                restart, pos = (restart + 1) % 8, ff + 2
                continue
            if following == 0xD9:
                return None
            if following not in _BETWEEN_SCANS:
                return f"marker 0xFF{following:02X}, which has no place there, at byte {ff}"
            pos = ff
            break
    return None


XMP_EXTENSION = b"http://ns.adobe.com/xmp/extension/\x00"


def extended_xmp(data: bytes) -> list[bytes]:
    """A JPEG's Extended XMP segments (APP1 bodies), as stored: the properties too large for the main packet
    (Photoshop's history, Camera Raw settings), which the main packet's ``xmpNote:HasExtendedXMP`` points to."""
    return [data[pos + 4 : pos + 2 + length] for marker, pos, length in header_segments(data)
            if marker == 0xE1 and data.startswith(XMP_EXTENSION, pos + 4)]


def app13_resources(data: bytes) -> bytes:
    """A JPEG's Photoshop resources: the 8BIM blocks of its APP13 segments, in order.

    Photoshop continues a long run in the next segment, so the bodies are read joined. Other writers close each
    segment (with padding, or a block cut short): where the joined run does not read to its end, each segment's
    blocks are read on their own instead."""
    bodies = [data[pos + 4 + len(APP13_PHOTOSHOP) : pos + 2 + length] for marker, pos, length in header_segments(data)
              if marker == 0xED and data.startswith(APP13_PHOTOSHOP, pos + 4)]
    joined = b"".join(bodies)
    blocks = photoshop.blocks(joined)
    if sum(len(raw) for _, raw in blocks) >= len(joined.rstrip(b"\0")):
        return b"".join(raw for _, raw in blocks)
    return b"".join(raw for body in bodies for _, raw in photoshop.blocks(body))


def with_app13(jpeg: bytes, resources: bytes) -> bytes:
    """``jpeg`` with APP13 segments holding Photoshop ``resources`` (8BIM blocks: the IPTC record and those
    ``photoshop.kept`` keeps), put where Photoshop puts them: after the JFIF and EXIF/XMP segments (APP0, APP1),
    before the rest. A run too long for one segment continues in the next, as Photoshop writes it (whole blocks
    to a segment where they fit, so that a reader taking each segment alone still finds them)."""
    room = 0xFFFF - 2 - len(APP13_PHOTOSHOP)
    bodies: list[bytes] = []
    for _, raw in photoshop.blocks(resources):
        if bodies and len(bodies[-1]) + len(raw) <= room:
            bodies[-1] += raw
        else:
            bodies += [raw[i : i + room] for i in range(0, len(raw), room)]
    segments = [b"\xff\xed" + struct.pack(">H", len(APP13_PHOTOSHOP) + len(body) + 2) + APP13_PHOTOSHOP + body
                for body in bodies]
    return with_segments(jpeg, segments)


def with_segments(jpeg: bytes, segments: list[bytes]) -> bytes:
    """``jpeg`` with whole marker ``segments`` inserted after its JFIF, EXIF and XMP segments (APP0, APP1)."""
    pos = 2  # after SOI
    while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF and jpeg[pos + 1] in (0xE0, 0xE1):
        pos += 2 + struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
    return jpeg[:pos] + b"".join(segments) + jpeg[pos:]
