"""Tests for gpen_engine.detect: real RetinaFace mobile0.25 weights on the Solvay photo."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gpen_engine.detect import bucket_side, detect_faces, detection_scale, load_detector, search_copy
from gpen_engine.types import Face, ModelFileError
from tests.conftest import SOLVAY_FACES


def _boxes(faces: list[Face]) -> np.ndarray:
    return np.array([f.box for f in faces]).reshape(-1, 4)


def _one_face(solvay_rgb: np.ndarray, face: Face, margin: int = 20) -> np.ndarray:
    """A grey image the size of the Solvay photo showing only ``face`` (so it shares the photo's bucket)."""
    out = np.full_like(solvay_rgb, 128)
    x1, y1, x2, y2 = face.box.astype(int)
    out[y1 - margin:y2 + margin, x1 - margin:x2 + margin] = solvay_rgb[y1 - margin:y2 + margin, x1 - margin:x2 + margin]
    return out


def _assert_same_faces(got: list[Face], expected: list[Face]) -> None:
    assert len(got) == len(expected)
    if expected:
        np.testing.assert_allclose(_boxes(got), _boxes(expected), atol=1e-3)
        np.testing.assert_allclose([f.landmarks for f in got], [f.landmarks for f in expected], atol=1e-3)
        np.testing.assert_allclose([f.score for f in got], [f.score for f in expected], atol=1e-5)


def _match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each box of ``a``, the largest coordinate difference to its nearest box in ``b``."""
    return np.abs(a[:, None, :] - b[None, :, :]).max(-1).min(1)


class TestDetectionScale:
    def test_gpen_rule(self) -> None:
        """Images up to 1500 px are searched at full size, larger ones at a 1000 px long side."""
        assert detection_scale(1500, 900) == 1.0
        assert detection_scale(900, 1501) == pytest.approx(1000 / 1501)
        assert detection_scale(4000, 3000) == pytest.approx(0.25)

    def test_configured_long_side(self) -> None:
        """A configured long side moves both the target and the threshold (1.5x) with it."""
        assert detection_scale(700, 700, long_side=500) == 1.0
        assert detection_scale(751, 700, long_side=500) == pytest.approx(500 / 751)
        assert detection_scale(751, 700, long_side=500, resize_above=800) == 1.0

    def test_buckets_repeat(self) -> None:
        """Nearby sizes share a bucket, and a bucket always holds the size."""
        assert bucket_side(1000) == bucket_side(1010) == 1024
        assert bucket_side(100) == 128
        for n in (1, 127, 129, 511, 513, 1500, 1537, 4000):
            assert bucket_side(n) >= n


class TestLoadDetector:
    def test_loads_module_prefixed_state_dict(self, detector_path: Path, tmp_path: Path) -> None:
        """A state dict saved with DataParallel's ``module.`` prefix loads strictly."""
        state = torch.load(detector_path, map_location="cpu", weights_only=True)
        path = tmp_path / "prefixed.pth"
        torch.save({"module." + k.removeprefix("module."): v for k, v in state.items()}, path)
        model = load_detector(path, "mobile0.25", "cpu")
        assert not model.training

    def test_wrong_network_is_a_model_file_error(self, detector_path: Path) -> None:
        """mobile0.25 weights do not load into the ResNet50 detector."""
        with pytest.raises(ModelFileError):
            load_detector(detector_path, "resnet50", "cpu")

    def test_garbage_file_is_a_model_file_error(self, tmp_path: Path) -> None:
        """A file that is not a torch checkpoint is refused with a clear error."""
        path = tmp_path / "bad.pth"
        path.write_bytes(b"not a checkpoint")
        with pytest.raises(ModelFileError):
            load_detector(path, "mobile0.25", "cpu")
        with pytest.raises(ModelFileError):
            load_detector(tmp_path / "missing.pth", "mobile0.25", "cpu")


class TestDetectFaces:
    def test_solvay_has_29_faces(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """All 29 faces of the Solvay photo are found, each with a score above the threshold."""
        (faces,) = detect_faces(detector, [solvay_rgb])
        assert len(faces) == SOLVAY_FACES
        assert all(f.score > 0.9 for f in faces)
        assert all(f.landmarks.shape == (5, 2) for f in faces)

    def test_matches_facexlib(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """Boxes agree with facexlib's own single-image detector (BGR input) to within 2 px."""
        (faces,) = detect_faces(detector, [solvay_rgb])
        with torch.no_grad():
            ref = detector.detect_faces(np.ascontiguousarray(solvay_rgb[:, :, ::-1]), 0.9)
        assert len(ref) == len(faces)
        assert _match(_boxes(faces), ref[:, :4]).max() < 2.0

    def test_landmarks_inside_boxes(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """Eyes lie left/right of each other and every landmark lies inside its face box."""
        (faces,) = detect_faces(detector, [solvay_rgb])
        for f in faces:
            x1, y1, x2, y2 = f.box
            assert np.all((f.landmarks[:, 0] >= x1) & (f.landmarks[:, 0] <= x2))
            assert np.all((f.landmarks[:, 1] >= y1) & (f.landmarks[:, 1] <= y2))
            assert f.landmarks[0, 0] < f.landmarks[1, 0]

    def test_downscaled_detection_maps_back(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """On a 2x enlargement (searched at 1000 px) faces come back in full-resolution coordinates."""
        big = cv2.resize(solvay_rgb, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
        assert detection_scale(*big.shape[:2]) < 1.0
        (small_faces,) = detect_faces(detector, [solvay_rgb])
        (big_faces,) = detect_faces(detector, [big])
        assert len(big_faces) >= SOLVAY_FACES - 2
        expected = _boxes(small_faces) * 2
        # Face boxes here are ~90 px wide at full resolution; a searched copy at 0.38x sees them at 34 px.
        assert np.median(_match(_boxes(big_faces), expected)) < 6.0
        assert _match(_boxes(big_faces), expected).max() < 15.0

    def test_search_copies_made_ahead(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """Search copies made beforehand give the same faces; a copy of the wrong size is refused."""
        big = cv2.resize(solvay_rgb, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
        copies = [search_copy(big), search_copy(solvay_rgb)]
        assert max(copies[0].shape[:2]) == 1000 and copies[1] is solvay_rgb
        expected = detect_faces(detector, [big, solvay_rgb])
        got = detect_faces(detector, [big, solvay_rgb], search=copies)
        assert [_boxes(f).tolist() for f in expected] == [_boxes(f).tolist() for f in got]
        with pytest.raises(ValueError, match="does not match"):
            detect_faces(detector, [big], search=[solvay_rgb])

    def test_batch_equals_single(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """Images of different sizes detected in one call give the faces each gives alone."""
        images = [
            solvay_rgb,
            np.ascontiguousarray(solvay_rgb[100:400, 250:800]),
            cv2.resize(solvay_rgb, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA),
            np.ascontiguousarray(solvay_rgb[:300, 600:1100]),  # same bucket as the second
        ]
        together = detect_faces(detector, images)
        for image, faces in zip(images, together, strict=True):
            (alone,) = detect_faces(detector, [image])
            assert len(alone) == len(faces) > 0
            np.testing.assert_allclose(_boxes(faces), _boxes(alone), atol=1e-2)
            np.testing.assert_allclose([f.score for f in faces], [f.score for f in alone], atol=1e-4)

    def test_one_batch_mixing_0_1_and_29_faces(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """One bucket batch of images with 29, 0, 1 and (mirrored) 29 faces gives each image exactly its own faces."""
        (faces,) = detect_faces(detector, [solvay_rgb])
        # The mirrored copy is a view with a negative stride, as callers may pass.
        images = [solvay_rgb, np.full_like(solvay_rgb, 128), _one_face(solvay_rgb, faces[0]), solvay_rgb[:, ::-1]]
        together = detect_faces(detector, images)
        assert [len(f) for f in together] == [SOLVAY_FACES, 0, 1, SOLVAY_FACES]
        for image, got in zip(images, together, strict=True):
            (alone,) = detect_faces(detector, [image])
            _assert_same_faces(got, alone)
        # The mirrored copy's faces are the photo's own, mirrored: no face leaked between images.
        w = solvay_rgb.shape[1]
        mirrored = _boxes(together[3])[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [w, 0, w, 0]
        assert _match(mirrored, _boxes(together[0])).max() < 10.0  # the network is not exactly mirror-symmetric

    def test_limits_apply_per_image_in_a_batch(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """``max_faces`` and ``min_face_size`` cut each image of a batch on its own, as alone."""
        (faces,) = detect_faces(detector, [solvay_rgb])
        small = _one_face(solvay_rgb, faces[-1])
        images = [solvay_rgb, _one_face(solvay_rgb, faces[0]), small, np.ascontiguousarray(solvay_rgb[:, ::-1])]
        capped = detect_faces(detector, images, max_faces=5)
        assert [len(f) for f in capped] == [5, 1, 1, 5]
        for image, got in zip(images, capped, strict=True):
            (alone,) = detect_faces(detector, [image])
            _assert_same_faces(got, alone[:5])
        cut = (faces[0].size + faces[-1].size) / 2
        sized = detect_faces(detector, images, min_face_size=cut)
        assert len(sized[1]) == 1 and sized[2] == []
        assert 0 < len(sized[0]) < SOLVAY_FACES
        for image, got in zip(images, sized, strict=True):
            assert all(f.size >= cut for f in got)
            (alone,) = detect_faces(detector, [image])
            _assert_same_faces(got, [f for f in alone if f.size >= cut])

    def test_order_is_largest_first(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """Faces come largest first, and the same image always gives the same order."""
        (faces,) = detect_faces(detector, [solvay_rgb])
        sizes = [f.size for f in faces]
        assert sizes == sorted(sizes, reverse=True)
        (again,) = detect_faces(detector, [solvay_rgb])
        np.testing.assert_array_equal(_boxes(faces), _boxes(again))

    def test_max_faces_keeps_the_largest(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """``max_faces`` keeps the largest faces."""
        (faces,) = detect_faces(detector, [solvay_rgb])
        (five,) = detect_faces(detector, [solvay_rgb], max_faces=5)
        np.testing.assert_array_equal(_boxes(five), _boxes(faces[:5]))

    def test_min_face_size_and_confidence(self, detector: torch.nn.Module, solvay_rgb: np.ndarray) -> None:
        """Faces smaller than ``min_face_size`` are dropped; a higher confidence never finds more."""
        (faces,) = detect_faces(detector, [solvay_rgb])
        cut = float(np.median([f.size for f in faces]))
        (big,) = detect_faces(detector, [solvay_rgb], min_face_size=cut)
        assert 0 < len(big) < len(faces)
        assert all(f.size >= cut for f in big)
        (strict,) = detect_faces(detector, [solvay_rgb], confidence=0.9999)
        assert len(strict) <= len(faces)

    def test_no_faces_in_a_plain_image(self, detector: torch.nn.Module) -> None:
        """A flat grey image has no faces."""
        assert detect_faces(detector, [np.full((200, 300, 3), 128, np.uint8)]) == [[]]

    def test_rejects_non_rgb(self, detector: torch.nn.Module) -> None:
        """Gray or float images are refused rather than misread."""
        with pytest.raises(ValueError):
            detect_faces(detector, [np.zeros((10, 10), np.uint8)])
