"""Fixtures shared by the whole suite.

Real test data lives in ``shared/`` beside the repository (CI clones the repository with it next
door): the RetinaFace mobile0.25 detector weights (MIT) and the 1927 Solvay conference photo
(public domain, 29 faces). Weights are never committed to the repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SOLVAY_FACES = 29


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared test data folder (``../shared`` from the repository root)."""
    path = (REPO_ROOT / ".." / "shared").resolve()
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path


@pytest.fixture(scope="session")
def detector_path(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "detection_mobilenet0.25_Final.pth"
    if not path.is_file():
        pytest.skip(f"detector weights not found at {path}")
    return path


@pytest.fixture(scope="session")
def detector(detector_path: Path) -> torch.nn.Module:
    """The real RetinaFace mobile0.25 detector on the CPU (loaded once per session)."""
    from gpen_engine.detect import load_detector

    return load_detector(detector_path, "mobile0.25", "cpu")


@pytest.fixture(scope="session")
def solvay_rgb(shared_dir: Path) -> np.ndarray:
    """The Solvay 1927 photo as HxWx3 uint8 RGB (read-only: copy before changing it)."""
    with Image.open(shared_dir / "testdata" / "solvay_1927.png") as im:
        rgb = np.asarray(im.convert("RGB")).copy()
    rgb.flags.writeable = False
    return rgb
