"""Tell systemd what the service is doing (sd_notify), through systemd-python when installed.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a cheap no-op. Under a ``Type=notify`` unit
without systemd-python, one error line says so once: systemd would then time the start-up out,
so the operator has to know why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from daemon.logs import get_logger

__all__ = ["Notifier"]

INSTALL_HINT = (
    "install it with: pip install 'gpen-watch[systemd]' "
    "(it builds from source: apt-get install libsystemd-dev pkg-config first)"
)


def _load_sender() -> Callable[[str], bool] | None:
    try:
        from systemd import daemon  # type: ignore[attr-defined]  # mypy takes ./systemd (unit files) for it
    except ImportError:
        return None
    return daemon.notify  # type: ignore[no-any-return]


class Notifier:
    """sd_notify messages: READY, RELOADING, STOPPING, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC.

    ``environ`` defaults to the process environment; libsystemd itself always reads
    ``NOTIFY_SOCKET`` from the real environment, so tests set it there.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, log: Any = None) -> None:
        self._env = os.environ if environ is None else environ
        self._send: Callable[[str], bool] | None = None
        if self._env.get("NOTIFY_SOCKET"):
            self._send = _load_sender()
            if self._send is None:
                (log or get_logger(__name__)).error(
                    "systemd-python is not installed: readiness, status and watchdog pings "
                    "cannot be reported to systemd (a Type=notify unit will time out); " + INSTALL_HINT,
                    notify_socket=self._env["NOTIFY_SOCKET"],
                )

    @property
    def enabled(self) -> bool:
        """Whether messages actually go to systemd."""
        return self._send is not None

    def _notify(self, *fields: str) -> bool:
        if self._send is None:
            return False
        return bool(self._send("\n".join(fields)))

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: models loaded, device verified, warm-up done."""
        return self._notify("READY=1", *([_status(status)] if status is not None else []))

    def reloading(self) -> bool:
        """A reload started (SIGHUP); systemd needs the monotonic time to match it with READY=1."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self._notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """One human-readable line for ``systemctl status``."""
        return self._notify(_status(text))

    def watchdog(self) -> bool:
        """Still alive and making progress; send at ``watchdog_interval()``."""
        return self._notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on start-up/stop (slow model loads)."""
        return self._notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is set.

        WATCHDOG_PID, when present, must name this process: a child that inherited the
        environment must not ping on its parent's behalf.
        """
        try:
            usec = int(self._env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid is not None and pid.strip() != str(os.getpid()):
            return None
        return usec / 2 / 1_000_000


def _status(text: str) -> str:
    # One line: a newline would start a new (bogus) assignment in the datagram.
    return "STATUS=" + " ".join(text.splitlines())
