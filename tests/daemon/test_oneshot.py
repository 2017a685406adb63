"""``gpen-watch enhance``: real detector, random-weight tiny generator, real files on disk."""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.cli import main
from daemon.oneshot import Names, write_new
from gpen_engine.detect import detect_faces, load_detector

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SOLVAY = SHARED / "testdata" / "solvay_1927.png"
DETECTOR = SHARED / "models" / "detection_mobilenet0.25_Final.pth"

def portraits(folder: Path, count: int, name: str) -> Path:
    """``folder`` holding ``count`` copies of one crop of the Solvay photo, named ``name.format(n=...)``."""
    folder.mkdir()
    data = jpeg_crop((300, 50, 700, 350))
    for n in range(count):
        (folder / name.format(n=n)).write_bytes(data)
    return folder


@pytest.fixture
def config(tiny_cli_config: Path) -> Path:
    return tiny_cli_config


def enhance(config: Path, *args: str) -> int:
    return main(["enhance", "--config", str(config), "--preset", "tiny", "--random-weights", *args])


def jpeg_crop(box: tuple[int, int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.open(SOLVAY).convert("RGB").crop(box).save(buf, "JPEG", quality=92)
    return buf.getvalue()


class TestEnhanceSolvay:
    def test_restores_all_faces_and_keeps_the_rest(self, config: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
        """The group photo: 29 faces found, same size/mode/ICC, pixels away from every face untouched."""
        src = tmp_path / "solvay.png"
        shutil.copyfile(SOLVAY, src)
        status = enhance(config, str(src))
        err = capsys.readouterr().err
        assert status == 0
        assert "1 ok, 0 failed, 29 faces" in err
        assert "faces/s, 29 faces]" in err.split("\r")[-1]  # the progress bar's last state agrees
        assert "RANDOM weights" in err
        assert SOLVAY.read_bytes() == src.read_bytes()

        out = tmp_path / "solvay.restored.png"
        before, after = Image.open(SOLVAY), Image.open(out)
        assert (before.size, before.mode) == (after.size, after.mode)
        assert before.info.get("icc_profile") == after.info.get("icc_profile")
        a, b = np.asarray(before), np.asarray(after)
        assert not np.array_equal(a, b)  # the faces did change

        rgb = np.asarray(before.convert("RGB"))
        faces = detect_faces(load_detector(DETECTOR, "mobile0.25", "cpu"), [rgb], long_side=1000)[0]
        far = np.ones(rgb.shape[:2], bool)
        for face in faces:  # GPEN's crop spans ~2.5 face boxes; 4 boxes leaves a safe margin
            cx, cy = (face.box[:2] + face.box[2:]) / 2
            r = 2 * face.size
            far[max(0, int(cy - r)) : int(cy + r), max(0, int(cx - r)) : int(cx + r)] = False
        assert far.mean() > 0.1
        assert np.array_equal(a[far], b[far])

    def test_compare_writes_side_by_side(self, config: Path, tmp_path: Path) -> None:
        """--compare writes NAME.compare.jpg: before and after next to each other, same height."""
        src = tmp_path / "group.jpg"
        src.write_bytes(jpeg_crop((300, 50, 900, 350)))
        assert enhance(config, "--compare", str(src)) == 0
        compare = Image.open(tmp_path / "group.compare.jpg")
        assert compare.format == "JPEG"
        assert compare.height == 300
        assert compare.width > 2 * 600
        left = np.asarray(compare)[:, :600].astype(int)
        assert np.abs(left - np.asarray(Image.open(src)).astype(int)).mean() < 4  # the left half is the input


class TestEnhanceFolders:
    def test_bad_files_fail_clearly_and_the_rest_succeed(self, config: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
        """Corrupt, zero-byte and text-as-JPEG files each get an error line; good ones are written; exit 1."""
        folder = tmp_path / "in"
        (folder / "sub").mkdir(parents=True)
        good = jpeg_crop((300, 50, 900, 350))
        (folder / "good.jpg").write_bytes(good)
        (folder / "sub" / "nested.jpg").write_bytes(good)
        (folder / "corrupt.png").write_bytes(SOLVAY.read_bytes()[: 40_000])
        (folder / "empty.jpg").write_bytes(b"")
        (folder / "notes.jpg").write_text("this is a text file, not a photo\n")
        (folder / ".DS_Store").write_bytes(b"junk")
        (folder / "readme.txt").write_text("not an image extension")
        os.symlink(folder / "good.jpg", folder / "link.jpg")
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}

        status = enhance(config, str(folder))
        err = capsys.readouterr().err

        assert status == 1
        assert "2 ok, 3 failed" in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 3
        assert any("corrupt.png" in line and "truncated" in line.lower() for line in lines), lines
        assert any("empty.jpg" in line and "empty" in line for line in lines), lines
        assert any("notes.jpg" in line and "not" in line for line in lines), lines
        assert (folder / "good.restored.jpg").is_file()
        assert (folder / "sub" / "nested.restored.jpg").is_file()
        written = {p.name for p in folder.rglob("*.restored.*")}
        assert {"good.restored.jpg", "nested.restored.jpg"} == written  # nothing for bad files, junk or links
        assert before == {p: p.read_bytes() for p in before}  # inputs untouched

    def test_a_huge_file_and_one_that_runs_out_of_memory_fail_alone(
            self, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """A 5 GiB file is refused before it is read (never loaded into memory), and a decode that runs out of
        memory is that file's error: both get a clear line, and the good photo is restored."""
        from gpen_engine import imageio

        folder = tmp_path / "in"
        folder.mkdir()
        good = jpeg_crop((300, 50, 900, 350))
        (folder / "good.jpg").write_bytes(good)
        with open(folder / "huge.tif", "wb") as f:
            f.truncate(5 << 30)  # sparse: costs no disk
        bomb = jpeg_crop((0, 0, 200, 200))
        (folder / "bomb.jpg").write_bytes(bomb)
        decode = imageio.decode

        def decode_or_run_out(data: bytes, **kw: object) -> object:
            if data == bomb:
                raise MemoryError
            return decode(data, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(imageio, "decode", decode_or_run_out)
        assert enhance(config, str(folder)) == 1
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert any("huge.tif" in line and "file too large" in line for line in lines), lines
        assert any("bomb.jpg" in line and "not enough memory" in line for line in lines), lines
        assert "1 ok, 2 failed" in err
        assert (folder / "good.restored.jpg").is_file()

    def test_a_damaged_jpeg_is_restored_with_a_warning(self, config: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
        """A JPEG whose compressed data was overwritten half-way decodes (libjpeg shows grey there and only warns,
        which Pillow does not pass on): it is restored, and a warning line names the file and the damage."""
        data = bytearray(jpeg_crop((300, 50, 900, 350)))
        middle = len(data) // 2
        data[middle : middle + 500] = random.Random(9).randbytes(500)  # holds a restart marker, with no interval
        src = tmp_path / "damaged.jpg"
        src.write_bytes(bytes(data))
        assert enhance(config, str(src)) == 0
        err = capsys.readouterr().err
        [warning] = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert "damaged.jpg" in warning and "restart marker out of place" in warning
        assert (tmp_path / "damaged.restored.jpg").is_file()

    def test_a_tiff_with_an_extra_channel_is_restored_with_a_warning_that_it_is_left_out(
            self, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """RGB plus an extra channel that is not alpha (a mask): the result holds the colours only, and says so."""
        rgb = np.asarray(Image.open(io.BytesIO(jpeg_crop((300, 50, 700, 350)))).convert("RGB"))
        mask = np.zeros(rgb.shape[:2], np.uint8)
        src = tmp_path / "masked.tif"
        Image.fromarray(np.dstack([rgb, mask]), "RGBX").save(src)
        assert enhance(config, str(src)) == 0
        [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
        assert "masked.tif" in warning and "1 extra channel" in warning
        assert (tmp_path / "masked.restored.tif").is_file()

    def test_output_dir_keeps_structure_and_never_overwrites(self, config: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
        """-o DIR mirrors subfolders; a second run gets a suffixed name instead of replacing the first, and says
        which result is which input's."""
        folder, out = tmp_path / "in", tmp_path / "out"
        (folder / "a" / "b").mkdir(parents=True)
        (folder / "a" / "b" / "photo.jpg").write_bytes(jpeg_crop((300, 50, 700, 350)))
        assert enhance(config, "-o", str(out), str(folder)) == 0
        first = out / "a" / "b" / "photo.jpg"
        first_bytes = first.read_bytes()
        capsys.readouterr()
        assert enhance(config, "-o", str(out), str(folder)) == 0
        assert first_bytes == first.read_bytes()
        assert (out / "a" / "b" / "photo (1).jpg").is_file()
        assert "photo.jpg: its result is photo (1).jpg (photo.jpg was taken)" in capsys.readouterr().err

    def test_rerun_beside_inputs_skips_own_outputs(self, config: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
        """A second run restores the originals again, not the earlier results, and overwrites nothing."""
        (tmp_path / "in").mkdir()
        src = tmp_path / "in" / "p.jpg"
        src.write_bytes(jpeg_crop((300, 50, 700, 350)))
        assert enhance(config, str(tmp_path / "in")) == 0
        first = (tmp_path / "in" / "p.restored.jpg").read_bytes()
        capsys.readouterr()
        assert enhance(config, str(tmp_path / "in")) == 0
        assert "1 ok, 0 failed" in capsys.readouterr().err
        assert first == (tmp_path / "in" / "p.restored.jpg").read_bytes()
        names = {p.name for p in (tmp_path / "in").iterdir()}
        assert {"p.jpg", "p.restored.jpg", "p.restored (1).jpg"} == names

    def test_a_result_with_a_long_name_keeps_its_mark_and_is_not_restored_again(
            self, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A name too long for ".restored" to fit: the stem is shortened, not the mark, so a second run still
        knows the result for its own and restores only the photo."""
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / ("L" * 246 + ".jpg")).write_bytes(jpeg_crop((300, 50, 700, 350)))
        assert enhance(config, str(tmp_path / "in")) == 0
        (result,) = [p.name for p in (tmp_path / "in").iterdir() if p.name != "L" * 246 + ".jpg"]
        assert result.endswith(".restored.jpg") and len(result.encode()) <= 255
        capsys.readouterr()
        assert enhance(config, str(tmp_path / "in")) == 0
        assert "1 ok, 0 failed" in capsys.readouterr().err
        names = sorted(p.name for p in (tmp_path / "in").iterdir() if p.name not in ("L" * 246 + ".jpg", result))
        assert len(names) == 1 and names[0].endswith(".restored (1).jpg")

    def test_missing_path_is_an_error(self, config: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
        """A path that does not exist is reported and makes the exit status non-zero."""
        status = enhance(config, str(tmp_path / "nope.jpg"))
        assert status != 0
        assert "nope.jpg" in capsys.readouterr().err


class TestFullSize:
    def test_max_long_side_zero_keeps_the_full_size(self, config: Path, tmp_path: Path) -> None:
        """A preset with max_long_side = 0 restores a photo above every built-in cap at its own size."""
        config.write_text(config.read_text() + '\n[presets.archive]\nbase = "tiny"\nmax_long_side = 0\n')
        big = Image.open(SOLVAY).convert("RGB").crop((300, 50, 900, 350)).resize((3000, 1500), Image.LANCZOS)
        src = tmp_path / "scan.png"
        big.save(src)
        status = main(["enhance", "--config", str(config), "--preset", "archive", "--random-weights", str(src)])
        assert status == 0
        with Image.open(tmp_path / "scan.restored.png") as out:
            assert out.size == (3000, 1500)
            assert not np.array_equal(np.asarray(out), np.asarray(big))  # its faces were restored


    def test_a_photo_without_faces_is_written_as_it_was(self, config: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing to restore: the result is the file's own bytes, not a re-encoded (and, above the preset's long
        side, scaled-down) copy. Converted to another format, it keeps its full size."""
        noise = np.random.default_rng(2).integers(0, 255, (1500, 2600, 3), np.uint8)  # above tiny's 2000 px cap
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, "JPEG", quality=80)
        src = tmp_path / "in" / "landscape.jpg"
        src.parent.mkdir()
        src.write_bytes(buf.getvalue())
        assert enhance(config, str(src), "-o", str(tmp_path / "out")) == 0
        assert "0 faces" in capsys.readouterr().err
        assert (tmp_path / "out" / "landscape.jpg").read_bytes() == buf.getvalue()

        config.write_text('output_format = "PNG"\n' + config.read_text())
        assert enhance(config, str(src), "-o", str(tmp_path / "png")) == 0
        with Image.open(tmp_path / "png" / "landscape.png") as out:
            assert out.size == (2600, 1500)


class TestAwkwardArguments:
    def test_an_unreadable_folder_is_reported_not_skipped(self, config: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
        """A subfolder that cannot be listed is an error line and a non-zero exit, not a silent gap."""
        (tmp_path / "in" / "locked").mkdir(parents=True)
        (tmp_path / "in" / "p.jpg").write_bytes(jpeg_crop((300, 50, 700, 350)))
        scandir = os.scandir

        def refuse_locked(path: object = ".") -> object:
            if str(path).endswith("locked"):
                raise PermissionError(13, "Permission denied", str(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", refuse_locked)
        assert enhance(config, str(tmp_path / "in")) == 1
        err = capsys.readouterr().err
        assert "locked: cannot read folder: Permission denied" in err
        assert "1 ok, 1 failed" in err

    def test_files_left_alone_in_a_folder_are_named_not_passed_over(self, config: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
        """A link, an iPhone .heic and an earlier result in the folder are not restored, and the run says so (and
        counts them); junk such as .DS_Store is not worth a word."""
        folder = tmp_path / "in"
        folder.mkdir()
        (folder / "p.jpg").write_bytes(jpeg_crop((300, 50, 700, 350)))
        (folder / "IMG_0001.heic").write_bytes(b"not read")
        (folder / "old.restored.jpg").write_bytes(b"not read")
        (folder / "passwd.jpg").symlink_to("/etc/passwd")
        (folder / ".DS_Store").write_bytes(b"junk")
        assert enhance(config, str(folder)) == 0
        err = capsys.readouterr().err
        assert "skipped 1 file(s), links inside folders are not followed: " in err and "passwd.jpg" in err
        assert "skipped 1 file(s), not an image type that is restored: " in err and "IMG_0001.heic" in err
        assert "skipped 1 file(s), a result of an earlier run" in err and "old.restored.jpg" in err
        assert ".DS_Store" not in err and "1 ok, 0 failed" in err and ", 3 skipped" in err

    def test_output_into_the_input_folder_is_not_restored_again(self, config: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
        """-o naming the input folder itself marks results .restored, so a second run skips them."""
        folder = tmp_path / "in"
        folder.mkdir()
        (folder / "p.jpg").write_bytes(jpeg_crop((300, 50, 700, 350)))
        for _ in range(2):
            assert enhance(config, "-o", str(folder), str(folder)) == 0
            assert "1 ok, 0 failed" in capsys.readouterr().err
        assert {p.name for p in folder.iterdir()} == {"p.jpg", "p.restored.jpg", "p.restored (1).jpg"}

    def test_an_output_folder_inside_the_input_is_not_restored_by_the_next_run(
            self, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """-o under the input folder marks results .restored, so a later run on the folder skips them."""
        folder = tmp_path / "in"
        folder.mkdir()
        (folder / "p.jpg").write_bytes(jpeg_crop((300, 50, 700, 350)))
        assert enhance(config, "-o", str(folder / "out"), str(folder)) == 0
        assert enhance(config, str(folder)) == 0
        assert capsys.readouterr().err.count("1 ok, 0 failed") == 2  # not "2 ok" the second time
        assert sorted(p.name for p in (folder / "out").iterdir()) == ["p.restored.jpg"]

    def test_one_file_spelled_two_ways_is_restored_once(self, config: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "p.jpg").write_bytes(jpeg_crop((300, 50, 700, 350)))
        os.symlink(tmp_path / "d", tmp_path / "link")
        paths = [tmp_path / "d" / "p.jpg", tmp_path / "d" / ".." / "d" / "p.jpg", tmp_path / "link"]
        assert enhance(config, *map(str, paths)) == 0
        assert "1 ok, 0 failed" in capsys.readouterr().err

    def test_a_linked_file_named_on_the_command_line_is_restored_beside_the_link(
            self, config: Path, tmp_path: Path) -> None:
        """The user named the link: it is followed, and the result takes the link's place and name."""
        (tmp_path / "store").mkdir()
        (tmp_path / "view").mkdir()
        (tmp_path / "store" / "original.jpg").write_bytes(jpeg_crop((300, 50, 700, 350)))
        os.symlink(tmp_path / "store" / "original.jpg", tmp_path / "view" / "shown.jpg")
        assert enhance(config, str(tmp_path / "view" / "shown.jpg")) == 0
        assert (tmp_path / "view" / "shown.restored.jpg").is_file()
        assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["original.jpg"]

    def test_inputs_wanting_one_name_get_names_in_input_order(self, config: Path, tmp_path: Path) -> None:
        """x.jpeg and x.jpg both want x.restored.jpg: the first in order gets it, whatever the threads do."""
        (tmp_path / "x.jpeg").write_bytes(jpeg_crop((300, 50, 700, 350)))  # 400 x 300
        (tmp_path / "x.jpg").write_bytes(jpeg_crop((300, 50, 600, 450)))  # 300 x 400
        assert enhance(config, "--compare", str(tmp_path / "x.jpeg"), str(tmp_path / "x.jpg")) == 0
        sizes = {}
        for name in ("x.restored.jpg", "x.restored (1).jpg", "x.compare.jpg", "x.compare (1).jpg"):
            with Image.open(tmp_path / name) as im:
                sizes[name] = im.size
        assert (sizes["x.restored.jpg"], sizes["x.restored (1).jpg"]) == ((400, 300), (300, 400))
        assert (sizes["x.compare.jpg"][1], sizes["x.compare (1).jpg"][1]) == (300, 400)

    def test_an_output_path_that_is_a_file_stops_before_any_work(self, config: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "p.jpg").write_bytes(jpeg_crop((300, 50, 700, 350)))
        (tmp_path / "taken").write_text("a file")
        assert enhance(config, "-o", str(tmp_path / "taken"), str(tmp_path / "p.jpg")) == 2
        assert f"output folder {tmp_path / 'taken'}: a file, not a folder" in capsys.readouterr().err

    def test_ctrl_c_stops_with_a_summary_and_leaves_only_whole_results(
            self, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> None:
        """Ctrl-C during the second engine call: the first call's results are written whole and counted."""
        from gpen_engine.restorer import Restorer

        folder = portraits(tmp_path / "in", 10, "p{n}.jpg")  # 8 images per engine call
        restore, calls = Restorer.restore, []

        def interrupted_second_call(self: Restorer, images: list) -> list:
            calls.append(len(images))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return restore(self, images)

        monkeypatch.setattr(Restorer, "restore", interrupted_second_call)
        assert enhance(config, "-o", str(tmp_path / "out"), str(folder)) == 130
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith("interrupted: 8 ok, 0 failed") and last.endswith(", 2 not done")
        assert calls == [8, 2]
        results = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert results == [f"p{n}.jpg" for n in range(8)]  # and no temporary files

    def test_a_photo_that_makes_the_engine_raise_fails_alone(
            self, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> None:
        """An engine call that raises (not an engine error: a bug one photo's shape provokes) is narrowed down to
        that photo: it fails with the reason, the photos it was batched with are restored, the run goes on."""
        from gpen_engine.restorer import Restorer

        folder = portraits(tmp_path / "in", 3, "p{n}.jpg")
        (folder / "odd.jpg").write_bytes(jpeg_crop((300, 50, 701, 350)))  # 401 px wide
        restore = Restorer.restore

        def raising_on_odd_widths(self: Restorer, images: list) -> list:
            if any(image.rgb.shape[1] % 2 for image in images):
                raise IndexError("index 401 is out of bounds")
            return restore(self, images)

        monkeypatch.setattr(Restorer, "restore", raising_on_odd_widths)
        assert enhance(config, "-o", str(tmp_path / "out"), str(folder)) == 1
        err = capsys.readouterr().err
        assert any("odd.jpg" in line and "out of bounds" in line for line in err.splitlines() if "error:" in line)
        assert "3 ok, 1 failed" in err
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.jpg", "p1.jpg", "p2.jpg"]

    def test_a_device_that_stops_computing_stops_the_run(
            self, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> None:
        """From the second engine call on, everything raises, a blank test image too (a CUDA context after a
        device error): the run stops there instead of failing every later file, and says what was not done."""
        from gpen_engine.restorer import Restorer

        folder = portraits(tmp_path / "in", 12, "p{n:02}.jpg")  # 8 images per engine call
        restore, calls = Restorer.restore, []

        def lost_after_the_first_call(self: Restorer, images: list) -> list:
            calls.append(len(images))
            if len(calls) > 1:
                raise RuntimeError("CUDA error: unspecified launch failure")
            return restore(self, images)

        monkeypatch.setattr(Restorer, "restore", lost_after_the_first_call)
        assert enhance(config, "-o", str(tmp_path / "out"), str(folder)) == 1
        last = capsys.readouterr().err.splitlines()[-1]
        assert "device stopped working (CUDA error: unspecified launch failure)" in last
        assert ": 8 ok, 0 failed, " in last and last.endswith(", 4 not done"), last
        assert calls == [8, 4, 2, 1, 1, 2, 1, 1, 1]  # the second call narrowed down to single files, then the test
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"p{n:02}.jpg" for n in range(8)]


def test_a_long_input_name_still_gets_a_result_name(tmp_path: Path) -> None:
    """A 250-byte photo name: ".restored" would not fit, so the stem is shortened instead of the write failing."""
    stem = "p" * 250
    names = Names()
    first, second = names.claim(tmp_path, stem, ".restored.jpg"), names.claim(tmp_path, stem, ".restored.jpg")
    assert first != second and all(p.name.endswith(".restored.jpg") for p in (first, second))
    assert write_new(tmp_path, stem, ".restored.jpg", b"ok").read_bytes() == b"ok"


def test_ctrl_c_while_the_command_still_imports_torch_ends_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing torch takes seconds after the command line is read; Ctrl-C then exits 130, no traceback."""
    import importlib

    def interrupted(name: str) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["enhance", "photo.jpg"]) == 130
