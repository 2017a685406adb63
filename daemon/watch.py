"""Watching one hot folder: report candidate files, pause when the folder or its share goes away.

Events are hints, scans are the truth. In ``events`` mode watchdog's inotify observer reports changes as
they happen; in ``poll`` mode (network shares and FUSE mounts, where inotify misses what other machines
write) the folder is scanned every ``poll_interval``. In both modes a full reconcile scan every
``rescan_interval`` reports every candidate present, so files present at start-up, events lost to an
overflowed queue and a watcher thread that died are all caught. The receiver (the service) must treat
reports as idempotent: the same path is reported again and again while it exists.

Nothing is ever reported as deleted. A folder that disappears, or whose share is unmounted (its path now
falls on a shallower mount than before), is paused (``on_pause``) and watched for its return (``on_resume``,
then a full rescan); its files are never taken for deleted. A share moved one level higher looks the same,
until the service's reload calls ``reload_mount`` and the watcher takes the new mount (``paths.remount_is_safe``).

Links are never followed: a symbolic link (to a file or a folder) is reported once to ``on_refused`` and
never read. The daemon's own folders (``excluded``) inside a hot folder are skipped.

Thread safety: each watcher runs one thread of its own; the callbacks are called from it (or from the caller
of ``scan``/``step``). ``scan`` may be called from any thread. The event source is injectable
(``source_factory``) so tests can drive the watcher without inotify.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from daemon.paths import (
    Mount,
    is_candidate,
    is_ignored_name,
    mount_below,
    mount_of,
    needs_polling,
    normalize_extensions,
    read_mountinfo,
    remount_is_safe,
    unmounted,
)
from daemon.settings import FolderSettings

__all__ = ["EventSource", "FolderWatcher", "Hint", "WatchdogSource"]

_log = logging.getLogger(__name__)

# What an event source tells the watcher: "path" (a file may have changed), "dir" (a directory appeared or was
# moved in: scan it), "rescan" (events were lost: scan everything), "check" (the folder itself may be gone).
HintKind = Literal["path", "dir", "rescan", "check"]


@dataclass(frozen=True)
class Hint:
    kind: HintKind
    path: str | None = None  # absolute


class EventSource(Protocol):
    """Where change hints come from. ``emit`` may be called from any thread."""

    def start(self, root: Path, recursive: bool, emit: Callable[[Hint], None]) -> None: ...

    def stop(self) -> None: ...

    def alive(self) -> bool: ...


class _Handler:
    """Turns watchdog events into hints. Duck-typed: watchdog only calls ``dispatch``."""

    def __init__(self, root: str, emit: Callable[[Hint], None]) -> None:
        self._root = root
        self._emit = emit

    def dispatch(self, event: object) -> None:
        kind = getattr(event, "event_type", "")
        is_dir = bool(getattr(event, "is_directory", False))
        src = os.fsdecode(getattr(event, "src_path", ""))
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        if kind == "deleted":
            if is_dir:
                self._emit(Hint("check"))
        elif kind == "moved":
            self._emit(Hint("dir" if is_dir else "path", dest))
        elif kind in ("created", "modified", "closed", "attrib"):
            if not is_dir:
                self._emit(Hint("path", src))
            elif kind == "created":
                self._emit(Hint("dir", src))
        elif kind == "events_lost":  # the inotify queue overflowed (watchdog 7 says so; older ones drop it
            self._emit(Hint("rescan"))   # silently, and the periodic rescan catches up)


class WatchdogSource:
    """inotify (or the platform's native API) through a watchdog ``Observer``."""

    def __init__(self, observer_factory: Callable[[], object] | None = None) -> None:
        if observer_factory is None:
            from watchdog.observers import Observer

            observer_factory = Observer
        self._factory = observer_factory
        self._observer: object | None = None

    def start(self, root: Path, recursive: bool, emit: Callable[[Hint], None]) -> None:
        observer = self._factory()
        observer.daemon = True  # type: ignore[attr-defined]
        observer.schedule(_Handler(str(root), emit), str(root), recursive=recursive)  # type: ignore[attr-defined]
        observer.start()  # type: ignore[attr-defined]
        self._observer = observer

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            with contextlib.suppress(Exception):
                observer.stop()  # type: ignore[attr-defined]
                observer.join(timeout=5)  # type: ignore[attr-defined]

    def alive(self) -> bool:
        observer = self._observer
        if observer is None or not observer.is_alive():  # type: ignore[attr-defined]
            return False
        return all(emitter.is_alive() for emitter in observer.emitters)  # type: ignore[attr-defined]


Snapshot = dict[str, tuple[int, int, int]]  # relpath -> (size, mtime_ns, inode)


class _Unavailable(Exception):
    pass


# Seconds a file of a type that is not restored must stay unchanged before it is listed as left in the folder:
# copy tools write under temporary names of their own (``photo.jpg.sb-1f2e``), renamed once complete.
UNLISTED_QUIET = 60.0


class FolderWatcher:
    """Reports candidate files of one hot folder; see the module docstring for the rules."""

    def __init__(
        self,
        folder: FolderSettings,
        *,
        extensions: Iterable[str],
        poll_interval: float,
        rescan_interval: float,
        excluded: Iterable[Path],
        on_candidates: Callable[[list[str]], None],
        on_pause: Callable[[str], None],
        on_resume: Callable[[], None],
        on_refused: Callable[[str, str], None] | None = None,
        on_problem: Callable[[str], None] | None = None,
        source_factory: Callable[[], EventSource] | None = None,
        mountinfo: Callable[[], str] = read_mountinfo,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.root = Path(os.path.abspath(folder.path))
        self._extensions = normalize_extensions(extensions)
        self._poll_interval = poll_interval
        self._rescan_interval = rescan_interval
        self._excluded = [Path(os.path.abspath(p)) for p in excluded]
        self._on_candidates = on_candidates
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._on_refused = on_refused
        self._on_problem = on_problem or (lambda message: _log.warning("%s: %s", self.root, message))
        self._source_factory = source_factory or WatchdogSource
        self._mountinfo = mountinfo
        self._clock = clock

        self._lock = threading.Lock()  # guards _refused (scan() may run on another thread)
        self._refused: dict[str, str] = {}
        self._hints: queue.SimpleQueue[Hint] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        self._mode: Literal["events", "poll"] | None = None
        self._source: EventSource | None = None
        self._mount: Mount | None = None
        self._below: Mount | None = None  # what _mount covers (see paths.mount_below)
        self._leads_to: str | None = None  # where the configured path led when first seen (it may be a link)
        self._carried_refused: dict[str, str] = {}  # the replaced watcher's refusals (take_over)
        self._remount = False  # set by reload_mount, handled on the watcher's own thread
        self._paused: str | None = None
        self._started = False
        self._snapshot: Snapshot = {}
        self._event_root = ""
        self._next_scan = 0.0
        self._next_full = 0.0
        self._next_health = 0.0
        self._check_now = False
        self._beat = clock()

    # -- public --------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str | None:
        """"events" or "poll" once running; None before the folder was first seen."""
        return self._mode

    @property
    def paused(self) -> str | None:
        """Why the folder is paused, or None while it is watched."""
        return self._paused

    @property
    def last_beat(self) -> float:
        """When the watcher loop last made progress (the clock's time), for the service's watchdog.

        Beaten at each step and at each folder and entry a scan reads.
        """
        return self._beat

    def refused(self) -> dict[str, str]:
        """Entries in the folder that are never processed (links, special files, undecodable names), with why.

        An entry removed since (a link the service moved to failed/, say) drops out at the next full scan.
        """
        with self._lock:
            return dict(self._refused)

    def start(self) -> None:
        """Watch in a thread of its own. The first pass scans everything already in the folder."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"watch:{self.root.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        self._stop_source()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def scan(self) -> list[str]:
        """Every candidate in the folder now (relative POSIX paths, sorted); refused entries are reported.

        Raises ``OSError`` if the folder itself cannot be read.
        """
        try:
            found = self._walk("")
        except _Unavailable as exc:
            raise FileNotFoundError(str(exc)) from None
        return sorted(found)

    def unavailable_reason(self, mount: Mount | None = None) -> str | None:
        """Why the folder cannot be watched now (gone, unreadable, share unmounted), or None if it can.

        Pass this to ``ReadinessGate.look(available=...)`` so a file missing with its share is not "gone".
        """
        try:
            st = os.stat(self.root)  # the configured path itself may be a link onto the share
        except FileNotFoundError:
            return f"{self.root} does not exist"
        except OSError as exc:
            return f"{self.root} cannot be read: {exc.strerror or exc}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{self.root} is not a directory"
        if not os.access(self.root, os.R_OK | os.X_OK):
            return f"{self.root}: permission denied"
        if self._leads_to is not None and (now := os.path.realpath(self.root)) != self._leads_to:
            # Swapped for a link (or a link re-pointed) since it was set up: following it would read, and
            # dispose of, files outside the configured folders. Recreated as a plain folder, it leads back.
            return (f"{self.root} now leads to {now}, not to {self._leads_to} as when it was set up (a folder on "
                    "its way was swapped for a link?); restart to take it as it is now")
        expected = self._mount
        current = mount_of(self.root, self._mountinfo()) if mount is None else mount
        if expected is not None and current is not None and unmounted(current, expected):
            return (
                f"{self.root} was on the mount at {expected.mount_point} ({expected.fstype}), "
                f"which is gone (now on {current.mount_point}): the share seems unmounted"
            )
        return None

    def reload_mount(self) -> None:
        """Take the folder's mount as it is now, if safe (the service calls this on reload, after mounts changed).

        A folder paused because its share seems unmounted resumes if the share was mounted elsewhere above it
        (see ``paths.remount_is_safe``); one that fell through to the filesystem under the share stays paused.
        """
        self._remount = True
        self._check_now = True
        self._wake.set()

    def take_over(self, old: FolderWatcher) -> None:
        """Continue from ``old``, the watcher this one replaces on a reload (call before ``start``).

        The folder's recorded mount carries over, and the reload's remount rule applies to it: a share that is
        still gone keeps the folder paused, instead of its empty mount point being taken for the folder.
        """
        if old.root == self.root:
            self._mount, self._below, self._leads_to = old._mount, old._below, old._leads_to
            self._remount = True
            with old._lock:  # known already: not reported (and logged) again at every reload
                self._carried_refused = dict(old._refused)

    def wake(self) -> None:
        """Scan now (the service calls this after a reload, for instance)."""
        self._hints.put(Hint("rescan"))
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                timeout = self.step()
            except Exception as exc:  # a bug here must not end watching for good
                _log.exception("watcher pass failed for %s", self.root)
                self._problem(f"watcher pass failed: {exc!r}; retrying")
                timeout = self._poll_interval
            self._wake.wait(max(0.0, timeout))
            self._wake.clear()

    def step(self) -> float:
        """One pass of the watcher loop; returns the seconds until it should run again.

        The thread started by ``start`` calls this in a loop; tests may call it directly.
        """
        now = self._clock()
        self._beat = now
        # Health checks (a stat and the mount table) run at most about once a second while events pour in.
        if self._check_now or self._paused is not None or not self._started or now >= self._next_health:
            self._check_now = False
            self._next_health = now + min(self._poll_interval, 1.0)
            if not self._healthy(now):
                return self._poll_interval
            now = self._clock()
        self._drain_hints(now)
        if now >= self._next_scan:
            self._scan_and_report(full=now >= self._next_full)
            interval = self._poll_interval if self._mode == "poll" else self._rescan_interval
            self._next_scan = now + interval
            if now >= self._next_full:
                self._next_full = now + self._rescan_interval
        # Wake at least every poll interval, also in events mode, to notice a vanished folder or share.
        return min(self._next_scan - self._clock(), self._poll_interval)

    def _healthy(self, now: float) -> bool:
        """Pause, resume, re-mount and dead-thread handling; False while the folder is unavailable."""
        mount = mount_of(self.root, self._mountinfo())
        if self._remount:
            self._remount = False
            recorded = self._mount
            if mount is not None and recorded is not None and unmounted(mount, recorded) and os.path.isdir(self.root):
                if remount_is_safe(mount, recorded, self._below):
                    self._problem(f"the folder is now on {mount.mount_point} ({mount.fstype}), no longer on "
                                  f"{recorded.mount_point}: taken on reload; watching it afresh")
                    self._begin(mount)  # resumes a paused folder
                else:
                    self._problem(f"still on {mount.mount_point}, under the share that was at "
                                  f"{recorded.mount_point}: it still looks unmounted; waiting for it")
        reason = self.unavailable_reason(mount)
        if reason is not None:
            if self._paused is None:
                self._pause(reason)
            return False
        if self._paused is not None or not self._started:
            self._begin(mount)
        elif mount is not None and self._mount is not None and mount != self._mount:
            # Something was mounted on the folder (or remounted): events watch the old directory, and the
            # filesystem type may call for another mode.
            self._problem(f"the folder is now on {mount.mount_point} ({mount.fstype}); watching it afresh")
            self._begin(mount)
        elif self._mode == "events" and (self._source is None or not self._source.alive()):
            self._problem("the event watcher stopped; restarting it and rescanning")
            self._start_source()
            self._next_scan = self._next_full = now
        return True

    def _begin(self, mount: Mount | None) -> None:
        """First sight of the folder, or its return after a pause: choose the mode, start events, rescan."""
        was_paused = self._paused is not None
        self._mount = mount
        if self._leads_to is None:
            self._leads_to = os.path.realpath(self.root)
        self._below = mount_below(mount, self._mountinfo()) if mount is not None else None

        self._mode = self._choose_mode()
        self._snapshot = {}
        with self._lock:
            self._refused = self._carried_refused  # empty but on the first sight after a reload's take-over
        self._carried_refused = {}
        self._start_source()
        self._paused = None
        self._started = True
        if was_paused:
            self._call(self._on_resume)
        now = self._clock()
        self._next_scan = self._next_full = now

    def _choose_mode(self) -> Literal["events", "poll"]:
        if self.folder.watch != "auto":
            return self.folder.watch
        fstype = self._mount.fstype if self._mount else "unknown"
        return "poll" if fstype == "unknown" or needs_polling(fstype) else "events"

    def _start_source(self) -> None:
        self._stop_source()
        if self._mode != "events":
            return
        source = self._source_factory()
        # inotify watches a link itself, not its target (watchdog adds IN_DONT_FOLLOW): a hot folder configured
        # through a symbolic link is watched at its real path, and events are mapped back (``_relative``).
        self._event_root = os.path.realpath(self.root)
        try:
            source.start(Path(self._event_root), self.folder.recursive, self._emit)
        except OSError as exc:
            # e.g. the inotify watch limit (fs.inotify.max_user_watches): polling still finds everything.
            self._problem(f"cannot watch for events ({exc}); polling every {self._poll_interval:g} s instead")
            self._mode = "poll"
            return
        self._source = source

    def _stop_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            source.stop()

    def _pause(self, reason: str) -> None:
        self._stop_source()
        self._paused = reason
        self._call(self._on_pause, reason)

    def _emit(self, hint: Hint) -> None:
        if hint.kind == "check":
            self._check_now = True
        self._hints.put(hint)

        self._wake.set()

    def _drain_hints(self, now: float) -> None:
        paths: set[str] = set()
        dirs: set[str] = set()
        while True:
            try:
                hint = self._hints.get_nowait()
            except queue.Empty:
                break
            if hint.kind == "rescan":
                self._next_scan = self._next_full = now
            elif hint.kind == "check":
                self._next_scan = min(self._next_scan, now)
            elif hint.path is not None and (rel := self._relative(hint.path)) is not None:
                (dirs if hint.kind == "dir" else paths).add(rel)
        found: list[str] = []
        for rel in sorted(dirs):
            if self.folder.recursive and not self._excluded_rel(rel):
                with contextlib.suppress(_Unavailable):
                    found.extend(self._walk(rel))
        for rel in sorted(paths):
            if self._check_one(rel):
                found.append(rel)
        if found:
            self._call(self._on_candidates, sorted(set(found)))

    # -- scanning ------------------------------------------------------------------------------------------

    def _scan_and_report(self, *, full: bool) -> None:
        try:
            found = self._walk("", prune=True)
        except _Unavailable as exc:
            self._pause(str(exc))
            return
        # A full scan reports everything (the reconcile pass); a poll only what is new or changed.
        report = sorted(found) if full else sorted(rel for rel, sig in found.items() if self._snapshot.get(rel) != sig)
        self._snapshot = found
        if report:
            self._call(self._on_candidates, report)

    def _walk(self, start: str, *, prune: bool = False) -> Snapshot:
        """Candidates below ``start`` (relative, "" for the root), never following a link.

        With ``prune`` (a full scan), refusals of entries no longer present are forgotten, so a link created
        again later is reported again.
        """
        excluded_ids = self._excluded_ids()
        found: Snapshot = {}
        refused: dict[str, str] = {}
        seen_dirs: set[tuple[int, int]] = set()
        stack = [start]
        while stack:
            rel = stack.pop()
            # A full walk of a large tree on a slow share is progress, not a hang (see last_beat).
            self._beat = self._clock()
            try:
                it = os.scandir(os.path.join(self.root, rel) if rel else self.root)
            except (FileNotFoundError, NotADirectoryError) as exc:
                if rel == start == "":
                    raise _Unavailable(f"{self.root} does not exist") from exc
                continue  # a subfolder removed while scanning
            except OSError as exc:
                if rel == start == "":
                    raise _Unavailable(f"{self.root} cannot be read: {exc.strerror or exc}") from exc
                # Listed once (and by `status`) instead of logged at every scan; seen again once readable.
                refused[rel] = f"folder cannot be read: {exc.strerror or exc}"
                continue
            with it:
                for entry in it:
                    self._beat = self._clock()
                    self._visit(entry, rel, found, refused, stack, seen_dirs, excluded_ids)
        self._report_refused(refused, prune_under=start if prune else None)
        return found

    def _visit(
        self,
        entry: os.DirEntry[str],
        rel: str,
        found: Snapshot,
        refused: dict[str, str],
        stack: list[str],
        seen_dirs: set[tuple[int, int]],
        excluded_ids: set[tuple[int, int]],
    ) -> None:
        name = entry.name
        if is_ignored_name(name):
            return
        relpath = f"{rel}/{name}" if rel else name
        try:
            if entry.is_symlink():
                refused[relpath] = "symbolic link: links are never followed"
                return
            if entry.is_dir(follow_symlinks=False):
                if not self.folder.recursive:
                    return
                st = entry.stat(follow_symlinks=False)
                ident = (st.st_dev, st.st_ino)
                # The identity check also catches an own folder configured through another path, and loops
                # made with bind mounts.
                if ident in excluded_ids or ident in seen_dirs or self._excluded_rel(relpath):
                    return
                seen_dirs.add(ident)
                stack.append(relpath)
                return
            st = entry.stat(follow_symlinks=False)
            if not is_candidate(relpath, self._extensions):
                if stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime > UNLISTED_QUIET:
                    refused[relpath] = self._not_restored(name)
                return
        except FileNotFoundError:
            return  # removed while scanning
        except OSError as exc:  # a path too long for the system, an I/O error: listed, not logged every scan
            refused[relpath] = f"cannot be read: {exc.strerror or exc}"
            return
        if not stat.S_ISREG(st.st_mode):
            refused[relpath] = "not a regular file"
        elif not _storable(relpath):
            refused[relpath] = "file name is not valid UTF-8"
        else:
            found[relpath] = (st.st_size, st.st_mtime_ns, st.st_ino)

    def _not_restored(self, name: str) -> str:
        ext = os.path.splitext(name)[1]
        kind = f"{ext!r} files" if ext else "files without an extension"
        return f"not an image type gpen-watch restores ({kind}; it restores {', '.join(sorted(self._extensions))})"

    def _check_one(self, rel: str) -> bool:
        """Whether one path from an event is a candidate now; refusals are reported."""
        if not is_candidate(rel, self._extensions) or self._excluded_rel(rel):
            return False
        if not self.folder.recursive and "/" in rel:
            return False
        parts = rel.split("/")
        path = self.root
        excluded_ids = self._excluded_ids()
        for i, part in enumerate(parts):
            path = path / part
            try:
                st = os.lstat(path)
            except OSError:
                return False  # gone again; the next scan has the truth
            if stat.S_ISLNK(st.st_mode):
                where = "/".join(parts[: i + 1])
                self._report_refused({where: "symbolic link: links are never followed"}, prune_under=None)
                return False
            if i < len(parts) - 1 and (st.st_dev, st.st_ino) in excluded_ids:
                return False
        if not stat.S_ISREG(st.st_mode):
            self._report_refused({rel: "not a regular file"}, prune_under=None)
            return False
        if not _storable(rel):
            self._report_refused({rel: "file name is not valid UTF-8"}, prune_under=None)
            return False
        return True

    def _relative(self, path: str) -> str | None:
        for root in (str(self.root), self._event_root):
            if root and path.startswith(root + os.sep):
                return path[len(root) + 1 :].replace(os.sep, "/")
        return None

    def _excluded_rel(self, rel: str) -> bool:
        path = self.root / rel
        return any(path == ex or ex in path.parents for ex in self._excluded)

    def _excluded_ids(self) -> set[tuple[int, int]]:
        ids = set()
        for path in self._excluded:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                ids.add((st.st_dev, st.st_ino))
        return ids

    def _report_refused(self, refused: dict[str, str], *, prune_under: str | None) -> None:
        with self._lock:
            new = {rel: why for rel, why in refused.items() if self._refused.get(rel) != why}
            self._refused.update(new)
            if prune_under is not None:
                prefix = prune_under + "/" if prune_under else ""
                for rel in [r for r in self._refused if r.startswith(prefix) and r not in refused]:
                    del self._refused[rel]
        if self._on_refused is not None:
            for rel, why in sorted(new.items()):
                self._call(self._on_refused, rel, why)

    # -- helpers -------------------------------------------------------------------------------------------

    def _problem(self, message: str) -> None:
        with contextlib.suppress(Exception):
            self._on_problem(message)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        # A failing receiver must not stop watching; the next full scan reports everything again.
        try:
            callback(*args)
        except Exception as exc:
            _log.exception("watcher callback failed for %s", self.root)
            self._problem(f"callback {getattr(callback, '__name__', callback)!r} failed: {exc!r}")


def _storable(relpath: str) -> bool:
    """Names that are not valid UTF-8 come with surrogate escapes: they cannot be stored as text."""
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
