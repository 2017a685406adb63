"""Image bytes <-> :class:`DecodedImage`: formats, EXIF orientation, alpha, 16 bits, grayscale, metadata.

Decoding is strict: a file is accepted only when it is one of the supported formats, is a single
image (animations and multi-page documents are refused rather than silently cut to one frame), is
within the pixel limit (checked from the header, before any pixel buffer is allocated) and decodes
completely (a JPEG without its end marker or a PNG without IEND is truncated, even where Pillow
would quietly pad it).

Nothing here touches Pillow's process-wide settings: images are opened through the format's own
plugin so that the pixel limit is ours, per call; ``ImageFile.LOAD_TRUNCATED_IMAGES`` is only read,
never set. Every call works on its own objects, so decode/encode may run in a thread pool.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import zlib
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageFile, JpegImagePlugin, PngImagePlugin, TiffImagePlugin, TiffTags

from gpen_engine import exif as exif_block
from gpen_engine import jpeg, photoshop, tiff
from gpen_engine import xmp as xmp_packet
from gpen_engine.options import EncodeOptions
from gpen_engine.types import DecodedImage, EngineError, ImageTooLarge, InputError, UnsupportedImage

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP")
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}
_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "MPO": "JPEG"}

# Formats people do drop into photo folders that we refuse by name rather than as "not an image".
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypavis", 4, "AVIF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypcrx ", 4, "Canon CR3 raw"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
    (b"8BPS", 0, "Photoshop PSD"),
    (b"%PDF", 0, "PDF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"qoif", 0, "QOI"),
    (b"IIRO", 0, "Olympus ORF raw"),
    (b"IIU\x00", 0, "Panasonic RW2 raw"),
    (b"FUJIFILMCCD-RAW", 0, "Fujifilm RAF raw"),
)

# TIFF tags that describe the pixel layout of the source file; they must never be copied into the
# metadata of a newly written image (a stale width or strip offset would corrupt it). 37724 holds
# Photoshop's layers, which an editor would open instead of the restored pixels. XMP (700) and IPTC
# (33723) travel apart from the EXIF, as ``info["xmp"]`` (orientation reset) and ``info["iptc"]``.
_STRUCTURAL_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 317, 320, 322,
     323, 324, 325, 330, 338, 339, 340, 341, 347, 530, 531, 532, 700, 33723, 34377, 34675, 37724}
)
# The most EXIF a JPEG APP1 segment can hold (Pillow refuses more).
_JPEG_MAX_EXIF = 65533
_JPEG_MAX_XMP = 65504  # what one APP1 segment holds after its XMP header (Pillow's limit)
# PNG text chunks in which ImageMagick and exiftool keep EXIF: its content is written as a fresh eXIf
# chunk (orientation reset), so a copy would carry the old orientation and be applied a second time.
_PNG_EXIF_TEXT = frozenset({"Raw profile type exif", "Raw profile type APP1"})
_ORIENTATION = 0x0112
_TIFF_XMP, _TIFF_IPTC, _TIFF_PHOTOSHOP = 700, 33723, 34377
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# How a PNG says its colours are to be shown (gamma, primaries, "this is sRGB"): without them a viewer shows the
# restored photo lighter or darker than the source.
_PNG_COLOUR_CHUNKS = (b"gAMA", b"cHRM", b"sRGB")
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"

# What Pillow's plugins raise for a damaged file, depending on where the damage is.
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error, zlib.error)

Image.init()  # register every plugin once, at import, so decode never mutates Pillow's registry


# --------------------------------------------------------------------------------------- decode


def decode(data: bytes, *, max_pixels: int = 100_000_000, long_side: int | None = None) -> DecodedImage:
    """Decode ``data`` completely into the engine's working form.

    ``long_side``: the caller will scale the image down to this long side anyway (a preset's
    ``max_long_side``). A JPEG then comes back already scaled down, exactly to ``capped_size`` of its
    full size: libjpeg decodes it at the smallest of 1/2, 1/4 or 1/8 scale that is still large enough
    (its DCT scaling, several times faster than a full decode) and the rest is an ordinary resize. Other
    formats come back at their full size, since their alpha and 16-bit planes are kept at full size.

    Raises :class:`InputError` for anything that is not a complete, single, supported image and
    :class:`ImageTooLarge` (before decoding pixels) above ``max_pixels``.
    """
    fmt, im, layout = _open_checked(data, max_pixels)
    full_size = im.size
    try:
        if layout is not None:
            rgb, alpha, high_bit, grayscale, icc, info = _pixels_samples16(im, data, layout)
        else:
            if fmt == "JPEG" and long_side:
                _reduce_jpeg(im, long_side)
            # Read from the bytes: asking Pillow for EXIF before the load changes how it loads some files.
            stored = tiff.orientation(data) if fmt == "TIFF" else 1
            _load(im, fmt)
            rgb, alpha, high_bit, grayscale, icc, info = _pixels(im, data, fmt)
        orientation = _orientation(im)
        # Pillow's libtiff path turns a TIFF upright itself as it loads, and forgets the tag: the bytes say.
        turned = orientation if orientation != 1 or layout is not None else stored
        exif = _clean_exif(im, reset_orientation=orientation != 1, transposed=turned in (5, 6, 7, 8))
        info.update(_format_info(im, data, fmt))
        if layout is None and orientation == 1 and stored != 1:
            # Pillow's libtiff path (compressed or tiled TIFFs) turns the pixels upright itself while loading and
            # drops the tag: the pixels need nothing more, but the dpi still follows the turn.
            info["source_orientation"] = stored
            if stored in (5, 6, 7, 8) and isinstance(dpi := info.get("dpi"), tuple):
                info["dpi"] = dpi[::-1]
    finally:
        im.close()
    if fmt == "JPEG" and long_side:
        # Sized from the stored image, not the reduced one: the size a full decode and resize_long_side give.
        width, height = capped_size(*full_size, long_side)
        if rgb.shape[:2] != (height, width):
            rgb = _resize(rgb, width, height)
        if (width, height) != full_size:
            info["reduced_from"] = full_size  # as stored, before orientation
    rgb = _orient(rgb, orientation)
    alpha = None if alpha is None else _orient(alpha, orientation)
    high_bit = None if high_bit is None else _orient(high_bit, orientation)
    if exif is not None:
        exif = _exif_sized(exif, (rgb.shape[1], rgb.shape[0]))  # upright: swapped for orientations 5-8
    if orientation != 1:
        info["source_orientation"] = orientation
    if orientation in (5, 6, 7, 8) and isinstance(dpi := info.get("dpi"), tuple):
        info["dpi"] = dpi[::-1]  # a fax's 204 x 196 dpi: the upright image's width is the stored height
    if fmt == "JPEG" and (damage := jpeg.damage(data)):
        info["damaged"] = f"the JPEG's compressed data is damaged ({damage}): it decodes as a viewer shows it"
    if fmt == "TIFF" and (extra := tiff.unspecified_extra_samples(data)):
        # Pillow reads such a file without them (a mask, a spot colour): the backup has them, the result cannot.
        info["dropped"] = (f"{extra} extra channel{'s' * (extra > 1)} the TIFF does not call alpha (a mask or spot "
                           "colour, say) cannot be written back: the result has the colour channels only")
    return DecodedImage(
        rgb=rgb,
        format=fmt,
        mode=str(info.pop("source_mode")),
        alpha=alpha,
        high_bit=high_bit,
        grayscale=grayscale,
        exif=exif,
        icc_profile=icc,
        info=info,
    )


def check_complete(data: bytes, *, max_pixels: int = 100_000_000) -> tuple[int, int]:
    """Return the displayed (width, height) if ``data`` decodes completely, else raise :class:`InputError`.

    Decodes every pixel (that is the only proof a file is whole; a JPEG at 1/8 scale, which still reads
    every block) but skips the conversions and keeps no arrays, so the readiness gate can call it on
    every candidate.
    """
    fmt, im, layout = _open_checked(data, max_pixels)
    try:
        if layout is not None:
            _read_samples16(data, layout)
            width, height = layout.width, layout.height  # as stored: Pillow's size is not
        else:
            width, height = im.size
            if fmt == "JPEG":
                # Every entropy-coded block is still read at 1/8 scale, so damage shows just the same; only
                # the inverse DCT and colour conversion, most of a full decode's time, are left out.
                _reduce_jpeg(im, 1)
            _load(im, fmt)
            if _needs_cv2_16bit(im, data, fmt):
                _decode_16bit_with_cv2(im, data)
        swapped = _orientation(im) in (5, 6, 7, 8)
    finally:
        im.close()
    return (height, width) if swapped else (width, height)


def _open_checked(data: bytes, max_pixels: int) -> tuple[str, ImageFile.ImageFile, tiff.Samples16 | None]:
    """The format and the opened (not loaded) image; for a TIFF the engine reads itself also its layout.

    Those (16-bit gray+alpha, 16-bit planar RGB(A): :class:`tiff.Samples16`) are opened on a retagged
    copy that reads as plain 16-bit gray: good for the size, metadata and page checks, never loaded.
    """
    if not data:
        raise InputError("empty file (0 bytes)")
    fmt = _sniff(data)
    _check_container_complete(data, fmt)  # first: a raw file still being copied is not refused while it arrives
    if fmt == "TIFF" and (raw := tiff.raw_camera(data)) is not None:
        raise UnsupportedImage(f"unsupported image format {raw} (a camera raw file: what opens of it is a small "
                               "preview; supported: JPEG, PNG, WebP, TIFF, BMP)")
    if fmt == "WEBP":
        # libwebp allocates its canvas while the file is being opened: check the header first.
        size = _webp_canvas_size(data)
        if size is None:
            raise InputError("corrupt WebP: no readable image header")
        _check_pixels(size, max_pixels)
    if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        _check_pixels(struct.unpack(">II", data[16:24]), max_pixels)
    layout = tiff.samples16(data) if fmt == "TIFF" else None
    im = _open_with_plugin(data if layout is None else tiff.gray_view(data, layout, header=True), fmt)
    try:
        _check_pixels(im.size, max_pixels)
        _refuse_multi_frame(im, fmt, data)
    except BaseException:
        im.close()
        raise
    return fmt, im, layout


_SUPPORTED_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (_PNG_SIGNATURE, "PNG"), (b"RIFF", "WebP"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> str:
    prefix = data[:16]
    for magic, name in _SUPPORTED_MAGIC:
        if len(data) < len(magic) + 8 and magic.startswith(data[: len(magic)]):
            raise InputError(f"truncated {name}: only {len(data)} bytes")
    for fmt in SUPPORTED_FORMATS:
        accept = Image.OPEN[fmt][1]
        verdict = accept(prefix) if accept is not None else False
        if verdict and not isinstance(verdict, str):
            return fmt
    for magic, offset, name in _UNSUPPORTED_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            raise UnsupportedImage(
                f"unsupported image format {name} (supported: JPEG, PNG, WebP, TIFF, BMP)"
            )
    if data[:1] == b"<" and b"<svg" in data[:1024].lower():
        raise UnsupportedImage("unsupported image format SVG (supported: JPEG, PNG, WebP, TIFF, BMP)")
    if re.match(rb"P[1-7]\s", data[:3]):
        raise UnsupportedImage("unsupported image format Netpbm (PPM, PGM, PBM, PAM; supported: JPEG, PNG, WebP, "
                               "TIFF, BMP)")
    if data.endswith(b"TRUEVISION-XFILE.\x00"):
        raise UnsupportedImage("unsupported image format TGA (supported: JPEG, PNG, WebP, TIFF, BMP)")
    if prefix.strip(b"\0"):
        raise UnsupportedImage("not an image (unrecognised format)")
    # Only zeros so far: a writer that sets the size first and fills it in later looks like this.
    raise InputError("not an image (unrecognised format; the file starts with zero bytes)")


def _open_with_plugin(data: bytes, fmt: str) -> ImageFile.ImageFile:
    # Opening through the plugin's factory (what Image.open does internally) keeps Pillow's global
    # decompression-bomb threshold out of the way: the pixel limit checked here is the caller's.
    factory = Image.OPEN[fmt][0]
    try:
        im = factory(io.BytesIO(data), "")
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except SyntaxError as exc:
        if fmt == "TIFF" and str(exc) == "unknown pixel mode":
            # A complete, readable directory that names a layout Pillow has no mode for: not damage.
            raise UnsupportedImage(f"unsupported TIFF pixel format: {tiff.layout_text(data)}") from exc
        raise InputError(f"corrupt {fmt}: {exc}") from exc
    except (OSError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error, zlib.error) as exc:
        raise InputError(f"corrupt {fmt}: {exc}") from exc
    if not isinstance(im, ImageFile.ImageFile):  # a factory may hand back a plain Image
        raise InputError(f"corrupt {fmt}: unreadable header")
    # The whole file is in memory: feed the decoder in one call rather than in 64 KiB reads. Each
    # call takes the GIL back, and behind a busy device thread each take can wait a switch interval
    # (next to a Python-bound thread, a 1920 px JPEG took 75 ms in 7 calls, 42 ms in one).
    im.decodermaxblock = max(im.decodermaxblock, len(data))
    return im


def _check_pixels(size: tuple[int, int] | tuple[Any, ...], max_pixels: int) -> None:
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise InputError(f"corrupt image header: size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels "
            f"exceeds the limit of {max_pixels / 1e6:.1f} megapixels"
        )


def _refuse_multi_frame(im: ImageFile.ImageFile, fmt: str, data: bytes) -> None:
    if fmt == "TIFF" and (kinds := tiff.page_kinds(data)) is not None:
        # Read from the directories: Pillow would set every page up, and call a preview page it has no
        # mode for (16-bit gray+alpha, say) corrupt. Pages flagged "reduced resolution" are previews of
        # page 0, not content we would lose.
        if len(kinds) > tiff.MAX_PAGES:
            raise UnsupportedImage(f"multi-page TIFF (more than {tiff.MAX_PAGES} pages) is not supported")
        if any(not kind & 1 for kind in kinds[1:]):
            raise UnsupportedImage(
                f"multi-page TIFF ({len(kinds)} pages) is not supported: restoring one page would drop the others"
            )
        return
    try:
        frames = int(getattr(im, "n_frames", 1))  # reads every page's header in a TIFF
    except _CORRUPT as exc:
        raise InputError(f"corrupt {fmt}: {exc}") from exc
    if frames <= 1:
        return
    if fmt in ("PNG", "WEBP"):
        raise UnsupportedImage(
            f"animated {fmt if fmt == 'PNG' else 'WebP'} ({frames} frames) is not supported: "
            "restoring one frame would drop the others"
        )
    if fmt == "TIFF":
        # Extra pages flagged "reduced resolution" are previews of page 0, not content we would lose.
        if frames > tiff.MAX_PAGES:
            raise UnsupportedImage(f"multi-page TIFF ({frames} pages) is not supported")
        try:
            for page in range(1, frames):
                im.seek(page)
                if not int(im.tag_v2.get(254, 0)) & 1:  # type: ignore[attr-defined]
                    raise UnsupportedImage(
                        f"multi-page TIFF ({frames} pages) is not supported: "
                        "restoring one page would drop the others"
                    )
            im.seek(0)
        except InputError:
            raise
        except _CORRUPT as exc:
            raise InputError(f"corrupt TIFF: {exc}") from exc
    if fmt == "JPEG" and (views := jpeg.mpf_views(data)) > 1:
        raise UnsupportedImage(
            f"multi-picture JPEG ({views} views of a stereo pair, panorama or multi-angle series) is not "
            "supported: restoring one view would drop the others")
    # Other JPEG/MPO extra pictures are previews or a gain map; the primary image is the photo.


def _check_container_complete(data: bytes, fmt: str) -> None:
    if fmt == "JPEG" and not jpeg.has_end(data):
        raise InputError("truncated JPEG: the file ends before the image's end marker")
    if fmt == "PNG" and data.find(_PNG_IEND) < 0:
        raise InputError("truncated PNG: the IEND chunk is missing")
    if fmt == "TIFF" and (problem := tiff.incomplete(data)):
        raise InputError(f"truncated TIFF: {problem}")
    if fmt == "WEBP":
        declared = struct.unpack("<I", data[4:8])[0] + 8 if len(data) >= 8 else 0
        if len(data) < declared or len(data) < 20:
            raise InputError(f"truncated WebP: {len(data)} of {declared} bytes")


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _reduce_jpeg(im: ImageFile.ImageFile, long_side: int) -> None:
    """Have libjpeg decode ``im`` at 1/2, 1/4 or 1/8 scale: the smallest whose long side is still >= ``long_side``."""
    width, height = im.size
    for scale in (8, 4, 2):
        if -(-max(width, height) // scale) >= long_side and scale <= min(width, height):
            # Pillow takes the largest reduction that keeps both sides at least the size asked for: this one.
            im.draft(im.mode, (width // scale, height // scale))
            return


def _load(im: ImageFile.ImageFile, fmt: str) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Something in this process switched Pillow to padding truncated files. That is a fault of
        # the process, not of the file, so it must not be reported as bad input.
        raise EngineError("refusing to decode: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process")
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except (*_CORRUPT, MemoryError) as exc:
        message = str(exc)
        kind = "truncated" if "truncated" in message or isinstance(exc, EOFError) else "corrupt"
        raise InputError(f"{kind} {fmt}: {message}") from exc


# ----------------------------------------------------------------------------- pixel conversion


_Pixels = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, bool, bytes | None, dict[str, object]]


def _pixels(im: ImageFile.ImageFile, data: bytes, fmt: str) -> _Pixels:
    mode = im.mode
    icc = im.info.get("icc_profile") or None
    info: dict[str, object] = {"source_mode": mode}
    if _needs_cv2_16bit(im, data, fmt):
        return (*_pixels_16bit_color(im, data), icc, info)
    # A colour key (PNG's tRNS for gray or RGB pixels) makes the pixels of one value transparent: it
    # comes back as an alpha channel, since restored pixels no longer hold the key value exactly.
    keyed = "transparency" in im.info
    if mode.startswith("I;16") or mode == "I":
        gray16 = np.asarray(im)
        if gray16.min(initial=0) < 0 or gray16.max(initial=0) > 65535:
            raise InputError(f"unsupported {fmt} pixel format: 32-bit integer samples")
        key = im.info.get("transparency") if keyed else None
        alpha16 = None if not isinstance(key, int) else np.where(gray16 == key, 0, 65535).astype(np.uint16)
        if fmt == "TIFF" and im.tag_v2.get(tiff.PHOTOMETRIC) == 0:  # type: ignore[attr-defined]
            gray16 = 65535 - gray16  # "min is white": Pillow inverts 8-bit samples itself, not 16-bit ones
        high = np.ascontiguousarray(gray16.astype(np.uint16))[:, :, None]
        return _gray_rgb(_to_8bit(high[:, :, 0])), alpha16, high, True, icc, info
    if mode in ("1", "L") and not keyed:
        return _gray_rgb(np.asarray(im.convert("L"))), None, None, True, icc, info
    if mode in ("1", "L", "LA", "La"):
        la = np.asarray(im.convert("LA"))
        return _gray_rgb(la[:, :, 0]), np.ascontiguousarray(la[:, :, 1]), None, True, icc, info
    if mode == "CMYK":
        rgb_im, icc = _cmyk_to_rgb(im, icc, info)
        return np.asarray(rgb_im).copy(), None, None, False, icc, info
    if mode == "RGB" and not keyed:
        return np.array(im), None, None, False, icc, info  # one copy, writable
    if mode in ("RGBX", "YCbCr"):
        return np.asarray(im.convert("RGB")).copy(), None, None, False, icc, info
    if mode in ("RGBA", "RGBa", "PA", "RGB") or (mode == "P" and keyed):
        rgba = np.asarray(im.convert("RGBA"))
        rgb, alpha = np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
        return rgb, alpha, None, False, icc, info
    if mode == "P":
        return np.asarray(im.convert("RGB")).copy(), None, None, False, icc, info
    raise InputError(f"unsupported {fmt} pixel format {mode}")


def _gray_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _to_8bit(values16: np.ndarray) -> np.ndarray:
    """Nearest 8-bit value of 16-bit samples (v8 * 257 is the exact 16-bit image of v8)."""
    return ((values16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _cmyk_to_rgb(
    im: ImageFile.ImageFile, icc: bytes | None, info: dict[str, object]
) -> tuple[Image.Image, bytes | None]:
    # With the file's own CMYK profile the conversion is colour-managed; the output is then sRGB and
    # says so. The CMYK profile cannot describe an RGB image, so it rides along only in ``info``.
    if icc is not None and _icc_colour_space(icc) == "CMYK":
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(
                im, src, dst, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB"
            )
            if converted is not None:
                info["source_icc_profile"] = icc
                return converted, ImageCms.ImageCmsProfile(dst).tobytes()
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain conversion below
    if icc is not None:
        info["source_icc_profile"] = icc
    return im.convert("RGB"), None


def _needs_cv2_16bit(im: ImageFile.ImageFile, data: bytes, fmt: str) -> bool:
    """16-bit colour (or gray+alpha) sources, which Pillow would cut to 8 bits.

    16-bit CMYK TIFFs, which OpenCV cannot read, are left to Pillow: they become 8-bit RGB like
    8-bit CMYK (the conversion to RGB changes every value anyway).
    """
    if fmt == "PNG":
        return len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)
    if fmt == "TIFF" and im.mode in ("RGB", "RGBA"):
        bits = im.tag_v2.get(258, (8,))  # type: ignore[attr-defined]
        bits = bits if isinstance(bits, tuple) else (bits,)
        return any(int(b) == 16 for b in bits)
    return False


def _decode_16bit_with_cv2(im: ImageFile.ImageFile, data: bytes) -> np.ndarray:
    if getattr(im, "tag_v2", {}).get(284) == 2:  # PlanarConfiguration, as Pillow read it (BigTIFF too)
        # OpenCV reads a planar TIFF's first plane as if it held every sample: wrong pixels, no error. The planar
        # classic TIFFs the engine reads itself (tiff.samples16) never come here; other layouts and BigTIFFs do.
        layout = tiff.layout_text(data) if tiff.directory(data) else "16-bit samples stored in planes, in a BigTIFF"
        raise UnsupportedImage(f"unsupported TIFF pixel format: {layout}")
    # IMREAD_UNCHANGED keeps the bit depth and alpha and does not apply EXIF orientation (we do).
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16 or array.shape[1::-1] != tuple(im.size):
        raise InputError("corrupt 16-bit image: the pixel data could not be decoded")
    return array


def _pixels_16bit_color(
    im: ImageFile.ImageFile, data: bytes
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, bool]:
    array = _decode_16bit_with_cv2(im, data)
    # PNG colour types 0/4 and TIFF photometric 0/1 are the gray ones.
    is_png = data[:8] == _PNG_SIGNATURE
    gray_source = data[25] in (0, 4) if is_png else int(im.tag_v2.get(262, 2)) in (0, 1)  # type: ignore[attr-defined]
    # TIFF ExtraSamples: 0 an unspecified sample (not transparency: Pillow reads such files as RGB),
    # 1 alpha the colour was multiplied by, 2 plain alpha. OpenCV hands back the stored samples.
    extra = () if is_png else im.tag_v2.get(tiff.EXTRA_SAMPLES, ())  # type: ignore[attr-defined]
    extra = extra if isinstance(extra, tuple) else (extra,)
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    alpha = np.ascontiguousarray(array[:, :, 3]) if channels == 4 else None
    if channels == 2:
        alpha = np.ascontiguousarray(array[:, :, 1])
    if extra[:1] == (0,):
        alpha = None
    if gray_source or channels <= 2:
        high = np.ascontiguousarray(array[:, :, :1])
    else:
        high = np.ascontiguousarray(array[:, :, 2::-1])  # BGR -> RGB
    if alpha is not None and extra[:1] == (1,):
        high = _unpremultiply(high, alpha)
    if high.shape[2] == 1:
        return _gray_rgb(_to_8bit(high[:, :, 0])), alpha, high, True
    return _to_8bit(high), alpha, high, False


def _unpremultiply(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """16-bit colour stored multiplied by its alpha ("associated alpha") as plain colour; 0 where alpha is 0."""
    weight = alpha.astype(np.uint32)[:, :, None]
    # At most 65535 * 65535 + 32767, which still fits in 32 bits.
    straight = (colour.astype(np.uint32) * 65535 + weight // 2) // np.maximum(weight, 1)
    return np.where(weight > 0, np.minimum(straight, 65535), 0).astype(np.uint16)


# ------------------------------------------------ 16-bit gray+alpha and planar RGB(A) TIFF


def _read_samples16(data: bytes, layout: tiff.Samples16) -> np.ndarray:
    """The stored HxWxN samples of a :class:`tiff.Samples16` TIFF (decoding all of them proves the file whole)."""
    if layout.planar:
        return np.dstack([_read_view(tiff.gray_view(data, layout, plane), layout.width, layout.height)
                          for plane in range(layout.samples)])
    rows = _read_view(tiff.gray_view(data, layout), layout.samples * layout.width, layout.height)
    samples = rows.reshape(layout.height, layout.width, layout.samples)
    if layout.predictor == 2:
        # Horizontal differencing restarts at each row of each strip or tile, per sample.
        block = max(1, layout.tile_width)
        for start in range(0, layout.width, block):
            part = samples[:, start : start + block]
            part[...] = np.cumsum(part, axis=1, dtype=np.uint16)  # modulo 2**16, as it was taken
    return samples


def _read_view(view: bytes, width: int, height: int) -> np.ndarray:
    im = _open_with_plugin(view, "TIFF")
    try:
        _load(im, "TIFF")
        if not im.mode.startswith("I;16") or im.size != (width, height):
            raise InputError(f"corrupt TIFF: the samples read as {im.mode} {im.size[0]}x{im.size[1]}")
        return np.asarray(im).astype(np.uint16)
    finally:
        im.close()


def _pixels_samples16(im: ImageFile.ImageFile, data: bytes, layout: tiff.Samples16) -> _Pixels:
    samples = _read_samples16(data, layout)
    colours = 3 if layout.rgb else 1
    colour = samples[:, :, :colours]
    if layout.min_is_white:
        colour = 65535 - colour
    alpha = np.ascontiguousarray(samples[:, :, colours]) if layout.extra in (1, 2) else None
    high = np.ascontiguousarray(colour)
    if alpha is not None and layout.extra == 1:
        high = _unpremultiply(high, alpha)
    icc = im.info.get("icc_profile") or None
    if layout.rgb:
        return _to_8bit(high), alpha, high, False, icc, {"source_mode": "RGBA" if alpha is not None else "RGB"}
    info: dict[str, object] = {"source_mode": "LA" if alpha is not None else "I;16"}
    return _gray_rgb(_to_8bit(high[:, :, 0])), alpha, high, True, icc, info


# ------------------------------------------------------------------------------------- metadata


def _orientation(im: ImageFile.ImageFile) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION, 1))
    except (OSError, ValueError, TypeError, SyntaxError, struct.error):
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels into displayed pixels (EXIF orientation 1-8)."""
    transforms: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    if orientation not in transforms:
        return array
    return np.ascontiguousarray(transforms[orientation](array))


