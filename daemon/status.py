"""`gpen-watch status`: what the daemon is doing, read from its state directory without disturbing it.

Two sources, both in the state directory:

* the job table (``jobs.sqlite3``), opened read-only (``mode=ro``): per-folder counts by state, queue depths,
  the last failures and throughput. A reader never takes SQLite's write lock, so it cannot stall the daemon;
  in WAL mode the daemon's writes do not block it either.
* ``status.json``, a small snapshot the daemon rewrites every few seconds (``write_snapshot``): its pid and
  start time, the device, the current batch caps and the paused folders, which only the running process knows.

Exit status: 0 the daemon is running, 3 it is not running (the state is from its last run), 4 no state yet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sqlite3
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from daemon.jobs import SCHEMA_VERSION, STATES, Job, JobTable, JobTableError
from daemon.settings import (
    SYSTEM_STATE_DIR,
    ConfigError,
    config_path,
    possible_state_dirs,
    settings_from_args,
    state_dir,
)

__all__ = [
    "JOBS_FILE",
    "SNAPSHOT_FILE",
    "Failure",
    "Report",
    "Snapshot",
    "SnapshotError",
    "StatusError",
    "command",
    "gather",
    "open_read_only",
    "process_start_time",
    "read_snapshot",
    "render_text",
    "write_snapshot",
]

JOBS_FILE = "jobs.sqlite3"
SNAPSHOT_FILE = "status.json"
STALE_AFTER = 30.0  # seconds without a new status.json from a live daemon
REFUSED_LISTED = 100  # per folder in status.json; the text report shows fewer
REFUSED_SHOWN = 10
THROUGHPUT_WINDOWS = {"1m": 60.0, "5m": 300.0, "15m": 900.0}

EXIT_RUNNING, EXIT_STOPPED, EXIT_NO_STATE = 0, 3, 4


class StatusError(Exception):
    """The state cannot be read; the message says where and what to do."""


class SnapshotError(StatusError):
    """status.json exists but is not a snapshot this version understands."""


# ----------------------------------------------------------------------------------------------- snapshot
@dataclass(frozen=True)
class Snapshot:
    """What only the running daemon knows, written to ``<state_dir>/status.json``."""

    pid: int
    started_at: float  # Unix time the process started; with the pid it identifies the process
    updated_at: float
    version: str
    device: str
    batch_caps: dict[str, int] = field(default_factory=dict)  # preset -> current cap (faces)
    paused: dict[str, str] = field(default_factory=dict)  # folder -> why it is paused
    queue_depths: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # since start: done, failed, faces
    # folder -> {relpath: why} for entries left in a hot folder that are never processed (at most REFUSED_LISTED
    # each), and how many there are in all
    refused: dict[str, dict[str, str]] = field(default_factory=dict)
    refused_counts: dict[str, int] = field(default_factory=dict)
    # What the operator should know about the configuration: a rejected reload (the old one still runs), presets
    # that look like typos. Kept until a reload fixes them, unlike the journal lines that said so once.
    warnings: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)  # the hot folders it watches
    ready: bool = True  # False while it starts (loading and warming up models): not processing files yet

    @classmethod
    def current(
        cls,
        *,
        device: str,
        batch_caps: dict[str, int],
        paused: dict[str, str],
        queue_depths: dict[str, int] | None = None,
        counters: dict[str, int] | None = None,
        refused: dict[str, dict[str, str]] | None = None,
        warnings: list[str] | None = None,
        folders: list[str] | None = None,
        ready: bool = True,
    ) -> Snapshot:
        """A snapshot of this process now."""
        refused = {folder: entries for folder, entries in (refused or {}).items() if entries}
        pid = os.getpid()
        now = time.time()
        return cls(
            pid=pid,
            started_at=process_start_time(pid) or now,
            updated_at=now,
            version=_version(),
            device=device,
            batch_caps=dict(batch_caps),
            paused=dict(paused),
            queue_depths=dict(queue_depths or {}),
            counters=dict(counters or {}),
            refused={folder: dict(sorted(entries.items())[:REFUSED_LISTED]) for folder, entries in refused.items()},
            refused_counts={folder: len(entries) for folder, entries in refused.items()},
            warnings=list(warnings or []),
            folders=sorted(folders or []),
            ready=ready,
        )

    @classmethod
    def from_dict(cls, data: Any) -> Snapshot:
        if not isinstance(data, dict):
            raise SnapshotError("status.json does not hold an object")
        try:
            pid = int(data["pid"])
            if not 1 < pid < 2**31:  # os.kill would signal a group (0, -1) or overflow
                raise ValueError(f"pid {pid}")
            return cls(
                pid=pid,
                started_at=float(data["started_at"]),
                updated_at=float(data["updated_at"]),
                version=str(data["version"]),
                device=str(data["device"]),
                batch_caps={str(k): int(v) for k, v in data.get("batch_caps", {}).items()},
                paused={str(k): str(v) for k, v in data.get("paused", {}).items()},
                queue_depths={str(k): int(v) for k, v in data.get("queue_depths", {}).items()},
                counters={str(k): int(v) for k, v in data.get("counters", {}).items()},
                refused={
                    str(folder): {str(rel): str(why) for rel, why in entries.items()}
                    for folder, entries in data.get("refused", {}).items()
                },
                refused_counts={str(k): int(v) for k, v in data.get("refused_counts", {}).items()},
                warnings=[str(w) for w in data.get("warnings", [])],
                folders=[str(f) for f in data.get("folders", [])],
                ready=bool(data.get("ready", True)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SnapshotError(f"status.json is incomplete or malformed: {exc!r}") from None


def write_snapshot(path: Path | str, snapshot: Snapshot) -> None:
    """Replace ``path`` atomically: a reader sees the old snapshot or the new one, never half of one.

    No fsync: the file is rewritten every few seconds and only describes the live process; after a power
    cut a stale or missing snapshot is harmless (the pid check says the daemon is not running).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(asdict(snapshot), indent=1, sort_keys=True).encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_snapshot(path: Path | str) -> Snapshot | None:
    """The snapshot at ``path``; None if there is none yet."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SnapshotError(f"{path} is not JSON: {exc}") from None
    return Snapshot.from_dict(data)


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (Unix time, ~10 ms resolution), from /proc; None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        btime = [line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")]
        boot = float(btime[0].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    # Field 22 (starttime, in clock ticks since boot) counts from after the ")" closing the command name,
    # which may itself contain spaces or parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    try:
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


def daemon_running(snapshot: Snapshot | None) -> bool:
    """True if the process that wrote ``snapshot`` is alive (not merely some process with a reused pid)."""
    if snapshot is None:
        return False
    try:
        os.kill(snapshot.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by the service user
        pass
    started = process_start_time(snapshot.pid)
    # /proc's boot time is whole seconds and starttime is in ticks; a reused pid started much later.
    return started is None or abs(started - snapshot.started_at) < 2.0


def _version() -> str:
    try:
        return metadata.version("gpen-watch")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------- job table
def open_read_only(path: Path) -> JobTable:
    """The job table at ``path`` opened read-only, for the read methods of JobTable only.

    Nothing in the state directory is created or changed, whoever runs this. While the daemon has the table
    open its WAL file exists and ``mode=ro`` reads through it. Without a WAL file no writer has the table
    open; ``mode=ro`` would then create ``-wal`` and ``-shm`` files owned by the caller (root, under sudo)
    that the service user could not write afterwards, so the file is read as ``immutable`` instead, which
    is exact while nobody writes it.
    """
    if not path.is_file():
        raise StatusError(f"no job table at {path}")
    uri = path.absolute().as_uri()
    live = Path(f"{path}-wal").exists()
    try:
        con = _connect(f"{uri}?mode=ro" if live else f"{uri}?mode=ro&immutable=1")
    except sqlite3.Error as exc:
        raise StatusError(f"cannot read job table {path}: {exc}") from None
    return JobTable(con, path, owner="")


def _connect(uri: str) -> sqlite3.Connection:
    con = sqlite3.connect(uri, uri=True, timeout=1.0, isolation_level=None, check_same_thread=False)
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error:
        con.close()
        raise
    if version != SCHEMA_VERSION:
        con.close()
        raise StatusError(
            f"job table has schema version {version}, this gpen-watch reads version {SCHEMA_VERSION}"
            + ("; the daemon has not finished creating it yet" if version == 0 else "")
        )
    return con


# ------------------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class Failure:
    folder: str
    relpath: str
    stage: str | None
    error: str | None
    attempts: int
    at: float

    @classmethod
    def of(cls, job: Job) -> Failure:
        return cls(job.folder, job.relpath, job.error_stage, job.last_error, job.attempts, job.updated_at)


@dataclass(frozen=True)
class Report:
    state_dir: str
    running: bool
    snapshot: Snapshot | None
    snapshot_problem: str | None
    counts: dict[str, dict[str, int]]
    queue_depths: dict[str, int]
    failures: list[Failure]
    throughput: dict[str, float]  # files per minute over each window of THROUGHPUT_WINDOWS
    instances: dict[str, bool] = field(default_factory=dict)  # instance name ("" = the single daemon) -> running
    retrying: list[Failure] = field(default_factory=list)  # the latest files waiting to retry, with why
    # the latest files finished whose original stays in the hot folder (it could not be removed), with why
    kept: list[Failure] = field(default_factory=list)
    # instance name -> files it holds in flight although it is not running: they wait for it to start again
    stranded: dict[str, int] = field(default_factory=dict)
    shown: str | None = None  # the instance whose snapshot this is

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _disk_full(folder: str) -> bool:
    """Whether the disk holding ``folder`` has no block left for an unprivileged writer."""
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def gather(state: Path, *, failures: int = 10, now: float | None = None) -> Report:
    """Everything `gpen-watch status` shows, read from the state directory ``state``."""
    now = time.time() if now is None else now
    instances, problem = _instance_snapshots(state)
    running = {name: daemon_running(snap) for name, snap in instances.items()}
    # The one the summary line describes: a running daemon (the single one first), else the last one seen. A
    # stopped daemon's snapshot is history: after moving from the single unit to one instance per GPU, the
    # single unit's status.json stays behind and must not speak for the instance that runs now.
    up = sorted(instances, key=lambda n: (n != "", n))
    main = next((n for n in up if running[n]),
                max(instances, key=lambda n: instances[n].updated_at, default=None))
    table = open_read_only(state / JOBS_FILE)
    try:
        report = Report(
            state_dir=str(state),
            running=any(running.values()),
            snapshot=instances.get(main) if main is not None else None,
            shown=main,
            snapshot_problem=problem,
            instances={name: running[name] for name in sorted(instances)},
            counts=table.counts(),
            queue_depths=table.queue_depths(now),
            failures=[Failure.of(job) for job in table.recent_failures(failures)],
            throughput={name: table.throughput(window, now) for name, window in THROUGHPUT_WINDOWS.items()},
            retrying=[Failure.of(job) for job in table.recent_failures(failures, state="retry")],
            kept=[Failure(job.folder, job.relpath, job.state, job.kept, job.attempts, job.updated_at)
                  for job in table.recent_kept(failures)],
            stranded={owner: n for owner, n in table.in_flight_by_owner().items() if not running.get(owner, False)},
        )
    finally:
        table.close()
    return report


def running_snapshots(state: Path) -> dict[str, Snapshot]:
    """The snapshots in ``state`` of daemons that run now, by instance name."""
    return {name: snap for name, snap in _instance_snapshots(state)[0].items() if daemon_running(snap)}


def _instance_snapshots(state: Path) -> tuple[dict[str, Snapshot], str | None]:
    """Each daemon's snapshot in ``state``: ``status.json`` ("") and, per GPU instance N, ``status-N.json``."""
    found: dict[str, Snapshot] = {}
    problems = []
    for path in sorted(state.glob("status*.json")):
        if path.name == SNAPSHOT_FILE:
            name = ""
        elif path.name.startswith("status-"):
            name = path.name.removeprefix("status-").removesuffix(".json")
        else:
            continue
        try:
            snapshot = read_snapshot(path)
        except SnapshotError as exc:
            problems.append(str(exc))
            continue
        if snapshot is not None:
            found[name] = snapshot
    return found, "; ".join(problems) or None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _one_line(text: str | None, width: int = 160) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _shown(text: str) -> str:
    """``text`` with control characters escaped: a file name must not move the cursor or recolour a terminal.

    A byte of a name that is not UTF-8 (read as a lone surrogate) is shown as ``\\xff``, as ``ls -b`` and
    shells write it, so that the file can be found and named."""
    return "".join(c if c.isprintable() else f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else ascii(c)[1:-1] for c in text)


