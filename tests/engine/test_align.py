"""Tests for gpen_engine.align: GPEN's template, the similarity fit and the device warps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from gpen_engine.align import (
    GPEN_TEMPLATE_512,
    face_matrices,
    footprint,
    image_window,
    invert_affine,
    similarity_transform,
    template,
    warp_back,
    warp_crops,
)


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference: Umeyama (1991) similarity with scaling, by SVD of the cross-covariance."""
    ms, md = src.mean(0), dst.mean(0)
    p, q = src - ms, dst - md
    u, s, vt = np.linalg.svd(q.T @ p / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ d @ vt
    scale = np.trace(np.diag(s) @ d) / (p**2).sum(1).mean()
    return np.hstack([scale * rot, (md - scale * rot @ ms)[:, None]])


def _similar(points: np.ndarray, angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return scale * points @ np.array([[c, -s], [s, c]]).T + np.array(shift)


def _smooth_image(h: int = 480, w: int = 640, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)).astype(np.float32), (0, 0), 4)


def _face_landmarks(centre: tuple[float, float], face: float, angle: float) -> np.ndarray:
    """Landmarks of a face about ``face`` px wide, rotated by ``angle``."""
    return _similar(template(512) - 256, angle, face / 512 * 2.2, centre)


class TestTemplate:
    def test_official_values_at_512(self) -> None:
        """The 512 px template is GPEN's, and other sizes scale it linearly."""
        np.testing.assert_allclose(template(512)[0], [202.04, 242.88])
        np.testing.assert_allclose(template(512)[4], [300.89, 366.34])
        np.testing.assert_allclose(template(256), GPEN_TEMPLATE_512 / 2)
        np.testing.assert_allclose(template(1024), GPEN_TEMPLATE_512 * 2)


class TestSimilarity:
    def test_recovers_an_exact_similarity(self) -> None:
        """Landmarks that are an exact similarity of the template map onto it exactly."""
        ref = template(512)
        src = _similar(ref, 0.4, 0.3, (120.0, -35.0))
        m = similarity_transform(src, ref)
        np.testing.assert_allclose(np.c_[src, np.ones(5)] @ m.T, ref, atol=1e-9)

    def test_equals_umeyama_on_noisy_points(self) -> None:
        """On noisy landmarks the closed form equals Umeyama's SVD estimate."""
        rng = np.random.default_rng(1)
        ref = template(512)
        for _ in range(20):
            src = _similar(ref, rng.uniform(-3, 3), rng.uniform(0.05, 4), tuple(rng.uniform(-500, 500, 2)))
            src = src + rng.normal(0, 5, src.shape)
            np.testing.assert_allclose(similarity_transform(src, ref), _umeyama(src, ref), atol=1e-8)

    def test_never_reflects(self) -> None:
        """A mirrored face still gets a proper rotation (positive determinant), as with Umeyama."""
        ref = template(512)
        mirrored = ref * np.array([-1.0, 1.0])
        m = similarity_transform(mirrored, ref)
        assert np.linalg.det(m[:, :2]) > 0
        np.testing.assert_allclose(m, _umeyama(mirrored, ref), atol=1e-8)

    def test_inverse(self) -> None:
        """invert_affine undoes a transform."""
        m = similarity_transform(_similar(template(512), 1.0, 0.5, (10, 20)), template(512))
        back = invert_affine(m)
        pts = np.random.default_rng(0).uniform(0, 500, (7, 2))
        np.testing.assert_allclose(np.c_[np.c_[pts, np.ones(7)] @ m.T, np.ones(7)] @ back.T, pts, atol=1e-9)

    def test_degenerate_landmarks_are_refused(self) -> None:
        """Five identical points have no orientation or scale."""
        with pytest.raises(ValueError):
            similarity_transform(np.ones((5, 2)), template(512))


