"""Publishing: atomic results, verified backups, failures with sidecars, safe names, error classes."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import publish
from daemon.paths import safe_join
from daemon.publish import (
    TEMP_PATTERN,
    FailureInfo,
    OriginalKept,
    ShareUnavailable,
    SourceChanged,
    UnsafePath,
    classify_os_error,
    cleanup_temp_files,
    copy_verified,
    dispose_source,
    file_has_sha256,
    host_tag,
    is_mounted_share_available,
    plan_output_name,
    plan_result_and_backup,
    write_atomic,
    write_failure,
)

ODD_NAMES = [
    "\\back\\slash.png",
    "a b.png", "ünïcödé 写真.png", "new\nline.png", "-rf.png", "--help (1).png", "tab\there.png", "'q\".png",
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".gpen-watch.")]


class TestWriteAtomic:
    def test_writes_bytes_and_mtime_without_leftovers(self, tmp_path: Path) -> None:
        """The file holds exactly the data, carries the requested mtime, and no temp file remains."""
        target = tmp_path / "out" / "sub" / "a.jpg"
        (tmp_path / "out").mkdir()
        write_atomic(target, b"x" * 3_000_000, mtime_ns=1_600_000_000_123_456_789, root=tmp_path / "out")
        assert target.read_bytes() == b"x" * 3_000_000
        assert target.stat().st_mtime_ns == 1_600_000_000_123_456_789
        assert temps(tmp_path) == []

    def test_write_failing_midway_leaves_nothing(self, tmp_path: Path) -> None:
        """A write that fails after part of the data (file size limit) leaves no partial or temp file."""
        # RLIMIT_FSIZE makes the kernel refuse the write past 1 MiB: a real mid-write failure,
        # in a child process so the limit does not touch the test runner.
        script = textwrap.dedent(
            """
            import errno, resource, signal, sys
            from pathlib import Path
            from daemon.publish import write_atomic
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
            try:
                write_atomic(Path(sys.argv[1]), b"y" * (3 << 20), root=Path(sys.argv[2]))
            except OSError as exc:
                sys.exit(10 if exc.errno == errno.EFBIG else 11)
            sys.exit(0)
            """
        )
        target = tmp_path / "big.png"
        done = subprocess.run([sys.executable, "-c", script, str(target), str(tmp_path)], check=False)
        assert done.returncode == 10
        assert not target.exists()
        assert temps(tmp_path) == []

    @pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
    def test_disk_full_is_transient_and_leaves_nothing(self, tmp_path: Path) -> None:
        """On a full filesystem (ENOSPC) nothing appears under the final name and the error is transient."""
        small = tmp_path / "small"
        small.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=False)
        if mounted.returncode != 0:
            pytest.skip("cannot mount tmpfs here")
        try:
            with pytest.raises(OSError) as info:
                write_atomic(small / "x.jpg", b"z" * (4 << 20), root=small)
            assert info.value.errno == errno.ENOSPC
            assert classify_os_error(info.value, side="destination") == "transient"
            assert list(small.iterdir()) == []
        finally:
            subprocess.run(["umount", str(small)], check=True)

    def test_vanished_root_is_transient_and_not_recreated(self, tmp_path: Path) -> None:
        """A missing output root (unmounted share) is transient and is not created on local disk."""
        root = tmp_path / "share" / "out"
        with pytest.raises(ShareUnavailable) as info:
            write_atomic(root / "sub" / "a.jpg", b"data", root=root)
        assert classify_os_error(info.value) == "transient"
        assert not (tmp_path / "share").exists()
        assert not is_mounted_share_available(root)

    def test_no_replace_keeps_earlier_file(self, tmp_path: Path) -> None:
        """With replace=False an existing result is kept and FileExistsError is raised, leaving no temp."""
        target = tmp_path / "a.jpg"
        target.write_bytes(b"first")
        with pytest.raises(FileExistsError):
            write_atomic(target, b"second", root=tmp_path, replace=False)
        assert target.read_bytes() == b"first"
        assert temps(tmp_path) == []

    def test_symlinked_subfolder_is_refused(self, tmp_path: Path) -> None:
        """A symlink planted below the output root cannot redirect a write outside it."""
        root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
        root.mkdir()
        elsewhere.mkdir()
        (root / "sub").symlink_to(elsewhere)
        with pytest.raises(UnsafePath) as info:
            write_atomic(root / "sub" / "a.jpg", b"data", root=root)
        assert classify_os_error(info.value) == "permanent"
        assert list(elsewhere.iterdir()) == []

    def test_path_outside_root_is_refused(self, tmp_path: Path) -> None:
        """A target that is not inside the given root is refused before anything is written."""
        (tmp_path / "out").mkdir()
        with pytest.raises(UnsafePath):
            write_atomic(tmp_path / "out" / ".." / "escape.jpg", b"data", root=tmp_path / "out")
        assert not (tmp_path / "escape.jpg").exists()


class TestCopyVerified:
    def test_backup_is_byte_exact_with_mtime(self, tmp_path: Path) -> None:
        """The backup equals the source byte for byte and keeps its modification time."""
        data = os.urandom(2_500_000)
        src = tmp_path / "in" / "photo.jpg"
        src.parent.mkdir()
        src.write_bytes(data)
        os.utime(src, ns=(1_500_000_000_000_000_000, 1_500_000_000_987_654_321))
        (tmp_path / "backup").mkdir()
        dst = tmp_path / "backup" / "d" / "photo.jpg"
        copy_verified(src, dst, sha(data), root=tmp_path / "backup")
        assert data == dst.read_bytes()
        assert dst.stat().st_mtime_ns == 1_500_000_000_987_654_321
        assert src.exists()
        assert temps(tmp_path) == []
        assert file_has_sha256(dst, sha(data))
        assert not file_has_sha256(dst, sha(b"other"))
        assert not file_has_sha256(tmp_path / "backup" / "missing.jpg", sha(data))

    def test_a_folder_it_creates_is_made_durable_in_its_parent(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """backup/sub/ made for this backup: backup/ itself is fsynced, or a power cut could take sub/ (and the
        backup in it) away after the original has gone."""
        backup = tmp_path / "backup"
        backup.mkdir()
        src = tmp_path / "in" / "sub" / "a.jpg"
        src.parent.mkdir(parents=True)
        src.write_bytes(b"x" * 100)
        synced: set[tuple[int, int]] = set()
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            synced.add((st.st_dev, st.st_ino))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        copy_verified(src, backup / "sub" / "a.jpg", sha(b"x" * 100), root=backup)
        for folder in (backup, backup / "sub"):
            assert (folder.stat().st_dev, folder.stat().st_ino) in synced, folder

    def test_hash_mismatch_raises_and_leaves_nothing(self, tmp_path: Path) -> None:
        """A source rewritten since the job hashed it raises SourceChanged and writes no backup."""
        src = tmp_path / "photo.jpg"
        src.write_bytes(b"new bytes")
        (tmp_path / "backup").mkdir()
        dst = tmp_path / "backup" / "photo.jpg"
        with pytest.raises(SourceChanged) as info:
            copy_verified(src, dst, sha(b"old bytes"), root=tmp_path / "backup")
        assert classify_os_error(info.value) == "transient"
        assert not dst.exists()
        assert temps(tmp_path) == []

    def test_symlinked_source_is_refused(self, tmp_path: Path) -> None:
        """A hot-folder entry that is a symlink is never followed to back up some other file."""
        secret = tmp_path / "secret.txt"
        secret.write_bytes(b"secret")
        link = tmp_path / "photo.jpg"
        link.symlink_to(secret)
        (tmp_path / "backup").mkdir()
        with pytest.raises(UnsafePath):
            copy_verified(link, tmp_path / "backup" / "photo.jpg", sha(b"secret"), root=tmp_path / "backup")
        assert not (tmp_path / "backup" / "photo.jpg").exists()


class TestPlanOutputName:
    def test_keeps_subfolders_and_changes_extension(self, tmp_path: Path) -> None:
        """The result goes to the same relative path with the output format's extension."""
        assert tmp_path / "2024" / "may" / "p.jpg" == plan_output_name(
            tmp_path, "2024/may/p.png", "jpg", collisions="suffix"
        )

    def test_suffix_never_overwrites(self, tmp_path: Path) -> None:
        """Existing results and names reserved for other jobs get ' (1)', ' (2)'... instead."""
        (tmp_path / "p.jpg").write_bytes(b"1")
        (tmp_path / "p (1).jpg").write_bytes(b"2")
        reserved = {tmp_path / "p (2).jpg"}
        assert tmp_path / "p (3).jpg" == plan_output_name(
            tmp_path, "p.png", ".jpg", collisions="suffix", reserved=reserved.__contains__
        )

    def test_overwrite_replaces_existing_but_respects_reservations(self, tmp_path: Path) -> None:
        """The overwrite policy reuses an existing name but never one promised to another job."""
        (tmp_path / "p.jpg").write_bytes(b"old")
        assert tmp_path / "p.jpg" == plan_output_name(tmp_path, "p.jpg", ".jpg", collisions="overwrite")
        taken = {tmp_path / "p.jpg"}
        assert tmp_path / "p (1).jpg" == plan_output_name(
            tmp_path, "p.png", ".jpg", collisions="overwrite", reserved=taken.__contains__
        )

    def test_a_name_at_the_length_limit_still_gets_a_free_name(self, tmp_path: Path) -> None:
        """A 255-byte name taken already: ' (1)' does not fit, so the stem is shortened, not the photo failed."""
        long = "é" * 125 + "a.jpg"  # 255 bytes, multi-byte characters where it is cut
        assert len(long.encode()) == 255
        (tmp_path / long).write_bytes(b"first")
        names = set()
        for _ in range(3):
            result = plan_output_name(tmp_path, long, ".jpg", collisions="suffix")
            write_atomic(result, b"next", root=tmp_path)
            names.add(result.name)
        assert len(names) == 3 and all(n.endswith(".jpg") and len(n.encode()) <= 255 for n in names)
        assert (tmp_path / long).read_bytes() == b"first"

    def test_a_longer_extension_still_fits(self, tmp_path: Path) -> None:
        name = "x" * 251 + ".jpg"
        result = plan_output_name(tmp_path, name, ".webp", collisions="suffix")
        assert result.suffix == ".webp" and len(result.name.encode()) <= 255
        write_atomic(result, b"ok", root=tmp_path)

    @pytest.mark.parametrize("bad", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "", "a/\0.jpg"])
    def test_rejects_escaping_relpaths(self, tmp_path: Path, bad: str) -> None:
        """Relative paths with '..', absolute paths, empty names and NUL bytes are refused."""
        with pytest.raises(UnsafePath):
            plan_output_name(tmp_path, bad, ".jpg", collisions="suffix")

    def test_symlinked_subfolder_is_refused(self, tmp_path: Path) -> None:
        """A result is never planned through a symlink below the output folder."""
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "sub").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(UnsafePath):
            plan_output_name(tmp_path / "out", "sub/a.png", ".jpg", collisions="suffix")

    def test_missing_output_root_is_share_unavailable(self, tmp_path: Path) -> None:
        """Planning into a vanished output folder reports the share as unavailable, creating nothing."""
        with pytest.raises(ShareUnavailable):
            plan_output_name(tmp_path / "gone", "a.png", ".jpg", collisions="suffix")
        assert not (tmp_path / "gone").exists()


