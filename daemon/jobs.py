"""The durable job table: one SQLite row per candidate file, and every state change one transaction.

States::

    pending ──> ready ──> processing ──> done
       │          │          │  └──> retry ──> processing (when due)
       │          │          └──> failed / gone / ready (requeued after a crash)
       └──────────┴──> failed / gone / skipped

``pending``: seen, readiness gate not passed. ``ready``: gate passed, queued. ``retry``: a transient error,
waits until ``next_attempt_at``. ``done``, ``failed``, ``skipped``, ``gone`` are terminal. At most one
non-terminal row exists per (folder, relpath); a partial unique index enforces it, so neither a second daemon
nor a bug can duplicate work.

Crash safety comes from SQLite (WAL, ``synchronous=FULL``): after ``kill -9`` the table holds exactly the
committed transactions. Output and backup names are recorded with ``set_targets`` before publishing, and
``requeue_in_flight`` keeps them, so a redo after a crash writes under the same names.

Thread safety: one ``JobTable`` may be shared by every thread of the daemon; a lock serialises its single
connection. Several processes may open the same file (``gpen-watch status``, one instance per GPU): writes
take the database lock up front (``BEGIN IMMEDIATE``) and wait up to ``busy_timeout`` for it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ACTIVE_STATES", "STATES", "TERMINAL_STATES", "Job", "JobStateError", "JobTable", "JobTableError"]

ACTIVE_STATES = ("pending", "ready", "processing", "retry")
TERMINAL_STATES = ("done", "failed", "skipped", "gone")
STATES = ACTIVE_STATES + TERMINAL_STATES

SCHEMA_VERSION = 4
STUCK_AFTER = 3600.0  # seconds in "processing" after which a row no longer counts as in flight (see claim)


class JobTableError(Exception):
    """The job table cannot be used (locked, corrupted, disk full); the message says what to do."""


class JobStateError(JobTableError):
    """A state change the job's current state does not allow (a bug, or another process got there first)."""


@dataclass(frozen=True)
class Job:
    id: int
    folder: str
    relpath: str
    preset: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    state: str
    attempts: int
    last_error: str | None
    error_stage: str | None
    output_path: str | None
    backup_path: str | None
    faces: int | None
    batch_id: str | None
    owner: str
    created_at: float
    updated_at: float
    next_attempt_at: float | None
    crashes: int = 0  # starts at which this job was found in flight (the process died holding it)
    kept: str | None = None  # finished, but the original stays in the hot folder: why (it could not be removed)


_COLUMNS = ", ".join(Job.__dataclass_fields__)
_ACTIVE_SQL = "('pending', 'ready', 'processing', 'retry')"

_SCHEMA_V1 = f"""
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    folder TEXT NOT NULL,
    relpath TEXT NOT NULL,
    preset TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    sha256 TEXT,
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    error_stage TEXT,
    output_path TEXT,
    backup_path TEXT,
    faces INTEGER,
    batch_id TEXT,
    owner TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    next_attempt_at REAL
);
CREATE UNIQUE INDEX jobs_one_active ON jobs (folder, relpath) WHERE state IN {_ACTIVE_SQL};
CREATE INDEX jobs_queue ON jobs (preset, state, id);
CREATE INDEX jobs_by_path ON jobs (folder, relpath, id);
CREATE INDEX jobs_by_hash ON jobs (folder, sha256) WHERE state = 'done';
CREATE INDEX jobs_by_update ON jobs (state, updated_at);
"""