def _clean_exif(im: ImageFile.ImageFile, *, reset_orientation: bool, transposed: bool) -> bytes | None:
    """The source's EXIF for the restored photo: Orientation 1, no thumbnail, no tags describing the source's layout.

    Edited in place wherever the source carries EXIF as a block of its own (JPEG, PNG, WebP), so tag types and
    every offset, a maker note's included, stay as the camera wrote them.
    """
    block = _exif_source_block(im)
    if block is not None and (kept := exif_block.patched(block, drop=_STRUCTURAL_TAGS, transposed=transposed)):
        return kept
    # Re-serialized by Pillow, which changes tag types and moves values (a maker note with offsets of its own then
    # reads wrong): a TIFF's EXIF is the image's own directory, whose values lie among the pixel data, so it has
    # no block to keep; other blocks come here only when they cannot be edited in place.
    try:
        exif = im.getexif()
        for tag in [t for t in exif if t in _STRUCTURAL_TAGS]:
            del exif[tag]
        if reset_orientation or _ORIENTATION in exif:
            exif[_ORIENTATION] = 1
        if not len(exif):
            return None
        if transposed:  # as exif_block.patched does in place
            pairs: list[tuple[Any, tuple[int, int]]] = [(exif, (exif_block.X_RESOLUTION, exif_block.Y_RESOLUTION))]
            if exif_block.EXIF_IFD in exif:
                sub = exif.get_ifd(exif_block.EXIF_IFD)
                pairs += [(sub, (exif_block.PIXEL_X, exif_block.PIXEL_Y)),
                          (sub, (exif_block.FOCAL_PLANE_X, exif_block.FOCAL_PLANE_Y))]
            for tags, (x, y) in pairs:
                if x in tags and y in tags:
                    tags[x], tags[y] = tags[y], tags[x]
        _keep_text(exif)
        return exif.tobytes()
    except (OSError, ValueError, TypeError, SyntaxError, KeyError, struct.error):
        return None  # unreadable EXIF is dropped rather than failing a good photo