class TestResultAndBackupNames:
    """A result and the backup of its original share their number, so one is found from the other by name."""

    @pytest.fixture
    def dirs(self, tmp_path: Path) -> tuple[Path, Path]:
        out, backup = tmp_path / "out", tmp_path / "backup"
        out.mkdir()
        backup.mkdir()
        return out, backup

    def test_a_name_taken_in_either_folder_moves_both_on(self, dirs: tuple[Path, Path]) -> None:
        out, backup = dirs
        (out / "p.jpg").write_bytes(b"a result of another photo")
        (backup / "p (1).png").write_bytes(b"an earlier original")
        assert plan_result_and_backup(out, backup, "p.png", ".jpg") == (out / "p (2).jpg", backup / "p (2).png")

    def test_a_name_reserved_for_another_job_moves_both_on(self, dirs: tuple[Path, Path]) -> None:
        out, backup = dirs
        reserved = {backup / "p.jpg"}
        assert plan_result_and_backup(out, backup, "p.jpg", ".jpg", reserved=reserved.__contains__) == (
            out / "p (1).jpg", backup / "p (1).jpg")

    def test_overwrite_replaces_the_result_but_never_a_backup(self, dirs: tuple[Path, Path]) -> None:
        out, backup = dirs
        (out / "p.jpg").write_bytes(b"this source's earlier result")
        (backup / "p.jpg").write_bytes(b"the earlier original, perhaps its only copy")
        assert plan_result_and_backup(out, backup, "p.jpg", ".jpg", collisions="overwrite") == (
            out / "p.jpg", backup / "p (1).jpg")


