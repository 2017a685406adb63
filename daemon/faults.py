"""Failpoints: named places where fault-injection tests make the real daemon fail on purpose.

Off unless ``GPEN_WATCH_FAILPOINTS`` is set, e.g. ``generate=raise:oom*2;publish=raise:enospc;generate=hang``:
``NAME=ACTION[:ARG][*COUNT]`` entries separated by ``;``. COUNT limits how often a point fires (default: always).
Actions: ``raise:oom`` (torch.OutOfMemoryError), ``raise:enospc`` / ``raise:eio`` (OSError), ``raise:error``
(an unexpected RuntimeError), ``sleep:SECONDS``,
``hang`` (blocks forever, as a wedged GPU call would), ``exit`` (the process dies at once, like SIGKILL).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field

ENV = "GPEN_WATCH_FAILPOINTS"


@dataclass
class _Point:
    action: str
    arg: str
    remaining: int | None


@dataclass
class FailPoints:
    points: dict[str, _Point] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FailPoints:
        spec = (environ if environ is not None else os.environ).get(ENV, "")
        return cls.parse(spec)

    @classmethod
    def parse(cls, spec: str) -> FailPoints:
        points: dict[str, _Point] = {}
        for entry in filter(None, (part.strip() for part in spec.split(";"))):
            name, _, rest = entry.partition("=")
            rest, _, count = rest.partition("*")
            action, _, arg = rest.partition(":")
            if action not in ("raise", "sleep", "hang", "exit"):
                raise ValueError(f"{ENV}: unknown action {action!r} in {entry!r}")
            points[name.strip()] = _Point(action, arg, int(count) if count else None)
        return cls(points)

    def __bool__(self) -> bool:
        return bool(self.points)

    def hit(self, name: str) -> None:
        """Fire the failpoint ``name`` if it is armed."""
        if not self.points:
            return
        with self._lock:
            point = self.points.get(name)
            if point is None or point.remaining == 0:
                return
            if point.remaining is not None:
                point.remaining -= 1
        if point.action == "sleep":
            time.sleep(float(point.arg))
        elif point.action == "hang":
            threading.Event().wait()
        elif point.action == "exit":
            os._exit(137)
        elif point.arg == "error":
            raise RuntimeError(f"unexpected failure (failpoint {name})")
        elif point.arg == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (failpoint {name})")
        else:
            code = {"enospc": errno.ENOSPC, "eio": errno.EIO}[point.arg]
            raise OSError(code, f"{os.strerror(code)} (failpoint {name})")
