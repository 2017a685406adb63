"""A corpus of awkward and hostile inputs, generated here, dropped into the real daemon (issue 6).

Each file ends with the outcome documented in README.md ("Reliability figures" -> bad inputs) and the daemon keeps
running: a good photo dropped after the whole corpus is still published.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from daemon import status
from tests.daemon.harness import (
    Daemon,
    account,
    drop,
    face_photo,
    files_under,
    have_shared_data,
    partial_outputs,
    sidecar_of,
    small_face_photo,
    temp_leftovers,
    wait_for,
    wait_ready,
    write_config,
)

pytestmark = pytest.mark.skipif(not have_shared_data(), reason="needs ../shared (detector weights, Solvay photo)")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few hundred bytes of well-formed PNG whose header claims 2.5 gigapixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        _chunk(b"IEND", b"")


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def dng_with_preview() -> bytes:
    """A DNG as raw converters write it: TIFF structure, DNGVersion, and a small preview as its first image."""
    from PIL import TiffImagePlugin

    extra = TiffImagePlugin.ImageFileDirectory_v2()
    extra[50706] = b"\x01\x04\x00\x00"  # DNGVersion 1.4
    extra.tagtype[50706] = 1
    return _save(Image.open(io.BytesIO(face_photo(5))).convert("RGB").resize((64, 48)), "TIFF", tiffinfo=extra)


def stereo_mpo() -> bytes:
    """A 3D camera's MPO: two views of one picture, the second marked as a disparity (stereo) view."""
    left, right = (Image.open(io.BytesIO(face_photo(n))).convert("RGB") for n in (6, 7))
    data = bytearray(_save(left, "MPO", save_all=True, append_images=[right]))
    base = data.index(b"MPF\0") + 4
    order = "<" if data[base : base + 2] == b"II" else ">"
    ifd = base + struct.unpack_from(order + "I", data, base + 4)[0]
    for i in range(struct.unpack_from(order + "H", data, ifd)[0]):
        tag, _kind, _n, value = struct.unpack_from(order + "HHII", data, ifd + 2 + 12 * i)
        if tag == 0xB002:  # MP entries, 16 bytes each: the second view's type becomes 0x020002 (disparity)
            at = base + value + 16
            struct.pack_into(order + "I", data, at, struct.unpack_from(order + "I", data, at)[0] & 0xFF000000
                             | 0x020002)
    return bytes(data)


def _face_image() -> Image.Image:
    return Image.open(io.BytesIO(face_photo(3)))


