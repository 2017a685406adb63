"""The seam between the daemon and the GPU: submit a batch of images for one preset, get results back.

Only this module calls the engine's Restorer. A distributed executor (e.g. one Ray actor per GPU holding the
models) can replace LocalExecutor without touching watching, readiness, the job table or publishing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from daemon.faults import FailPoints
from gpen_engine.restorer import Restorer, WorkingImage
from gpen_engine.types import EngineError, RestoredImage

Outcome = RestoredImage | EngineError


class Executor(Protocol):
    def run(self, preset: str, images: Sequence[np.ndarray | WorkingImage]) -> list[Outcome]:
        """Restore ``images`` with ``preset``; one outcome per image, in order.

        Raises only for failures of the whole batch (device lost, out of memory after every retry).
        """
        ...

    def batch_cap(self, preset: str) -> int: ...


@dataclass
class LocalExecutor:
    """Runs batches on this process's device, one at a time (the caller is the single device thread)."""

    restorers: Mapping[str, Restorer]
    failpoints: FailPoints

    def run(self, preset: str, images: Sequence[np.ndarray | WorkingImage]) -> list[Outcome]:
        self.failpoints.hit("generate")
        return self.restorers[preset].restore(list(images))

    def batch_cap(self, preset: str) -> int:
        """Faces per generator call now: the preset's batch size, lowered while out-of-memory errors last."""
        return self.restorers[preset].cap.current