# Migrations from version N to N+1, run in one transaction each at open. Add entries; never edit old ones.
def _run_script(con: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits first, and a migration must be one transaction with its version bump.
    for statement in filter(str.strip, script.split(";")):
        con.execute(statement)


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: lambda con: _run_script(con, _SCHEMA_V1),
    # Crashes are counted apart from attempts: transient retries (disk full, share gone, OOM) must not make a
    # single crash look like a file that keeps killing the daemon.
    1: lambda con: _run_script(con, "ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0"),
    # collisions = "overwrite" asks, per candidate name, which source a result file belongs to.
    2: lambda con: _run_script(con, "CREATE INDEX jobs_by_output ON jobs (output_path, id)"),
    # A finished job whose original stays in the hot folder (done, failed or skipped): seen again unchanged, it
    # is that job, not new work. Done rows recorded it in their error before.
    3: lambda con: _run_script(con, (
        "ALTER TABLE jobs ADD COLUMN kept TEXT; "
        "UPDATE jobs SET kept = last_error WHERE state = 'done' AND error_stage = 'dispose'"
    )),
}


def claim_instance(state_dir: Path, instance: str) -> int:
    """Hold this instance's lock file in ``state_dir`` for the life of the process; returns its descriptor.

    Instances sharing a job table tell their rows apart by name, and at start each takes back its own
    unfinished rows as crash leftovers: a second daemon under the same name would take the first one's
    work in flight. Raises JobTableError naming the holder. The lock ends with the descriptor (or process).
    """
    path = _lock_path(state_dir, instance)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        for wait in (0.05, 0.2, 0.5, 1.0, 0.0):  # a running peer may hold it for a moment (instance_stopped)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise
                time.sleep(wait)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        name = f"instance {instance!r}" if instance else "the default instance"
        raise JobTableError(
            f"another gpen-watch (pid {holder}) already runs as {name} on {state_dir}: stop it, or give "
            "each daemon its own GPEN_WATCH_INSTANCE (one per GPU) or its own state_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lock_path(state_dir: Path, instance: str) -> Path:
    return state_dir / f"instance-{instance or 'default'}.lock"


@contextmanager
def instance_stopped(state_dir: Path, instance: str) -> Iterator[bool]:
    """Whether ``instance`` is known to be stopped: its lock file exists and nobody holds it. While the block
    runs it cannot start (its ``claim_instance`` waits a moment), so its rows in flight can be taken over.

    A missing lock file says nothing (an instance that runs may have had it deleted): not stopped.
    """
    try:
        fd = os.open(_lock_path(state_dir, instance), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def running_instances(state_dir: Path) -> list[str]:
    """The instances whose lock in ``state_dir`` a live process holds (read-only: nothing is created)."""
    running = []
    for lock in sorted(state_dir.glob("instance-*.lock")):
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held exclusively: that instance runs
            name = lock.name.removeprefix("instance-").removesuffix(".lock")
            running.append("" if name == "default" else name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return running


_LOCKED_HINT = (
    "another process holds the lock (a second gpen-watch with the same state directory, or a tool that has "
    "it open); stop it or give this instance its own state_dir"
)
_CORRUPT_HINT = (
    "stop gpen-watch, move the file (and its -wal and -shm files) aside and start again: the hot folders are "
    "rescanned and no source file has been touched (originals kept in place, after = \"keep\", whose backup and "
    "result are on the outputs share are known as done, not published again); keep the old file for diagnosis"
)


def _explain(path: Path, exc: sqlite3.Error) -> JobTableError:
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return JobTableError(f"job table {path} is locked: {text}; {_LOCKED_HINT}")
    if "malformed" in lowered or "not a database" in lowered or "corrupt" in lowered:
        return JobTableError(f"job table {path} is corrupted: {text}; {_CORRUPT_HINT}")
    if "full" in lowered:
        return JobTableError(f"job table {path}: disk full ({text}); free space in the state directory")
    if "readonly" in lowered or "unable to open" in lowered:
        return JobTableError(
            f"job table {path} cannot be written ({text}); check that the state directory exists and belongs "
            "to the service user"
        )
    return JobTableError(f"job table {path}: {text}")


class JobTable:
    """The job table in one SQLite file. Open with ``JobTable.open(path)``."""

    def __init__(self, con: sqlite3.Connection, path: Path, owner: str) -> None:
        self._con = con
        self._path = path
        self._owner = owner
        self._lock = threading.RLock()

    # -- lifecycle -------------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: Path | str, *, owner: str = "", busy_timeout: float = 10.0, check: bool = True
    ) -> JobTable:
        """Open (or create) the table at ``path``, migrate it to the current schema and check it.

        ``owner`` names this daemon instance when several share one table (e.g. the GPU index); rows it claims
        carry it, and ``requeue_in_flight`` only hands back its own. ``check`` runs SQLite's quick check, so a
        damaged file is reported at start rather than in the middle of a batch.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise JobTableError(f"cannot open job table {path}: {exc}") from None
        table = cls(con, path, owner)
        try:
            con.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JobTableError(f"job table {path}: SQLite refused WAL mode (got {mode!r})")
            con.execute("PRAGMA synchronous = FULL")
            con.execute("PRAGMA foreign_keys = ON")
            if check:
                result = con.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise JobTableError(f"job table {path} is corrupted: {result}; {_CORRUPT_HINT}")
            table._migrate()
        except sqlite3.Error as exc:
            con.close()
            raise _explain(path, exc) from None
        except BaseException:
            con.close()
            raise
        return table

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> JobTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    def _migrate(self) -> None:
        # An up-to-date table opens without the write lock (``gpen-watch status`` beside the daemon).
        if self._read("PRAGMA user_version")[0][0] == SCHEMA_VERSION:
            return
        with self._tx() as con:

            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JobTableError(
                    f"job table {self._path} has schema version {version}, newer than this gpen-watch "
                    f"({SCHEMA_VERSION}); upgrade gpen-watch or use another state_dir"
                )
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](con)
                version += 1
                con.execute(f"PRAGMA user_version = {version}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the database lock is taken at BEGIN, so it cannot fail half-way on BUSY."""
        with self._lock:
            try:
                self._con.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _explain(self._path, exc) from None
            try:
                yield self._con
                self._con.execute("COMMIT")
            except BaseException as exc:
                # After some errors (disk full) SQLite has already rolled back; a second rollback must not
                # hide the first error.
                if self._con.in_transaction:
                    self._con.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise _explain(self._path, exc) from None
                raise

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._con.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _explain(self._path, exc) from None

    @staticmethod
    def _job(row: tuple[object, ...] | None) -> Job | None:
        return None if row is None else Job(*row)  # type: ignore[arg-type]

    def _change(
        self,
        con: sqlite3.Connection,
        job_id: int,
        allowed: tuple[str, ...],
        sets: str,
        params: tuple[object, ...],
    ) -> None:
        marks = ", ".join("?" * len(allowed))
        cur = con.execute(
            f"UPDATE jobs SET {sets}, updated_at = ? WHERE id = ? AND state IN ({marks})",
            (*params, time.time(), job_id, *allowed),
        )
        if cur.rowcount != 1:
            row = con.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            now = "does not exist" if row is None else f"is {row[0]}"
            raise JobStateError(f"job {job_id} {now}; expected one of {', '.join(allowed)}")

    # -- reading ---------------------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        rows = self._read(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobStateError(f"job {job_id} does not exist")
        return Job(*rows[0])  # type: ignore[arg-type]

    def active(self, folder: str, relpath: str) -> Job | None:
        """The non-terminal row for this file, if any."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs WHERE folder = ? AND relpath = ? AND state IN {_ACTIVE_SQL}",
            (folder, relpath),
        )
        return self._job(rows[0] if rows else None)

    def latest(self, folder: str, relpath: str) -> Job | None:
        """The newest row for this file, in any state."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs WHERE folder = ? AND relpath = ? ORDER BY id DESC LIMIT 1",
            (folder, relpath),
        )
        return self._job(rows[0] if rows else None)

    def in_state(self, state: str, folder: str | None = None) -> list[Job]:
        """Every row in ``state`` (optionally of one folder), oldest first: e.g. pending rows to look at."""
        if folder is None:
            rows = self._read(f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY id", (state,))
        else:
            rows = self._read(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = ? AND folder = ? ORDER BY id", (state, folder)
            )
        return [Job(*row) for row in rows]  # type: ignore[arg-type]

    def pending(self, folder: str | None = None) -> list[Job]:
        """Rows waiting for the readiness gate, oldest first."""
        return self.in_state("pending", folder)

    def is_unchanged_done(
        self, folder: str, relpath: str, size: int | None, mtime_ns: int | None, *, sha256: str | None = None
    ) -> bool:
        """True if this file was already processed (done or skipped) as it is now.

        ``after = "keep"`` leaves processed originals in place: rescans find them again, not as new work. The
        same size and mtime say so; with ``sha256``, so does content equal to the newest processed version
        (an original that was only touched, or copied over with itself).
        """
        if size is not None and mtime_ns is not None and self._read(
            "SELECT 1 FROM jobs WHERE folder = ? AND relpath = ? AND state IN ('done', 'skipped') "
            "AND size = ? AND mtime_ns = ? LIMIT 1",
            (folder, relpath, size, mtime_ns),
        ):
            return True
        if sha256 is None:
            return False
        rows = self._read(
            "SELECT sha256 FROM jobs WHERE folder = ? AND relpath = ? AND state IN ('done', 'skipped') "
            "AND sha256 IS NOT NULL ORDER BY id DESC LIMIT 1",
            (folder, relpath),
        )
        return bool(rows) and rows[0][0] == sha256

    def reserved_targets(self) -> set[str]:
        """Output and backup names recorded by unfinished jobs: not free for another job's results."""
        rows = self._read(
            f"SELECT output_path, backup_path FROM jobs WHERE state IN {_ACTIVE_SQL} "
            "AND (output_path IS NOT NULL OR backup_path IS NOT NULL)"
        )
        return {str(p) for row in rows for p in row if p is not None}

    def remembers(self, folder: str, relpath: str, paths: Collection[str], *, besides: int) -> bool:
        """Whether a row other than ``besides`` is of this file, or planned one of ``paths`` as a result or backup."""
        marks = ", ".join("?" * len(paths)) or "NULL"
        return bool(self._read(
            f"SELECT 1 FROM jobs WHERE id != ? AND ((folder = ? AND relpath = ?) OR output_path IN ({marks}) "
            f"OR backup_path IN ({marks})) LIMIT 1",
            (besides, folder, relpath, *paths, *paths),
        ))

    def source_of(self, output_path: str) -> tuple[str, str] | None:
        """(folder, relpath) of the newest job whose result was planned at ``output_path``, if any."""
        rows = self._read(
            "SELECT folder, relpath FROM jobs WHERE output_path = ? ORDER BY id DESC LIMIT 1", (output_path,)
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def find_done_by_hash(self, folder: str, sha256: str) -> Job | None:
        """The newest finished job of ``folder`` whose source had this SHA-256 (for the duplicates policy)."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs WHERE folder = ? AND sha256 = ? AND state = 'done' "
            "ORDER BY id DESC LIMIT 1",
            (folder, sha256),
        )
        return self._job(rows[0] if rows else None)

    def queue_depths(self, now: float | None = None) -> dict[str, int]:
        """Per preset, the jobs a worker could claim now (ready, plus retries that are due)."""
        now = time.time() if now is None else now
        rows = self._read(
            "SELECT preset, COUNT(*) FROM jobs WHERE state = 'ready' "
            "OR (state = 'retry' AND next_attempt_at <= ?) GROUP BY preset",
            (now,),
        )
        return {str(preset): int(n) for preset, n in rows}  # type: ignore[call-overload]

    def in_flight_by_owner(self) -> dict[str, int]:
        """Per instance name, the rows it holds in ``processing``."""
        rows = self._read("SELECT owner, COUNT(*) FROM jobs WHERE state = 'processing' GROUP BY owner")
        return {str(owner): int(n) for owner, n in rows}  # type: ignore[call-overload]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per folder, the number of rows in each state."""
        result: dict[str, dict[str, int]] = {}
        for folder, state, n in self._read("SELECT folder, state, COUNT(*) FROM jobs GROUP BY folder, state"):
            result.setdefault(str(folder), {})[str(state)] = int(n)  # type: ignore[call-overload]
        return result

    def recent_failures(self, limit: int = 10, state: str = "failed") -> list[Job]:
        """The latest rows in ``state`` (failed, or waiting to ``retry``), newest first."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY updated_at DESC, id DESC LIMIT ?",
            (state, limit),
        )
        return [Job(*row) for row in rows]  # type: ignore[arg-type]

    def recent_kept(self, limit: int = 10) -> list[Job]:
        """The latest finished rows whose original stays in the hot folder (it could not be removed), newest
        first."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs WHERE kept IS NOT NULL AND state IN ('done', 'failed', 'skipped') "
            "ORDER BY updated_at DESC, id DESC LIMIT ?",
            (limit,),
        )
        return [Job(*row) for row in rows]  # type: ignore[arg-type]

    def throughput(self, window_s: float, now: float | None = None) -> float:
        """Files finished per minute over the last ``window_s`` seconds."""
        now = time.time() if now is None else now
        rows = self._read(
            "SELECT COUNT(*) FROM jobs WHERE state = 'done' AND updated_at > ?", (now - window_s,)
        )
        return int(rows[0][0]) * 60.0 / window_s  # type: ignore[call-overload]

    # -- state changes: each one transaction -----------------------------------------------------------------

    def note_candidate(
        self, folder: str, relpath: str, preset: str, *, size: int | None = None, mtime_ns: int | None = None,
        only_kept: bool = False,
    ) -> Job:
        """The row for a file the watcher reported: the active one if any, else a new ``pending`` row.

        With ``size`` and ``mtime_ns``, a file whose newest row is finished with the same size and mtime is the
        same file seen again: that row is returned and no new work is created. That holds for a row whose original
        stayed in the hot folder (``kept``: it could not be removed) and for a file that crashed the daemon; with
        ``after = keep`` (not ``only_kept``) also for every done or skipped row. A failed original that went to
        failed/ and is moved back, or one dropped again after ``delete``/``move``, is new work. Callers check
        ``job.state``.
        """
        with self._tx() as con:
            row = con.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE folder = ? AND relpath = ? ORDER BY id DESC LIMIT 1",
                (folder, relpath),
            ).fetchone()
            if row is not None:
                job = Job(*row)
                if job.state in ACTIVE_STATES:
                    return job
                # A file that crashed the daemon max_attempts times is taken up again only once it changes.
                stayed = job.kept is not None or (job.state == "failed" and job.error_stage == "crash")
                seen_again = (
                    size is not None
                    and (job.size, job.mtime_ns) == (size, mtime_ns)
                    and (stayed or (not only_kept and job.state in ("done", "skipped")))
                )
                if seen_again:
                    return job
            now = time.time()
            cur = con.execute(
                "INSERT INTO jobs (folder, relpath, preset, size, mtime_ns, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                (folder, relpath, preset, size, mtime_ns, now, now),
            )
            new = con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone()
            return Job(*new)

    def mark_ready(self, job_id: int, size: int, mtime_ns: int, sha256: str) -> None:
        """The readiness gate passed: queue the job with the identity of the bytes that were checked."""
        with self._tx() as con:
            self._change(
                con, job_id, ("pending",), "state = 'ready', size = ?, mtime_ns = ?, sha256 = ?",
                (size, mtime_ns, sha256),
            )  # fmt: skip

    def requeue_pending(self, job_id: int, reason: str) -> None:
        """The source changed after it was found ready (new bytes): run it through the gate again."""
        with self._tx() as con:
            self._change(
                con, job_id, ("ready", "processing", "retry"),
                "state = 'pending', sha256 = NULL, last_error = ?, next_attempt_at = NULL, "
                # New bytes are a new file: names chosen for the old ones may hold its published backup.
                "output_path = NULL, backup_path = NULL", (reason,),
            )  # fmt: skip

    def reassign_preset(self, folder: str, preset: str) -> int:
        """After a reload changed a folder's preset: its queued jobs (not those in flight) use the new one."""
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET preset = ?, updated_at = ? WHERE folder = ? AND preset != ? "
                "AND state IN ('pending', 'ready', 'retry')",
                (preset, time.time(), folder, preset),
            )
            return cur.rowcount

    def mark_gone(self, job_id: int) -> None:

        """The source vanished before it was processed (deleted or moved away by a user)."""
        with self._tx() as con:
            self._change(con, job_id, ACTIVE_STATES, "state = 'gone', next_attempt_at = NULL", ())

    def forget_unfinished(self, folder: str, job_id: int | None = None) -> int:
        """Drop the unfinished rows of a folder that left the configuration (only ``job_id``'s, if given, in
        flight or not); returns how many. Their files are left as they are; a folder configured again is
        rescanned and its files found anew."""
        with self._tx() as con:
            if job_id is not None:
                cur = con.execute(f"DELETE FROM jobs WHERE id = ? AND folder = ? AND state IN {_ACTIVE_SQL}",
                                  (job_id, folder))
            else:
                cur = con.execute("DELETE FROM jobs WHERE folder = ? AND state IN ('pending', 'ready', 'retry')",
                                  (folder,))
            return cur.rowcount

    def folders_with_unfinished(self) -> set[str]:
        """Folders that have rows not finished yet."""
        return {str(row[0]) for row in self._read(f"SELECT DISTINCT folder FROM jobs WHERE state IN {_ACTIVE_SQL}")}

    def mark_skipped(self, job_id: int, reason: str, *, kept: str | None = None,
                     identity: tuple[int, int, str] | None = None) -> None:
        """Not processed on purpose (the duplicates policy). ``kept``: as for ``finish``. ``identity``: the
        (size, mtime_ns, sha256) the gate found, for a row skipped straight from ``pending``."""
        with self._tx() as con:
            if identity is not None:
                self._change(con, job_id, ("pending", "ready"), "size = ?, mtime_ns = ?, sha256 = ?", identity)
            self._change(con, job_id, ("pending", "ready"), "state = 'skipped', last_error = ?, kept = ?",
                         (reason, kept))

    def set_kept(self, job_id: int, why: str) -> None:
        """A failed row's original stayed in the hot folder (its copy is in failed/): see ``note_candidate``."""
        with self._tx() as con:
            self._change(con, job_id, ("failed",), "kept = ?", (why,))

    def claim(self, preset: str, limit: int, now: float | None = None) -> list[Job]:
        """Take up to ``limit`` claimable jobs of ``preset``, oldest first, into ``processing`` as one batch.

        Claimable: ``ready``, or ``retry`` whose time has come. Each claim counts one attempt.

        Suspects (jobs that were in flight when the process died, ``crashes > 0``) run alone: one per batch, and
        only while nothing else of this instance is in flight. So when the process dies again, the file it was
        working on is the only one charged with the crash, and the good photos that shared the first fatal batch
        are not failed with the one that killed it (``requeue_in_flight``). Suspects of ``preset`` come before its
        other jobs; ``suspect_preset`` tells the caller which queue has one.
        """
        now = time.time() if now is None else now
        batch_id = uuid.uuid4().hex[:12]
        claimable = "(state = 'ready' OR (state = 'retry' AND next_attempt_at <= ?))"
        with self._tx() as con:
            # A row untouched in "processing" for an hour is stuck (a bug), not in flight: it must not hold every
            # suspect back until the next restart.
            busy = con.execute(
                "SELECT MAX(crashes > 0), COUNT(*) FROM jobs WHERE state = 'processing' AND owner = ? "
                "AND updated_at > ?",
                (self._owner, time.time() - STUCK_AFTER),
            ).fetchone()
            if busy[0]:  # a suspect is running: nothing may share its fate
                return []
            suspect = con.execute(
                f"SELECT id FROM jobs WHERE preset = ? AND crashes > 0 AND {claimable} ORDER BY id LIMIT 1",
                (preset, now),
            ).fetchone()
            if suspect is not None:
                ids = [suspect[0]] if busy[1] == 0 else []
            else:
                ids = [
                    row[0]
                    for row in con.execute(
                        f"SELECT id FROM jobs WHERE preset = ? AND {claimable} ORDER BY id LIMIT ?",
                        (preset, now, limit),
                    )
                ]
            if not ids:
                return []
            marks = ", ".join("?" * len(ids))
            con.execute(
                f"UPDATE jobs SET state = 'processing', attempts = attempts + 1, batch_id = ?, owner = ?, "
                f"next_attempt_at = NULL, updated_at = ? WHERE id IN ({marks})",
                (batch_id, self._owner, time.time(), *ids),
            )
            rows = con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({marks}) ORDER BY id", ids)
            return [Job(*row) for row in rows.fetchall()]

    def suspect_preset(self, presets: Collection[str], now: float | None = None) -> str | None:
        """The preset of the oldest claimable suspect (see ``claim``) among ``presets``, or None."""
        if not presets:
            return None
        now = time.time() if now is None else now
        marks = ", ".join("?" * len(presets))
        rows = self._read(
            f"SELECT preset FROM jobs WHERE crashes > 0 AND preset IN ({marks}) AND (state = 'ready' OR "
            "(state = 'retry' AND next_attempt_at <= ?)) ORDER BY id LIMIT 1",
            (*presets, now),
        )
        return str(rows[0][0]) if rows else None

    def set_targets(self, job_id: int, output_path: str | None, backup_path: str | None) -> bool:
        """Record where the result and the backup will be published, before publishing.

        A redo after a crash reads them back and reuses them, so a file is never published under two names.
        Returns False, recording nothing, if another unfinished job took one of the names first: instances
        sharing the table (one per GPU) plan names apart, and two backups under one name would leave one
        original without its copy. The caller plans again.
        """
        names = [n for n in (output_path, backup_path) if n is not None]
        with self._tx() as con:
            marks = ", ".join("?" * len(names))
            if names and con.execute(
                f"SELECT 1 FROM jobs WHERE id != ? AND state IN {_ACTIVE_SQL} "
                f"AND (output_path IN ({marks}) OR backup_path IN ({marks})) LIMIT 1",
                (job_id, *names, *names),
            ).fetchone():
                return False
            self._change(
                con, job_id, ("processing",), "output_path = ?, backup_path = ?", (output_path, backup_path)
            )
            return True

    def finish(self, job_id: int, faces: int | None, *, kept: str | None = None) -> None:
        """Result and backup are durable: the job is done. ``kept``: why the original is still in the hot folder
        (it could not be deleted or moved); ``note_candidate`` then knows it when it is seen again."""
        with self._tx() as con:
            self._change(
                con, job_id, ("processing",),
                "state = 'done', faces = ?, last_error = ?, error_stage = ?, kept = ?",
                (faces, kept, "dispose" if kept else None, kept),
            )  # fmt: skip

    def fail(self, job_id: int, stage: str, error: str, *, kept: str | None = None) -> None:
        """A permanent failure: the file goes to the failed folder (the caller moves it). ``kept``: why the original
        is still in the hot folder (a copy went to failed/, but the original could not be removed)."""
        with self._tx() as con:
            self._change(
                con, job_id, ACTIVE_STATES,
                "state = 'failed', error_stage = ?, last_error = ?, next_attempt_at = NULL, kept = ?",
                (stage, error, kept),
            )  # fmt: skip

    def retry_later(self, job_id: int, error: str, delay_s: float, stage: str | None = None) -> None:
        """A transient failure: try again after ``delay_s`` seconds; targets are kept for the redo."""
        with self._tx() as con:
            self._change(
                con, job_id, ("processing",),
                "state = 'retry', last_error = ?, error_stage = ?, next_attempt_at = ?",
                (error, stage, time.time() + delay_s),
            )  # fmt: skip

    def prune_finished(self, older_than_s: float, now: float | None = None) -> int:
        """Delete history: finished rows unchanged for ``older_than_s`` seconds. Returns how many went.

        The newest row of each file is kept whatever its age, so an original left in place (``after = keep``)
        is still recognised as done. Months of unattended running must not grow the table without bound.
        """
        now = time.time() if now is None else now
        with self._tx() as con:
            cur = con.execute(
                "DELETE FROM jobs WHERE state IN ('done', 'failed', 'skipped', 'gone') AND updated_at < ? "
                "AND id NOT IN (SELECT MAX(id) FROM jobs GROUP BY folder, relpath)",
                (now - older_than_s,),
            )
            return cur.rowcount

    def requeue_crashed(self, job_ids: Collection[int], reason: str, max_attempts: int) -> int:
        """Rows of a batch the device lost (it fails even a blank test image) go back to ``ready`` as if the
        process had died on them: each counts one crash, so it runs alone next time and a file that breaks the
        device every time fails at ``max_attempts`` crashes (stage ``crash``) like one that kills the process.
        Returns how many failed so."""
        if not job_ids:
            return 0
        marks = ", ".join("?" * len(job_ids))
        mine = f"id IN ({marks}) AND state = 'processing' AND owner = ?"
        params = (*job_ids, self._owner)
        now = time.time()
        with self._tx() as con:
            con.execute(f"UPDATE jobs SET crashes = crashes + 1, last_error = ?, error_stage = 'crash', "
                        f"updated_at = ? WHERE {mine}", (reason, now, *params))
            cur = con.execute(
                f"UPDATE jobs SET state = 'failed', last_error = ?, next_attempt_at = NULL WHERE {mine} "
                f"AND crashes >= ?",
                (f"the device failed while processing this file {max_attempts} times; giving up: {reason}",
                 *params, max_attempts),
            )
            con.execute(f"UPDATE jobs SET state = 'ready' WHERE {mine}", params)
            return cur.rowcount

    def requeue_in_flight(self, max_attempts: int | None = None, owner: str | None = None) -> int:
        """At start-up: this instance's ``processing`` rows (a crash left them) go back to ``ready``.

        ``owner``: another instance's rows instead, one known to be stopped (``instance_stopped``), so that its
        work in flight does not wait for it to come back.

        Output and backup targets stay, so the redo publishes under the same names. With ``max_attempts``
        (start-up after a crash), each such row counts one crash, and a job found in flight at that many crashes
        fails instead (stage ``crash``): a file that kills the process (a decompression bomb, a driver crash)
        must not crash the daemon forever. Only crashes count, not attempts: a file retried for transient errors
        is not given up on at its first crash. After its first crash a job runs alone (``claim``), so later
        crashes are charged to it only. Returns how many were requeued.

        """
        owner = self._owner if owner is None else owner
        with self._tx() as con:
            if max_attempts is not None:
                con.execute(
                    "UPDATE jobs SET crashes = crashes + 1 WHERE state = 'processing' AND owner = ?", (owner,)
                )
                con.execute(
                    "UPDATE jobs SET state = 'failed', error_stage = 'crash', last_error = ?, updated_at = ? "
                    "WHERE state = 'processing' AND owner = ? AND crashes >= ?",
                    (
                        f"the daemon stopped while processing this file {max_attempts} times; giving up",
                        time.time(),
                        owner,
                        max_attempts,
                    ),
                )
            cur = con.execute(
                "UPDATE jobs SET state = 'ready', updated_at = ? WHERE state = 'processing' AND owner = ?",
                (time.time(), owner),
            )
            return cur.rowcount