def _exif_source_block(im: ImageFile.ImageFile) -> bytes | None:
    block = im.info.get("exif")
    if block is None and isinstance(text := im.info.get("Raw profile type exif"), str):
        try:
            block = bytes.fromhex("".join(text.split("\n")[3:]))  # how Pillow itself reads ImageMagick's profile
        except ValueError:
            return None
    return block if isinstance(block, bytes) else None


def _exif_sized(block: bytes, size: tuple[int, int]) -> bytes:
    """``block`` with the PixelX/YDimension it has set to ``size`` (width, height): the size of the image it is for."""
    if (sized := exif_block.patched(block, size=size)) is not None:
        return sized
    try:  # a size its SHORT cannot hold: re-serialized, Pillow picking types that hold the values
        exif = Image.Exif()
        exif.load(block)
        sub = exif.get_ifd(exif_block.EXIF_IFD)
        for tag, value in ((exif_block.PIXEL_X, size[0]), (exif_block.PIXEL_Y, size[1])):
            if tag in sub:
                sub[tag] = value
        _keep_text(exif)
        return exif.tobytes()
    except (OSError, ValueError, TypeError, SyntaxError, KeyError, struct.error):
        return block


_X_RESOLUTION, _Y_RESOLUTION, _RESOLUTION_UNIT = 0x011A, 0x011B, 0x0128


