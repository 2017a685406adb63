"""The daemon's lifecycle: startup -> main loop -> shutdown, and the threads that move files along.

    watchers --candidates--> gate thread --ready rows--> job table --claim--> prep thread (read, decode)
        --prepared batch--> device thread (engine) --results--> publish pool (encode, write, backup) --> done

Signal handlers only set flags; the main thread acts on them. Only this module wires the stages together.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import hashlib
import math
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import structlog

from daemon import paths, publish, status
from daemon.batcher import pick_queue
from daemon.executor import LocalExecutor, Outcome, Raised, device_lost, out_of_memory, run_narrowing
from daemon.faults import FailPoints
from daemon.jobs import (
    Job,
    JobStateError,
    JobTable,
    JobTableError,
    claim_instance,
    instance_stopped,
    running_instances,
)
from daemon.logs import configure_logging
from daemon.notify import Notifier
from daemon.paths import (
    FileTooLarge,
    Mount,
    UnsafePath,
    is_candidate,
    max_file_bytes,
    mount_below,
    mount_of,
    open_no_follow,
    remount_is_safe,
    safe_join,
    unmounted,
)
from daemon.readiness import ReadinessGate, Verdict
from daemon.settings import (
    ConfigError,
    FolderSettings,
    Settings,
    engine_options,
    hot_folders,
    possible_state_dirs,
    preset_table,
    preset_warnings,
    settings_from_args,
    state_dir,
)
from daemon.watch import FolderWatcher
from gpen_engine import imageio
from gpen_engine.options import EngineOptions, Preset
from gpen_engine.restorer import Restorer, WorkingImage, is_out_of_memory
from gpen_engine.types import DecodedImage, DeviceOutOfMemory, EngineError, InputError, NoFaceFound, RestoredImage

log = structlog.get_logger("gpen_watch.service")

# How long a stage may go without a heartbeat before the systemd watchdog pings stop.
STALL_FACTOR = 1.0
# How long a reload (loading and warming up new models) may take before the watchdog pings stop.
RELOAD_LIMIT = 600.0
# How often the job table's old history is pruned (besides at start-up).
PRUNE_EVERY = 24 * 3600.0
TAKEOVER_EVERY = 30.0  # how often to look for work in flight held by a stopped instance
# `gpen-watch run`'s exit status when the device stopped computing mid-run: sysexits' EX_TEMPFAIL, "try again
# later", which systemd shows as status=75/TEMPFAIL and Restart=on-failure acts on (1 is a failed start, 2 an
# invalid configuration).
EXIT_DEVICE_LOST = 75


def command(args: argparse.Namespace) -> int:
    """`gpen-watch run`: validate config, start, serve until SIGTERM/SIGINT."""
    try:
        settings = settings_from_args(args)
        folders = hot_folders(settings)
    except ConfigError as exc:
        configure_logging("auto", "info")
        log.error("configuration invalid", error=str(exc))
        return 2
    configure_logging(settings.log_format, settings.log_level)
    if getattr(args, "root", None) and not settings.folders and settings.root is not None:
        # A root named on the command line is the operator's to have: create it. One from a config file is not,
        # as it may be an unmounted share's empty mount point (then its folders wait, paused, for the share).
        root = settings.root.expanduser().absolute()
        if not root.exists():
            try:
                root.mkdir(parents=True)
            except OSError as exc:
                log.error("cannot create the root folder", root=str(root), error=str(exc))
                return 1
            log.info("created the root folder", root=str(root))
    # systemd's watchdog ends a stuck daemon with SIGABRT: leave every thread's stack in the journal.
    faulthandler.enable(all_threads=True)
    service = Service(settings, folders, reload_source=lambda: _reload_settings(args))
    return service.serve()


def _reload_settings(args: argparse.Namespace) -> tuple[Settings, list[FolderSettings]]:
    settings = settings_from_args(args)
    return settings, hot_folders(settings)


def _suffix(relpath: str, fmt: str, *, converted: bool) -> str:
    """The result's extension. Written in the input's format, the result keeps the input's name, whatever its
    extension says (content, not the name, decides). Written in ``output_format``, it takes that format's
    extension, unless the source's own already names it (``.JPG``, ``.jpeg``): so a PNG named ``.jpg`` by
    mistake and a real JPEG of the same name do not leave two results under one name each."""
    own = Path(relpath).suffix
    return own if not converted or imageio.keeps_suffix(own, fmt) else imageio.extension_for(fmt)


def _one_line(exc: BaseException, width: int = 300) -> str:
    """An exception's whole message on one line (its first line alone may only say "config invalid:")."""
    text = " ".join(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).split()) or repr(exc)
    return text if len(text) <= width else text[: width - 1] + "…"


class StartupCancelled(Exception):
    """SIGTERM/SIGINT arrived while models were loading."""


def _gate_limits(settings: Settings) -> tuple[Callable[[bytes], object], int]:
    """The readiness gate's decode check and memory guard for ``settings.max_pixels``."""
    return partial(imageio.check_complete, max_pixels=settings.max_pixels), max_file_bytes(settings.max_pixels)


# Settings a reload cannot change (see Service._reload).
RESTART_ONLY = ("state_dir", "instance", "io_threads", "log_format", "log_level", "metrics")


def _one_of(names: set[str]) -> Callable[[Path], bool]:
    """Whether a path is one of ``names`` (paths as text)."""
    return lambda path: str(path) in names


def _load_identity(settings: Settings, preset: Preset) -> tuple[object, ...]:
    """Everything that decides which models a preset loads and where: a change means loading again."""
    from daemon.modelfiles import models_of
    from gpen_engine.registry import preset_models

    table = models_of(settings)
    return (preset, str(settings.models_dir.expanduser().absolute()), settings.device,
            tuple(repr(table.get(n)) for n in preset_models(preset)))


@dataclass
class Prepared:
    """A claimed job whose source has been read and decoded, ready for the device."""

    job: Job
    folder: FolderSettings
    source: Path
    data: bytes
    image: DecodedImage
    working: WorkingImage  # made on the read pool, so the device's thread starts at detection
    decode_ms: float


@dataclass
class Batch:
    preset: str
    items: list[Prepared]
    batch_id: str


@dataclass
class _Check:
    """A readiness check of one file's bytes on the gate's pool."""

    future: Future[None] = field(default_factory=Future)  # the pool's, once submitted
    started: float | None = None  # monotonic; None while it waits for a thread


@dataclass
class _Repeats:
    """Keeps a loop that fails the same way on every pass (a full disk under the job table) from logging a
    traceback on every pass: the same error is logged again after ``every`` seconds."""

    every: float = 60.0
    last: dict[str, float] = field(default_factory=dict)

    def first(self, key: str) -> bool:
        now = time.monotonic()
        if now - self.last.get(key, -math.inf) < self.every:
            return False
        if len(self.last) > 100:  # errors whose text varies: forget the old ones rather than grow
            self.last.clear()
        self.last[key] = now
        return True


@dataclass
class Heartbeats:
    """When each stage last showed it is alive; the watchdog pings only while all are fresh."""

    beats: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def beat(self, name: str, *, at: float | None = None) -> None:
        """``name`` is alive now, or was last seen alive ``at`` (a monotonic time) by what it waits on."""
        with self.lock:
            self.beats[name] = time.monotonic() if at is None else at

    def stale(self, max_age: float) -> list[str]:
        now = time.monotonic()
        with self.lock:
            return [name for name, at in self.beats.items() if now - at > max_age]


