"""Tests for gpen_engine.masks: GPEN's rectangle and parsing masks, blurred as the official code does."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gpen_engine.masks import (
    FACE_CLASSES,
    SKIN_CLASSES,
    face_mask_from_labels,
    gaussian_blur,
    load_parser,
    parse_masks,
    rectangle_mask,
    skin_mask_from_labels,
)
from gpen_engine.types import ModelFileError


def _official_blur(mask: np.ndarray) -> np.ndarray:
    """GPEN's blur: GaussianBlur 101x101, sigma 4, twice (OpenCV default border)."""
    return cv2.GaussianBlur(cv2.GaussianBlur(mask, (101, 101), 4), (101, 101), 4)


class TestBlur:
    def test_equals_opencv(self) -> None:
        """The separable device blur equals OpenCV's 101x101 Gaussian applied twice."""
        rng = np.random.default_rng(0)
        mask = (rng.random((512, 512)) > 0.6).astype(np.float32)
        ours = gaussian_blur(torch.from_numpy(mask)[None, None])[0, 0].numpy()
        assert np.abs(ours - _official_blur(mask)).max() < 1e-5


class TestRectangleMask:
    def test_equals_official_at_512(self) -> None:
        """At 512 px the mask is GPEN's: rectangle 26..486, blurred twice."""
        ref = np.zeros((512, 512), np.float32)
        cv2.rectangle(ref, (26, 26), (486, 486), (1, 1, 1), -1, cv2.LINE_AA)
        ours = rectangle_mask(512)[0, 0].numpy()
        assert np.abs(ours - _official_blur(ref)).max() < 1e-5

    def test_scales_with_the_model(self) -> None:
        """At 256 px it is the 512 px mask resized: full in the middle, zero at the corners."""
        m = rectangle_mask(256)[0, 0]
        assert m.shape == (256, 256)
        assert m[128, 128] == pytest.approx(1.0, abs=1e-5)
        assert m[0, 0] < 1e-4
        ref = np.zeros((512, 512), np.float32)
        cv2.rectangle(ref, (26, 26), (486, 486), (1, 1, 1), -1, cv2.LINE_AA)
        ref = cv2.resize(_official_blur(ref), (256, 256), interpolation=cv2.INTER_AREA)
        assert np.abs(m.numpy() - ref).max() < 0.02


class TestParsingMasks:
    def _labels(self) -> torch.Tensor:
        """Left third hat, middle skin, right third cloth; a nose patch; an eye patch."""
        labels = torch.full((1, 512, 512), 1, dtype=torch.long)
        labels[:, :, :170] = 14
        labels[:, :, 342:] = 18
        labels[:, 200:260, 230:280] = 2
        labels[:, 150:180, 200:240] = 4
        return labels

    def test_face_classes_are_the_official_ones(self) -> None:
        """Everything but background, hat and cloth is pasted."""
        assert set(FACE_CLASSES) == set(range(19)) - {0, 14, 18}
        assert set(SKIN_CLASSES) <= set(FACE_CLASSES)

    def test_hat_and_cloth_are_left_out(self) -> None:
        """The mask is ~1 on skin and ~0 on hat and cloth."""
        m = face_mask_from_labels(self._labels(), 512)[0, 0]
        assert m[256, 256] > 0.99
        assert m[256, 60] < 1e-3 and m[256, 450] < 1e-3

    def test_border_is_cleared(self) -> None:
        """A face filling the whole crop still fades to zero at the crop's edge (26 px border)."""
        labels = torch.ones((1, 512, 512), dtype=torch.long)
        m = face_mask_from_labels(labels, 512)[0, 0]
        ref = np.zeros((512, 512), np.float32)
        ref[26:-26, 26:-26] = 1
        assert np.abs(m.numpy() - _official_blur(ref)).max() < 1e-5
        assert m[0, 256] < 1e-4

    def test_skin_mask_is_skin_only(self) -> None:
        """The skin mask holds skin and nose, not eyes, hat or cloth."""
        s = skin_mask_from_labels(self._labels(), 512)[0, 0]
        assert s[256, 256] == 1 and s[230, 250] == 1
        assert s[165, 220] == 0 and s[256, 60] == 0 and s[256, 450] == 0

    def test_masks_resize_to_the_model(self) -> None:
        """Masks built at 512 px come out at the crop size."""
        labels = self._labels()
        assert face_mask_from_labels(labels, 256).shape == (1, 1, 256, 256)
        assert skin_mask_from_labels(labels, 1024).shape == (1, 1, 1024, 1024)


class _FixedParser(torch.nn.Module):
    """A stand-in parser that labels every pixel with one class (the real one needs its weights)."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(tuple(x.shape))
        assert x.min() >= -1 and x.max() <= 1
        logits = torch.zeros((x.shape[0], 19, *x.shape[2:]))
        logits[:, self.label] = 1
        return logits, x


class TestParseMasks:
    def test_parser_reads_512_px_in_minus_one_to_one(self) -> None:
        """Faces of any size reach the parser at 512 px in [-1, 1]; masks come back at the face size."""
        parser = _FixedParser(label=1)
        mask, skin = parse_masks(parser, torch.rand(3, 3, 128, 128))
        assert parser.seen == [(3, 3, 512, 512)]
        assert mask.shape == skin.shape == (3, 1, 128, 128)
        assert skin.min() == 1 and mask[:, :, 64, 64].min() > 0.99

    def test_background_gives_an_empty_mask(self) -> None:
        """A crop the parser calls background gets no paste mask and no skin."""
        mask, skin = parse_masks(_FixedParser(label=0), torch.rand(1, 3, 64, 64))
        assert mask.max() == 0 and skin.max() == 0


class TestLoadParser:
    def test_loads_by_path(self, tmp_path: Path) -> None:
        """A ParseNet state dict (with or without ``module.``) loads strictly from a path."""
        from facexlib.parsing.parsenet import ParseNet

        state = ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict()
        path = tmp_path / "parser.pth"
        torch.save({"module." + k: v for k, v in state.items()}, path)
        model = load_parser(path, "cpu")
        assert not model.training
        key = next(iter(state))
        torch.testing.assert_close(model.state_dict()[key], state[key])

    def test_wrong_file_is_a_model_file_error(self, tmp_path: Path, detector_path: Path) -> None:
        """Detector weights, garbage and a missing file are refused as model file errors."""
        with pytest.raises(ModelFileError):
            load_parser(detector_path, "cpu")
        bad = tmp_path / "bad.pth"
        bad.write_bytes(b"\x00" * 10)
        with pytest.raises(ModelFileError):
            load_parser(bad, "cpu")
        with pytest.raises(ModelFileError):
            load_parser(tmp_path / "missing.pth", "cpu")
