"""Tests for gpen_engine.restorer: faces batched across images, out-of-memory handling, untouched pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gpen_engine.align import face_matrices, footprint
from gpen_engine.gpen import GpenArch, create_generator
from gpen_engine.options import BUILTIN_PRESETS, Preset
from gpen_engine.restorer import (
    BatchCap,
    DeviceOutOfMemory,
    EngineModels,
    Restorer,
    is_out_of_memory,
    load_engine_models,
)
from gpen_engine.types import EngineError, InputError, NoFaceFound, RestoredImage
from tests.conftest import SOLVAY_FACES

TINY = GpenArch(64, style_dim=32, n_mlp=2, channel_multiplier=1, narrow=0.0625)
PLAIN = Preset(
    name="test", batch_size=4, max_long_side=None, strength=100, denoise=0, sharpen=0, skin_protection=False,
    detail=0, precision="fp32", device="cpu", detector="mobile0.25", use_parsing=False,
)


class FakeGenerator(nn.Module):
    """Inverts the face (so pasted pixels visibly change), records batch sizes, fails on demand."""

    def __init__(self, fail_above: int | None = None, fail_on: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.inputs: list[torch.Tensor] = []
        self.fail_above = fail_above
        self.fail_on = fail_on or []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if self.fail_above is not None and x.shape[0] > self.fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(torch.allclose(face, bad) for face in x for bad in self.fail_on):
            raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB")
        self.inputs.extend(x.clone())
        return -x


def _models(generator: nn.Module, detector: nn.Module, parser: nn.Module | None = None) -> EngineModels:
    return EngineModels(generator=generator, face_size=TINY.size, detector=detector, parser=parser,
                        device=torch.device("cpu"), precision="fp32")


def _ok(result: RestoredImage | EngineError) -> RestoredImage:
    assert isinstance(result, RestoredImage), result
    return result


def _outside_faces(result: RestoredImage, image: np.ndarray, size: int = TINY.size) -> np.ndarray:
    """Boolean map of pixels outside every face's crop window."""
    outside = np.ones(image.shape[:2], bool)
    mats = face_matrices(np.stack([f.landmarks for f in result.faces]), size)
    for m in mats:
        x0, y0, x1, y1 = footprint(m, size, image.shape[:2])
        outside[y0:y1, x0:x1] = False
    return outside


@pytest.fixture(scope="module")
def images(solvay_rgb: np.ndarray) -> list[np.ndarray]:
    """Three crops of the Solvay photo with 12, 17 and 4 faces."""
    return [np.ascontiguousarray(solvay_rgb[:260, :600]), np.ascontiguousarray(solvay_rgb[:260, 600:]),
            np.ascontiguousarray(solvay_rgb[60:230, 350:520])]


class TestBatchCap:
    def test_halves_and_grows_back(self) -> None:
        """An OOM at 8 faces caps batches at 4; N clean batches grow it by one, up to the limit."""
        cap = BatchCap(8, grow_after=2)
        cap.failed(8)
        assert cap.current == 4
        cap.failed(4)
        assert cap.current == 2
        for _ in range(2):
            cap.succeeded()
        assert cap.current == 3
        for _ in range(100):
            cap.succeeded()
        assert cap.current == 8

    def test_never_below_one(self) -> None:
        """A failure at one face leaves a cap of one."""
        cap = BatchCap(1)
        cap.failed(1)
        assert cap.current == 1

    def test_recognises_out_of_memory(self) -> None:
        """CUDA and host allocation failures count as out-of-memory; other errors do not."""
        assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
        assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"))
        # The CUDA libraries' own allocations on a full device.
        assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
        assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
        assert not is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
        assert not is_out_of_memory(RuntimeError("shape mismatch"))
        assert not is_out_of_memory(ValueError("out of memory"))


