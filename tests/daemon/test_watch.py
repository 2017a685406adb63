import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from daemon.settings import FolderSettings
from daemon.watch import FolderWatcher, Hint

EXTS = [".jpg", ".png"]


class Recorder:
    """Collects the watcher's callbacks; ``wait_for`` blocks (generous deadline) for real-thread tests."""

    def __init__(self) -> None:
        self.candidates: list[str] = []
        self.batches: list[list[str]] = []
        self.events: list[tuple[str, ...]] = []
        self.refused: list[tuple[str, str]] = []
        self.problems: list[str] = []
        self._cond = threading.Condition()

    def _note(self, fn):
        with self._cond:
            fn()
            self._cond.notify_all()

    def on_candidates(self, relpaths):
        self._note(lambda: (self.batches.append(list(relpaths)), self.candidates.extend(relpaths)))

    def on_pause(self, reason):
        self._note(lambda: self.events.append(("pause", reason)))

    def on_resume(self):
        self._note(lambda: self.events.append(("resume",)))

    def on_refused(self, relpath, reason):
        self._note(lambda: self.refused.append((relpath, reason)))

    def on_problem(self, message):
        self._note(lambda: self.problems.append(message))

    def wait_for(self, predicate, timeout=15.0):
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), "the watcher did not report in time"


class FakeSource:
    """An event source driven by the test instead of inotify."""

    def __init__(self, registry: list) -> None:
        registry.append(self)
        self.emit = None
        self.running = False
        self.fail_with: OSError | None = None

    def start(self, root, recursive, emit):
        if self.fail_with:
            raise self.fail_with
        self.root, self.recursive, self.emit, self.running = root, recursive, emit, True

    def stop(self):
        self.running = False

    def alive(self):
        return self.running


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def folder_settings(root: Path, **kw) -> FolderSettings:
    base = root.parent
    return FolderSettings(
        path=root, output=base / "out", backup=base / "backup", failed=base / "failed", **kw
    )


def make_watcher(root, rec, *, sources=None, clock=None, mountinfo=None, excluded=(), **kw):
    options = {k: kw.pop(k) for k in ("recursive", "watch") if k in kw}
    extra = {}
    if sources is not None:
        extra["source_factory"] = lambda: FakeSource(sources)
    if clock is not None:
        extra["clock"] = clock
    if mountinfo is not None:
        extra["mountinfo"] = mountinfo
    return FolderWatcher(
        folder_settings(root, **options),
        extensions=EXTS,
        poll_interval=kw.pop("poll_interval", 2.0),
        rescan_interval=kw.pop("rescan_interval", 30.0),
        excluded=excluded,
        on_candidates=rec.on_candidates,
        on_pause=rec.on_pause,
        on_resume=rec.on_resume,
        on_refused=rec.on_refused,
        on_problem=rec.on_problem,
        **extra,
    )


def local_mountinfo(mount_point: str = "/", fstype: str = "ext4") -> str:
    return f"27 1 254:0 / {mount_point} rw - {fstype} /dev/vda rw\n"


