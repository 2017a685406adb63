"""The benchmark: FLOP counting, the synthetic photo sets, and a smoke run of ``gpen-watch bench``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.benchcmd import _mask_kind
from daemon.cli import main
from daemon.oneshot import load_models
from daemon.settings import load_settings, preset_table
from gpen_engine import bench, imageio
from gpen_engine.align import template
from gpen_engine.detect import detect_faces, load_detector
from gpen_engine.gpen import VARIANTS, GpenArch, create_generator
from gpen_engine.options import BUILTIN_PRESETS

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SOLVAY = SHARED / "testdata" / "solvay_1927.png"
DETECTOR = SHARED / "models" / "detection_mobilenet0.25_Final.pth"



class TestFlops:
    @pytest.mark.parametrize(("name", "gflops"), [("GPEN-BFR-256", 17.4), ("GPEN-BFR-512", 276.0)])
    def test_counts_the_published_flops(self, name: str, gflops: float) -> None:
        """One face counts the GFLOPs published for the official model of that size."""
        with torch.device("meta"):
            generator = create_generator(VARIANTS[name]).eval()
        flops = bench.generator_flops(generator, VARIANTS[name].size, torch.device("meta"))
        assert pytest.approx(flops, rel=0.01) == gflops * 1e9
        assert all(p.requires_grad for p in generator.parameters())  # the caller's module is left as it was


class TestOfficialFormulation:
    def test_official_forward_is_the_same_function(self) -> None:
        """The baseline's grouped-convolution generator computes what the engine's generator computes."""
        torch.manual_seed(0)
        generator = create_generator(GpenArch(32, channel_multiplier=1, narrow=0.0625)).eval()
        with torch.no_grad():
            for name, p in generator.named_parameters():
                if name.endswith("noise.weight"):
                    p.fill_(0.7)  # zero at init, which would hide the encoder features
                elif name.endswith("bias"):
                    p.normal_(0, 0.2)
        x = torch.rand(3, 3, 32, 32) * 2 - 1
        with torch.inference_mode():
            expected = generator(x)
        actual = bench.official_forward(generator, x)
        assert expected.shape == actual.shape
        assert torch.allclose(expected, actual, rtol=1e-4, atol=1e-4)
        assert expected.std() > 0.01


class TestSyntheticSets:
    def test_24mp_photo_has_several_faces(self) -> None:
        """The synthetic camera-size photo is 6000x4000 and the real detector finds several faces in it."""
        sets = bench.synthetic_sets(SOLVAY.read_bytes())
        assert [SOLVAY.read_bytes()] == sets["photo"]
        big = imageio.decode(sets["24mp"][0]).rgb
        assert big.shape == (4000, 6000, 3)
        faces = detect_faces(load_detector(DETECTOR, "mobile0.25", "cpu"), [big], long_side=1000)[0]
        assert len(faces) >= 4

    def test_portraits_frame_one_face_each(self) -> None:
        """Each synthetic portrait is 1280x1920 and its largest detected face sits in the middle."""
        detector = load_detector(DETECTOR, "mobile0.25", "cpu")
        sets = bench.synthetic_sets(SOLVAY.read_bytes(), detector=detector, portraits=2)
        for data in sets["portraits"]:
            rgb = imageio.decode(data).rgb
            assert rgb.shape == (1920, 1280, 3)
            face = detect_faces(detector, [rgb], long_side=1000)[0][0]
            center = (face.box[:2] + face.box[2:]) / 2
            assert np.abs(center - (640, 960)).max() < 100
            assert face.size > 500


class TestBaseline:
    def test_baseline_changes_only_face_regions(self) -> None:
        """The one-face-at-a-time baseline restores the same faces the detector finds and leaves the rest."""
        rgb = np.asarray(Image.open(SOLVAY).convert("RGB").crop((300, 50, 900, 350))).copy()
        torch.manual_seed(0)
        generator = create_generator(GpenArch(64, channel_multiplier=1, narrow=0.125))
        generator.eval().requires_grad_(False)
        detector = load_detector(DETECTOR, "mobile0.25", "cpu")

        out, n, ms = bench.baseline_restore(
            rgb, detector=detector, generator=generator, device=torch.device("cpu"), size=64,
            template=template(64), preset=BUILTIN_PRESETS["low-spec"])
        faces = detect_faces(detector, [rgb], long_side=1000)[0]
        assert len(faces) == n > 0
        assert rgb.shape == out.shape
        assert not np.array_equal(rgb, out)
        far = np.ones(rgb.shape[:2], bool)
        for face in faces:  # GPEN's crop spans ~2.5 face boxes; 4 boxes leaves a safe margin
            cx, cy = (face.box[:2] + face.box[2:]) / 2
            r = 2 * face.size
            far[max(0, int(cy - r)) : int(cy + r), max(0, int(cx - r)) : int(cx + r)] = False
        assert far.any()
        assert np.array_equal(rgb[far], out[far])
        assert set(bench.STAGES) == set(ms)


class TestReport:
    """What the printed report says when its figures cannot be taken at face value."""

    @staticmethod
    def report(*, fraction: float, baseline_faces: int) -> bench.BenchReport:
        def stats(method: str, faces: int) -> bench.PassStats:
            return bench.PassStats(method, 1, faces, 0, 1.0, 1.0, float(faces), dict.fromkeys(bench.STAGES, 1.0),
                                   0.5, None, None)

        point = bench.SweepPoint(4, 10.0, 1e11, fraction)
        rate = bench.MatmulRate(1e11, "float32", 2048, 0.5e11, 1e11)
        photo = bench.SetReport("photo", ["1328x568"], stats("engine", 29), stats("baseline", baseline_faces), 2.0)
        return bench.BenchReport((0.1, 0.1), "cpu", "fp32", "GPEN-BFR-256", True, 4, rate, 17.4, [point], 4,
                                 fraction, [photo], 1, 2)

    def test_figures_that_add_up_carry_no_warning(self) -> None:
        text = bench.format_report(self.report(fraction=0.6, baseline_faces=29))
        assert "real peak" not in text and "not the same work" not in text
        assert "the faster of torch.mm 50.0 and a 1x1 convolution 100.0" in text
        assert "speed-up vs the official GPEN way" in text

    def test_a_fraction_above_the_peak_is_flagged(self) -> None:
        assert "below this device's real peak" in bench.format_report(self.report(fraction=1.3, baseline_faces=29))

    def test_a_speed_up_over_different_work_is_flagged(self) -> None:
        text = bench.format_report(self.report(fraction=0.6, baseline_faces=28))
        assert "not the same work: the engine restored 29 faces (0 failed), the baseline 28 (0)" in text


def test_the_matmul_rate_is_the_faster_of_two_libraries() -> None:
    rate = bench.measure_matmul(torch.device("cpu"), torch.float32, n=256, repeats=2)
    assert rate.matmul_flops_per_s > 0 and rate.conv_flops_per_s > 0
    assert rate.flops_per_s == max(rate.matmul_flops_per_s, rate.conv_flops_per_s)
    assert not rate.tf32


class TestBenchCommand:
    def test_smoke_run_writes_every_figure(self, tmp_path: Path, tiny_cli_config: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        """A tiny CPU run with --baseline prints the report and writes every figure, speed-up too, to JSON."""
        config = tiny_cli_config
        images = tmp_path / "photos"
        images.mkdir()
        Image.open(SOLVAY).convert("RGB").crop((300, 50, 900, 350)).save(images / "group.jpg", quality=92)
        out = tmp_path / "bench.json"

        status = main(["bench", "--config", str(config), "--preset", "tiny", "--random-weights", "--baseline",
                       "--repeat", "1", "--images", str(images), "--json", str(out)])

        assert status == 0
        printed = capsys.readouterr()
        assert "RANDOM GENERATOR WEIGHTS" in printed.out
        assert "speed-up" in printed.out
        report = json.loads(out.read_text())
        assert report["random_weights"] is True
        matmul = report["matmul"]
        assert matmul["flops_per_s"] == max(matmul["matmul_flops_per_s"], matmul["conv_flops_per_s"]) > 0
        assert [p["batch"] for p in report["sweep"]] == [1, 2, 4, 8]
        # With --baseline the official formulation is swept at the same batch sizes, against the same rate.
        assert [p["batch"] for p in report["official_sweep"]] == [1, 2, 4, 8]
        assert all(p["fraction"] > 0 for p in report["official_sweep"])
        assert "official formulation (fp32)" in printed.out
        assert report["best_fraction"] > 0
        (photos,) = report["sets"]
        engine, baseline = photos["engine"], photos["baseline"]
        assert engine["faces"] == baseline["faces"] > 0  # same detector, same photo, same faces
        assert set(bench.STAGES) == set(engine["ms_per_image"])
        assert engine["images_per_s"] > 0 and engine["faces_per_s"] > 0
        assert engine["peak_rss_mb"] > 0
        assert photos["speedup"] > 0
        # Where the engine's thread spent the run: restoring or waiting for decodes, never more than all of it.
        assert 0 < engine["restore_busy"] <= 1 and 0 <= engine["decode_wait"] < 1
        assert engine["restore_busy"] + engine["decode_wait"] <= 1
        assert "of the time in restore calls" in printed.out
        assert "paste mask: rectangle" in printed.out and "rectangle" == report["mask"]

    def test_the_official_way_runs_in_fp32_against_the_fp32_rate(
            self, tmp_path: Path, tiny_cli_config: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> None:
        """With the engine in half precision (bf16 here; fp16 on a GPU), the baseline is still the official way:
        an fp32 generator, its fractions taken of the fp32 matmul rate, not of the half-precision one."""
        config = tmp_path / "bf16.toml"
        config.write_text(tiny_cli_config.read_text() + '\n[presets.tiny-bf16]\nbase = "tiny"\nprecision = "bf16"\n')
        images = tmp_path / "photos"
        images.mkdir()
        Image.open(SOLVAY).convert("RGB").crop((300, 50, 700, 300)).save(images / "group.jpg", quality=92)
        ran_in: set[torch.dtype] = set()
        real = bench.official_forward

        def spy(generator: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            ran_in.add(bench.compute_dtype(generator))
            return real(generator, x)

        monkeypatch.setattr(bench, "official_forward", spy)
        out = tmp_path / "bench.json"
        status = main(["bench", "--config", str(config), "--preset", "tiny-bf16", "--random-weights", "--baseline",
                       "--repeat", "1", "--images", str(images), "--json", str(out)])
        assert status == 0
        report = json.loads(out.read_text())
        assert (report["matmul"]["dtype"], report["official_matmul"]["dtype"]) == ("bfloat16", "float32")
        assert ran_in == {torch.float32}
        assert "its fractions of the fp32 rate" in capsys.readouterr().out
        (photos,) = report["sets"]
        assert photos["engine"]["faces"] == photos["baseline"]["faces"] > 0

    def test_a_preset_that_parses_is_timed_with_a_parser_even_without_its_weights(
            self, tiny_cli_config: Path) -> None:
        """bench --random-weights on a preset with use_parsing and no parser file times a random-weight parser (and
        says so), so the figures include the parser's cost; enhance keeps the rectangle mask in that case."""
        settings = load_settings(tiny_cli_config)
        preset = preset_table(settings)["tiny"].with_(use_parsing=True)
        timed = load_models(settings, preset, device="cpu", random_weights=True, random_parser=True, log=print)
        assert "ParseNet" == type(timed.parser).__name__
        assert "parsing, random weights" == _mask_kind(timed, preset, settings)
        plain = load_models(settings, preset, device="cpu", random_weights=True, log=print)
        assert plain.parser is None and "rectangle" == _mask_kind(plain, preset, settings)

    def test_bad_files_are_left_out_of_the_figures(self, tmp_path: Path, tiny_cli_config: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
        """Broken files in --images are named and left out: the figures are about the photos that decode."""
        images = tmp_path / "photos"
        images.mkdir()
        Image.open(SOLVAY).convert("RGB").crop((300, 50, 900, 350)).save(images / "group.jpg", quality=92)
        (images / "notes.jpg").write_text("not a photo")
        (images / "empty.png").write_bytes(b"")
        out = tmp_path / "bench.json"
        assert main(["bench", "--config", str(tiny_cli_config), "--preset", "tiny", "--random-weights",
                     "--repeat", "1", "--images", str(images), "--json", str(out)]) == 0
        err = capsys.readouterr().err
        assert "left out" in err and "notes.jpg" in err and "empty.png" in err
        (photos,) = json.loads(out.read_text())["sets"]
        assert (photos["engine"]["images"], photos["engine"]["failed"]) == (1, 0)

    @pytest.mark.parametrize("args", [["--batch", "0"], ["--batch", "-1"], ["--batch", "300"], ["--repeat", "0"]])
    def test_out_of_range_counts_are_refused(self, args: list[str], tiny_cli_config: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "--config", str(tiny_cli_config), "--preset", "tiny", "--random-weights", *args])
        assert exit_info.value.code == 2
        assert "must be 1 to" in capsys.readouterr().err

    def test_an_unwritable_json_path_stops_before_measuring(self, tmp_path: Path, tiny_cli_config: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
        target = tmp_path / "missing-folder" / "out.json"
        assert main(["bench", "--config", str(tiny_cli_config), "--preset", "tiny", "--random-weights",
                     "--json", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"--json {target}: folder {target.parent} does not exist" in err
        assert "measuring" not in err


def test_a_method_s_device_peak_leaves_out_what_is_held_for_the_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """In half precision the baseline's fp32 copy of the generator stays on the device through the engine's
    passes (and the engine's generator through the baseline's): each method's peak leaves the other's out."""
    monkeypatch.setattr(bench, "_reset_peaks", lambda device: None)
    monkeypatch.setattr(bench, "_peak_device_mb", lambda device: 1000.0)
    generator = create_generator(GpenArch(32, channel_multiplier=1, narrow=0.0625))
    held = bench.module_mb(generator)
    assert held == pytest.approx(sum(p.numel() for p in generator.parameters()) * 4 / 2**20, rel=0.05)
    empty = bench._Pass(seconds=1.0, faces=1, failed=0, stage_ms={}, errors=[])
    runs = {"engine": lambda: empty, "baseline": lambda: empty}
    bests = bench._interleaved(runs, 1, torch.device("cuda"), {"engine": lambda: held})
    assert (bests["engine"].device_mb, bests["baseline"].device_mb) == (pytest.approx(1000.0 - held), 1000.0)
