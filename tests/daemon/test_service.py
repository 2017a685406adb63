"""The service's own loops, driven in-process (the real daemon process is in test_service_e2e/_lifecycle)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from daemon import paths, publish, service
from daemon.cli import main
from daemon.jobs import JobStateError, JobTable
from daemon.paths import Mount, mount_below, remount_is_safe
from daemon.settings import FolderSettings, engine_options, hot_folders, load_settings
from daemon.watch import FolderWatcher
from tests.daemon.harness import TINY_ARCH, have_shared_data, write_config


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


# ----------------------------------------------------------------- mounts re-recorded on reload (SIGHUP)
# A fake mount table (no root needed); tests/daemon/test_reload.py does the same with real tmpfs mounts.
ROOT_FS = "1 0 8:1 / / rw - ext4 /dev/sda rw\n"


def tmpfs_at(path: Path, ident: int = 40) -> str:
    return f"{ident} 1 0:{ident} / {os.path.realpath(path)} rw - tmpfs share{ident} rw\n"


class TestRemountRule:
    """paths.remount_is_safe: which mount a reload may take for a folder recorded on another one."""

    srv = Mount("/srv", "ext4", "/dev/sdb")
    share = Mount("/srv/share/out", "nfs4", "nas:/out")

    @pytest.mark.parametrize(("current", "safe"), [
        (Mount("/srv/share", "nfs4", "nas:/"), True),  # the share mounted one level higher
        (Mount("/srv", "nfs4", "nas:/"), True),  # ... or stacked on the disk under it
        (Mount("/srv/share/out/deeper", "nfs4", "nas:/x"), True),  # something mounted deeper: a real mount
        (Mount("/mnt/other", "nfs4", "nas:/y"), True),  # elsewhere (a link re-pointed): a real mount
        (Mount("/srv", "ext4", "/dev/sdb"), False),  # unmounted: fell through to the disk under it
        (Mount("/", "ext4", "/dev/sda"), False),  # that disk unmounted too: shallower still
    ])
    def test_a_shallower_mount_is_taken_only_if_it_is_not_what_lay_under_the_share(self, current, safe):
        assert remount_is_safe(current, self.share, self.srv) is safe

    def test_without_knowing_what_lay_under_it_nothing_shallower_is_taken(self):
        assert not remount_is_safe(Mount("/srv/share", "nfs4", "nas:/"), self.share, None)

    def test_what_a_mount_covers(self):
        table = ROOT_FS + "2 1 8:2 / /srv rw - ext4 /dev/sdb rw\n" + "3 2 0:3 / /srv/share/out rw - nfs4 nas:/out rw\n"
        assert mount_below(self.share, table) == self.srv
        assert mount_below(self.srv, table) == Mount("/", "ext4", "/dev/sda")
        assert mount_below(Mount("/", "ext4", "/dev/sda"), table) is None


class TestMountsOnReload:
    """The service's record of each output folder's mount: kept from start-up, re-taken on reload where safe."""

    @pytest.fixture
    def table(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
        table = {"text": ROOT_FS}
        monkeypatch.setattr(paths, "read_mountinfo", lambda: table["text"])
        return table

    @pytest.fixture
    def svc(self, tmp_path: Path):
        config = tmp_path / "gpen-watch.toml"
        config.write_text(f'root = "{tmp_path}"\n')
        settings = load_settings(config)
        folders = hot_folders(settings)[:1]
        svc = service.Service(settings, folders)
        svc._make_folders(folders)
        yield svc
        svc.publish_pool.shutdown()
        svc.read_pool.shutdown()

    @staticmethod
    def output(svc: service.Service) -> Path:
        return next(iter(svc.folders.values())).output

    def test_a_share_moved_one_level_higher_is_taken_on_reload(self, svc, table) -> None:
        out = self.output(svc)
        table["text"] = ROOT_FS + tmpfs_at(out)
        svc._note_mounts(svc.folders.values())  # start-up
        table["text"] = ROOT_FS + tmpfs_at(out.parent, 41)  # the share now mounted one level higher
        with pytest.raises(publish.ShareUnavailable, match="no longer mounted"):
            svc._check_mounted(out)  # until the operator reloads
        svc._note_mounts(svc.folders.values(), reload=True)
        svc._check_mounted(out)
        assert svc.share_mounts[out].mount_point == os.path.realpath(out.parent)

    def test_an_unmounted_share_is_not_taken_on_reload(self, svc, table) -> None:
        out = self.output(svc)
        table["text"] = ROOT_FS + tmpfs_at(out)
        svc._note_mounts(svc.folders.values())
        table["text"] = ROOT_FS  # unmounted: the folder is the empty mount point on the local disk
        svc._note_mounts(svc.folders.values(), reload=True)
        with pytest.raises(publish.ShareUnavailable, match="no longer mounted"):
            svc._check_mounted(out)
        table["text"] = ROOT_FS + tmpfs_at(out, 42)  # mounted again where it was
        svc._check_mounted(out)

    def test_a_share_mounted_after_start_is_guarded_once_reloaded(self, svc, table) -> None:
        out = self.output(svc)
        svc._note_mounts(svc.folders.values())  # on the local disk at start-up
        table["text"] = ROOT_FS + tmpfs_at(out)
        svc._note_mounts(svc.folders.values(), reload=True)
        table["text"] = ROOT_FS
        with pytest.raises(publish.ShareUnavailable, match="no longer mounted"):
            svc._check_mounted(out)


class TestHotFolderMountOnReload:
    """What the service's reload asks of each running watcher (FolderWatcher.reload_mount), with a fake table."""

    def make(self, hot: Path, table: dict[str, str], events: list[str]) -> FolderWatcher:
        folder = FolderSettings(path=hot, output=hot.parent / "out", backup=hot.parent / "backup",
                                failed=hot.parent / "failed", watch="poll")
        return FolderWatcher(
            folder, extensions=[".jpg"], poll_interval=0.01, rescan_interval=30.0, excluded=[],
            on_candidates=lambda found: None, on_pause=lambda why: events.append("pause"),
            on_resume=lambda: events.append("resume"), on_problem=lambda message: None,
            mountinfo=lambda: table["text"],
        )

    def test_a_paused_folder_resumes_on_reload_only_if_its_share_moved_up(self, tmp_path: Path) -> None:
        hot = tmp_path / "share" / "in"
        hot.mkdir(parents=True)
        table, events = {"text": ROOT_FS + tmpfs_at(hot)}, []
        watcher = self.make(hot, table, events)
        watcher.step()
        table["text"] = ROOT_FS  # unmounted
        watcher.step()
        watcher.reload_mount()
        watcher.step()
        assert events == ["pause"]  # the empty mount point is not taken
        table["text"] = ROOT_FS + tmpfs_at(hot.parent, 41)  # mounted one level higher
        watcher.step()
        assert events == ["pause"]  # until a reload
        watcher.reload_mount()
        watcher.step()
        assert events == ["pause", "resume"]
        assert watcher.unavailable_reason() is None