def render_text(report: Report) -> str:
    """The human-readable report."""
    snap = report.snapshot
    lines: list[str] = []
    which = f"instance {report.shown}, " if report.shown else ""
    if report.instances.get(report.shown or "", False) and snap is not None:
        since = _when(snap.started_at)
        phase = "running" if snap.ready else "starting (not processing files yet)"
        lines.append(f"gpen-watch: {phase} ({which}pid {snap.pid}, since {since}, version {snap.version})")
        age = time.time() - snap.updated_at
        if age > STALE_AFTER:  # the daemon rewrites it every 2 s: its main loop is stuck or it is still starting
            why = "its state folder's disk is full" if _disk_full(report.state_dir) else "still starting, or hung"
            lines.append(f"warning: the daemon has not updated its status for {age:.0f} s ({why})")
    elif snap is not None:
        lines.append(f"gpen-watch: not running ({which}last seen {_when(snap.updated_at)}, pid {snap.pid})")
    else:
        lines.append("gpen-watch: not running (no status.json from a daemon in this state directory)")
    if len(report.instances) > 1 or (report.instances and "" not in report.instances):
        lines.append("instances: " + ", ".join(
            f"{name or 'default'} {'running' if up else 'not running'}" for name, up in report.instances.items()))
    lines.append(f"state: {report.state_dir}")
    if report.snapshot_problem:
        lines.append(f"warning: {report.snapshot_problem}")
    if snap is not None:
        lines.append(f"device: {snap.device}")
        if snap.batch_caps:
            caps = ", ".join(f"{name} {cap}" for name, cap in sorted(snap.batch_caps.items()))
            lines.append(f"batch caps (faces): {caps}")
        for folder, reason in sorted(snap.paused.items()):
            lines.append(f"PAUSED {folder}: {reason}")
        lines += [_shown(w) for w in snap.warnings]  # each says what it is about ("config: ...")
        lines += _refused_lines(snap)
    for owner, n in sorted(report.stranded.items()):
        name = f"instance {owner}" if owner else "the default instance"
        unit = f"gpen-watch@{owner}" if owner else "gpen-watch"
        if report.running:  # a running instance takes them over (Service._take_over_stopped_instances)
            lines.append(f"note: {n} file(s) were in flight when {name} stopped; a running instance redoes them "
                         "within a minute")
        else:
            lines.append(f"warning: {n} file(s) were in flight when {name} stopped; they are redone when an "
                         f"instance starts (systemctl start {unit})")

    lines.append("")
    states = [s for s in STATES if any(s in c for c in report.counts.values())]
    if report.counts:
        width = max(len("folder"), *(len(f) for f in report.counts))
        lines.append("folder".ljust(width) + "".join(f" {s:>10}" for s in states))
        for folder, by_state in sorted(report.counts.items()):
            lines.append(folder.ljust(width) + "".join(f" {by_state.get(s, 0):>10}" for s in states))
    else:
        lines.append("no files seen yet")

    queued = ", ".join(f"{p} {n}" for p, n in sorted(report.queue_depths.items())) or "empty"
    lines.append(f"queues (ready to process): {queued}")
    rates = " · ".join(f"{name} {rate:.1f}" for name, rate in report.throughput.items())
    lines.append(f"throughput (files/min): {rates}")

    # Passing trouble (an output share away, a full disk) shows under retries: nothing has failed, files wait.
    lines += _file_lines("waiting to retry (latest):", report.retrying, lambda f: "",
                         lambda f: f"{_shown(_one_line(f.error))}{_tries(f.attempts)}")
    # Finished, but a hot folder the service cannot write keeps the original: it is not processed again.
    lines += _file_lines("originals left in the hot folder (latest; processed, but they could not be removed):",
                         report.kept, lambda f: f" ({f.stage})", lambda f: _shown(_one_line(f.error)))
    lines += _file_lines("last failures:", report.failures, lambda f: "",
                         lambda f: f"{f'[{f.stage}] ' if f.stage else ''}{_shown(_one_line(f.error))}"
                                   f"{_tries(f.attempts)}")
    return "\n".join(lines) + "\n"


