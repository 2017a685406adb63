import hashlib
import io
import os
import struct
import zlib
from functools import partial

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from daemon.readiness import FAILED, GONE, NOT_YET, READY, ReadinessGate
from gpen_engine.imageio import check_complete


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def jpeg_bytes(size=(96, 64)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims huge dimensions (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def gate(clock):
    return ReadinessGate(
        stability_delay=2.0,
        max_wait=600.0,
        check_decodes=partial(check_complete, max_pixels=10_000_000),
        clock=clock,
    )


def touch_mtime(path, ns: int) -> None:
    os.utime(path, ns=(ns, ns))


class TestReadinessGate:
    def test_complete_file_is_ready_after_two_quiet_looks(self, gate, clock, tmp_path):
        """A complete image is ready on the second look after the stability delay, with its bytes and hash."""
        data = jpeg_bytes()
        path = tmp_path / "a.jpg"
        path.write_bytes(data)
        assert gate.look(path, 1).state is NOT_YET
        clock.advance(1.0)
        assert gate.look(path, 1).state is NOT_YET  # not quiet long enough yet
        clock.advance(1.5)
        verdict = gate.look(path, 1)
        assert verdict.state is READY
        assert verdict.state == "ready"
        assert (verdict.size, verdict.data) == (len(data), data)
        assert verdict.sha256 == hashlib.sha256(data).hexdigest()
        assert verdict.mtime_ns == path.stat().st_mtime_ns

    def test_a_subfolder_swapped_for_a_link_is_not_read_through(self, gate, clock, tmp_path):
        """With the hot folder as base, a subfolder that became a link is refused, not read through."""
        hot, outside = tmp_path / "in", tmp_path / "outside"
        (hot / "sub").mkdir(parents=True)
        outside.mkdir()
        (hot / "sub" / "a.jpg").write_bytes(jpeg_bytes())
        (outside / "a.jpg").write_bytes(jpeg_bytes((64, 48)))
        path = hot / "sub" / "a.jpg"
        assert gate.look(path, 1, base=hot).state is NOT_YET
        (hot / "sub").rename(hot / "sub.old")
        (hot / "sub").symlink_to(outside)
        verdicts = []
        for _ in range(4):
            clock.advance(2.5)
            verdicts.append(gate.look(path, 1, base=hot))
        assert [v.state for v in verdicts if v.state is not NOT_YET][:1] == [FAILED]
        assert all(v.data is None for v in verdicts)
        assert "symbolic link" in next(v.reason for v in verdicts if v.state is FAILED)

    def test_file_written_slowly_is_not_ready_until_quiet(self, gate, clock, tmp_path):
        """A file growing in chunks stays NOT_YET while it changes, however long that takes, then is ready."""
        data = jpeg_bytes((320, 240))
        path = tmp_path / "slow.jpg"
        chunks = [data[i : i + 700] for i in range(0, len(data), 700)]
        with open(path, "wb") as f:
            for n, chunk in enumerate(chunks):
                f.write(chunk)
                f.flush()
                touch_mtime(path, 10**18 + n)  # distinct mtimes even on coarse-timestamp filesystems
                assert gate.look(path, "k").state is NOT_YET
                clock.advance(5.0)  # longer than the stability delay between chunks: the size still changed
        clock.advance(2.0)
        assert gate.look(path, "k").state is READY

    def test_a_file_sized_first_and_still_being_filled_is_not_ready(self, gate, clock, tmp_path):
        """A writer that sets the final size first (Windows/SMB copies) and stalls leaves a hole: a BMP read then
        decodes with a black tail, so it must wait for the bytes, and be ready once they are written."""
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(buf, "BMP")
        data = buf.getvalue()
        path = tmp_path / "scan.bmp"
        with open(path, "wb") as f:
            f.truncate(len(data))
            f.write(data[: len(data) * 4 // 10])
        with open(path, "rb") as f:
            if os.lseek(f.fileno(), 0, os.SEEK_HOLE) >= len(data):
                pytest.skip("this filesystem does not report holes")
        for _ in range(4):
            clock.advance(2.5)
            assert gate.look(path, 1).state is NOT_YET
        with open(path, "r+b") as f:
            f.seek(len(data) * 4 // 10)
            f.write(data[len(data) * 4 // 10 :])
        touch_mtime(path, path.stat().st_mtime_ns + 1_000_000_000)
        clock.advance(2.5)
        assert gate.look(path, 1).state is NOT_YET  # it changed: quiet again first
        clock.advance(2.5)
        verdict = gate.look(path, 1)
        assert verdict.state is READY and verdict.data == data

    def test_a_complete_sparse_file_is_ready_after_max_wait(self, gate, clock, tmp_path):
        """Holes that stay for max_wait are a sparse copy (cp --sparse, rsync -S, ZFS), not a stalled writer: the
        bytes are then judged like any file's, and a good image is published late rather than failed."""
        image = np.zeros((400, 400, 3), np.uint8)
        image[-20:] = 200  # BMP rows run bottom-up: the file starts with these; the black rest becomes a hole
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "BMP")
        data = buf.getvalue()
        path = tmp_path / "scan.bmp"
        with open(path, "wb") as f:
            f.truncate(len(data))
            f.write(data[: 400 * 3 * 20 + 54 + 4096])
        with open(path, "rb") as f:
            if os.lseek(f.fileno(), 0, os.SEEK_HOLE) >= len(data):
                pytest.skip("this filesystem does not report holes")
        assert path.read_bytes() == data
        clock.advance(2.5)
        gate.look(path, 1)
        clock.advance(2.5)
        assert gate.look(path, 1).state is NOT_YET
        clock.advance(600)
        verdict = gate.look(path, 1)
        assert verdict.state is READY and verdict.data == data

    @staticmethod
    def mpo() -> tuple[bytes, int]:
        """A phone-style two-image MPO and where its first image ends."""
        first = Image.open(io.BytesIO(jpeg_bytes()))
        buf = io.BytesIO()
        first.save(buf, "MPO", save_all=True, append_images=[Image.open(io.BytesIO(jpeg_bytes((64, 48))))])
        data = buf.getvalue()
        return data, data.index(b"\xff\xd9") + 2

    def test_a_writer_paused_after_the_first_image_of_an_mpo_is_waited_for(self, gate, clock, tmp_path):
        """The first image decodes whole, but the file's index promises a second: not ready until it is there
        (publishing now would keep a backup without the second image and delete the original)."""
        data, first_end = self.mpo()
        path = tmp_path / "IMG_0001.jpg"
        path.write_bytes(data[:first_end])
        touch_mtime(path, 10**18)
        gate.look(path, 1)
        clock.advance(20.0)  # ten stability delays: far longer than a phone upload pauses between its parts
        waiting = gate.look(path, 1)
        assert waiting.state is NOT_YET and "MPF index" in waiting.reason
        with open(path, "ab") as f:
            f.write(data[first_end:])
        touch_mtime(path, 10**18 + 1)
        gate.look(path, 1)
        clock.advance(2.5)
        ready = gate.look(path, 1)
        assert ready.state is READY and ready.data == data

    @pytest.mark.parametrize("kind", ["stereo MPO", "DNG"])
    def test_a_file_refused_for_what_it_is_is_waited_for_while_it_arrives(self, gate, clock, tmp_path, kind):
        """A 3D camera's MPO (restoring one view would drop the other) and a camera raw file named .tif are
        refused, but only once they are all there: refused mid-copy, they would be moved to failed/ while their
        writer still writes. Half-copied, the MPO's index promises more and the DNG is a truncated TIFF."""
        from tests.daemon.test_bad_inputs import dng_with_preview, stereo_mpo

        data = stereo_mpo() if kind == "stereo MPO" else dng_with_preview()
        first = data.index(b"\xff\xd9") + 2 if kind == "stereo MPO" else len(data) // 2
        path = tmp_path / ("3d.jpg" if kind == "stereo MPO" else "IMG_0002.tif")
        for part, mtime in ((data[:first], 10**18), (data, 10**18 + 1)):
            path.write_bytes(part)
            touch_mtime(path, mtime)
            gate.look(path, 1)
            clock.advance(2.5)
            verdict = gate.look(path, 1)
            if part != data:
                assert verdict.state is NOT_YET
        assert verdict.state is FAILED and ("2 views" if kind == "stereo MPO" else "camera raw") in verdict.reason

    def test_a_stale_index_delays_a_good_photo_briefly_and_never_fails_it(self, gate, clock, tmp_path):
        """A camera JPEG rotated losslessly (jpegtran -copy all keeps the MPF index, drops the preview after the
        photo): after half a minute without changes, not max_wait, the photo is judged by what decodes."""
        data, first_end = self.mpo()
        path = tmp_path / "rotated.jpg"
        path.write_bytes(data[:first_end])
        gate.look(path, 1)
        clock.advance(3.0)
        assert gate.look(path, 1).state is NOT_YET
        clock.advance(20.0)
        assert gate.look(path, 1).state is NOT_YET
        clock.advance(10.0)
        verdict = gate.look(path, 1)
        assert verdict.state is READY and verdict.data == data[:first_end]

    def test_truncated_jpeg_waits_then_fails(self, gate, clock, tmp_path):
        """A truncated JPEG is NOT_YET (it may still be copying) and FAILED with the reason after max_wait."""
        path = tmp_path / "cut.jpg"
        path.write_bytes(jpeg_bytes()[:-400])
        gate.look(path, 7)
        clock.advance(3.0)
        first = gate.look(path, 7)
        assert first.state is NOT_YET
        assert "not a complete image yet" in first.reason
        clock.advance(300.0)
        assert gate.look(path, 7).state is NOT_YET
        clock.advance(300.0)
        failed = gate.look(path, 7)
        assert failed.state is FAILED
        assert failed.reason.startswith("still not a complete image after 600 s")

    def test_truncated_file_that_is_completed_becomes_ready(self, gate, clock, tmp_path):
        """A copy that stalls half-way and then finishes is processed, not failed."""
        data = jpeg_bytes()
        path = tmp_path / "stall.jpg"
        path.write_bytes(data[:1000])
        touch_mtime(path, 10**18)
        gate.look(path, 1)
        clock.advance(100.0)
        assert gate.look(path, 1).state is NOT_YET
        path.write_bytes(data)
        touch_mtime(path, 10**18 + 1)
        clock.advance(550.0)  # past max_wait since the first look, but the file changed since
        assert gate.look(path, 1).state is NOT_YET
        clock.advance(2.0)
        assert gate.look(path, 1).state is READY

    def test_zero_byte_file(self, gate, clock, tmp_path):
        """An empty file waits (it may be a copy about to start) and fails as 'empty file' after max_wait."""
        path = tmp_path / "empty.jpg"
        path.touch()
        gate.look(path, 1)
        clock.advance(10.0)
        verdict = gate.look(path, 1)
        assert (verdict.state, verdict.reason) == (NOT_YET, "empty file")
        clock.advance(600.0)
        verdict = gate.look(path, 1)
        assert verdict.state is FAILED
        assert "empty file" in verdict.reason

    def test_not_an_image_fails_with_the_decoders_reason(self, gate, clock, tmp_path):
        """A text file named .jpg is never silently dropped: once stable it fails with the decoder's reason."""
        path = tmp_path / "notes.jpg"
        path.write_text("this is not a photo")
        gate.look(path, 1)
        clock.advance(10.0)
        verdict = gate.look(path, 1)
        assert verdict.state is FAILED
        assert "not an image" in verdict.reason

    def test_too_large_fails_at_once(self, gate, clock, tmp_path):
        """An image over the pixel limit fails at once: waiting will not make it smaller."""
        path = tmp_path / "bomb.png"
        path.write_bytes(png_claiming(50_000, 50_000))
        gate.look(path, 1)
        clock.advance(3.0)
        assert gate.look(path, 1).state is FAILED

    def test_vanished_file_is_gone(self, gate, clock, tmp_path):
        """A file removed before it was ready is GONE, and the gate forgets it."""
        path = tmp_path / "a.jpg"
        path.write_bytes(jpeg_bytes())
        gate.look(path, 1)
        path.unlink()
        assert gate.look(path, 1).state is GONE
        assert gate.tracked() == 0

    def test_missing_with_unavailable_folder_is_not_gone(self, gate, clock, tmp_path):
        """A file missing because its share is unmounted is NOT_YET, never GONE."""
        path = tmp_path / "share" / "a.jpg"
        verdict = gate.look(path, 1, available=lambda: "share unmounted")
        assert verdict.state is NOT_YET
        assert "share unmounted" in verdict.reason
        assert gate.look(path, 1, available=lambda: None).state is GONE

    def test_replaced_file_starts_over(self, gate, clock, tmp_path):
        """A file replaced by another (new inode) between looks needs a new quiet period."""
        path = tmp_path / "a.jpg"
        path.write_bytes(jpeg_bytes())
        gate.look(path, 1)
        clock.advance(3.0)
        other = tmp_path / "other.tmp"
        other.write_bytes(jpeg_bytes((64, 64)))
        os.replace(other, path)
        assert gate.look(path, 1).state is NOT_YET
        clock.advance(3.0)
        assert gate.look(path, 1).state is READY

    def test_symlink_fails_without_reading(self, gate, clock, tmp_path):
        """A link (e.g. to a file outside the hot folder) is refused and its target never read."""
        secret = tmp_path / "secret.jpg"
        secret.write_bytes(jpeg_bytes())
        link = tmp_path / "link.jpg"
        link.symlink_to(secret)
        verdict = gate.look(link, 1)
        assert verdict.state is FAILED
        assert "symbolic link" in verdict.reason

    def test_fifo_fails_without_hanging(self, gate, clock, tmp_path):
        """A FIFO named like an image fails at once instead of blocking the gate."""
        os.mkfifo(tmp_path / "pipe.jpg")
        assert gate.look(tmp_path / "pipe.jpg", 1).state is FAILED

    def test_keys_are_independent_and_forgettable(self, gate, clock, tmp_path):
        """Each key has its own history; forget() starts a key over."""
        a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
        a.write_bytes(jpeg_bytes())
        b.write_bytes(jpeg_bytes())
        gate.look(a, "a")
        clock.advance(3.0)
        gate.look(b, "b")
        gate.forget("a")
        assert gate.look(a, "a").state is NOT_YET
        clock.advance(3.0)
        assert gate.look(b, "b").state is READY

    def test_keep_data_false(self, clock, tmp_path):
        """With keep_data=False a READY verdict carries the hash but not the bytes."""
        check = partial(check_complete, max_pixels=10_000_000)
        gate = ReadinessGate(0.0, 600.0, check, clock, keep_data=False)
        path = tmp_path / "a.jpg"
        path.write_bytes(jpeg_bytes())
        gate.look(path, 1)
        verdict = gate.look(path, 1)
        assert verdict.state is READY
        assert verdict.data is None
        assert verdict.sha256 is not None


_JPEG = jpeg_bytes((64, 48))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=len(_JPEG) - 1))
def test_a_cut_jpeg_is_never_ready(tmp_path, cut):
    """Whatever point a copy stopped at, the incomplete file is never passed on as ready."""
    clock = FakeClock()
    gate = ReadinessGate(1.0, 600.0, partial(check_complete, max_pixels=10_000_000), clock)
    path = tmp_path / f"cut-{cut}.jpg"
    path.write_bytes(_JPEG[:cut])
    states = [gate.look(path, cut).state]
    while states[-1] is NOT_YET and len(states) < 5:
        clock.advance(300.0)
        states.append(gate.look(path, cut).state)
    assert states[-1] is FAILED


class TestHeaderDecidedFailures:
    def test_text_named_jpg_fails_once_stable_not_after_max_wait(self, tmp_path):
        """A stable file whose first bytes are no image fails at once instead of waiting out max_wait."""
        from gpen_engine.imageio import check_complete

        now = [0.0]
        gate = ReadinessGate(0.5, 600.0, lambda data: check_complete(data), clock=lambda: now[0])
        path = tmp_path / "notes.jpg"
        path.write_bytes(b"shopping list: eggs, milk\n")
        assert "not_yet" == gate.look(path, 1).state
        now[0] = 1.0
        verdict = gate.look(path, 1)
        assert "failed" == verdict.state
        assert "not an image" in verdict.reason

    def test_zero_filled_file_waits_like_a_truncated_one(self, tmp_path):
        """A file that is still all zeros (size set first, filled later) is not failed early."""
        from gpen_engine.imageio import check_complete

        now = [0.0]
        gate = ReadinessGate(0.5, 600.0, lambda data: check_complete(data), clock=lambda: now[0])
        path = tmp_path / "preallocated.jpg"
        path.write_bytes(bytes(4096))
        gate.look(path, 1)
        now[0] = 1.0
        assert "not_yet" == gate.look(path, 1).state