# ----------------------------------------------------------------- the readiness gate's pool
class TestGatePool:
    """Quiet files are read, decoded and hashed on a pool: a slow one does not hold up the others."""

    @pytest.fixture
    def gate(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        config = tmp_path / "gpen-watch.toml"
        config.write_text(f'root = "{tmp_path}"\nio_threads = 2\n'
                          f'[[folders]]\npath = "{tmp_path / "in"}"\noutput = "{tmp_path / "out"}"\n'
                          f'backup = "{tmp_path / "backup"}"\nfailed = "{tmp_path / "failed"}"\n'
                          'stability_delay = 0.0\n')
        settings = load_settings(config)
        (tmp_path / "in").mkdir()
        release = threading.Event()
        real = service.imageio.check_complete

        def check(data: bytes, *, max_pixels: int) -> tuple[int, int]:
            if data.startswith(b"SLOW"):  # a huge scan: its decode takes until the test lets it finish
                assert release.wait(20)
                return (1, 1)
            return real(data, max_pixels=max_pixels)

        monkeypatch.setattr(service.imageio, "check_complete", check)
        svc = service.Service(settings, hot_folders(settings))
        svc.jobs = JobTable.open(tmp_path / "jobs.sqlite3")
        loop = threading.Thread(target=svc._gate_loop)
        yield svc, tmp_path / "in", release, loop
        release.set()
        svc.stop_event.set()
        if loop.is_alive():
            loop.join(20)
        svc.publish_pool.shutdown()
        svc.read_pool.shutdown()
        svc.jobs.close()

    @staticmethod
    def wait_for(condition, seconds: float = 20.0) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.02)
        return False

    def test_a_slow_check_does_not_hold_up_the_files_behind_it(self, gate) -> None:
        svc, hot, release, loop = gate

        (hot / "a-scan.tif").write_bytes(b"SLOW" + bytes(1000))
        Image.new("RGB", (32, 24), (200, 120, 40)).save(hot / "b-photo.png")
        slow = svc.jobs.note_candidate(str(hot), "a-scan.tif", "fast")
        quick = svc.jobs.note_candidate(str(hot), "b-photo.png", "fast")
        loop.start()
        assert self.wait_for(lambda: svc.jobs.get(quick.id).state == "ready")
        assert svc.jobs.get(slow.id).state == "pending"  # still being checked, not given up on
        release.set()
        assert self.wait_for(lambda: svc.jobs.get(slow.id).state == "ready")
        assert svc.jobs.get(slow.id).sha256 == hashlib.sha256((hot / "a-scan.tif").read_bytes()).hexdigest()

    def test_a_stuck_check_stops_the_gate_s_heartbeat(self, gate) -> None:
        """A read that hangs (a dead share) must reach the systemd watchdog, as it did when checks ran inline."""
        svc, hot, release, loop = gate
        (hot / "stuck.tif").write_bytes(b"SLOW" + bytes(1000))
        svc.jobs.note_candidate(str(hot), "stuck.tif", "fast")
        loop.start()
        assert self.wait_for(lambda: svc.heartbeats.stale(0.5) == ["gate"])
        release.set()
        assert self.wait_for(lambda: svc.heartbeats.stale(0.5) == [])