def _tries(attempts: int) -> str:
    """How often the file was taken up for restoring; nothing for one refused before it ever was (at the gate)."""
    return f" (tried {attempts} time{'s' * (attempts != 1)})" if attempts else ""


def _file_lines(title: str, files: list[Failure], after_name: Callable[[Failure], str],
                why: Callable[[Failure], str]) -> list[str]:
    """A section of files, each on two lines: when, folder and name; then why."""
    lines = ["", title] if files else []
    for f in files:
        lines.append(f"  {_when(f.at)}  {_shown(f.folder)}  {_shown(f.relpath)}{after_name(f)}")
        lines.append(f"      {why(f)}")
    return lines


def _refused_lines(snap: Snapshot) -> list[str]:
    """Entries the daemon will never process, so that an operator learns of them without reading the log."""
    total = sum(snap.refused_counts.values())
    if not total:
        return []
    lines = [f"left in hot folders, never processed ({total}; remove or replace them):"]
    shown = [(folder, rel, why) for folder, entries in sorted(snap.refused.items()) for rel, why in entries.items()]
    for folder, rel, why in shown[:REFUSED_SHOWN]:
        lines.append(f"  {_shown(folder)}  {_shown(rel)}: {_shown(why)}")
    if total > REFUSED_SHOWN:
        lines.append(f"  … and {total - REFUSED_SHOWN} more (gpen-watch status --json lists up to {REFUSED_LISTED} "
                     "per folder)")
    return lines


