"""Fault injection against the real daemon process (issue 6): kills, a vanishing share, a full disk, files changed
while queued, a stalled writer, a locked or corrupted job table, engine OOM. After each one every input is
accounted for exactly once (output + identical backup, or failed + sidecar), no final name holds a partial file
and no temporary file is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from daemon.jobs import JobTable
from tests.daemon.harness import (
    Daemon,
    Layout,
    account,
    drop,
    face_photo,
    files_under,
    have_shared_data,
    partial_outputs,
    run_kill_rounds,
    small_face_photo,
    strays,
    temp_leftovers,
    wait_for,
    wait_ready,
    write_config,
)

pytestmark = pytest.mark.skipif(not have_shared_data(), reason="needs ../shared (detector weights, Solvay photo)")


def _assert_clean(layout: Layout, inputs: dict[tuple[str, str], bytes], *, failed_ok: bool = False) -> None:
    acc = account(layout, inputs)
    assert acc.lost == [] and acc.duplicated == [] and acc.bad_backup == []
    if not failed_ok:
        assert acc.failed == {}
    assert strays(layout, inputs) == []
    assert partial_outputs(layout) == []
    assert temp_leftovers(layout) == []


def _settled(layout: Layout, inputs: dict[tuple[str, str], bytes]) -> bool:
    return account(layout, inputs, read=False).settled == len(inputs)


def _states(state_dir: Path, folder: Path) -> dict[str, int]:
    with JobTable.open(state_dir / "jobs.sqlite3") as table:
        return table.counts().get(str(folder), {})


def test_random_sigkills_lose_and_duplicate_nothing(tmp_path):
    """Five SIGKILLs at random moments over 40 files: each file is published exactly once, none lost."""
    figures, layout, inputs = run_kill_rounds(tmp_path, files=40, kills=5, seed=6)
    assert (figures.lost, figures.duplicated, figures.failed) == (0, 0, {})
    assert figures.files_out == len(inputs)
    _assert_clean(layout, inputs)
    states = _states(tmp_path / "state", layout.hot["a"])
    assert states.get("done") == len(inputs) and set(states) == {"done"}


def test_output_share_vanishes_and_comes_back(tmp_path):
    """With the output root gone the daemon retries without re-creating it, and publishes once it is back."""
    config, layout = write_config(tmp_path)
    daemon = Daemon(config).start()
    away = layout.out["a"].with_name("a.away")
    try:
        wait_ready(daemon)
        layout.out["a"].rename(away)
        inputs = {("a", f"s{i}.jpg"): small_face_photo(i) for i in range(6)}
        for (_, rel), data in inputs.items():
            drop(layout.hot["a"] / rel, data)
        wait_for(lambda: "folder is missing" in daemon.log_text(), 60, daemon, "a publish retry")
        time.sleep(2.0)  # several retry rounds while the share is away
        assert not layout.out["a"].exists(), "the daemon re-created an unmounted output root on the local disk"
        assert files_under(away) == []
        away.rename(layout.out["a"])
        wait_for(lambda: _settled(layout, inputs), 90, daemon, "every file published")
        _assert_clean(layout, inputs)
        assert daemon.running()
    finally:
        if away.exists() and not layout.out["a"].exists():
            away.rename(layout.out["a"])
        assert daemon.stop() == 0


def _can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


def _fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; returns the filler file."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    return filler


def test_output_disk_full_then_space_freed(tmp_path):
    """A full output disk (a tiny tmpfs when root, else injected ENOSPC) delays publishing; nothing is lost."""
    mounted = False
    env = {}
    if _can_mount():
        config, layout = write_config(tmp_path)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(layout.out["a"])],
                                 capture_output=True).returncode == 0
    if not mounted:
        config, layout = write_config(tmp_path / "fp")
        env = {"GPEN_WATCH_FAILPOINTS": "publish=raise:enospc*6"}
    try:
        filler = _fill(layout.out["a"]) if mounted else None
        daemon = Daemon(config, env=env).start()
        try:
            wait_ready(daemon)
            inputs = {("a", f"d{i}.jpg"): small_face_photo(i) for i in range(5)}
            for (_, rel), data in inputs.items():
                drop(layout.hot["a"] / rel, data)
            wait_for(lambda: os.strerror(errno.ENOSPC) in daemon.log_text(), 60, daemon, "a disk-full retry")
            # The reason names the file it is about, so an operator knows which share is full.
            [retry] = [e for e in daemon.log_lines() if e.get("event") == "will retry"][:1]
            assert retry["error"].startswith(f"result {layout.out['a']}/d") and "No space left" in retry["error"]
            if filler is not None:
                time.sleep(1.5)
                assert [p for p in files_under(layout.out["a"]) if p != filler] == []
                assert temp_leftovers(layout) == []
                filler.unlink()
            wait_for(lambda: _settled(layout, inputs), 90, daemon, "every file published")
            _assert_clean(layout, inputs)
            assert daemon.running()
        finally:
            assert daemon.stop() == 0
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(layout.out["a"])], check=False)


def test_sources_replaced_or_deleted_while_queued(tmp_path):
    """A replaced source publishes its new bytes; a deleted one is recorded as gone with nothing published."""
    config, layout = write_config(tmp_path)
    # The first batch sits in the device for a while, so the others are queued (and the first in flight).
    daemon = Daemon(config, env={"GPEN_WATCH_FAILPOINTS": "generate=sleep:5*1"}).start()
    hot = layout.hot["a"]
    try:
        wait_ready(daemon)
        inputs = {("a", f"q{i:02d}.jpg"): small_face_photo(i) for i in range(12)}
        for (_, rel), data in inputs.items():
            drop(hot / rel, data)

        def first_in_flight() -> bool:
            with JobTable.open(tmp_path / "state" / "jobs.sqlite3") as table:
                job = table.latest(str(hot), "q00.jpg")
                return job is not None and job.state == "processing"

        wait_for(first_in_flight, 60, daemon, "the first batch in flight")
        new = {rel: face_photo(50 + i, width=300) for i, rel in enumerate(("q01.jpg", "q10.jpg"))}
        for rel, data in new.items():  # q01 was already read by the batch in flight; q10 is queued
            drop(hot / rel, data)
            inputs[("a", rel)] = data
        for rel in ("q02.jpg", "q11.jpg"):  # q02 in flight, q11 queued
            (hot / rel).unlink()
            del inputs[("a", rel)]
        wait_for(lambda: _settled(layout, inputs), 90, daemon, "every remaining file settled")
        wait_for(lambda: files_under(hot) == [], 20, daemon, "hot folder empty")
        _assert_clean(layout, inputs)
        for rel in new:
            with Image.open(layout.out["a"] / rel) as im:
                assert im.width == 300, f"{rel}: the result is not made from the new bytes"
        for rel in ("q02.jpg", "q11.jpg"):
            stem = rel.removesuffix(".jpg")
            for root in (layout.out["a"], layout.backup["a"], layout.failed["a"]):
                assert [p for p in files_under(root) if p.name.startswith(stem)] == [], (rel, root)
        with JobTable.open(tmp_path / "state" / "jobs.sqlite3") as table:
            assert {table.latest(str(hot), rel).state for rel in ("q02.jpg", "q11.jpg")} == {"gone"}
        assert "file vanished" in daemon.log_text()
    finally:
        assert daemon.stop() == 0


def test_stalled_writer_and_engine_oom_lose_nothing(tmp_path):
    """A writer stalling far longer than the stability delay, and three engine OOMs: every file is published."""
    config, layout = write_config(tmp_path, stability_delay=0.3, max_ready_wait=8.0)
    daemon = Daemon(config, env={"GPEN_WATCH_FAILPOINTS": "generate=raise:oom*3"}).start()
    hot = layout.hot["a"]
    try:
        wait_ready(daemon)
        inputs = {("a", f"o{i}.jpg"): small_face_photo(i) for i in range(8)}
        for (_, rel), data in inputs.items():
            drop(hot / rel, data)
        for rel, data in (("stall-a.jpg", face_photo(7)), ("stall-b.png", face_photo(8, "PNG"))):
            inputs[("a", rel)] = data
            with open(hot / rel, "wb") as fh:
                fh.write(data[: len(data) // 3])
                fh.flush()
                time.sleep(3.0)  # ten times the stability delay, with a decodable-looking prefix on disk
                fh.write(data[len(data) // 3:])
        wait_for(lambda: _settled(layout, inputs), 120, daemon, "every file published")
        _assert_clean(layout, inputs)
        log = daemon.log_text()
        assert "batch failed; trying its halves" in log or "restoring failed" in log
        assert daemon.running()
    finally:
        assert daemon.stop() == 0


def test_a_lost_device_stops_the_daemon_for_a_restart_and_fails_no_file(tmp_path):
    """The device stops computing (every batch raises, and so does the blank test image, as on a GPU that fell off
    the bus): the daemon exits with status 75 (TEMPFAIL) for systemd to restart it, instead of failing the whole
    queue. The files wait in the hot folder, untouched, and a start on a working device publishes every one."""
    config, layout = write_config(tmp_path, stability_delay=0.3)
    lost = Daemon(config, env={"GPEN_WATCH_FAILPOINTS": "generate=raise:error;check=raise:error"}).start()
    hot = layout.hot["a"]
    inputs = {("a", f"p{i}.jpg"): small_face_photo(i) for i in range(6)}
    try:
        wait_ready(lost)
        for (_, rel), data in inputs.items():
            drop(hot / rel, data)
        assert lost.wait(120) == 75
    finally:
        lost.stop()
    assert "the device no longer computes" in lost.log_text()
    assert _untouched(layout, inputs)
    states = _states(tmp_path / "state", hot)
    assert states.get("ready", 0) + states.get("pending", 0) == 6 and "failed" not in states, states
    _a_new_start_publishes_all(config, layout, inputs)


def _a_new_start_publishes_all(config: Path, layout: Layout, inputs: dict[tuple[str, str], bytes]) -> None:
    daemon = Daemon(config).start()
    try:
        wait_for(lambda: _settled(layout, inputs), 120, daemon, "every file published after the new start")
        _assert_clean(layout, inputs)
    finally:
        assert daemon.stop() == 0


def _untouched(layout: Layout, inputs: dict[tuple[str, str], bytes]) -> bool:
    return all((layout.hot[f] / rel).read_bytes() == data for (f, rel), data in inputs.items()) and all(
        files_under(d) == [] for d in (*layout.out.values(), *layout.backup.values(), *layout.failed.values())
    )


def test_locked_job_table_stops_start_with_a_clear_error(tmp_path):
    """A job table locked by another process: start fails saying so, exit status non-zero, sources untouched."""
    config, layout = write_config(tmp_path, extra="")
    inputs = {("a", f"l{i}.jpg"): small_face_photo(i) for i in range(3)}
    for (_, rel), data in inputs.items():
        drop(layout.hot["a"] / rel, data)
    db = tmp_path / "state" / "jobs.sqlite3"
    JobTable.open(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        daemon = Daemon(config).start()
        code = daemon.wait(120)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code != 0
    assert "is locked" in daemon.log_text()
    assert _untouched(layout, inputs)


def test_corrupted_job_table_stops_start_then_recovers_when_moved_aside(tmp_path):
    """A corrupted job table: start fails saying so, no source touched; moved aside, every file is processed."""
    config, layout = write_config(tmp_path)
    inputs = {("a", f"c{i}.jpg"): small_face_photo(i) for i in range(4)}
    for (_, rel), data in inputs.items():
        drop(layout.hot["a"] / rel, data)
    db = tmp_path / "state" / "jobs.sqlite3"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"SQLite format 3\0" + os.urandom(8192))
    daemon = Daemon(config).start()
    assert daemon.wait(120) != 0
    assert "corrupted" in daemon.log_text()
    assert _untouched(layout, inputs)
    db.rename(db.with_name("jobs.sqlite3.broken"))
    _a_new_start_publishes_all(config, layout, inputs)


def test_transient_retries_do_not_count_as_crashes(tmp_path):
    """A file retried for transient errors (disk full, share gone) is not given up on at its first crash."""
    with JobTable.open(tmp_path / "jobs.sqlite3") as table:
        job = table.note_candidate("/hot", "busy.jpg", "test")
        table.mark_ready(job.id, 10, 1, "ab" * 32)
        for _ in range(5):  # five transient failures: claimed, then retried later
            table.claim("test", 1, now=time.time() + 10_000)
            table.retry_later(job.id, "publish: disk full", 0.0)
        table.claim("test", 1, now=time.time() + 10_000)  # in flight when the process is killed
        assert table.requeue_in_flight(max_attempts=5) == 1
        row = table.get(job.id)
        assert (row.state, row.crashes) == ("ready", 1)
        for _ in range(4):  # but a file that really keeps killing the daemon is still given up on
            table.claim("test", 1)
            table.requeue_in_flight(max_attempts=5)
        assert (table.get(job.id).state, table.get(job.id).error_stage) == ("failed", "crash")


def test_crash_verdict_does_not_fall_on_a_new_file_of_the_same_name(tmp_path):
    """After a file is given up on for crashing the daemon, a different file dropped under its name is processed."""
    config, layout = write_config(tmp_path, extra="max_attempts = 1")
    hot = layout.hot["a"]
    drop(hot / "same.jpg", small_face_photo(1))
    first = Daemon(config, env={"GPEN_WATCH_FAILPOINTS": "generate=exit"}).start()
    assert first.wait(120) == 137
    second = Daemon(config).start()  # gives up on same.jpg: failed/ with a crash sidecar
    try:
        wait_for(lambda: (layout.failed["a"] / "same.jpg.error.json").is_file(), 60, second, "the crash verdict")
    finally:
        assert second.stop() == 0
    newer = face_photo(2)
    drop(hot / "same.jpg", newer)
    third = Daemon(config).start()
    try:
        wait_for(lambda: (layout.out["a"] / "same.jpg").is_file() or (layout.failed["a"] / "same (1).jpg").exists(),
                 60, third, "the new file settled")
        wait_for(lambda: (layout.backup["a"] / "same.jpg").is_file(), 30, third, "its backup")
    finally:
        assert third.stop() == 0
    assert (layout.backup["a"] / "same.jpg").read_bytes() == newer
    assert sorted(p.name for p in files_under(layout.failed["a"])) == ["same.jpg", "same.jpg.error.json"]


def test_unmounted_output_share_is_not_written_on_the_local_disk(tmp_path):
    """An unmounted share leaves its empty mount point behind: results wait for the share instead of landing
    on the local disk (hidden once the share is back), and the original stays in the hot folder."""
    if not _can_mount():
        pytest.skip("needs root and mount")
    config, layout = write_config(tmp_path)
    share = layout.out["a"]
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(share)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    daemon = Daemon(config).start()
    try:
        wait_ready(daemon)
        drop(layout.hot["a"] / "one.jpg", small_face_photo(1))
        wait_for(lambda: (share / "one.jpg").exists(), 60, daemon, "the first result on the share")
        subprocess.run(["umount", "-l", str(share)], check=True)
        drop(layout.hot["a"] / "two.jpg", small_face_photo(2))
        wait_for(lambda: "is no longer mounted" in daemon.log_text(), 60, daemon, "a retry naming the lost share")
        assert files_under(share) == []  # the local mount point
        assert (layout.hot["a"] / "two.jpg").exists()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(share)], check=True)
        wait_for(lambda: (share / "two.jpg").exists() and not (layout.hot["a"] / "two.jpg").exists(), 60, daemon,
                 "the result published once the share is back")
    finally:
        assert daemon.stop() == 0
        subprocess.run(["umount", "-l", str(share)], check=False)


def test_a_source_replaced_after_its_backup_is_processed_not_deleted(tmp_path):
    """A re-export under the same name while the first version is being published is a new drop: it is neither
    deleted unprocessed nor lost; both versions end with a result and a byte-exact backup."""
    config, layout = write_config(tmp_path)
    first, second = small_face_photo(1), small_face_photo(7)
    daemon = Daemon(config, env={"GPEN_WATCH_FAILPOINTS": "publish=sleep:4*1"}).start()
    try:
        wait_ready(daemon)
        drop(layout.hot["a"] / "IMG_1.jpg", first)
        wait_for(lambda: any(layout.backup["a"].iterdir()), 60, daemon, "the first backup")
        drop(layout.hot["a"] / "IMG_1.jpg", second)  # while the result is held back by the failpoint
        wait_for(lambda: len(files_under(layout.backup["a"])) == 2 and not files_under(layout.hot["a"]), 60,
                 daemon, "the second version published too")
        backups = sorted(p.read_bytes() for p in files_under(layout.backup["a"]))
        assert backups == sorted([first, second])
        assert len(files_under(layout.out["a"])) == 2
    finally:
        assert daemon.stop() == 0


def test_a_failed_file_whose_sidecar_name_is_too_long_still_lands_in_failed(tmp_path):
    """NAME.error.json over 255 bytes: the file is stored under a shortened name with its sidecar, not left
    forever in the hot folder with nothing logged."""
    config, layout = write_config(tmp_path, extra="max_attempts = 2")
    name = "x" * 242 + ".jpg"  # 246 bytes: NAME.error.json would be 257
    junk = os.urandom(5000)
    (layout.hot["a"] / name).write_bytes(junk)
    daemon = Daemon(config).start()
    try:
        wait_ready(daemon)
        wait_for(lambda: len(files_under(layout.failed["a"])) == 2, 60, daemon, "the file and its sidecar")
        stored = [p for p in files_under(layout.failed["a"]) if not p.name.endswith(".error.json")]
        assert [p.read_bytes() for p in stored] == [junk]
        assert (stored[0].parent / (stored[0].name + ".error.json")).exists()
        assert not (layout.hot["a"] / name).exists()
    finally:
        assert daemon.stop() == 0


def test_a_read_only_hot_folder_is_published_once_and_its_originals_left(tmp_path):
    """The original cannot be deleted (after = "delete"): result and backup stay published, the work is not redone
    on every retry or rescan, and the log says why the original is still there."""
    if not _can_mount():
        pytest.skip("needs root to mount a read-only tmpfs")
    config, layout = write_config(tmp_path)
    hot = layout.hot["a"]
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(hot)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        inputs = {("a", "r0.jpg"): small_face_photo(0)}
        (hot / "r0.jpg").write_bytes(inputs[("a", "r0.jpg")])
        (hot / "bad.jpg").write_bytes(b"not an image at all")  # fails; failed/ is on another filesystem
        subprocess.run(["mount", "-o", "remount,ro", str(hot)], check=True)
        daemon = Daemon(config).start()
        try:
            wait_ready(daemon)
            wait_for(lambda: "the original stays in the hot folder" in daemon.log_text(), 60, daemon, "published")
            time.sleep(4.0)  # several retry back-offs and rescans (1 s each)
            assert sorted(p.name for p in files_under(layout.out["a"])) == ["r0.jpg"]
            assert [p.name for p in files_under(layout.backup["a"])] == ["r0.jpg"]
            assert (layout.backup["a"] / "r0.jpg").read_bytes() == (hot / "r0.jpg").read_bytes()
            assert daemon.log_text().count('"event": "published"') == 1  # restored once, not once per retry
            with JobTable.open(layout.root / "state" / "jobs.sqlite3") as table:
                rows = [j for j in table.in_state("done") if j.relpath == "r0.jpg"]
                assert len(rows) == 1 and "could not be deleted" in (rows[0].last_error or "")
                assert [j for j in table.pending() + table.in_state("ready") + table.in_state("retry")] == []
                [bad] = [j for j in table.in_state("failed") if j.relpath == "bad.jpg"]
                assert "could not be removed" in (bad.kept or "")
            # The failed file is in failed/ once, with its reason, though its original could not leave.
            assert sorted(p.name for p in files_under(layout.failed["a"])) == ["bad.jpg", "bad.jpg.error.json"]
            assert (layout.failed["a"] / "bad.jpg").read_bytes() == b"not an image at all"
        finally:
            assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(hot)], check=False)