# ----------------------------------------------------------------- the root folder
class TestRootFolder:
    @pytest.fixture(autouse=True)
    def no_serving(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Up to the point where the daemon would load models and watch: the folders it creates first."""
        monkeypatch.delenv("GPEN_WATCH_CONFIG", raising=False)
        monkeypatch.setattr(service.Service, "serve", lambda svc: svc._make_folders(svc.folders.values()) or 0)

    def test_a_root_named_on_the_command_line_is_created_with_its_layout(self, tmp_path: Path) -> None:
        """The README's first command, on a machine where ~/gpen-watch does not exist yet."""
        root = tmp_path / "home" / "gpen-watch"
        assert main(["run", "--root", str(root)]) == 0
        for kind in ("in", "out", "backup", "failed"):
            assert (root / kind / "fast").is_dir()

    def test_a_root_from_a_config_file_is_not_created(self, tmp_path: Path) -> None:
        """It may be an unmounted share's mount point: nothing is made on the local disk in its place."""
        root = tmp_path / "share" / "gpen-watch"
        config = tmp_path / "gpen-watch.toml"
        config.write_text(f'root = "{root}"\n')
        assert main(["run", "--config", str(config)]) == 0
        assert not root.exists()

    def test_configured_folders_are_never_made_under_an_empty_mount_point(self, tmp_path: Path) -> None:
        """[[folders]] whose share is not mounted (its empty mount point is there): neither the output, backup and
        failed folders nor the hot folder are made on the local disk; a done folder beside an existing backup
        folder is."""
        share, hot = tmp_path / "share", tmp_path / "in"
        share.mkdir()
        hot.mkdir()
        (tmp_path / "bk").mkdir()
        config = tmp_path / "gpen-watch.toml"
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\n'
            f'[[folders]]\npath = "{share / "hot"}"\noutput = "{share / "out"}"\nbackup = "{share / "bk"}"\n'
            f'failed = "{share / "failed"}"\n'
            f'[[folders]]\npath = "{hot}"\noutput = "{tmp_path / "out"}"\nbackup = "{tmp_path / "bk"}"\n'
            f'failed = "{tmp_path / "failed"}"\nafter = "move"\ndone = "{tmp_path / "done"}"\n')
        assert main(["run", "--config", str(config)]) == 0
        assert list(share.iterdir()) == []
        assert not (tmp_path / "out").exists() and not (tmp_path / "failed").exists()
        assert (tmp_path / "done").is_dir()


@pytest.mark.parametrize(("relpath", "fmt", "converted", "suffix"), [
    ("a/p.JPG", "JPEG", True, ".JPG"),  # the source's own spelling of the format stays
    ("p.jpeg", "JPEG", True, ".jpeg"),
    ("scan.tiff", "TIFF", True, ".tiff"),
    ("p.jpg", "PNG", True, ".png"),  # converted by output_format = "PNG": a PNG named .jpg by mistake, too
    ("p.png", "JPEG", True, ".jpg"),
    ("p.jpg", "PNG", False, ".jpg"),  # written as it came (PNG bytes named .jpg): the input's name, documented
])
def test_a_converted_result_is_named_for_the_format_it_holds(relpath: str, fmt: str, converted: bool,
                                                              suffix: str) -> None:
    """So that output_format and collisions = "overwrite" see one result name per source name."""
    assert service._suffix(relpath, fmt, converted=converted) == suffix


@pytest.mark.skipif(not have_shared_data(), reason="needs ../shared (detector weights)")
def test_models_of_a_refused_reload_do_not_stay_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload whose new model loads but fails its warm-up (out of memory, say) is refused, and the new model
    does not stay in memory beside the running presets' models."""
    config, _ = write_config(tmp_path)
    shutil.copyfile(tmp_path / "models" / "tiny-gpen.pth", tmp_path / "models" / "other.pth")
    text = config.read_text().replace("[[models]]", '[[models]]\nname = "other"\npath = "other.pth"\n'
                                      + "\n".join(f"{k} = {v}" for k, v in TINY_ARCH.items()) + "\n[[models]]")
    config.write_text(text + '[presets.big]\nbase = "test"\nmodel = "other"\n')
    settings = load_settings(config)
    svc = service.Service(settings, hot_folders(settings))
    svc._load_presets({"test": svc.presets["test"]})
    running = dict(svc.models)

    def warm_up(restorer: object) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(svc, "_warm_up", warm_up)
    with pytest.raises(RuntimeError, match="out of memory"):
        svc._load_presets({"big": svc.presets["big"]})
    assert svc.models == running
    assert set(svc.restorers) == {"test"}


def _service_on_its_first_folder(root: Path, extra: str = "") -> tuple[service.Service, str, FolderSettings]:
    """A Service (not started) on the simple layout under ``root``, its folders made and a job table open."""
    config = root / "gpen-watch.toml"
    config.write_text(f'root = "{root}"\n{extra}\n')
    settings = load_settings(config)
    svc = service.Service(settings, hot_folders(settings))
    svc._make_folders(svc.folders.values())
    svc.jobs = JobTable.open(root / "jobs.sqlite3")
    key, folder = next(iter(svc.folders.items()))
    return svc, key, folder


def test_a_skipped_duplicate_cannot_be_claimed_while_it_is_being_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """duplicates = "skip": removing the duplicate reads and hashes it first. Meanwhile its row is not in the queue,
    so the prep thread cannot take it and restore a file that is skipped (and, read-only, publish it twice)."""
    from daemon.readiness import READY, Verdict

    svc, key, folder = _service_on_its_first_folder(tmp_path, 'duplicates = "skip"')
    data = b"the same bytes" * 1000
    digest = hashlib.sha256(data).hexdigest()
    first = svc.jobs.note_candidate(key, "first.jpg", folder.preset)
    svc.jobs.mark_ready(first.id, len(data), 1, digest)
    (claimed,) = svc.jobs.claim(folder.preset, 1)
    svc.jobs.finish(claimed.id, 1)
    dup = folder.path / "dup.jpg"
    dup.write_bytes(data)
    st = dup.stat()
    job = svc.jobs.note_candidate(key, "dup.jpg", folder.preset, size=st.st_size, mtime_ns=st.st_mtime_ns)
    taken: list[object] = []
    dispose = publish.dispose_source

    def racing_dispose(*args: object, **kw: object) -> object:
        taken.extend(svc.jobs.claim(folder.preset, 8))  # what the prep thread would do meanwhile
        return dispose(*args, **kw)

    monkeypatch.setattr(publish, "dispose_source", racing_dispose)

    class Gate:
        def forget(self, job_id: int) -> None:
            pass

    svc._settle_look(Gate(), folder, job, dup,  # type: ignore[arg-type]
                     Verdict(READY, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=digest))
    assert taken == []
    row = svc.jobs.get(job.id)
    assert (row.state, row.sha256, row.size) == ("skipped", digest, st.st_size)
    assert not dup.exists()
    svc.jobs.close()