class TestOddNames:
    @pytest.mark.parametrize("name", ODD_NAMES)
    def test_full_publish_flow(self, tmp_path: Path, name: str) -> None:
        """Spaces, Unicode, newlines, quotes and leading dashes survive plan, write, backup and delete."""
        hot, out, backup = tmp_path / "in", tmp_path / "out", tmp_path / "backup"
        for d in (hot, out, backup):
            d.mkdir()
        rel = f"-sub dir/{name}"
        src = hot / rel
        src.parent.mkdir()
        src.write_bytes(b"original")
        result = plan_output_name(out, rel, ".png", collisions="suffix")
        write_atomic(result, b"restored", root=out)
        copy_verified(src, backup / rel, sha(b"original"), root=backup)
        dispose_source(src, after="delete")
        assert (out / rel).read_bytes() == b"restored"
        assert (backup / rel).read_bytes() == b"original"
        assert not src.exists()

    @settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1,
                        max_size=40).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200))
    def test_any_file_name_round_trips(self, tmp_path: Path, name: str) -> None:
        """Any single file name a POSIX filesystem accepts is written under exactly that name."""
        folder = tmp_path / "names"
        folder.mkdir(exist_ok=True)
        write_atomic(folder / name, b"ok", root=folder)
        assert (folder / name).read_bytes() == b"ok"
        assert temps(folder) == []
        (folder / name).unlink()


