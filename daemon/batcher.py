"""Which preset's queue the worker serves next.

Folder priority decides first; waiting time ages every queue so that none starves: a queue that has waited
``aging_s`` seconds gains one priority level.
"""

from __future__ import annotations

from collections.abc import Mapping


def pick_queue(
    depths: Mapping[str, int],
    priorities: Mapping[str, int],
    waiting_since: Mapping[str, float],
    now: float,
    *,
    aging_s: float = 10.0,
) -> str | None:
    """The preset to serve next, or None when every queue is empty.

    ``waiting_since`` holds, per preset, when its queue was last served (or first became non-empty).
    Ties go to the queue that has waited longer, then to the name, so the choice is deterministic.
    """
    candidates = [name for name, depth in depths.items() if depth > 0]
    if not candidates:
        return None

    def score(name: str) -> tuple[float, float, str]:
        waited = max(0.0, now - waiting_since.get(name, now))
        return (priorities.get(name, 0) + waited / aging_s, waited, name)

    return max(candidates, key=score)
