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


# ``../shared`` as CI has it; ``shared/`` inside the checkout on a lent GPU machine, which gets only the checkout
# (tools/gpu-check.sh).
SHARED_DIRS = (REPO_ROOT.parent / "shared", REPO_ROOT / "shared")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared test data folder (``../shared`` from the repository root, else ``shared/`` in it)."""
    for path in SHARED_DIRS:
        if path.is_dir():
            return path.resolve()
    pytest.skip("shared test data not found at " + " or ".join(map(str, SHARED_DIRS)))


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


# A GPEN generator small enough for CPU tests (random weights via the hidden --random-weights flag), the real detector.
TINY_CLI_CONFIG = """
models_dir = "{models}"
download = false
device = "cpu"

[[models]]
name = "tiny-gpen"
path = "tiny-gpen.pth"
size = 64
channel_multiplier = 1
narrow = 0.125

[presets.tiny]
base = "low-spec"
model = "tiny-gpen"
detector = "mobile0.25"
max_long_side = 2000
precision = "fp32"
use_parsing = false
batch_size = 8
"""


@pytest.fixture
def tiny_cli_config(tmp_path: Path, detector_path: Path) -> Path:
    """A config with preset ``tiny`` (a 64 px GPEN, the real mobile0.25 detector) for `enhance`/`bench` tests."""
    path = tmp_path / "config.toml"
    path.write_text(TINY_CLI_CONFIG.format(models=detector_path.parent))
    return path