def _exif_dpi(exif: Image.Exif | dict[int, object]) -> tuple[float, float] | None:
    """Dots per inch from EXIF's X/YResolution and ResolutionUnit (2, inches, when absent; 3, centimetres;
    1, no unit: a ratio only), or None."""
    unit = exif.get(_RESOLUTION_UNIT, 2)
    x = exif.get(_X_RESOLUTION)
    y = exif.get(_Y_RESOLUTION, x)
    if unit not in (2, 3) or x is None:
        return None
    try:
        scale = 2.54 if unit == 3 else 1.0
        return float(x) * scale, float(y) * scale  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _exif_of(im: ImageFile.ImageFile) -> Image.Exif | dict[int, object]:
    try:
        return im.getexif()
    except (OSError, ValueError, TypeError, SyntaxError, KeyError, struct.error):
        return {}


def _reset_xmp_orientation(xmp: bytes | str) -> bytes:
    raw = xmp.encode("utf-8") if isinstance(xmp, str) else bytes(xmp)
    raw = re.sub(rb'tiff:Orientation="\d"', b'tiff:Orientation="1"', raw)
    return re.sub(rb"<tiff:Orientation>\d</tiff:Orientation>", b"<tiff:Orientation>1</tiff:Orientation>", raw)


def _format_info(im: ImageFile.ImageFile, data: bytes, fmt: str) -> dict[str, object]:
    info: dict[str, object] = {}
    # Pillow reports 1 x 1 dpi for a TIFF that has no resolution at all (its default for a missing tag): written
    # out, that would claim a print size of several metres.
    unknown = fmt == "TIFF" and not {_X_RESOLUTION, _Y_RESOLUTION} <= set(getattr(im, "tag_v2", {}))
    found = im.info.get("dpi")
    if fmt == "JPEG" and im.info.get("jfif_unit") not in (1, 2):
        # JFIF gives only an aspect ratio (or is absent): the EXIF decides. Pillow says 72 dpi where it has no
        # resolution or no unit (whose default is inches); neither is the photo's.
        found = _exif_dpi(_exif_of(im))
    if found is not None and not unknown:
        dpi = tuple(float(v) for v in found)
        if all(math.isfinite(v) and v > 0 for v in dpi):  # a 0/0 resolution tag reads as NaN
            info["dpi"] = dpi
    if xmp := im.info.get("xmp"):
        info["xmp"] = _reset_xmp_orientation(xmp)
    if fmt == "JPEG":
        info["jpeg_subsampling"] = JpegImagePlugin.get_sampling(im)
        info["progressive"] = bool(im.info.get("progressive") or im.info.get("progression"))
        # Every comment segment, in order: scanners and archives leave several (a scanner's note, a box number),
        # and Pillow keeps only the last.
        if comments := [data[pos + 4 : pos + 2 + length] for marker, pos, length in jpeg.header_segments(data)
                        if marker == 0xFE and length > 2]:
            info["jpeg_comments"] = comments
        # Joined first: Photoshop continues a long run of resources in the next segment, and a record that
        # crosses into it is cut short in Pillow's reading of each segment alone.
        resources = jpeg.app13_resources(data)
        if iptc := photoshop.data_of(resources, photoshop.IPTC):
            info["iptc"] = iptc
        if extended := jpeg.extended_xmp(data):
            info["xmp_extended"] = extended
        if kept := photoshop.kept(resources):
            info["photoshop_resources"] = kept
    elif fmt == "PNG":
        info["png_colour"] = _png_colour_chunks(data)
        text = getattr(im, "text", {}) or {}
        info["png_text"] = {k: v for k, v in text.items() if k != "XML:com.adobe.xmp" and k not in _PNG_EXIF_TEXT}
    elif fmt == "TIFF":
        info["tiff_compression"] = im.info.get("compression", "raw")
        iptc = tiff.raw_value(data, _TIFF_IPTC) or getattr(im, "tag_v2", {}).get(_TIFF_IPTC)  # a BigTIFF: Pillow's
        if isinstance(iptc, bytes) and iptc:
            info["iptc"] = iptc
        if resources := photoshop.kept(tiff.raw_value(data, _TIFF_PHOTOSHOP) or b""):
            info["photoshop_resources"] = resources
    elif fmt == "WEBP":
        info["webp_lossless"] = _webp_is_lossless(data)
    return info