class TestWarps:
    def test_torch_warp_matches_opencv(self) -> None:
        """Batched grid_sample crops equal cv2.warpAffine (bilinear, pixel centres at integers)."""
        image = _smooth_image()
        lms = np.stack([_face_landmarks((200, 180), 120, 0.3), _face_landmarks((470, 300), 60, -0.7)])
        mats = face_matrices(lms, 256)
        crops = warp_crops(torch.from_numpy(image), mats, 256, backend="torch")
        for crop, m in zip(crops, mats, strict=True):
            ref = cv2.warpAffine(image, m, (256, 256), flags=cv2.INTER_LINEAR)
            diff = np.abs(crop.permute(1, 2, 0).numpy() - ref)
            assert diff.max() < 0.05
            assert diff.mean() < 1e-3

    def test_backends_agree_on_uint8(self) -> None:
        """The OpenCV path (CPU) and the grid_sample path (GPU) give the same crops from uint8 pixels."""
        image = _smooth_image().round().astype(np.uint8)
        mats = face_matrices(_face_landmarks((300, 240), 150, 0.2)[None], 128)
        a = warp_crops(torch.from_numpy(image), mats, 128, backend="torch")
        b = warp_crops(torch.from_numpy(image), mats, 128, backend="opencv")
        assert (a - b).abs().max() <= 1.0  # OpenCV rounds its uint8 output

    def test_window_equals_full_image(self) -> None:
        """Cropping from an uploaded window around the face gives the crop of the full image."""
        image = _smooth_image()
        mats = face_matrices(_face_landmarks((320, 200), 80, 0.5)[None], 128)
        win = footprint(mats[0], 128, image.shape[:2])
        part = image_window(image, win, torch.device("cpu"))
        for backend in ("torch", "opencv"):
            full = warp_crops(torch.from_numpy(image), mats, 128, backend=backend)
            windowed = warp_crops(part, mats, 128, origin=win[:2], backend=backend)
            assert (full - windowed).abs().max() < 1e-2

    def test_landmarks_land_on_the_template(self) -> None:
        """Bright dots at the landmarks appear at the template positions in the crop."""
        image = np.zeros((400, 400, 3), np.float32)
        lms = _face_landmarks((200, 210), 100, 0.6)
        for x, y in lms:
            cv2.circle(image, (round(x), round(y)), 3, (255, 255, 255), -1)
        crop = warp_crops(torch.from_numpy(image), face_matrices(lms[None], 512), 512, backend="torch")[0, 0]
        for x, y in template(512):
            patch = crop[round(y) - 2 : round(y) + 3, round(x) - 2 : round(x) + 3]
            assert patch.mean() > 200

    def test_warp_back_inverts_warp(self) -> None:
        """Cropping and warping back returns the face region of a smooth image."""
        image = _smooth_image()
        mats = face_matrices(_face_landmarks((320, 240), 140, 0.25)[None], 512)
        crop = warp_crops(torch.from_numpy(image), mats, 512, backend="torch")[0]
        win = footprint(mats[0], 512, image.shape[:2])
        back = warp_back(crop, mats[0], win, backend="torch").permute(1, 2, 0).numpy()
        x0, y0, _, _ = win
        core = back[240 - y0 - 40 : 240 - y0 + 40, 320 - x0 - 40 : 320 - x0 + 40]
        orig = image[200:280, 280:360]
        assert np.abs(core - orig).mean() < 0.5

    def test_footprint_holds_everything_warp_back_touches(self) -> None:
        """Outside a face's footprint, warping its crop back writes nothing."""
        image_hw = (300, 400)
        mats = face_matrices(_face_landmarks((150, 140), 70, 1.1)[None], 64)
        ones = torch.ones((1, 64, 64))
        whole = warp_back(ones, mats[0], (0, 0, 400, 300), backend="torch")[0]
        x0, y0, x1, y1 = footprint(mats[0], 64, image_hw)
        outside = whole.clone()
        outside[y0:y1, x0:x1] = 0
        assert whole.sum() > 0 and outside.abs().max() == 0

    def test_footprint_is_clipped(self) -> None:
        """A face at the image corner gets a window clipped to the image."""
        mats = face_matrices(_face_landmarks((5, 5), 200, 0.0)[None], 256)
        x0, y0, x1, y1 = footprint(mats[0], 256, (100, 100))
        assert (x0, y0) == (0, 0) and x1 <= 100 and y1 <= 100

    def test_read_only_image_uploads_without_warning(self) -> None:
        """A read-only array (as decoders hand out) uploads without torch's non-writable warning."""
        image = np.zeros((20, 30, 3), np.uint8)
        image.flags.writeable = False
        part = image_window(image, (5, 2, 25, 12), torch.device("cpu"))
        assert part.shape == (10, 20, 3)