# ------------------------------------------------------------------------------------------------ command
def _state_dir_for(args: argparse.Namespace) -> Path:
    settings = settings_from_args(args)
    state = state_dir(settings)
    explicit = settings.state_dir is not None or "STATE_DIRECTORY" in os.environ
    # The service found its state through $STATE_DIRECTORY, which an operator's shell does not have: when the
    # config does not name state_dir, fall back to the shipped unit's state directory.
    if not explicit and not (state / JOBS_FILE).exists() and (SYSTEM_STATE_DIR / JOBS_FILE).exists():
        return SYSTEM_STATE_DIR
    return state


_TOP_LEVEL_PATH = re.compile(r"""^[ \t]*(state_dir|root)\s*=\s*["']([^"'\n]+)["']\s*(?:#.*)?$""", re.MULTILINE)


def _state_dir_despite(args: argparse.Namespace) -> Path | None:
    """Where the daemon keeps its state, when the configuration does not load as it is now.

    A daemon keeps running on the configuration it started (or last reloaded) with, so an edit in progress,
    or one a reload refused, must not hide its status. Read from what can be read: the variables, the
    file's ``state_dir`` and ``root`` as TOML (if it still parses), ``--root``, the shipped unit's folder."""
    raw: dict[str, Any] = {}
    if (path := config_path(getattr(args, "config", None))) is not None:
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text(encoding="utf-8")
            try:
                raw = tomllib.loads(text)
            except ValueError:  # a syntax error further down: the top-level lines before the first table
                raw = {m[1]: m[2] for m in _TOP_LEVEL_PATH.finditer(text.split("\n[", 1)[0])}
    roots = [getattr(args, "root", None), os.environ.get("GPEN_WATCH_ROOT"), raw.get("root")]
    candidates = [os.environ.get("GPEN_WATCH_STATE_DIR"), raw.get("state_dir"), *possible_state_dirs(roots)]
    for candidate in candidates:
        if isinstance(candidate, str | Path) and (Path(candidate).expanduser() / JOBS_FILE).exists():
            return Path(candidate).expanduser()
    return None


