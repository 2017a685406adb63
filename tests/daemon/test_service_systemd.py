"""The real daemon speaks systemd's notify protocol to a socket the test owns (issue 5's "done when")."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.daemon.harness import Daemon, face_photo, have_shared_data, write_config

pytestmark = [
    pytest.mark.skipif(not have_shared_data(), reason="needs ../shared (detector weights, Solvay photo)"),
]

try:
    from systemd import daemon as _sd  # noqa: F401

    HAVE_SYSTEMD_PYTHON = True
except ImportError:
    HAVE_SYSTEMD_PYTHON = False

needs_systemd_python = pytest.mark.skipif(
    not HAVE_SYSTEMD_PYTHON, reason="systemd-python not installed (pip install 'gpen-watch[systemd]')"
)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; remembers every message with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 90.0, after: float = 0.0) -> float:
        end = time.monotonic() + timeout
        while True:
            for at, fields in self.messages:
                if at >= after and key in fields and (value is None or fields[key] == value):
                    return at
            if time.monotonic() > end:
                raise AssertionError(f"no {key}={value} within {timeout} s; got {self.messages[-10:]}")
            self.pump(0.2)

    def since(self, at: float, key: str) -> list[dict[str, str]]:
        return [f for t, f in self.messages if t >= at and key in f]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    # AF_UNIX paths are limited to ~108 bytes: keep it short.
    path = Path(f"/tmp/gw-notify-{os.getpid()}-{time.monotonic_ns()}.sock")
    sock = NotifySocket(path)
    yield sock
    sock.close()
    path.unlink(missing_ok=True)


def _start(config: Path, notify: NotifySocket, **env: str) -> Daemon:
    return Daemon(config, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000", **env}).start()


@needs_systemd_python
def test_ready_status_watchdog_reload_and_stop(tmp_path, notify):
    """READY after warm-up, STATUS and WATCHDOG while alive, RELOADING+MONOTONIC_USEC then READY on SIGHUP, STOPPING."""
    config, layout = write_config(tmp_path)
    daemon = _start(config, notify)
    try:
        ready_at = notify.wait_for("READY", "1")
        assert "warm-up done" in daemon.log_text(), "READY=1 came before the warm-up batch"
        notify.pump(3.0)
        assert len(notify.since(ready_at, "WATCHDOG")) >= 3
        assert notify.since(ready_at, "STATUS"), "no STATUS= line"
        assert "queued" in notify.since(ready_at, "STATUS")[-1]["STATUS"]

        # A valid new config: RELOADING with a monotonic timestamp, then READY again; the new preset applies.
        config.write_text(config.read_text().replace("batch_size = 4", "batch_size = 2"))
        hup_at = time.monotonic()
        daemon.signal(signal.SIGHUP)
        reload_at = notify.wait_for("RELOADING", "1", after=hup_at)
        reloading = notify.since(hup_at, "RELOADING")[0]
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify.wait_for("READY", "1", after=reload_at)
        assert "configuration reloaded" in daemon.log_text()

        # An invalid new config is rejected: the old one keeps running and STATUS says why.
        config.write_text(config.read_text() + "\nmax_batch_delay = -5\n")
        hup_at = time.monotonic()
        daemon.signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1", after=hup_at)
        notify.wait_for("READY", "1", after=hup_at)
        rejected = [f["STATUS"] for f in notify.since(hup_at, "STATUS") if "reload rejected" in f["STATUS"]]
        assert rejected and "max_batch_delay" in rejected[0]
        assert daemon.running()

        # Still working after both reloads.
        (layout.hot["a"] / "after-reload.jpg").write_bytes(face_photo(5))
        deadline = time.monotonic() + 60
        while not (layout.out["a"] / "after-reload.jpg").exists():
            assert time.monotonic() < deadline, daemon.log_text()[-3000:]
            notify.pump(0.3)

        stop_at = time.monotonic()
        daemon.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1", after=stop_at, timeout=30)
        assert 0 == daemon.wait(60)
    finally:
        if daemon.running():
            daemon.kill()


@needs_systemd_python
def test_watchdog_pings_stop_when_the_gpu_call_is_wedged(tmp_path, notify):
    """A generator call that never returns stops the WATCHDOG=1 pings, so systemd restarts the service."""
    config, layout = write_config(tmp_path)
    daemon = _start(config, notify, GPEN_WATCH_FAILPOINTS="generate=hang")
    try:
        ready_at = notify.wait_for("READY", "1")
        notify.pump(2.0)
        assert len(notify.since(ready_at, "WATCHDOG")) >= 2
        (layout.hot["a"] / "wedge.jpg").write_bytes(face_photo(6))
        # The file needs ~0.5 s to be ready and the batch then hangs; give the stall time to be seen.
        notify.pump(5.0)
        quiet_from = time.monotonic()
        notify.pump(3.0)
        assert [] == notify.since(quiet_from, "WATCHDOG"), "pings went on while the device thread was wedged"
        assert "stopped making progress" in daemon.log_text()
    finally:
        daemon.kill()


def test_without_systemd_python_notify_socket_gives_one_clear_error(tmp_path, notify):
    """With NOTIFY_SOCKET set but systemd-python missing, the daemon says so plainly (and still works)."""
    config, layout = write_config(tmp_path)
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "systemd").mkdir()
    (blocker / "systemd" / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    daemon = _start(config, notify, PYTHONPATH=f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        deadline = time.monotonic() + 60
        while "gpen-watch ready" not in daemon.log_text():
            assert time.monotonic() < deadline and daemon.running(), daemon.log_text()[-3000:]
            time.sleep(0.2)
        text = daemon.log_text()
        assert "systemd-python" in text
        assert 1 == sum("systemd-python" in line for line in text.splitlines())
    finally:
        assert 0 == daemon.stop()


def _switch_to_a_new_model(config: Path, models: Path, filename: str) -> None:
    """Point preset ``test`` at a new [[models]] entry ``tiny2`` whose file is ``filename``."""
    from tests.daemon.harness import TINY_ARCH

    text = config.read_text().replace('model = "tiny"', 'model = "tiny2"', 1)
    text += '\n[[models]]\nname = "tiny2"\n' + f'path = "{filename}"\n'
    text += "".join(f"{k} = {v}\n" for k, v in TINY_ARCH.items())
    config.write_text(text)


@needs_systemd_python
def test_a_reload_that_loads_models_slowly_keeps_the_watchdog_fed(tmp_path, notify):
    """systemd's watchdog stays armed during a reload: loading new models must not starve the pings."""
    import shutil

    config, layout = write_config(tmp_path)
    daemon = _start(config, notify, GPEN_WATCH_FAILPOINTS="load=sleep:4")
    try:
        notify.wait_for("READY", "1", timeout=120)
        shutil.copyfile(tmp_path / "models" / "tiny-gpen.pth", tmp_path / "models" / "tiny2.pth")
        _switch_to_a_new_model(config, tmp_path / "models", "tiny2.pth")
        hup_at = time.monotonic()
        daemon.signal(signal.SIGHUP)
        reload_at = notify.wait_for("RELOADING", "1", after=hup_at)
        ready_at = notify.wait_for("READY", "1", after=reload_at, timeout=60)
        assert ready_at - reload_at > 3.5, "the slow load did not happen"
        pings = [at for at, f in notify.messages if "WATCHDOG" in f and reload_at - 0.5 <= at <= ready_at + 0.5]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert pings and max(gaps) < 0.9, f"watchdog gap of {max(gaps):.1f} s during the reload (WatchdogSec=1)"
        assert daemon.running()
    finally:
        assert 0 == daemon.stop()


@needs_systemd_python
def test_a_reload_that_changes_a_models_file_is_checked_and_status_says_why(tmp_path, notify):
    """A [[models]] path that changes (here to a missing file) is loaded again, not silently ignored."""
    config, layout = write_config(tmp_path)
    daemon = _start(config, notify)
    try:
        notify.wait_for("READY", "1", timeout=120)
        config.write_text(config.read_text().replace('path = "tiny-gpen.pth"', 'path = "missing.pth"'))
        hup_at = time.monotonic()
        daemon.signal(signal.SIGHUP)
        notify.wait_for("READY", "1", after=hup_at + 0.01)
        rejected = [f["STATUS"] for f in notify.since(hup_at, "STATUS") if "reload rejected" in f["STATUS"]]
        assert rejected, daemon.log_text()[-2000:]
        assert "missing weight file missing.pth" in rejected[0]
        assert "configuration reloaded" not in daemon.log_text()
    finally:
        assert 0 == daemon.stop()