def test_a_crash_loop_file_that_cannot_leave_its_folder_is_copied_to_failed_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that kept killing the daemon, in a hot folder that will not let it go: failed/ gets one copy with its
    reason, not one more at every start."""
    import errno

    svc, key, folder = _service_on_its_first_folder(tmp_path)
    bomb = folder.path / "bomb.jpg"
    bomb.write_bytes(b"kills the decoder")
    st = bomb.stat()
    job = svc.jobs.note_candidate(key, "bomb.jpg", folder.preset, size=st.st_size, mtime_ns=st.st_mtime_ns)
    svc.jobs.mark_ready(job.id, st.st_size, st.st_mtime_ns, "0" * 64)
    svc.jobs.claim(folder.preset, 1)
    svc.jobs.requeue_in_flight(max_attempts=1)
    real_rename, real_unlink = os.rename, os.unlink

    def rename(src: object, dst: object, **kw: object) -> None:
        if src == "bomb.jpg":
            raise OSError(errno.EROFS, "Read-only file system")
        real_rename(src, dst, **kw)  # type: ignore[arg-type]

    def unlink(name: object, **kw: object) -> None:
        if name == "bomb.jpg":
            raise OSError(errno.EROFS, "Read-only file system")
        real_unlink(name, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "unlink", unlink)
    for _ in range(3):  # three starts
        svc._settle_crash_loops()
    assert sorted(p.name for p in folder.failed.iterdir()) == ["bomb.jpg", "bomb.jpg.error.json"]
    assert bomb.exists() and "could not be removed" in (svc.jobs.get(job.id).kept or "")
    svc.jobs.close()


def _queued(svc: service.Service, key: str, folder: FolderSettings, relpath: str, data: bytes) -> int:
    """A file dropped into ``folder`` and judged ready: the id of its job."""
    path = folder.path / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    st = path.stat()
    assert svc.jobs is not None
    job = svc.jobs.note_candidate(key, relpath, folder.preset, size=st.st_size, mtime_ns=st.st_mtime_ns)
    svc.jobs.mark_ready(job.id, st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())
    return job.id


def _claimed_batch(svc: service.Service, folder: FolderSettings) -> service.Batch:
    """Every ready job of the folder's preset in one batch; each image's working copy is its relpath."""
    assert svc.jobs is not None
    items = [service.Prepared(job, folder, folder.path / job.relpath, b"", None, job.relpath, 0.0)  # type: ignore[arg-type]
             for job in svc.jobs.claim(folder.preset, 8)]
    return service.Batch(folder.preset, items, "batch-1")


def test_a_kept_original_counts_as_published_only_where_the_job_table_knows_nothing_of_it(tmp_path: Path) -> None:
    """after = "keep" with a lost job table: a backup with the same bytes and a result of the name say the original
    was published; not where another folder's job made those names (folders may share an outputs folder): that is
    another file's. (Nor where the table has an earlier row of the file: ``JobTable.remembers``.)"""
    svc, key, folder = _service_on_its_first_folder(tmp_path)
    try:
        assert svc.jobs is not None
        photo = b"the photo's bytes" * 100
        digest = hashlib.sha256(photo).hexdigest()
        (folder.backup / "p.jpg").write_bytes(photo)
        (folder.output / "p.jpg").write_bytes(b"its result")
        job = svc.jobs.note_candidate(key, "p.jpg", folder.preset)
        assert svc._published_before(folder, job, digest)
        assert not svc._published_before(folder, job, hashlib.sha256(b"other bytes").hexdigest())
        other = svc.jobs.note_candidate("/srv/another-hot-folder", "p.jpg", folder.preset)
        svc.jobs.mark_ready(other.id, len(photo), 1, digest)
        (claimed,) = svc.jobs.claim(folder.preset, 1)
        assert svc.jobs.set_targets(claimed.id, str(folder.output / "p.jpg"), str(folder.backup / "p.jpg"))
        assert not svc._published_before(folder, job, digest)
    finally:
        svc.publish_pool.shutdown()
        svc.read_pool.shutdown()
        assert svc.jobs is not None
        svc.jobs.close()


