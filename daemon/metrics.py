"""Optional Prometheus endpoint (``[metrics] enabled = true``; needs ``pip install 'gpen-watch[metrics]'``).

Exported, all prefixed ``gpen_watch_``:

* ``files{folder,state}``: job-table rows per folder and state, read from the table at scrape time;
* ``queue_depth{preset}``: jobs a worker could claim now, also read at scrape time;
* ``job_table_up``: 1 if the last scrape could read the job table;
* ``stage_seconds{stage}``: latency per stage (decode, detect, generate, paste, encode, batch, ...);
* ``batch_size``: files per GPU batch; ``batch_cap{preset}``: the current adaptive cap in faces;
* ``images_total{result}``: files finished since start, by result (done, failed, retry).

Everything lives in this module's own ``CollectorRegistry``: no process-global registry state, so several
instances (and tests) never collide. prometheus-client is imported only when metrics are enabled.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Protocol

from daemon.settings import MetricsSettings

__all__ = ["STAGE_BUCKETS", "JobSource", "Metrics", "MetricsError", "build_metrics", "start_metrics"]

# Seconds: from a fast encode (a few ms) to a quality batch on a slow GPU (a minute).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

INSTALL_HINT = "install it with: pip install 'gpen-watch[metrics]' (or set [metrics] enabled = false)"


class MetricsError(Exception):
    """The metrics endpoint cannot start; the message says why and what to do."""


class JobSource(Protocol):
    """What the scrape-time collector reads: JobTable has both (and is safe to call from another thread)."""

    def counts(self) -> dict[str, dict[str, int]]: ...

    def queue_depths(self) -> dict[str, int]: ...


def _client() -> Any:
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        raise MetricsError(
            f"metrics.enabled is true but prometheus-client is not installed; {INSTALL_HINT}"
        ) from None


class _JobTableCollector:
    """Reads the job table when Prometheus scrapes, so the numbers are never older than the scrape."""

    def __init__(self, source: JobSource, prom: Any) -> None:
        self._source = source
        self._core = importlib.import_module("prometheus_client.core")
        self._prom = prom

    def describe(self) -> list[Any]:
        # An empty description keeps register() from calling collect(), i.e. from reading the table early.
        return []

    def collect(self) -> Iterator[Any]:
        core = self._core
        up = core.GaugeMetricFamily(
            "gpen_watch_job_table_up", "1 if the job table could be read at this scrape"
        )
        try:
            counts = self._source.counts()
            depths = self._source.queue_depths()
        except Exception:  # a scrape must not fail because the table is busy or gone; job_table_up says so
            up.add_metric([], 0)
            yield up
            return
        files = core.GaugeMetricFamily(
            "gpen_watch_files", "Job-table rows per hot folder and state", labels=["folder", "state"]
        )
        for folder, by_state in sorted(counts.items()):
            for state, n in sorted(by_state.items()):
                files.add_metric([folder, state], n)
        queue = core.GaugeMetricFamily(
            "gpen_watch_queue_depth", "Jobs ready to be processed, per preset", labels=["preset"]
        )
        for preset, n in sorted(depths.items()):
            queue.add_metric([preset], n)
        up.add_metric([], 1)
        yield files
        yield queue
        yield up


class Metrics:
    """The instruments the service updates, plus the HTTP endpoint when one was started."""

    def __init__(self, source: JobSource) -> None:
        prom = _client()
        self.registry = prom.CollectorRegistry()
        self.registry.register(_JobTableCollector(source, prom))
        self._stage = prom.Histogram(
            "gpen_watch_stage_seconds",
            "Time spent per processing stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self._batch = prom.Histogram(
            "gpen_watch_batch_size", "Files per GPU batch", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self._cap = prom.Gauge(
            "gpen_watch_batch_cap", "Current batch cap in faces (adapts to GPU memory)", ["preset"],
            registry=self.registry,
        )  # fmt: skip
        self._images = prom.Counter(
            "gpen_watch_images", "Files finished since start, by result", ["result"], registry=self.registry
        )
        self._server: Any = None
        self._thread: Any = None

    def observe_stage(self, stage: str, seconds: float) -> None:
        self._stage.labels(stage=stage).observe(seconds)

    def observe_batch(self, size: int) -> None:
        self._batch.observe(size)

    def set_batch_cap(self, preset: str, n: int) -> None:
        self._cap.labels(preset=preset).set(n)

    def count_result(self, result: str) -> None:
        """One file finished: ``done``, ``failed`` or ``retry``."""
        self._images.labels(result=result).inc()

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the endpoint listens on, or None without an endpoint."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def serve(self, host: str, port: int) -> None:
        """Listen on ``host:port`` in a daemon thread; ``port`` 0 picks a free one (see ``address``)."""
        prom = _client()
        try:
            self._server, self._thread = prom.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(
                f"metrics endpoint cannot listen on {host}:{port}: {exc.strerror or exc}; "
                "change [metrics] host/port (each instance needs its own port)"
            ) from None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def build_metrics(source: JobSource) -> Metrics:
    """Instruments without an endpoint (raises MetricsError when prometheus-client is missing)."""
    return Metrics(source)


def start_metrics(settings: MetricsSettings, source: JobSource) -> Metrics | None:
    """The endpoint from ``[metrics]``: None when disabled (the default), else a listening Metrics."""
    if not settings.enabled:
        return None
    metrics = Metrics(source)
    metrics.serve(settings.host, settings.port)
    return metrics