def corpus() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(name -> bytes expected to be published, name -> bytes expected to fail), all generated."""
    jpeg, png = face_photo(1), face_photo(2, "PNG")
    rng = np.random.default_rng(6)
    fail: dict[str, bytes] = {}
    for frac in (0.02, 0.3, 0.6, 0.95):
        fail[f"cut-{int(frac * 100)}.jpg"] = jpeg[: int(len(jpeg) * frac)]
        fail[f"cut-{int(frac * 100)}.png"] = png[: int(len(png) * frac)]
    fail["cut-no-eoi.jpg"] = jpeg[:-2]
    fail["empty.jpg"] = b""
    for ext in ("jpg", "png", "webp", "tif"):
        fail[f"noise.{ext}"] = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    fail["noise-with-jpeg-magic.jpg"] = b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    fail["bomb.png"] = png_bomb()
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    fail["animated.webp"] = _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100)
    fail["animated-gif-named.jpg"] = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    fail["camera-raw-named.tif"] = dng_with_preview()
    fail["stereo-pair.jpg"] = stereo_mpo()

    face = _face_image()
    ok: dict[str, bytes] = {}
    ok["png-bytes-named.jpg"] = png
    ok["one-pixel.png"] = _save(Image.new("RGB", (1, 1), "white"), "PNG")
    ok["thin-1x4000.png"] = _save(Image.new("RGB", (1, 4000), "gray"), "PNG")
    ok["thin-4000x1.jpg"] = _save(Image.new("RGB", (4000, 1), "gray"), "JPEG")
    rgb16 = (np.asarray(face.convert("RGB"), dtype=np.uint16) * 257)[:, :, ::-1]
    ok["sixteen-bit.png"] = cv2.imencode(".png", np.ascontiguousarray(rgb16))[1].tobytes()
    ok["cmyk.jpg"] = _save(face.convert("CMYK"), "JPEG", quality=90)
    palette = face.convert("RGB").quantize(64)
    ok["palette-transparent.png"] = _save(palette, "PNG", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    # Stored lying on its side; upright (faces and all) only once the orientation tag is applied.
    ok["exif-rotated.jpg"] = _save(face.convert("RGB").transpose(Image.Transpose.ROTATE_90), "JPEG",
                                   exif=exif.tobytes())
    for name in ("Ünïcode 写真 фото.jpg", "with  two spaces .jpg", "new\nline.jpg", "-leading-dash.jpg",
                 "--rf *.jpg"):
        ok[name] = small_face_photo(len(name))
    ok["x.jpg/inside.jpg"] = small_face_photo(9)  # a folder named like an image
    return ok, fail


def test_bad_input_corpus_each_reaches_its_documented_outcome(tmp_path):
    """Every awkward input is published or failed with a sidecar as documented; the daemon keeps working."""
    config, layout = write_config(tmp_path, max_ready_wait=3.0)
    hot = layout.hot["a"]
    ok, fail = corpus()
    outside = tmp_path / "outside-secret.jpg"
    outside.write_bytes(small_face_photo(4))
    daemon = Daemon(config).start()
    try:
        wait_ready(daemon)
        for name, data in {**ok, **fail}.items():
            drop(hot / name, data)
        (hot / "link-out.jpg").symlink_to(outside)
        os.mkfifo(hot / "pipe.jpg")  # never opened: moving it across filesystems would block on the open
        (hot / "linked").symlink_to(tmp_path, target_is_directory=True)
        (hot / "animated.gif").write_bytes(fail["animated-gif-named.jpg"])  # not an image extension: ignored
        inputs = {("a", name): data for name, data in {**ok, **fail}.items()}
        wait_for(lambda: account(layout, inputs, read=False).settled == len(inputs), 120, daemon, "corpus settled")
        acc = account(layout, inputs)
        assert acc.lost == [] and acc.duplicated == [] and acc.bad_backup == []
        assert set(acc.published) == {f"a/{n}" for n in ok}
        assert set(acc.failed) == {f"a/{n}" for n in fail}
        for key, stored in acc.failed.items():
            info = sidecar_of(stored)
            assert info["stage"] == "readiness" and info["error"], key
        assert "too large" in str(sidecar_of(acc.failed["a/bomb.png"])["error"])
        assert "animated" in str(sidecar_of(acc.failed["a/animated.webp"])["error"])
        assert "GIF" in str(sidecar_of(acc.failed["a/animated-gif-named.jpg"])["error"])
        assert "camera raw" in str(sidecar_of(acc.failed["a/camera-raw-named.tif"])["error"])
        assert "2 views" in str(sidecar_of(acc.failed["a/stereo-pair.jpg"])["error"])

        # Content, not the name, decides: PNG bytes named .jpg are restored and keep their name.
        assert (layout.out["a"] / "png-bytes-named.jpg").read_bytes().startswith(b"\x89PNG")
        # The rotated photo was restored upright (its faces found) and is displayed the same way as the original.
        assert (layout.out["a"] / "exif-rotated.jpg").read_bytes() != ok["exif-rotated.jpg"]
        with Image.open(layout.out["a"] / "exif-rotated.jpg") as out, _face_image() as src:
            assert ImageOps.exif_transpose(out).size == src.size
        # Face-less images are published unchanged, byte for byte, even when larger than the preset's long side.
        for name in ("thin-1x4000.png", "thin-4000x1.jpg", "one-pixel.png"):
            assert (layout.out["a"] / name).read_bytes() == ok[name], name

        # The link is never followed: it lands in failed/ as a link, its target untouched.
        wait_for(lambda: (layout.failed["a"] / "link-out.jpg.error.json").is_file(), 30, daemon, "link refused")
        assert (layout.failed["a"] / "link-out.jpg").is_symlink()
        link_info = sidecar_of(layout.failed["a"] / "link-out.jpg")
        assert link_info["stage"] == "watch"
        assert link_info["error"] == "refused: symbolic link: links are never followed"
        assert outside.read_bytes() == small_face_photo(4)
        assert not any(p.name.startswith("link-out") for p in files_under(layout.out["a"]))

        assert (hot / "animated.gif").is_file()  # not a candidate: left alone
        assert (hot / "x.jpg").is_dir()
        left = {"animated.gif", "pipe.jpg", "linked"}
        assert [p for p in files_under(hot) if p.name not in left] == []

        # What stays in the folder and is never processed is listed by `gpen-watch status`; the link that went
        # to failed/ is not.
        def refused() -> dict[str, str]:
            snap = status.read_snapshot(tmp_path / "state" / status.SNAPSHOT_FILE)
            return snap.refused.get(str(hot), {}) if snap else {}

        wait_for(lambda: refused() == {"pipe.jpg": "not a regular file",
                                       "linked": "symbolic link: links are never followed"}, 30, daemon,
                 "the entries left in place to be listed")
        shown = status.render_text(status.gather(tmp_path / "state"))
        assert "left in hot folders, never processed (2;" in shown and "pipe.jpg: not a regular file" in shown
        assert partial_outputs(layout) == [] and temp_leftovers(layout) == []

        # Still alive and working.
        drop(hot / "after-all.jpg", face_photo(11))
        after = {("a", "after-all.jpg"): face_photo(11)}
        wait_for(lambda: account(layout, after).published, 60, daemon, "a good file after the corpus")
        assert daemon.running()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_text()[-3000:]
    assert not any(e.get("level") == "critical" for e in daemon.log_lines())
    assert os.path.exists(outside)
