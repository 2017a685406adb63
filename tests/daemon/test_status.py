"""`gpen-watch status`: the snapshot file, the read-only view of the job table, and the command's output."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import status
from daemon.cli import main
from daemon.jobs import JobTable
from daemon.status import Snapshot, SnapshotError


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GPEN_WATCH_CONFIG", "STATE_DIRECTORY", "GPEN_WATCH_STATE_DIR", "GPEN_WATCH_ROOT"):
        monkeypatch.delenv(name, raising=False)


def fill(table: JobTable) -> None:
    """Two folders: two files done, one failed with a reason, one queued, one still being written."""
    for name in ("a.jpg", "b.jpg"):
        job = table.note_candidate("/hot/fast", name, "fast")
        table.mark_ready(job.id, 10, 1, "aa")
        (claimed,) = table.claim("fast", 1)
        table.finish(claimed.id, faces=2)
    bad = table.note_candidate("/hot/fast", "sub/broken.jpg", "fast")
    table.fail(bad.id, "decode", "image file is truncated (1024 of 4096 bytes)")
    queued = table.note_candidate("/hot/quality", "c.png", "quality")
    table.mark_ready(queued.id, 10, 1, "cc")
    table.note_candidate("/hot/quality", "d.png", "quality")


def make_state(root: Path) -> Path:
    state = root / "state"
    with JobTable.open(state / status.JOBS_FILE) as table:
        fill(table)
    return state


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestSnapshot:
    def test_round_trip(self, tmp_path: Path) -> None:
        """What the daemon writes is what status reads back, and no temporary file is left behind."""
        snap = Snapshot.current(
            device="cuda:0 (NVIDIA H100)", batch_caps={"fast": 4}, paused={"/hot/q": "mount gone"},
            queue_depths={"fast": 3}, counters={"done": 7},
        )  # fmt: skip
        status.write_snapshot(tmp_path / "status.json", snap)
        assert status.read_snapshot(tmp_path / "status.json") == snap
        assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]

    def test_rewrite_replaces(self, tmp_path: Path) -> None:
        """A second write replaces the first (the daemon rewrites it every few seconds)."""
        path = tmp_path / "status.json"
        status.write_snapshot(path, Snapshot.current(device="cpu", batch_caps={"fast": 4}, paused={}))
        status.write_snapshot(path, Snapshot.current(device="cpu", batch_caps={"fast": 2}, paused={}))
        read = status.read_snapshot(path)
        assert read is not None and read.batch_caps == {"fast": 2}

    def test_missing_is_none(self, tmp_path: Path) -> None:
        """No snapshot yet is not an error."""
        assert status.read_snapshot(tmp_path / "status.json") is None

    @pytest.mark.parametrize("text", ["{not json", "[]", '{"pid": 1}'])
    def test_malformed_is_reported(self, tmp_path: Path, text: str) -> None:
        """A damaged snapshot raises SnapshotError rather than crashing status."""
        (tmp_path / "status.json").write_text(text)
        with pytest.raises(SnapshotError):
            status.read_snapshot(tmp_path / "status.json")


class TestRunning:
    def test_own_process_is_running(self) -> None:
        """A snapshot of a live process says running."""
        assert status.daemon_running(Snapshot.current(device="cpu", batch_caps={}, paused={}))

    def test_dead_process_is_not_running(self) -> None:
        """A snapshot whose process has exited says not running."""
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        )
        snap = Snapshot(
            pid=int(child.stdout), started_at=time.time(), updated_at=time.time(), version="x", device="cpu"
        )
        assert not status.daemon_running(snap)

    @pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
    def test_reused_pid_is_not_running(self) -> None:
        """A live pid that started at another time is a different process (pid reuse), not the daemon."""
        snap = Snapshot.current(device="cpu", batch_caps={}, paused={})
        reused = Snapshot(**{**snap.__dict__, "started_at": snap.started_at - 3600})
        assert not status.daemon_running(reused)


class TestGather:
    def test_counts_queues_failures_throughput(self, tmp_path: Path) -> None:
        """The report holds per-folder counts, queue depths, the failure and its reason, and throughput."""
        state = make_state(tmp_path)
        report = status.gather(state, now=time.time())
        assert report.counts == {
            "/hot/fast": {"done": 2, "failed": 1},
            "/hot/quality": {"ready": 1, "pending": 1},
        }
        assert report.queue_depths == {"quality": 1}
        (failure,) = report.failures
        assert (failure.folder, failure.relpath, failure.stage) == ("/hot/fast", "sub/broken.jpg", "decode")
        assert "truncated" in (failure.error or "")
        assert report.throughput["1m"] == pytest.approx(2.0)
        assert report.throughput["15m"] == pytest.approx(2 / 15)
        assert not report.running

    def test_old_work_leaves_the_throughput_window(self, tmp_path: Path) -> None:
        """Files finished more than 15 minutes ago do not count as current throughput."""
        state = make_state(tmp_path)
        report = status.gather(state, now=time.time() + 3600)
        assert report.throughput == {"1m": 0.0, "5m": 0.0, "15m": 0.0}

    def test_reads_while_the_daemon_holds_the_write_lock(self, tmp_path: Path) -> None:
        """status neither waits for nor takes the daemon's write lock, and sees committed rows."""
        state = make_state(tmp_path)
        with JobTable.open(state / status.JOBS_FILE) as daemon_table:
            writer = sqlite3.connect(state / status.JOBS_FILE, isolation_level=None)
            writer.execute("BEGIN IMMEDIATE")  # the daemon in the middle of a transaction
            writer.execute("UPDATE jobs SET state = 'gone' WHERE relpath = 'd.png'")
            report = status.gather(state)
            writer.execute("ROLLBACK")
            writer.close()
            daemon_table.note_candidate("/hot/quality", "e.png", "quality")  # the daemon can still write
        assert report.counts["/hot/quality"] == {"ready": 1, "pending": 1}

    def test_stopped_daemon_state_is_not_modified(self, tmp_path: Path) -> None:
        """Reading a stopped daemon's table changes no byte and leaves no -wal/-shm files (sudo-safe)."""
        state = make_state(tmp_path)
        before = sorted(p.name for p in state.iterdir())
        db_digest = digest(state / status.JOBS_FILE)
        status.gather(state)
        assert sorted(p.name for p in state.iterdir()) == before
        assert digest(state / status.JOBS_FILE) == db_digest

    def test_read_only_connection_refuses_writes(self, tmp_path: Path) -> None:
        """The connection status uses cannot write, whatever a caller does with it."""
        state = make_state(tmp_path)
        with JobTable.open(state / status.JOBS_FILE):  # daemon running: WAL present
            table = status.open_read_only(state / status.JOBS_FILE)
            with pytest.raises(Exception, match="readonly|read-only|cannot be written"):
                table.note_candidate("/hot/fast", "x.jpg", "fast")
            table.close()


