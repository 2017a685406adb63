"""The readiness gate: is a file in a hot folder completely written, so that it can be processed?

A file is ready when it has been quiet for the stability delay (its size, mtime and inode unchanged across two
looks at least that far apart, as measured by our own clock, since clocks on a share may differ), it is not
empty, and its bytes decode completely. The same rules apply to files found at start-up. Waiting ends: a file
that stays empty or undecodable for ``max_wait`` seconds after its last change fails with the reason; nothing
is silently dropped. A file that keeps changing keeps waiting (a slow copy is not a failure).

The bytes that passed the check are returned with their SHA-256, so the job table records exactly what was
checked and later stages can verify they publish the same bytes.

Thread safety: ``ReadinessGate`` may be used from several threads (its table of tracked files is locked); one
key should be looked at by one thread at a time.
"""

from __future__ import annotations

import enum
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from daemon.paths import UnsafePath, open_file, read_no_follow
from gpen_engine.jpeg import incomplete_trailer
from gpen_engine.types import ImageTooLarge, InputError, UnsupportedImage

__all__ = ["FAILED", "GONE", "NOT_YET", "READY", "ReadinessGate", "State", "Verdict"]


class State(enum.StrEnum):
    """A string enum: ``verdict.state == "ready"`` works as well as ``verdict.state is READY``."""

    NOT_YET = "not_yet"
    READY = "ready"
    FAILED = "failed"
    GONE = "gone"


NOT_YET, READY, FAILED, GONE = State.NOT_YET, State.READY, State.FAILED, State.GONE


@dataclass(frozen=True)
class Verdict:
    """The outcome of one look. For READY, size/mtime_ns/sha256 describe the bytes in ``data``."""

    state: State
    reason: str = ""
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    data: bytes | None = None


Signature = tuple[int, int, int, int]  # size, mtime_ns, inode, device