def test_a_file_waits_unread_while_its_output_share_is_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the outputs share unmounted, a claimed file is not decoded and restored only to fail publishing (at every
    retry, for as long as the share is away): it waits, its original untouched, and the wait names the share."""
    table = {"text": ROOT_FS}
    monkeypatch.setattr(paths, "read_mountinfo", lambda: table["text"])
    svc, key, folder = _service_on_its_first_folder(tmp_path)
    try:
        table["text"] = ROOT_FS + tmpfs_at(folder.output)
        svc._note_mounts(svc.folders.values())
        photo = io.BytesIO()
        Image.new("RGB", (64, 48), "gray").save(photo, "JPEG")
        job_id = _queued(svc, key, folder, "a.jpg", photo.getvalue())
        table["text"] = ROOT_FS  # the share unmounted: its empty mount point is on the local disk
        (job,) = svc.jobs.claim(folder.preset, 1)
        assert svc._with_shares_there([job]) == []  # the prep thread reads none of them
        waiting = svc.jobs.get(job_id)
        assert waiting.state == "retry"
        assert "is no longer mounted" in (waiting.last_error or "")
        assert (folder.path / "a.jpg").read_bytes() == photo.getvalue()
    finally:
        svc.publish_pool.shutdown()
        svc.read_pool.shutdown()
        svc.jobs.close()


class _Engine:
    """Returns each image as it came, except that a run holding an image named in ``breaks_on`` raises.

    ``dead``: the device test (a blank image) raises as well, as on a lost GPU."""

    def __init__(self, breaks_on: set[str], error: str = "numerical error in one face's alignment", *,
                 dead: bool = False, oom: bool = False) -> None:
        self.breaks_on, self.error, self.dead, self.oom = breaks_on, error, dead, oom
        self.runs: list[list[str]] = []
        self.checks = 0

    def run(self, preset: str, images: list[str]) -> list[str]:
        self.runs.append(list(images))
        if self.breaks_on & set(images):
            if self.oom:
                import torch

                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError(self.error)
        return [f"restored {image}" for image in images]

    def check(self, preset: str) -> None:
        self.checks += 1
        if self.dead:
            raise RuntimeError(self.error)


def _published_by(svc: service.Service, monkeypatch: pytest.MonkeyPatch, folder: FolderSettings) -> list[str]:
    """What the batch sends on to publishing (recorded, not written), with the preset's restorer in place."""
    published: list[str] = []
    monkeypatch.setattr(svc, "_publish", lambda item, outcome, opts: published.append(outcome))

    class Restorer:
        preset = svc.presets[folder.preset]

    svc.restorers[folder.preset] = Restorer()  # type: ignore[assignment]
    return published


def test_an_image_that_breaks_the_engine_fails_alone_and_its_batch_mates_are_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One photo whose processing raises must not charge its attempts to the good photos batched with it."""
    svc, key, folder = _service_on_its_first_folder(tmp_path, "max_attempts = 1")
    published = _published_by(svc, monkeypatch, folder)
    bad = _queued(svc, key, folder, "bad.jpg", b"bad" * 100)
    good = [_queued(svc, key, folder, f"good{i}.jpg", b"good%d" % i * 100) for i in range(3)]
    svc.executor = _Engine(breaks_on={"bad.jpg"})  # type: ignore[assignment]
    svc._run_batch(_claimed_batch(svc, folder))
    svc.publish_pool.shutdown(wait=True)
    assert sorted(published) == ["restored good0.jpg", "restored good1.jpg", "restored good2.jpg"]
    assert svc.jobs is not None
    assert svc.jobs.get(bad).state == "failed"
    sidecar = json.loads((folder.failed / "bad.jpg.error.json").read_text())
    assert "numerical error" in sidecar["error"]
    assert [svc.jobs.get(g).attempts for g in good] == [1, 1, 1]  # their one claim; no failure charged
    svc.jobs.close()


def test_a_batch_that_fails_on_a_path_turned_into_a_link_settles_every_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device fails a batch for good while a subfolder of the hot folder has been swapped for a link: each
    file still ends somewhere (the one behind the link left in place with its reason), none stays "processing"."""
    svc, key, folder = _service_on_its_first_folder(tmp_path, "max_attempts = 1")
    published = _published_by(svc, monkeypatch, folder)
    inside = _queued(svc, key, folder, "sub/a.jpg", b"a" * 100)
    beside = _queued(svc, key, folder, "z.jpg", b"z" * 100)
    svc.executor = _Engine(breaks_on={"sub/a.jpg", "z.jpg"}, error="CUDA error: an illegal memory access")  # type: ignore[assignment]
    batch = _claimed_batch(svc, folder)
    (folder.path / "sub").rename(tmp_path / "elsewhere")
    (folder.path / "sub").symlink_to(tmp_path / "elsewhere")
    svc._run_batch(batch)
    assert svc.jobs is not None
    assert (svc.jobs.get(inside).state, svc.jobs.get(beside).state) == ("failed", "failed")
    assert (tmp_path / "elsewhere" / "a.jpg").read_bytes() == b"a" * 100  # never followed, never moved
    assert (folder.failed / "z.jpg").read_bytes() == b"z" * 100
    assert published == []
    svc.jobs.close()


