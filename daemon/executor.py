"""The seam between the daemon and the GPU: submit a batch of images for one preset, get results back.

Only this module calls the engine's Restorer. A distributed executor (e.g. one Ray actor per GPU holding the
models) can replace LocalExecutor without touching watching, readiness, the job table or publishing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from daemon.faults import FailPoints
from gpen_engine.restorer import Restorer, WorkingImage, is_out_of_memory
from gpen_engine.types import DeviceOutOfMemory, EngineError, RestoredImage

Outcome = RestoredImage | EngineError
Item = TypeVar("Item")
Result = TypeVar("Result")


class Executor(Protocol):
    def run(self, preset: str, images: Sequence[np.ndarray | WorkingImage]) -> list[Outcome]:
        """Restore ``images`` with ``preset``; one outcome per image, in order.

        Raises only for failures of the whole batch (device lost, out of memory after every retry).
        """
        ...

    def batch_cap(self, preset: str) -> int: ...

    def check(self, preset: str) -> None:
        """Run ``preset``'s models once on blank input; raises if the device no longer computes."""
        ...


@dataclass
class LocalExecutor:
    """Runs batches on this process's device, one at a time (the caller is the single device thread)."""

    restorers: Mapping[str, Restorer]
    failpoints: FailPoints

    def run(self, preset: str, images: Sequence[np.ndarray | WorkingImage]) -> list[Outcome]:
        self.failpoints.hit("generate")
        return self.restorers[preset].restore(list(images))

    def check(self, preset: str) -> None:
        self.failpoints.hit("check")
        self.restorers[preset].warm_up()

    def batch_cap(self, preset: str) -> int:
        """Faces per generator call now: the preset's batch size, lowered while out-of-memory errors last."""
        return self.restorers[preset].cap.current


@dataclass(frozen=True)
class Raised:
    """The engine raised instead of returning this item's outcome (it was alone in its run by then)."""

    error: Exception


def run_narrowing(run: Callable[[Sequence[Item]], Sequence[Result]], items: Sequence[Item],
                  on_error: Callable[[Sequence[Item], Exception, bool], None]) -> list[Result | Raised]:
    """``run(items)``; where a call raises, its halves are run apart, down to single items.

    A failure of a whole call (a device error, out of memory after every retry, a fault one image provokes) is
    narrowed down so that an image that breaks the engine is charged alone and the good ones beside it go on.
    ``on_error(part, exc, first)`` hears of each failed call; ``first`` is the call on all of ``items``."""

    def attempt(part: Sequence[Item], first: bool) -> list[Result | Raised]:
        try:
            return list(run(part))
        except Exception as exc:
            on_error(part, exc, first)
            if len(part) == 1:
                return [Raised(_without_frames(exc))]
        half = len(part) // 2
        return attempt(part[:half], False) + attempt(part[half:], False)

    return attempt(items, True) if items else []


def _without_frames(exc: Exception) -> Exception:
    """``exc`` kept for its message only: its traceback holds the failed call's frames and, through them, its
    tensors, which would stay on the device while the rest of the batch runs (and the device test after it)."""
    seen: set[int] = set()
    chain: list[BaseException | None] = [exc]
    while chain:
        link = chain.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        link.__traceback__ = None
        chain += [link.__cause__, link.__context__]  # "raise X from Y" while handling Z: both
    return exc


def device_lost(outcomes: Sequence[object], check: Callable[[], None]) -> Exception | None:
    """The error of a device that no longer computes, or None.

    Asked after a run whose every item raised for a reason other than memory: if a blank test image fails as
    well, the device (or its driver context: CUDA errors are sticky) is gone, and the images are not to blame."""
    if not outcomes or not all(isinstance(o, Raised) and not out_of_memory(o.error) for o in outcomes):
        return None
    try:
        check()
    except Exception as exc:
        # A device too full for the test still computes (another process took its memory): not lost.
        return None if out_of_memory(exc) else exc
    return None


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device or the host running out of memory: passing trouble, retried."""
    return isinstance(exc, DeviceOutOfMemory | MemoryError) or is_out_of_memory(exc)