def signature(st: os.stat_result) -> Signature:
    """What must stay the same between two looks: a rewrite, append or replacement changes one of these."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def is_quiet(changed_at: float, now: float, stability_delay: float) -> bool:
    return now - changed_at >= stability_delay


TRAILER_WAIT = 30.0  # seconds a JPEG whose first image is whole waits for the rest its index promises


def waited_out(changed_at: float, now: float, max_wait: float) -> bool:
    return now - changed_at >= max_wait


@dataclass
class _Track:
    sig: Signature | None  # None while the file cannot even be stat'ed
    changed_at: float
    decode_error: str | None = None  # why these exact bytes did not decode (not re-read on every look)
    hole: bool = False  # decode_error is only "unwritten ranges": the bytes themselves were not checked
    trailer: bool = False  # decode_error is only "images or video the file promises after the photo are missing"


class ReadinessGate:
    """Decides, look by look, when each file is ready; remembers what it saw per key (e.g. the job id)."""

    def __init__(
        self,
        stability_delay: float,
        max_wait: float,
        check_decodes: Callable[[bytes], object],
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes: int | None = None,
        keep_data: bool = True,
    ) -> None:
        """``check_decodes`` raises ``InputError`` while the bytes are not a complete image and
        ``ImageTooLarge`` for images that will never be accepted. ``max_bytes`` refuses larger files
        outright; with ``keep_data=False`` READY verdicts carry no bytes (the worker reads them again and
        compares hashes).
        """
        self.stability_delay = stability_delay
        self.max_wait = max_wait
        self.check_decodes = check_decodes
        self._clock = clock
        self.max_bytes = max_bytes
        self._keep_data = keep_data
        self._tracks: dict[Hashable, _Track] = {}
        self._lock = threading.Lock()

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._tracks.pop(key, None)

    def tracked(self) -> int:
        with self._lock:
            return len(self._tracks)

    def _track(self, key: Hashable, sig: Signature | None, now: float) -> tuple[_Track, bool]:
        """The track for ``key``, reset if the signature changed; and whether it was (re)started."""
        with self._lock:
            track = self._tracks.get(key)
            if track is None or track.sig != sig:
                track = self._tracks[key] = _Track(sig, now)
                return track, True
            return track, False

    def _end(self, key: Hashable, verdict: Verdict) -> Verdict:
        self.forget(key)
        return verdict

    def _vanished(self, key: Hashable, available: Callable[[], str | None] | None) -> Verdict:
        # A file missing because its share is unmounted is not gone: it will be back with the share.
        reason = available() if available is not None else None
        if reason:
            return Verdict(NOT_YET, f"folder unavailable: {reason}")
        return self._end(key, Verdict(GONE, "the file vanished"))

    def _trouble(self, key: Hashable, now: float, what: str) -> Verdict:
        """An error that may pass (EIO, a lock held by a writer): wait, but not beyond max_wait."""
        with self._lock:
            track = self._tracks.setdefault(key, _Track(None, now))
        if waited_out(track.changed_at, now, self.max_wait):
            return self._end(key, Verdict(FAILED, f"{what} for {self.max_wait:.0f} s"))
        return Verdict(NOT_YET, what)

    def look(
        self, path: Path, key: Hashable, *, available: Callable[[], str | None] | None = None,
        base: Path | None = None,
    ) -> Verdict:
        """Look at ``path`` once. Call again later while the verdict is NOT_YET.

        ``available`` (optional) returns why the file's folder is unavailable, or None; when the file is
        missing and the folder is unavailable, the verdict is NOT_YET instead of GONE. With ``base`` (the
        hot folder ``path`` lies in), the bytes are read through folders opened without following links.
        """
        verdict = self.glance(path, key, available=available, base=base)
        return verdict if verdict is not None else self.inspect(path, key, available=available, base=base)

    def glance(
        self, path: Path, key: Hashable, *, available: Callable[[], str | None] | None = None,
        base: Path | None = None,
    ) -> Verdict | None:
        """The cheap part of ``look`` (a stat and the clocks); None when the file is quiet and its bytes are due to
        be read and checked by ``inspect``, the slow part, which a caller may run on another thread."""
        now = self._clock()
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return self._vanished(key, available)
        except OSError as exc:
            return self._trouble(key, now, f"cannot read file status: {exc.strerror or exc}")
        if stat.S_ISLNK(st.st_mode):
            return self._end(key, Verdict(FAILED, "symbolic link; links are never followed"))
        if not stat.S_ISREG(st.st_mode):
            return self._end(key, Verdict(FAILED, "not a regular file"))
        if self.max_bytes is not None and st.st_size > self.max_bytes:
            return self._end(
                key, Verdict(FAILED, f"file is {st.st_size} bytes, more than the limit of {self.max_bytes}")
            )

        track, fresh = self._track(key, signature(st), now)
        if fresh:
            return Verdict(NOT_YET, f"changed (now {st.st_size} bytes); waiting for it to stay the same")
        if not is_quiet(track.changed_at, now, self.stability_delay):
            return Verdict(NOT_YET, f"waiting for {self.stability_delay:g} s without changes")
        if st.st_size == 0:
            if waited_out(track.changed_at, now, self.max_wait):
                return self._end(key, Verdict(FAILED, f"empty file (0 bytes for {self.max_wait:.0f} s)"))
            return Verdict(NOT_YET, "empty file")
        if track.decode_error is None or self._waited_for_writer(track, now):
            return None
        return self._undecodable(key, track, now)

    def inspect(
        self, path: Path, key: Hashable, *, available: Callable[[], str | None] | None = None,
        base: Path | None = None,
    ) -> Verdict:
        """Read the bytes of a file that ``glance`` found due, check that they decode, and hash them."""
        with self._lock:
            track = self._tracks.get(key)
        if track is None:  # forgotten since the glance
            return Verdict(NOT_YET, "not looked at yet")
        now = self._clock()
        if track.decode_error is None:
            verdict = self._read_and_check(path, key, track, now, available, base)
            if verdict is not None:
                return verdict
        if self._waited_for_writer(track, now):
            # Quiet long enough with its holes or its missing trailer: a sparse file (cp --sparse, rsync -S, ZFS
            # compression store long zero runs as holes), or an index left stale when the extra images were
            # dropped (jpegtran -copy all, editors), not a stalled writer. Judge its bytes like any other file's.
            track.hole = track.trailer = False
            track.decode_error = None
            verdict = self._read_and_check(path, key, track, now, available, base, lenient=True)
            if verdict is not None:
                return verdict
        return self._undecodable(key, track, now)

    def _waited_for_writer(self, track: _Track, now: float) -> bool:
        """Whether the file looked unfinished only for a reason a complete file can have too, for long enough.

        Holes: ``max_wait``, since a copy that set the size first may stall like any other. A missing trailer:
        ``TRAILER_WAIT`` (or 10 stability delays, if longer; never beyond ``max_wait``), since lossless rotation
        and editors keep indexes to images they dropped, and phone uploads pause for seconds, not minutes."""
        if track.hole:
            return waited_out(track.changed_at, now, self.max_wait)
        limit = min(self.max_wait, max(TRAILER_WAIT, 10 * self.stability_delay))
        return track.trailer and waited_out(track.changed_at, now, limit)

    def _undecodable(self, key: Hashable, track: _Track, now: float) -> Verdict:
        if waited_out(track.changed_at, now, self.max_wait):
            return self._end(
                key, Verdict(FAILED, f"still not a complete image after {self.max_wait:.0f} s: {track.decode_error}")
            )
        return Verdict(NOT_YET, f"not a complete image yet: {track.decode_error}")

    def _read_and_check(
        self,
        path: Path,
        key: Hashable,
        track: _Track,
        now: float,
        available: Callable[[], str | None] | None,
        base: Path | None = None,
        lenient: bool = False,
    ) -> Verdict | None:
        """READY, FAILED, GONE or NOT_YET from reading the bytes; None when they do not decode (yet).

        ``lenient``: holes and a missing trailer no longer count, only whether the image decodes."""
        try:
            relative = path if base is None else path.relative_to(base)
            hole = None if lenient else first_hole(relative, base=base)
            if hole is not None:
                track.hole = True
                # Windows and SMB copies, and download managers, set the final size first and fill it in: a
                # stalled one leaves a quiet file whose unwritten tail several formats would decode as black.
                track.decode_error = f"nothing written yet at byte {hole} (the writer set the size first)"
                return None
            data, st = read_no_follow(relative, base=base, max_bytes=self.max_bytes)
        except (FileNotFoundError, NotADirectoryError):
            return self._vanished(key, available)
        except UnsafePath as exc:  # swapped for a link or a FIFO since the lstat above
            return self._end(key, Verdict(FAILED, str(exc)))
        except OSError as exc:
            return self._trouble(key, now, f"cannot read: {exc.strerror or exc}")
        if signature(st) != track.sig or len(data) != st.st_size:
            self._track(key, signature(st), now)
            return Verdict(NOT_YET, "changed while being read")
        if not lenient and (missing := incomplete_trailer(data)) is not None:
            # A phone's MPO, Ultra HDR or motion photo written by a writer that paused after the first image:
            # the photo decodes, but publishing now would back up (and drop) a file without its other half. Asked
            # before the decode, whose verdict on the whole file (a stereo pair is refused) must wait for it too.
            track.trailer, track.decode_error = True, missing
            return None
        try:
            self.check_decodes(data)
        except (ImageTooLarge, UnsupportedImage) as exc:  # the header decides these: waiting will not help
            return self._end(key, Verdict(FAILED, str(exc) or type(exc).__name__))
        except InputError as exc:
            track.decode_error = str(exc) or type(exc).__name__
            return None
        digest = hashlib.sha256(data).hexdigest()
        return self._end(
            key,
            Verdict(
                READY,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                sha256=digest,
                data=data if self._keep_data else None,
            ),
        )


def first_hole(path: Path, *, base: Path | None = None) -> int | None:
    """Where the first unwritten range (hole) before the end of a file starts, or None if there is none.

    None also where the filesystem cannot tell (it then reports the whole file as written).
    """
    with open_file(path, base=base) as f:
        fd = f.fileno()
        try:
            hole = os.lseek(fd, 0, os.SEEK_HOLE)
        except OSError:
            return None
        return hole if hole < os.fstat(fd).st_size else None