def _png_colour_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The source's gAMA, cHRM and sRGB chunks as (type, payload), their bytes as stored (no float round trip)."""
    found, pos = [], len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind in (b"IDAT", b"IEND"):  # the spec puts them before the image data
            break
        if kind in _PNG_COLOUR_CHUNKS:
            found.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return found


def _webp_is_lossless(data: bytes) -> bool:
    pos = 12
    while pos + 8 <= len(data):
        fourcc = data[pos : pos + 4]
        if fourcc in (b"VP8 ", b"VP8L"):
            return fourcc == b"VP8L"
        length = struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        pos += 8 + length + (length & 1)
    return False


def _icc_colour_space(icc: bytes) -> str:
    return icc[16:20].decode("latin-1").strip() if len(icc) >= 20 else ""


# --------------------------------------------------------------------------------------- encode


def encode(image: DecodedImage, rgb: np.ndarray, *, options: EncodeOptions) -> tuple[bytes, str]:
    """Write ``rgb`` (the restored working copy) in the source's own form; return (bytes, format).

    The format is the source's unless ``options.format`` says otherwise. Alpha, grayscale, 16-bit
    depth, EXIF (orientation 1: the pixels are already upright), ICC, XMP and DPI come back where the
    format can hold them. ``rgb`` may be smaller than the source (the preset capped the long side);
    alpha and 16-bit data are resized to match. For 16-bit sources every sample the engine did not
    change is written back bit-exactly.
    """
    requested = (options.format or image.format).upper()
    fmt = _FORMAT_ALIASES.get(requested, requested)
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"cannot write format {fmt!r}; supported: {', '.join(SUPPORTED_FORMATS)}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    alpha = _resize_to(image.alpha, width, height)
    high = _resize_to(image.high_bit, width, height)
    grayscale = image.grayscale and fmt != "WEBP"  # WebP has no grayscale mode
    keep_alpha = alpha is not None and fmt != "JPEG"  # JPEG has no alpha
    if alpha is not None and not keep_alpha:
        rgb = _over_white(rgb, alpha)

    def as_samples(pixels: np.ndarray) -> np.ndarray:
        if grayscale:
            return _luma(pixels)[:, :, None]
        if image.grayscale:  # a gray photo stays gray in a format without a gray mode
            return np.repeat(_luma(pixels)[:, :, None], 3, axis=2)
        return pixels

    samples = as_samples(rgb)
    if high is not None and fmt in ("PNG", "TIFF"):
        if high.shape[2] != samples.shape[2]:
            high = _luma16(high) if samples.shape[2] == 1 else np.repeat(high, 3, axis=2)
        # What the engine changed, against exactly what it was given (the 8-bit copy, scaled as the preset
        # scaled it): 8-bit rounding of a separately scaled 16-bit copy would differ by one in many places,
        # 257 steps in 16 bits, far from any face.
        given = image.rgb if image.rgb.shape[:2] == (height, width) else _resize(image.rgb, width, height)
        base = as_samples(given)
        delta = samples.astype(np.int32) - base.astype(np.int32)
        samples16 = np.clip(high.astype(np.int32) + delta * 257, 0, 65535).astype(np.uint16)
        alpha16 = None if not keep_alpha or alpha is None else _as_16bit(alpha)
        return _encode_16bit(image, samples16, alpha16, fmt, options), fmt
    alpha8 = None if not keep_alpha or alpha is None else _as_8bit(alpha)
    return _encode_8bit(image, samples, alpha8, fmt, options), fmt


