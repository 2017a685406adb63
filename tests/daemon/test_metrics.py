"""The Prometheus endpoint: scraped over HTTP on 127.0.0.1, with the job table read at scrape time."""

from __future__ import annotations

import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="needs prometheus-client (pip install gpen-watch[metrics])")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from daemon.jobs import JobTable  # noqa: E402
from daemon.metrics import Metrics, MetricsError, build_metrics, start_metrics  # noqa: E402
from daemon.settings import MetricsSettings  # noqa: E402


def on_free_port(**changes: object) -> MetricsSettings:
    # Port 0 (the OS picks one) is below the setting's range; tests need it so runs never collide.
    return MetricsSettings.model_construct(**{"enabled": True, "host": "127.0.0.1", "port": 0, **changes})


@pytest.fixture
def table(tmp_path: Path) -> Iterator[JobTable]:
    with JobTable.open(tmp_path / "jobs.sqlite3") as jobs:
        for name in ("a.jpg", "b.jpg", "c.jpg"):
            job = jobs.note_candidate("/hot/fast", name, "fast")
            jobs.mark_ready(job.id, 1, 1, "x")
        (first,) = jobs.claim("fast", 1)
        jobs.finish(first.id, faces=1)
        jobs.note_candidate("/hot/quality", "d.jpg", "quality")
        yield jobs


@pytest.fixture
def endpoint(table: JobTable) -> Iterator[Metrics]:
    metrics = start_metrics(on_free_port(), table)
    assert metrics is not None
    yield metrics
    metrics.close()


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the endpoint serves, keyed by name and sorted labels."""
    assert metrics.address is not None
    host, port = metrics.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class TestEndpoint:
    def test_bound_to_localhost(self, endpoint: Metrics) -> None:
        """The endpoint listens on 127.0.0.1, the default, not on every interface."""
        assert MetricsSettings().host == "127.0.0.1"
        assert endpoint.address is not None and endpoint.address[0] == "127.0.0.1"

    def test_files_and_queues_come_from_the_job_table(self, endpoint: Metrics) -> None:
        """Per-folder counts by state and per-preset queue depths match the job table."""
        samples = scrape(endpoint)
        assert samples[("gpen_watch_files", (("folder", "/hot/fast"), ("state", "done")))] == 1
        assert samples[("gpen_watch_files", (("folder", "/hot/fast"), ("state", "ready")))] == 2
        assert samples[("gpen_watch_files", (("folder", "/hot/quality"), ("state", "pending")))] == 1
        assert samples[("gpen_watch_queue_depth", (("preset", "fast"),))] == 2
        assert samples[("gpen_watch_job_table_up", ())] == 1

    def test_counts_are_read_at_scrape_time(self, endpoint: Metrics, table: JobTable) -> None:
        """A file finished after start-up shows up at the next scrape, with nothing pushed by the service."""
        (job,) = table.claim("fast", 1)
        table.finish(job.id, faces=3)
        samples = scrape(endpoint)
        assert samples[("gpen_watch_files", (("folder", "/hot/fast"), ("state", "done")))] == 2
        assert samples[("gpen_watch_queue_depth", (("preset", "fast"),))] == 1

    def test_service_instruments(self, endpoint: Metrics) -> None:
        """Stage latencies, batch sizes, the batch cap and finished-file counters reach the scrape."""
        endpoint.observe_stage("generate", 0.3)
        endpoint.observe_stage("generate", 0.02)
        endpoint.observe_stage("encode", 0.004)
        endpoint.observe_batch(4)
        endpoint.set_batch_cap("fast", 4)
        endpoint.set_batch_cap("fast", 2)  # lowered after an out-of-memory error
        endpoint.count_result("done")
        endpoint.count_result("done")
        endpoint.count_result("failed")
        samples = scrape(endpoint)
        generate = (("stage", "generate"),)
        assert samples[("gpen_watch_stage_seconds_count", generate)] == 2
        assert samples[("gpen_watch_stage_seconds_sum", generate)] == pytest.approx(0.32)
        assert samples[("gpen_watch_stage_seconds_bucket", (("le", "0.025"), ("stage", "generate")))] == 1
        assert samples[("gpen_watch_batch_size_sum", ())] == 4
        assert samples[("gpen_watch_batch_cap", (("preset", "fast"),))] == 2
        assert samples[("gpen_watch_images_total", (("result", "done"),))] == 2
        assert samples[("gpen_watch_images_total", (("result", "failed"),))] == 1

    def test_unreadable_table_does_not_break_the_scrape(self, table: JobTable) -> None:
        """When the job table cannot be read, the scrape still answers and job_table_up says 0."""
        metrics = start_metrics(on_free_port(), table)
        assert metrics is not None
        try:
            metrics.observe_batch(1)
            table.close()
            samples = scrape(metrics)
        finally:
            metrics.close()
        assert samples[("gpen_watch_job_table_up", ())] == 0
        assert samples[("gpen_watch_batch_size_count", ())] == 1
        assert not any(name == "gpen_watch_files" for name, _ in samples)


class TestStarting:
    def test_off_by_default(self, table: JobTable) -> None:
        """With the default settings no endpoint is started."""
        assert MetricsSettings().enabled is False
        assert start_metrics(MetricsSettings(), table) is None

    def test_instances_do_not_share_state(self, table: JobTable) -> None:
        """Two Metrics objects keep separate registries: no duplicate-metric error, no shared values."""
        first, second = build_metrics(table), build_metrics(table)
        first.count_result("done")
        assert first.registry.get_sample_value("gpen_watch_images_total", {"result": "done"}) == 1
        assert second.registry.get_sample_value("gpen_watch_images_total", {"result": "done"}) is None

    def test_port_in_use_is_explained(self, table: JobTable) -> None:
        """A port already taken fails with the address and what to change."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(MetricsError, match=f"127.0.0.1:{port}.*port"):
                start_metrics(on_free_port(port=port), table)

    def test_missing_client_is_explained(self, table: JobTable, monkeypatch: pytest.MonkeyPatch) -> None:
        """Enabled without prometheus-client installed: a clear error naming the extra to install."""
        monkeypatch.setitem(sys.modules, "prometheus_client", None)
        with pytest.raises(MetricsError, match=r"gpen-watch\[metrics\]"):
            start_metrics(on_free_port(), table)
