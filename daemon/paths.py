"""Path rules for hot folders: which names are candidates, joining safely, reading without following links.

Everything here is pure or touches only the path it is given: every function is safe to call from any thread.
Relative paths are POSIX strings ("sub/photo.jpg"), as stored in the job table.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "NETWORK_FS",
    "Mount",
    "UnsafePath",
    "filesystem_type",
    "is_candidate",
    "is_ignored_name",
    "mount_below",
    "mount_of",
    "needs_polling",
    "normalize_extensions",
    "open_file",
    "open_no_follow",
    "parse_mountinfo",
    "read_mountinfo",
    "read_no_follow",
    "remount_is_safe",
    "safe_join",
]

# Names that operating systems, NAS boxes and office suites leave in shared folders (compared lower-case).
_JUNK_NAMES = frozenset(
    {".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "@eadir", "#recycle", ".trashes", "__macosx"}
)
# Dotfiles cover "._*" (AppleDouble), ".nfs*" (NFS silly-renames) and ".Trashes"; listed for the reader.
_JUNK_PREFIXES = (".", "~$")
# Names of files still being written by browsers, copy tools and editors.
_JUNK_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".filepart", "~")

# Filesystems where inotify does not see changes made by other machines: poll them.
NETWORK_FS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "ocfs2",
        "gfs2", "lustre", "beegfs", "gpfs", "davfs", "sshfs", "fuse", "fuseblk", "virtiofs", "vboxsf",
    }
)  # fmt: skip


class UnsafePath(Exception):
    """A path that would leave its folder, or a link or non-regular file where a regular file is read."""


class FileTooLarge(UnsafePath):
    """A file larger than any image accepted could need: refused before it is read into memory."""


def max_file_bytes(max_pixels: int) -> int:
    """The largest file read for an image limit of ``max_pixels``.

    Pixels take at most max_pixels x 16 bits x 4 channels, but layered TIFFs from retouchers carry layer data
    (dropped on output) well beyond that, so the limit is never below 4 GiB."""
    return max(max_pixels * 8 + (64 << 20), 4 << 30)


def normalize_extensions(extensions: Iterable[str]) -> frozenset[str]:
    """``["JPG", ".png"]`` -> ``{".jpg", ".png"}``."""
    return frozenset("." + ext.lower().lstrip(".") for ext in extensions)


def is_ignored_name(name: str) -> bool:
    """True for one path component that is system junk, hidden, or a temporary name."""
    lowered = name.lower()
    return (
        not name
        or name in (".", "..")
        or lowered in _JUNK_NAMES
        or lowered.startswith(_JUNK_PREFIXES)
        or lowered.endswith(_JUNK_SUFFIXES)
    )


def is_candidate(relpath: str, extensions: Iterable[str]) -> bool:
    """True if ``relpath`` (POSIX, relative to a hot folder) names an image the daemon should process.

    Every component is checked: a photo inside ``.git/``, ``@eaDir/`` or ``__MACOSX/`` is junk too.
    """
    if not relpath or "\0" in relpath or relpath.startswith("/"):
        return False
    parts = relpath.split("/")
    if any(is_ignored_name(part) for part in parts):
        return False
    exts = extensions if isinstance(extensions, frozenset) else normalize_extensions(extensions)
    return os.path.splitext(parts[-1])[1].lower() in exts


def _check_relpath(relpath: str) -> list[str]:
    if not relpath:
        raise UnsafePath("empty path")
    if "\0" in relpath:
        raise UnsafePath(f"NUL character in path {relpath!r}")
    if relpath.startswith("/") or os.path.isabs(relpath):
        raise UnsafePath(f"absolute path {relpath!r}")
    parts = [part for part in relpath.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"'..' in path {relpath!r}")
    if not parts:
        raise UnsafePath(f"path {relpath!r} names the folder itself")
    return parts


def safe_join(base: Path, relpath: str) -> Path:
    """``base / relpath``, refusing anything that could lead outside ``base``.

    Refused (``UnsafePath``): absolute paths, ``..``, NUL, and any existing component below ``base`` that is a
    symbolic link. ``base`` itself may be a link: the administrator configured it. Missing components are
    fine (output paths); nothing is created. A link swapped in after this check is caught by ``open_file``
    and ``open_no_follow``, the race-free guards for reads.
    """
    parts = _check_relpath(relpath)
    path = Path(base)
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path.joinpath(*parts[i + 1 :])
        except NotADirectoryError as exc:
            raise UnsafePath(f"{relpath!r}: a parent is not a directory") from exc
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"{relpath!r}: {'/'.join(parts[: i + 1])!r} is a symbolic link")
    return path


def open_no_follow(path: Path | str, *, base: Path | None = None, max_bytes: int | None = None) -> bytes:
    """The whole content of a regular file, read without following a symbolic link (see ``open_file``)."""
    return read_no_follow(path, base=base, max_bytes=max_bytes)[0]


def open_file(path: Path | str, *, base: Path | None = None) -> BinaryIO:
    """Open a regular file for reading without following a symbolic link.

    With ``base``, ``path`` is relative to it and every component is opened with O_NOFOLLOW from its parent's
    descriptor, so no directory on the way can be swapped for a link either. Without ``base`` only the last
    component is protected. Non-regular files (FIFOs, devices, directories) are refused without blocking.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if base is None:
        fd = _open_checked(str(path), flags, None, str(path))
    else:
        parts = _check_relpath(str(path) if isinstance(path, Path) else path)
        dir_fd = open_folder(base, parts[:-1])
        try:
            fd = _open_checked(parts[-1], flags, dir_fd, str(path))
        finally:
            os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{path}: not a regular file")
        # O_NONBLOCK only served to open FIFOs without hanging; regular-file reads never block on it.
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_folder(base: Path, parts: Iterable[str]) -> int:
    """A descriptor of the folder ``base/parts...``, each part opened with O_NOFOLLOW from its parent's descriptor.

    Operations relative to it (``dir_fd=``) reach what is really below ``base``, even if a folder on the way is
    swapped for a symbolic link after the path was checked. ``base`` itself may be a link (configured).
    """
    shown = str(Path(base).joinpath(*parts))
    dir_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            next_fd = _open_checked(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd, shown)
            os.close(dir_fd)
            dir_fd = next_fd
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def _open_checked(name: str, flags: int, dir_fd: int | None, shown: str) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP: the last component is a link; ENOTDIR (with O_DIRECTORY): a directory component is a link.
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and flags & os.O_DIRECTORY):
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    raise UnsafePath(f"{shown}: symbolic link, not followed") from exc
        raise