class TestDeviceLost:
    """Every file of a batch fails and a blank test image fails too: the device is broken, not the files."""

    LOST = "CUDA error: an illegal memory access was encountered"

    def test_the_batch_goes_back_uncharged_and_the_daemon_exits_for_a_restart(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Nothing goes to failed/ (before, a lost GPU sent the whole queue there, max_attempts tries each); the
        batch's files are queued again as suspects (one at a time after the restart) and the rest is untouched."""
        svc, key, folder = _service_on_its_first_folder(tmp_path, "max_attempts = 3")
        published = _published_by(svc, monkeypatch, folder)
        names = [f"p{i}.jpg" for i in range(3)]
        in_batch = [_queued(svc, key, folder, name, name.encode() * 100) for name in names]
        batch = _claimed_batch(svc, folder)
        waiting = _queued(svc, key, folder, "later.jpg", b"later" * 100)
        engine = _Engine(breaks_on=set(names), error=self.LOST, dead=True)
        svc.executor = engine  # type: ignore[assignment]
        svc._run_batch(batch)
        assert svc.jobs is not None
        assert published == [] and list(folder.failed.iterdir()) == []
        rows = [svc.jobs.get(i) for i in in_batch]
        assert [(r.state, r.crashes, r.attempts) for r in rows] == [("ready", 1, 1)] * 3
        assert all(self.LOST in (r.last_error or "") for r in rows)
        assert (svc.jobs.get(waiting).state, svc.jobs.get(waiting).attempts) == ("ready", 0)
        assert engine.checks == 1
        assert svc.stop_event.is_set() and svc.exit_status == service.EXIT_DEVICE_LOST
        assert svc.device_name.startswith("lost (") and self.LOST in svc.device_name
        assert all((folder.path / name).read_bytes() == name.encode() * 100 for name in names)
        assert len(svc.jobs.claim(folder.preset, 8)) == 1  # suspects run alone
        svc.jobs.close()

    def test_a_file_that_breaks_the_device_every_time_fails_after_max_attempts(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Counted as crashes, so a photo that really does break the device cannot restart the daemon forever."""
        svc, key, folder = _service_on_its_first_folder(tmp_path, "max_attempts = 2")
        _published_by(svc, monkeypatch, folder)
        job = _queued(svc, key, folder, "killer.jpg", b"k" * 100)
        svc.executor = _Engine(breaks_on={"killer.jpg"}, error=self.LOST, dead=True)  # type: ignore[assignment]
        for _ in range(2):  # the restart gets a working device, and the same photo breaks it again
            svc._run_batch(_claimed_batch(svc, folder))
        assert svc.jobs is not None
        assert (svc.jobs.get(job).state, svc.jobs.get(job).error_stage) == ("failed", "crash")
        assert (folder.failed / "killer.jpg").read_bytes() == b"k" * 100
        sidecar = json.loads((folder.failed / "killer.jpg.error.json").read_text())
        assert sidecar["stage"] == "crash" and self.LOST in sidecar["error"]
        svc.jobs.close()

    def test_a_healthy_device_leaves_the_files_to_blame(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The same failures with a device that still computes: the files are charged and the daemon runs on."""
        svc, key, folder = _service_on_its_first_folder(tmp_path, "max_attempts = 1")
        _published_by(svc, monkeypatch, folder)
        job = _queued(svc, key, folder, "p.jpg", b"p" * 100)
        engine = _Engine(breaks_on={"p.jpg"}, error="index 401 is out of bounds")
        svc.executor = engine  # type: ignore[assignment]
        svc._run_batch(_claimed_batch(svc, folder))
        assert svc.jobs is not None
        assert engine.checks == 1 and svc.jobs.get(job).state == "failed" and not svc.stop_event.is_set()
        svc.jobs.close()

    def test_a_device_too_full_for_the_test_is_not_lost(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The files fail for a reason of their own and the blank test image runs out of memory (another process
        holds the GPU's memory): the device still computes, so the files are charged and the daemon runs on."""
        import torch

        svc, key, folder = _service_on_its_first_folder(tmp_path, "max_attempts = 1")
        _published_by(svc, monkeypatch, folder)
        job = _queued(svc, key, folder, "p.jpg", b"p" * 100)
        engine = _Engine(breaks_on={"p.jpg"}, error="index 401 is out of bounds")

        def full(preset: str) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

        engine.check = full  # type: ignore[method-assign]
        svc.executor = engine  # type: ignore[assignment]
        svc._run_batch(_claimed_batch(svc, folder))
        assert svc.jobs is not None
        assert svc.jobs.get(job).state == "failed" and not svc.stop_event.is_set() and svc.exit_status == 0
        svc.jobs.close()

    def test_running_out_of_memory_is_not_a_lost_device(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        svc, key, folder = _service_on_its_first_folder(tmp_path, "max_attempts = 1")
        _published_by(svc, monkeypatch, folder)
        job = _queued(svc, key, folder, "p.jpg", b"p" * 100)
        engine = _Engine(breaks_on={"p.jpg"}, dead=True, oom=True)
        svc.executor = engine  # type: ignore[assignment]
        svc._run_batch(_claimed_batch(svc, folder))
        assert svc.jobs is not None
        assert engine.checks == 0 and svc.jobs.get(job).state == "retry" and not svc.stop_event.is_set()
        svc.jobs.close()


def test_an_error_preparing_one_file_fails_that_file_and_its_batch_mates_reach_the_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error while reading or preparing one image (a bug, memory running out for one huge decode)
    is that file's: it is charged its attempts, and the other files of the claim are batched as usual."""
    from dataclasses import replace

    svc, key, folder = _service_on_its_first_folder(tmp_path, "max_attempts = 1\nmax_batch_delay = 0")

    class Restorer:
        preset = replace(svc.presets[folder.preset], max_long_side=None)

        def prepare(self, rgb: object) -> str:
            if rgb[0, 0, 0] == 255:  # type: ignore[index]
                raise ValueError("a bug in resizing this one image")
            return "working"

    svc.restorers[folder.preset] = Restorer()  # type: ignore[assignment]

    def png(color: tuple[int, int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), color).save(buf, "PNG")
        return buf.getvalue()

    bad = _queued(svc, key, folder, "bad.png", png((255, 0, 0)))
    good = _queued(svc, key, folder, "good.png", png((0, 0, 0)))
    batch = svc._next_batch()
    assert batch is not None and [item.job.id for item in batch.items] == [good]
    assert svc.jobs is not None
    assert svc.jobs.get(bad).state == "failed"
    assert "a bug in resizing" in json.loads((folder.failed / "bad.png.error.json").read_text())["error"]
    svc.jobs.close()


def test_a_published_file_whose_original_vanished_before_its_move_is_done_not_gone(tmp_path: Path) -> None:
    """after = "move": result and backup are written, then the original is removed by someone else before it can
    be moved. The work is complete, so the row ends "done", not "gone" (the state for a file never processed)."""
    import numpy as np

    from gpen_engine import imageio
    from gpen_engine.types import Face, RestoredImage

    svc, key, folder = _service_on_its_first_folder(tmp_path)
    folder = folder.model_copy(update={"after": "move", "done": tmp_path / "done"})
    svc.folders[key] = folder
    (tmp_path / "done").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, "PNG")
    job_id = _queued(svc, key, folder, "p.png", buf.getvalue())
    assert svc.jobs is not None
    (claimed,) = svc.jobs.claim(folder.preset, 1)
    image = imageio.decode(buf.getvalue())
    item = service.Prepared(claimed, folder, folder.path / "p.png", buf.getvalue(), image, None, 0.0)  # type: ignore[arg-type]

    def hit(name: str) -> None:
        if name == "dispose":
            (folder.path / "p.png").unlink()

    svc.failpoints.hit = hit  # type: ignore[method-assign]
    face = Face(box=np.array([1, 1, 20, 20], np.float32), landmarks=np.zeros((5, 2), np.float32), score=0.99)
    svc._publish(item, RestoredImage(rgb=image.rgb, faces=[face, face]),
                 engine_options(svc.settings, svc.presets[folder.preset]))
    row = svc.jobs.get(job_id)
    assert (row.state, row.faces, svc.counters["done"], svc.counters["faces"]) == ("done", 2, 1, 2)
    assert row.output_path and Path(row.output_path).exists()
    assert row.backup_path and Path(row.backup_path).read_bytes() == buf.getvalue()
    svc.jobs.close()


def test_host_memory_running_out_while_preparing_one_file_is_retried_not_failed(tmp_path: Path) -> None:
    """Memory runs out while a big file decodes next to others: that passes, so the file is tried again later
    (with a reason that says so), never sent to failed/ for it."""
    from dataclasses import replace

    svc, key, folder = _service_on_its_first_folder(tmp_path, "max_attempts = 1\nmax_batch_delay = 0")

    class Restorer:
        preset = replace(svc.presets[folder.preset], max_long_side=None)

        def prepare(self, rgb: object) -> str:
            raise MemoryError

    svc.restorers[folder.preset] = Restorer()  # type: ignore[assignment]
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    job = _queued(svc, key, folder, "big.png", buf.getvalue())
    assert svc._next_batch() is None
    assert svc.jobs is not None
    row = svc.jobs.get(job)
    assert (row.state, row.last_error) == ("retry", "read: MemoryError")
    assert list(folder.failed.iterdir()) == []
    svc.jobs.close()


def test_waiting_on_slow_publishing_keeps_the_device_alive_while_publishes_finish(tmp_path: Path) -> None:
    """The device thread waits for a slow share to take its results. Each finished publish shows it alive, so a
    long but moving queue keeps the watchdog fed; a publish that hangs lets the heartbeat go stale."""
    from concurrent.futures import Future

    svc, _key, _folder = _service_on_its_first_folder(tmp_path)
    pending: list[Future[None]] = [Future() for _ in range(4)]
    for future in pending:
        svc.in_flight.add(future)
        future.add_done_callback(svc._publish_done)
    svc.heartbeats.beat("device")
    waiting = threading.Thread(target=svc._wait_for_publishing, args=(1,), daemon=True)
    waiting.start()
    for future in pending[:3]:  # three publishes finish, slowly: together longer than the limit, never stale
        time.sleep(0.3)
        assert svc.heartbeats.stale(0.5) == []
        future.set_result(None)
        time.sleep(0.05)
    assert not waiting.is_alive()
    svc.in_flight.add(Future())  # one that hangs
    svc.in_flight.add(Future())
    waiting = threading.Thread(target=svc._wait_for_publishing, args=(1,), daemon=True)
    waiting.start()
    time.sleep(0.8)
    assert svc.heartbeats.stale(0.5) == ["device"]
    svc.in_flight.clear()
    waiting.join(timeout=5)
    assert svc.jobs is not None
    svc.jobs.close()


@pytest.mark.parametrize("when", ["at the gate", "while processing"])
def test_a_file_moved_to_failed_just_before_a_crash_is_recorded_as_failed_not_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """The process dies between moving a failed file into failed/ and writing the failure down. At the next start
    the file is missing from the hot folder: it is recorded as failed (with its reason), not as vanished, so
    `status` lists it among the failures. A file that really vanished is still gone."""
    from daemon.readiness import Verdict

    svc, key, folder = _service_on_its_first_folder(tmp_path)
    assert svc.jobs is not None
    jobs = svc.jobs
    ids = {}
    for name in ("bad.jpg", "lost.jpg"):
        if when == "at the gate":  # seen, not judged yet: no hash
            (folder.path / name).write_bytes(b"Dear colleague, not a photo")
            ids[name] = jobs.note_candidate(key, name, folder.preset).id
        else:
            ids[name] = _queued(svc, key, folder, name, b"Dear colleague, not a photo")
    bad = jobs.get(ids["bad.jpg"])

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # stands for the SIGKILL: nothing after the move is written down

    monkeypatch.setattr(jobs, "fail", killed)
    with pytest.raises(KeyboardInterrupt):
        svc._fail(bad, folder, folder.path / "bad.jpg", "readiness", "not an image (unrecognised format)")
    monkeypatch.undo()
    assert (folder.failed / "bad.jpg").is_file() and not (folder.path / "bad.jpg").exists()
    (folder.path / "lost.jpg").unlink()  # this one a user took away

    for name, job_id in ids.items():
        job = jobs.get(job_id)
        if when == "at the gate":
            gate = type("Gate", (), {"forget": lambda self, job_id: None})()
            svc._settle_look(gate, folder, job, folder.path / name, Verdict("gone"))  # type: ignore[arg-type]
        else:
            svc._source_missing(job, folder)
    failed, lost = jobs.get(ids["bad.jpg"]), jobs.get(ids["lost.jpg"])
    assert (failed.state, failed.error_stage, failed.last_error) == (
        "failed", "readiness", "not an image (unrecognised format)")
    assert lost.state == "gone"
    jobs.close()


def test_a_source_replaced_after_its_publish_but_before_its_disposal_is_new_work(tmp_path: Path) -> None:
    """The process stopped after publishing a photo (result and backup written) but before removing the original,
    and the file was replaced while it was down. The earlier publish is recorded as done, so the job table agrees
    with out/, and the new content gets a row and a publish of its own."""
    svc, key, folder = _service_on_its_first_folder(tmp_path)
    assert svc.jobs is not None
    old, new = b"the first version", b"the second version, dropped while the daemon was down"
    job_id = _queued(svc, key, folder, "a.jpg", old)
    output, backup = folder.output / "a.jpg", folder.backup / "a.jpg"
    svc.jobs.claim(folder.preset, 8)
    assert svc.jobs.set_targets(job_id, str(output), str(backup))
    output.write_bytes(b"restored first version")
    backup.write_bytes(old)
    (folder.path / "a.jpg").write_bytes(new)  # while it was down; the restart hands the row back in flight
    assert svc._read_source(svc.jobs.get(job_id)) is None
    assert svc.jobs.get(job_id).state == "done"
    again = svc.jobs.active(key, "a.jpg")
    assert again is not None and again.id != job_id and again.state == "pending"
    assert backup.read_bytes() == old and output.read_bytes() == b"restored first version"
    svc.jobs.close()


def test_status_says_why_a_failed_file_waits_when_its_failed_folder_refuses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the gate fails (not an image) while failed/ is read-only stays in the hot folder as pending: `status`
    says why, until it is moved after all."""
    from daemon import status
    from daemon.settings import state_dir

    svc, key, folder = _service_on_its_first_folder(tmp_path)
    assert svc.jobs is not None
    state = state_dir(svc.settings)
    state.mkdir(parents=True, exist_ok=True)
    (folder.path / "junk.jpg").write_bytes(b"Dear colleague, not a photo")
    job = svc.jobs.note_candidate(key, "junk.jpg", folder.preset)

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(publish, "write_failure", read_only)
    svc._fail(job, folder, folder.path / "junk.jpg", "readiness", "not an image (unrecognised format)")
    svc._write_snapshot({}, {})
    snap = status.read_snapshot(state / status.SNAPSHOT_FILE)
    assert snap is not None
    shown = " ".join(snap.warnings)  # `status` prints them
    assert "cannot be moved into their failed folder" in shown and "junk.jpg" in shown
    assert "Read-only file system" in shown
    monkeypatch.undo()
    svc._fail(svc.jobs.get(job.id), folder, folder.path / "junk.jpg", "readiness", "not an image")
    svc._write_snapshot({}, {})
    snap = status.read_snapshot(state / status.SNAPSHOT_FILE)
    assert snap is not None and not any("cannot be moved" in w for w in snap.warnings)
    assert (folder.failed / "junk.jpg").is_file()
    svc.jobs.close()


def test_a_loop_failing_the_same_way_on_every_pass_logs_one_traceback_not_one_per_pass(tmp_path: Path) -> None:
    """The job table's disk is full: claiming a batch fails on every pass. The log gets the error with its
    traceback once (and again once a minute), not every second."""
    from structlog.testing import capture_logs

    from daemon.jobs import JobTableError

    svc, _key, _folder = _service_on_its_first_folder(tmp_path)
    passes = []

    def full() -> None:
        passes.append(1)
        raise JobTableError("job table: disk full; free space in the state directory")

    class Stop:
        def is_set(self) -> bool:
            return len(passes) >= 5

        def wait(self, timeout: float) -> bool:
            return self.is_set()

    svc._next_batch = full  # type: ignore[method-assign]
    svc.stop_event = Stop()  # type: ignore[assignment]
    with capture_logs() as logs:
        svc._prep_loop()
    assert len(passes) == 5
    assert sum(e["event"].startswith("claiming a batch failed") for e in logs) == 1
    assert svc.jobs is not None
    svc.jobs.close()


def test_a_photo_replaced_by_a_link_while_it_waits_is_gone_and_the_link_fails_on_its_own(tmp_path: Path) -> None:
    """A photo queued (or waiting to retry) is replaced by a link under its name. The photo's row ends as gone,
    not as "refused: symbolic link" with the photo's hash; the link gets a failed row and goes to failed/."""
    svc, key, folder = _service_on_its_first_folder(tmp_path)
    assert svc.jobs is not None
    photo = _queued(svc, key, folder, "orph.jpg", b"the photo's bytes")
    outside = tmp_path / "hostname"
    outside.write_text("not for the daemon")
    (folder.path / "orph.jpg").unlink()
    (folder.path / "orph.jpg").symlink_to(outside)
    svc._refuse(key, "orph.jpg", "symbolic link: links are never followed")
    assert svc.jobs.get(photo).state == "gone"
    link = svc.jobs.latest(key, "orph.jpg")
    assert link is not None and link.id != photo
    assert (link.state, link.error_stage, link.sha256) == ("failed", "watch", None)
    assert (folder.failed / "orph.jpg").is_symlink() and outside.read_text() == "not for the daemon"
    svc.jobs.close()