@pytest.fixture
def hot(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    return root


class TestScanning:
    def test_first_pass_finds_existing_files_and_skips_junk(self, hot, tmp_path):
        """Files present at start are reported by the first scan; junk, dotfiles and non-images are not."""
        (hot / "a.jpg").write_bytes(b"a")
        (hot / "sub" / "deeper").mkdir(parents=True)
        (hot / "sub" / "deeper" / "b.PNG").write_bytes(b"b")
        for junk in (".DS_Store", "._a.jpg", "Thumbs.db", "c.jpg.part", "notes.txt", "~$c.jpg"):
            (hot / junk).write_bytes(b"j")
        (hot / "@eaDir").mkdir()
        (hot / "@eaDir" / "a.jpg").write_bytes(b"thumb")
        (hot / ".hidden").mkdir()
        (hot / ".hidden" / "x.jpg").write_bytes(b"x")
        rec = Recorder()
        watcher = make_watcher(hot, rec, sources=[], clock=FakeClock(), mountinfo=local_mountinfo)
        watcher.step()
        assert rec.batches == [["a.jpg", "sub/deeper/b.PNG"]]
        assert watcher.scan() == ["a.jpg", "sub/deeper/b.PNG"]

    def test_non_recursive_ignores_subfolders(self, hot):
        """With recursive = false only the folder's own files are candidates."""
        (hot / "a.jpg").write_bytes(b"a")
        (hot / "sub").mkdir()
        (hot / "sub" / "b.jpg").write_bytes(b"b")
        watcher = make_watcher(hot, Recorder(), sources=[], recursive=False)
        assert watcher.scan() == ["a.jpg"]

    def test_own_folders_inside_the_hot_folder_are_skipped(self, hot, tmp_path):
        """Output, backup and failed folders placed inside a hot folder are never scanned as input."""
        for own in ("out", "backup"):
            (hot / own).mkdir()
            (hot / own / "result.jpg").write_bytes(b"r")
        # The failed folder is configured through a link to the same directory: recognised by identity.
        (hot / "failed").mkdir()
        (hot / "failed" / "bad.jpg").write_bytes(b"f")
        (tmp_path / "failed-link").symlink_to(hot / "failed", target_is_directory=True)
        (hot / "a.jpg").write_bytes(b"a")
        excluded = [hot / "out", hot / "backup", tmp_path / "failed-link"]
        watcher = make_watcher(hot, Recorder(), sources=[], excluded=excluded)
        assert watcher.scan() == ["a.jpg"]

    def test_symlinks_are_refused_once_and_never_read(self, hot, tmp_path):
        """A link to a file or folder outside is reported once as refused, never as a candidate."""
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret.jpg").write_bytes(b"secret")
        (hot / "link.jpg").symlink_to(outside / "secret.jpg")
        (hot / "linkdir").symlink_to(outside, target_is_directory=True)
        rec = Recorder()
        clock = FakeClock()
        watcher = make_watcher(hot, rec, sources=[], clock=clock, mountinfo=local_mountinfo)
        watcher.step()
        clock.now += 31
        watcher.step()  # a second full scan
        assert rec.candidates == []
        assert sorted(rel for rel, _ in rec.refused) == ["link.jpg", "linkdir"]
        assert all("symbolic link" in why for _, why in rec.refused)

    def test_special_files_are_refused(self, hot):
        """A FIFO named like an image is refused instead of hanging a reader."""
        os.mkfifo(hot / "pipe.jpg")
        rec = Recorder()
        assert make_watcher(hot, rec, sources=[]).scan() == []
        assert rec.refused == [("pipe.jpg", "not a regular file")]

    def test_files_of_a_type_not_restored_are_listed_once_they_stay(self, hot):
        """An iPhone's .heic, a .gif, or a "photo.jpg " with a trailing space is not silently ignored: once it has
        stayed unchanged for a minute it is listed as left in the folder, saying which types are restored. A copy
        tool's temporary name still changing, and junk (.DS_Store, .part), are not listed."""
        old = time.time() - 3600
        for name in ("IMG_0001.HEIC", "scan.gif", "photo.jpg ", "README", ".DS_Store", "big.tif.part"):
            (hot / name).write_bytes(b"x")
            os.utime(hot / name, (old, old))
        (hot / "photo.jpg.sb-1f2e").write_bytes(b"being copied")
        rec = Recorder()
        assert make_watcher(hot, rec, sources=[]).scan() == []
        reasons = dict(rec.refused)
        assert sorted(reasons) == ["IMG_0001.HEIC", "README", "photo.jpg ", "scan.gif"]
        assert reasons["IMG_0001.HEIC"].startswith("not an image type gpen-watch restores ('.HEIC' files; it restores ")
        assert "'.jpg ' files" in reasons["photo.jpg "] and "files without an extension" in reasons["README"]
        assert ".jpg" in reasons["scan.gif"] and ".png" in reasons["scan.gif"]

    def test_what_is_left_in_the_folder_is_listed_until_it_goes(self, hot, tmp_path):
        """refused() lists every entry that will never be processed, and forgets one at the scan after it went."""
        os.mkfifo(hot / "pipe.jpg")
        (hot / "linkdir").symlink_to(tmp_path, target_is_directory=True)
        os.close(os.open(os.fsencode(hot) + b"/bad-\xff.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
        (hot / "a.jpg").write_bytes(b"a")
        clock = FakeClock()
        watcher = make_watcher(hot, Recorder(), sources=[], clock=clock, mountinfo=local_mountinfo)
        watcher.step()
        assert watcher.refused() == {
            "pipe.jpg": "not a regular file",
            "linkdir": "symbolic link: links are never followed",
            "bad-\udcff.jpg": "file name is not valid UTF-8",
        }
        (hot / "pipe.jpg").unlink()
        clock.now += 31  # the next full scan
        watcher.step()
        assert sorted(watcher.refused()) == ["bad-\udcff.jpg", "linkdir"]

    def test_a_tree_deeper_than_the_system_can_name_is_listed_once_not_logged_at_every_scan(self, hot):
        """Folders nested past PATH_MAX cannot be opened by path: that folder is listed among the entries left
        alone (and so by `status`), once, instead of a log line at every scan."""
        names = ["D" * 200] * 22
        fd = os.open(hot, os.O_RDONLY | os.O_DIRECTORY)
        for name in names:
            os.mkdir(name, dir_fd=fd)
            next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        os.close(os.open("deep.jpg", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        os.close(fd)
        rec = Recorder()
        clock = FakeClock()
        watcher = make_watcher(hot, rec, sources=[], clock=clock, mountinfo=local_mountinfo)
        for _ in range(3):
            watcher.step()
            clock.now += 31
        [(where, why)] = watcher.refused().items()
        assert why.endswith("cannot be read: File name too long") and where.startswith("D" * 200 + "/")
        assert len(rec.refused) == 1 and rec.problems == []

    def test_a_reload_s_new_watcher_does_not_report_known_refusals_again(self, hot, tmp_path):
        """On every reload each folder's watcher is replaced: the entries already refused (a FIFO, a linked
        folder) stay listed, but are not reported (and logged) again; a new one is."""
        os.mkfifo(hot / "pipe.jpg")
        (hot / "linkdir").symlink_to(tmp_path, target_is_directory=True)
        first, rec = make_watcher(hot, Recorder(), sources=[], clock=FakeClock(), mountinfo=local_mountinfo), Recorder()
        first.step()
        second = make_watcher(hot, rec, sources=[], clock=FakeClock(), mountinfo=local_mountinfo)
        second.take_over(first)
        os.mkfifo(hot / "new-pipe.jpg")
        second.step()
        assert rec.refused == [("new-pipe.jpg", "not a regular file")]
        assert sorted(second.refused()) == ["linkdir", "new-pipe.jpg", "pipe.jpg"]

    def test_odd_names_work(self, hot):
        """Names with spaces, Unicode, newlines and leading dashes are candidates like any other."""
        names = ["with space.jpg", "写真 é.jpg", "new\nline.jpg", "-leading-dash.jpg"]
        for name in names:
            (hot / name).write_bytes(b"x")
        assert make_watcher(hot, Recorder(), sources=[]).scan() == sorted(names)

    def test_undecodable_name_is_refused(self, hot):
        """A name that is not valid UTF-8 is reported as refused, not silently skipped or crashed on."""
        os.close(os.open(os.fsencode(hot) + b"/bad-\xff.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
        rec = Recorder()
        assert make_watcher(hot, rec, sources=[]).scan() == []
        assert [why for _, why in rec.refused] == ["file name is not valid UTF-8"]


class TestModes:
    def test_mode_follows_the_filesystem(self, hot):
        """auto watches local filesystems with events and network or FUSE mounts by polling."""
        for fstype, mode in (("ext4", "events"), ("nfs4", "poll"), ("cifs", "poll"), ("fuse.sshfs", "poll")):
            table = local_mountinfo("/", fstype)
            watcher = make_watcher(hot, Recorder(), sources=[], mountinfo=lambda t=table: t)
            watcher.step()
            assert watcher.mode == mode

    def test_setting_overrides_the_choice(self, hot):
        """watch = poll polls even on a local filesystem; watch = events uses events even on NFS."""
        poll = make_watcher(hot, Recorder(), sources=[], mountinfo=local_mountinfo, watch="poll")
        poll.step()
        sources: list = []
        events = make_watcher(hot, Recorder(), sources=sources, watch="events",
                              mountinfo=lambda: local_mountinfo("/", "nfs4"))  # fmt: skip
        events.step()
        assert (poll.mode, events.mode, len(sources)) == ("poll", "events", 1)

    def test_poll_reports_new_and_changed_files_between_full_scans(self, hot):
        """In poll mode each poll reports what is new or changed; each reconcile reports everything."""
        (hot / "a.jpg").write_bytes(b"a")
        rec = Recorder()
        clock = FakeClock()
        watcher = make_watcher(hot, rec, clock=clock, mountinfo=local_mountinfo, watch="poll",
                               poll_interval=2.0, rescan_interval=30.0)  # fmt: skip
        watcher.step()
        clock.now += 2
        (hot / "b.jpg").write_bytes(b"b")
        watcher.step()
        clock.now += 2
        watcher.step()  # nothing changed: nothing reported
        clock.now += 30
        watcher.step()
        assert rec.batches == [["a.jpg"], ["b.jpg"], ["a.jpg", "b.jpg"]]

    def test_event_hints_are_checked_against_the_disk(self, hot):
        """Event hints report new images at once; junk, links and paths outside the folder are not."""
        sources: list[FakeSource] = []
        rec = Recorder()
        clock = FakeClock()
        watcher = make_watcher(hot, rec, sources=sources, clock=clock, mountinfo=local_mountinfo)
        watcher.step()
        (hot / "new.jpg").write_bytes(b"n")
        (hot / "new.jpg.part").write_bytes(b"p")
        (hot / "ln.jpg").symlink_to(hot / "new.jpg")
        (hot / "moved").mkdir()
        (hot / "moved" / "m.jpg").write_bytes(b"m")
        emit = sources[0].emit
        for hint in (Hint("path", str(hot / "new.jpg")), Hint("path", str(hot / "new.jpg.part")),
                     Hint("path", str(hot / "ln.jpg")), Hint("path", "/etc/passwd"),
                     Hint("dir", str(hot / "moved"))):  # fmt: skip
            emit(hint)
        clock.now += 1  # long before the next reconcile scan
        watcher.step()
        assert rec.batches == [["moved/m.jpg", "new.jpg"]]
        assert rec.refused == [("ln.jpg", "symbolic link: links are never followed")]

    def test_events_mode_still_checks_the_folder_regularly(self, hot):
        """Without events, an events-mode watcher runs again within the poll interval to check the folder."""
        watcher = make_watcher(hot, Recorder(), sources=[], clock=FakeClock(), mountinfo=local_mountinfo,
                               poll_interval=2.0, rescan_interval=30.0)  # fmt: skip
        watcher.step()
        assert watcher.mode == "events"
        assert watcher.step() <= 2.0

    def test_events_lost_to_an_overflowed_queue_start_a_rescan_at_once(self, hot):
        """inotify's queue overflowed (a burst of thousands of files): watchdog says events were lost, and the
        folder is scanned now rather than at the next periodic rescan, up to rescan_interval later."""
        from watchdog.events import EventsLostEvent

        from daemon.watch import _Handler

        sources: list[FakeSource] = []
        rec = Recorder()
        clock = FakeClock()
        watcher = make_watcher(hot, rec, sources=sources, clock=clock, mountinfo=local_mountinfo)
        watcher.step()
        (hot / "missed.jpg").write_bytes(b"m")  # its events were among those lost
        _Handler(str(hot), sources[0].emit).dispatch(EventsLostEvent(str(hot), is_directory=True))
        clock.now += 1  # long before the next reconcile scan
        watcher.step()
        assert rec.batches == [["missed.jpg"]]

    def test_dead_event_watcher_is_restarted_and_rescans(self, hot):

        """If the event thread dies, the watcher starts a new one and rescans for what it missed."""
        sources: list[FakeSource] = []
        rec = Recorder()
        clock = FakeClock()
        watcher = make_watcher(hot, rec, sources=sources, clock=clock, mountinfo=local_mountinfo)
        watcher.step()
        sources[0].running = False  # the observer thread died
        (hot / "missed.jpg").write_bytes(b"m")
        clock.now += 1
        watcher.step()
        assert len(sources) == 2 and sources[1].running
        assert rec.batches == [["missed.jpg"]]
        assert any("restarting" in p for p in rec.problems)

    def test_a_long_walk_keeps_the_heartbeat_fresh(self, hot, monkeypatch):
        """A full scan of a large tree on a slow share beats per folder and file read, so the service's watchdog
        does not take it for a hang."""
        for i in range(5):
            (hot / f"d{i}").mkdir()
            (hot / f"d{i}" / "a.jpg").write_bytes(b"a")
        clock = FakeClock()
        watcher = make_watcher(hot, Recorder(), clock=clock, mountinfo=local_mountinfo, watch="poll")
        lags = []
        scandir = os.scandir

        def slow_scandir(path):  # each folder takes 10 s to list
            lags.append(clock.now - watcher.last_beat)
            clock.now += 10
            return scandir(path)

        monkeypatch.setattr("daemon.watch.os.scandir", slow_scandir)
        watcher.step()
        assert 6 == len(lags)
        assert 0 == max(lags)

    def test_inotify_failure_falls_back_to_polling(self, hot):
        """When events cannot be set up (e.g. the inotify watch limit), the folder is polled instead."""
        import errno

        sources: list[FakeSource] = []

        def failing():
            source = FakeSource(sources)
            source.fail_with = OSError(errno.ENOSPC, "inotify watch limit reached")
            return source

        rec = Recorder()
        watcher = make_watcher(hot, rec, mountinfo=local_mountinfo)
        watcher._source_factory = failing
        watcher.step()
        assert watcher.mode == "poll"
        assert any("polling" in p for p in rec.problems)


class TestPause:
    def test_vanished_folder_pauses_and_resumes(self, hot):
        """A folder that disappears is paused (never read as 'all deleted') and resumes with a rescan."""
        (hot / "a.jpg").write_bytes(b"a")
        rec = Recorder()
        clock = FakeClock()
        watcher = make_watcher(hot, rec, sources=[], clock=clock, mountinfo=local_mountinfo)
        watcher.step()
        shutil.rmtree(hot)
        clock.now += 1
        watcher.step()
        assert watcher.paused is not None
        assert rec.events == [("pause", f"{hot} does not exist")]
        hot.mkdir()
        (hot / "b.jpg").write_bytes(b"b")
        clock.now += 1
        watcher.step()
        assert watcher.paused is None
        assert rec.events[-1] == ("resume",)
        assert rec.batches == [["a.jpg"], ["b.jpg"]]

    def test_unmounted_share_pauses_and_resumes(self, hot):
        """A folder whose mount is gone (now on the parent filesystem, maybe empty) pauses until back."""
        (hot / "a.jpg").write_bytes(b"a")
        table = {"text": local_mountinfo() + f"40 27 0:50 / {hot} rw - nfs4 server:/export rw\n"}
        rec = Recorder()
        clock = FakeClock()
        watcher = make_watcher(hot, rec, sources=[], clock=clock, mountinfo=lambda: table["text"])
        watcher.step()
        assert watcher.mode == "poll"
        table["text"] = local_mountinfo()  # the share was unmounted: the mount point stays as a folder
        clock.now += 3
        watcher.step()
        assert rec.events and rec.events[0][0] == "pause"
        assert "unmounted" in rec.events[0][1]
        assert "unmounted" in watcher.unavailable_reason()
        clock.now += 3
        watcher.step()  # still gone: no second pause, nothing reported
        table["text"] = local_mountinfo() + f"41 27 0:51 / {hot} rw - nfs4 server:/export rw\n"
        clock.now += 3
        watcher.step()
        assert [e[0] for e in rec.events] == ["pause", "resume"]
        assert rec.batches == [["a.jpg"], ["a.jpg"]]

    def test_share_mounted_later_is_adopted(self, hot):
        """A share mounted onto the folder after start is watched afresh, not mistaken for a loss."""
        table = {"text": local_mountinfo()}
        rec = Recorder()
        clock = FakeClock()
        watcher = make_watcher(hot, rec, sources=[], clock=clock, mountinfo=lambda: table["text"])
        watcher.step()
        assert watcher.mode == "events"
        table["text"] = local_mountinfo() + f"40 27 0:50 / {hot} rw - cifs //nas/in rw\n"
        clock.now += 1
        watcher.step()
        assert (watcher.mode, watcher.paused, rec.events) == ("poll", None, [])

    def test_missing_at_start_is_paused_until_it_appears(self, tmp_path):
        """A hot folder that does not exist yet is reported paused, then watched once it appears."""
        root = tmp_path / "later"
        rec = Recorder()
        watcher = make_watcher(root, rec, sources=[], mountinfo=local_mountinfo)
        watcher.step()
        root.mkdir()
        (root / "a.jpg").write_bytes(b"a")
        watcher.step()
        assert [e[0] for e in rec.events] == ["pause", "resume"]
        assert rec.candidates == ["a.jpg"]


class TestRealWatching:
    def test_inotify_events(self, hot):
        """With real inotify, files appearing after start (also in new subfolders) come from events."""
        (hot / "early.jpg").write_bytes(b"e")
        rec = Recorder()
        # A reconcile interval far beyond the test: only events can report the later files.
        watcher = make_watcher(hot, rec, rescan_interval=3600.0, watch="events")
        watcher.start()
        try:
            rec.wait_for(lambda: "early.jpg" in rec.candidates)
            assert watcher.mode == "events"
            (hot / "late.jpg").write_bytes(b"l")
            (hot / "sub" / "deep").mkdir(parents=True)
            (hot / "sub" / "deep" / "nested.jpg").write_bytes(b"n")
            tmp = hot / "renamed.jpg.part"
            tmp.write_bytes(b"r")
            tmp.rename(hot / "renamed.jpg")
            rec.wait_for(lambda: {"late.jpg", "sub/deep/nested.jpg", "renamed.jpg"} <= set(rec.candidates))
            assert "renamed.jpg.part" not in rec.candidates
        finally:
            watcher.stop()
        assert not watcher.alive()

    def test_inotify_events_through_a_linked_hot_folder(self, hot, tmp_path):
        """A hot folder configured as a link to the real folder gets events too (inotify watches the link itself
        unless told its target), not only the slow full rescans."""
        link = tmp_path / "hot-link"
        link.symlink_to(hot)
        (hot / "early.jpg").write_bytes(b"e")
        rec = Recorder()
        watcher = make_watcher(link, rec, rescan_interval=3600.0, watch="events")
        watcher.start()
        try:
            rec.wait_for(lambda: "early.jpg" in rec.candidates)  # the first full pass is over
            assert watcher.mode == "events"
            (hot / "late.jpg").write_bytes(b"l")
            rec.wait_for(lambda: "late.jpg" in rec.candidates)
        finally:
            watcher.stop()

    @pytest.mark.parametrize("mode", ["events", "poll"])
    def test_folder_vanishing_and_returning(self, hot, mode):
        """With real inotify or real polling: new files are found; a vanished folder pauses, and resumes on return."""
        (hot / "first.jpg").write_bytes(b"f")
        rec = Recorder()
        watcher = make_watcher(hot, rec, watch=mode, poll_interval=0.05, rescan_interval=3600.0)
        watcher.start()
        try:
            rec.wait_for(lambda: "first.jpg" in rec.candidates)
            (hot / "second.jpg").write_bytes(b"s")
            rec.wait_for(lambda: "second.jpg" in rec.candidates)
            shutil.rmtree(hot)
            rec.wait_for(lambda: ("pause", f"{hot} does not exist") in rec.events)
            hot.mkdir()
            (hot / "back.jpg").write_bytes(b"b")
            rec.wait_for(lambda: "back.jpg" in rec.candidates)
            assert rec.events[-1] == ("resume",)
        finally:
            watcher.stop()