def test_stage_clock_waits_for_the_models_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With models on cuda:1, timing must wait for cuda:1, not the current device (which would also wake cuda:0)."""
    from gpen_engine.restorer import _Clock

    waited: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    _Clock(torch.device("cuda:1")).lap()
    assert waited == [torch.device("cuda:1")]


class TestRestorer:
    def test_batches_faces_across_images(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """Faces of all images share generator batches of at most batch_size, none left out."""
        gen = FakeGenerator()
        results = Restorer(_models(gen, detector), PLAIN.with_(batch_size=5)).restore(images)
        counts = [len(_ok(r).faces) for r in results]
        assert counts == [12, 17, 4]
        assert max(gen.sizes) == 5 and sum(gen.sizes) == 33
        assert len(gen.sizes) == 7  # ceil(33 / 5): batches span image boundaries

    def test_small_face_rule_reads_the_smaller_box_side(
        self, detector: nn.Module, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """GPEN blurs a restored face when ``min(fh, fw) < 100``: a face 90 px wide and 120 px tall is small."""
        from gpen_engine import adjust

        seen: list[float] = []
        real = adjust.soften_small

        def spy(restored: torch.Tensor, sizes, min_size: float = adjust.SMALL_FACE_PX) -> torch.Tensor:
            seen.extend(float(s) for s in sizes)
            return real(restored, sizes, min_size)

        monkeypatch.setattr(adjust, "soften_small", spy)
        result = _ok(Restorer(_models(FakeGenerator(), detector), PLAIN).restore([images[2]])[0])
        expected = sorted(min(f.box[2] - f.box[0], f.box[3] - f.box[1]) for f in result.faces)
        assert sorted(seen) == pytest.approx(expected)

    def test_size_kept_background_untouched(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """Every result has its input's size; pixels away from all faces keep their bytes; faces change."""
        torch.manual_seed(0)
        gen = create_generator(TINY).eval()
        results = Restorer(_models(gen, detector), PLAIN).restore(images)
        for image, result in zip(images, results, strict=True):
            out = _ok(result).rgb
            assert out.shape == image.shape and out.dtype == np.uint8
            outside = _outside_faces(_ok(result), image)
            np.testing.assert_array_equal(out[outside], image[outside])
            assert np.any(out[~outside] != image[~outside])

    def test_oom_splits_and_caps(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """Batches over 2 faces run out of memory: they are split, retried, and every face is restored."""
        gen = FakeGenerator(fail_above=2)
        restorer = Restorer(_models(gen, detector), PLAIN.with_(batch_size=8), grow_after=1000)
        results = restorer.restore(images)
        assert [len(_ok(r).faces) for r in results] == [12, 17, 4]
        assert gen.sizes[:3] == [8, 4, 2]  # the first batch is halved until it fits
        assert restorer.cap.current == 2
        assert len(gen.inputs) == 33  # every face went through exactly once

    def test_parser_oom_splits_like_the_generator(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """The parsing model runs at the generator's batch size: its out-of-memory splits the batch too, instead of
        failing the whole call (which the daemon would retry at the same size for ever)."""

        class SmallParser(nn.Module):
            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                if x.shape[0] > 2:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
                logits = torch.zeros((x.shape[0], 19, *x.shape[2:]))
                logits[:, 1] = 1  # all skin
                return logits, x

        preset = PLAIN.with_(batch_size=8, use_parsing=True)
        restorer = Restorer(_models(FakeGenerator(), detector, SmallParser()), preset, grow_after=1000)
        results = restorer.restore(images)
        assert [len(_ok(r).faces) for r in results] == [12, 17, 4]
        assert restorer.cap.current == 2

    def test_warm_up_runs_the_generator_and_parser(self, detector: nn.Module) -> None:
        """READY must mean the device has run the generator: warm-up passes one blank face through it."""
        calls: list[int] = []

        class Parser(nn.Module):
            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                calls.append(x.shape[0])
                return torch.zeros((x.shape[0], 19, *x.shape[2:])), x

        gen = FakeGenerator()
        Restorer(_models(gen, detector, Parser()), PLAIN.with_(use_parsing=True)).warm_up()
        assert (gen.sizes, calls) == ([1], [1])

    def test_cap_grows_back(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """After clean batches at the lowered cap, batch sizes grow again towards the preset's."""
        gen = FakeGenerator()
        restorer = Restorer(_models(gen, detector), PLAIN.with_(batch_size=4), grow_after=2)
        restorer.cap.failed(4)  # as if an earlier call had run out of memory
        restorer.restore(images)
        assert gen.sizes[:3] == [2, 2, 3]
        assert 4 in gen.sizes

    def test_face_too_big_fails_its_image_only(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """A face that does not fit even alone fails its own image; the other images succeed."""
        recorder = FakeGenerator()
        Restorer(_models(recorder, detector), PLAIN).restore([images[2]])
        gen = FakeGenerator(fail_on=[recorder.inputs[0]])
        results = Restorer(_models(gen, detector), PLAIN).restore(images)
        assert isinstance(results[2], DeviceOutOfMemory)
        assert [len(_ok(r).faces) for r in results[:2]] == [12, 17]
        assert any(np.any(_ok(r).rgb != image) for r, image in zip(results[:2], images, strict=False))

    def test_memory_running_out_while_cropping_lowers_the_cap(
        self, detector: nn.Module, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The image windows faces are cropped from go to the device with them: out of memory there takes fewer
        faces at a time, like the generator's, instead of failing the whole call."""
        from gpen_engine import restorer as module

        real, calls = module.image_window, []

        def window(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "image_window", window)
        gen = FakeGenerator()
        restorer = Restorer(_models(gen, detector), PLAIN.with_(batch_size=8), grow_after=1000)
        results = restorer.restore(images)
        assert [len(_ok(r).faces) for r in results] == [12, 17, 4]
        assert (restorer.cap.current, gen.sizes[0], len(gen.inputs)) == (4, 4, 33)

    @pytest.mark.parametrize("stage", ["image_window", "composite"])
    def test_memory_running_out_for_one_image_fails_only_that_image(
        self, detector: nn.Module, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch, stage: str
    ) -> None:
        """An image whose window never fits on the device, or whose paste-back does not, ends as DeviceOutOfMemory
        (the daemon tries it again later); the other images of the call are restored."""
        from gpen_engine import restorer as module

        big = images[1]
        real = getattr(module, stage)

        def of_the_big_image(pixels, *args):
            if stage == "image_window":
                return pixels.shape == big.shape
            (x0, y0), part = args[4], pixels.cpu().numpy()
            return np.array_equal(part, big[y0:y0 + part.shape[0], x0:x0 + part.shape[1]])

        def call(pixels, *args, **kwargs):
            if of_the_big_image(pixels, *args):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
            return real(pixels, *args, **kwargs)

        monkeypatch.setattr(module, stage, call)
        results = Restorer(_models(FakeGenerator(), detector), PLAIN.with_(batch_size=8)).restore(images)
        assert isinstance(results[1], DeviceOutOfMemory)
        assert [len(_ok(r).faces) for r in (results[0], results[2])] == [12, 4]
        assert all(np.any(_ok(results[i]).rgb != images[i]) for i in (0, 2))

    def test_a_face_the_generator_returns_as_nan_fails_its_image(
        self, detector: nn.Module, images: list[np.ndarray]
    ) -> None:
        """NaN (an fp16 overflow) would paste as a black face in a photo said to be restored: that image fails
        with a reason instead, and the others of the batch are restored."""
        recorder = FakeGenerator()
        Restorer(_models(recorder, detector), PLAIN).restore([images[2]])
        bad = recorder.inputs[1]

        class NanOnOneFace(FakeGenerator):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                for j, face in enumerate(x):
                    if torch.allclose(face, bad):
                        out[j, :, 3, 5] = float("nan")
                return out

        results = Restorer(_models(NanOnOneFace(), detector), PLAIN.with_(batch_size=8)).restore(images)
        assert isinstance(results[2], EngineError) and not isinstance(results[2], DeviceOutOfMemory)
        assert "1 of 4 faces is not a number" in str(results[2])
        assert [len(_ok(r).faces) for r in results[:2]] == [12, 17]

    def test_strength_zero_is_byte_identical(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """Strength 0 returns every image unchanged (faces still reported) and never runs the generator."""
        gen = FakeGenerator()
        results = Restorer(_models(gen, detector), PLAIN.with_(strength=0, sharpen=50)).restore(images)
        for image, result in zip(images, results, strict=True):
            np.testing.assert_array_equal(_ok(result).rgb, image)
            assert _ok(result).faces
        assert gen.sizes == []

    def test_strength_scales_the_change(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """At strength 50 face pixels move about half as far from the original as at 100."""
        full = _ok(Restorer(_models(FakeGenerator(), detector), PLAIN).restore(images[:1])[0]).rgb
        half = _ok(Restorer(_models(FakeGenerator(), detector), PLAIN.with_(strength=50))
                   .restore(images[:1])[0]).rgb
        d_full = np.abs(full.astype(int) - images[0]).sum()
        d_half = np.abs(half.astype(int) - images[0]).sum()
        assert 0.45 < d_half / d_full < 0.55

    def test_no_faces(self, detector: nn.Module) -> None:
        """An image without faces comes back unchanged, or as NoFaceFound when the preset requires faces."""
        blank = np.full((120, 160, 3), 90, np.uint8)
        gen = FakeGenerator()
        (result,) = Restorer(_models(gen, detector), PLAIN).restore([blank])
        assert _ok(result).faces == []
        np.testing.assert_array_equal(_ok(result).rgb, blank)
        (required,) = Restorer(_models(gen, detector), PLAIN.with_(faces_required=True)).restore([blank])
        assert isinstance(required, NoFaceFound)
        assert gen.sizes == []

    def test_bad_input_fails_its_slot(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """A gray, float or empty array is an InputError in its own slot; the other image is restored."""
        results = Restorer(_models(FakeGenerator(), detector), PLAIN).restore(
            [np.zeros((50, 50), np.uint8), images[2], np.zeros((50, 50, 3), np.float32),
             np.zeros((0, 3000, 3), np.uint8), np.zeros((10, 0, 3), np.uint8)])
        assert [type(r) for r in results[2:]] == [InputError] * 3 and isinstance(results[0], InputError)
        assert len(_ok(results[1]).faces) == 4

    def test_long_side_is_capped(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """``max_long_side`` downsizes the working image; faces are in the working image's coordinates."""
        (result,) = Restorer(_models(FakeGenerator(), detector), PLAIN.with_(max_long_side=400)).restore(
            images[1:2])
        out = _ok(result)
        assert max(out.rgb.shape[:2]) == 400
        assert all(f.box[2] <= 400 + 1 for f in out.faces)

    def test_prepared_images_restore_the_same(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """Images prepared ahead (on a decode thread) give exactly the result of plain arrays."""
        preset = PLAIN.with_(max_long_side=500, detect_long_side=200)
        restorer = Restorer(_models(FakeGenerator(), detector), preset)
        prepared = [restorer.prepare(image) for image in images]
        assert [max(p.search.shape[:2]) for p in prepared] == [200, 200, 170]  # 170 px: below 1.5 x 200, kept
        plain = restorer.restore(images)
        ahead = restorer.restore(prepared)
        for a, b in zip(plain, ahead, strict=True):
            np.testing.assert_array_equal(_ok(a).rgb, _ok(b).rgb)
            assert [f.box.tolist() for f in _ok(a).faces] == [f.box.tolist() for f in _ok(b).faces]

    def test_prepared_for_another_preset_is_redone(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """An image prepared before a reload changed the preset's sizes is prepared again, not misread."""
        old = Restorer(_models(FakeGenerator(), detector), PLAIN.with_(detect_long_side=200))
        new = Restorer(_models(FakeGenerator(), detector), PLAIN)
        (result,) = new.restore([old.prepare(images[1])])
        (expected,) = new.restore(images[1:2])
        assert len(_ok(expected).faces) == len(_ok(result).faces)
        np.testing.assert_array_equal(_ok(expected).rgb, _ok(result).rgb)

    def test_prepare_refuses_non_images(self, detector: nn.Module) -> None:
        restorer = Restorer(_models(FakeGenerator(), detector), PLAIN)
        with pytest.raises(InputError, match="HxWx3 uint8"):
            restorer.prepare(np.zeros((10, 10), np.uint8))

    def test_stage_times(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """Detection, alignment, generation and paste times are recorded for each image."""
        results = Restorer(_models(FakeGenerator(), detector), PLAIN).restore(images)
        for r in results:
            t = _ok(r).times
            assert t.detect > 0 and t.align > 0 and t.generate > 0 and t.paste > 0
            assert t.decode == 0 and t.encode == 0

    def test_parser_mask_decides_what_is_pasted(self, detector: nn.Module, images: list[np.ndarray]) -> None:
        """With parsing on, a parser that sees only background leaves the image unchanged."""

        class Background(nn.Module):
            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                logits = torch.zeros((x.shape[0], 19, *x.shape[2:]))
                logits[:, 0] = 1
                return logits, x

        preset = PLAIN.with_(use_parsing=True, skin_protection=True)
        (result,) = Restorer(_models(FakeGenerator(), detector, Background()), preset).restore(images[2:])
        np.testing.assert_array_equal(_ok(result).rgb, images[2])
        (ignored,) = Restorer(_models(FakeGenerator(), detector, Background()),
                              preset.with_(use_parsing=False)).restore(images[2:])
        assert np.any(_ok(ignored).rgb != images[2])

    @pytest.mark.parametrize("name", sorted(BUILTIN_PRESETS))
    def test_builtin_presets_run(self, name: str, detector: nn.Module, images: list[np.ndarray]) -> None:
        """Every built-in preset's knobs run end to end and leave the background alone."""
        torch.manual_seed(0)
        preset = BUILTIN_PRESETS[name].with_(device="cpu", precision="fp32")
        (result,) = Restorer(_models(create_generator(TINY).eval(), detector), preset).restore(images[2:])
        out = _ok(result)
        assert len(out.faces) == 4
        outside = _outside_faces(out, images[2])
        np.testing.assert_array_equal(out.rgb[outside], images[2][outside])


class TestLoadEngineModels:
    def test_random_generator_on_solvay(self, detector_path: Path, solvay_rgb: np.ndarray) -> None:
        """Loaded models with a random-weight generator restore all 29 Solvay faces at the input size."""
        models = load_engine_models(generator_path=None, arch=TINY, detector_path=detector_path,
                                    detector_name="mobile0.25", device="cpu", precision="fp32",
                                    random_generator=True)
        assert models.face_size == 64 and models.parser is None
        (result,) = Restorer(models, PLAIN.with_(batch_size=8)).restore([solvay_rgb])
        out = _ok(result)
        assert len(out.faces) == SOLVAY_FACES
        assert out.rgb.shape == solvay_rgb.shape

    def test_generator_from_file(self, detector_path: Path, tmp_path: Path, images: list[np.ndarray]) -> None:
        """A generator saved to a file restores exactly as the module it was saved from."""
        torch.manual_seed(3)
        module = create_generator(TINY).eval()
        path = tmp_path / "tiny.pth"
        torch.save(module.state_dict(), path)
        models = load_engine_models(generator_path=path, arch=TINY, detector_path=detector_path,
                                    detector_name="mobile0.25", device="cpu", precision="fp32")
        loaded = _ok(Restorer(models, PLAIN).restore(images[2:])[0]).rgb
        direct = _ok(Restorer(EngineModels(module, 64, models.detector, None, torch.device("cpu"), "fp32"),
                              PLAIN).restore(images[2:])[0]).rgb
        np.testing.assert_array_equal(loaded, direct)

    def test_unknown_variant(self, detector_path: Path) -> None:
        """An unknown model name is an engine error, not a KeyError."""
        with pytest.raises(EngineError):
            load_engine_models(generator_path=None, arch="GPEN-BFR-3", detector_path=detector_path,
                               detector_name="mobile0.25", device="cpu", precision="fp32",
                               random_generator=True)