def read_no_follow(
    path: Path | str, *, base: Path | None = None, max_bytes: int | None = None
) -> tuple[bytes, os.stat_result]:
    """The whole content of a regular file (see ``open_no_follow``) and the status of what was read.

    The status is taken from the open descriptor after reading, so it describes the bytes returned even if the
    name was replaced meanwhile. ``max_bytes`` guards memory: a larger file raises ``FileTooLarge``.
    """
    with open_file(path, base=base) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise FileTooLarge(f"{path}: {size} bytes is more than the limit of {max_bytes}")
        # read(n) allocates n bytes up front: ask for what the file holds (plus one, to see it grow), not the limit.
        data = f.read() if max_bytes is None else f.read(min(size, max_bytes) + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise FileTooLarge(f"{path}: more than the limit of {max_bytes} bytes")
        return data, os.fstat(f.fileno())


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str


def read_mountinfo() -> str:
    """This process's mount table, or "" where there is no /proc."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return ""


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts in a /proc/self/mountinfo text, in the kernel's order (later ones stack on earlier ones)."""

    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            mounts.append(Mount(_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
        except (ValueError, IndexError):
            continue  # a line this parser does not understand must not break watching
    return mounts


def mount_of(path: Path | str, mountinfo: str | None = None) -> Mount | None:
    """The mount that holds ``path``: the longest mount point that is a prefix of its real path.

    None when the mount table cannot be read. The path is resolved (a configured folder may be a link onto a
    share); a path that does not exist is resolved as far as it goes.
    """
    mounts = parse_mountinfo(read_mountinfo() if mountinfo is None else mountinfo)
    if not mounts:
        return None
    real = os.path.realpath(path)
    best: Mount | None = None
    for mount in mounts:
        mp = mount.mount_point.rstrip("/") or "/"
        inside = real == mp or real.startswith(mp + "/") or mp == "/"
        # ">=": the last of several mounts on the same point is the visible one.
        if inside and (best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")):
            best = mount
    return best


def unmounted(current: Mount, expected: Mount) -> bool:
    """True if ``current`` lies below ``expected`` in the tree of mounts: the expected mount was removed.

    An unmounted share leaves its empty mount point behind, so a folder that still exists can have lost
    its share. A deeper mount (the share mounted on top of an empty folder) is not a loss.
    """
    cur = current.mount_point.rstrip("/")
    exp = expected.mount_point.rstrip("/")
    return cur != exp and (exp.startswith(cur + "/") or cur == "")


def mount_below(mount: Mount, mountinfo: str | None = None) -> Mount | None:
    """The mount that ``mount`` covers: where a path on it falls through to once it is unmounted.

    That is the mount holding the parent of its mount point; None for the root filesystem (nothing lies under
    it) or when the mount table cannot be read. Recorded beside a folder's mount, for ``remount_is_safe``.
    """
    mp = mount.mount_point.rstrip("/")
    if not mp:
        return None
    return mount_of(os.path.dirname(mp) or "/", mountinfo)


def remount_is_safe(current: Mount, recorded: Mount, below: Mount | None) -> bool:
    """May a folder recorded on ``recorded`` (which covered ``below``) be taken to be on ``current`` from now on?

    Asked when an operator reloads (SIGHUP) after changing mounts. The danger is taking an unmounted share's empty
    mount point for the new truth, and then writing results onto the local disk under it. The rule:

    - ``current`` is not shallower than ``recorded`` (the same mount, one mounted on top of the folder, or
      elsewhere because a link was re-pointed): a real mount holds the folder, take it;
    - ``current`` is shallower (the recorded mount point is below it): either the share was mounted one level
      higher, or it was unmounted and the path fell through to what lay under it. An unmount can only fall
      through to ``below`` or, if that went too, to something shallower still. So a shallower mount is taken
      only if it is neither ``below`` nor shallower than it: then it is a mount that was not there when the
      folder's mount was recorded, a share re-mounted higher up (or stacked on ``below``'s mount point).
      Without a ``below`` (unknown) nothing shallower is taken.

    Mounts compare by mount point, type and source, so a fallback re-mounted meanwhile still counts as ``below``:
    the rule errs on the side of waiting, which a restart ends (start-up records the mounts as it finds them).
    """
    if not unmounted(current, recorded):
        return True
    return below is not None and current != below and not unmounted(current, below)


def filesystem_type(path: Path | str, mountinfo: str | None = None) -> str:
    """The filesystem type of the mount holding ``path`` ("ext4", "nfs4", "fuse.sshfs", ...), or "unknown"."""
    mount = mount_of(path, mountinfo)
    return mount.fstype if mount else "unknown"


def needs_polling(fstype: str) -> bool:
    """True for filesystems where inotify misses changes made elsewhere (network shares and FUSE)."""
    return fstype in NETWORK_FS or fstype.startswith(("fuse.", "nfs", "smb", "cifs"))