class TestCommand:
    def test_text_report(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The text report names the folders, their counts, the failure reason and the device."""
        state = make_state(tmp_path)
        status.write_snapshot(
            state / status.SNAPSHOT_FILE,
            Snapshot.current(
                device="cuda:0 (Test GPU)", batch_caps={"fast": 4}, paused={"/hot/x": "mount gone"}
            ),
        )
        assert main(["status", "--root", str(tmp_path)]) == 0  # the snapshot's process (this one) is alive
        out = capsys.readouterr().out
        assert "running (pid" in out
        assert "cuda:0 (Test GPU)" in out
        assert "PAUSED /hot/x: mount gone" in out
        assert "batch caps (faces): fast 4" in out
        fast_row = next(line for line in out.splitlines() if line.startswith("/hot/fast "))
        assert fast_row.split()[1:] == ["0", "0", "2", "1"]  # pending ready done failed
        assert "[decode] image file is truncated" in out
        assert "sub/broken.jpg" in out

    def test_a_starting_daemon_is_not_called_running(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """While it loads its models the daemon processes nothing: status says it is starting (and --json has
        ready false); the exit status is still 0, as for a daemon that runs."""
        state = make_state(tmp_path)
        status.write_snapshot(state / status.SNAPSHOT_FILE, Snapshot.current(
            device="none yet (starting: loading models)", batch_caps={}, paused={}, ready=False))
        assert main(["status", "--root", str(tmp_path)]) == 0
        assert "gpen-watch: starting (not processing files yet) (pid" in capsys.readouterr().out
        main(["status", "--root", str(tmp_path), "--json"])
        assert json.loads(capsys.readouterr().out)["snapshot"]["ready"] is False

    def test_a_snapshot_gone_stale_on_a_full_disk_says_so(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
        """The daemon cannot rewrite its snapshot when the state folder's disk is full: status says that, not
        "still starting, or hung"."""
        import dataclasses
        import os
        import time

        state = make_state(tmp_path)
        stale = dataclasses.replace(Snapshot.current(device="cpu", batch_caps={}, paused={}),
                                    updated_at=time.time() - 120)
        status.write_snapshot(state / status.SNAPSHOT_FILE, stale)
        main(["status", "--root", str(tmp_path)])
        assert "(still starting, or hung)" in capsys.readouterr().out
        monkeypatch.setattr(os, "statvfs", lambda path: type("Full", (), {"f_bavail": 0})())
        main(["status", "--root", str(tmp_path)])
        assert "(its state folder's disk is full)" in capsys.readouterr().out

    def test_originals_left_in_a_read_only_hot_folder_are_listed(self, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
        """A hot folder the service cannot write keeps its originals after they are published: status says which
        and why (before, only the log did), and --json has them."""
        state = make_state(tmp_path)
        with JobTable.open(state / status.JOBS_FILE) as table:
            job = table.note_candidate("/hot/fast", "kept.jpg", "fast")
            table.mark_ready(job.id, 10, 1, "kk")
            (claimed,) = table.claim("fast", 1)
            table.finish(claimed.id, faces=1, kept="the original could not be removed: Read-only file system")
        main(["status", "--root", str(tmp_path)])
        out = capsys.readouterr().out
        assert "originals left in the hot folder" in out and "kept.jpg (done)" in out
        assert "Read-only file system" in out
        main(["status", "--root", str(tmp_path), "--json"])
        assert [k["relpath"] for k in json.loads(capsys.readouterr().out)["kept"]] == ["kept.jpg"]

    def test_files_waiting_to_retry_show_why(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An output share that went away fails nothing: its files wait to retry, and status says why."""
        state = make_state(tmp_path)
        with JobTable.open(state / status.JOBS_FILE) as table:
            job = table.note_candidate("/hot/fast", "e.jpg", "fast")
            table.mark_ready(job.id, 10, 1, "ee")
            (claimed,) = table.claim("fast", 1)
            table.retry_later(claimed.id, "publish: result /srv/out/e.jpg: Read-only file system", 60)
            refused = table.note_candidate("/hot/fast", "empty.jpg", "fast")
            table.fail(refused.id, "readiness", "empty file (0 bytes for 600 s)")
        main(["status", "--root", str(tmp_path)])
        out = capsys.readouterr().out
        assert "waiting to retry (latest):" in out
        assert "publish: result /srv/out/e.jpg: Read-only file system (tried 1 time)" in out
        assert "[readiness] empty file (0 bytes for 600 s)\n" in out  # never taken up: no count of tries
        main(["status", "--root", str(tmp_path), "--json"])
        assert json.loads(capsys.readouterr().out)["retrying"][0]["relpath"] == "e.jpg"

    def test_per_gpu_instances_are_found(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """With gpen-watch@N instances (status-N.json, no status.json), status sees them and says which run."""
        state = make_state(tmp_path)
        live = Snapshot.current(device="cuda:0 (Test GPU)", batch_caps={"fast": 8}, paused={})
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True)
        dead = Snapshot(pid=int(child.stdout), started_at=1.0, updated_at=1.0, version="x", device="cuda:1")
        status.write_snapshot(state / "status-0.json", live)
        status.write_snapshot(state / "status-1.json", dead)
        assert main(["status", "--root", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "running (instance 0, pid" in out and "cuda:0 (Test GPU)" in out
        assert "instances: 0 running, 1 not running" in out

    def test_a_stopped_single_daemon_does_not_speak_for_the_running_instance(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Moving from the single unit to gpen-watch@0 leaves the single daemon's status.json behind: status
        describes instance 0, which runs, not the stopped one (its device, its paused shares)."""
        state = make_state(tmp_path)
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True)
        status.write_snapshot(state / status.SNAPSHOT_FILE, Snapshot(
            pid=int(child.stdout), started_at=1.0, updated_at=2.0, version="x", device="cuda:0 (old)",
            paused={"/hot/gone": "share unmounted"}))
        status.write_snapshot(state / "status-0.json", Snapshot.current(
            device="cuda:0 (Test GPU)", batch_caps={}, paused={"/hot/now": "mount gone"}))
        assert main(["status", "--root", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"running (instance 0, pid {os.getpid()}" in out
        assert "device: cuda:0 (Test GPU)" in out and "PAUSED /hot/now: mount gone" in out
        assert "(old)" not in out and "/hot/gone" not in out
        assert "instances: default not running, 0 running" in out
        (state / "status-0.json").unlink()  # with none running, the last one seen is described, as stopped
        assert main(["status", "--root", str(tmp_path)]) == 3
        assert "not running (last seen" in capsys.readouterr().out

    def test_work_held_by_a_stopped_instance_is_pointed_out(self, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
        """Instance 1 died with files in flight and instance 0 is running: status says 0 takes them over."""
        state = make_state(tmp_path)
        with JobTable.open(state / status.JOBS_FILE, owner="1") as gpu1:
            job = gpu1.note_candidate("/hot/fast", "held.jpg", "fast")
            gpu1.mark_ready(job.id, 10, 1, "hh")
            gpu1.claim("fast", 1)
        status.write_snapshot(state / "status-0.json", Snapshot.current(device="cuda:0", batch_caps={}, paused={}))
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True)
        status.write_snapshot(state / "status-1.json", Snapshot(pid=int(child.stdout), started_at=1.0,
                                                                updated_at=1.0, version="x", device="cuda:1"))
        main(["status", "--root", str(tmp_path)])
        out = capsys.readouterr().out
        assert "note: 1 file(s) were in flight when instance 1 stopped; a running instance redoes them" in out
        (state / "status-0.json").unlink()
        main(["status", "--root", str(tmp_path)])
        out = capsys.readouterr().out
        assert "warning: 1 file(s) were in flight when instance 1 stopped" in out
        assert "systemctl start gpen-watch@1" in out

    def test_file_names_cannot_drive_the_terminal(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A failed file whose name holds an escape sequence or a newline is shown escaped, on one line."""
        state = tmp_path / "state"
        with JobTable.open(state / status.JOBS_FILE) as table:
            job = table.note_candidate("/hot/fast", "evil\x1b[2J\nname.jpg", "fast")
            table.fail(job.id, "decode", "not an image")
        main(["status", "--root", str(tmp_path)])
        out = capsys.readouterr().out
        assert "\x1b" not in out
        assert "evil\\x1b[2J\\nname.jpg" in out

    def test_entries_left_in_a_hot_folder_are_listed(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Links, FIFOs and undecodable names that stay in a hot folder are shown with why, a long list cut short;
        --json has them too."""
        state = make_state(tmp_path)
        left = {f"pipe-{i:02}.jpg": "not a regular file" for i in range(12)}
        left["bad-\udcff.jpg"] = "file name is not valid UTF-8"
        snap = Snapshot.current(device="cpu", batch_caps={}, paused={},
                                refused={"/hot/fast": left, "/hot/quality": {}})
        status.write_snapshot(state / status.SNAPSHOT_FILE, snap)
        assert status.read_snapshot(state / status.SNAPSHOT_FILE) == snap
        main(["status", "--root", str(tmp_path)])
        out = capsys.readouterr().out
        assert "left in hot folders, never processed (13; remove or replace them):" in out
        assert "/hot/fast  bad-\\xff.jpg: file name is not valid UTF-8" in out  # as `ls -b` names it
        assert "pipe-08.jpg: not a regular file" in out and "pipe-09.jpg" not in out
        assert "… and 3 more" in out
        main(["status", "--root", str(tmp_path), "--json"])
        data = json.loads(capsys.readouterr().out)
        assert data["snapshot"]["refused_counts"] == {"/hot/fast": 13}
        assert len(data["snapshot"]["refused"]["/hot/fast"]) == 13

    def test_json_report(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--json gives the same facts to scripts; exit status 3 says the daemon is not running."""
        make_state(tmp_path)
        assert main(["status", "--root", str(tmp_path), "--json"]) == 3
        data = json.loads(capsys.readouterr().out)
        assert data["counts"]["/hot/fast"] == {"done": 2, "failed": 1}
        assert data["queue_depths"] == {"quality": 1}
        assert data["failures"][0]["error"].startswith("image file is truncated")
        assert data["running"] is False and data["snapshot"] is None

    def test_no_state_yet(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Before the daemon's first start: a clear message and exit status 4, and nothing is created."""
        assert main(["status", "--root", str(tmp_path)]) == 4
        assert "no state in" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []
        assert main(["status", "--root", str(tmp_path), "--json"]) == 4  # scripts get JSON on stdout too
        answer = json.loads(capsys.readouterr().out)
        assert (answer["exit_status"], answer["running"]) == (4, False) and "no state in" in answer["error"]

    def test_state_dir_from_config(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """With --config, status looks where that config's daemon keeps its state."""
        state = make_state(tmp_path / "elsewhere")
        config = tmp_path / "gw.toml"
        config.write_text(f'state_dir = "{state}"\n')
        assert main(["status", "--config", str(config), "--json"]) == 3
        assert json.loads(capsys.readouterr().out)["state_dir"] == str(state)

    def test_bad_config_is_reported(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An invalid config is named, not a traceback."""
        config = tmp_path / "gw.toml"
        config.write_text("device = 'tpu'\n")
        assert main(["status", "--config", str(config)]) == 2
        assert "device" in capsys.readouterr().err

    def test_an_invalid_edit_does_not_hide_the_daemons_state(self, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
        """The daemon runs on the configuration it started with; an edit that does not load yet (a bad value, a
        TOML error further down) is said, and the state its state_dir names is still shown."""
        state = make_state(tmp_path)
        config = tmp_path / "gw.toml"
        for broken in ("device = 'tpu'\n", "[presets.fast\nbatch_size = 2\n"):
            config.write_text(f'state_dir = "{state}"\n' + broken)
            assert main(["status", "--config", str(config)]) == 3  # the state is there; no daemon runs
            captured = capsys.readouterr()
            assert "warning:" in captured.err and f"showing the state in {state}" in captured.err
            assert "/hot/fast" in captured.out


def test_snapshot_file_is_not_world_readable(tmp_path: Path) -> None:
    """status.json is written 0640 at most (it names folders), whatever the umask."""
    old = os.umask(0)
    try:
        status.write_snapshot(
            tmp_path / "status.json", Snapshot.current(device="cpu", batch_caps={}, paused={})
        )
    finally:
        os.umask(old)
    assert (tmp_path / "status.json").stat().st_mode & 0o777 == 0o640


def test_status_init_and_models_list_start_without_torch() -> None:
    """`status` is run by hand and by scripts every few seconds: it reads the job table and a JSON file, and
    must not spend seconds and hundreds of MB importing torch (nor must `init` and the configuration code)."""
    code = ("import sys, daemon.status, daemon.layout, daemon.settings, daemon.modelfiles, gpen_engine.registry; "
            "print(sorted(m for m in ('torch', 'cv2', 'facexlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("pid", [0, -1, 1, 2**40])
def test_a_snapshot_with_an_impossible_pid_is_refused(pid: int) -> None:
    """os.kill(0 or -1, 0) asks about a whole process group, and a huge pid overflows: not a daemon's pid."""
    with pytest.raises(SnapshotError):
        Snapshot.from_dict({"pid": pid, "started_at": 1.0, "updated_at": 1.0, "version": "x", "device": "cpu"})
