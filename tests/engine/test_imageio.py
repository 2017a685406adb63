"""Tests for gpen_engine.imageio: images are generated in the tests (plus the shared Solvay photo)."""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, ImageOps, PngImagePlugin

from gpen_engine import imageio, jpeg, photoshop
from gpen_engine.imageio import (
    check_complete,
    decode,
    encode,
    extension_for,
    resize_long_side,
)
from gpen_engine.jpeg import damage as jpeg_damage
from gpen_engine.jpeg import incomplete_trailer
from gpen_engine.options import EncodeOptions
from gpen_engine.types import EngineError, ImageTooLarge, InputError, UnsupportedImage

FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP")
LOSSLESS = ("PNG", "TIFF", "BMP")


def _photo(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some texture (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.0 * x], axis=2) * 200 + 20
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _save(pil: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    pil.save(buffer, fmt, **params)
    return buffer.getvalue()


def _open(data: bytes) -> Image.Image:
    pil = Image.open(io.BytesIO(data))
    pil.load()
    return pil


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png16(samples: np.ndarray, colour_type: int, exif: bytes | None = None, trns: bytes | None = None) -> bytes:
    """A 16-bit PNG assembled by hand (Pillow cannot write 16-bit colour; OpenCV cannot write gray+alpha)."""
    height, width = samples.shape[:2]
    rows = samples.astype(">u2").reshape(height, -1).view(np.uint8)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    extra = _png_chunk(b"eXIf", exif[6:]) if exif else b""
    extra += _png_chunk(b"tRNS", trns) if trns else b""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _set_tiff_tag(data: bytes, tag: int, value: int, page: int = 0) -> bytes:
    """``data`` (a little-endian TIFF) with the SHORT ``tag`` of page ``page`` set to ``value``."""
    out = bytearray(data)
    offset = struct.unpack("<I", out[4:8])[0]
    for _ in range(page):
        count = struct.unpack("<H", out[offset : offset + 2])[0]
        offset = struct.unpack("<I", out[offset + 2 + 12 * count : offset + 6 + 12 * count])[0]
    count = struct.unpack("<H", out[offset : offset + 2])[0]
    for entry in range(offset + 2, offset + 2 + 12 * count, 12):
        if struct.unpack("<H", out[entry : entry + 2])[0] == tag:
            out[entry + 8 : entry + 10] = struct.pack("<H", value)
            return bytes(out)
    raise KeyError(tag)


def _lzw(rows: np.ndarray) -> bytes:
    """16-bit samples (HxWxC) LZW-compressed as one TIFF strip, by Pillow's libtiff (as 16-bit gray)."""
    data = _save(Image.fromarray(np.ascontiguousarray(rows.reshape(rows.shape[0], -1))), "TIFF", compression="tiff_lzw")
    (offset,), (length,) = _tiff_tag(data, 273), _tiff_tag(data, 279)
    return data[offset : offset + length]


def _tiff16(
    samples: np.ndarray, photometric: int, extra: tuple[int, ...] = (), *, deflate: bool = False,
    lzw: bool = False, planar: bool = False, strip_rows: int | None = None, tags: dict[int, int] | None = None,
) -> bytes:
    """A little-endian 16-bit TIFF written by hand (Pillow writes 16 bits for one sample per pixel only).

    ``deflate`` or ``lzw`` store rows as horizontal differences (predictor 2), zlib- or LZW-compressed,
    as Photoshop does; ``planar`` stores each sample in a plane of its own; ``strip_rows`` cuts each
    plane into strips of that many rows; ``tags`` adds SHORT tags (orientation, ...).
    """
    height, width, count = samples.shape
    strip_rows = strip_rows or height
    strips = []
    for plane in [samples[:, :, i : i + 1] for i in range(count)] if planar else [samples]:
        for top in range(0, height, strip_rows):
            part = plane[top : top + strip_rows]
            rows = part.astype(np.uint16)
            if deflate or lzw:
                rows[:, 1:] -= part[:, :-1].astype(np.uint16)  # wraps modulo 2**16, as the predictor does
            raw = rows.astype("<u2").tobytes()
            strips.append(zlib.compress(raw) if deflate else _lzw(rows) if lzw else raw)
    offsets = list(np.cumsum([8] + [len(s) for s in strips[:-1]]))
    entries = {256: (4, [width]), 257: (4, [height]), 258: (3, [16] * count),
               259: (3, [8 if deflate else 5 if lzw else 1]), 262: (3, [photometric]), 273: (4, offsets),
               277: (3, [count]), 278: (4, [strip_rows]), 279: (4, [len(s) for s in strips]),
               284: (3, [2 if planar else 1])}
    entries.update({tag: (3, [value]) for tag, value in (tags or {}).items()})
    if deflate or lzw:
        entries[317] = (3, [2])
    if extra:
        entries[338] = (3, list(extra))
    body, directory = b"".join(strips), b""
    for tag, (kind, values) in sorted(entries.items()):
        payload = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        if len(payload) > 4:
            body += b"\0" * (len(body) % 2)
            directory += struct.pack("<HHII", tag, kind, len(values), 8 + len(body))
            body += payload
        else:
            directory += struct.pack("<HHI", tag, kind, len(values)) + payload.ljust(4, b"\0")
    body += b"\0" * (len(body) % 2)
    return (b"II*\0" + struct.pack("<I", 8 + len(body)) + body + struct.pack("<H", len(entries)) + directory
            + bytes(4))


def _bigtiff16_planar(samples: np.ndarray) -> bytes:
    """An uncompressed little-endian BigTIFF of HxWx3 uint16 RGB stored plane by plane, one strip per plane."""
    height, width, planes = samples.shape
    plane_bytes = [np.ascontiguousarray(samples[:, :, i]).astype("<u2").tobytes() for i in range(planes)]
    entries = 10
    ifd_end = 16 + 8 + 20 * entries + 8
    offsets_at, counts_at = ifd_end, ifd_end + 8 * planes
    data_at = counts_at + 8 * planes
    strip_offsets = [data_at + i * len(plane_bytes[0]) for i in range(planes)]

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack("<HHQ", tag, kind, count) + value.ljust(8, b"\0")

    short, long8 = 3, 16
    ifd = struct.pack("<Q", entries) + b"".join([
        entry(256, short, 1, struct.pack("<H", width)),
        entry(257, short, 1, struct.pack("<H", height)),
        entry(258, short, planes, struct.pack(f"<{planes}H", *([16] * planes))),
        entry(259, short, 1, struct.pack("<H", 1)),
        entry(262, short, 1, struct.pack("<H", 2)),
        entry(273, long8, planes, struct.pack("<Q", offsets_at)),
        entry(277, short, 1, struct.pack("<H", planes)),
        entry(278, short, 1, struct.pack("<H", height)),
        entry(279, long8, planes, struct.pack("<Q", counts_at)),
        entry(284, short, 1, struct.pack("<H", 2)),
    ]) + struct.pack("<Q", 0)
    header = b"II" + struct.pack("<HHHQ", 43, 8, 0, 16)
    tables = struct.pack(f"<{planes}Q", *strip_offsets) + struct.pack(f"<{planes}Q", *map(len, plane_bytes))
    return header + ifd + tables + b"".join(plane_bytes)


def _tiff_tag(data: bytes, tag: int) -> tuple[int, ...]:
    """The SHORT or LONG values of ``tag`` in the first directory of a little-endian TIFF (() if absent)."""
    start = struct.unpack("<I", data[4:8])[0]
    for entry in range(start + 2, start + 2 + 12 * struct.unpack("<H", data[start : start + 2])[0], 12):
        found, kind, count, where = struct.unpack("<HHII", data[entry : entry + 12])
        if found == tag:
            code = f"<{count}{'H' if kind == 3 else 'I'}"
            size = struct.calcsize(code)
            return struct.unpack(code, data[entry + 8 : entry + 8 + size] if size <= 4 else data[where : where + size])
    return ()


def _tiff_directory_at_16(pil: Image.Image, between: bytes) -> bytes:
    """``pil`` as an uncompressed TIFF whose directory lies at byte 16, ``between`` (8 bytes) before it.

    Pillow writes the directory at byte 8 with everything else after it, so every offset moves by 8."""
    plain = _save(pil, "TIFF")
    assert plain[:8] == b"II*\0\x08\0\0\0"
    count = struct.unpack_from("<H", plain, 8)[0]
    table = bytearray(plain[8 : 8 + 2 + 12 * count + 4])
    for at in range(2, 2 + 12 * count, 12):
        tag, kind, n = struct.unpack_from("<HHI", table, at)
        size = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8}.get(kind, 0) * n
        if size > 4 or tag == 273:  # a value stored elsewhere, or the one strip's offset held in the entry
            code = "<H" if size <= 4 and kind == 3 else "<I"
            struct.pack_into(code, table, at + 8, struct.unpack_from(code, table, at + 8)[0] + 8)
    return plain[:4] + struct.pack("<I", 16) + between + bytes(table) + plain[8 + len(table) :]


def _camera_exif(order: str, orientation: int, pixel_type: int, width: int, height: int,
                 ifd0_extra: tuple[tuple[int, int], ...] = (), thumb: bytes = b"\xff\xd8\xff\xd9",
                 trailer: bytes = b"") -> tuple[bytes, dict[str, int]]:
    """An EXIF block laid out as a camera writes it, and where its changeable values lie (offsets into its TIFF part).

    IFD0: Make, Orientation (SHORT), the Exif pointer and ``ifd0_extra`` (tag, SHORT value) entries, linked to an
    IFD1 with a thumbnail. Exif sub-IFD: ExifVersion and UserComment and a MakerNote (both UNDEFINED), the maker
    note a directory of its own whose value is found by absolute offset (as Canon's are), and PixelX/YDimension
    (``pixel_type`` SHORT or LONG) = ``width`` x ``height``. ``trailer``: bytes some writer put after the thumbnail.
    """
    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack(order + "HHI", tag, kind, count) + value.ljust(4, b"\0")

    def long(value: int) -> bytes:
        return struct.pack(order + "I", value)

    def pixels(value: int) -> bytes:
        return struct.pack(order + ("H" if pixel_type == 3 else "I"), value)

    ifd0_count = 3 + len(ifd0_extra)
    make_at = 8 + 2 + 12 * ifd0_count + 4
    exif_at = make_at + 6
    comment_at = exif_at + 2 + 12 * 5 + 4
    comment = b"ASCII\0\0\0Grandma, restored"
    note_at = comment_at + len(comment)
    note_text_at = note_at + 2 + 12 + 4
    note = struct.pack(order + "H", 1) + entry(1, 2, 8, long(note_text_at)) + long(0) + b"EOS 5D\0\0"
    ifd1_at = note_at + len(note)
    thumb_at = ifd1_at + 2 + 24 + 4
    ifd0 = sorted([(0x010F, entry(0x010F, 2, 6, long(make_at))),
                   (0x0112, entry(0x0112, 3, 1, struct.pack(order + "H", orientation))),
                   (0x8769, entry(0x8769, 4, 1, long(exif_at))),
                   *((tag, entry(tag, 3, 1, struct.pack(order + "H", value))) for tag, value in ifd0_extra)])
    block = (b"II*\0" if order == "<" else b"MM\0*") + long(8)
    block += struct.pack(order + "H", ifd0_count) + b"".join(e for _, e in ifd0) + long(ifd1_at) + b"Canon\0"
    block += struct.pack(order + "H", 5) + b"".join([
        entry(0x9000, 7, 4, b"0231"), entry(0x9286, 7, len(comment), long(comment_at)),
        entry(0x927C, 7, len(note), long(note_at)),
        entry(0xA002, pixel_type, 1, pixels(width)), entry(0xA003, pixel_type, 1, pixels(height))]) + long(0)
    block += comment + note
    block += struct.pack(order + "H", 2) + entry(0x0201, 4, 1, long(thumb_at)) + entry(0x0202, 4, 1, long(len(thumb)))
    block += long(0) + thumb + trailer
    orientation_at = 8 + 2 + 12 * [tag for tag, _ in ifd0].index(0x0112) + 8
    places = {"orientation": orientation_at, "next_ifd": make_at - 4, "pixel_x": exif_at + 2 + 12 * 3 + 8,
              "pixel_y": exif_at + 2 + 12 * 4 + 8, "maker_note": note_at, "thumbnail": thumb_at}
    return b"Exif\0\0" + block, places


def _exif_tiff(block: bytes) -> bytes:
    """The TIFF structure of an EXIF block as a reader hands it back (with or without the APP1 header)."""
    return block[6:] if block.startswith(b"Exif\0\0") else block


def _bmp_with_alpha(rgba: np.ndarray) -> bytes:
    """A 32-bit BMP as Photoshop and GIMP write one with alpha: BITMAPV4HEADER, BI_BITFIELDS with an alpha mask."""
    height, width = rgba.shape[:2]
    pixels = np.ascontiguousarray(rgba[::-1][:, :, [2, 1, 0, 3]]).tobytes()
    info = struct.pack("<IiiHHIIiiII", 108, width, height, 1, 32, 3, len(pixels), 2835, 2835, 0, 0)
    info += struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000) + b"BGRs" + bytes(48)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels

def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


