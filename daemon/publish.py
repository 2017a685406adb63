"""Everything that writes to the outputs share, the backup folder and the failed folder.

Rules every function here keeps:

* A file appears under its final name complete or not at all: data goes to a hidden temporary
  name in the same directory (``.gpen-watch.<host>.<pid>.<random>.tmp``), is fsynced, renamed,
  and the directory is fsynced. On any error the temporary file is removed; after a crash,
  ``cleanup_temp_files`` recognises the leftovers by that name.
* The root of an output/backup/failed/done tree is never created here. If it is missing, the share
  is probably unmounted, and creating it would silently fill the local disk: we raise
  ``ShareUnavailable`` (transient) instead. Subfolders below an existing root are created.
* Below a root, nothing follows a symlink: directories are walked with ``O_NOFOLLOW`` and all
  writes go through directory file descriptors, so a planted link cannot redirect a write
  outside the configured folders. Relative paths with ``..`` or an absolute path are refused.
* Names are never passed to a shell or a program, so spaces, Unicode, newlines and leading
  dashes are ordinary names.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import platform
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePath, PurePosixPath
from typing import Literal

from daemon.paths import UnsafePath, open_folder, safe_join

__all__ = [
    "FailureInfo",
    "ShareUnavailable",
    "SourceChanged",
    "UnsafePath",
    "classify_os_error",
    "cleanup_temp_files",
    "copy_verified",
    "fit_stem",
    "dispose_source",
    "file_has_sha256",
    "is_mounted_share_available",
    "plan_output_name",
    "plan_result_and_backup",
    "write_atomic",
    "write_failure",
]

TEMP_PREFIX = ".gpen-watch."
TEMP_SUFFIX = ".tmp"
# host: 8 hex digits of the machine id's hash; pid: the writing process; then 8 random hex digits.
TEMP_PATTERN = re.compile(r"\.gpen-watch\.([0-9a-f]{8})\.([0-9]+)\.[0-9a-f]{8}\.tmp\Z")
_CHUNK = 1 << 20
_MAX_SUFFIX = 100_000

Collisions = Literal["suffix", "overwrite"]
After = Literal["delete", "keep", "move"]
ErrorKind = Literal["transient", "permanent"]


class ShareUnavailable(OSError):
    """The root of an output/backup/failed tree is missing or unreachable: retry later."""

    def __init__(self, root: Path, why: str = "folder is missing (share not mounted?)") -> None:
        super().__init__(errno.ENOENT, why, str(root))


class SourceChanged(Exception):
    """The original's bytes no longer match the SHA-256 recorded in the job row."""


class OriginalKept(OSError):
    """A copy of the original is durable at ``stored``, but the original could not be removed (its folder is
    read-only, say). Carries the errno of that removal."""

    def __init__(self, cause: OSError, stored: Path) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.stored = stored


# ---------------------------------------------------------------------------------------------
# paths


def _rel_parts(relpath: str | PurePath) -> tuple[str, ...]:
    """Split a relative path into safe components; refuse anything that could leave the folder.

    Used on paths the caller built from a root (``root / relpath``); ``daemon.paths.safe_join``
    builds them from the job's relative path in the first place.
    """
    text = str(relpath)
    if not text or "\0" in text:
        raise UnsafePath(f"invalid relative path {text!r}")
    pure = PurePosixPath(text)
    if pure.is_absolute():  # a backslash is an ordinary character in a POSIX name
        raise UnsafePath(f"relative path {text!r} is absolute")
    parts = tuple(p for p in pure.parts if p != ".")
    if not parts or ".." in parts:
        raise UnsafePath(f"relative path {text!r} leaves its folder")
    return parts


def is_mounted_share_available(root: Path) -> bool:
    """True when ``root`` exists and is a directory we can reach (stale NFS handles count as gone)."""
    try:
        return stat.S_ISDIR(os.stat(root).st_mode)
    except OSError:
        return False


