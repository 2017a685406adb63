"""Logging: JSON lines with syslog priorities, bound context, dependencies routed the same way."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from daemon.logs import bind_context, configure_logging, get_logger

PREFIXED = re.compile(r"<(\d)>(\{.*\})\Z")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger and structlog back as they were, so other tests see no change."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet_levels = {name: logging.getLogger(name).level for name in ("PIL", "numba", "matplotlib")}
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    for name, lvl in quiet_levels.items():
        logging.getLogger(name).setLevel(lvl)
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[tuple[int, dict[str, object]]]:
    out = []
    for line in stream.getvalue().splitlines():
        match = PREFIXED.match(line)
        assert match, f"not a prefixed JSON line: {line!r}"
        out.append((int(match[1]), json.loads(match[2])))
    return out


@pytest.mark.usefixtures("restore_logging")
class TestJsonLines:
    def test_info_line_has_priority_and_bound_context(self) -> None:
        """An info event is one JSON line behind <6>, with bound folder/preset/batch and UTC time."""
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        with bind_context(folder="/srv/in/fast", preset="fast", batch_id=7):
            get_logger("gpen-watch.test").info("published", relpath="a b/ü.jpg", faces=3)
        get_logger("gpen-watch.test").info("outside")
        (prio, event), (_, after) = lines(stream)
        assert prio == 6
        assert {"event": "published", "relpath": "a b/ü.jpg", "faces": 3, "folder": "/srv/in/fast",
                "preset": "fast", "batch_id": 7, "level": "info"}.items() <= event.items()
        assert datetime.fromisoformat(str(event["timestamp"])).utcoffset().total_seconds() == 0
        assert "folder" not in after

    def test_stdlib_logger_goes_through_same_pipeline(self) -> None:
        """A dependency's stdlib logging call becomes the same kind of JSON line, with our context."""
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        with bind_context(batch_id=42):
            logging.getLogger("watchdog.observers").warning("queue overflow on %s", "/srv/in")
        [(prio, event)] = lines(stream)
        assert prio == 4
        assert event["event"] == "queue overflow on /srv/in"
        assert event["logger"] == "watchdog.observers"
        assert event["batch_id"] == 42

    def test_errors_and_exceptions(self) -> None:
        """Errors carry <3> (journalctl -p err finds them), critical <2>; the traceback is in the line."""
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        log = get_logger("gpen-watch.test")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            log.exception("publish failed")
        log.critical("giving up")
        (p1, e1), (p2, _) = lines(stream)
        assert (p1, p2) == (3, 2)
        assert "No space left on device" in str(e1["exception"])

    def test_level_filters_debug(self) -> None:
        """At info, debug lines from us and dependencies are dropped; at debug they appear as <7>."""
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        get_logger().debug("hidden")
        logging.getLogger("urllib3").debug("hidden too")
        assert stream.getvalue() == ""
        configure_logging("json", "debug", stream)
        get_logger().debug("shown")
        [(prio, event)] = lines(stream)
        assert (prio, event["event"]) == (7, "shown")

    def test_reconfigure_replaces_handler(self) -> None:
        """Configuring twice sends each line once, to the newest stream only."""
        first, second = io.StringIO(), io.StringIO()
        configure_logging("json", "info", first)
        configure_logging("json", "info", second)
        get_logger().info("once")
        assert first.getvalue() == ""
        assert len(lines(second)) == 1


@pytest.mark.usefixtures("restore_logging")
class TestConsole:
    def test_auto_on_a_pipe_is_json(self) -> None:
        """'auto' writes JSON when the stream is not a terminal (systemd, pipes)."""
        stream = io.StringIO()
        configure_logging("auto", "info", stream)
        get_logger().info("hello")
        assert lines(stream)[0][1]["event"] == "hello"

    def test_console_is_readable_text(self) -> None:
        """The console format is plain readable text (no colour codes off a terminal), not JSON."""
        stream = io.StringIO()
        configure_logging("console", "info", stream)
        with bind_context(preset="quality"):
            get_logger().warning("share unavailable", folder="/mnt/out")
        text = stream.getvalue()
        assert "share unavailable" in text
        assert "preset=quality" in text
        assert "\x1b[" not in text
        assert not text.startswith("<")

    def test_console_shows_a_multi_line_error_as_lines(self) -> None:
        """A config error of several lines is printed as indented lines on a terminal, not as one escaped repr."""
        error = "invalid configuration in /etc/gpen-watch/config.toml:\n  presets.fast.strenght = 20: unknown"
        stream = io.StringIO()
        configure_logging("console", "info", stream)
        get_logger().error("cannot start", error=error)
        text = stream.getvalue()
        assert "\\n" not in text and "\n      presets.fast.strenght = 20: unknown" in text

    def test_console_renders_exceptions(self) -> None:
        """A logged exception shows its traceback in console output too."""
        stream = io.StringIO()
        configure_logging("console", "info", stream)
        try:
            raise RuntimeError("CUDA error: device-side assert")
        except RuntimeError:
            get_logger().exception("batch failed")
        assert "CUDA error: device-side assert" in stream.getvalue()
        assert "Traceback" in stream.getvalue()

    def test_unknown_level_is_refused(self) -> None:
        """A misspelt level is an error, not silently 'info'."""
        with pytest.raises(ValueError):
            configure_logging("json", "verbose", io.StringIO())