class TestRoundTrip:
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_each_format_round_trips_in_its_own_format(self, fmt: str) -> None:
        """Decoding then encoding an unchanged image gives the same format, size and (lossless) pixels."""
        rgb = _photo()
        image = decode(_save(Image.fromarray(rgb), fmt))
        assert (fmt, (64, 48), False) == (image.format, image.size, image.grayscale)
        data, written = encode(image, image.rgb, options=EncodeOptions())
        back = _open(data)
        assert (fmt, "RGB", (64, 48)) == (written, back.mode, back.size)
        error = np.abs(np.asarray(back).astype(int) - image.rgb.astype(int))
        assert error.max() == 0 if fmt in LOSSLESS else error.mean() < 4

    def test_format_override_writes_the_requested_format(self) -> None:
        """options.format replaces the input's format."""
        image = decode(_save(Image.fromarray(_photo()), "PNG"))
        data, written = encode(image, image.rgb, options=EncodeOptions(format="jpeg", jpeg_quality=80))
        assert (written, _open(data).format) == ("JPEG", "JPEG")

    def test_jpeg_quality_option_is_used(self) -> None:
        """A lower JPEG quality gives a smaller file."""
        image = decode(_save(Image.fromarray(_photo(128, 128)), "PNG"))
        high, _ = encode(image, image.rgb, options=EncodeOptions(format="JPEG", jpeg_quality=95))
        low, _ = encode(image, image.rgb, options=EncodeOptions(format="JPEG", jpeg_quality=30))
        assert len(low) < len(high)

    def test_tiny_and_thin_images_decode_and_encode(self) -> None:
        """1x1 and 1x5000 images survive decode and encode."""
        for height, width in ((1, 1), (1, 5000), (5000, 1)):
            rgb = _photo(height, width)
            image = decode(_save(Image.fromarray(rgb), "PNG"))
            data, _ = encode(image, image.rgb, options=EncodeOptions())
            np.testing.assert_array_equal(rgb, np.asarray(_open(data)))

    def test_decoding_and_encoding_are_thread_safe(self) -> None:
        """Many images decoded and re-encoded in a thread pool give the same bytes as one by one."""
        files = [_save(Image.fromarray(_photo(seed=i)), fmt) for i, fmt in enumerate(FORMATS * 3)]

        def round_trip(data: bytes) -> bytes:
            image = decode(data)
            return encode(image, image.rgb, options=EncodeOptions())[0]

        expected = [round_trip(f) for f in files]
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert list(pool.map(round_trip, files)) == expected

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_encoding_gives_pillows_own_bytes(self, fmt: str) -> None:
        """Encoding through an in-memory file (so the GIL is free) writes what Pillow writes to a buffer."""
        pil = Image.fromarray(_photo(300, 200))
        icc = _srgb_icc()
        source: dict[str, object] = {"icc_profile": icc} if fmt != "BMP" else {}
        if fmt == "TIFF":
            source["compression"] = "tiff_lzw"
        image = decode(_save(pil, fmt, **source))
        data, _ = encode(image, image.rgb, options=EncodeOptions())
        params: dict[str, object] = {"icc_profile": icc} if fmt != "BMP" else {}
        if fmt == "JPEG":
            params.update(quality=EncodeOptions().jpeg_quality, subsampling=image.info["jpeg_subsampling"],
                          progressive=False)
        elif fmt == "WEBP":
            params.update(quality=EncodeOptions().webp_quality, lossless=False)
        elif fmt == "TIFF":
            params.update(compression="tiff_lzw")
        elif fmt == "PNG":
            params.update(pnginfo=PngImagePlugin.PngInfo())
        expected = _save(Image.fromarray(image.rgb), fmt, **params)
        if fmt == "TIFF":  # libtiff lays out a real file differently (directory first): same image
            back, reference = _open(data), _open(expected)
            np.testing.assert_array_equal(np.asarray(reference), np.asarray(back))
            assert (reference.info.get("icc_profile"), reference.info.get("compression")) == (
                back.info.get("icc_profile"), back.info.get("compression"))
        else:
            assert expected == data

    def test_encoding_works_where_in_memory_files_are_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A sandbox that refuses memfd_create (or a system without it) still gets the same JPEG."""
        image = decode(_save(Image.fromarray(_photo()), "JPEG"))
        expected, _ = encode(image, image.rgb, options=EncodeOptions())

        def refused(*_args: object) -> int:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "memfd_create", refused)
        assert (expected, "JPEG") == encode(image, image.rgb, options=EncodeOptions())
        monkeypatch.delattr(os, "memfd_create")
        assert (expected, "JPEG") == encode(image, image.rgb, options=EncodeOptions())

    def test_real_rgba_png_with_icc_round_trips(self, shared_dir: Path) -> None:
        """The Solvay photo (RGBA PNG with ICC, XMP, DPI) comes back with identical pixels and metadata."""
        data = (shared_dir / "testdata" / "solvay_1927.png").read_bytes()
        image = decode(data)
        written = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        source = _open(data)
        assert (written.format, written.mode, written.size) == ("PNG", source.mode, source.size)
        np.testing.assert_array_equal(np.asarray(source), np.asarray(written))
        for key in ("icc_profile", "xmp"):
            assert written.info.get(key) == source.info.get(key), key


class TestOrientation:
    @pytest.mark.parametrize("orientation", range(1, 9))
    def test_exif_orientation_is_applied_like_a_viewer_would(self, orientation: int) -> None:
        """Every EXIF orientation yields the upright pixels a viewer shows, and the tag is reset to 1."""
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _save(Image.fromarray(_photo(20, 40)), "PNG", exif=exif)
        image = decode(data)
        np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(_open(data))), image.rgb)
        written = Image.open(io.BytesIO(_save(Image.new("RGB", (1, 1)), "PNG", exif=image.exif)))
        assert written.getexif()[0x0112] == 1

    @pytest.mark.parametrize("orientation", [6, 8])
    def test_rotated_jpeg_comes_out_rotated_and_stays_upright_when_written(self, orientation: int) -> None:
        """A landscape JPEG tagged 6/8 decodes as portrait and is written upright, tagged 1."""
        exif = Image.Exif()
        exif[0x0112] = orientation
        exif.get_ifd(0x8769)[0x9003] = "2001:02:03 04:05:06"  # DateTimeOriginal in the Exif sub-IFD
        image = decode(_save(Image.fromarray(_photo(20, 40)), "JPEG", exif=exif, quality=95))
        assert image.size == (20, 40)
        data, _ = encode(image, image.rgb, options=EncodeOptions())
        written = _open(data)
        assert (written.size, written.getexif()[0x0112]) == ((20, 40), 1)
        assert written.getexif().get_ifd(0x8769)[0x9003] == "2001:02:03 04:05:06"
        assert check_complete(data) == (20, 40)

    def test_check_complete_reports_displayed_size(self) -> None:
        """The readiness check returns the upright width and height."""
        exif = Image.Exif()
        exif[0x0112] = 6
        assert check_complete(_save(Image.fromarray(_photo(20, 40)), "JPEG", exif=exif)) == (20, 40)


class TestModes:
    @pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
    def test_alpha_is_kept(self, fmt: str) -> None:
        """RGBA input: the working copy is RGB, and the written file has the same alpha channel."""
        rgb = _photo()
        alpha = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
        image = decode(_save(Image.fromarray(np.dstack([rgb, alpha])), fmt, lossless=True))
        assert image.rgb.shape == (48, 64, 3)
        np.testing.assert_array_equal(alpha, image.alpha)
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert back.mode == "RGBA"
        np.testing.assert_array_equal(alpha, np.asarray(back)[:, :, 3])

    @pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
    def test_colours_under_transparent_pixels_survive_a_lossless_format(self, fmt: str) -> None:
        """A fully transparent pixel still holds a colour (a mask someone may lift later): a lossless result keeps
        it, as it keeps every other pixel away from faces. libwebp throws it away unless told not to."""
        rgb = _photo()
        alpha = np.full((48, 64), 255, np.uint8)
        alpha[:, 40:] = 0
        image = decode(_save(Image.fromarray(np.dstack([rgb, alpha])), fmt, lossless=True, exact=True))
        np.testing.assert_array_equal(rgb, image.rgb)
        back = np.asarray(_open(encode(image, image.rgb, options=EncodeOptions())[0]))
        np.testing.assert_array_equal(np.dstack([rgb, alpha]), back)

    def test_bmp_alpha_is_kept(self) -> None:
        """A 32-bit BMP with alpha comes back with the same alpha and colours, not flattened onto white."""
        rgba = np.dstack([_photo(), np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))])
        image = decode(_bmp_with_alpha(rgba))
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert ("BMP", "RGBA") == (back.format, back.mode)
        np.testing.assert_array_equal(rgba, np.asarray(back))
        assert (72, 72) == tuple(round(float(v)) for v in back.info["dpi"])

    def test_alpha_follows_a_downsized_result(self) -> None:
        """When the preset shrank the image, alpha is resized to the result's size."""
        rgba = np.dstack([_photo(80, 100), np.full((80, 100), 200, np.uint8)])
        image = decode(_save(Image.fromarray(rgba), "PNG"))
        small = resize_long_side(image.rgb, 50)
        back = _open(encode(image, small, options=EncodeOptions())[0])
        assert (back.size, back.mode) == ((50, 40), "RGBA")
        assert int(np.asarray(back)[:, :, 3].mean().round()) == 200

    def test_alpha_dropped_for_jpeg_shows_white_behind_transparent_pixels(self) -> None:
        """Writing an RGBA source as JPEG composites it on white instead of revealing hidden colours."""
        rgba = np.zeros((16, 16, 4), np.uint8)
        image = decode(_save(Image.fromarray(rgba), "PNG"))
        back = np.asarray(_open(encode(image, image.rgb, options=EncodeOptions(format="JPEG"))[0]))
        assert back.min() > 245

    def test_16bit_rgb_png_round_trips_exactly_when_unchanged(self) -> None:
        """A 16-bit RGB PNG is worked at 8 bits and written back with every 16-bit sample intact."""
        rng = np.random.default_rng(1)
        rgb16 = rng.integers(0, 65536, (30, 40, 3), dtype=np.uint16)
        ok, png = cv2.imencode(".png", rgb16[:, :, ::-1])
        image = decode(png.tobytes())
        np.testing.assert_array_equal(rgb16, image.high_bit)
        assert np.abs(image.rgb.astype(int) * 257 - rgb16.astype(int)).max() <= 128
        data, _ = encode(image, image.rgb, options=EncodeOptions())
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(rgb16, back[:, :, ::-1])

    def test_16bit_keeps_untouched_pixels_and_writes_changed_ones(self) -> None:
        """Only the pixels the engine changed differ in the 16-bit output, by the 8-bit change x 257."""
        rgb16 = np.full((20, 20, 3), 30000, np.uint16)
        rgba16 = np.dstack([rgb16, np.full((20, 20), 40000, np.uint16)])
        image = decode(cv2.imencode(".png", rgba16[:, :, [2, 1, 0, 3]])[1].tobytes())
        edited = image.rgb.copy()
        edited[:5, :5] += 10
        back = cv2.imdecode(np.frombuffer(encode(image, edited, options=EncodeOptions())[0], np.uint8),
                            cv2.IMREAD_UNCHANGED)
        assert (np.uint16, 4) == (back.dtype, back.shape[2])
        np.testing.assert_array_equal(rgb16[5:], back[5:, :, :3])
        np.testing.assert_array_equal(30000 + 10 * 257, back[:5, :5, :3])
        np.testing.assert_array_equal(40000, back[:, :, 3])

    @pytest.mark.parametrize("channels", [1, 3])
    def test_16bit_photo_scaled_by_the_preset_is_the_scaled_16bit_photo_away_from_faces(self, channels: int) -> None:
        """The preset's cap scaled a 16-bit photo down and the engine changed one corner: everywhere else the
        result is the 16-bit photo scaled down, sample for sample (not off by 257 where 8-bit rounding differs)."""
        rng = np.random.default_rng(4)
        smooth = cv2.GaussianBlur(rng.integers(0, 65536, (90, 120, 3)).astype(np.float32), (9, 9), 0)
        rgb16 = smooth.astype(np.uint16)[:, :, :channels]
        image = decode(cv2.imencode(".png", rgb16[:, :, ::-1])[1].tobytes())
        given = resize_long_side(image.rgb, 80)  # what the engine was handed
        restored = given.copy()
        restored[:6, :6] = 0
        back = cv2.imdecode(np.frombuffer(encode(image, restored, options=EncodeOptions())[0], np.uint8),
                            cv2.IMREAD_UNCHANGED)
        back = back.reshape(*back.shape[:2], -1)[:, :, ::-1]
        scaled = resize_long_side(rgb16, 80).reshape(*back.shape[:2], -1)
        assert back.dtype == np.uint16 and back.shape == scaled.shape
        np.testing.assert_array_equal(scaled[6:], back[6:])
        assert np.abs(back[:6, :6].astype(int) - scaled[:6, :6].astype(int)).min() > 1000  # the change is there

    def test_16bit_gray_alpha_png_round_trips_exactly(self) -> None:
        """16-bit gray+alpha stays 16-bit gray+alpha with identical samples."""
        gray_alpha = np.random.default_rng(2).integers(0, 65536, (12, 10, 2), dtype=np.uint16)
        image = decode(_png16(gray_alpha, colour_type=4))
        assert image.grayscale
        np.testing.assert_array_equal(gray_alpha[:, :, 1], image.alpha)
        back = decode(encode(image, image.rgb, options=EncodeOptions())[0])
        assert back.grayscale
        np.testing.assert_array_equal(gray_alpha[:, :, :1], back.high_bit)
        np.testing.assert_array_equal(gray_alpha[:, :, 1], back.alpha)

    @pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
    def test_a_compressed_8bit_tiff_is_written_as_row_differences_and_reads_back_the_same(self, mode: str) -> None:
        """LZW with predictor 2, as archives store scans (and as the 16-bit writer does): smaller than plain LZW,
        and every reader gets the same samples back."""
        photo = Image.fromarray(_photo(200, 300)).convert(mode)
        image = decode(_save(photo, "TIFF", compression="tiff_lzw"))
        data = encode(image, image.rgb, options=EncodeOptions())[0]
        back = _open(data)
        assert (back.info["compression"], back.tag_v2.get(317)) == ("tiff_lzw", 2)
        assert len(data) < len(_save(photo, "TIFF", compression="tiff_lzw"))
        np.testing.assert_array_equal(np.asarray(back), np.asarray(photo))
        by_opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # libtiff on its own
        np.testing.assert_array_equal(by_opencv, cv2.imdecode(np.frombuffer(_save(photo, "TIFF"), np.uint8),
                                                              cv2.IMREAD_UNCHANGED))

    def test_16bit_rgb_tiff_round_trips_exactly(self) -> None:
        """A 16-bit RGB TIFF is written back as 16-bit RGB with identical samples."""
        rgb16 = np.random.default_rng(4).integers(0, 65536, (12, 10, 3), dtype=np.uint16)
        image = decode(cv2.imencode(".tiff", rgb16[:, :, ::-1])[1].tobytes())
        data, written = encode(image, image.rgb, options=EncodeOptions())
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert written == "TIFF"
        np.testing.assert_array_equal(rgb16, back[:, :, ::-1])

    def test_16bit_pixels_follow_exif_orientation(self) -> None:
        """The 16-bit samples are rotated together with the 8-bit working copy."""
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb16 = np.random.default_rng(5).integers(0, 65536, (10, 16, 3), dtype=np.uint16)
        image = decode(_png16(rgb16, colour_type=2, exif=exif.tobytes()))
        assert image.size == (10, 16)
        np.testing.assert_array_equal(np.rot90(rgb16, k=-1), image.high_bit)

    @pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
    def test_16bit_grayscale_stays_16bit_grayscale(self, fmt: str) -> None:
        """I;16 input comes back as 16-bit single-channel with identical samples."""
        gray16 = (np.arange(30 * 40, dtype=np.uint32).reshape(30, 40) * 53 % 65536).astype(np.uint16)
        image = decode(_save(Image.fromarray(gray16), fmt))
        assert image.grayscale
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert back.mode.startswith("I;16")
        np.testing.assert_array_equal(gray16, np.asarray(back).astype(np.uint16))

    @pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP"])
    def test_grayscale_stays_grayscale(self, fmt: str) -> None:
        """An 8-bit gray input is worked as replicated RGB and written as a gray image."""
        gray = _photo()[:, :, 0]
        image = decode(_save(Image.fromarray(gray), fmt))
        assert image.grayscale
        np.testing.assert_array_equal(image.rgb[:, :, 0], image.rgb[:, :, 2])
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert back.mode == "L"
        if fmt != "JPEG":
            np.testing.assert_array_equal(gray, np.asarray(back))

    def test_a_gray_photo_written_as_webp_stays_gray(self) -> None:
        """WebP has no gray mode: a gray photo is written as RGB, but with the restored faces' colour taken out."""
        image = decode(_save(Image.fromarray(_photo()[:, :, 0]), "PNG"))
        restored = image.rgb.copy()
        restored[8:24, 8:24] = (200, 120, 90)  # GPEN paints colour into faces of gray photos
        back = np.asarray(_open(encode(image, restored, options=EncodeOptions(format="WEBP"))[0]).convert("RGB"))
        spread = back.max(axis=2).astype(int) - back.min(axis=2)
        assert spread.max() <= 4  # lossy chroma only

    def test_cmyk_jpeg_decodes_to_plausible_rgb(self) -> None:
        """A CMYK JPEG of pure red (C=0, M=Y=100%) becomes red RGB."""
        image = decode(_save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95))
        red, green, blue = image.rgb.reshape(-1, 3).mean(axis=0)
        assert (image.mode, image.grayscale) == ("CMYK", False)
        assert red > 200 and green < 60 and blue < 60

    def test_palette_png_with_transparency_becomes_rgb_and_alpha(self) -> None:
        """A palette PNG with a transparent index keeps its transparency as alpha."""
        indices = np.zeros((10, 10), np.uint8)
        indices[:, 5:] = 1
        pal = Image.fromarray(indices, "P")
        pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        image = decode(_save(pal, "PNG", transparency=1))
        np.testing.assert_array_equal([255, 0, 0], image.rgb[0, 0])
        assert (image.alpha[0, 0], image.alpha[0, 9]) == (255, 0)
        back = np.asarray(_open(encode(image, image.rgb, options=EncodeOptions())[0]).convert("RGBA"))
        assert (back[0, 0, 3], back[0, 9, 3]) == (255, 0)


    @pytest.mark.parametrize("mode", ["RGB", "L"])
    def test_colour_key_transparency_becomes_alpha(self, mode: str) -> None:
        """A PNG whose transparency is one colour (tRNS) keeps those pixels transparent."""
        pixels = np.full((8, 8, 3), 200, np.uint8)
        pixels[:4] = (0, 255, 0)
        source = Image.fromarray(pixels).convert(mode)
        key = source.getpixel((0, 0))
        image = decode(_save(source, "PNG", transparency=key))
        assert (image.alpha[0, 0], image.alpha[7, 0]) == (0, 255)
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        alpha = np.asarray(back.convert("RGBA"))[:, :, 3]
        assert (alpha[0, 0], alpha[7, 0]) == (0, 255)
        assert back.mode == ("LA" if mode == "L" else "RGBA")

    def test_16bit_min_is_white_tiff_is_not_inverted(self) -> None:
        """A 16-bit gray TIFF that stores white as 0 (PhotometricInterpretation 0) is not read as a negative."""
        raw = np.zeros((4, 6), np.uint16)
        raw[:2] = 65535  # black in "min is white"
        data = _set_tiff_tag(_save(Image.fromarray(raw), "TIFF"), 262, 0)
        assert Image.open(io.BytesIO(data)).tag_v2[262] == 0
        image = decode(data)
        assert (image.rgb[0, 0, 0], image.rgb[3, 0, 0]) == (0, 255)
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        shown = np.asarray(back).astype(np.int64)
        if back.tag_v2.get(262) == 0:
            shown = 65535 - shown
        assert (shown[0, 0], shown[3, 0]) == (0, 65535)

    def test_16bit_gray_png_colour_key_becomes_alpha(self) -> None:
        """A 16-bit gray PNG whose transparency is one gray value (tRNS) keeps those pixels transparent."""
        gray16 = np.full((6, 5, 1), 1000, np.uint16)
        gray16[:3] = 54321
        image = decode(_png16(gray16, colour_type=0, trns=struct.pack(">H", 54321)))
        assert image.alpha is not None
        assert (int(image.alpha[0, 0]), int(image.alpha[5, 0])) == (0, 65535)
        data, _ = encode(image, image.rgb, options=EncodeOptions())
        back = decode(data)
        assert (data[25], back.grayscale) == (4, True)  # 16-bit gray + alpha
        np.testing.assert_array_equal(gray16, back.high_bit)
        assert (int(back.alpha[0, 0]), int(back.alpha[5, 0])) == (0, 65535)

    @pytest.mark.parametrize("channels", [2, 4])
    def test_16bit_tiff_with_alpha_says_the_extra_sample_is_alpha(self, channels: int) -> None:
        """A 16-bit TIFF written with alpha tags its last sample as (unassociated) alpha: ExtraSamples = 2."""
        samples = np.random.default_rng(6).integers(0, 65536, (9, 7, channels), dtype=np.uint16)
        if channels == 4:
            image = decode(cv2.imencode(".tiff", samples[:, :, [2, 1, 0, 3]])[1].tobytes())
        else:
            image = decode(_png16(samples, colour_type=4))
        data, written = encode(image, image.rgb, options=EncodeOptions(format="TIFF"))
        assert (written, _tiff_tag(data, 277), _tiff_tag(data, 338)) == ("TIFF", (channels,), (2,))

    @pytest.mark.parametrize(("deflate", "planar"), [(False, False), (True, False), (False, True), (True, True)])
    def test_premultiplied_16bit_tiff_is_not_darkened(self, deflate: bool, planar: bool) -> None:
        """16-bit RGBA with associated alpha (interleaved or planar) is un-premultiplied, and written as
        unassociated alpha."""
        rgb16 = np.random.default_rng(7).integers(0, 65536, (8, 6, 3), dtype=np.uint16)
        alpha16 = np.full((8, 6), 32768, np.uint16)
        alpha16[:, 0] = 65535
        premultiplied = (rgb16.astype(np.uint64) * alpha16[:, :, None] // 65535).astype(np.uint16)
        image = decode(_tiff16(np.dstack([premultiplied, alpha16]), 2, (1,), deflate=deflate, planar=planar))
        assert np.abs(image.high_bit.astype(int) - rgb16.astype(int)).max() <= 2
        np.testing.assert_array_equal(alpha16, image.alpha)
        data, _ = encode(image, image.rgb, options=EncodeOptions())
        assert _open(data).tag_v2.get(338) == (2,)
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(image.high_bit, back[:, :, 2::-1])
        np.testing.assert_array_equal(alpha16, back[:, :, 3])

    @pytest.mark.parametrize("channels", [3, 4])
    @pytest.mark.parametrize("compression", ["raw", "deflate", "lzw"])
    def test_16bit_planar_rgb_tiff_keeps_its_samples(self, compression: str, channels: int) -> None:
        """A 16-bit RGB(A) TIFF stored plane by plane (Photoshop's "per channel" order, ``tiffcp -p separate``)
        decodes to its own 16-bit samples, passes the readiness check and is written back as 16-bit."""
        samples = np.random.default_rng(10).integers(0, 65536, (23, 17, channels), dtype=np.uint16)
        data = _tiff16(samples, 2, (2,) * (channels - 3), planar=True, strip_rows=5,
                       deflate=compression == "deflate", lzw=compression == "lzw")
        image = decode(data)
        mode = "RGBA" if channels == 4 else "RGB"
        assert (image.mode, image.grayscale, check_complete(data)) == (mode, False, (17, 23))
        assert image.high_bit.dtype == np.uint16
        np.testing.assert_array_equal(samples[:, :, :3], image.high_bit)
        assert np.abs(image.rgb * 257.0 - samples[:, :, :3]).max() <= 128.5  # the nearest 8-bit values
        if channels == 4:
            np.testing.assert_array_equal(samples[:, :, 3], image.alpha)
        else:
            assert image.alpha is None
        written, fmt = encode(image, image.rgb, options=EncodeOptions())
        assert (fmt, _tiff_tag(written, 258), _tiff_tag(written, 277)) == ("TIFF", (16,) * channels, (channels,))
        back = cv2.imdecode(np.frombuffer(written, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(samples[:, :, [2, 1, 0, 3][:channels]], back)

    def test_16bit_planar_rgb_tiff_follows_orientation(self) -> None:
        """Orientation 6 turns every plane of a planar 16-bit RGB TIFF together."""
        samples = np.random.default_rng(11).integers(0, 65536, (4, 6, 3), dtype=np.uint16)
        data = _tiff16(samples, 2, planar=True, deflate=True, tags={274: 6})
        image = decode(data)
        assert (image.size, check_complete(data)) == ((4, 6), (4, 6))
        np.testing.assert_array_equal(np.rot90(samples, k=-1), image.high_bit)

    def test_16bit_tiff_unspecified_extra_sample_is_not_alpha(self) -> None:
        """A 16-bit RGB TIFF's 4th sample marked "unspecified" (ExtraSamples = 0) is ignored, as Pillow does, and
        the image says so: the result cannot carry it (the backup does)."""
        samples = np.random.default_rng(8).integers(0, 65536, (4, 5, 4), dtype=np.uint16)
        image = decode(_tiff16(samples, 2, (0,)))
        assert image.alpha is None and image.mode == "RGB"
        np.testing.assert_array_equal(samples[:, :, :3], image.high_bit)
        assert "1 extra channel the TIFF does not call alpha" in str(image.info["dropped"])

    def test_an_8bit_tiff_s_unspecified_extra_channels_are_named_as_dropped(self) -> None:
        """RGB plus a channel that is not alpha (a mask, a spot colour): Pillow reads the colours only. The
        photo is restored, with a note that the result lacks the extra channel; plain RGBA has no such note."""
        rgbx = np.random.default_rng(9).integers(0, 255, (20, 30, 4), dtype=np.uint8)
        image = decode(_save(Image.fromarray(rgbx, "RGBX"), "TIFF"))
        np.testing.assert_array_equal(rgbx[:, :, :3], image.rgb)
        assert "1 extra channel" in str(image.info["dropped"])
        assert "dropped" not in decode(_save(Image.fromarray(rgbx, "RGBA"), "TIFF")).info

    def test_16bit_cmyk_tiff_decodes_like_8bit_cmyk(self) -> None:
        """A 16-bit CMYK TIFF of pure red (C=0, M=Y=100%) becomes red RGB instead of being refused."""
        cmyk = np.zeros((6, 8, 4), np.uint16)
        cmyk[:, :, 1:3] = 65535
        data = _tiff16(cmyk, 5)
        image = decode(data)
        assert (image.mode, image.grayscale, check_complete(data)) == ("CMYK", False, (8, 6))
        red, green, blue = image.rgb.reshape(-1, 3).mean(axis=0)
        assert red > 200 and green < 60 and blue < 60
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert (back.format, back.mode) == ("TIFF", "RGB")

    @pytest.mark.parametrize(("deflate", "planar"), [(False, False), (True, False), (False, True), (True, True)])
    def test_16bit_gray_alpha_tiff_round_trips_exactly(self, deflate: bool, planar: bool) -> None:
        """16-bit gray+alpha TIFFs (interleaved or planar, with or without a predictor) stay 16-bit gray+alpha."""
        gray_alpha = np.random.default_rng(9).integers(0, 65536, (11, 13, 2), dtype=np.uint16)
        data = _tiff16(gray_alpha, 1, (2,), deflate=deflate, planar=planar)
        image = decode(data)
        assert (image.grayscale, image.mode, check_complete(data)) == (True, "LA", (13, 11))
        np.testing.assert_array_equal(gray_alpha[:, :, :1], image.high_bit)
        np.testing.assert_array_equal(gray_alpha[:, :, 1], image.alpha)
        written, _ = encode(image, image.rgb, options=EncodeOptions())
        back = decode(written)
        assert back.grayscale
        np.testing.assert_array_equal(gray_alpha[:, :, :1], back.high_bit)
        np.testing.assert_array_equal(gray_alpha[:, :, 1], back.alpha)
        for cut in range(8, len(data), max(1, len(data) // 15)):
            with pytest.raises(InputError):
                check_complete(data[:cut])

    def test_16bit_gray_alpha_tiff_follows_orientation_and_premultiplication(self) -> None:
        """Orientation 6 turns gray and alpha together; associated alpha is divided out of the gray."""
        gray = np.tile(np.arange(0, 60000, 10000, dtype=np.uint16), (4, 1))
        alpha = np.full((4, 6), 32768, np.uint16)
        stored = (gray.astype(np.uint64) * alpha // 65535).astype(np.uint16)
        data = _tiff16(np.dstack([stored, alpha]), 1, (1,), deflate=True, tags={274: 6})
        image = decode(data)
        assert (image.size, check_complete(data)) == ((4, 6), (4, 6))
        assert np.abs(image.high_bit[:, :, 0].astype(int) - np.rot90(gray, k=-1).astype(int)).max() <= 2
        np.testing.assert_array_equal(np.rot90(alpha, k=-1), image.alpha)


class TestMetadata:
    @pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
    def test_icc_profile_is_kept(self, fmt: str) -> None:
        """The input's ICC profile is embedded in the output."""
        icc = _srgb_icc()
        image = decode(_save(Image.fromarray(_photo()), fmt, icc_profile=icc))
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert icc == back.info.get("icc_profile")

    @pytest.mark.parametrize("order", ["<", ">"])
    @pytest.mark.parametrize(("fmt", "pixel_type"), [("JPEG", 4), ("JPEG", 3), ("PNG", 4), ("WEBP", 3)])
    def test_camera_exif_is_kept_byte_for_byte_with_orientation_and_size_patched(
        self, fmt: str, pixel_type: int, order: str
    ) -> None:
        """A rotated photo's EXIF comes back as the camera wrote it, in either byte order: the same tag types and
        every value at its offset (so a maker note's own absolute offsets still hold). Only Orientation (now 1) and
        PixelX/YDimension (the upright size, in their own type) change, and the old thumbnail (the unrestored photo,
        faces and all) is unlinked and, as it ends the block, cut off."""
        block, at = _camera_exif(order, 6, pixel_type, 40, 20)
        image = decode(_save(Image.fromarray(_photo(20, 40)), fmt, exif=block, lossless=True))
        written = _exif_tiff(_open(encode(image, image.rgb, options=EncodeOptions())[0]).info["exif"])
        code = "H" if pixel_type == 3 else "I"
        expected = bytearray(_exif_tiff(block))
        for place, value, kind in (("orientation", 1, "H"), ("next_ifd", 0, "I"), ("pixel_x", 20, code),
                                   ("pixel_y", 40, code)):
            struct.pack_into(order + kind, expected, at[place], value)
        del expected[at["thumbnail"]:]
        assert bytes(expected) == written
        assert b"\xff\xd8\xff\xd9" not in written  # the thumbnail JPEG is gone, not only unlinked

    def test_a_thumbnail_with_bytes_after_it_is_zeroed_and_everything_else_stays(self) -> None:
        """Where something follows the thumbnail in the block, nothing moves: the thumbnail's bytes are zeroed."""
        block, at = _camera_exif("<", 1, 3, 64, 48, trailer=b"vendor data")
        image = decode(_save(Image.fromarray(_photo()), "JPEG", exif=block))
        written = _exif_tiff(_open(encode(image, image.rgb, options=EncodeOptions())[0]).info["exif"])
        expected = bytearray(_exif_tiff(block))
        struct.pack_into("<I", expected, at["next_ifd"], 0)
        expected[at["thumbnail"] : at["thumbnail"] + 4] = bytes(4)
        assert bytes(expected) == written

    def test_a_value_after_the_thumbnail_is_not_cut_off_with_it_even_when_it_is_all_zeros(self) -> None:
        """A writer that stores a value (a blank UserComment) after the thumbnail: cutting the thumbnail off stops
        where that value ends, or its offset would point past the block and a reader lose the Exif directory."""
        blank = bytes(24)
        block, at = _camera_exif("<", 1, 3, 64, 48, trailer=blank)
        tiff_part = bytearray(_exif_tiff(block))
        exif_at = at["pixel_x"] - 8 - 12 * 3 - 2
        struct.pack_into("<I", tiff_part, exif_at + 2 + 12 + 8, len(tiff_part) - len(blank))  # UserComment
        struct.pack_into("<I", tiff_part, exif_at + 2 + 12 + 4, len(blank))
        image = decode(_save(Image.fromarray(_photo()), "JPEG", exif=b"Exif\0\0" + bytes(tiff_part)))
        for fmt in ("JPEG", "TIFF"):
            result = _open(encode(image, image.rgb, options=EncodeOptions(format=fmt))[0])
            sub = result.getexif().get_ifd(0x8769)
            assert sub.get(0x9000) == b"0231" and sub.get(0x9286) == blank, fmt

    def test_exif_over_two_jpeg_segments_for_its_big_thumbnail_is_kept(self) -> None:
        """exiftool writes EXIF with a large thumbnail over several APP1 segments. Once the thumbnail is gone it
        fits in one again: the camera's tags reach the result instead of all of EXIF being dropped as too big."""
        rng = np.random.default_rng(0)
        thumb = b"\xff\xd8" + rng.integers(0, 255, 90_000, dtype=np.uint8).tobytes() + b"\xff\xd9"
        block, _ = _camera_exif("<", 1, 3, 64, 48, thumb=thumb)
        assert len(block) > 65533
        plain = _save(Image.fromarray(_photo()), "JPEG")
        half = 6 + (len(block) - 6) // 2
        segments = b"".join(b"\xff\xe1" + struct.pack(">H", len(part) + 2) + part
                            for part in (block[:half], b"Exif\0\0" + block[half:]))
        image = decode(plain[:2] + segments + plain[2:])
        result = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert result.getexif()[0x010F] == "Canon"
        assert len(result.info["exif"]) < 2000

    def test_exif_pixel_size_follows_a_downsized_result(self) -> None:
        """When the preset shrank the photo, PixelX/YDimension say the size written, in the type they had."""
        block, at = _camera_exif("<", 8, 3, 60, 40)
        image = decode(_save(Image.fromarray(_photo(40, 60)), "JPEG", exif=block))
        data, _ = encode(image, resize_long_side(image.rgb, 30), options=EncodeOptions())
        written = _exif_tiff(_open(data).info["exif"])
        sizes = [struct.unpack_from("<HIH", written, at[place] - 6) for place in ("pixel_x", "pixel_y")]
        assert [(3, 1, 20), (3, 1, 30)] == sizes  # type SHORT, count 1, value

    def test_focal_plane_resolution_follows_a_downsized_result(self) -> None:
        """Readers work the sensor's size (and the 35 mm focal length) out of the pixel size and the focal-plane
        resolution, pixels per unit of the sensor: shrunk with the photo, it still gives the same sensor."""
        from PIL.TiffImagePlugin import IFDRational

        exif = Image.Exif()
        exif.get_ifd(0x8769).update({0xA002: 60, 0xA003: 40, 0xA20E: IFDRational(211667, 100),
                                     0xA20F: IFDRational(211667, 100), 0xA210: 2})
        image = decode(_save(Image.fromarray(_photo(40, 60)), "JPEG", exif=exif))
        data, _ = encode(image, resize_long_side(image.rgb, 30), options=EncodeOptions())
        sub = _open(data).getexif().get_ifd(0x8769)
        sensor = [sub[pixels] / float(sub[resolution]) for pixels, resolution in ((0xA002, 0xA20E), (0xA003, 0xA20F))]
        assert sensor == pytest.approx([60 / 2116.67, 40 / 2116.67], rel=1e-3)

    def test_exif_resolution_turns_with_the_photo(self) -> None:
        """A fax's 300 x 150 dpi, stored on its side: upright, the EXIF says 150 x 300, as the JFIF header does."""
        exif = Image.Exif()
        exif.update({0x0112: 6, 0x011A: 300.0, 0x011B: 150.0, 0x0128: 2})
        image = decode(_save(Image.fromarray(_photo(40, 60)), "JPEG", exif=exif, dpi=(300, 150)))
        result = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        written = result.getexif()
        assert (float(written[0x011A]), float(written[0x011B])) == pytest.approx(result.info["dpi"]) == (150, 300)

    @pytest.mark.parametrize("compression", ["raw", "tiff_lzw"])
    def test_a_turned_tiff_s_exif_turns_with_it(self, compression: str) -> None:
        """A TIFF's EXIF is rewritten, not edited in place (and libtiff turns a compressed one as it loads): its
        resolutions, pixel sizes and focal-plane resolutions still trade places with the turn, not get scaled."""
        from PIL.TiffImagePlugin import IFDRational

        exif = Image.Exif()
        exif.update({0x0112: 6, 0x011A: 300.0, 0x011B: 150.0, 0x0128: 2})
        tiff_data = _save(Image.fromarray(_photo(48, 64)), "TIFF", compression=compression, exif=exif)
        sub = {0xA002: 64, 0xA003: 48, 0xA20E: IFDRational(1000), 0xA20F: IFDRational(2000), 0xA210: 2}
        holder = Image.Exif()
        holder.get_ifd(0x8769).update(sub)
        image = decode(imageio._with_exif_directories(tiff_data, holder.tobytes()))
        got = _open(encode(image, image.rgb, options=EncodeOptions(format="JPEG"))[0]).getexif()
        inner = got.get_ifd(0x8769)
        assert (float(got[0x011A]), float(got[0x011B])) == (150, 300)
        assert (inner[0xA002], inner[0xA003], float(inner[0xA20E]), float(inner[0xA20F])) == (48, 64, 2000, 1000)

    def test_source_layout_tags_leave_the_camera_exif_without_moving_it(self) -> None:
        """IFD0 tags that describe the source's pixel layout (ImageWidth, here, as some phones write it) are
        dropped, and every other value of the EXIF stays at its offset."""
        block, at = _camera_exif(">", 1, 4, 64, 48, ifd0_extra=((256, 64), (257, 48)))
        image = decode(_save(Image.fromarray(_photo()), "JPEG", exif=block))
        written = _open(encode(image, image.rgb, options=EncodeOptions(format="PNG"))[0])
        exif = written.getexif()
        assert (256 in exif, 257 in exif, exif[0x010F], exif.get_ifd(0x8769)[0xA002]) == (False, False, "Canon", 64)
        start = at["next_ifd"] + 4  # the values behind IFD0's entries
        expected = bytearray(_exif_tiff(block))
        del expected[at["thumbnail"]:]  # the old thumbnail, which ended the block
        assert bytes(expected)[start:] == _exif_tiff(written.info["exif"])[start:]

    def test_icc_kept_for_16bit_png(self) -> None:
        """The hand-written 16-bit PNG carries the ICC profile and DPI."""
        rgb16 = np.full((8, 8, 3), 1000, np.uint16)
        image = decode(cv2.imencode(".png", rgb16)[1].tobytes())
        image.icc_profile, image.info["dpi"] = _srgb_icc(), (300.0, 300.0)
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert image.icc_profile == back.info.get("icc_profile")
        assert tuple(round(v) for v in back.info["dpi"]) == (300, 300)

    def test_keep_metadata_false_strips_exif_and_icc(self) -> None:
        """With keep_metadata off the output carries no EXIF or ICC."""
        exif = Image.Exif()
        exif[0x010F] = "Camera maker"
        image = decode(_save(Image.fromarray(_photo()), "JPEG", exif=exif, icc_profile=_srgb_icc()))
        back = _open(encode(image, image.rgb, options=EncodeOptions(keep_metadata=False))[0])
        assert (back.info.get("icc_profile"), len(back.getexif())) == (None, 0)

    def test_png_text_is_kept(self) -> None:
        """PNG text chunks (captions, credits) survive."""
        pnginfo = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
        pnginfo.add_text("Description", "Solvay conference")
        image = decode(_save(Image.fromarray(_photo()), "PNG", pnginfo=pnginfo))
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert back.text["Description"] == "Solvay conference"

    @pytest.mark.parametrize("bits", [8, 16])
    def test_png_international_text_keeps_its_language(self, bits: int) -> None:
        """An iTXt chunk's language tag and translated keyword (a German caption, say) come back with it."""
        pnginfo = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
        pnginfo.add_itxt("Comment", "Oma, restauriert", lang="de", tkey="Kommentar")
        pixels = _photo() if bits == 8 else np.full((6, 5), 30000, np.uint16)
        image = decode(_save(Image.fromarray(pixels), "PNG", pnginfo=pnginfo))
        comment = _open(encode(image, image.rgb, options=EncodeOptions())[0]).text["Comment"]
        assert (comment, comment.lang, comment.tkey) == ("Oma, restauriert", "de", "Kommentar")


    def test_photoshop_layers_are_not_copied_into_the_result(self) -> None:
        """A TIFF's Photoshop layer data (tag 37724) would show the old pixels in an editor: it is dropped."""
        tags = {37724: b"Adobe Photoshop Document Data Block\0" + b"U" * 2000, 305: "Scanner software"}
        image = decode(_save(Image.fromarray(_photo()), "TIFF", tiffinfo=tags))
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert 37724 not in back.tag_v2
        assert back.tag_v2.get(305) == "Scanner software"

    def test_exif_text_profile_in_png_does_not_keep_the_old_orientation(self) -> None:
        """EXIF kept as ImageMagick's text profile is rotated with the pixels, not copied with orientation 6."""
        exif = Image.Exif()
        exif[0x0112] = 6
        blob = exif.tobytes()
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text("Raw profile type exif", f"\nexif\n{len(blob):8d}\n{blob.hex()}\n", zip=True)
        image = decode(_save(Image.fromarray(_photo(6, 10)), "PNG", pnginfo=pnginfo))
        assert image.rgb.shape[:2] == (10, 6)  # rotated upright
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert back.getexif().get(0x0112) == 1
        assert "Raw profile type exif" not in back.info

    def test_a_nonsense_resolution_is_dropped(self) -> None:
        """A TIFF resolution of 0/0 (NaN dpi) is left out rather than failing the encode."""
        data = bytearray(_save(Image.fromarray(_photo()), "TIFF", dpi=(72, 72)))
        start = struct.unpack("<I", data[4:8])[0]
        for entry in range(start + 2, start + 2 + 12 * struct.unpack("<H", data[start : start + 2])[0], 12):
            tag, _, _, where = struct.unpack("<HHII", data[entry : entry + 12])
            if tag in (282, 283):
                data[where : where + 8] = struct.pack("<II", 0, 0)
        image = decode(bytes(data))
        for fmt in ("TIFF", "JPEG", "PNG"):
            assert _open(encode(image, image.rgb, options=EncodeOptions(format=fmt))[0]).size == (64, 48)

    def test_jpeg_without_a_resolution_gets_none(self) -> None:
        """A phone JPEG whose EXIF has no resolution and whose JFIF gives only an aspect ratio: Pillow reads it as
        72 dpi, but no resolution is made up for the result (a PNG gets no pHYs), while a real one comes through."""
        exif = Image.Exif()
        exif[0x010F] = "Phone maker"
        image = decode(_save(Image.fromarray(_photo()), "JPEG", exif=exif))
        assert "dpi" not in image.info
        assert "dpi" not in _open(encode(image, image.rgb, options=EncodeOptions(format="PNG"))[0]).info
        exif[0x011A], exif[0x011B] = 300.0, 300.0  # X/YResolution; no ResolutionUnit: inches, EXIF's default
        image = decode(_save(Image.fromarray(_photo()), "JPEG", exif=exif))
        assert (300, 300) == tuple(round(float(v)) for v in image.info["dpi"])
        exif[0x011A], exif[0x011B], exif[0x0128] = 118.11, 118.11, 3  # per centimetre
        image = decode(_save(Image.fromarray(_photo()), "JPEG", exif=exif))
        assert (300, 300) == tuple(round(float(v)) for v in image.info["dpi"])
        exif[0x0128] = 1  # no unit: a ratio only
        assert "dpi" not in decode(_save(Image.fromarray(_photo()), "JPEG", exif=exif)).info
        assert (150, 150) == tuple(round(v) for v in decode(_save(Image.fromarray(_photo()), "JPEG",
                                                                    dpi=(150, 150))).info["dpi"])

    @pytest.mark.parametrize(("fmt", "params"), [("JPEG", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"})])
    def test_a_resolution_turns_with_the_photo(self, fmt: str, params: dict[str, object]) -> None:
        """A scan of 204 x 196 dpi stored on its side (orientation 6): upright, its width has the stored height's
        resolution, or the printed photo comes out stretched. Also where Pillow's libtiff turns the pixels
        itself (a compressed TIFF)."""
        exif = Image.Exif()
        exif[0x0112] = 6
        pixels = _photo()
        image = decode(_save(Image.fromarray(pixels), fmt, exif=exif, dpi=(204, 196), **params))
        assert image.rgb.shape[:2] == pixels.shape[1::-1]
        assert (round(image.info["dpi"][0]), round(image.info["dpi"][1])) == (196, 204)
        back = _open(encode(image, image.rgb, options=EncodeOptions(format="PNG"))[0])
        assert (196, 204) == tuple(round(float(v)) for v in back.info["dpi"])

    @pytest.mark.parametrize("bits", [8, 16])
    @pytest.mark.parametrize("compression", ["raw", "tiff_lzw"])
    def test_tiff_without_a_resolution_gets_none(self, compression: str, bits: int) -> None:
        """A TIFF with no resolution tags is written without any (as TIFF, or as PNG when asked), not as 1 x 1 dpi,
        while a TIFF's own resolution still comes through."""
        pixels = Image.fromarray(_photo()) if bits == 8 else Image.fromarray(np.full((6, 5), 30000, np.uint16))
        source = _save(pixels, "TIFF", compression=compression)
        assert ((), ()) == (_tiff_tag(source, 282), _tiff_tag(source, 283))
        image = decode(source)
        tiff_out = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        png_out = _open(encode(image, image.rgb, options=EncodeOptions(format="PNG"))[0])
        assert (False, False, None) == (282 in tiff_out.tag_v2, 283 in tiff_out.tag_v2, png_out.info.get("dpi"))
        image = decode(_save(pixels, "TIFF", compression=compression, dpi=(600, 600)))
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert (600, 600) == tuple(round(float(v)) for v in back.info["dpi"])

    @pytest.mark.parametrize("bits", [8, 16])
    def test_png_gamma_chromaticity_and_srgb_are_kept(self, bits: int) -> None:
        """A PNG's gAMA, cHRM and sRGB chunks, which change how light or saturated a viewer shows it, come back
        as stored, before the image data as PNG requires."""
        chunks = [(b"gAMA", struct.pack(">I", 45455)), (b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000,
                                                                              30000, 60000, 15000, 6000)),
                  (b"sRGB", b"\x00")]
        if bits == 8:
            pnginfo = PngImagePlugin.PngInfo()
            for kind, payload in chunks:
                pnginfo.add(kind, payload)
            source = _save(Image.fromarray(_photo()), "PNG", pnginfo=pnginfo)
        else:
            plain = _png16(np.full((6, 5, 3), 30000, np.uint16), colour_type=2)
            source = plain[:33] + b"".join(_png_chunk(kind, payload) for kind, payload in chunks) + plain[33:]
        image = decode(source)
        data = encode(image, image.rgb, options=EncodeOptions())[0]
        pos, before_idat = 8, []
        while data[pos + 4 : pos + 8] != b"IDAT":
            length = struct.unpack(">I", data[pos : pos + 4])[0]
            before_idat.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
            pos += 12 + length
        assert chunks == [chunk for chunk in before_idat if chunk[0] in (b"gAMA", b"cHRM", b"sRGB")]

    def test_jpeg_iptc_and_comment_are_kept(self) -> None:
        """A JPEG's IPTC record (Photoshop's APP13 segment: captions, credits) and its comment come back in the
        restored JPEG, next to its EXIF, which still reads; the IPTC also reaches a TIFF written from it."""
        iptc = b"\x1c\x02\x78" + struct.pack(">H", 17) + b"Grandma, restored"
        app13 = b"Photoshop 3.0\0" + b"8BIM\x04\x04\0\0" + struct.pack(">I", len(iptc)) + iptc + b"\0"
        exif = Image.Exif()
        exif[0x010F] = "Camera maker"
        plain = _save(Image.fromarray(_photo()), "JPEG", exif=exif, comment=b"scanned by the archive")
        source = plain[:2] + b"\xff\xed" + struct.pack(">H", len(app13) + 2) + app13 + plain[2:]
        image = decode(source)
        data = encode(image, image.rgb, options=EncodeOptions())[0]
        back = _open(data)
        assert (iptc, b"scanned by the archive", "Camera maker") == (
            back.info["photoshop"][0x0404], back.info.get("comment"), back.getexif().get(0x010F))
        assert (48, 64, 3) == decode(data).rgb.shape
        as_tiff = _open(encode(image, image.rgb, options=EncodeOptions(format="TIFF"))[0])
        assert iptc == as_tiff.tag_v2.get(33723)

    def test_every_jpeg_comment_is_kept_in_order(self) -> None:
        """A scanner's note and an archive's box number, in two comment segments: both come back, in order."""
        plain = _save(Image.fromarray(_photo()), "JPEG")
        notes = [b"scanned 1998 by the archive", b"box 17, folder 3"]
        source = plain[:2] + b"".join(b"\xff\xfe" + struct.pack(">H", len(n) + 2) + n for n in notes) + plain[2:]
        image = decode(source)
        data = encode(image, image.rgb, options=EncodeOptions())[0]
        found = [data[pos + 4 : pos + 2 + length] for marker, pos, length in jpeg.header_segments(data)
                 if marker == 0xFE]
        assert found == notes
        assert not [m for m, _, _ in jpeg.header_segments(encode(image, image.rgb, options=EncodeOptions(
            keep_metadata=False))[0]) if m == 0xFE]

    def test_photoshop_rights_and_paths_are_kept_and_its_thumbnail_is_not(self) -> None:
        """Besides IPTC, Photoshop's resources hold the copyright flag, the rights URL and clipping paths (named):
        they come back, block for block, in a JPEG result and in a TIFF one (tag 34377). Its thumbnail of the
        unrestored photo does not, nor does anything that would now be wrong."""
        def block(ident: int, data: bytes, name: bytes = b"") -> bytes:
            pascal = bytes([len(name)]) + name + bytes((len(name) + 1) % 2)
            return b"8BIM" + struct.pack(">H", ident) + pascal + struct.pack(">I", len(data)) + data + bytes(
                len(data) % 2)

        iptc = b"\x1c\x02\x74" + struct.pack(">H", 11) + b"(c) Archive"
        kept = block(0x0404, iptc) + block(0x040A, b"\x01") + block(0x040B, b"https://example.org/rights") + block(
            0x07D0, bytes(26 * 3), b"Path 1")
        thumbnail = block(0x040C, b"\xff\xd8" + bytes(300) + b"\xff\xd9")
        app13 = b"Photoshop 3.0\0" + kept[: len(kept) // 2]  # split over two segments, as Photoshop does
        app13b = b"Photoshop 3.0\0" + kept[len(kept) // 2 :] + thumbnail
        plain = _save(Image.fromarray(_photo()), "JPEG")
        source = (plain[:2] + b"\xff\xed" + struct.pack(">H", len(app13) + 2) + app13
                  + b"\xff\xed" + struct.pack(">H", len(app13b) + 2) + app13b + plain[2:])
        image = decode(source)
        as_jpeg = encode(image, image.rgb, options=EncodeOptions())[0]
        assert kept in as_jpeg and b"\xff\xd8" + bytes(300) not in as_jpeg
        assert _open(as_jpeg).info["photoshop"][0x0404] == iptc
        as_tiff = encode(image, image.rgb, options=EncodeOptions(format="TIFF"))[0]
        assert kept in as_tiff and iptc == _open(as_tiff).tag_v2.get(33723)
        again = decode(as_tiff)  # TIFF to TIFF: tag 34377 read and written back
        assert kept in encode(again, again.rgb, options=EncodeOptions())[0]

    def test_photoshop_resources_in_segments_closed_on_their_own_are_read_each(self) -> None:
        """Not every writer continues its run across segments: one that pads each segment (or ends one on a block
        cut short) has its IPTC record in the next segment found all the same."""
        iptc = b"\x1c\x02\x78" + struct.pack(">H", 5) + b"hello"
        first = photoshop.block(0x040A, b"\x01") + bytes(6)  # the copyright flag, then padding
        second = photoshop.block(photoshop.IPTC, iptc)
        plain = _save(Image.fromarray(_photo()), "JPEG")
        app13 = b"".join(b"\xff\xed" + struct.pack(">H", len(body) + 16) + b"Photoshop 3.0\0" + body
                         for body in (first, second))
        image = decode(plain[:2] + app13 + plain[2:])
        assert image.info["iptc"] == iptc
        assert photoshop.data_of(image.info["photoshop_resources"], 0x040A) == b"\x01"

    def test_photoshop_resources_past_one_segment_are_kept_whole(self) -> None:
        """Past 64 KB (a large thumbnail, long clipping paths) Photoshop continues its resources in a second APP13
        segment. An IPTC record that crosses into it comes back whole (300 keywords and the copyright, not the
        first few), and paths too long for one segment come back in as many as they need."""
        def record(tag: int, value: bytes) -> bytes:
            return b"\x1c\x02" + bytes([tag]) + struct.pack(">H", len(value)) + value

        def segments(run: bytes, every: int) -> bytes:
            return b"".join(b"\xff\xed" + struct.pack(">H", len(part) + 16) + b"Photoshop 3.0\0" + part
                            for part in (run[i : i + every] for i in range(0, len(run), every)))

        iptc = b"".join(record(25, b"keyword %03d" % i) for i in range(300)) + record(116, b"(c) Archive")
        paths = photoshop.block(0x07D0, bytes(26 * 3000))  # 78 KB of path points
        run = photoshop.block(0x040C, bytes(63_000)) + photoshop.block(photoshop.IPTC, iptc) + paths
        plain = _save(Image.fromarray(_photo()), "JPEG")
        image = decode(plain[:2] + segments(run, 64_000) + plain[2:])
        assert image.info["iptc"] == iptc
        data = encode(image, image.rgb, options=EncodeOptions())[0]
        assert photoshop.kept(jpeg.app13_resources(data)) == photoshop.block(photoshop.IPTC, iptc) + paths
        assert _open(data).info["photoshop"][photoshop.IPTC] == iptc  # whole in a segment of its own

    @pytest.mark.parametrize("form", ["attributes", "elements"])
    @pytest.mark.parametrize("orientation", range(1, 9))
    def test_named_face_regions_stay_on_their_faces_in_the_upright_result(self, orientation: int, form: str) -> None:
        """People named in a photo (MWG regions, as Lightroom and digiKam write them) are placed in fractions of
        the stored image. Turned upright, the result's regions still frame the same face, and say its size."""
        left, top, width, height = 75, 60, 30, 30  # the face, in the stored 300 x 200 image
        area = {"x": (left + width / 2) / 300, "y": (top + height / 2) / 200, "w": width / 300, "h": height / 200}
        if form == "attributes":
            fields = " ".join(f'stArea:{k}="{v}"' for k, v in area.items())
            region = f'<mwg-rs:Area {fields} stArea:unit="normalized"/>'
            dims = '<mwg-rs:AppliedToDimensions stDim:w="300" stDim:h="200" stDim:unit="pixel"/>'
        else:
            fields = "".join(f"<stArea:{k}>{v}</stArea:{k}>" for k, v in area.items())
            region = (f'<mwg-rs:Area rdf:parseType="Resource">{fields}'
                      "<stArea:unit>normalized</stArea:unit></mwg-rs:Area>")
            dims = ('<mwg-rs:AppliedToDimensions rdf:parseType="Resource"><stDim:w>300</stDim:w><stDim:h>200</stDim:h>'
                    "<stDim:unit>pixel</stDim:unit></mwg-rs:AppliedToDimensions>")
        packet = (
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/" '
            'xmlns:stArea="http://ns.adobe.com/xmp/sType/Area#" '
            'xmlns:stDim="http://ns.adobe.com/xap/1.0/sType/Dimensions#"><mwg-rs:Regions rdf:parseType="Resource">'
            f'{dims}<mwg-rs:RegionList><rdf:Bag><rdf:li rdf:parseType="Resource"><mwg-rs:Name>Marie</mwg-rs:Name>'
            f"{region}</rdf:li></rdf:Bag></mwg-rs:RegionList></mwg-rs:Regions></rdf:Description></rdf:RDF>"
            "</x:xmpmeta>").encode()
        stored = np.zeros((200, 300, 3), np.uint8)
        stored[top : top + height, left : left + width] = 255
        exif = Image.Exif()
        exif[0x0112] = orientation
        image = decode(_save(Image.fromarray(stored), "PNG", exif=exif, pnginfo=_xmp_png_info(packet)))
        result = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        upright = np.asarray(result.convert("L"))
        xmp = result.text["XML:com.adobe.xmp"].encode()  # type: ignore[attr-defined]
        found = {k: float(_xmp_value(xmp, b"stArea:" + k.encode())) for k in area}
        rows, cols = upright.shape
        box = upright[round((found["y"] - found["h"] / 2) * rows) : round((found["y"] + found["h"] / 2) * rows),
                      round((found["x"] - found["w"] / 2) * cols) : round((found["x"] + found["w"] / 2) * cols)]
        assert box.size == width * height and box.min() == 255
        assert (_xmp_value(xmp, b"stDim:w"), _xmp_value(xmp, b"stDim:h")) == (str(cols).encode(), str(rows).encode())

    def test_regions_a_writer_placed_on_the_upright_photo_stay_and_a_point_turns(self) -> None:
        """Some writers place regions on the photo as shown (AppliedToDimensions then has its upright shape):
        those are left where they are. A point region (a focus point) turns like any other."""
        from gpen_engine import xmp

        def packet(dims: str, area: str) -> bytes:
            return (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><mwg-rs:Regions><mwg-rs:AppliedToDimensions {dims} '
                    f'stDim:unit="pixel"/><mwg-rs:Area {area} stArea:unit="normalized"/></mwg-rs:Regions>'
                    "</x:xmpmeta>").encode()

        shown = packet('stDim:w="200" stDim:h="300"', 'stArea:x="0.25" stArea:y="0.3" stArea:w="0.1" stArea:h="0.2"')
        assert b'stArea:x="0.25" stArea:y="0.3" stArea:w="0.1" stArea:h="0.2"' in xmp.for_result(
            shown, (100, 150), turned_from=6)
        point = packet('stDim:w="300" stDim:h="200"', 'stArea:x="0.25" stArea:y="0.3"')
        turned = xmp.for_result(point, (100, 150), turned_from=6)
        assert b'stArea:x="0.7" stArea:y="0.25"' in turned and b'stDim:w="100" stDim:h="150"' in turned

    @pytest.mark.parametrize("bits", [8, 16])
    @pytest.mark.parametrize("compression", ["raw", "tiff_lzw"])
    def test_tiff_xmp_and_iptc_are_kept(self, compression: str, bits: int) -> None:
        """A TIFF's XMP packet and IPTC record (captions, credits, keywords) come back in the restored TIFF."""
        xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
        iptc = b"\x1c\x02\x78" + struct.pack(">H", 17) + b"Grandma, restored"
        pixels = Image.fromarray(_photo()) if bits == 8 else Image.fromarray(np.full((6, 5), 30000, np.uint16))
        source = _save(pixels, "TIFF", compression=compression, tiffinfo={700: xmp, 33723: iptc, 315: "Jane"})
        image = decode(source)
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert (xmp, iptc, "Jane") == (back.tag_v2.get(700), back.tag_v2.get(33723), back.tag_v2.get(315))

    @pytest.mark.parametrize(("source", "compression", "bits"), [
        ("JPEG", "raw", 8), ("JPEG", "tiff_lzw", 8),
        ("TIFF", "raw", 8), ("TIFF", "tiff_lzw", 8), ("TIFF", "raw", 16), ("TIFF", "tiff_lzw", 16),
    ])
    def test_exif_text_beyond_ascii_comes_back_in_a_tiff(self, source: str, compression: str, bits: int) -> None:
        """An archive's Artist and Copyright ("© 2019 Jürgen Müller", UTF-8 as editors write it) come back as they
        were, not as "?? 2019 J??rgen M??ller"."""
        artist, rights = "Jürgen Müller", "© 2019 Jürgen Müller"
        tags = {315: artist.encode(), 33432: rights.encode()}
        pixels = Image.fromarray(_photo()) if bits == 8 else Image.fromarray(np.full((6, 5), 30000, np.uint16))
        if source == "JPEG":
            exif = Image.Exif()
            exif.update(tags)
            data = _save(pixels, "JPEG", exif=exif.tobytes())
        else:
            data = _save(pixels, "TIFF", compression=compression, tiffinfo=tags)
        image = decode(data)
        image.info["tiff_compression"] = compression
        back = _open(encode(image, image.rgb, options=EncodeOptions(format="TIFF"))[0])
        as_read = [back.tag_v2.get(tag).encode("latin-1").decode("utf-8") for tag in (315, 33432)]  # as Pillow reads
        assert as_read == [artist, rights]

    @pytest.mark.parametrize("bits", [8, 16])
    @pytest.mark.parametrize("source", ["JPEG", "TIFF"])
    def test_camera_exif_with_its_sub_directories_is_kept_in_a_compressed_tiff(self, bits: int, source: str) -> None:
        """EXIF with Exif and GPS sub-directories (every camera's and phone's) written as LZW TIFF: libtiff cannot
        write sub-directories, yet the capture time, exposure and place all come back from the result."""
        exif = Image.Exif()
        exif[0x010F] = "Camera maker"
        exif.get_ifd(0x8769)[0x9003] = "2001:02:03 04:05:06"  # DateTimeOriginal
        exif.get_ifd(0x8769)[0x829D] = 5.6  # FNumber
        exif.get_ifd(0x8825)[1] = "N"  # GPSLatitudeRef
        exif.get_ifd(0x8825)[2] = (52.0, 30.0, 12.5)  # GPSLatitude
        if bits == 8:
            image, options = decode(_save(Image.fromarray(_photo()), "JPEG", exif=exif)), EncodeOptions(format="TIFF")
        else:
            image = decode(_png16(np.full((6, 5, 3), 30000, np.uint16), colour_type=2, exif=exif.tobytes()))
            options = EncodeOptions(format="TIFF")
        if source == "TIFF":  # an uncompressed TIFF with them (Pillow's own writer keeps them), then deflate
            image.info["tiff_compression"] = "raw"
            image, options = decode(encode(image, image.rgb, options=options)[0]), EncodeOptions()
            assert image.info["tiff_compression"] == "raw"
            image.info["tiff_compression"] = "tiff_deflate"
        data, written = encode(image, image.rgb, options=options)
        back = _open(data)
        got = back.getexif()
        assert (written, back.info["compression"]) == ("TIFF", "tiff_adobe_deflate" if source == "TIFF" else "tiff_lzw")
        assert got.get(0x010F) == "Camera maker"
        assert (got.get_ifd(0x8769)[0x9003], float(got.get_ifd(0x8769)[0x829D])) == ("2001:02:03 04:05:06", 5.6)
        assert (got.get_ifd(0x8825)[1], tuple(map(float, got.get_ifd(0x8825)[2]))) == ("N", (52.0, 30.0, 12.5))

    def test_a_scanner_s_tiff_exif_gains_no_empty_sub_directory(self) -> None:
        """A scan's EXIF is its TIFF tags alone (Make, Software): written into a JPEG, it has no Exif directory
        with nothing in it, which validators warn about."""
        image = decode(_save(Image.fromarray(_photo()), "TIFF", tiffinfo={271: "Epson", 305: "Scan"}))
        got = _open(encode(image, image.rgb, options=EncodeOptions(format="JPEG"))[0]).getexif()
        assert (got.get(271), got.get(305), 0x8769 in got) == ("Epson", "Scan", False)

    @pytest.mark.parametrize("compression", ["raw", "tiff_lzw"])
    def test_exif_interoperability_directory_comes_back_where_its_pointer_points(self, compression: str) -> None:
        """The Interoperability directory (InteropIndex "R98": the colour space a camera means) sits behind a
        pointer inside the Exif directory; copied as the number it was, it pointed at whatever lay there."""
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9003] = "2001:02:03 04:05:06"
        exif.get_ifd(0x8769)[0xA005] = {1: "R98"}
        image = decode(_save(Image.fromarray(_photo()), "JPEG", exif=exif))
        image.info["tiff_compression"] = compression
        got = _open(encode(image, image.rgb, options=EncodeOptions(format="TIFF"))[0]).getexif()
        assert (got.get_ifd(0x8769)[0x9003], got.get_ifd(0xA005)) == ("2001:02:03 04:05:06", {1: "R98"})

    def test_a_tiff_sub_image_pointer_is_not_copied(self) -> None:
        """SubIFDs (a raw converter's previews) point into the source file: the result has none of them."""
        image = decode(_save(Image.fromarray(_photo()), "TIFF", tiffinfo={330: (8,)}))
        assert 330 not in _open(encode(image, image.rgb, options=EncodeOptions())[0]).tag_v2

    @pytest.mark.parametrize("bits", [8, 16])
    def test_exif_value_libtiff_refuses_is_left_out_of_a_compressed_tiff(self, bits: int) -> None:
        """A TIFF whose resolution unit is out of range decodes, so its result is written (without that EXIF)."""
        pixels = Image.fromarray(_photo()) if bits == 8 else Image.fromarray(np.full((6, 5), 30000, np.uint16))
        data = _set_tiff_tag(_save(pixels, "TIFF", compression="tiff_lzw", dpi=(300, 300)), 296, 3329)
        image = decode(data)
        back = _open(encode(image, image.rgb, options=EncodeOptions())[0])
        assert (back.format, back.size) == ("TIFF", pixels.size)

    def test_exif_too_large_for_jpeg_is_left_out_of_a_jpeg(self) -> None:
        """A PNG whose EXIF exceeds a JPEG segment still becomes a JPEG (without EXIF) when JPEG is asked for."""
        exif = Image.Exif()
        exif[0x010E] = "x" * 70_000  # ImageDescription
        image = decode(_save(Image.fromarray(_photo()), "PNG", exif=exif, icc_profile=_srgb_icc()))
        back = _open(encode(image, image.rgb, options=EncodeOptions(format="JPEG"))[0])
        assert back.format == "JPEG" and len(back.getexif()) == 0
        assert back.info.get("icc_profile") == _srgb_icc()
        assert len(_open(encode(image, image.rgb, options=EncodeOptions())[0]).getexif()[0x010E]) == 70_000


class TestBadInput:
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_truncated_files_are_refused_at_every_cut(self, fmt: str) -> None:
        """A file cut anywhere (as a half-copied file is) never decodes."""
        data = _save(Image.fromarray(_photo(64, 64)), fmt)
        for cut in sorted({1, 2, 3, 8, 16, 40, 100, len(data) - 2, len(data) - 1, *range(1, len(data), 97)}):
            with pytest.raises(InputError):
                decode(data[:cut])
            with pytest.raises(InputError):
                check_complete(data[:cut], max_pixels=10**8)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    def test_a_process_that_pads_truncated_files_is_an_engine_error_not_bad_input(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If something sets LOAD_TRUNCATED_IMAGES, decoding stops without blaming (and failing) the file."""
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        with pytest.raises(EngineError) as caught:
            decode(_save(Image.fromarray(_photo()), "PNG"))
        assert not isinstance(caught.value, InputError)

    def test_truncated_jpeg_says_truncated(self) -> None:
        """The message names the problem."""
        data = _save(Image.fromarray(_photo()), "JPEG")
        with pytest.raises(InputError, match="truncated JPEG"):
            decode(data[: len(data) // 2])

    def test_progressive_jpeg_missing_its_tail_is_refused(self) -> None:
        """Progressive JPEGs (which decoders happily show half-done) are refused when cut."""
        data = _save(Image.fromarray(_photo(64, 64)), "JPEG", progressive=True)
        decode(data)
        for cut in range(len(data) // 3, len(data), 53):
            with pytest.raises(InputError, match="truncated"):
                decode(data[:cut])

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            (b"", "empty file"),
            (np.random.default_rng(3).bytes(4096), "not an image"),
            (b"Dear colleague,\nplease find the photo attached.\n" * 20, "not an image"),
            (b"GIF89a" + bytes(200), "GIF"),
            (b"%PDF-1.7\n" + bytes(200), "PDF"),
            (b"P6\n64 48\n255\n" + bytes(64 * 48 * 3), "Netpbm"),
            (bytes(18) + bytes(300) + bytes(8) + b"TRUEVISION-XFILE.\0", "TGA"),
            (b"IIRO\x08\0\0\0" + bytes(200), "Olympus ORF raw"),
        ],
    )
    def test_non_images_are_refused_with_a_clear_message(self, data: bytes, message: str) -> None:
        """Zero bytes, random bytes, text and unsupported formats raise InputError naming the cause."""
        with pytest.raises(InputError, match=message):
            decode(data)

    def test_a_tiff_whose_pixels_start_with_cr_is_a_photo_not_a_canon_raw(self) -> None:
        """libtiff, OpenCV and scanners put the directory last, so the pixels start at byte 8: the letters "CR"
        there are a reddish first pixel, not Canon's raw header."""
        pixels = np.full((16, 16, 3), (67, 82, 16), np.uint8)
        image = decode(cv2.imencode(".tif", pixels[:, :, ::-1], [cv2.IMWRITE_TIFF_COMPRESSION, 1])[1].tobytes())
        np.testing.assert_array_equal(pixels, image.rgb)

    @pytest.mark.parametrize("kind", ["DNG", "Canon CR2", "NEF-like"])
    def test_a_camera_raw_file_is_refused_not_restored_as_its_preview(self, kind: str) -> None:
        """Raw files are TIFF inside, and what opens of them is the small preview in the first directory. Restoring
        that would publish a thumbnail for the photo; the file is refused as a raw one instead."""
        from PIL import TiffImagePlugin

        from gpen_engine import tiff

        preview = Image.fromarray(_photo(12, 16))
        extra = TiffImagePlugin.ImageFileDirectory_v2()
        if kind == "DNG":
            extra[tiff.DNG_VERSION] = b"\x01\x04\x00\x00"
            extra.tagtype[tiff.DNG_VERSION] = 1
        data = _save(preview, "TIFF", tiffinfo=extra)
        decode(_save(preview, "TIFF"))  # the same picture as a TIFF photo opens
        if kind == "Canon CR2":  # the header points at 16; "CR", version 2.0, and the raw directory's offset between
            data = _tiff_directory_at_16(preview, b"CR\x02\x00" + bytes(4))
        if kind == "NEF-like":  # the sensor's mosaic in a sub-directory, as Nikon, Sony and Pentax keep it
            order = "<" if data[:2] == b"II" else ">"
            start = len(data) + len(data) % 2
            mosaic = struct.pack(order + "H", 1) + struct.pack(order + "HHIHH", 262, 3, 1, 32803, 0) + bytes(4)
            data = tiff.with_tags(data.ljust(start, b"\0") + mosaic, {tiff.SUB_IFDS: (tiff.LONG, (start,))})
        with pytest.raises(UnsupportedImage, match=kind.removesuffix("-like").replace("NEF", "camera raw")):
            decode(data)

    def test_tiff_pixel_layout_pillow_cannot_read_is_unsupported_not_corrupt(self) -> None:
        """A well-formed TIFF in a pixel layout no decoder here reads (16-bit CMYK + alpha) says so."""
        data = _tiff16(np.zeros((4, 4, 5), np.uint16), 5, (2,))
        with pytest.raises(UnsupportedImage, match="unsupported TIFF pixel format"):
            decode(data)
        with pytest.raises(UnsupportedImage, match="unsupported TIFF pixel format"):
            check_complete(data)

    def test_planar_16bit_tiff_opencv_would_misread_is_unsupported(self) -> None:
        """Planar 16-bit RGB whose 4th sample is not declared (no ExtraSamples) is refused by name: OpenCV
        would read its first plane as every sample and hand back wrong pixels without an error."""
        data = _tiff16(np.zeros((4, 4, 4), np.uint16), 2, planar=True)
        with pytest.raises(UnsupportedImage, match="pixel format: RGB, 4 samples of 16 bits, stored in planes"):
            decode(data)
        with pytest.raises(UnsupportedImage, match="stored in planes"):
            check_complete(data)

    def test_planar_16bit_bigtiff_is_unsupported_not_scrambled(self) -> None:
        """A BigTIFF (whose directory the engine does not read itself) with 16-bit RGB in planes is refused by
        name, not handed to OpenCV, which would scramble it without an error."""
        data = _bigtiff16_planar(np.random.default_rng(3).integers(0, 65536, (6, 5, 3), dtype=np.uint16))
        with Image.open(io.BytesIO(data)) as im:  # a file Pillow reads as what it is meant to be
            assert ((5, 6), 2) == (im.size, im.tag_v2.get(284))
        for read in (decode, check_complete):
            with pytest.raises(UnsupportedImage, match="stored in planes, in a BigTIFF"):
                read(data)

    @pytest.mark.parametrize("compression", ["raw", "deflate", "lzw"])
    def test_truncated_16bit_planar_tiff_is_truncated(self, compression: str) -> None:
        """A half-copied planar 16-bit RGBA TIFF reads as truncated (so the gate waits), never as unsupported."""
        samples = np.random.default_rng(12).integers(0, 65536, (20, 16, 4), dtype=np.uint16)
        data = _tiff16(samples, 2, (2,), planar=True, strip_rows=5,
                       deflate=compression == "deflate", lzw=compression == "lzw")
        for cut in sorted({1, 8, 9, len(data) - 1, *range(8, len(data), max(1, len(data) // 25))}):
            for read in (decode, check_complete):
                with pytest.raises(InputError, match="truncated TIFF") as caught:
                    read(data[:cut])
                assert not isinstance(caught.value, UnsupportedImage)

    def test_png_decompression_bomb_is_refused_from_the_header(self) -> None:
        """A tiny PNG claiming 50000x50000 raises ImageTooLarge without decoding pixels."""
        ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
        data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                + _png_chunk(b"IDAT", zlib.compress(bytes(10_000))) + _png_chunk(b"IEND", b""))
        with pytest.raises(ImageTooLarge, match="2500.0 megapixels"):
            decode(data)
        with pytest.raises(ImageTooLarge):
            check_complete(data, max_pixels=100_000_000)

    def test_webp_bomb_is_refused_before_libwebp_allocates(self) -> None:
        """A WebP header claiming a 16384x16384 canvas is refused from the header."""
        vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (16383).to_bytes(3, "little") * 2
        data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
        with pytest.raises(ImageTooLarge):
            decode(data)

    def test_pixel_limit_is_configurable(self) -> None:
        """max_pixels applies per call."""
        data = _save(Image.fromarray(_photo(100, 100)), "JPEG")
        with pytest.raises(ImageTooLarge):
            decode(data, max_pixels=9_999)
        assert decode(data, max_pixels=10_000).size == (100, 100)

    @pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
    def test_animations_and_multi_page_files_are_refused(self, fmt: str) -> None:
        """Animated GIF/WebP/PNG and multi-page TIFF are refused rather than cut to one frame."""
        frames = [Image.fromarray(np.full((20, 20, 3), i * 60, np.uint8)) for i in range(3)]
        data = _save(frames[0], fmt, save_all=True, append_images=frames[1:])
        with pytest.raises(InputError, match="GIF|animated|multi-page"):
            decode(data)

    @pytest.mark.parametrize(("tag", "value"), [(262, 99), (258, 7), (259, 12345)])
    def test_a_damaged_later_tiff_page_is_bad_input(self, tag: int, value: int) -> None:
        """Damage in a TIFF's second page header is reported as bad input like any other."""
        pages = [Image.fromarray(_photo()), Image.fromarray(_photo(seed=1))]
        data = _set_tiff_tag(_save(pages[0], "TIFF", save_all=True, append_images=pages[1:]), tag, value, page=1)
        with pytest.raises(InputError, match="TIFF"):
            decode(data)

    def test_tiff_with_a_reduced_resolution_preview_page_is_accepted(self) -> None:
        """A second TIFF page flagged as a thumbnail (NewSubfileType=1) is not content to lose."""
        thumb_info = {254: 1}
        main, thumb = Image.fromarray(_photo()), Image.fromarray(_photo(12, 16))
        thumb.encoderinfo = {"tiffinfo": thumb_info}
        data = _save(main, "TIFF", save_all=True, append_images=[thumb])
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
        assert decode(data).size == (64, 48)

    def test_16bit_gray_alpha_tiff_with_a_preview_page_is_accepted(self) -> None:
        """A preview page (NewSubfileType=1) in a layout Pillow cannot read does not make the file "corrupt"."""
        gray_alpha = np.random.default_rng(10).integers(0, 65536, (8, 8, 2), dtype=np.uint16)
        page = _tiff16(gray_alpha, 1, (2,))
        preview = bytearray(_tiff16(gray_alpha[::2, ::2], 1, (2,), tags={254: 1}))
        start = struct.unpack("<I", preview[4:8])[0]
        entries = struct.unpack("<H", preview[start : start + 2])[0]
        for entry in range(start + 2, start + 2 + 12 * entries, 12):  # move the preview's offsets behind page 0
            tag, kind, count, value = struct.unpack("<HHII", preview[entry : entry + 12])
            if tag == 273 or (count * (2 if kind == 3 else 4) > 4):
                preview[entry + 8 : entry + 12] = struct.pack("<I", value + len(page))
        two_pages = page[:-4] + struct.pack("<I", len(page) + start) + bytes(preview)
        assert decode(two_pages).size == (8, 8)
        pages = bytearray(two_pages)
        pages[len(page) + start + 2 : len(page) + start + 14] = struct.pack("<HHII", 254, 4, 1, 0)  # now a page
        with pytest.raises(UnsupportedImage, match="multi-page TIFF"):
            decode(bytes(pages))


class TestHelpers:
    def test_resize_long_side_caps_and_never_upsizes(self) -> None:
        """The long side is capped with aspect kept; small images are returned as they are."""
        rgb = _photo(300, 400)
        assert resize_long_side(rgb, 200).shape == (150, 200, 3)
        assert resize_long_side(rgb, 1000) is rgb
        assert resize_long_side(rgb, None) is rgb

    def test_extension_for_formats(self) -> None:
        """Each supported format has its usual extension."""
        got = [extension_for(f) for f in ("JPEG", "png", "WEBP", "TIFF", "BMP", "MPO")]
        assert got == [".jpg", ".png", ".webp", ".tif", ".bmp", ".jpg"]


class TestReducedJpegDecode:
    """decode(long_side=N): a JPEG the caller scales down anyway is decoded at 1/2, 1/4 or 1/8 scale."""

    @pytest.mark.parametrize(("size", "long_side"), [((1000, 600), 480), ((1000, 600), 499), ((1001, 601), 250),
                                                     ((1000, 600), 130), ((600, 1000), 333), ((64, 40), 10)])
    def test_same_size_and_nearly_the_same_pixels_as_a_full_decode_then_resize(self, size, long_side) -> None:
        """The result has exactly the size a full decode plus resize_long_side gives (rounding from the stored
        size, not the reduced one), and its pixels differ from that only as two good downscales do."""
        data = _save(Image.fromarray(_photo(size[1], size[0])), "JPEG", quality=92)
        reference = resize_long_side(decode(data).rgb, long_side)
        reduced = decode(data, long_side=long_side)
        assert reference.shape == reduced.rgb.shape
        assert np.abs(reference.astype(int) - reduced.rgb.astype(int)).mean() < 3
        assert tuple(reversed(size)) == reduced.info["reduced_from"][::-1]

    def test_a_jpeg_within_the_cap_is_decoded_in_full(self) -> None:
        """No reduction where none is due: a long side equal to the cap gives the full decode's very pixels, and
        only a reduced image records the size it came from."""
        data = _save(Image.fromarray(_photo(400, 800)), "JPEG", quality=92)
        np.testing.assert_array_equal(decode(data).rgb, decode(data, long_side=800).rgb)
        assert "reduced_from" not in decode(data, long_side=800).info
        assert (200, 400, 3) == decode(data, long_side=400).rgb.shape

    @pytest.mark.parametrize("orientation", [6, 8])
    def test_rotated_jpeg_is_capped_upright(self, orientation: int) -> None:
        """EXIF rotation is applied after the reduced decode: a 1000x600 landscape tagged 6/8 comes out 300x500."""
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _save(Image.fromarray(_photo(600, 1000)), "JPEG", exif=exif, quality=92)
        reference = resize_long_side(decode(data).rgb, 500)
        image = decode(data, long_side=500)
        assert (500, 300, 3) == image.rgb.shape == reference.shape
        assert np.abs(reference.astype(int) - image.rgb.astype(int)).mean() < 3

    def test_other_formats_stay_full_size(self) -> None:
        """PNG (whose alpha and 16-bit planes the encoder needs at full size) ignores the hint."""
        data = _save(Image.fromarray(_photo(600, 1000)).convert("RGBA"), "PNG")
        image = decode(data, long_side=250)
        assert (600, 1000, 3) == image.rgb.shape and (600, 1000) == image.alpha.shape

    def test_truncated_jpeg_is_still_refused_by_the_reduced_check(self) -> None:
        """check_complete reads every block at 1/8 scale: a JPEG without its end, or with its scan data cut and
        an end marker glued on where the entropy decoder runs dry, is refused or decoded exactly as before."""
        data = _save(Image.fromarray(_photo(600, 1000)), "JPEG", quality=92)
        with pytest.raises(InputError, match="truncated"):
            check_complete(data[: len(data) // 2])
        assert (1000, 600) == check_complete(data)


class TestJpegDamage:
    @staticmethod
    def photo() -> np.ndarray:
        rng = np.random.default_rng(3)
        return cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), np.uint8), (7, 7), 0)

    def encodings(self) -> dict[str, bytes]:
        rgb = self.photo()

        def pillow(mode: str = "RGB", **kw: object) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(rgb).convert(mode).save(buf, "JPEG", **kw)
            return buf.getvalue()

        return {
            "baseline": pillow(quality=90), "progressive": pillow(progressive=True), "optimized": pillow(optimize=True),
            "4:4:4": pillow(subsampling=0), "gray": pillow("L"), "cmyk": pillow("CMYK"),
            "restart intervals": pillow(restart_marker_blocks=3),
            "opencv restarts": cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes(),
            "opencv progressive": cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
        }

    def test_sound_files_are_not_called_damaged(self) -> None:
        """Baseline, progressive, restart intervals, gray and CMYK, from Pillow and OpenCV: no false alarm."""
        assert {name: jpeg_damage(data) for name, data in self.encodings().items()} == dict.fromkeys(
            self.encodings())

    def test_most_overwritten_data_that_still_decodes_is_found(self) -> None:
        """500 random bytes written over the middle: of the files libjpeg still decodes (it only warns), most are
        told apart, and their decode says so."""
        found = decoded = 0
        for seed, data in enumerate(list(self.encodings().values()) * 12):
            damaged = bytearray(data)
            damaged[len(data) // 2 : len(data) // 2 + 500] = np.random.default_rng(seed).bytes(500)
            try:
                image = decode(bytes(damaged))
            except InputError:
                continue  # refused outright: already a clear error
            decoded += 1
            found += "damaged" in image.info
        assert decoded >= 10 and found >= decoded // 2, (found, decoded)

    def test_overwritten_data_without_marker_bytes_is_found_by_libjpeg(self) -> None:
        """Garbage with no 0xFF byte in it leaves every marker in place; only the Huffman decoding falls out of
        step, which libjpeg warns about (or, over a restart marker, the marker is out of place). Most such files
        are told apart."""
        found = decoded = by_libjpeg = 0
        for seed, data in enumerate(list(self.encodings().values()) * 4):
            junk = np.random.default_rng(seed).integers(0, 255, 200, dtype=np.uint8).tobytes()  # 0-254: no 0xFF
            damaged = bytearray(data)
            damaged[len(data) // 2 : len(data) // 2 + 200] = junk
            try:
                image = decode(bytes(damaged))
            except InputError:
                continue
            decoded += 1
            found += "damaged" in image.info
            by_libjpeg += "libjpeg: " in image.info.get("damaged", "")
        assert decoded >= 20 and found >= decoded * 3 // 4 and by_libjpeg >= decoded // 2, (found, by_libjpeg, decoded)


def _jpeg(seed: int = 0, xmp: bytes | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(buf, "JPEG", quality=85)
    data = buf.getvalue()
    if xmp is not None:  # an APP1 XMP packet right after SOI, as phones write it
        body = b"http://ns.adobe.com/xap/1.0/\x00" + xmp
        data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[2:]
    return data


class TestResultXmp:
    """The XMP of a result describes the restored photo: a still, upright, of its own size."""

    PACKET = (b'<x:xmpmeta><rdf:RDF><rdf:Description GCamera:MotionPhoto="1" GCamera:MotionPhotoVersion="1" '
              b'GCamera:MicroVideoOffset="5012" hdrgm:Version="1.0" tiff:Orientation="6" exif:PixelXDimension="64" '
              b'xmpNote:HasExtendedXMP="0123456789ABCDEF0123456789ABCDEF" dc:format="image/jpeg">'
              b"<exif:PixelYDimension>48</exif:PixelYDimension><dc:rights>(c) Studio</dc:rights>"
              b"<xmp:Thumbnails><rdf:Alt><rdf:li><xmpGImg:image>/9j/4AAQ</xmpGImg:image></rdf:li></rdf:Alt>"
              b"</xmp:Thumbnails><Container:Directory><rdf:Seq><rdf:li Item:Semantic=\"Primary\"/>"
              b'<rdf:li Item:Semantic="MotionPhoto" Item:Length="5012"/></rdf:Seq></Container:Directory>'
              b"</rdf:Description></rdf:RDF></x:xmpmeta>")

    @staticmethod
    def extension() -> bytes:
        body = b"http://ns.adobe.com/xmp/extension/\x00" + b"0123456789ABCDEF0123456789ABCDEF" + struct.pack(
            ">II", 30, 0) + b"<x:xmpmeta>History</x:xmpmeta>"
        return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body

    def source(self) -> bytes:
        data = _jpeg(xmp=self.PACKET)
        return data[:2] + self.extension() + data[2:]

    def test_a_restored_motion_photo_is_a_still_of_its_own_size(self) -> None:
        """The video and the gain map stay behind (in the backup): a viewer must not read the result's own last
        bytes as a video. Sizes, orientation and the thumbnail of the unrestored photo follow the result; the
        rest (the rights) is kept."""
        image = decode(self.source())
        data, _ = encode(image, resize_long_side(image.rgb, 32), options=EncodeOptions())
        xmp = _open(data).info["xmp"]
        xmp = xmp if isinstance(xmp, bytes) else xmp.encode()
        assert b'GCamera:MotionPhoto="0"' in xmp and b"MicroVideoOffset" not in xmp
        assert b"MotionPhotoVersion" not in xmp and b"hdrgm:Version" not in xmp
        assert b"Container:Directory" not in xmp and b"Item:Length" not in xmp
        assert b'tiff:Orientation="1"' in xmp and b"xmp:Thumbnails" not in xmp
        # 64 x 48 stored, turned upright by tiff:Orientation 6, then capped at 32: 24 x 32
        assert b'exif:PixelXDimension="24"' in xmp and b"<exif:PixelYDimension>32</exif:PixelYDimension>" in xmp
        assert b"<dc:rights>(c) Studio</dc:rights>" in xmp
        assert incomplete_trailer(data) is None

    def test_extended_xmp_goes_along_into_a_jpeg_and_its_pointer_goes_elsewhere(self) -> None:
        """Photoshop's history and Camera Raw settings live in Extended XMP segments that the main packet points
        to: a JPEG result carries them as they were; a PNG result cannot, so it does not point to them."""
        image = decode(self.source())
        jpeg, _ = encode(image, image.rgb, options=EncodeOptions())
        assert self.extension() in jpeg and b"xmpNote:HasExtendedXMP" in jpeg
        png, _ = encode(image, image.rgb, options=EncodeOptions(format="PNG"))
        assert b"HasExtendedXMP" not in png and b"(c) Studio" in png


class TestIncompleteTrailer:
    """What a file promises after its first image (phones' MPO, Ultra HDR, motion photos) must all be there."""

    @staticmethod
    def mpo() -> tuple[bytes, int]:
        """A two-view MPO and where its first image ends."""
        first = Image.open(io.BytesIO(_jpeg(1)))
        buf = io.BytesIO()
        first.save(buf, "MPO", save_all=True, append_images=[Image.open(io.BytesIO(_jpeg(2)))])
        data = buf.getvalue()
        return data, data.index(b"\xff\xd9") + 2

    @staticmethod
    def with_mp_type(data: bytes, entry: int, code: int) -> bytes:
        """``data`` (an MPO) with image ``entry``'s MP type code in the MPF index set to ``code``."""
        base = data.index(b"MPF\0") + 4
        order = "<" if data[base : base + 2] == b"II" else ">"
        ifd = base + struct.unpack_from(order + "I", data, base + 4)[0]
        for i in range(struct.unpack_from(order + "H", data, ifd)[0]):
            tag, _kind, _n, value = struct.unpack_from(order + "HHII", data, ifd + 2 + 12 * i)
            if tag == 0xB002:
                out = bytearray(data)
                at = base + value + 16 * entry
                attribute = struct.unpack_from(order + "I", out, at)[0]
                struct.pack_into(order + "I", out, at, attribute & 0xFF000000 | code)
                return bytes(out)
        raise AssertionError("no MP entries")

    @pytest.mark.parametrize("entry", [0, 1])
    def test_a_stereo_pair_is_refused_not_cut_to_one_view(self, entry: int) -> None:
        """A 3D camera's MPO holds two views of one picture (MP type "disparity"): restoring the first alone would
        publish half the photo and lose the other eye's view. A preview or gain map after the photo is fine."""
        data, _ = self.mpo()
        assert decode(data).rgb.shape[2] == 3  # Pillow marks the second image "undefined": not a view
        with pytest.raises(UnsupportedImage, match="2 views"):
            decode(self.with_mp_type(data, entry, 0x020002))
        assert decode(self.with_mp_type(data, 1, 0x010001)).rgb.shape[2] == 3  # a large thumbnail

    def test_a_whole_file_and_a_plain_jpeg_pass(self) -> None:
        assert incomplete_trailer(self.mpo()[0]) is None
        assert incomplete_trailer(_jpeg()) is None
        assert incomplete_trailer(_jpeg() + b"\x00\x00 bytes nobody promised") is None  # unknown trailers pass
        assert incomplete_trailer(b"\x89PNG\r\n\x1a\n") is None

    @pytest.mark.parametrize("missing", [-1, -100, "all"])
    def test_an_mpo_cut_after_its_first_image_is_incomplete(self, missing: int | str) -> None:
        data, first_end = self.mpo()
        cut = data[:first_end] if missing == "all" else data[:missing]
        assert "MPF index" in (incomplete_trailer(cut) or "")
        decode(cut)  # the photo alone decodes: only the promise tells the file is unfinished

    def test_a_container_directory_wants_every_item_it_lists(self) -> None:
        gain_map = _jpeg(5)
        xmp = (b'<x:xmpmeta><Container:Directory><rdf:Seq><rdf:li Item:Mime="image/jpeg" Item:Semantic="Primary"/>'
               b'<rdf:li Item:Mime="image/jpeg" Item:Semantic="GainMap" Item:Length="%d"/></rdf:Seq>'
               b"</Container:Directory></x:xmpmeta>" % len(gain_map))
        whole = _jpeg(xmp=xmp) + gain_map
        assert incomplete_trailer(whole) is None
        assert "XMP container" in (incomplete_trailer(whole[: -len(gain_map) // 2]) or "")

    def test_an_xmp_packet_rewritten_by_exiftool_is_read_too(self) -> None:
        """exiftool (a photographer adding a copyright, say) rewrites XMP with every value in an element of its
        own: the container's items and the motion flags are read from that form as well."""
        video = struct.pack(">I", 24) + b"ftypmp42" + bytes(12) + os.urandom(3000)
        packet = (b"<x:xmpmeta><rdf:RDF><rdf:Description rdf:about=''>\n"
                  b" <GCamera:MotionPhoto>%s</GCamera:MotionPhoto>\n <Container:Directory>\n  <rdf:Seq>\n"
                  b"   <rdf:li rdf:parseType='Resource'>\n    <Container:Item rdf:parseType='Resource'>\n"
                  b"     <Item:Length>0</Item:Length>\n     <Item:Mime>image/jpeg</Item:Mime>\n"
                  b"     <Item:Semantic>Primary</Item:Semantic>\n    </Container:Item>\n   </rdf:li>\n"
                  b"   <rdf:li rdf:parseType='Resource'>\n    <Container:Item rdf:parseType='Resource'>\n"
                  b"     <Item:Length>%d</Item:Length>\n     <Item:Mime>video/mp4</Item:Mime>\n"
                  b"     <Item:Semantic>MotionPhoto</Item:Semantic>\n    </Container:Item>\n   </rdf:li>\n"
                  b"  </rdf:Seq>\n </Container:Directory>\n</rdf:Description></rdf:RDF></x:xmpmeta>")
        whole = _jpeg(xmp=packet % (b"1", len(video))) + video
        assert incomplete_trailer(whole) is None
        assert "XMP container" in (incomplete_trailer(whole[:-1000]) or "")
        dropped = _jpeg(xmp=packet % (b"0", len(video)))  # an editor kept the item but dropped the video
        assert incomplete_trailer(dropped) is None
        micro = _jpeg(xmp=b"<x:xmpmeta><Camera:MicroVideoOffset>%d</Camera:MicroVideoOffset></x:xmpmeta>"
                      % len(video)) + video  # another prefix, element form
        assert incomplete_trailer(micro) is None
        assert "MicroVideoOffset" in (incomplete_trailer(micro[:-1000]) or "")

    def test_a_motion_photo_wants_its_video(self) -> None:
        video = struct.pack(">I", 24) + b"ftypmp42" + bytes(12) + os.urandom(2000)
        whole = _jpeg(xmp=b'<x:xmpmeta GCamera:MicroVideoOffset="%d"/>' % len(video)) + video
        assert incomplete_trailer(whole) is None
        assert "MicroVideoOffset" in (incomplete_trailer(whole[:-1000]) or "")

    def test_a_samsung_trailer_wants_its_end(self) -> None:
        whole = _jpeg() + b"MotionPhoto_Data" + os.urandom(500) + b"SEFH" + os.urandom(40) + b"\x20\x00\x00\x00SEFT"
        assert incomplete_trailer(whole) is None
        assert "SEFT" in (incomplete_trailer(whole[:-30]) or "")

    def test_a_second_jpeg_wants_its_end_marker(self) -> None:
        second = _jpeg(3)
        assert incomplete_trailer(_jpeg() + second) is None
        assert "second image" in (incomplete_trailer(_jpeg() + second[:300]) or "")

    def test_the_primary_items_own_length_and_a_video_said_to_be_gone_are_not_waited_for(self) -> None:
        """The photo's own Item:Length (optional; some writers fill it in) is not bytes after it, and an editor's
        leftover video item next to MotionPhoto="0" promises nothing; old MicroVideo fields beside a container
        are ignored, as readers do."""
        photo = _jpeg()
        items = (b'<x:xmpmeta GCamera:MotionPhoto="%s" GCamera:MicroVideoOffset="999999"><Container:Directory>'
                 b'<rdf:li Item:Semantic="Primary" Item:Length="%d"/>'
                 b'<rdf:li Item:Semantic="MotionPhoto" Item:Mime="video/mp4" Item:Length="5000"/>'
                 b"</Container:Directory></x:xmpmeta>")
        edited = _jpeg(xmp=items % (b"0", len(photo) + 300))
        assert incomplete_trailer(edited) is None
        assert "XMP container" in (incomplete_trailer(_jpeg(xmp=items % (b"1", len(photo) + 300))) or "")


def test_xmp_edits_leave_elements_without_an_end_alone() -> None:
    """A packet of start tags with no end tag (damaged or hostile) is left as it is, not cut to its end."""
    from gpen_engine import xmp

    packet = b"<x:xmpmeta>" + b"<hdrgm:a>" * 5000 + b"<Container:Directory>" * 100 + b"<dc:rights>kept</dc:rights>"
    assert xmp.for_result(packet, (10, 10)) == packet
    assert xmp.directory(packet) is None


def test_a_jpeg_xmp_packet_grown_past_the_segment_limit_still_encodes() -> None:
    """Setting the result's sizes can lengthen a packet that filled its APP1 segment: its padding goes, or, when it
    has none, the XMP (never the photo)."""
    body = b'<x:xmpmeta><rdf:Description exif:PixelXDimension="1" dc:title="t"/></x:xmpmeta>'
    for padding in (b" " * (65504 - len(body) - 40) + b"\n", b""):
        packet = body + padding + b'<?xpacket end="w"?>'
        packet = packet if padding else packet + b"x" * (65504 - len(packet))
        image = decode(_jpeg(xmp=packet))
        data, _ = encode(image, image.rgb, options=EncodeOptions())
        assert decode(data).rgb.shape == image.rgb.shape
        if padding:
            assert b'exif:PixelXDimension="64"' in data


def test_a_thumbnail_link_into_the_exif_directories_blanks_nothing() -> None:
    """IFD1 says the thumbnail lies over IFD0's own entries (a damaged block): nothing is zeroed there."""
    from gpen_engine import exif

    block, at = _camera_exif("<", 1, 4, 64, 48)
    tiff = bytearray(_exif_tiff(block))
    ifd1 = struct.unpack_from("<I", tiff, at["next_ifd"])[0]
    struct.pack_into("<I", tiff, ifd1 + 2 + 8, 8)  # JPEGInterchangeFormat -> IFD0's table
    patched = exif.patched(b"Exif\0\0" + bytes(tiff))
    assert patched is not None
    kept = Image.Exif()
    kept.load(patched)
    assert kept[0x010F] == "Canon" and kept.get_ifd(0x8769)[0xA002] == 64  # IFD0 and the Exif IFD intact


def _xmp_png_info(packet: bytes) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", packet.decode())
    return info


def _xmp_value(xmp: bytes, name: bytes) -> bytes:
    found = re.search(rb'%s="([^"]*)"|<%s>([^<]*)<' % (name, name), xmp)
    assert found is not None, name
    return found[1] if found[1] is not None else found[2]