def _open_root(root: Path) -> int:
    # The root itself may be a symlink the administrator configured; below it, none are followed.
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise ShareUnavailable(root) from None
    except OSError as exc:
        if exc.errno in _SHARE_GONE:
            raise ShareUnavailable(root, os.strerror(exc.errno or 0)) from exc
        raise


def _open_subdir(root: Path, parts: Iterable[str], *, create: bool) -> int:
    """A directory fd for root/parts, creating missing subfolders, never following a symlink."""
    fd = _open_root(root)
    try:
        for name in parts:
            if create:
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                else:
                    _fsync_dir(fd)  # the new entry too must survive a power cut, or the file inside it is lost
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{name!r} below {root} is a symlink or not a folder") from exc
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _split_under(root: Path, path: Path) -> tuple[str, ...]:
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise UnsafePath(f"{path} is not inside {root}") from None
    return _rel_parts(rel)


def _fsync_dir(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        # Some network filesystems refuse fsync on a directory; the rename itself is still atomic.
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF):
            raise


# ---------------------------------------------------------------------------------------------
# atomic writes


@functools.cache
def host_tag() -> str:
    """8 hex digits naming this machine, so a crash's leftovers can be told from another host's writes."""
    for candidate in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            if ident := Path(candidate).read_text().strip():
                break
    else:
        ident = socket.gethostname()
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


@dataclass
class _Temp:
    dir_fd: int
    name: str
    fd: int


@contextlib.contextmanager
def _temp_in(dir_fd: int) -> Iterator[_Temp]:
    """A new temporary file in ``dir_fd``; removed again unless the caller renamed it away."""
    while True:
        name = f"{TEMP_PREFIX}{host_tag()}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            # 0o666 lets the umask decide the final mode, as for any file the user would create.
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o666, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    temp = _Temp(dir_fd, name, fd)
    try:
        yield temp
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(temp.fd)
        with contextlib.suppress(OSError):
            os.unlink(temp.name, dir_fd=dir_fd)
        raise
    else:
        with contextlib.suppress(OSError):
            os.close(temp.fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_CHUNK])
        view = view[written:]


def _commit(temp: _Temp, final: str, *, replace: bool, mtime_ns: int | None, atime_ns: int | None) -> None:
    """fsync the temp file, give it its times, and move it to ``final`` in the same directory."""
    os.fsync(temp.fd)
    if mtime_ns is not None:
        os.utime(temp.fd, ns=(atime_ns if atime_ns is not None else mtime_ns, mtime_ns))
    if replace:
        os.replace(temp.name, final, src_dir_fd=temp.dir_fd, dst_dir_fd=temp.dir_fd)
    else:
        _rename_noreplace(temp.dir_fd, temp.name, final)
    _fsync_dir(temp.dir_fd)


def _rename_noreplace(dir_fd: int, src: str, dst: str) -> None:
    # link() fails with EEXIST instead of replacing; shares without hard links fall back to a
    # check-then-rename, whose tiny race only matters if something else writes into our folder.
    try:
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        if _lexists(dst, dir_fd):
            raise FileExistsError(errno.EEXIST, "file exists", dst) from None
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    else:
        os.unlink(src, dir_fd=dir_fd)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _dir_for(path: Path, root: Path | None) -> int:
    if root is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _open_subdir(root, _split_under(root, path)[:-1], create=True)


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mtime_ns: int | None = None,
    root: Path | None = None,
    replace: bool = True,
) -> Path:
    """Write ``data`` to ``path`` so that the file is complete or absent, never partial.

    With ``root`` (the configured output/backup/failed folder), ``path`` must lie inside it, the
    root must already exist (else ShareUnavailable) and no symlink below it is followed; without
    it, missing parent folders are created. ``replace=False`` raises FileExistsError instead of
    replacing an existing file.
    """
    dir_fd = _dir_for(path, root)
    try:
        with _temp_in(dir_fd) as temp:
            _write_all(temp.fd, data)
            _commit(temp, path.name, replace=replace, mtime_ns=mtime_ns, atime_ns=None)
    finally:
        os.close(dir_fd)
    return path


