"""Tests for daemon.executor: narrowing a failed engine call down to the image that breaks it."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence

from daemon.executor import Raised, run_narrowing


class _Tensor:
    """Stands for device memory a failed call had allocated."""


def test_a_failed_call_s_memory_is_released_before_the_rest_of_the_batch_runs() -> None:
    """The error of the image that breaks the engine is kept for its message; the frames of the call it broke
    (and the tensors they hold) are not, so the good images beside it do not run on a fuller device."""
    held: list[weakref.ref[_Tensor]] = []
    alive_during: list[int] = []

    def run(part: Sequence[str]) -> list[str]:
        gc.collect()
        alive_during.append(sum(ref() is not None for ref in held))
        tensor = _Tensor()  # noqa: F841 - a local of the failing frame, as a tensor would be
        held.append(weakref.ref(tensor))
        if "bad" in part:
            try:
                raise KeyError("an earlier error")
            except KeyError as earlier:
                cause = earlier
            try:
                raise ValueError("the one being handled")
            except ValueError:  # raise X from Y while handling Z: X's cause and its context both hold the frame
                raise RuntimeError("CUDA error: an illegal memory access") from cause
        return [f"restored {p}" for p in part]

    results = run_narrowing(run, ["good", "bad", "fine"], lambda part, exc, first: None)
    assert results[0] == "restored good" and results[2] == "restored fine"
    assert isinstance(results[1], Raised) and str(results[1].error) == "CUDA error: an illegal memory access"
    assert alive_during == [0] * len(alive_during)
    gc.collect()
    assert all(ref() is None for ref in held)