class TestDisposeSource:
    def test_delete_keep_move(self, tmp_path: Path) -> None:
        """delete removes the original (twice is fine), keep leaves it, move never overwrites in done."""
        a, b, c = (tmp_path / n for n in ("a.jpg", "b.jpg", "c.jpg"))
        for p in (a, b, c):
            p.write_bytes(p.name.encode())
        assert dispose_source(a, after="delete") is None
        assert dispose_source(a, after="delete") is None
        assert not a.exists()
        assert b == dispose_source(b, after="keep")
        assert b.exists()
        done = tmp_path / "done"
        done.mkdir()
        (done / "c.jpg").write_bytes(b"earlier")
        moved = dispose_source(c, after="move", done_path=done / "c.jpg", done_root=done)
        assert done / "c (1).jpg" == moved
        assert moved.read_bytes() == b"c.jpg"
        assert (done / "c.jpg").read_bytes() == b"earlier"
        assert not c.exists()


    def test_a_replaced_original_is_left_and_the_same_bytes_reported_oddly_are_not(self, tmp_path: Path) -> None:
        """The original is disposed of only if it is still the file that was backed up: a new file under the name is
        left (SourceChanged); the same bytes under another inode or time (as NFS and FUSE may report) are not."""
        src, other = tmp_path / "a.jpg", tmp_path / "b.jpg"
        src.write_bytes(b"first version")
        backed_up = os.stat(src)
        src.unlink()
        src.write_bytes(b"second versio")  # same size, new file
        with pytest.raises(SourceChanged):
            dispose_source(src, after="delete", expect=backed_up, sha256=sha(b"first version"))
        assert src.read_bytes() == b"second versio"
        other.write_bytes(b"first version")
        src.unlink()
        other.rename(src)  # the same bytes, but another inode
        assert dispose_source(src, after="delete", expect=backed_up, sha256=sha(b"first version")) is None
        assert not src.exists()


    def test_with_only_the_checked_hash_a_file_saved_since_under_the_name_is_left(self, tmp_path: Path) -> None:
        """A skipped duplicate is removed only if the name still holds the bytes that were found identical: a
        photo saved under its name since is left for the next scan, not deleted without a backup."""
        src = tmp_path / "dup.jpg"
        src.write_bytes(b"new photo")
        with pytest.raises(SourceChanged):
            dispose_source(src, after="delete", sha256=sha(b"the duplicate"))
        assert src.read_bytes() == b"new photo"
        assert dispose_source(src, after="delete", sha256=sha(b"new photo")) is None
        assert not src.exists()