@contextlib.contextmanager
def _source_folder(src: Path, src_root: Path | None) -> Iterator[tuple[int | None, str]]:
    """(folder descriptor, name) through which to reach ``src``.

    With ``src_root`` (the hot folder), the folders from it down to ``src`` are opened without following
    links, so that a subfolder swapped for a link after the job's path was checked cannot make a read,
    move or delete land outside the hot folder. Without it: (None, the path).
    """
    if src_root is None:
        yield None, str(src)
        return
    fd = open_folder(src_root, src.parent.relative_to(src_root).parts)
    try:
        yield fd, src.name
    finally:
        os.close(fd)


def _open_source(src: Path, src_root: Path | None = None) -> int:
    with _source_folder(src, src_root) as (folder_fd, name):
        return _open_in(folder_fd, name, src)


def _open_in(folder_fd: int | None, name: str, shown: Path) -> int:
    # O_NOFOLLOW: the hot folder's file itself must not be a link to something elsewhere.
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{shown} is a symlink") from exc
        raise


def copy_verified(
    src: Path,
    dst: Path,
    expected_sha256: str,
    *,
    root: Path | None = None,
    replace: bool = True,
    src_root: Path | None = None,
) -> os.stat_result:
    """Byte-exact copy of ``src`` to ``dst``, checked against the job's SHA-256, mtime kept.

    Raises SourceChanged (and leaves nothing under ``dst``) if the bytes read differ from
    ``expected_sha256``: the original was rewritten after the job recorded it. ``src_root``: see
    ``_source_folder``. Returns the source's status as it was copied, which ``dispose_source``
    (``expect=``) uses to tell that file from one put under its name since.
    """
    src_fd = _open_source(src, src_root)
    try:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{src} is not a regular file")
        dir_fd = _dir_for(dst, root)
        try:
            with _temp_in(dir_fd) as temp:
                digest = hashlib.sha256()
                while chunk := os.read(src_fd, _CHUNK):
                    digest.update(chunk)
                    _write_all(temp.fd, chunk)
                if digest.hexdigest() != expected_sha256.lower():
                    raise SourceChanged(
                        f"{src}: SHA-256 is {digest.hexdigest()}, the job recorded {expected_sha256}"
                    )
                _commit(temp, dst.name, replace=replace, mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns)
        finally:
            os.close(dir_fd)
    finally:
        os.close(src_fd)
    return st


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


def _check_still(src: Path, src_root: Path | None, expect: os.stat_result | None,
                 sha256: str | None = None) -> None:
    """Raise SourceChanged if the name no longer holds the file whose bytes were backed up (``expect``, the
    backup's stat of its source) or checked (``sha256`` alone)."""
    if expect is None and sha256 is None:
        return
    with _source_folder(src, src_root) as (folder_fd, name):
        now = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    if expect is not None and _same_file(now, expect):
        return
    # Network and FUSE filesystems may report another inode or time for the same file: the bytes decide.
    if sha256 is not None and stat.S_ISREG(now.st_mode) and (expect is None or now.st_size == expect.st_size):
        fd = _open_source(src, src_root)
        try:
            digest = hashlib.sha256()
            while chunk := os.read(fd, _CHUNK):
                digest.update(chunk)
        finally:
            os.close(fd)
        if digest.hexdigest() == sha256.lower():
            return
    raise SourceChanged(f"{src} was replaced after its backup was made; the new file is left for the next scan")


# ---------------------------------------------------------------------------------------------
# naming


def _suffixed(name: str, n: int) -> str:
    """``name (n).ext``, its stem shortened where the suffix would not fit in a file name."""
    tag = f" ({n})"
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension
        return fit_stem(name, len(tag)) + tag
    return f"{fit_stem(stem, len(tag) + len(os.fsencode(dot + ext)))}{tag}{dot}{ext}"