def encode_result(source: bytes, image: DecodedImage, rgb: np.ndarray, *, restored: bool, options: EncodeOptions,
                  max_pixels: int) -> tuple[bytes, str]:
    """The bytes to write for ``source`` (decoded as ``image``) and their format.

    ``rgb`` is the engine's result. When nothing was restored (no face) and no other format was asked for, the
    source's own bytes: re-encoding would only cost a generation of JPEG loss, and ``rgb`` may be a copy the
    preset scaled down. Converted, a photo without faces is written at its full size.
    """
    if not restored and options.format in (None, image.format):
        return source, image.format
    if not restored and "reduced_from" in image.info:  # decoded at the preset's size: decode it again in full
        rgb = decode(source, max_pixels=max_pixels).rgb
    elif not restored:
        rgb = image.rgb
    return encode(image, rgb, options=options)


def extension_for(format: str) -> str:
    """File extension (with the dot) for a Pillow format name, e.g. ``"JPEG" -> ".jpg"``."""
    name = _FORMAT_ALIASES.get(format.upper(), format.upper())
    if name not in _EXTENSIONS:
        raise ValueError(f"no extension for format {format!r}")
    return _EXTENSIONS[name]


_OTHER_SUFFIXES = {"JPEG": (".jpeg", ".jpe", ".jfif"), "TIFF": (".tiff",), "BMP": (".dib",)}


def keeps_suffix(suffix: str, format: str) -> bool:
    """Whether a file named ``*suffix`` may hold ``format`` as it is (``.JPEG`` for JPEG; not ``.jpg`` for PNG)."""
    known = extension_for(format)
    name = _FORMAT_ALIASES.get(format.upper(), format.upper())
    return suffix.lower() in (known, *_OTHER_SUFFIXES.get(name, ()))


