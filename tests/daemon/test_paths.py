import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.paths import (
    UnsafePath,
    filesystem_type,
    is_candidate,
    mount_of,
    needs_polling,
    open_file,
    open_no_follow,
    read_no_follow,
    safe_join,
)

EXTS = [".jpg", ".jpeg", ".png"]

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /mnt/share rw,relatime - nfs4 server:/export rw,vers=4.2
41 40 0:51 / /mnt/share/fuse rw - fuse.sshfs user@host: rw
42 27 0:52 / /srv/with\\040space rw - cifs //nas/photos rw
"""


class TestIsCandidate:
    @pytest.mark.parametrize("relpath", ["a.jpg", "A.JPG", "sub/b.PnG", "spaces in name.jpeg", "é 写真.jpg"])
    def test_images_are_candidates(self, relpath):
        """Image names in any case, in subfolders, with spaces or Unicode, are candidates."""
        assert is_candidate(relpath, EXTS)

    @pytest.mark.parametrize(
        "relpath",
        [
            ".DS_Store", "._photo.jpg", "Thumbs.db", "desktop.ini", "@eaDir/photo.jpg", "#recycle/photo.jpg",
            ".Trashes/501/photo.jpg", "__MACOSX/photo.jpg", ".nfs000001", "~$photo.jpg", "photo.jpg.tmp",
            "photo.jpg.part", "photo.jpg.crdownload", ".hidden.jpg", "sub/.git/photo.jpg", "notes.txt",
            "photo", "../photo.jpg", "/abs/photo.jpg", "", "a/../b.jpg",
        ],
    )  # fmt: skip
    def test_junk_and_non_images_are_not(self, relpath):
        """System junk, temporary names, dotfiles and dot-directories anywhere, and non-images are ignored."""
        assert not is_candidate(relpath, EXTS)

    def test_extensions_are_configurable(self):
        """Only configured extensions count, given with or without the dot, in any case."""
        assert is_candidate("scan.tif", ["TIF"])
        assert not is_candidate("scan.jpg", ["TIF"])


class TestSafeJoin:
    def test_plain_and_missing_components(self, tmp_path):
        """A relative path joins normally, also where the components do not exist yet (output names)."""
        (tmp_path / "sub").mkdir()
        assert tmp_path / "sub" / "new" / "x.jpg" == safe_join(tmp_path, "sub/new/x.jpg")

    @pytest.mark.parametrize("relpath", ["/etc/passwd", "../x.jpg", "a/../../x.jpg", "a\0b.jpg", "", "."])
    def test_escapes_are_refused(self, tmp_path, relpath):
        """Absolute paths, '..', NUL and empty paths are refused."""
        with pytest.raises(UnsafePath):
            safe_join(tmp_path, relpath)

    def test_symlinked_directory_is_refused(self, tmp_path):
        """A symlinked folder inside the base is never walked through."""
        outside = tmp_path / "outside"
        outside.mkdir()
        base = tmp_path / "base"
        base.mkdir()
        (base / "link").symlink_to(outside, target_is_directory=True)
        with pytest.raises(UnsafePath, match="symbolic link"):
            safe_join(base, "link/x.jpg")

    def test_symlinked_file_is_refused(self, tmp_path):
        """A symlink as the last component is refused as well."""
        (tmp_path / "real.jpg").write_bytes(b"x")
        (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")
        with pytest.raises(UnsafePath):
            safe_join(tmp_path, "link.jpg")


class TestNoFollowReads:
    def test_reads_regular_file(self, tmp_path):
        """The bytes and the status of the descriptor that was read come back."""
        (tmp_path / "a.jpg").write_bytes(b"abc")
        data, st = read_no_follow(tmp_path / "a.jpg")
        assert (data, st.st_size) == (b"abc", 3)
        assert open_no_follow(tmp_path / "a.jpg") == b"abc"

    def test_symlink_is_refused(self, tmp_path):
        """A file swapped for a link to a secret outside the folder is refused, never read."""
        secret = tmp_path / "secret.jpg"
        secret.write_bytes(b"secret")
        (tmp_path / "a.jpg").symlink_to(secret)
        with pytest.raises(UnsafePath, match="symbolic link"):
            open_no_follow(tmp_path / "a.jpg")

    def test_symlinked_parent_is_refused_with_base(self, tmp_path):
        """With a base, a linked directory on the way is refused too (each component opened no-follow)."""
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "a.jpg").write_bytes(b"secret")
        base = tmp_path / "base"
        base.mkdir()
        (base / "sub").symlink_to(outside, target_is_directory=True)
        with pytest.raises(UnsafePath):
            open_no_follow("sub/a.jpg", base=base)
        (base / "real").mkdir()
        (base / "real" / "b.jpg").write_bytes(b"ok")
        assert open_no_follow("real/b.jpg", base=base) == b"ok"

    def test_fifo_is_refused_without_blocking(self, tmp_path):
        """A FIFO named like an image is refused at once instead of hanging the reader."""
        os.mkfifo(tmp_path / "pipe.jpg")
        with pytest.raises(UnsafePath, match="not a regular file"):
            open_no_follow(tmp_path / "pipe.jpg")

    def test_directory_is_refused(self, tmp_path):
        """A directory named like an image is not a file to read."""
        (tmp_path / "dir.jpg").mkdir()
        with pytest.raises(UnsafePath):
            open_file(tmp_path / "dir.jpg")

    def test_size_limit(self, tmp_path):
        """A file above max_bytes is refused before it is read into memory."""
        (tmp_path / "big.jpg").write_bytes(b"x" * 100)
        with pytest.raises(UnsafePath, match="limit"):
            read_no_follow(tmp_path / "big.jpg", max_bytes=10)


    def test_a_generous_limit_costs_nothing_for_a_small_file(self, tmp_path: Path) -> None:
        """The limit guards memory; it must not itself be allocated for every small file read."""
        (tmp_path / "a.jpg").write_bytes(b"tiny")
        data, _ = read_no_follow(tmp_path / "a.jpg", max_bytes=1 << 44)  # 16 TiB
        assert data == b"tiny"


class TestMounts:
    def test_longest_prefix_wins(self):
        """The mount holding a path is the one with the longest matching mount point."""
        assert filesystem_type("/mnt/share/in/fast", MOUNTINFO) == "nfs4"
        assert filesystem_type("/mnt/share/fuse/x", MOUNTINFO) == "fuse.sshfs"
        assert filesystem_type("/mnt/shared", MOUNTINFO) == "ext4"
        assert filesystem_type("/", MOUNTINFO) == "ext4"

    def test_escaped_mount_points(self):
        """Mount points with spaces (written as octal escapes) are understood."""
        mount = mount_of("/srv/with space/in", MOUNTINFO)
        assert mount is not None
        assert (mount.mount_point, mount.fstype) == ("/srv/with space", "cifs")

    def test_real_mount_table(self, tmp_path):
        """On this machine the temporary folder has a known, non-empty filesystem type."""
        assert filesystem_type(tmp_path) not in ("", "unknown")

    @pytest.mark.parametrize("fstype", ["nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "fuse.rclone", "9p"])
    def test_network_filesystems_poll(self, fstype):
        """Shares and FUSE mounts are polled: inotify misses what other machines write there."""
        assert needs_polling(fstype)

    @pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "tmpfs", "zfs"])
    def test_local_filesystems_use_events(self, fstype):
        """Local filesystems use inotify events."""
        assert not needs_polling(fstype)


def test_unescaped_path_is_pathlike(tmp_path):
    """safe_join returns a Path usable with ordinary file functions."""
    assert isinstance(safe_join(tmp_path, "x.jpg"), Path)


_ALPHABET = st.sampled_from(["a", "b", ".", "..", "/", "\\", " ", "\0", "~", "é", "-", "$", "\n"])
_RELPATHS = st.lists(_ALPHABET, max_size=12).map("".join)


@pytest.fixture(scope="module")
def link_trap(tmp_path_factory):
    """A base folder with a subfolder, a file and links pointing outside."""
    root = tmp_path_factory.mktemp("trap")
    base = root / "base"
    (base / "a").mkdir(parents=True)
    (base / "a" / "b").write_bytes(b"inside")
    (root / "outside").mkdir()
    (base / "b").symlink_to(root / "outside", target_is_directory=True)
    (base / "a" / "a").symlink_to(root / "outside" / "secret")
    return base


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(relpath=_RELPATHS)
def test_safe_join_never_escapes(link_trap, relpath):
    """For any relative path, safe_join either refuses it or returns a path that really is inside the base."""
    try:
        joined = safe_join(link_trap, relpath)
    except UnsafePath:
        return
    real = Path(os.path.realpath(joined))
    assert real == link_trap.resolve() or link_trap.resolve() in real.parents


@settings(max_examples=300)
@given(relpath=_RELPATHS)
def test_candidates_are_always_safe_to_join(relpath):
    """Every name is_candidate accepts is also accepted by safe_join (no candidate can escape its folder)."""
    if is_candidate(relpath, [".b", ".a"]):
        safe_join(Path("/nonexistent-base"), relpath)
