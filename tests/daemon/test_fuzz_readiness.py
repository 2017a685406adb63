"""Property tests of the decode + readiness path on arbitrary and mutated image bytes (issue 6).

Whatever lands in a hot folder, the gate answers with a verdict (never an unexpected exception), and it never
calls READY bytes that the worker then cannot decode.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from functools import cache, partial
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from daemon.readiness import FAILED, NOT_YET, READY, ReadinessGate
from gpen_engine import imageio
from gpen_engine.types import InputError

MAX_PIXELS = 4_000_000


@contextlib.contextmanager
def production_warnings():
    """Pillow warns (UserWarning) about some corrupt metadata; the daemon runs with Python's default filters,
    where that is a line on stderr, not an exception. The suite turns warnings into errors; undo that here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@cache
def seeds() -> tuple[bytes, ...]:
    """Small valid images in every supported container, with alpha, palette, EXIF and 16-bit variants."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    out = []
    for fmt, mode, kw in (("JPEG", "RGB", {"quality": 80}), ("PNG", "RGBA", {}), ("PNG", "P", {}),
                          ("WEBP", "RGB", {"quality": 80}), ("WEBP", "RGB", {"lossless": True}), ("TIFF", "RGB", {}),
                          ("BMP", "RGB", {}), ("PNG", "I;16", {}), ("JPEG", "CMYK", {})):
        buf = io.BytesIO()
        im = rgb.convert(mode) if mode != "I;16" else Image.fromarray(rng.integers(0, 65535, (24, 32), np.uint16))
        im.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return tuple(out)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


inputs = st.one_of(st.binary(max_size=2048), mutated())


def _gate_verdicts(data: bytes) -> list:
    """Look at a file holding ``data`` until the gate decides (or gives up waiting)."""
    clock = Clock()
    gate = ReadinessGate(stability_delay=1.0, max_wait=5.0, clock=clock,
                         check_decodes=partial(imageio.check_complete, max_pixels=MAX_PIXELS))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.jpg"
        path.write_bytes(data)
        verdicts = []
        for _ in range(5):
            verdicts.append(gate.look(path, "k"))
            if verdicts[-1].state != NOT_YET:
                break
            clock.now += 2.0
    return verdicts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs)
def test_gate_never_raises_and_never_passes_undecodable_bytes(data):
    """Arbitrary or mutated bytes: the gate ends READY only for bytes that decode, FAILED otherwise."""
    with production_warnings():
        verdicts = _gate_verdicts(data)
    final = verdicts[-1]
    assert final.state in (READY, FAILED)
    if final.state == READY:
        assert final.data == data
        with production_warnings():
            image = imageio.decode(data, max_pixels=MAX_PIXELS)
        assert image.rgb.ndim == 3 and image.rgb.shape[2] == 3 and image.rgb.size > 0
    else:
        assert final.reason


@settings(max_examples=300, deadline=None)
@given(inputs)
def test_decode_and_check_agree_and_raise_only_input_errors(data):
    """check_complete and decode raise nothing but InputError, and accept exactly the same bytes."""
    with production_warnings():
        try:
            size = imageio.check_complete(data, max_pixels=MAX_PIXELS)
        except InputError:
            size = None
        try:
            image = imageio.decode(data, max_pixels=MAX_PIXELS)
        except InputError:
            image = None
    assert (size is None) == (image is None)
    if image is not None:
        assert size == (image.rgb.shape[1], image.rgb.shape[0])