def capped_size(width: int, height: int, max_long_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so the long side is at most ``max_long_side`` (None or 0: no cap)."""
    long_side = max(height, width)
    if not max_long_side or max_long_side <= 0 or long_side <= max_long_side:
        return width, height
    scale = max_long_side / long_side
    return max(1, min(max_long_side, round(width * scale))), max(1, min(max_long_side, round(height * scale)))


def resize_long_side(rgb: np.ndarray, max_long_side: int | None) -> np.ndarray:
    """Downsize (INTER_AREA) so the long side is at most ``max_long_side``; never upsizes.

    Works on any HxW or HxWxC uint8/uint16/float32 array; returns the input itself when no
    resize is needed.
    """
    height, width = rgb.shape[:2]
    new_w, new_h = capped_size(width, height, max_long_side)
    return rgb if (new_w, new_h) == (width, height) else _resize(rgb, new_w, new_h)


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    resized = cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA)
    if array.ndim == 3 and resized.ndim == 2:  # OpenCV drops a single channel axis
        resized = resized[:, :, None]
    return resized


def _resize_to(array: np.ndarray | None, width: int, height: int) -> np.ndarray | None:
    if array is None or array.shape[:2] == (height, width):
        return array
    return _resize(array, width, height)


def _luma(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601 weights in 16-bit fixed point summing to 65536: gray pixels map to themselves.
    r, g, b = (rgb[:, :, i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).astype(np.uint8)


def _luma16(high: np.ndarray) -> np.ndarray:
    r, g, b = (high[:, :, i].astype(np.uint64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).astype(np.uint16)[:, :, None]


def _as_8bit(alpha: np.ndarray) -> np.ndarray:
    return _to_8bit(alpha) if alpha.dtype == np.uint16 else alpha.astype(np.uint8)


def _as_16bit(alpha: np.ndarray) -> np.ndarray:
    return alpha if alpha.dtype == np.uint16 else alpha.astype(np.uint16) * 257


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    # A format without alpha shows what a viewer shows on a white page, not the hidden colours.
    weight = alpha.astype(np.float32)[:, :, None] / (65535.0 if alpha.dtype == np.uint16 else 255.0)
    return np.clip(rgb * weight + 255.0 * (1.0 - weight) + 0.5, 0, 255).astype(np.uint8)


def _metadata(image: DecodedImage, options: EncodeOptions, colour_space: str, size: tuple[int, int],
              fmt: str = "") -> dict[str, Any]:
    """What of the source's metadata goes into a result of ``size`` written as ``fmt``."""
    if not options.keep_metadata:
        return {}
    meta: dict[str, Any] = {}
    if image.exif:
        meta["exif"] = _exif_sized(image.exif, size)  # the result may be smaller than the source
    if image.icc_profile and _icc_colour_space(image.icc_profile) == colour_space:
        meta["icc_profile"] = image.icc_profile
    if isinstance(xmp := image.info.get("xmp"), bytes):
        extended = image.info.get("xmp_extended") if fmt == "JPEG" else None
        turned = image.info.get("source_orientation")
        meta["xmp"] = xmp_packet.for_result(xmp, size, extended_kept=bool(extended),
                                            turned_from=turned if isinstance(turned, int) else 1)
        if extended:
            meta["xmp_extended"] = extended
    if isinstance(iptc := image.info.get("iptc"), bytes):
        meta["iptc"] = iptc  # IPTC-IIM records, as a TIFF holds them
    if isinstance(resources := image.info.get("photoshop_resources"), bytes):
        meta["photoshop"] = resources  # the kept Photoshop resources (the IPTC record may be among them)
    if isinstance(dpi := image.info.get("dpi"), tuple):
        meta["dpi"] = dpi
    return meta


def _encode_8bit(
    image: DecodedImage, samples: np.ndarray, alpha: np.ndarray | None, fmt: str, options: EncodeOptions
) -> bytes:
    gray = samples.shape[2] == 1
    if alpha is not None:
        pixels = np.dstack([samples, alpha])
        mode = "LA" if gray else "RGBA"
    else:
        pixels = samples[:, :, 0] if gray else samples
        mode = "L" if gray else "RGB"
    pil = Image.fromarray(np.ascontiguousarray(pixels), mode)
    meta = _metadata(image, options, "GRAY" if gray else "RGB", (samples.shape[1], samples.shape[0]), fmt)
    params: dict[str, Any] = {}
    if fmt == "JPEG":
        params = {"quality": options.jpeg_quality, "progressive": bool(image.info.get("progressive"))}
        subsampling = image.info.get("jpeg_subsampling")
        if isinstance(subsampling, int) and subsampling >= 0:
            params["subsampling"] = subsampling
        params.update({k: v for k, v in meta.items() if k not in ("iptc", "xmp_extended", "photoshop")})
        if len(meta.get("exif", b"")) > _JPEG_MAX_EXIF:  # from a TIFF or PNG: a restored photo beats a failure
            del params["exif"]
        if len(xmp := params.get("xmp", b"")) > _JPEG_MAX_XMP:  # grown by the edits, or from a PNG or TIFF
            xmp = re.sub(rb"\s+(?=<\?xpacket end)", b"\n", xmp)  # the padding writers leave for edits
            if len(xmp) > _JPEG_MAX_XMP:
                del params["xmp"]
            else:
                params["xmp"] = xmp
        encoded = _save(pil, fmt, **params)
        if options.keep_metadata and isinstance(comments := image.info.get("jpeg_comments"), list):
            encoded = jpeg.with_segments(encoded, [b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text
                                               for text in comments])
        if meta.get("xmp_extended"):
            encoded = jpeg.with_segments(encoded, [b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
                                               for body in meta["xmp_extended"]])
        if meta.get("iptc") or meta.get("photoshop"):
            return jpeg.with_app13(encoded, photoshop.with_iptc(meta.get("photoshop", b""), meta.get("iptc")))
        return encoded
    elif fmt == "PNG":
        params = {k: v for k, v in meta.items() if k not in ("xmp", "iptc")}
        params["pnginfo"] = _png_text_info(image, meta.get("xmp"))
        for kind, payload in _png_colour(image, options):
            params["pnginfo"].add(kind, payload)  # Pillow leaves sRGB out itself next to an ICC profile
    elif fmt == "WEBP":
        lossless = bool(image.info.get("webp_lossless"))
        # exact: libwebp would otherwise replace the colour under fully transparent pixels.
        params = {"lossless": lossless, "quality": 100 if lossless else options.webp_quality, "exact": lossless}
        params.update({k: v for k, v in meta.items() if k not in ("dpi", "iptc")})
    elif fmt == "TIFF":
        compression = _tiff_compression(image)
        # Stored as differences along each row (predictor 2), as the 16-bit writer does: a photo compresses to
        # about three quarters of the size with LZW or deflate, and every reader of those decodes it.
        predictor = compression in _PREDICTED and pil.mode in ("L", "LA", "RGB", "RGBA")
        return _save_tiff(pil, compression, meta, predictor=predictor)
    elif fmt == "BMP" and alpha is not None:
        return _write_bmp32(pixels, meta.get("dpi"))
    elif fmt == "BMP" and "dpi" in meta:
        params = {"dpi": meta["dpi"]}
    return _save(pil, fmt, **params)


def _write_bmp32(pixels: np.ndarray, dpi: tuple[float, float] | None) -> bytes:
    """A 32-bit BMP with alpha: RGBA or gray+alpha ``pixels`` (HxWx4 or HxWx2 uint8).

    Pillow's own BMP writer stores 32-bit pixels without saying which byte is alpha, so readers (Pillow among
    them) take them as RGB. This one writes a BITMAPV4HEADER with BI_BITFIELDS masks, the alpha mask included,
    the layout Windows and Pillow read as RGBA.
    """
    height, width, channels = pixels.shape
    colour = np.repeat(pixels[:, :, :1], 3, axis=2) if channels == 2 else pixels[:, :, :3]
    rows = np.dstack([colour[:, :, ::-1], pixels[:, :, -1]])[::-1]  # BGRA, bottom row first
    ppm = [round(float(v) / 0.0254) for v in dpi] if dpi else [0, 0]
    header = struct.pack("<IiiHHIIiiII", 108, width, height, 1, 32, 3, rows.nbytes, ppm[0], ppm[1], 0, 0)
    header += struct.pack("<4I", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    header += b"BGRs" + bytes(36 + 12)  # colour space sRGB (LCS_sRGB, little-endian); endpoints and gamma unused
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + rows.nbytes, 0, 0, offset) + header + rows.tobytes()


def _save(pil: Image.Image, fmt: str, **params: Any) -> bytes:
    """``pil`` encoded as ``fmt``, by way of an in-memory file when the platform has one.

    Pillow compresses into a Python buffer (BytesIO) with the GIL held, piece by piece; into a real
    file descriptor it compresses with the GIL released. Encoding runs in a thread pool next to
    the device's thread, so holding the GIL here stalls the GPU: the bytes are the same either way.
    """
    try:
        fd = os.memfd_create("gpen-watch-encode", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux, or refused (a stricter seccomp filter): same bytes, slower
        buffer = io.BytesIO()
        pil.save(buffer, fmt, **params)
        return buffer.getvalue()
    with os.fdopen(fd, "w+b") as fh:
        pil.save(fh, fmt, **params)
        fh.seek(0)
        return fh.read()


def _png_colour(image: DecodedImage, options: EncodeOptions) -> list[tuple[bytes, bytes]]:
    chunks = image.info.get("png_colour") if options.keep_metadata else None
    return [(k, v) for k, v in chunks if k in _PNG_COLOUR_CHUNKS] if isinstance(chunks, list) else []


def _png_text_info(image: DecodedImage, xmp: bytes | None) -> PngImagePlugin.PngInfo:
    pnginfo = PngImagePlugin.PngInfo()
    text = image.info.get("png_text")
    if isinstance(text, dict):
        for key, value in text.items():
            if isinstance(key, str) and isinstance(value, str):  # an iTXt keeps its language and translated key
                pnginfo.add_itxt(key, value, lang=getattr(value, "lang", None) or "",
                                 tkey=getattr(value, "tkey", None) or "")
    if xmp:
        pnginfo.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
    return pnginfo


# EXIF's sub-directories (Exif, GPS, Interoperability): libtiff cannot be handed them (Pillow then fails the
# whole save), and Pillow's own writer copies the Interoperability pointer as the number it was in the source.
_GPS_IFD, _INTEROP_IFD = 0x8825, 0xA005
_EXIF_POINTERS = (exif_block.EXIF_IFD, _GPS_IFD, _INTEROP_IFD)


_PREDICTED = ("tiff_lzw", "tiff_deflate", "tiff_adobe_deflate")


def _save_tiff(pil: Image.Image, compression: str, meta: dict[str, Any], *, predictor: bool = False) -> bytes:
    """``pil`` as a TIFF with ``meta``; ``predictor``: libtiff stores each row as differences (predictor 2)."""
    if predictor:
        meta = meta | {"predictor": 2}
    try:
        encoded = _save(pil, "TIFF", compression=compression, **_tiff_metadata(meta))
    except (RuntimeError, ValueError, TypeError, struct.error):
        if "exif" not in meta:
            raise
        # libtiff refused a value the source's EXIF carried (a resolution unit out of range, a tag of a
        # type it defines otherwise): a restored photo beats a failure, as for a JPEG's EXIF limit.
        without_exif = {k: v for k, v in meta.items() if k != "exif"}
        return _save(pil, "TIFF", compression=compression, **_tiff_metadata(without_exif))
    if isinstance(block := meta.get("exif"), bytes):
        encoded = _with_exif_directories(encoded, block)
    return encoded


def _with_exif_directories(encoded: bytes, block: bytes) -> bytes:
    """``encoded`` (a TIFF Pillow wrote) with the Exif and GPS sub-directories of the EXIF ``block``.

    Neither of Pillow's TIFF writers writes them whole, so they are appended (laid out for their new place) and
    the first directory is pointed at them. Where that cannot be done the TIFF is returned as it was: the photo's
    capture time and place are worth keeping, not worth failing a restored photo for."""
    try:
        exif = Image.Exif()
        exif.load(block)
        _keep_text(exif)
        subs = _sub_directories(exif)
        if not subs:
            return encoded
        holder = TiffImagePlugin.ImageFileDirectory_v2(ifh=encoded[:4] + b"\0\0\0\0")
        for pointer, tags in subs.items():
            holder[pointer] = tags
        start = len(encoded) + len(encoded) % 2
        data = encoded.ljust(start, b"\0") + holder.tobytes(start)
        parsed = tiff.directory(data, start)
        if parsed is None:
            return encoded
        order, _, entries, _ = parsed
        pointers = {tag: struct.unpack(order + "I", value)[0] for tag, (_kind, _n, value) in entries.items()}
        return tiff.with_tags(data, {tag: (tiff.LONG, (offset,)) for tag, offset in pointers.items()})
    except (OSError, ValueError, TypeError, SyntaxError, KeyError, struct.error, InputError):
        return encoded


def _sub_directories(exif: Image.Exif) -> dict[int, dict[int, Any]]:
    """The Exif and GPS directories of ``exif`` by pointer tag, the Interoperability one inside the Exif one.

    Its pointer is an offset into the source's block: copied as a number, it would point at whatever lies there in
    the new file."""
    subs = {pointer: dict(tags) for pointer in (exif_block.EXIF_IFD, _GPS_IFD) if (tags := exif.get_ifd(pointer))}
    if _INTEROP_IFD in subs.get(exif_block.EXIF_IFD, {}):
        if interop := dict(exif.get_ifd(_INTEROP_IFD)):
            subs[exif_block.EXIF_IFD][_INTEROP_IFD] = interop
        else:
            del subs[exif_block.EXIF_IFD][_INTEROP_IFD]
    return subs


def _tiff_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as Pillow's TIFF writer takes it: EXIF, XMP and IPTC as the tags of one ``exif``, of EXIF its main
    tags only (``_with_exif_directories`` adds its sub-directories afterwards)."""
    meta = dict(meta)
    extra = {tag: meta.pop(key) for tag, key in ((_TIFF_XMP, "xmp"), (_TIFF_IPTC, "iptc"),
                                                 (_TIFF_PHOTOSHOP, "photoshop"), (tiff.PREDICTOR, "predictor"))
             if key in meta}
    exif = Image.Exif()
    if block := meta.pop("exif", None):
        try:
            exif.load(block)
            for tag in _EXIF_POINTERS:
                exif.pop(tag, None)
        except (OSError, ValueError, TypeError, SyntaxError, KeyError, struct.error):
            exif = Image.Exif()
    for tag, value in extra.items():
        exif[tag] = value
    _keep_text(exif)
    if len(exif):
        meta["exif"] = exif
    return meta


def _keep_text(exif: Image.Exif) -> None:
    """Each of ``exif``'s main text fields that is not ASCII made the bytes it was read from.

    Pillow reads a TIFF text field as Latin-1 and writes text back as ASCII, each other character a "?": the
    Artist "Jürgen" (UTF-8, as cameras and editors write it) or a "©" would come out as "J??rgen". Bytes it
    writes as they are, as text where it knows the field is text: the main ones (Artist, Copyright,
    ImageDescription, Make, Model...). Others (most of the Exif sub-directory's) it would write as numbers, so
    they keep Pillow's "?"."""
    for tag, value in list(exif.items()):
        if isinstance(value, str) and not value.isascii() and TiffTags.lookup(tag).type == TiffTags.ASCII:
            exif[tag] = value.encode("latin-1", "replace")


def _tiff_compression(image: DecodedImage) -> str:
    source = image.info.get("tiff_compression")
    lossless = ("raw", "tiff_lzw", "tiff_deflate", "tiff_adobe_deflate", "packbits")
    return source if isinstance(source, str) and source in lossless else "tiff_lzw"


def _encode_16bit(
    image: DecodedImage, samples: np.ndarray, alpha: np.ndarray | None, fmt: str, options: EncodeOptions
) -> bytes:
    gray = samples.shape[2] == 1
    if fmt == "PNG":
        meta = _metadata(image, options, "GRAY" if gray else "RGB", (samples.shape[1], samples.shape[0]), fmt)
        pixels = samples if alpha is None else np.dstack([samples, alpha])
        text = image.info.get("png_text") if options.keep_metadata else None
        return _write_png16(pixels, meta, text, _png_colour(image, options))
    meta = _metadata(image, options, "GRAY" if gray else "RGB", (samples.shape[1], samples.shape[0]), fmt)
    pixels = samples if alpha is None else np.dstack([samples, alpha])
    return _write_tiff16(pixels, _tiff_compression(image), meta)


def _write_tiff16(pixels: np.ndarray, compression: str, meta: dict[str, Any]) -> bytes:
    """A 16-bit TIFF (gray, gray+alpha, RGB or RGBA; alpha tagged as such) with its metadata.

    Pillow writes 16 bits only for one sample per pixel, so it is handed each row's samples as one
    gray row that many times as wide, and the directory is retagged for what they are. With LZW or
    deflate the rows are stored as differences (predictor 2), which compresses photos much better;
    it is worked out here because libtiff would take differences across neighbouring samples.
    """
    height, width, channels = pixels.shape
    predictor = compression in _PREDICTED
    rows = pixels
    if predictor:
        rows = pixels.copy()
        rows[:, 1:] -= pixels[:, :-1]  # uint16 arithmetic wraps modulo 2**16, as the predictor requires
    flat = Image.fromarray(np.ascontiguousarray(rows.reshape(height, width * channels)))
    encoded = _save_tiff(flat, compression, meta)
    if channels == 1 and not predictor:
        return encoded
    changes: dict[int, tuple[int, tuple[int, ...]] | None] = {
        256: (tiff.LONG, (width,)),
        258: (tiff.SHORT, (16,) * channels),
        tiff.PHOTOMETRIC: (tiff.SHORT, (1 if channels <= 2 else 2,)),
        277: (tiff.SHORT, (channels,)),
        tiff.SAMPLE_FORMAT: None, 280: None, 281: None,
    }
    if channels in (2, 4):
        changes[tiff.EXTRA_SAMPLES] = (tiff.SHORT, (2,))  # unassociated alpha
    if predictor:
        changes[tiff.PREDICTOR] = (tiff.SHORT, (2,))
    return tiff.with_tags(encoded, changes)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _write_png16(pixels: np.ndarray, meta: dict[str, Any], text: object, colour: list[tuple[bytes, bytes]]) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) with its metadata chunks.

    Pillow writes 16 bits only for single-channel images, and OpenCV drops metadata and cannot
    write gray+alpha, so these few chunks are written here. Rows use the "Up" filter, which
    is cheap in numpy and compresses photos well.
    """
    height, width, channels = pixels.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = pixels.astype(">u2").reshape(height, width * channels).view(np.uint8)
    filtered = rows.copy()
    filtered[1:] -= rows[:-1]  # uint8 arithmetic wraps modulo 256, as the filter requires
    raw = np.hstack([np.full((height, 1), 2, np.uint8), filtered]).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    out = [_PNG_SIGNATURE, _png_chunk(b"IHDR", header)]
    icc = meta.get("icc_profile")
    # An ICC profile and an sRGB chunk contradict each other; the profile is the more exact of the two.
    out += [_png_chunk(kind, payload) for kind, payload in colour if not (icc and kind == b"sRGB")]
    if icc:
        out.append(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
    if dpi := meta.get("dpi"):
        ppm = [round(float(v) / 0.0254) for v in dpi]
        out.append(_png_chunk(b"pHYs", struct.pack(">IIB", ppm[0], ppm[1], 1)))
    if exif := meta.get("exif"):
        out.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    items = dict(text) if isinstance(text, dict) else {}
    if xmp := meta.get("xmp"):
        items["XML:com.adobe.xmp"] = xmp.decode("utf-8", "replace")
    for key, value in items.items():
        if isinstance(key, str) and isinstance(value, str) and 0 < len(key) < 80:
            lang, tkey = (str(getattr(value, name, None) or "").encode("utf-8") for name in ("lang", "tkey"))
            payload = (key.encode("latin-1", "replace") + b"\x00\x00\x00" + lang + b"\x00" + tkey + b"\x00"
                       + value.encode("utf-8"))
            out.append(_png_chunk(b"iTXt", payload))
    out.append(_png_chunk(b"IDAT", zlib.compress(raw, 6)))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)