def plan_output_name(
    out_dir: Path,
    relpath: str | PurePath,
    ext: str,
    *,
    collisions: Collisions = "suffix",
    reserved: Callable[[Path], bool] | None = None,
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Where the result for ``relpath`` goes: same subfolders under ``out_dir``, extension ``ext``.

    ``suffix``: an existing file (or one ``reserved`` says is promised to another job) is never
    overwritten; ``name (1).jpg``, ``name (2).jpg``... are tried in turn. ``overwrite``: an
    existing file that ``replaceable`` accepts (default: any) is replaced; a name reserved for
    another job, or a file ``replaceable`` refuses, still gets a suffix, so two different sources
    (``a.png`` and ``a.jpg``) never overwrite each other's results.
    Raises ShareUnavailable if ``out_dir`` is missing.
    """
    name = _Name(out_dir, relpath, ext)
    return name.numbered(name.first_free(0, collisions, reserved, replaceable))


def plan_result_and_backup(
    output_dir: Path,
    backup_dir: Path,
    relpath: str | PurePath,
    ext: str,
    *,
    collisions: Collisions = "suffix",
    reserved: Callable[[Path], bool] | None = None,
    replaceable: Callable[[Path], bool] | None = None,
) -> tuple[Path, Path]:
    """The result's name (as ``plan_output_name``) and the backup's (the original's own name, never replacing).

    With ``suffix`` both take the same number, the first free in both folders (``p (2).jpg`` and ``p (2).png``), so
    the original of a result is found by its name. With ``overwrite`` the result keeps its name while an earlier
    backup, perhaps the only copy of an earlier original, is not replaced: the backup's number is its own.
    """
    result = _Name(output_dir, relpath, ext)
    backup = _Name(backup_dir, relpath, PurePath(relpath).suffix)
    if collisions == "overwrite":
        return (result.numbered(result.first_free(0, collisions, reserved, replaceable)),
                backup.numbered(backup.first_free(0, "suffix", reserved, None)))
    n = 0
    while True:  # each round moves n up, and first_free gives up past _MAX_SUFFIX
        n = result.first_free(n, collisions, reserved, replaceable)
        m = backup.first_free(n, "suffix", reserved, None)
        if m == n:
            return result.numbered(n), backup.numbered(n)
        n = m


class _Name:
    """A file name under ``out_dir`` for ``relpath`` with extension ``ext``, and its numbered variants."""

    def __init__(self, out_dir: Path, relpath: str | PurePath, ext: str) -> None:
        if not is_mounted_share_available(out_dir):
            raise ShareUnavailable(out_dir)
        same_name = safe_join(out_dir, str(relpath))
        ext = "." + ext.lstrip(".") if ext else ""
        self.base = _fit_name((same_name.stem if ext else same_name.name) + ext, 0)  # a longer extension must fit
        self.folder = same_name.parent

    def numbered(self, n: int) -> Path:
        return self.folder / (self.base if n == 0 else _suffixed(self.base, n))

    def first_free(self, start: int, collisions: Collisions, reserved: Callable[[Path], bool] | None,
                   replaceable: Callable[[Path], bool] | None) -> int:
        """The first number from ``start`` whose name is free (or replaceable, with ``overwrite``)."""
        for n in range(start, _MAX_SUFFIX):
            candidate = self.numbered(n)
            if reserved is not None and reserved(candidate):
                continue
            if not os.path.lexists(candidate) or (
                    collisions == "overwrite" and (replaceable is None or replaceable(candidate))):
                return n
        raise FileExistsError(errno.EEXIST, f"no free name after {_MAX_SUFFIX} tries", str(self.folder / self.base))


# ---------------------------------------------------------------------------------------------
# the original: backup done, now remove / keep / move it


def _free_name(dir_fd: int, name: str, taken: set[str] | None = None) -> str:
    candidate = name
    n = 0
    while _lexists(candidate, dir_fd) or (taken is not None and candidate in taken):
        n += 1
        candidate = _suffixed(name, n)
    return candidate


def _claim_name(dir_fd: int, dst: Path, before: Callable[[Path], None] | None) -> str:
    """A free name near ``dst``, claimed by ``before`` when given.

    ``before`` raises FileExistsError when another process (an instance sharing the folder) claimed
    that name between our look and its write: the next free name is tried.
    """
    taken: set[str] = set()
    while True:
        final = _free_name(dir_fd, dst.name, taken)
        if before is None:
            return final
        try:
            before(dst.with_name(final))
            return final
        except FileExistsError:
            taken.add(final)


def _move_into(src: Path, dst: Path, root: Path | None, *, before: Callable[[Path], None] | None = None,
               src_root: Path | None = None, copy_if_stuck: bool = False) -> Path:
    """Move ``src`` to ``dst`` (a free name near it): rename when possible, else copy, then unlink.

    ``before`` is called with the chosen final path just before the original is moved there.
    ``src_root``: see ``_source_folder``. ``copy_if_stuck``: where the source's folder refuses the rename
    (read-only, no permission), copy all the same. Raises ``OriginalKept`` when the copy is durable but the
    original cannot be removed.
    """
    copy_on = (errno.EXDEV, errno.EROFS, errno.EACCES, errno.EPERM) if copy_if_stuck else (errno.EXDEV,)
    dir_fd = _dir_for(dst, root)
    try:
        final = _claim_name(dir_fd, dst, before)
        with _source_folder(src, src_root) as (src_fd_dir, name):
            try:
                os.rename(name, final, src_dir_fd=src_fd_dir, dst_dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno not in copy_on:
                    raise
                src_fd = _open_in(src_fd_dir, name, src)
                try:
                    st = os.fstat(src_fd)
                    with _temp_in(dir_fd) as temp:
                        while chunk := os.read(src_fd, _CHUNK):
                            _write_all(temp.fd, chunk)
                        _commit(temp, final, replace=False, mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns)
                finally:
                    os.close(src_fd)
                # The copy is durable; only now does the original go.
                try:
                    os.unlink(name, dir_fd=src_fd_dir)
                except FileNotFoundError:
                    pass  # removed meanwhile by someone else: the copy holds it
                except OSError as unlink_exc:
                    _fsync_dir(dir_fd)
                    raise OriginalKept(unlink_exc, dst.with_name(final)) from unlink_exc
            else:
                _fsync_dir(dir_fd)
    finally:
        os.close(dir_fd)
    _fsync_parent(src)
    return dst.with_name(final)


def _fsync_parent(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _fsync_dir(fd)
        finally:
            os.close(fd)


def dispose_source(
    src: Path,
    *,
    after: After,
    done_path: Path | None = None,
    done_root: Path | None = None,
    src_root: Path | None = None,
    expect: os.stat_result | None = None,
    sha256: str | None = None,
) -> Path | None:
    """Remove, keep or move the original. Call only once the output and the backup are durable.

    Idempotent for ``delete`` (an already-missing source is fine: a restart may repeat this step).
    Returns where the original is now (None when deleted). ``src_root``: see ``_source_folder``.
    """
    if after == "keep":
        return src
    if after in ("delete", "move"):
        with contextlib.suppress(FileNotFoundError):
            _check_still(src, src_root, expect, sha256)
    if after == "delete":
        with contextlib.suppress(FileNotFoundError), _source_folder(src, src_root) as (folder_fd, name):
            os.unlink(name, dir_fd=folder_fd)
        _fsync_parent(src)
        return None
    if after == "move":
        if done_path is None:
            raise ValueError("after='move' needs done_path")
        return _move_into(src, done_path, done_root, src_root=src_root)
    raise ValueError(f"unknown after={after!r}")


# ---------------------------------------------------------------------------------------------
# failures


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("gpen-watch", "torch"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "unknown"
    found["python"] = platform.python_version()
    return found


@dataclass(frozen=True)
class FailureInfo:
    """What went wrong with one file, written beside it in the failed folder."""

    stage: str
    error: str
    attempts: int
    preset: str
    folder: str
    relpath: str | None = None
    sha256: str | None = None
    # Who writes it (host and instance): the same across restarts, different for each instance sharing failed/.
    writer: str | None = None
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def as_json(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            "error": self.error,
            "attempts": self.attempts,
            "time": self.time.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "preset": self.preset,
            "folder": self.folder,
            "relpath": self.relpath,
            "sha256": self.sha256,
            "writer": self.writer,
            "versions": _versions(),
        }


def write_failure(
    failed_dir: Path,
    relpath: str | PurePath,
    src: Path | None,
    data: bytes | None,
    info: FailureInfo,
    *,
    src_root: Path | None = None,
) -> Path:
    """Put the original into ``failed_dir`` at its relative path with ``NAME.error.json`` beside it.

    ``src`` (the original in the hot folder) is moved there, or copied and then removed when the
    failed folder is on another filesystem; with no ``src``, ``data`` is written instead. An
    earlier failure with the same name is never overwritten: ``name (1).jpg`` is used. The
    sidecar lands first, then the original, so nobody ever finds a failed file without its
    reason; a crash in between leaves the original in the hot folder, and the retry rewrites
    the same sidecar. Returns the path of the stored original.
    """
    if src is None and data is None:
        raise ValueError("write_failure needs the source file or its bytes")
    payload = json.dumps(info.as_json(), indent=2, ensure_ascii=False).encode() + b"\n"
    sidecars: list[Path] = []

    def write_sidecar(stored: Path) -> None:
        # The sidecar claims the name: instances sharing a failed/ folder never write a sidecar over another's,
        # so neither moves its original over the other's.
        sidecar = stored.with_name(stored.name + _SIDECAR)
        try:
            write_atomic(sidecar, payload, root=failed_dir, replace=False)
        except FileExistsError:
            earlier = _earlier_sidecar(sidecar, info)
            if earlier is None:
                raise
            # About this same file: from our own attempt that died before the move, or from another instance
            # failing it at this moment, whose original may be landing beside it: only ours is taken back if
            # our move fails.
            write_atomic(sidecar, payload, root=failed_dir)
            if earlier != "ours":
                return
        sidecars.append(sidecar)

    target = safe_join(failed_dir, str(relpath))
    target = target.with_name(_fit_name(target.name, len(_SIDECAR) + len(" (99)")))
    return _write_failure(failed_dir, target, src, data, write_sidecar, sidecars, src_root)


_SIDECAR = ".error.json"
_NAME_MAX = 255


def recorded_failure(failed_dir: Path, relpath: str, *, folder: str, writer: str, sha256: str | None,
                     since: float) -> tuple[str, str] | None:
    """(stage, error) of this file's failure as ``write_failure`` left it in ``failed_dir``, or None.

    For a file missing from its hot folder at a restart: the process may have died between moving it into
    failed/ and writing that down. Only a sidecar written by ``writer`` about this folder, path and content
    (``sha256``, None when the file failed before it was hashed), no older than the job (``since``, a Unix
    time), with its original beside it, counts."""
    try:
        target = safe_join(failed_dir, relpath)
        target = target.with_name(_fit_name(target.name, len(_SIDECAR) + len(" (99)")))
        names = set(os.listdir(target.parent))
    except (OSError, UnsafePath):
        return None
    for sidecar in names:
        stored = sidecar.removesuffix(_SIDECAR)
        if stored == sidecar or stored not in names:
            continue
        numbers = re.findall(r" \((\d{1,6})\)", stored)  # the last is the suffix: "a (3) (1).jpg"
        if stored != target.name and (not numbers or stored != _suffixed(target.name, int(numbers[-1]))):
            continue  # another file's: only this name and its numbered variants are this file's
        try:
            with open(target.parent / sidecar, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as fh:
                info = json.loads(fh.read(1 << 20))
            written = datetime.fromisoformat(str(info["time"]).replace("Z", "+00:00")).timestamp()
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # deep nesting: a planted sidecar
            continue
        same = (("folder", folder), ("relpath", relpath), ("sha256", sha256), ("writer", writer))
        if all(info.get(k) == v for k, v in same) and written >= int(since) - 1:
            return str(info.get("stage", "unknown")), str(info.get("error", ""))
    return None


def _earlier_sidecar(sidecar: Path, info: FailureInfo) -> Literal["ours", "same file"] | None:
    """Whether ``sidecar`` (whose original is missing) is about this same file, and written by us (an attempt
    that died) or by someone else; None if it is about another file."""
    try:
        with open(sidecar, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as fh:
            earlier = json.loads(fh.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return None
    same = (("folder", info.folder), ("relpath", info.relpath), ("sha256", info.sha256))
    if not isinstance(earlier, dict) or not all(earlier.get(k) == v for k, v in same):
        return None
    return "ours" if info.writer is not None and earlier.get("writer") == info.writer else "same file"


def _fit_name(name: str, room: int) -> str:
    """``name``, its stem shortened (see ``fit_stem``) so that ``room`` more bytes still fit in NAME_MAX."""
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    return fit_stem(stem, room + len(os.fsencode(dot + ext))) + dot + ext


def fit_stem(stem: str, room: int) -> str:
    """``stem``, shortened where needed so that ``room`` more bytes still fit in a file name (NAME_MAX).

    A shortened stem ends in ``~`` and a hash of the whole stem, so two long names that share their start
    still get different short ones.
    """
    raw = os.fsencode(stem)
    if len(raw) + room <= _NAME_MAX:
        return stem
    tag = "~" + hashlib.sha256(raw).hexdigest()[:8]
    keep = _NAME_MAX - room - len(tag)
    return raw[: max(keep, 1)].decode("utf-8", "ignore") + tag


def _write_failure(failed_dir: Path, target: Path, src: Path | None, data: bytes | None,
                   write_sidecar: Callable[[Path], None], sidecars: list[Path], src_root: Path | None) -> Path:
    try:
        if src is not None:
            # A read-only hot folder cannot give the original up: failed/ gets a copy and its reason all the same.
            return _move_into(src, target, failed_dir, before=write_sidecar, src_root=src_root, copy_if_stuck=True)
        assert data is not None
        return _write_new(target, data, failed_dir, before=write_sidecar)
    except OriginalKept:
        raise  # the copy and its sidecar are in failed/: they stay
    except BaseException:
        for sidecar in sidecars:  # the original did not get there: no reason without a file
            with contextlib.suppress(OSError):
                os.unlink(sidecar)
        raise


def _write_new(dst: Path, data: bytes, root: Path, *, before: Callable[[Path], None]) -> Path:
    """Write ``data`` under a free name near ``dst``; ``before`` is called with that name first."""
    dir_fd = _dir_for(dst, root)
    try:
        name = _claim_name(dir_fd, dst, before)
        with _temp_in(dir_fd) as temp:
            _write_all(temp.fd, data)
            _commit(temp, name, replace=False, mtime_ns=None, atime_ns=None)
    finally:
        os.close(dir_fd)
    return dst.with_name(name)


# ---------------------------------------------------------------------------------------------
# crash leftovers


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale(name: str, st: os.stat_result, now: float, min_age: float) -> bool:
    match = TEMP_PATTERN.match(name)
    if match is None or not stat.S_ISREG(st.st_mode):
        return False
    if now - st.st_ctime >= min_age:
        return True
    # Written on this machine by a process that no longer exists: a crash's leftover.
    host, pid = match[1], int(match[2])
    return host == host_tag() and pid != os.getpid() and not _pid_alive(pid)


def cleanup_temp_files(dirs: Iterable[Path], *, min_age: float = 3600.0) -> int:
    """Remove our own temporary files left by a crash; returns how many were removed.

    Only names matching ``.gpen-watch.<host>.<pid>.<random>.tmp`` that are regular files are
    touched: those written on this machine by a process that has exited, and any whose ctime is
    older than ``min_age`` seconds (another machine's instance sharing the folder may be writing
    one right now; ctime, unlike the mtime we copy, cannot be set back). Missing folders are
    skipped; symlinked folders are not entered.
    """
    removed = 0
    now = time.time()
    for top in dirs:
        for dirpath, _dirnames, filenames in os.walk(top, followlinks=False):
            for name in filenames:
                if not name.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if _is_stale(name, os.lstat(path), now, min_age):
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    continue
    return removed


def file_has_sha256(path: Path, sha256: str | None) -> bool:
    """True if ``path`` is a regular file (not a symlink) whose bytes hash to ``sha256``.

    Lets a restart tell a backup that was completed before a crash from a missing or partial one.
    """
    if not sha256:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        digest = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
        return digest.hexdigest() == sha256.lower()
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# errors

# A share that went away or hangs: retry later, the file is not at fault.
_SHARE_GONE = {errno.ESTALE, errno.ENOTCONN, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN,
               errno.ENETUNREACH, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED}
_TRANSIENT = _SHARE_GONE | {
    errno.ENOSPC, errno.EDQUOT,  # disk full / quota: someone frees space
    errno.EIO,  # network filesystems report many passing faults as EIO
    errno.EAGAIN, errno.EBUSY, errno.ETXTBSY, errno.ENOLCK, errno.EDEADLK,  # locked by another program
    errno.EINTR, errno.EMFILE, errno.ENFILE, errno.ENOMEM,  # our process or the host is short of resources
}
# Refused on the destination: an administrator fixes permissions, remounts read-write or puts
# a removed subfolder back; the photo is not at fault and retrying costs nothing. On the source
# these mean this very file is unreadable or gone.
_SOURCE_PERMANENT = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}
# The name or the request itself is wrong: retrying cannot help on either side.
_PERMANENT = {errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.EINVAL, errno.EFBIG,
              errno.EILSEQ}


def classify_os_error(
    exc: BaseException, *, side: Literal["source", "destination"] = "source"
) -> ErrorKind:
    """Whether a failed file operation should be retried later or the file should fail now.

    Transient: a missing output root (ShareUnavailable), a changed source (SourceChanged: it is
    being rewritten), ENOSPC, EDQUOT, EIO, ESTALE, ENOTCONN, EHOSTDOWN, ETIMEDOUT and other
    network errors, EAGAIN/EBUSY/ETXTBSY/ENOLCK (locked), EMFILE/ENFILE/ENOMEM; on the
    destination side also EACCES/EPERM/EROFS/ENOENT, and EEXIST (re-plan the name). Any errno
    not listed is transient too: a retry with back-off never loses a photo, while a wrong
    "permanent" would move a good photo to failed/.
    Permanent: EACCES/EPERM/EROFS/ENOENT on the source (unreadable or vanished), ENAMETOOLONG,
    EISDIR, ENOTDIR, ELOOP, EINVAL, EFBIG, EILSEQ (a name the share cannot store), UnsafePath
    (a symlink or ``..``), and exceptions that are not OS errors.
    """
    if isinstance(exc, ShareUnavailable | SourceChanged):
        return "transient"
    if isinstance(exc, UnsafePath) or not isinstance(exc, OSError):
        return "permanent"
    code = exc.errno
    if code is None:
        # OSError subclasses raised without an errno (TimeoutError(), BlockingIOError()...).
        passing = isinstance(exc, TimeoutError | BlockingIOError | ConnectionError)
        return "transient" if passing else "permanent"
    if code in _TRANSIENT:
        return "transient"
    if code in _PERMANENT:
        return "permanent"
    if code in _SOURCE_PERMANENT and side == "source":
        return "permanent"
    return "transient"
