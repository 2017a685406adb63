"""sd_notify: real datagrams on a socket the test owns, and a clear line when systemd-python is missing."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.notify import Notifier


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """An AF_UNIX datagram socket standing in for systemd, named in NOTIFY_SOCKET."""
    pytest.importorskip("systemd.daemon", reason="needs systemd-python (pip install gpen-watch[systemd])")
    # A short directory: socket paths are limited to 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="gw-notify-", dir="/tmp"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    sock.settimeout(10)  # only so a broken sender fails the test instead of hanging it
    monkeypatch.setenv("NOTIFY_SOCKET", str(folder / "notify"))
    yield sock
    sock.close()
    shutil.rmtree(folder)


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


class TestNotifierWithSystemd:
    def test_ready_status_stopping(self, notify_socket: socket.socket) -> None:
        """READY=1 (with a status line), STATUS= and STOPPING=1 arrive as sd_notify datagrams."""
        notifier = Notifier()
        assert notifier.enabled
        assert notifier.ready("idle: 0 queued")
        assert received(notify_socket) == ["READY=1", "STATUS=idle: 0 queued"]
        assert notifier.status("processing 3 files\non cuda:0")
        assert received(notify_socket) == ["STATUS=processing 3 files on cuda:0"]
        notifier.stopping()
        assert received(notify_socket) == ["STOPPING=1"]

    def test_reloading_carries_monotonic_time(self, notify_socket: socket.socket) -> None:
        """RELOADING=1 comes with MONOTONIC_USEC= taken from CLOCK_MONOTONIC at the moment of the reload."""
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        Notifier().reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reload_line, usec_line = received(notify_socket)
        assert reload_line == "RELOADING=1"
        assert usec_line.startswith("MONOTONIC_USEC=")
        assert before <= int(usec_line.removeprefix("MONOTONIC_USEC=")) <= after

    def test_watchdog_and_extend_timeout(self, notify_socket: socket.socket) -> None:
        """WATCHDOG=1 and EXTEND_TIMEOUT_USEC= (in microseconds) are sent as systemd expects."""
        notifier = Notifier()
        notifier.watchdog()
        assert received(notify_socket) == ["WATCHDOG=1"]
        notifier.extend_timeout(90.5)
        assert received(notify_socket) == ["EXTEND_TIMEOUT_USEC=90500000"]


class TestNotifierWithoutSystemd:
    def test_no_socket_is_silent_noop(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Outside systemd nothing is sent and nothing is logged."""
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        with capture_logs() as logs:
            notifier = Notifier()
            assert not notifier.ready()
        assert not notifier.enabled
        assert logs == []

    def test_missing_module_logs_one_clear_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Under systemd without systemd-python one error says readiness is not sent and how to fix it."""
        monkeypatch.setenv("NOTIFY_SOCKET", "/run/nonexistent/notify")
        monkeypatch.setitem(sys.modules, "systemd", None)  # makes `from systemd import daemon` fail
        with capture_logs() as logs:
            notifier = Notifier()
            notifier.ready()
            notifier.watchdog()
        assert not notifier.enabled
        assert [entry["log_level"] for entry in logs] == ["error"]
        assert "gpen-watch[systemd]" in logs[0]["event"]
        assert "libsystemd-dev" in logs[0]["event"]


class TestWatchdogInterval:
    def test_half_of_watchdog_usec(self) -> None:
        """Pings are due at half the watchdog period systemd gave us."""
        assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0

    def test_pid_must_be_ours(self) -> None:
        """A WATCHDOG_PID naming another process (we inherited its environment) means no watchdog for us."""
        mine = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
        theirs = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        assert (Notifier(mine).watchdog_interval(), Notifier(theirs).watchdog_interval()) == (10.0, None)

    @pytest.mark.parametrize("value", [None, "", "0", "abc", "-5"])
    def test_absent_or_invalid(self, value: str | None) -> None:
        """No, zero or garbage WATCHDOG_USEC means no watchdog pings."""
        env = {} if value is None else {"WATCHDOG_USEC": value}
        assert Notifier(env).watchdog_interval() is None