def command(args: argparse.Namespace) -> int:
    """`gpen-watch status [--config FILE] [--root DIR] [--json]`."""
    as_json = bool(getattr(args, "json", False))

    def fail(message: str, code: int, state: Path | None = None) -> int:
        print(f"gpen-watch status: {message}", file=sys.stderr)
        if as_json:  # a script reading stdout gets an answer too
            json.dump({"error": message, "exit_status": code, "running": False,
                       "state_dir": None if state is None else str(state)}, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
        return code

    try:
        state = _state_dir_for(args)
    except ConfigError as exc:
        found = _state_dir_despite(args)
        if found is None:
            return fail(str(exc), 2)
        print(f"gpen-watch status: warning: {exc}\n(a running daemon keeps the configuration it started or last "
              f"reloaded with; showing the state in {found})", file=sys.stderr)
        state = found
    if not (state / JOBS_FILE).exists():
        return fail(f"no state in {state} yet: the daemon has not started with this configuration (pass the same "
                    "--config/--root as `gpen-watch run`, or set state_dir)", EXIT_NO_STATE, state)
    try:
        report = gather(state)
    except (StatusError, JobTableError, sqlite3.Error, PermissionError) as exc:
        hint = (
            " (run it as the service user, e.g. sudo -u gpen-watch gpen-watch status)"
            if isinstance(exc, PermissionError) or "unable to open" in str(exc)
            else ""
        )
        return fail(f"{exc}{hint}", 1, state)
    if as_json:
        json.dump(report.to_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(report))
    return EXIT_RUNNING if report.running else EXIT_STOPPED
