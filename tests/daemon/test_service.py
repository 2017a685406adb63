"""The service's own loops, driven in-process (the real daemon process is in test_service_e2e/_lifecycle)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from daemon import service
from daemon.jobs import JobStateError, JobTable
from daemon.settings import hot_folders, load_settings


def aged_history(table_path: Path, folder: str, days: float) -> tuple[int, int]:
    """Two finished rows of one file, ``days`` old: the older one is history, the newer one its latest state."""
    ids = []
    with JobTable.open(table_path) as table:
        for _ in range(2):
            job = table.note_candidate(folder, "a.jpg", "fast")
            table.mark_gone(job.id)
            ids.append(job.id)
    with sqlite3.connect(table_path) as con:
        con.execute("UPDATE jobs SET updated_at = updated_at - ?", (days * 86400,))
    con.close()
    return ids[0], ids[1]


class TestHistory:
    def test_the_main_loop_prunes_old_history_periodically(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Besides at start-up, the running daemon prunes finished rows older than history_days (once a day)."""
        monkeypatch.setattr(service, "PRUNE_EVERY", 0.2)
        config = tmp_path / "gpen-watch.toml"
        config.write_text(f'root = "{tmp_path}"\nhistory_days = 30\n')
        settings = load_settings(config)
        table = tmp_path / "state" / "jobs.sqlite3"
        table.parent.mkdir()
        old, latest = aged_history(table, str(tmp_path / "in" / "fast"), days=31)
        svc = service.Service(settings, hot_folders(settings))
        svc.jobs = JobTable.open(table)
        loop = threading.Thread(target=svc.main_loop)
        loop.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(svc.jobs.in_state("gone")) > 1:
                time.sleep(0.05)
            with pytest.raises(JobStateError):
                svc.jobs.get(old)
            assert "gone" == svc.jobs.get(latest).state
        finally:
            svc.stop_event.set()
            loop.join(10)
            svc.publish_pool.shutdown()
            svc.read_pool.shutdown()
            svc.jobs.close()
