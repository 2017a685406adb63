"""Logging set-up: structlog for our code, the same pipeline for every stdlib logger.

Not on a terminal (systemd, a pipe): one JSON object per line, prefixed with the syslog priority
``<N>`` as sd-daemon(3) describes, so journald files each line under the right level and
``journalctl -p err`` works. On a terminal: coloured, readable lines.

Context such as the folder, preset or batch id is bound once with ``bind_context`` (contextvars)
and appears on every line logged inside that context, including lines from dependencies.

Native journald fields (sd_journal_send) are not used: the JSON line already carries every field,
``journalctl -o cat -u gpen-watch | jq`` reads them, and one output path is easier to trust.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, Literal, TextIO

import structlog
from structlog.contextvars import bound_contextvars
from structlog.typing import Processor

__all__ = ["bind_context", "configure_logging", "get_logger", "syslog_priority"]

LogFormat = Literal["auto", "json", "console"]

# Dependencies that are chatty at DEBUG about things no operator needs (PNG chunks, JIT passes).
# Libraries whose debug lines drown the service's own: watchdog logs every raw inotify event, the service's own
# reads of each file among them.
_QUIET = ("PIL", "numba", "matplotlib", "urllib3.connectionpool", "asyncio", "watchdog")


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a stdlib level: critical 2, error 3, warning 4, info 6, debug 7."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class _PriorityFormatter(structlog.stdlib.ProcessorFormatter):
    """Renders a record as JSON behind its ``<N>`` syslog priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{super().format(record)}"


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so that configuring again replaces it and leaves other handlers alone."""


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _unfold_multiline(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console only: a value of several lines (a config or start-up error) is shown as lines, not as a repr."""
    for key in [k for k, v in event.items() if k != "event" and isinstance(v, str) and "\n" in v]:
        event["event"] = f"{event['event']}\n  {key}: " + event.pop(key).replace("\n", "\n    ")
    return event


def configure_logging(fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to ``stream`` (default: stdout) in the chosen format.

    Call once, from the CLI. ``auto`` means JSON unless ``stream`` is a terminal.
    """
    stream = stream if stream is not None else sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not _is_terminal(stream))
    shared = _shared_processors()

    renderer: list[Processor]
    formatter_cls: type[structlog.stdlib.ProcessorFormatter]
    if as_json:
        renderer = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ]
        formatter_cls = _PriorityFormatter
    else:
        renderer = [_unfold_multiline, structlog.dev.ConsoleRenderer(colors=_is_terminal(stream))]
        formatter_cls = structlog.stdlib.ProcessorFormatter

    handler = _Handler(stream)
    handler.setFormatter(
        formatter_cls(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(numeric, logging.INFO))

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger fetched at import time must follow a later configure_logging().
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; ``name`` shows up as ``logger`` in every line."""
    return structlog.stdlib.get_logger(name)


@contextmanager
def bind_context(**values: Any) -> Iterator[None]:
    """Add fields (folder, preset, batch_id...) to every line logged inside the block, in this context."""
    with bound_contextvars(**values):
        yield