class Service:
    def __init__(
        self,
        settings: Settings,
        folders: list[FolderSettings],
        *,
        reload_source: Callable[[], tuple[Settings, list[FolderSettings]]] | None = None,
        failpoints: FailPoints | None = None,
    ) -> None:
        self.settings = settings
        self.folders = {str(f.path.expanduser().absolute()): f for f in folders}
        self.presets: dict[str, Preset] = preset_table(settings)
        self.reload_source = reload_source
        self.failpoints = failpoints if failpoints is not None else FailPoints.from_env()
        self.notifier = Notifier()
        self.heartbeats = Heartbeats()
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.paused: dict[str, str] = {}
        # The mount each output/backup/failed/done folder was on when it was set up or last reloaded, and the
        # mount that one covered (where the folder falls through to once it is unmounted): see _note_mounts.
        self.share_mounts: dict[Path, Mount] = {}
        self.share_below: dict[Path, Mount | None] = {}
        self.leads_to: dict[Path, str] = {}  # where each output/backup/failed/done path led when set up
        # Choosing a free name in failed/, writing the sidecar and moving the original there is one step: folders
        # sharing a failed/ folder must not pick the same name (the move would replace the first original).
        self.failed_lock = threading.Lock()
        self.candidates: queue.SimpleQueue[tuple[str, list[str]]] = queue.SimpleQueue()
        self.refused: queue.SimpleQueue[tuple[str, str, str]] = queue.SimpleQueue()
        self.prepared: queue.Queue[Batch | None] = queue.Queue(maxsize=1)
        self.restorers: dict[str, Restorer] = {}
        self.loaded_as: dict[str, tuple[object, ...]] = {}
        self.models: dict[tuple[object, ...], Any] = {}
        self.watchers: dict[str, FolderWatcher] = {}
        self.threads: list[threading.Thread] = []
        self.publish_pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="publish")
        self.read_pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="read")
        self.in_flight: set[Future[None]] = set()
        self.in_flight_lock = threading.Lock()
        self.names_lock = threading.Lock()
        self.waiting_since: dict[str, float] = {}
        self.not_ready_why: dict[int, str] = {}  # job id -> the last reason logged (at debug) for waiting
        self.fail_later: dict[int, float] = {}  # job id -> when the gate may look again (failed/ refused it)
        self.repeats = _Repeats()
        self.fail_refused: dict[int, str] = {}  # job id -> why failed/ refused it, for `status` (pending rows)
        self.device_name = "?"
        self.counters = {"done": 0, "failed": 0, "faces": 0}
        self.done_times: deque[float] = deque()  # finishing times over the last minute
        self.counters_lock = threading.Lock()  # counters and done_times: publish threads and the gate update them
        self.jobs: JobTable | None = None
        self.instance_lock: int | None = None
        self.executor: LocalExecutor | None = None
        self.metrics: Any = None
        self.exit_status = 0
        self.config_warnings: list[str] = preset_warnings(settings)
        self.reload_rejected: str | None = None  # why the last reload was refused, until one succeeds

    # ----------------------------------------------------------------- lifecycle
    def serve(self) -> int:
        self._install_signal_handlers()
        try:
            self.startup()
        except StartupCancelled:
            log.info("stopped during start-up")
            self.notifier.stopping()
            self._close()
            return 0
        except Exception as exc:  # a start-up failure is fatal and must say why
            from daemon.jobs import JobTableError
            from daemon.metrics import MetricsError
            from daemon.modelfiles import MissingModelError

            # An OSError (a state folder that cannot be made, a permission) says all there is in its message.
            expected = isinstance(exc, ConfigError | EngineError | MissingModelError | JobTableError | MetricsError
                                  | OSError)
            log.error("start-up failed", error=str(exc), exc_info=not expected)
            self.notifier.status(f"start-up failed: {exc}")
            if self.jobs is not None:  # the state folder exists: tell `gpen-watch status` what happened
                self.device_name = f"none (start-up failed: {_one_line(exc)})"
                self._write_snapshot({}, {})
            self._close()
            return 1
        try:
            self.main_loop()
        finally:
            self.shutdown()
        return self.exit_status

    def startup(self) -> None:
        state = state_dir(self.settings)
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JobTableError(f"the state folder {state} cannot be created: {exc.strerror or exc} (set "
                                "state_dir to a folder the service user may write)") from None
        # Before the job table: a refused second daemon must not take back the first one's work in flight.
        self.instance_lock = claim_instance(state, self.settings.instance)
        self._refuse_a_second_job_table(state)
        self.jobs = JobTable.open(state / status.JOBS_FILE, owner=self.settings.instance)
        for warning in self.config_warnings:
            log.warning("configuration looks wrong", problem=warning)
        self.device_name = "none yet (starting: loading models)"
        self._write_snapshot({}, {})  # `gpen-watch status` sees a starting daemon, not the last one's pid
        requeued = self.jobs.requeue_in_flight(max_attempts=self.settings.max_attempts)
        if requeued:
            log.warning("work in flight at the last stop is redone", jobs=requeued)
        self._take_over_stopped_instances()
        for key, folder in self.folders.items():  # the config may have given a folder another preset since
            self.jobs.reassign_preset(key, folder.preset)
        for key in self.jobs.folders_with_unfinished() - set(self.folders):  # removed from the config meanwhile
            left = self.jobs.forget_unfinished(key)
            log.info("folder no longer configured; files not processed yet stay in it, untouched", folder=key,
                     files=left)
        self._settle_crash_loops()
        self._prune_history()
        self._make_folders(self.folders.values())
        self._note_mounts(self.folders.values())
        removed = publish.cleanup_temp_files(
            [d for f in self.folders.values() for d in (f.output, f.backup, f.failed, f.done) if d and d.exists()]
        )
        if removed:
            log.info("removed temporary files left by an earlier crash", files=removed)
        self._start_metrics()  # before the models: a port in use is reported at once, not minutes later
        self._load_presets(self._presets_in_use())
        if self.stop_event.is_set():
            raise StartupCancelled("stop requested during start-up")
        self.executor = LocalExecutor(self.restorers, self.failpoints)
        for key, folder in self.folders.items():
            self._start_watcher(key, folder)
        for name, target in (("gate", self._gate_loop), ("prep", self._prep_loop), ("device", self._device_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        self.notifier.ready()
        log.info(
            "gpen-watch ready",
            folders=len(self.folders),
            presets=sorted(self.restorers),
            device=self.device_name,
            state=str(state),
        )

    def _refuse_a_second_job_table(self, state: Path) -> None:
        """Stop if another gpen-watch on this machine runs on one of our hot folders with another job table.

        Two job tables do not know each other's claims: both restore a photo and it is published twice. It
        happens when state_dir is not set and the same config runs by hand (ROOT/state) and under systemd
        ($STATE_DIRECTORY): the places a daemon with this config would keep its state are looked at."""
        here = state.resolve()
        for place in sorted(set(possible_state_dirs([self.settings.root]))):
            try:
                if place.resolve() == here or not running_instances(place):
                    continue
                watched = {f for snap in status.running_snapshots(place).values() for f in snap.folders}
            except OSError:
                continue  # unreadable to this user: nothing to compare
            shared = sorted(watched & set(self.folders))
            if shared:
                raise JobTableError(
                    f"another gpen-watch runs with the job table in {place} and works on {shared[0]}, which this "
                    f"one watches with the job table in {state}: both would restore and publish the same photos. "
                    "Stop the other one, or set state_dir in the config so that every run uses one job table")

    def _make_folders(self, folders: Iterable[FolderSettings]) -> None:
        """Create the folders gpen-watch may create, and name the missing ones it may not (at start, and for
        folders a reload adds or moves).

        The simple layout under ``root`` is gpen-watch's own: its folders are made while the root exists. Folders
        configured one by one (``[[folders]]``) must exist, as the config file says: a missing one may be an
        unmounted share's, and making it would put results and backups on the local disk, hidden once the share
        is back. Files wait for it instead. A done folder is made beside a backup folder that exists.
        """
        own_root = self.settings.root.expanduser().absolute() if not self.settings.folders and self.settings.root \
            else None
        for folder in folders:
            for role, d in (("path", folder.path), ("output", folder.output), ("backup", folder.backup),
                            ("failed", folder.failed), ("done", folder.done)):
                if d is None or d.is_dir():
                    continue
                mine = (own_root is not None and own_root.is_dir()) or (role == "done" and folder.backup.is_dir())
                if mine:
                    try:
                        d.mkdir(parents=True, exist_ok=True)
                        log.info("folder created", folder=str(d))
                    except OSError as exc:  # reported again by the watcher or the publisher
                        log.warning("folder cannot be created", folder=str(d), error=exc.strerror or str(exc))
                else:
                    log.warning("configured folder does not exist; its files wait for it", setting=role,
                                folder=str(d), fix="create it, or mount its share")

    def _note_mounts(self, folders: Iterable[FolderSettings], *, reload: bool = False) -> None:
        """Record the mount each output/backup/failed/done folder is on now (see _check_mounted).

        At start-up, and for a folder first seen on a reload, the mount is taken as found (systemd's
        RequiresMountsFor= keeps the service from starting before its shares). On a reload an operator may have
        changed the mounts (a share mounted one level higher, or onto a folder that had none): a folder already
        recorded takes its mount as it is now only where ``remount_is_safe`` says that is not an unmounted share's
        empty mount point, so results keep waiting for a lost share instead of landing on the local disk. A
        folder that is missing now (or a mount table that cannot be read) keeps its record.
        """
        for folder in folders:
            for d in (folder.output, folder.backup, folder.failed, folder.done):
                if d is not None and d not in self.leads_to and d.is_dir():
                    self.leads_to[d] = os.path.realpath(d)
                if d is None or not d.is_dir() or (mount := mount_of(d)) is None:
                    continue
                recorded = self.share_mounts.get(d)
                if recorded is None or not reload:
                    self.share_mounts[d], self.share_below[d] = mount, mount_below(mount)
                elif mount != recorded:
                    if remount_is_safe(mount, recorded, self.share_below.get(d)):
                        self.share_mounts[d], self.share_below[d] = mount, mount_below(mount)
                        log.info("folder's mount changed; taken on reload", folder=str(d),
                                 was=recorded.mount_point, now=mount.mount_point, fstype=mount.fstype)
                    else:
                        log.warning("folder's share still looks unmounted; kept waiting for it (mount it again, "
                                    "or restart to take the folder as it is now)", folder=str(d),
                                    expected=recorded.mount_point, now=mount.mount_point)

    def _check_mounted(self, *roots: Path | None) -> None:
        """Raise ShareUnavailable (retried later) for a root whose share was unmounted since it was set up.

        An unmounted share leaves its empty mount point behind: the folder still exists, and results
        written there would land on the local disk, hidden once the share is mounted again.
        """
        table: str | None = None  # read once for all the roots
        for root in roots:
            led = self.leads_to.get(root) if root is not None else None
            if root is not None and led is not None and (now := os.path.realpath(root)) != led:
                # Swapped for a link since it was set up: results would land (and originals move) outside.
                raise publish.ShareUnavailable(
                    root, f"it now leads to {now}, not to {led} as when it was set up (a folder on its way was "
                          "swapped for a link?); restart to take it as it is now")
            expected = self.share_mounts.get(root) if root is not None else None
            if root is None or expected is None:
                continue
            table = paths.read_mountinfo() if table is None else table
            current = mount_of(root, table)
            if current is not None and unmounted(current, expected):
                raise publish.ShareUnavailable(
                    root, f"the share it was on ({expected.mount_point}) is no longer mounted")

    def _take_over_stopped_instances(self) -> None:
        """Work in flight held by an instance that stopped (killed, or its GPU gone) is redone here, not left
        until that instance starts again. It counts as a crash for those files, as it would there."""
        assert self.jobs is not None
        state = state_dir(self.settings)
        taken = 0
        for owner in sorted(self.jobs.in_flight_by_owner()):
            if owner == self.settings.instance:
                continue
            with instance_stopped(state, owner) as stopped:
                if not stopped:
                    continue
                n = self.jobs.requeue_in_flight(max_attempts=self.settings.max_attempts, owner=owner)
            if n:
                taken += n
                log.warning("work in flight when another instance stopped is redone here",
                            instance=owner or "default", jobs=n)
        if taken:
            self._settle_crash_loops()

    def _settle_crash_loops(self) -> None:
        """Files that were in flight at too many crashes in a row go to failed/, so one file cannot kill us forever."""
        assert self.jobs is not None
        for job in self.jobs.in_state("failed"):
            folder = self.folders.get(job.folder)
            if job.error_stage != "crash" or folder is None or job.kept is not None:
                continue  # (kept: a copy is in failed/ already, but the original could not leave)
            latest = self.jobs.latest(job.folder, job.relpath)
            if latest is None or latest.id != job.id:
                continue  # a newer file of that name has its own row: it is not the one that crashed us
            with contextlib.suppress(UnsafePath, OSError):
                source = safe_join(folder.path, job.relpath)
                st = os.lstat(source)
                if job.size is not None and (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
                    continue  # replaced since (or dropped again while we were down): new work, not this verdict
                info = self._failure_info(job, folder, "crash", job.last_error or "the daemon died processing it")
                self._check_mounted(folder.failed)  # an unmounted share: tried again at the next takeover or start
                try:
                    publish.write_failure(folder.failed, job.relpath, source, None, info, src_root=folder.path)
                except publish.OriginalKept as exc:  # no second copy at the next start
                    self.jobs.set_kept(job.id, f"a copy is in the failed folder ({exc.stored.name}), but the "
                                               f"original could not be removed: {exc.strerror}")
                log.error("file failed after repeated crashes", folder=job.folder, path=job.relpath)

    def _feed_watchdog(self, interval: float | None, log_stale: bool) -> None:
        if interval is None:
            return
        max_age = max(2 * interval * STALL_FACTOR, 1.0)
        stale = self.heartbeats.stale(max_age)
        stale += [f"watch:{k}" for k, w in list(self.watchers.items()) if time.monotonic() - w.last_beat > max_age]
        if not stale:
            self.notifier.watchdog()
        elif log_stale:
            log.error("a stage stopped making progress; withholding watchdog pings", stages=stale)

    def _prune_history(self) -> None:
        """Forget finished jobs older than ``history_days`` (the newest row of each file stays)."""
        assert self.jobs is not None
        try:
            pruned = self.jobs.prune_finished(self.settings.history_days * 86400.0)
        except JobTableError as exc:  # tried again tomorrow; nothing depends on it
            log.warning("old job history not pruned", error=str(exc))
            return
        if pruned:
            log.info("pruned old job history", rows=pruned, older_than_days=self.settings.history_days)

    def main_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        next_status = 0.0
        next_prune = time.monotonic() + PRUNE_EVERY  # start-up has just pruned
        next_takeover = time.monotonic() + TAKEOVER_EVERY  # and looked for stopped instances' work
        tick = min(0.25, interval / 2) if interval is not None else 0.25
        while not self.stop_event.is_set():
            self.stop_event.wait(tick)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                # Loading new models may outlast WatchdogSec: the main thread keeps feeding the watchdog
                # (while the working stages stay alive) and the reload runs beside it.
                # A reload that never ends (a wedged warm-up) stops the pings after RELOAD_LIMIT.
                worker = threading.Thread(target=self._reload, name="reload", daemon=True)
                worker.start()
                give_up = time.monotonic() + RELOAD_LIMIT
                while worker.is_alive() and not self.stop_event.is_set():
                    worker.join(tick)
                    if time.monotonic() < give_up:
                        self._feed_watchdog(interval, log_stale=False)
            now = time.monotonic()
            self._feed_watchdog(interval, log_stale=now >= next_status)
            if now >= next_status:
                next_status = now + 2.0
                self._report_status()
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY
                self._prune_history()
            if now >= next_takeover:
                next_takeover = now + TAKEOVER_EVERY
                try:
                    self._take_over_stopped_instances()
                except Exception as exc:  # the job table busy or away: the next round tries again
                    log.warning("could not look for stopped instances' work", error=str(exc))

    def shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping: no new files are taken; finishing the batch in flight")
        self.stop_event.set()
        for watcher in list(self.watchers.values()):  # a reload thread may still be changing them
            with contextlib.suppress(Exception):
                watcher.stop()
        # Unblock the device thread if it waits for a batch.
        with contextlib.suppress(queue.Full):
            self.prepared.put_nowait(None)
        for thread in self.threads:
            thread.join(timeout=60)
        self.read_pool.shutdown(wait=True)
        self.publish_pool.shutdown(wait=True)
        self._close()
        log.info("stopped", **self.counters)

    def _close(self) -> None:
        if self.jobs is not None:
            # Whatever was claimed but not finished goes back to the queue for the next start.
            with contextlib.suppress(Exception):
                self.jobs.requeue_in_flight()
            self.jobs.close()
            self.jobs = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.instance_lock is not None:
            os.close(self.instance_lock)
            self.instance_lock = None

    def _install_signal_handlers(self) -> None:
        def on_stop(signum: int, frame: object) -> None:
            if self.stop_event.is_set():  # a second signal: the operator insists
                log.warning("second stop signal: exiting at once; the work in flight is redone at the next start",
                            signal=signal.Signals(signum).name)
                os._exit(1)
            self.stop_event.set()

        def on_hup(signum: int, frame: object) -> None:
            self.reload_requested.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        # `gpen-watch run` blocks SIGHUP while it imports and reads the config (its default action would kill
        # the process); one that arrived meanwhile is delivered now, as a reload after start-up.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    # ----------------------------------------------------------------- models
    def _presets_in_use(self) -> dict[str, Preset]:
        names = {f.preset for f in self.folders.values()}
        return {name: self.presets[name] for name in names}

    def _load_presets(self, presets: dict[str, Preset], settings: Settings | None = None) -> None:
        """Build a Restorer per preset, loading each distinct set of models once, and warm each up.

        ``settings`` (default: the running ones) says where models live and which device to use; the
        restorers are added only once every preset has loaded.
        """
        from daemon.modelfiles import ensure_models, models_of
        from gpen_engine.device import select_device
        from gpen_engine.registry import preset_models
        from gpen_engine.restorer import load_engine_models

        settings = settings or self.settings
        table = models_of(settings)
        # Fetch (or report) every missing file of every preset at once, not one preset per start.
        ensure_models(settings, sorted({n for p in presets.values() for n in preset_models(p)}),
                      download=settings.download, log=log.info)
        restorers: dict[str, Restorer] = {}
        identities: dict[str, tuple[object, ...]] = {}
        loaded: dict[tuple[object, ...], Any] = {}  # kept only if every preset loads and warms up
        for name, preset in presets.items():
            if self.stop_event.is_set():  # SIGTERM during a long start-up or reload: stop now
                raise StartupCancelled("stop requested while loading models")
            request = preset.device if preset.device != "auto" else settings.device
            self.notifier.extend_timeout(300)  # model loads and downloads can outlast TimeoutStartSec
            report = select_device(request)
            self.device_name = f"{report.device} ({report.name})"
            (log.warning if report.fell_back else log.info)(
                "device chosen", preset=name, device=str(report.device), why=report.reason
            )
            precision = preset.precision if report.device.type == "cuda" else "fp32"
            spec = table.get(preset.model)
            if spec is None or spec.arch is None:
                raise ConfigError(f"presets.{name}.model = {preset.model!r}: unknown GPEN model")
            needed = preset_models(preset)
            weights = ensure_models(settings, needed, download=settings.download, log=log.info)
            key = (str(weights[spec.name]), str(report.device), precision, preset.detector, preset.use_parsing)
            models = self.models.get(key) or loaded.get(key)
            if models is None:
                log.info("loading models", preset=name, model=spec.name, precision=precision)
                self.failpoints.hit("load")
                models = load_engine_models(
                    generator_path=weights[spec.name],
                    arch=spec.arch,
                    detector_path=weights[needed[1]],
                    detector_name=preset.detector,
                    parser_path=weights[needed[2]] if preset.use_parsing else None,
                    device=report.device,
                    precision=precision,
                )
                # Not into self.models yet: a reload refused below (a warm-up out of memory) must not leave these
                # on the device, taking memory from the presets that keep running.
                loaded[key] = models
            if self.stop_event.is_set():
                raise StartupCancelled("stop requested while loading models")
            restorer = Restorer(models, preset)
            self._warm_up(restorer)
            restorers[name] = restorer
            identities[name] = _load_identity(settings, preset)
        self.models.update(loaded)
        self.restorers.update(restorers)
        self.loaded_as.update(identities)
        # Model sets no restorer uses any more (a preset moved to another file, device or precision) hold
        # device memory for nothing: drop them (a batch in flight keeps its own restorer, and so its models).
        used = {id(r.models) for r in self.restorers.values()}
        self.models = {k: m for k, m in self.models.items() if id(m) in used}

    def _warm_up(self, restorer: Restorer) -> None:
        """One real pass through detection and the generator, so READY means the device really computes."""
        started = time.monotonic()
        restorer.warm_up()
        log.info("warm-up done", preset=restorer.preset.name, ms=round((time.monotonic() - started) * 1000, 1))

    # ----------------------------------------------------------------- watching
    def _start_watcher(self, key: str, folder: FolderSettings, *, replacing: FolderWatcher | None = None) -> None:
        def on_candidates(relpaths: list[str]) -> None:
            self.candidates.put((key, relpaths))

        def on_pause(reason: str) -> None:
            self.paused[key] = reason
            log.warning("hot folder paused", folder=key, reason=reason)

        def on_resume() -> None:
            self.paused.pop(key, None)
            log.info("hot folder resumed", folder=key)

        def on_refused(relpath: str, reason: str) -> None:
            self.refused.put((key, relpath, reason))

        excluded = [folder.output, folder.backup, folder.failed, state_dir(self.settings)]
        if folder.done is not None:
            excluded.append(folder.done)
        watcher = FolderWatcher(
            folder,
            extensions=self.settings.extensions,
            poll_interval=self.settings.poll_interval,
            rescan_interval=self.settings.rescan_interval,
            excluded=excluded,
            on_candidates=on_candidates,
            on_pause=on_pause,
            on_resume=on_resume,
            on_refused=on_refused,
        )
        if replacing is not None:
            watcher.take_over(replacing)
        watcher.start()
        self.watchers[key] = watcher

    # ----------------------------------------------------------------- gate thread
    def _take_candidates(self) -> None:
        assert self.jobs is not None
        while True:
            try:
                key, relpaths = self.candidates.get_nowait()
            except queue.Empty:
                break
            folder = self.folders.get(key)
            if folder is None:
                continue
            for relpath in relpaths:
                if not is_candidate(relpath, self.settings.extensions):
                    continue
                try:
                    st = os.lstat(safe_join(folder.path, relpath))
                except (OSError, UnsafePath):
                    continue  # gone again already, or refused: the next scan settles it
                # Size and mtime let the table recognise an original that after = "keep" left in place. With
                # "delete" or "move" a processed original is gone: a file there now was dropped again (cp -p, or
                # moved back from failed/ to retry it), even with the same size and mtime.
                self.jobs.note_candidate(key, relpath, folder.preset, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                         only_kept=folder.after != "keep")
        while True:
            try:
                key, relpath, reason = self.refused.get_nowait()
            except queue.Empty:
                return
            self._refuse(key, relpath, reason)

    def _refuse(self, key: str, relpath: str, reason: str) -> None:
        """A link or special file in a hot folder: never followed; a link named like an image goes to failed/.

        Everything else refused stays where it is, and `gpen-watch status` lists it (``FolderWatcher.refused``).
        """
        assert self.jobs is not None
        folder = self.folders.get(key)
        if folder is None or not is_candidate(relpath, self.settings.extensions):
            log.warning("file refused", folder=key, path=relpath, reason=reason)
            return
        parent = Path(relpath).parent
        try:
            # safe_join refuses the link itself; only the folders above it must be real.
            path = (folder.path if parent == Path(".") else safe_join(folder.path, str(parent))) / Path(relpath).name
        except UnsafePath:
            return
        if not path.is_symlink():
            log.warning("file refused", folder=key, path=relpath, reason=reason)
            return
        job = self.jobs.note_candidate(key, relpath, folder.preset)
        if job.sha256 is not None and job.state in ("ready", "retry"):
            # The row is the photo that was there before the link took its name: that photo is gone (its backup,
            # if one was made, stays and is named); the link is an entry of its own.
            self._source_missing(job, folder)
            job = self.jobs.note_candidate(key, relpath, folder.preset)
        self._fail(job, folder, path, "watch", f"refused: {reason}")

    def _gate_loop(self) -> None:
        """Look at every pending file a few times a second; a quiet one is read, decoded and hashed on the gate's
        pool, so that one large PNG or TIFF does not hold up the files behind it."""
        assert self.jobs is not None
        gates: dict[str, ReadinessGate] = {}
        checks: dict[int, _Check] = {}  # job id -> its read-and-decode check on the pool
        crashed: set[int] = set()
        pool = ThreadPoolExecutor(self.settings.io_threads, thread_name_prefix="gate")
        try:
            while not self.stop_event.is_set():
                self._beat_gate(checks)
                try:
                    self._take_candidates()
                    for job_id in [i for i, c in checks.items() if c.future.done()]:
                        del checks[job_id]
                    beat_at = time.monotonic()
                    check_decodes, max_bytes = _gate_limits(self.settings)  # a reload may change max_pixels
                    pending = self.jobs.pending()
                    waiting = {job.id for job in pending}
                    for job_id in [i for i in self.not_ready_why if i not in waiting]:  # settled elsewhere
                        del self.not_ready_why[job_id]
                    for job in pending:
                        if self.stop_event.is_set():
                            break
                        if time.monotonic() - beat_at > 1.0:  # a pass over a big drop stats every file
                            self._beat_gate(checks)
                            beat_at = time.monotonic()
                        folder = self.folders.get(job.folder)
                        if job.id in checks or folder is None or job.folder in self.paused:
                            continue
                        if self.fail_later.get(job.id, 0.0) > time.monotonic():
                            continue
                        g = gates.setdefault(
                            job.folder,
                            ReadinessGate(
                                stability_delay=folder.stability_delay,
                                max_wait=self.settings.max_ready_wait,
                                check_decodes=check_decodes,
                                max_bytes=max_bytes,
                                keep_data=False,  # the read pool reads the file again and compares hashes
                            ),
                        )
                        # A reload may have changed these; the files being tracked keep their quiet time so far.
                        g.stability_delay, g.max_wait = folder.stability_delay, self.settings.max_ready_wait
                        g.check_decodes, g.max_bytes = check_decodes, max_bytes
                        self._gate_one(g, folder, job, pool, checks, crashed)
                except Exception as exc:
                    if self.repeats.first(f"gate: {exc}"):
                        log.exception("gate pass failed; retrying (the same error is logged again once a minute)")
                self.stop_event.wait(0.2)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _beat_gate(self, checks: dict[int, _Check]) -> None:
        """The gate is alive while its own loop runs and no check on its pool is stuck (a hung read of a share)."""
        started = [c.started for c in list(checks.values()) if c.started is not None and not c.future.done()]
        self.heartbeats.beat("gate", at=min(started, default=None))

    def _gate_one(self, gate: ReadinessGate, folder: FolderSettings, job: Job, pool: ThreadPoolExecutor,
                  checks: dict[int, _Check], crashed: set[int]) -> None:
        """One look at a pending file: settled here, or its bytes checked on ``pool`` (one check per file at a time)."""

        def guarded(step: Callable[[], None]) -> None:
            try:
                step()
            except JobStateError:  # another instance sharing this table settled it first
                gate.forget(job.id)
            except JobTableError:
                raise
            except Exception:  # one file must not stop the gate for every other one; looked at again
                if job.id not in crashed:
                    crashed.add(job.id)
                    log.exception("readiness check crashed; trying again", folder=job.folder, path=job.relpath)

        def check(path: Path, available: Callable[[], str | None] | None, entry: _Check) -> None:
            entry.started = time.monotonic()
            try:
                guarded(lambda: self._settle_look(
                    gate, folder, job, path, gate.inspect(path, job.id, available=available, base=folder.path)))
            except JobTableError:  # the file stays pending and is looked at again
                log.exception("readiness verdict not recorded; trying again", folder=job.folder, path=job.relpath)

        def glance() -> None:
            assert self.jobs is not None
            try:
                path = safe_join(folder.path, job.relpath)
            except UnsafePath as exc:
                self.jobs.fail(job.id, "readiness", f"unsafe path: {exc}")
                log.warning("file refused", folder=job.folder, path=job.relpath, reason=str(exc))
                return
            watcher = self.watchers.get(job.folder)
            if watcher is not None and watcher.paused is not None:
                return  # gone, unmounted or swapped for a link: nothing is read there until it is back
            available = watcher.unavailable_reason if watcher else None
            verdict = gate.glance(path, job.id, available=available, base=folder.path)
            if verdict is not None:
                self._settle_look(gate, folder, job, path, verdict)
                return
            entry = _Check()
            checks[job.id] = entry
            entry.future = pool.submit(check, path, available, entry)

        guarded(glance)

    def _settle_look(self, gate: ReadinessGate, folder: FolderSettings, job: Job, path: Path, verdict: Verdict
                     ) -> None:
        assert self.jobs is not None
        if verdict.state == "not_yet":
            if self.not_ready_why.get(job.id) != verdict.reason:  # each change once, not every look
                self.not_ready_why[job.id] = verdict.reason
                log.debug("not ready yet", folder=job.folder, path=job.relpath, reason=verdict.reason)
            return
        self.not_ready_why.pop(job.id, None)
        gate.forget(job.id)
        if verdict.state == "gone":
            if self._folder_available(job.folder) and not self._failed_unrecorded(job, folder):
                self.jobs.mark_gone(job.id)
                log.info("file vanished before it was ready", folder=job.folder, path=job.relpath)
            return
        if verdict.state == "failed":
            self._fail(job, folder, path, "readiness", verdict.reason)
            return
        # after = "keep" leaves processed originals in place; they are not new work, even once touched. (With
        # "delete" or "move" the same bytes under the same name are a new drop: the duplicates policy decides.)
        # A READY verdict always describes its bytes.
        assert verdict.size is not None and verdict.mtime_ns is not None and verdict.sha256 is not None
        if folder.after == "keep" and self.jobs.is_unchanged_done(
                job.folder, job.relpath, verdict.size, verdict.mtime_ns, sha256=verdict.sha256):
            self.jobs.mark_skipped(job.id, "already processed (unchanged since)")
            return
        if folder.after == "keep" and self._published_before(folder, job, verdict.sha256):
            # A job table that was lost (moved aside as corrupted, a new state_dir) knows none of the originals
            # left in place: the outputs share does.
            self.jobs.mark_skipped(job.id, "already processed (its backup has the same bytes, and its result is there)",
                                   identity=(verdict.size, verdict.mtime_ns, verdict.sha256))
            log.info("already processed before this job table; not done again", folder=job.folder, path=job.relpath)
            return
        if self.settings.duplicates == "skip" and self.jobs.find_done_by_hash(job.folder, verdict.sha256):
            kept = None  # the row stays pending (not claimable) until the duplicate is dealt with
            try:  # only the bytes that were checked: a file saved under the name since is new work
                publish.dispose_source(
                    path, after=folder.after, done_path=self._done_path(folder, job), done_root=folder.done,
                    src_root=folder.path, sha256=verdict.sha256,
                )
            except publish.SourceChanged:
                log.info("a duplicate was replaced before it was removed; the new file is looked at next",
                         folder=job.folder, path=job.relpath)
            except OSError as exc:  # passing trouble is tried again at the next scan, as a new drop
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    kept = f"the duplicate could not be removed: {exc.strerror or exc}"
            self.jobs.mark_skipped(job.id, "identical to a file processed before", kept=kept,
                                   identity=(verdict.size, verdict.mtime_ns, verdict.sha256))
            log.info("duplicate skipped", folder=job.folder, path=job.relpath, **({"kept": kept} if kept else {}))
            return
        self.jobs.mark_ready(job.id, verdict.size, verdict.mtime_ns, verdict.sha256)
        log.debug("ready; queued", folder=job.folder, path=job.relpath, bytes=verdict.size, preset=folder.preset)
        self.waiting_since.setdefault(folder.preset, time.monotonic())

    def _published_before(self, folder: FolderSettings, job: Job, sha256: str) -> bool:
        """Whether this kept original was published before the job table knew it: the backup under its own name
        holds these bytes and a result of that name is there, and the table has no row of the file, nor of either
        name (so neither is another file's: folders may share an outputs folder)."""
        assert self.jobs is not None
        try:
            backup = safe_join(folder.backup, job.relpath)
            results = safe_join(folder.output, job.relpath).parent
            if not os.path.isfile(backup):  # the common case, a new photo: one stat
                return False
            stem = os.path.splitext(backup.name)[0]
            with os.scandir(results) as entries:
                found = [e.path for e in entries if os.path.splitext(e.name)[0] == stem
                         and e.is_file(follow_symlinks=False)]
        except (UnsafePath, OSError):
            return False
        if not found or self.jobs.remembers(job.folder, job.relpath, [str(backup), *found], besides=job.id):
            return False
        return publish.file_has_sha256(backup, sha256)

    # ----------------------------------------------------------------- prep thread
    def _prep_loop(self) -> None:
        while not self.stop_event.is_set():
            self.heartbeats.beat("prep")
            try:
                batch = self._next_batch()
            except Exception as exc:
                if self.repeats.first(f"claim: {exc}"):
                    log.exception("claiming a batch failed; retrying (the same error is logged again once a minute)")
                self.stop_event.wait(1.0)
                continue
            if batch is None:
                self.stop_event.wait(0.1)
                continue
            while not self.stop_event.is_set():
                self.heartbeats.beat("prep")
                try:
                    self.prepared.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def _next_batch(self) -> Batch | None:
        assert self.jobs is not None
        depths = {p: n for p, n in self.jobs.queue_depths(time.time()).items() if p in self.restorers}
        priorities: dict[str, int] = {}
        for f in self.folders.values():
            priorities[f.preset] = max(priorities.get(f.preset, f.priority), f.priority)
        # A file that was in flight when the process died runs alone before anything else (JobTable.claim).
        preset = self.jobs.suspect_preset(list(self.restorers), time.time()) or pick_queue(
            depths, priorities, self.waiting_since, time.monotonic())
        if preset is None:
            return None
        cap = self.restorers[preset].preset.batch_size
        jobs = self.jobs.claim(preset, cap, time.time())
        deadline = time.monotonic() + self.settings.max_batch_delay
        while len(jobs) < cap and time.monotonic() < deadline and not self.stop_event.is_set():
            self.stop_event.wait(0.05)
            jobs += self.jobs.claim(preset, cap - len(jobs), time.time())
        self.waiting_since[preset] = time.monotonic()
        if not jobs:
            return None
        jobs = self._with_shares_there(jobs)
        try:
            items = [p for p in self.read_pool.map(self._read, jobs) if p is not None]
        except Exception as exc:
            # Claimed rows must not stay "processing" until a restart (a waiting suspect would stall every
            # claim behind them): they go back to the queue, and the error is logged by the prep loop.
            for job in jobs:
                with contextlib.suppress(JobStateError):
                    self.jobs.retry_later(job.id, f"read: {exc}", self._backoff(job))
            raise
        if not items:
            return None
        batch = Batch(preset, items, batch_id=jobs[0].batch_id or f"b{jobs[0].id}")
        log.debug("batch read", batch_id=batch.batch_id, preset=preset, files=len(items), claimed=len(jobs))
        return batch

    def _with_shares_there(self, jobs: list[Job]) -> list[Job]:
        """``jobs`` whose folder's outputs shares are there (looked at once per folder); the others wait unread.

        Checked again when publishing; a share already away would have each file restored at every retry."""
        away: dict[str, publish.ShareUnavailable | None] = {}
        kept = []
        for job in jobs:
            folder = self.folders.get(job.folder)
            if folder is not None and job.folder not in away:
                try:
                    self._check_mounted(folder.backup, folder.output, folder.done if folder.after == "move" else None)
                    away[job.folder] = None
                except publish.ShareUnavailable as lost:
                    away[job.folder] = lost
            if (why := away.get(job.folder)) is not None:
                self._retry(job, "publish", why, side="destination")
            else:
                kept.append(job)
        return kept

    def _read(self, job: Job) -> Prepared | None:
        """Read and decode one claimed job's source; settle the job here if that fails."""
        try:
            return self._read_source(job)
        except Exception as exc:  # a fault of this file's: its attempts count, its batch mates go on
            log.exception("reading a file failed unexpectedly", folder=job.folder, path=job.relpath)
            self._retry(job, "read", exc)
            return None

    def _read_source(self, job: Job) -> Prepared | None:
        assert self.jobs is not None
        folder = self.folders.get(job.folder)
        if folder is None:  # its folder left the config on reload: the file stays as it is
            self.jobs.forget_unfinished(job.folder, job.id)
            return None
        if not self._folder_available(job.folder):  # gone, unmounted or swapped for a link: its files wait
            self.jobs.retry_later(job.id, "hot folder unavailable", self.settings.retry_backoff)
            return None
        started = time.monotonic()
        try:
            source = safe_join(folder.path, job.relpath)
            # No folder on the way may be a link; the gate refused larger files, but this one may have grown since.
            data = open_no_follow(job.relpath, base=folder.path, max_bytes=max_file_bytes(self.settings.max_pixels))
        except FileTooLarge:
            self.jobs.requeue_pending(job.id, "source changed after it was queued")  # the gate judges it again
            return None
        except UnsafePath as exc:
            self._fail(job, folder, None, "read", f"unsafe path: {exc}")
            return None
        except FileNotFoundError:
            self._source_missing(job, folder)
            return None
        except OSError as exc:
            self._retry(job, "read", exc)
            return None
        if hashlib.sha256(data).hexdigest() != job.sha256:
            if self._published_whole(job):
                # The old bytes were published before a stop that came before the original's disposal; what is
                # there now was dropped later: new work, in a row of its own.
                self.jobs.finish(job.id, job.faces or 0)
                self.jobs.note_candidate(job.folder, job.relpath, job.preset)
                log.info("source replaced after its earlier version was published; the new one is new work",
                         folder=job.folder, path=job.relpath, earlier_output=job.output_path)
                return None
            backup = self._backup_of(job)  # made before a stop: the earlier version's only copy now
            self.jobs.requeue_pending(job.id, "source changed after it was queued")
            log.info("source changed while queued; checking it again", folder=job.folder, path=job.relpath,
                     **({"earlier_version_backup_kept": backup} if backup else {}))
            return None
        restorer = self.restorers.get(job.preset)  # the batch's preset: claimed only while it is loaded
        if restorer is None:  # unloaded by a reload since the claim
            self.jobs.retry_later(job.id, "preset no longer configured", 60)
            return None
        try:
            image = imageio.decode(data, max_pixels=self.settings.max_pixels, long_side=restorer.preset.max_long_side)
            decode_ms = (time.monotonic() - started) * 1000  # preparing counts as detection, in the engine's times
            working = restorer.prepare(image.rgb)
        except InputError as exc:
            self._fail(job, folder, source, "decode", str(exc))
            return None
        return Prepared(job, folder, source, data, image, working, decode_ms)

    def _folder_available(self, key: str) -> bool:
        """False while a hot folder (or the share it lives on) is gone: missing files there are not deletions."""
        watcher = self.watchers.get(key)
        folder = self.folders.get(key)
        if folder is None or not folder.path.is_dir():
            return False
        return watcher is None or (watcher.paused is None and watcher.unavailable_reason() is None)

    def _source_missing(self, job: Job, folder: FolderSettings, faces: int | None = None) -> None:
        """The source is gone: finished before a crash, removed by a user, or its share vanished.

        ``faces``: how many this attempt restored, when it is the one that published."""
        assert self.jobs is not None
        if not self._folder_available(job.folder):
            self.jobs.retry_later(job.id, "hot folder unavailable", self.settings.retry_backoff)
            return
        if self._published_whole(job):
            # Published completely (before the last stop, or just now); only the bookkeeping was missing.
            done = faces if faces is not None else job.faces or 0
            self.jobs.finish(job.id, done)
            self._count_done(done)
            return
        if self._failed_unrecorded(job, folder):
            return
        self.jobs.mark_gone(job.id)
        # A backup made before it vanished (the process died between backup and result) may now be its only copy.
        kept = self._backup_of(job)
        log.warning("file vanished while queued", folder=job.folder, path=job.relpath,
                    **({"backup_kept": kept} if kept else {}))

    @staticmethod
    def _backup_of(job: Job) -> str | None:
        """The job's backup, if it was written whole (it holds the bytes the job was judged on)."""
        return job.backup_path if job.backup_path and publish.file_has_sha256(Path(job.backup_path), job.sha256) \
            else None

    def _published_whole(self, job: Job) -> bool:
        """Whether the job's backup and result are both there: published, before a stop or just now."""
        return self._backup_of(job) is not None and bool(job.output_path) and Path(str(job.output_path)).exists()

    def _failed_unrecorded(self, job: Job, folder: FolderSettings) -> bool:
        """Whether a missing source is in failed/ already, moved there by an earlier process that died before it
        wrote the failure down; if so, it is written down now (a failure, not a vanished file)."""
        assert self.jobs is not None
        failure = publish.recorded_failure(folder.failed, job.relpath, folder=job.folder, sha256=job.sha256,
                                           writer=self._failure_info(job, folder, "", "").writer or "",
                                           since=job.created_at)
        if failure is None:
            return False
        stage, error = failure
        self.jobs.fail(job.id, stage, error)
        log.warning("failed (found in the failed folder after a restart)", folder=job.folder, path=job.relpath,
                    stage=stage, error=error, result="failed")
        return True

    # ----------------------------------------------------------------- device thread
    def _device_loop(self) -> None:
        assert self.executor is not None
        while True:
            self.heartbeats.beat("device")
            try:
                batch = self.prepared.get(timeout=0.5)
            except queue.Empty:
                if self.stop_event.is_set():
                    return
                continue
            if batch is None or self.stop_event.is_set():
                return  # a prepared batch not started yet: _close hands its rows back (ready, no crash counted)
            structlog.contextvars.bind_contextvars(batch_id=batch.batch_id, preset=batch.preset)
            try:
                self._run_batch(batch)
            except Exception:
                log.exception("batch crashed")
            finally:
                structlog.contextvars.unbind_contextvars("batch_id", "preset")

    def _run_batch(self, batch: Batch) -> None:
        assert self.executor is not None
        started = time.monotonic()
        outcomes = self._outcomes(batch.preset, batch.items)
        self.heartbeats.beat("device")
        if (lost := device_lost(outcomes, partial(self.executor.check, batch.preset))) is not None:
            self._device_lost(batch, lost)
            return
        if self.metrics is not None:
            self.metrics.observe_batch(len(batch.items))
            self.metrics.observe_stage("batch", time.monotonic() - started)
        opts = engine_options(self.settings, self.restorers[batch.preset].preset)
        for item, outcome in zip(batch.items, outcomes, strict=True):
            if isinstance(outcome, Raised):
                try:
                    self._retry(item.job, "generate", outcome.error)
                except Exception:  # one row's bookkeeping must not leave the others "processing"
                    log.exception("settling a failed file crashed", folder=item.job.folder, path=item.job.relpath)
                continue
            future = self.publish_pool.submit(self._publish, item, outcome, opts)
            with self.in_flight_lock:
                self.in_flight.add(future)
            future.add_done_callback(self._publish_done)
        # Back-pressure: never let more than a few batches of results pile up in memory.
        self._wait_for_publishing(2 * max(1, len(batch.items)) + self.settings.io_threads)

    def _wait_for_publishing(self, limit: int) -> None:
        """Wait until at most ``limit`` results are still being published.

        The device thread is alive while publishing makes progress, however long a slow share takes over all of
        them; a publish that hangs (a hard NFS mount gone) stops the heartbeat and so, after a while, the
        watchdog pings."""
        left = None
        while True:
            with self.in_flight_lock:
                now = len(self.in_flight)
            if now <= limit:
                return
            if left is not None and now < left:  # only this thread adds to it
                self.heartbeats.beat("device")
            left = now
            time.sleep(0.01)

    def _outcomes(self, preset: str, items: Sequence[Prepared]) -> list[Outcome | Raised]:
        """One outcome per item, or the exception the engine raised for it once narrowed down to it alone."""
        assert self.executor is not None
        executor = self.executor

        def run(part: Sequence[Prepared]) -> list[Outcome]:
            self.heartbeats.beat("device")
            return executor.run(preset, [p.working for p in part])

        def on_error(part: Sequence[Prepared], exc: Exception, first: bool) -> None:
            # One traceback per batch, and none for what is expected (out of memory, an engine error).
            trace = first and not (isinstance(exc, EngineError) or is_out_of_memory(exc))
            if len(part) == 1:
                log.error("restoring failed", error=str(exc), folder=part[0].job.folder, path=part[0].job.relpath,
                          exc_info=trace)
            else:
                log.warning("batch failed; trying its halves", error=str(exc), files=len(part), exc_info=trace)

        return run_narrowing(run, items, on_error)

    def _device_lost(self, batch: Batch, error: Exception) -> None:
        """Every file of the batch failed and so did a blank test image: the device, not the files, is broken.

        A CUDA context that has hit an error stays broken for the life of the process, so failing file after file
        would only move the whole queue to failed/. Instead the batch goes back as if the process had died on it
        (a crash each, see JobTable.requeue_crashed) and the process exits with EXIT_DEVICE_LOST: systemd starts
        it again on a fresh context, and a device that is really gone then fails the start, with nothing charged."""
        assert self.jobs is not None
        why = _one_line(error)
        given_up = self.jobs.requeue_crashed([p.job.id for p in batch.items], f"the device failed: {why}",
                                             self.settings.max_attempts)
        log.error("the device no longer computes (a blank test image fails too); stopping so that a restart gets "
                  "a fresh device. The batch's files stay queued and are redone then, one at a time",
                  error=why, files=len(batch.items), given_up=given_up)
        if given_up:
            try:
                self._settle_crash_loops()
            except Exception as exc:  # the next start settles them
                log.warning("files given up on not moved to failed/ yet", error=str(exc))
        self.device_name = f"lost ({why})"
        self._write_snapshot({}, {})
        self.notifier.status(f"device failed: {why}; exiting for a restart")
        self.exit_status = EXIT_DEVICE_LOST
        self.stop_event.set()

    def _publish_done(self, future: Future[None]) -> None:
        with self.in_flight_lock:
            self.in_flight.discard(future)
        if (exc := future.exception()) is not None:
            log.error("publishing crashed", error=repr(exc))

    # ----------------------------------------------------------------- publishing
    def _publish(self, item: Prepared, outcome: Outcome, opts: EngineOptions) -> None:
        assert self.jobs is not None
        job, folder = item.job, item.folder
        structlog.contextvars.bind_contextvars(folder=job.folder, path=job.relpath)
        writing = ""  # which file an OSError is about: the message of a bare errno names no folder
        try:
            if isinstance(outcome, DeviceOutOfMemory):  # fits later, with a smaller batch or a quieter GPU
                self._retry(job, "generate", outcome)
                return
            if isinstance(outcome, EngineError):
                self._fail(job, folder, item.source, "generate" if not isinstance(outcome, InputError) else "restore",
                           str(outcome))
                return
            if not outcome.faces and self.settings.no_face == "fail":
                self._fail(job, folder, item.source, "detect", str(NoFaceFound("no face found")))
                return
            started = time.monotonic()
            data, ext = self._encode(item, outcome, opts)
            encode_ms = (time.monotonic() - started) * 1000
            output, backup = self._targets(job, folder, ext)
            self._check_mounted(folder.backup, folder.output, folder.done if folder.after == "move" else None)
            # The backup first: copying it re-reads the source and checks its SHA-256, so a source deleted or
            # replaced since it was read stops here, before a result for bytes nobody wants is published.
            writing = f"backup {backup}"
            self.failpoints.hit("backup")
            assert job.sha256 is not None  # set when the job became ready
            copied = publish.copy_verified(item.source, backup, job.sha256, root=folder.backup, src_root=folder.path)
            writing = f"result {output}"
            self.failpoints.hit("publish")
            publish.write_atomic(output, data, root=folder.output)
            writing = f"the original's {'removal' if folder.after == 'delete' else 'move'} ({item.source})"
            self.failpoints.hit("dispose")
            kept = None
            try:
                publish.dispose_source(
                    item.source, after=folder.after, done_path=self._done_path(folder, job), done_root=folder.done,
                    src_root=folder.path, expect=copied, sha256=job.sha256,
                )
            except publish.SourceChanged as exc:
                # Result and backup of the bytes we read are published; the new file is a new drop.
                log.warning("source replaced while it was published; the new file is processed next", error=str(exc))
            except OSError as exc:
                if isinstance(exc, publish.ShareUnavailable) or exc.errno not in (errno.EROFS, errno.EACCES,
                                                                                  errno.EPERM):
                    raise  # passing trouble (a share away, a full disk): tried again
                # A read-only hot folder, or one the service may not change: result and backup are safe, so the work
                # is not redone; the original stays and is known when seen again unchanged.
                action = "deleted" if folder.after == "delete" else "moved to the done folder"
                kept = f"the original could not be {action}: {exc.strerror or exc}"
                log.warning("published, but the original stays in the hot folder", reason=kept,
                            fix="make the hot folder writable for the service user")
            self.jobs.finish(job.id, len(outcome.faces), kept=kept)
            self._count_done(len(outcome.faces))
            times = outcome.times.as_dict() | {"decode": round(item.decode_ms, 2), "encode": round(encode_ms, 2)}
            log.info("published", output=str(output), faces=len(outcome.faces), ms=times, result="ok")
            if damage := item.image.info.get("damaged"):  # restored all the same: the backup keeps the file as it came
                log.warning("the source was damaged", damage=damage)
            if dropped := item.image.info.get("dropped"):
                log.warning("the result lacks part of the source; the backup has it", dropped=dropped)
            if self.metrics is not None:
                for stage, ms in times.items():
                    self.metrics.observe_stage(stage, ms / 1000)
        except publish.SourceChanged as exc:
            self.jobs.requeue_pending(job.id, str(exc))
        except FileNotFoundError as exc:
            if not item.source.exists():  # with this attempt's names: it may have published everything
                faces = None if isinstance(outcome, Exception) else len(outcome.faces)
                self._source_missing(self.jobs.get(job.id), folder, faces)
            else:
                self._retry(job, "publish", exc)
        except InputError as exc:
            self._fail(job, folder, item.source, "encode", str(exc))
        except UnsafePath as exc:
            self._fail(job, folder, item.source, "publish", f"unsafe path: {exc}")
        except OSError as exc:
            self._retry(job, "publish", exc, side="destination", about=writing)
        except Exception as exc:
            log.exception("publishing failed")
            self._retry(job, "publish", exc)
        finally:
            structlog.contextvars.unbind_contextvars("folder", "path")

    def _encode(self, item: Prepared, outcome: RestoredImage, opts: EngineOptions) -> tuple[bytes, str]:
        data, fmt = imageio.encode_result(item.data, item.image, outcome.rgb, restored=bool(outcome.faces),
                                          options=opts.encode, max_pixels=self.settings.max_pixels)
        return data, _suffix(item.job.relpath, fmt, converted=opts.encode.format is not None)

    def _targets(self, job: Job, folder: FolderSettings, ext: str) -> tuple[Path, Path]:
        """Output and backup names, chosen once per job and recorded before anything is written."""
        assert self.jobs is not None
        if job.output_path and job.backup_path:
            return Path(job.output_path), Path(job.backup_path)
        jobs = self.jobs
        with self.names_lock:  # this process's threads; set_targets settles it with other instances
            for _ in range(100):
                output, backup = publish.plan_result_and_backup(
                    folder.output, folder.backup, job.relpath, ext, collisions=self.settings.collisions,
                    reserved=_one_of(jobs.reserved_targets()),
                    # "overwrite" replaces this source's own earlier result, never another file's.
                    replaceable=lambda p: jobs.source_of(str(p)) == (job.folder, job.relpath),
                )
                if jobs.set_targets(job.id, str(output), str(backup)):
                    return output, backup
        raise OSError(errno.EBUSY, "other instances keep taking the names planned for this file; trying again later")

    def _done_path(self, folder: FolderSettings, job: Job) -> Path | None:
        return safe_join(folder.done, job.relpath) if folder.after == "move" and folder.done else None

    def _fail(self, job: Job, folder: FolderSettings, source: Path | None, stage: str, error: str) -> None:
        """A permanent failure: the original goes to failed/ with a sidecar saying why."""
        assert self.jobs is not None
        info = self._failure_info(job, folder, stage, error)
        kept = None
        try:
            if source is not None and os.path.lexists(source):
                self._check_mounted(folder.failed)
                with self.failed_lock:
                    publish.write_failure(folder.failed, job.relpath, source, None, info, src_root=folder.path)
        except publish.OriginalKept as exc:
            # The copy and its reason are in failed/; trying again would only add copies. Seen again unchanged,
            # the original is known as this failure.
            kept = f"a copy is in the failed folder ({exc.stored.name}), but the original could not be removed: " \
                   f"{exc.strerror}"
            log.warning("failed; the original stays in the hot folder", folder=job.folder, path=job.relpath,
                        reason=kept, fix="make the hot folder writable for the service user")
        except UnsafePath as exc:
            # A folder on its way was swapped for a link since the path was checked: nothing there is touched.
            log.warning("failed file left in place: its path now leads through a link", folder=job.folder,
                        path=job.relpath, error=str(exc))
        except OSError as exc:
            # The failed folder refused (gone, full, read-only, a name it cannot hold): the original stays where it
            # is and is tried again later. Not through _retry, whose give-up path calls _fail again.
            delay = self._backoff(job)
            if job.state == "processing":
                self.jobs.retry_later(job.id, f"failed-folder: {exc}", delay)
            else:  # a gate or watch verdict: the gate must not try again on its next pass (5 times a second)
                self.fail_later[job.id] = time.monotonic() + self.settings.retry_backoff_max
                self.fail_refused[job.id] = f"{job.relpath} ({error}): {exc.strerror or exc}"
            log.warning("failed file could not be moved to the failed folder; will retry", folder=job.folder,
                        path=job.relpath, stage=stage, error=error, failed_folder_error=str(exc))
            return
        self.jobs.fail(job.id, stage, error, kept=kept)
        self.fail_refused.pop(job.id, None)
        with self.counters_lock:
            self.counters["failed"] += 1
        if self.metrics is not None:
            self.metrics.count_result("failed")
        log.warning("failed", folder=job.folder, path=job.relpath, stage=stage, error=error, result="failed")

    def _failure_info(self, job: Job, folder: FolderSettings, stage: str, error: str) -> publish.FailureInfo:
        return publish.FailureInfo(
            stage=stage, error=error, attempts=job.attempts, preset=folder.preset,
            folder=job.folder, relpath=job.relpath, sha256=job.sha256,
            writer=f"{publish.host_tag()}/{self.settings.instance or 'default'}",
        )

    def _backoff(self, job: Job) -> float:
        """Seconds before the next try: doubling per attempt, up to retry_backoff_max."""
        return min(self.settings.retry_backoff * 2 ** max(0, job.attempts - 1), self.settings.retry_backoff_max)

    def _retry(self, job: Job, stage: str, exc: BaseException, *,
               side: Literal["source", "destination"] = "source", about: str = "") -> None:
        """Transient trouble (share gone, disk full, OOM, locked file): try again later, never drop the file.

        ``about``: the file the error is about (e.g. "backup /srv/backup/a.jpg"), named in the reason."""
        assert self.jobs is not None
        if self.metrics is not None:
            self.metrics.count_result("retry")
        if isinstance(exc, OSError):
            transient = publish.classify_os_error(exc, side=side) == "transient"
        else:  # out of memory will pass; an unexpected error gets max_attempts tries, then failed/ with its reason
            # Host memory too: it runs out when other large files decode at the same moment.
            transient = out_of_memory(exc)
        error = f"{about}: {exc.strerror or exc}" if about and isinstance(exc, OSError) else str(exc)
        error = error or type(exc).__name__  # MemoryError() says nothing
        if not transient and job.attempts >= self.settings.max_attempts:
            folder = self.folders.get(job.folder)
            if folder is not None:
                try:
                    source: Path | None = safe_join(folder.path, job.relpath)
                except UnsafePath:  # the way to it is no longer safe to follow: its failure leaves it in place
                    source = None
                self._fail(job, folder, source, stage, error)
                return
        delay = self._backoff(job)
        self.jobs.retry_later(job.id, f"{stage}: {error}", delay)
        log.warning("will retry", folder=job.folder, path=job.relpath, stage=stage, error=error,
                    retry_in_s=round(delay, 1))

    def _count_done(self, faces: int) -> None:
        if self.metrics is not None:
            self.metrics.count_result("done")
        now = time.monotonic()
        with self.counters_lock:
            self.counters["done"] += 1
            self.counters["faces"] += faces
            self.done_times.append(now)
            while self.done_times and now - self.done_times[0] > 60:
                self.done_times.popleft()

    # ----------------------------------------------------------------- reload
    def _reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading configuration")
        try:
            if self.reload_source is None:
                raise ConfigError("no configuration source to reload from")
            settings, folders = self.reload_source()
            presets = preset_table(settings)
        except ConfigError as exc:
            log.error("new configuration rejected; keeping the running one", error=str(exc))
            self._reject_reload(exc)
            return
        # Set up once at start (the job table, thread pools, logging, the metrics endpoint): the running values stay,
        # and the log says so, rather than a reload that reports success and half applies them.
        later = [name for name in RESTART_ONLY if getattr(settings, name) != getattr(self.settings, name)]
        if later:
            settings = settings.model_copy(update={name: getattr(self.settings, name) for name in later})
            log.warning("settings that take effect at the next restart were changed; keeping the running values",
                        settings=later)
        new_folders = {str(f.path.expanduser().absolute()): f for f in folders}
        in_use = {f.preset: presets[f.preset] for f in new_folders.values()}
        changed = {n: p for n, p in in_use.items()
                   if n not in self.restorers or self.loaded_as.get(n) != _load_identity(settings, p)}
        try:  # before anything switches over: a reload is applied whole or not at all
            self._load_presets(changed, settings)  # reuses loaded models whose file/device/precision did not change
        except StartupCancelled:
            return  # stopping
        except Exception as exc:
            log.error("new configuration rejected: its models could not be loaded; keeping the running one",
                      error=str(exc))
            self._reject_reload(exc)
            return
        # Restorers of presets no longer in use stay: batches claimed before the reload finish with them.
        def watching(s: Settings) -> tuple[object, ...]:  # what every watcher was built with
            return (tuple(s.extensions), s.poll_interval, s.rescan_interval, state_dir(s))

        rewatch_all = watching(settings) != watching(self.settings)
        self.settings, self.presets = settings, presets
        self.reload_rejected = None
        self.config_warnings = preset_warnings(settings)
        for warning in self.config_warnings:
            log.warning("configuration looks wrong", problem=warning)
        for key in set(self.watchers) - set(new_folders):
            self.watchers.pop(key).stop()
            left = self.jobs.forget_unfinished(key) if self.jobs is not None else 0
            log.info("hot folder removed; files not processed yet stay in it, untouched", folder=key, files=left)
        old_folders = self.folders
        moved = [f for k, f in new_folders.items() if old_folders.get(k) != f]
        self._make_folders(moved)
        # Every folder, not only the moved ones: a reload is how an operator says the mounts changed.
        self._note_mounts(new_folders.values(), reload=True)
        # Before any new watcher starts: its first scan's candidates are taken only for folders known here.
        self.folders = new_folders
        for key, folder in new_folders.items():
            # e.g. its output moved (new exclusions), or the extensions or scan intervals changed
            replaced = None
            if key in self.watchers and (rewatch_all or old_folders.get(key) != folder):
                replaced = self.watchers.pop(key)
                replaced.stop()
                self.paused.pop(key, None)  # the old watcher's pause; the new one pauses again if it must
            if key not in self.watchers:
                self._start_watcher(key, folder, replacing=replaced)
                log.info("hot folder watched", folder=key, preset=folder.preset)
            else:
                self.watchers[key].reload_mount()  # the same rule for the hot folder's share
        assert self.jobs is not None
        for key, folder in new_folders.items():
            self.jobs.reassign_preset(key, folder.preset)
        log.info("configuration reloaded", folders=len(new_folders), presets=sorted(in_use))
        self.notifier.ready()

    # ----------------------------------------------------------------- status
    def _reject_reload(self, exc: BaseException) -> None:
        self.reload_rejected = f"last reload rejected, the configuration before it still runs: {_one_line(exc)}"
        self.notifier.status(self.reload_rejected)
        self.notifier.ready()

    def _warnings(self) -> list[str]:
        config = [*([self.reload_rejected] if self.reload_rejected else []), *self.config_warnings]
        return [*(f"config: {w}" for w in config), *self._failed_folder_warnings()]

    def _failed_folder_warnings(self) -> list[str]:
        """Files that failed at the gate but that their failed/ folder refuses: they wait in the hot folder as
        pending, which `status` would not otherwise explain. (Files that failed later show as retries.)"""
        if self.jobs is None or not self.fail_refused:
            return []
        for job_id in list(self.fail_refused):
            try:
                waiting = self.jobs.get(job_id).state == "pending"
            except (JobStateError, JobTableError, KeyError, LookupError):
                waiting = False
            if not waiting:
                self.fail_refused.pop(job_id, None)
        refused = list(self.fail_refused.values())  # the gate thread adds to it
        if not refused:
            return []
        first = refused[0]
        more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
        return [f"failed folder: failed files that cannot be moved into their failed folder stay in the hot folder "
                f"and are tried again: {first}{more}"]

    def _report_status(self) -> None:
        if self.jobs is None:
            return
        try:
            depths = self.jobs.queue_depths(time.time())
        except Exception as exc:
            log.error("job table unreadable", error=str(exc))
            return
        queued = sum(depths.values())
        with self.counters_lock:
            per_min, counters = len(self.done_times), dict(self.counters)
        caps = {n: (self.executor.batch_cap(n) if self.executor else 0) for n in self.restorers}
        if self.metrics is not None:
            for name, cap in caps.items():
                self.metrics.set_batch_cap(name, cap)
        try:
            retrying = sum(c.get("retry", 0) for c in self.jobs.counts().values())
        except Exception:
            retrying = 0
        refused = {key: w.refused() for key, w in list(self.watchers.items())}
        left = sum(len(entries) for entries in refused.values())
        paused_now = dict(self.paused)  # watcher threads pause and resume folders meanwhile
        paused = f", paused: {'; '.join(f'{k} ({r})' for k, r in paused_now.items())}" if paused_now else ""
        waiting = f", waiting to retry {retrying}" if retrying else ""
        never = f", {left} never processed (see gpen-watch status)" if left else ""
        config = ", reload rejected (see gpen-watch status)" if self.reload_rejected else ""
        line = (
            f"queued {queued}{waiting}, done {counters['done']}, failed {counters['failed']}, "
            f"{per_min} img/min on {self.device_name}, batch caps {caps}{paused}{never}{config}"
        )
        self.notifier.status(line)
        self._write_snapshot(depths, caps, refused, paused_now, counters)

    def _write_snapshot(self, depths: dict[str, int], caps: dict[str, int],
                        refused: dict[str, dict[str, str]] | None = None, paused: dict[str, str] | None = None,
                        counters: dict[str, int] | None = None) -> None:
        try:
            name = status.SNAPSHOT_FILE if not self.settings.instance else f"status-{self.settings.instance}.json"
            status.write_snapshot(
                state_dir(self.settings) / name,
                status.Snapshot.current(
                    device=self.device_name, batch_caps=caps, paused=dict(self.paused) if paused is None else paused,
                    queue_depths=depths, counters=dict(self.counters) if counters is None else counters,
                    refused=refused, warnings=self._warnings(), folders=list(self.folders),
                    ready=self.executor is not None,
                ),
            )
        except OSError as exc:  # advisory only; the job table is the truth
            log.debug("status snapshot not written", error=str(exc))

    def _start_metrics(self) -> None:
        if not self.settings.metrics.enabled:
            return
        from daemon.metrics import start_metrics

        assert self.jobs is not None
        metrics = self.settings.metrics
        if self.settings.instance.isdigit():  # one port per GPU instance: base port + index
            metrics = metrics.model_copy(update={"port": metrics.port + int(self.settings.instance)})
        self.metrics = start_metrics(metrics, self.jobs)
        log.info("metrics endpoint", host=metrics.host, port=metrics.port)

