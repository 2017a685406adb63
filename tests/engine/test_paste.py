"""Tests for gpen_engine.paste: faces go back only where their masks are, the rest stays byte-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpen_engine import align
from gpen_engine.align import face_matrices, footprint, template
from gpen_engine.masks import rectangle_mask
from gpen_engine.paste import clusters, face_windows, paste_faces

S = 64


def _shift(x0: float, y0: float, scale: float = 1.0) -> np.ndarray:
    """Image -> crop matrix whose crop is the image square at (x0, y0), ``S / scale`` px wide."""
    return np.array([[scale, 0.0, -x0 * scale], [0.0, scale, -y0 * scale]])


def _image(h: int = 200, w: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _flat(value: tuple[float, float, float], n: int = 1) -> torch.Tensor:
    return torch.tensor(value).view(1, 3, 1, 1).expand(n, 3, S, S).clone()


class TestPaste:
    def test_background_is_byte_identical(self) -> None:
        """Pixels outside every face's window, and inside it where the mask is zero, keep their bytes."""
        image = _image()
        lms = np.stack([
            (template(512) - 256) * 0.15 + np.array([80.0, 70.0]),
            (template(512) - 256) * 0.1 + np.array([220.0, 130.0]),
        ])
        mats = face_matrices(lms, S)
        crops = torch.rand(2, 3, S, S)
        masks = rectangle_mask(S).expand(2, -1, -1, -1)
        out = paste_faces(image, crops, masks, mats)
        changed = np.any(out != image, axis=-1)
        inside = np.zeros_like(changed)
        for x0, y0, x1, y1 in face_windows(mats, S, image.shape[:2]):
            inside[y0:y1, x0:x1] = True
        assert changed.any()
        assert not changed[~inside].any()
        assert changed.sum() < inside.sum()  # mask edges fade out before the window's edge

    def test_exact_blend_under_a_shift(self) -> None:
        """With a pure shift the pasted pixel is round(original * (1 - m) + face * m)."""
        image = _image()
        crops = _flat((0.2, 0.4, 0.6))
        masks = torch.full((1, 1, S, S), 0.25)
        out = paste_faces(image, crops, masks, _shift(100, 50)[None])
        region = image[50 : 50 + S, 100 : 100 + S].astype(np.float64)
        face = np.array([0.2, 0.4, 0.6]) * 255
        expected = np.clip(np.round(region * 0.75 + face * 0.25), 0, 255)
        np.testing.assert_array_equal(out[51 : 49 + S, 101 : 99 + S], expected[1:-1, 1:-1])

    def test_larger_mask_wins(self) -> None:
        """Where two faces overlap, each pixel takes the face whose mask is larger there (max composite)."""
        image = np.zeros((120, 160, 3), np.uint8)
        red, blue = _flat((1.0, 0.0, 0.0)), _flat((0.0, 0.0, 1.0))
        first = torch.full((1, 1, S, S), 0.6)
        second = torch.full((1, 1, S, S), 0.3)
        second[..., :, 40:] = 0.9  # the right part of the second face is stronger than the first
        mats = np.stack([_shift(40, 30), _shift(60, 30)])
        out = paste_faces(image, torch.cat([red, blue]), torch.cat([first, second]), mats)
        # Overlap spans x 60..103. Left of x = 100 the first face (0.6) beats the second (0.3).
        np.testing.assert_array_equal(out[60, 70], [round(255 * 0.6), 0, 0])
        # From x = 101 the second face's 0.9 wins.
        np.testing.assert_array_equal(out[60, 102], [0, 0, round(255 * 0.9)])
        # Only the first face reaches x = 50; only the second reaches x = 110.
        np.testing.assert_array_equal(out[60, 50], [round(255 * 0.6), 0, 0])
        np.testing.assert_array_equal(out[60, 110], [0, 0, round(255 * 0.9)])

    def test_order_decides_ties(self) -> None:
        """On equal masks the earlier face keeps the pixel, as in GPEN (strictly larger wins)."""
        image = np.zeros((100, 100, 3), np.uint8)
        mask = torch.full((2, 1, S, S), 0.5)
        out = paste_faces(image, torch.cat([_flat((1, 0, 0)), _flat((0, 1, 0))]), mask,
                          np.stack([_shift(10, 10), _shift(20, 20)]))
        np.testing.assert_array_equal(out[40, 40], [128, 0, 0])

    @pytest.mark.parametrize("backend", ["opencv", "torch"])
    def test_float_noise_does_not_pick_the_winner(self, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Two rotated faces whose masks are both ~1 in their overlap: the earlier face keeps all of it.

        The warp's rounding (grid_sample, the GPU path) leaves one mask at 1.0 and the other at
        0.99999994 at scattered pixels; those must not switch faces (salt-and-pepper between them).
        """
        monkeypatch.setattr(align, "_backend", lambda t, b: backend)
        size = 512
        pts = [(template(512) - 256) * 0.5 @ np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]).T + c
               for a, c in ((0.0, (300, 300)), (0.2, (360, 320)))]
        mats = face_matrices(np.stack(pts), size)
        crops = torch.stack([torch.full((3, size, size), 0.4), torch.full((3, size, size), 0.44)])
        masks = rectangle_mask(size).expand(2, -1, -1, -1)
        out = paste_faces(np.full((700, 700, 3), 128, np.uint8), crops, masks, mats)
        core = out[250:400, 300:400, 0]  # inside both faces' full-mask areas
        assert (core == 102).all(), np.unique(core, return_counts=True)

    def test_strength_scales_the_mask(self) -> None:
        """Strength 0.5 moves each pixel half as far towards the face; 0 returns the input bytes."""
        image = np.full((100, 100, 3), 100, np.uint8)
        crops, masks, mats = _flat((1, 1, 1)), torch.ones((1, 1, S, S)), _shift(10, 10)[None]
        half = paste_faces(image, crops, masks, mats, strength=0.5)
        np.testing.assert_array_equal(half[40, 40], [178, 178, 178])  # 100 + 0.5 * 155 = 177.5 -> 178
        np.testing.assert_array_equal(paste_faces(image, crops, masks, mats, strength=0.0), image)

    def test_input_is_not_modified(self) -> None:
        """Pasting returns a new image and leaves the input alone (it may be read-only)."""
        image = _image()
        image.flags.writeable = False
        before = image.copy()
        out = paste_faces(image, _flat((1, 1, 1)), torch.ones((1, 1, S, S)), _shift(10, 10)[None])
        np.testing.assert_array_equal(image, before)
        assert out.shape == image.shape and out.dtype == np.uint8

    def test_face_outside_the_image(self) -> None:
        """A face whose crop lies off the image changes nothing."""
        image = _image()
        out = paste_faces(image, _flat((1, 1, 1)), torch.ones((1, 1, S, S)), _shift(1000, 1000)[None])
        np.testing.assert_array_equal(out, image)
        assert footprint(_shift(1000, 1000), S, image.shape[:2])[2:] == (300, 200)

    def test_scaled_face_window_is_local(self) -> None:
        """A crop covering 32 px of image only changes pixels near those 32 px."""
        image = _image()
        mat = _shift(100, 100, scale=2.0)[None]
        out = paste_faces(image, _flat((1, 1, 1)), torch.ones((1, 1, S, S)), mat)
        ys, xs = np.nonzero(np.any(out != image, axis=-1))
        assert ys.min() >= 99 and ys.max() <= 132 and xs.min() >= 99 and xs.max() <= 132


class TestClusters:
    def test_overlapping_windows_group_far_ones_do_not(self) -> None:
        """A chain of overlapping windows is one group; a far window is its own; groups never overlap."""
        windows = [(0, 0, 10, 10), (8, 8, 20, 20), (18, 0, 30, 9), (100, 100, 110, 110)]
        groups = clusters(windows)
        assert sorted(members for _, members in groups) == [[0, 1, 2], [3]]
        assert (0, 0, 30, 20) in [w for w, _ in groups]

    def test_group_windows_are_disjoint(self) -> None:
        """A face overlapping only the union of others' windows joins their group."""
        # 0 and 1 overlap; their union (0..20 x 0..20) reaches 2's window, which neither alone does.
        windows = [(0, 0, 12, 12), (10, 10, 20, 20), (15, 0, 25, 8), (0, 15, 8, 25)]
        groups = clusters(windows)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                wa, wb = groups[a][0], groups[b][0]
                assert not (wa[0] < wb[2] and wb[0] < wa[2] and wa[1] < wb[3] and wb[1] < wa[3])
        assert [m for _, m in groups] == [[0, 1, 2, 3]]

    def test_empty_windows_are_dropped(self) -> None:
        """A face wholly off the image is in no group."""
        assert clusters([(5, 5, 5, 9), (0, 0, 4, 4)]) == [((0, 0, 4, 4), [1])]

    def test_far_faces_paste_as_one(self) -> None:
        """Pasting far-apart faces by groups gives the same image as pasting them one by one."""
        image = _image(300, 400)
        crops = torch.rand(2, 3, S, S)
        masks = rectangle_mask(S).expand(2, -1, -1, -1)
        mats = np.stack([_shift(10, 10), _shift(300, 200)])
        both = paste_faces(image, crops, masks, mats)
        one_by_one = paste_faces(paste_faces(image, crops[:1], masks[:1], mats[:1]), crops[1:], masks[1:], mats[1:])
        np.testing.assert_array_equal(both, one_by_one)