class TestWriteFailure:
    def info(self) -> FailureInfo:
        return FailureInfo(stage="decode", error="cannot identify image file", attempts=3, preset="fast",
                           folder="/srv/in/fast", relpath="sub/bad photo.jpg", sha256=sha(b"junk"),
                           time=datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC))

    def test_original_moved_with_sidecar(self, tmp_path: Path) -> None:
        """The original lands at its relative path in failed/ with NAME.error.json describing why."""
        src = tmp_path / "in" / "sub" / "bad photo.jpg"
        src.parent.mkdir(parents=True)
        src.write_bytes(b"junk")
        failed = tmp_path / "failed"
        failed.mkdir()
        stored = write_failure(failed, "sub/bad photo.jpg", src, None, self.info())
        assert failed / "sub" / "bad photo.jpg" == stored
        assert stored.read_bytes() == b"junk"
        assert not src.exists()
        sidecar = json.loads((failed / "sub" / "bad photo.jpg.error.json").read_text())
        versions = sidecar.pop("versions")
        assert sidecar == {"stage": "decode", "error": "cannot identify image file", "attempts": 3,
                           "time": "2024-05-01T12:00:00Z", "preset": "fast", "folder": "/srv/in/fast",
                           "relpath": "sub/bad photo.jpg", "sha256": sha(b"junk"), "writer": None}
        assert set(versions) == {"gpen-watch", "torch", "python"}

    def test_second_failure_does_not_overwrite_first(self, tmp_path: Path) -> None:
        """A file that fails again under the same name is stored beside the first, each with its sidecar."""
        failed = tmp_path / "failed"
        failed.mkdir()
        first = write_failure(failed, "x.jpg", None, b"one", self.info())
        second = write_failure(failed, "x.jpg", None, b"two", self.info())
        assert (failed / "x.jpg", failed / "x (1).jpg") == (first, second)
        assert (first.read_bytes(), second.read_bytes()) == (b"one", b"two")
        assert (failed / "x (1).jpg.error.json").is_file()

    def test_across_filesystems_copies_then_removes(self, tmp_path: Path) -> None:
        """When failed/ is on another filesystem the original is copied (bytes, mtime), then removed."""
        shm = Path("/dev/shm")
        if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("needs /dev/shm on a filesystem other than the temp folder")
        src = tmp_path / "p.jpg"
        src.write_bytes(b"payload")
        os.utime(src, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
        failed = shm / f"gpen-watch-test-{os.getpid()}"
        failed.mkdir()
        try:
            stored = write_failure(failed, "p.jpg", src, None, self.info())
            assert stored.read_bytes() == b"payload"
            assert stored.stat().st_mtime_ns == 1_000_000_000_000_000_000
            assert not src.exists()
            assert temps(failed) == []
        finally:
            for p in sorted(failed.rglob("*"), reverse=True):
                p.unlink()
            failed.rmdir()

    def test_sidecar_is_there_before_the_original(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Whoever sees a file in failed/ also finds its reason: the sidecar is written before the move."""
        src = tmp_path / "in" / "p.jpg"
        src.parent.mkdir()
        src.write_bytes(b"junk")
        failed = tmp_path / "failed"
        failed.mkdir()
        seen: list[bool] = []
        rename = os.rename

        def watching_rename(a, b, **kw):
            seen.append((failed / "p.jpg.error.json").is_file())
            return rename(a, b, **kw)

        monkeypatch.setattr(os, "rename", watching_rename)
        write_failure(failed, "p.jpg", src, None, self.info())
        assert [True] == seen
        assert (failed / "p.jpg").read_bytes() == b"junk"

    def test_an_original_its_folder_will_not_give_up_is_copied_with_its_reason(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A hot folder that refuses the move and the removal (read-only, not the service's): failed/ holds a copy
        and its sidecar all the same, OriginalKept says so, and the original is untouched."""
        src = tmp_path / "in" / "p.jpg"
        src.parent.mkdir()
        src.write_bytes(b"junk")
        failed = tmp_path / "failed"
        failed.mkdir()
        real_unlink = os.unlink

        def rename(*args: object, **kw: object) -> None:
            raise OSError(errno.EROFS, "Read-only file system")

        def unlink(name: str, **kw: object) -> None:
            if name == "p.jpg":  # the original, in its folder
                raise OSError(errno.EROFS, "Read-only file system")
            real_unlink(name, **kw)

        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "unlink", unlink)
        with pytest.raises(OriginalKept) as info:
            write_failure(failed, "p.jpg", src, None, self.info(), src_root=src.parent)
        assert info.value.errno == errno.EROFS and info.value.stored == failed / "p.jpg"
        assert (failed / "p.jpg").read_bytes() == b"junk" and src.read_bytes() == b"junk"
        assert json.loads((failed / "p.jpg.error.json").read_text())["stage"] == "decode"
        assert temps(failed) == []

    def test_source_vanished_leaves_no_orphan_sidecar(self, tmp_path: Path) -> None:
        """If the original is gone before it can be moved, no reason is left behind without a file."""
        failed = tmp_path / "failed"
        failed.mkdir()
        with pytest.raises(FileNotFoundError):
            write_failure(failed, "p.jpg", tmp_path / "gone.jpg", None, self.info())
        assert [] == list(failed.iterdir())

    def test_full_disk_while_storing_bytes_leaves_no_orphan_sidecar(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A failure that cannot be stored (disk full) leaves neither a partial file nor a lone reason."""
        write_all = publish._write_all
        written: list[bytes] = []

        def full(fd: int, data: bytes) -> None:
            if data == b"payload":  # the sidecar goes through; the original does not fit
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(bytes(data))
            write_all(fd, data)

        failed = tmp_path / "failed"
        failed.mkdir()
        monkeypatch.setattr(publish, "_write_all", full)
        with pytest.raises(OSError):
            write_failure(failed, "p.jpg", None, b"payload", self.info())
        assert len(written) == 1 and b'"stage"' in written[0]  # the sidecar was written, then taken back
        assert [] == list(failed.iterdir())

    def test_missing_failed_root_is_transient_and_keeps_source(self, tmp_path: Path) -> None:
        """If the failed folder's share is gone the original stays put and the error is transient."""
        src = tmp_path / "p.jpg"
        src.write_bytes(b"payload")
        with pytest.raises(ShareUnavailable):
            write_failure(tmp_path / "nope", "p.jpg", src, None, self.info())
        assert src.exists()
        assert not (tmp_path / "nope").exists()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class TestCleanupTempFiles:
    def test_removes_leftovers_of_dead_writers(self, tmp_path: Path) -> None:
        """Temps of a crashed process on this host go; user files and symlinked folders are not touched."""
        gone = dead_pid()
        ours = [tmp_path / f".gpen-watch.{host_tag()}.{gone}.0123abcd.tmp",
                tmp_path / "d" / f".gpen-watch.{host_tag()}.{gone}.fedc9876.tmp"]
        theirs = [tmp_path / "photo.tmp", tmp_path / ".gpen-watch.notes.tmp", tmp_path / "d" / "x.jpg"]
        (tmp_path / "d").mkdir()
        for p in ours + theirs:
            p.write_bytes(b"x")
        outside = tmp_path.parent / f"{tmp_path.name}-outside"
        outside.mkdir()
        foreign = outside / f".gpen-watch.{host_tag()}.{gone}.aaaaaaaa.tmp"
        foreign.write_bytes(b"x")
        (tmp_path / "link").symlink_to(outside)
        try:
            assert cleanup_temp_files([tmp_path, tmp_path / "missing"]) == 2
            assert [p.exists() for p in ours] == [False, False]
            assert [p.exists() for p in theirs] == [True, True, True]
            assert foreign.exists()
        finally:
            foreign.unlink()
            outside.rmdir()

    def test_live_writers_and_other_hosts_are_left_alone(self, tmp_path: Path) -> None:
        """A temp being written now (live pid here, fresh from another host) survives; old ones go."""
        live = tmp_path / f".gpen-watch.{host_tag()}.{os.getpid()}.0123abcd.tmp"
        other_host = "00000000" if host_tag() != "00000000" else "11111111"
        remote = tmp_path / f".gpen-watch.{other_host}.{dead_pid()}.0123abcd.tmp"
        for p in (live, remote):
            p.write_bytes(b"x")
        assert cleanup_temp_files([tmp_path], min_age=3600) == 0
        assert live.exists() and remote.exists()
        assert cleanup_temp_files([tmp_path], min_age=0) == 2

    def test_write_atomic_temp_names_are_recognised(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The temp name write_atomic uses is the one cleanup looks for (pattern drift would leave litter)."""
        renamed: list[str] = []
        real_replace = os.replace

        def spy_replace(src: str, dst: str, **kw: int) -> None:
            renamed.append(src)
            real_replace(src, dst, **kw)

        monkeypatch.setattr(os, "replace", spy_replace)
        write_atomic(tmp_path / "a.jpg", b"x", root=tmp_path)
        monkeypatch.undo()
        [temp_name] = renamed
        assert TEMP_PATTERN.match(temp_name)
        assert (tmp_path / "a.jpg").read_bytes() == b"x"


class TestClassifyOsError:
    @pytest.mark.parametrize(
        ("code", "side", "expected"),
        [
            (errno.ENOSPC, "destination", "transient"),
            (errno.EDQUOT, "destination", "transient"),
            (errno.EIO, "source", "transient"),
            (errno.ESTALE, "source", "transient"),
            (errno.ENOTCONN, "destination", "transient"),
            (errno.EHOSTDOWN, "destination", "transient"),
            (errno.ETIMEDOUT, "source", "transient"),
            (errno.EBUSY, "source", "transient"),
            (errno.EAGAIN, "source", "transient"),
            (errno.EACCES, "source", "permanent"),
            (errno.EACCES, "destination", "transient"),
            (errno.ENOENT, "source", "permanent"),
            (errno.ENAMETOOLONG, "destination", "permanent"),
            (errno.ELOOP, "source", "permanent"),
        ],
    )
    def test_errno_table(self, code: int, side: str, expected: str) -> None:
        """Share, disk and lock errors are retried; unreadable or impossible files fail at once."""
        assert expected == classify_os_error(OSError(code, os.strerror(code)), side=side)  # type: ignore[arg-type]

    def test_non_os_errors(self) -> None:
        """A bare TimeoutError is retried; a ValueError is not an I/O problem and is permanent."""
        assert classify_os_error(TimeoutError()) == "transient"
        assert classify_os_error(ValueError()) == "permanent"


class TestSubfolderSwappedForALink:
    """A job's path is checked when it is queued; by the time the original is copied, moved or deleted a
    user may have swapped a subfolder for a link to somewhere else. Nothing outside the hot folder is touched."""

    @pytest.fixture
    def swapped(self, tmp_path: Path) -> tuple[Path, Path, Path]:
        hot, victim = tmp_path / "in", tmp_path / "elsewhere"
        (hot / "sub").mkdir(parents=True)
        victim.mkdir()
        (hot / "sub" / "photo.jpg").write_bytes(b"the user's photo")
        (victim / "photo.jpg").write_bytes(b"someone else's file")
        source = safe_join(hot, "sub/photo.jpg")  # checked while sub was a real folder
        (hot / "sub").rename(hot / "sub.old")
        (hot / "sub").symlink_to(victim)
        return hot, source, victim / "photo.jpg"

    def test_delete_and_move_refuse(self, tmp_path: Path, swapped: tuple[Path, Path, Path]) -> None:
        hot, source, victim = swapped
        (tmp_path / "done").mkdir()
        with pytest.raises(UnsafePath):
            dispose_source(source, after="delete", src_root=hot)
        with pytest.raises(UnsafePath):
            dispose_source(source, after="move", done_path=tmp_path / "done" / "sub" / "photo.jpg",
                           done_root=tmp_path / "done", src_root=hot)
        assert victim.read_bytes() == b"someone else's file"

    def test_failure_and_backup_refuse(self, tmp_path: Path, swapped: tuple[Path, Path, Path]) -> None:
        hot, source, victim = swapped
        failed, backup = tmp_path / "failed", tmp_path / "backup"
        failed.mkdir()
        backup.mkdir()
        with pytest.raises(UnsafePath):
            write_failure(failed, "sub/photo.jpg", source, None, TestWriteFailure().info(), src_root=hot)
        with pytest.raises(UnsafePath):
            copy_verified(source, backup / "photo.jpg", sha(b"someone else's file"), root=backup, src_root=hot)
        assert victim.read_bytes() == b"someone else's file"
        assert [p for p in (*failed.rglob("*"), *backup.rglob("*")) if not p.is_dir()] == []  # no sidecar either


def _fail_into_shared_folder(root: Path, tag: str, barrier: Any, rounds: int) -> None:
    hot = root / f"hot-{tag}"
    hot.mkdir()
    for r in range(rounds):
        (hot / "IMG_0001.jpg").write_bytes(f"{tag}-{r}".encode())
        barrier.wait()
        info = FailureInfo(stage="decode", error="bad", attempts=1, preset="fast", folder=str(hot),
                           relpath="IMG_0001.jpg", sha256=None)
        write_failure(root / "failed" / f"r{r}", "IMG_0001.jpg", hot / "IMG_0001.jpg", None, info, src_root=hot)


def test_instances_sharing_a_failed_folder_never_replace_each_others_originals(tmp_path: Path) -> None:
    """Two processes (instances for two GPUs) failing a file of the same name into one failed/ at the same moment:
    both originals and both sidecars are kept, under different names."""
    rounds = 40
    for r in range(rounds):
        (tmp_path / "failed" / f"r{r}").mkdir(parents=True)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_fail_into_shared_folder, args=(tmp_path, t, barrier, rounds)) for t in "AB"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    for r in range(rounds):
        stored = {p.name: p.read_bytes() for p in (tmp_path / "failed" / f"r{r}").iterdir()}
        originals = sorted(v for k, v in stored.items() if not k.endswith(".error.json"))
        assert originals == [f"A-{r}".encode(), f"B-{r}".encode()], stored
        assert sum(k.endswith(".error.json") for k in stored) == 2


def test_a_sidecar_left_by_a_crashed_attempt_is_taken_over_not_orphaned(tmp_path: Path) -> None:
    """A crash between writing the sidecar and moving the original: the retry uses that name again."""
    hot, failed = tmp_path / "hot", tmp_path / "failed"
    hot.mkdir()
    failed.mkdir()
    (hot / "x.jpg").write_bytes(b"junk")
    info = FailureInfo(stage="decode", error="bad", attempts=1, preset="fast", folder=str(hot), relpath="x.jpg",
                       sha256=sha(b"junk"))
    (failed / "x.jpg.error.json").write_text(json.dumps(info.as_json()))  # what the crashed attempt left
    assert write_failure(failed, "x.jpg", hot / "x.jpg", None, info, src_root=hot) == failed / "x.jpg"
    assert sorted(p.name for p in failed.iterdir()) == ["x.jpg", "x.jpg.error.json"]


def test_a_sidecar_written_by_another_instance_is_not_taken_back_when_its_move_wins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two instances failing the same file at once (both judge pending rows of a shared table): the second finds
    the first's fresh sidecar, which looks like one of its own crashed attempts, and then loses the race for the
    original. Its clean-up must not delete that sidecar: failed/ keeps the original with its reason."""
    import threading

    hot, failed = tmp_path / "hot", tmp_path / "failed"
    hot.mkdir()
    failed.mkdir()
    (hot / "x.jpg").write_bytes(b"not an image")
    info = FailureInfo(stage="readiness", error="not an image", attempts=0, preset="fast", folder=str(hot),
                       relpath="x.jpg", sha256=None)
    real_write, real_rename = publish.write_atomic, os.rename
    first_moved, second_at_move = threading.Event(), threading.Event()
    second_errors: list[BaseException] = []

    def second_instance() -> None:
        try:
            write_failure(failed, "x.jpg", hot / "x.jpg", None, info, src_root=hot)
        except Exception as exc:  # it logs and retries later; what matters is what failed/ holds
            second_errors.append(exc)

    second = threading.Thread(target=second_instance, name="second")

    def write_atomic(path: Path, data: bytes, **kw: Any) -> Any:
        out = real_write(path, data, **kw)
        if threading.current_thread() is threading.main_thread() and not second.is_alive():
            second.start()  # the first's sidecar is in place: the second picks the same name now
            assert second_at_move.wait(10)
        return out

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        if threading.current_thread() is second and src == "x.jpg":
            second_at_move.set()
            assert first_moved.wait(10)
        real_rename(src, dst, **kw)
        if threading.current_thread() is threading.main_thread() and src == "x.jpg":
            first_moved.set()

    monkeypatch.setattr(publish, "write_atomic", write_atomic)
    monkeypatch.setattr(os, "rename", rename)
    stored = write_failure(failed, "x.jpg", hot / "x.jpg", None, info, src_root=hot)
    second.join(10)
    assert not second.is_alive() and second_errors  # it lost the race for the original
    assert sorted(p.name for p in failed.iterdir()) == ["x.jpg", "x.jpg.error.json"]
    assert stored.read_bytes() == b"not an image"
    assert json.loads((failed / "x.jpg.error.json").read_text())["error"] == "not an image"


def test_our_own_leftover_sidecar_is_taken_back_when_the_original_is_gone(tmp_path: Path) -> None:
    """Our attempt died after the sidecar, and the user removed the original before the retry: the retry takes
    the sidecar back, so failed/ holds no reason without a file. Another instance's is left alone (see above)."""
    hot, failed = tmp_path / "hot", tmp_path / "failed"
    hot.mkdir()
    failed.mkdir()
    info = FailureInfo(stage="decode", error="bad", attempts=1, preset="fast", folder=str(hot), relpath="a.jpg",
                       sha256=sha(b"data"), writer="host/default")
    (failed / "a.jpg.error.json").write_text(json.dumps(info.as_json()))  # what the crashed attempt left
    with pytest.raises(FileNotFoundError):
        write_failure(failed, "a.jpg", hot / "a.jpg", None, info, src_root=hot)
    assert list(failed.iterdir()) == []


def test_recorded_failure_finds_only_this_file_s_own_failure(tmp_path: Path) -> None:
    """After a crash between moving a file into failed/ and writing that down, the failure is found again by its
    sidecar: written by this instance, about this folder, path and content, and not older than the job. Another
    file's, another instance's, an earlier failure of the same name and a planted sidecar are not it."""
    import time

    hot, failed = tmp_path / "hot", tmp_path / "failed"
    hot.mkdir()
    failed.mkdir()

    def failing(name: str, data: bytes, *, writer: str = "me", relpath: str = "photo (3).jpg") -> None:
        (hot / name).write_bytes(data)
        info = FailureInfo(stage="readiness", error=f"bad {name}", attempts=1, preset="fast", folder=str(hot),
                           relpath=relpath, sha256=sha(data), writer=writer)
        write_failure(failed, relpath, hot / name, None, info, src_root=hot)

    def found(since: float, data: bytes = b"ours") -> tuple[str, str] | None:
        return publish.recorded_failure(failed, "photo (3).jpg", folder=str(hot), writer="me", sha256=sha(data),
                                        since=since)

    failing("old", b"ours")  # an earlier drop of the same bytes, failed and recorded long ago
    earlier = time.time()
    (failed / "photo (3).jpg.error.json").write_text(json.dumps(
        json.loads((failed / "photo (3).jpg.error.json").read_text()) | {"time": "2001-01-01T00:00:00Z"}))
    failing("other", b"ours", relpath="photo (3) (1).jpg")  # another file, named like a numbered variant
    failing("theirs", b"ours", writer="another host")
    (failed / "photo (3) (9).jpg").write_bytes(b"x")
    (failed / "photo (3) (9).jpg.error.json").write_text("[" * 100_000 + "]" * 100_000)  # planted
    assert found(earlier) is None
    failing("new", b"ours")  # this job's: moved, then the process died
    assert found(earlier) == ("readiness", "bad new")
    assert found(earlier, b"other bytes") is None
