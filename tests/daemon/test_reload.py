"""SIGHUP with work queued and in flight: a reload is applied whole or not at all, and strands no file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemon.harness import (
    Daemon,
    Layout,
    account,
    drop,
    face_photo,
    files_under,
    have_shared_data,
    small_face_photo,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.skipif(not have_shared_data(), reason="needs ../shared (detector weights, Solvay photo)")


@contextmanager
def _running(config: Path, env: dict[str, str] | None = None, *, ready: bool = True) -> Iterator[Daemon]:
    """The daemon, ready (unless ``ready=False``); stopped afterwards, and it must stop cleanly."""
    daemon = Daemon(config, env=env or {}).start()
    try:
        if ready:
            wait_for(lambda: "gpen-watch ready" in daemon.log_text(), 90, daemon, "ready")
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


def _reloaded(daemon: Daemon, times: int = 1) -> bool:
    events = [e.get("event") for e in daemon.log_lines()]
    return events.count("configuration reloaded") + sum(
        1 for e in events if isinstance(e, str) and e.startswith("new configuration rejected")) >= times


def test_changing_a_folders_preset_with_work_queued_strands_nothing(tmp_path):
    """Files claimed under the old preset finish with it; the queued ones move to the new one; all publish."""
    config, layout = write_config(tmp_path)
    inputs = {("a", f"p{i}.jpg"): face_photo(i) for i in range(10)}
    # Slow batches, so that some are queued and in flight when the reload lands.
    with _running(config, {"GPEN_WATCH_FAILPOINTS": "generate=sleep:0.7"}) as daemon:
        for (_, name), data in inputs.items():
            (layout.hot["a"] / name).write_bytes(data)
        wait_for(lambda: len(account(layout, inputs, read=False).published) >= 1, 60, daemon, "first publish")
        config.write_text(config.read_text().replace('preset = "test"', 'preset = "test2"'))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: account(layout, inputs).settled == len(inputs), 120, daemon, "every file settled")
        acc = account(layout, inputs)
        assert acc.lost == [] and acc.failed == {} and len(acc.published) == len(inputs)


def test_a_reload_whose_models_cannot_load_changes_nothing(tmp_path):
    """A new preset whose weights are missing: the reload is refused whole; the folder keeps its old preset."""
    config, layout = write_config(tmp_path)
    with _running(config) as daemon:
        text = config.read_text().replace('preset = "test"', 'preset = "broken"')
        text += ('[[models]]\nname = "absent"\npath = "absent.pth"\nsize = 64\nchannel_multiplier = 1\n'
                 'narrow = 0.125\n[presets.broken]\nbase = "test"\nmodel = "absent"\n')
        config.write_text(text)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon), 60, daemon, "reload handled")
        assert "new configuration rejected: its models could not be loaded" in daemon.log_text()
        inputs = {("a", "after.jpg"): face_photo(3)}
        (layout.hot["a"] / "after.jpg").write_bytes(inputs[("a", "after.jpg")])
        wait_for(lambda: account(layout, inputs).published, 60, daemon, "published with the running preset")


def test_a_rejected_reload_stays_visible_in_status_until_a_good_one(tmp_path, capsys):
    """The journal says a reload was rejected once; `gpen-watch status` keeps saying it (the old configuration
    still runs) until a reload succeeds. A preset that looks like a typo is shown there too."""
    from daemon.cli import main

    config, _ = write_config(tmp_path)
    good = config.read_text()

    def status_text() -> str:
        main(["status", "--config", str(config)])
        return capsys.readouterr().out

    with _running(config) as daemon:
        config.write_text(good + "this is not TOML\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon), 60, daemon, "reload handled")
        wait_for(lambda: "config: last reload rejected" in status_text(), 10, daemon, "status says so")
        config.write_text(good + "[presets.tset]\nbatch_size = 2\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon, 2), 60, daemon, "second reload handled")
        wait_for(lambda: "last reload rejected" not in status_text(), 10, daemon, "status forgets the rejection")
        assert "config: presets.tset is a new preset" in status_text()


def test_a_reload_that_moves_or_adds_folders_applies_them_like_a_start(tmp_path):
    """An output moved inside the hot folder is excluded from watching at once (no result of a result). A new
    folder's missing output/backup/failed folders are not made (they may be an unmounted share's): its files
    wait, and are published once the folders are there."""
    config, layout = write_config(tmp_path)
    with _running(config) as daemon:
        results = layout.hot["a"] / "results"
        results.mkdir()
        new = {kind: tmp_path / kind / "c" for kind in ("in", "out", "backup", "failed")}
        new["in"].mkdir(parents=True)
        text = config.read_text().replace(f'output = "{layout.out["a"]}"', f'output = "{results}"')
        text += "\n".join([
            "[[folders]]", f'path = "{new["in"]}"', 'preset = "test"', f'output = "{new["out"]}"',
            f'backup = "{new["backup"]}"', f'failed = "{new["failed"]}"', 'watch = "poll"', "stability_delay = 0.3",
        ]) + "\n"
        config.write_text(text)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon), 60, daemon, "reloaded")
        (layout.hot["a"] / "x.jpg").write_bytes(face_photo(1))
        (new["in"] / "c0.jpg").write_bytes(face_photo(2))
        wait_for(lambda: (results / "x.jpg").is_file(), 60, daemon, "published in the moved output")
        wait_for(lambda: "configured folder does not exist" in daemon.log_text(), 10, daemon, "missing folders named")
        assert not any(new[kind].exists() for kind in ("out", "backup", "failed"))
        assert (new["in"] / "c0.jpg").is_file()
        for kind in ("out", "backup", "failed"):
            new[kind].mkdir(parents=True)
        wait_for(lambda: (new["out"] / "c0.jpg").is_file(), 60, daemon, "published once its folders exist")
        time.sleep(3.0)  # several rescans: a result inside the hot folder must not become new work
        assert [p.relative_to(results).as_posix() for p in files_under(results)] == ["x.jpg"]


def test_a_sighup_during_start_up_is_a_reload_not_death(tmp_path):
    config, _ = write_config(tmp_path)
    with _running(config, ready=False) as daemon:
        time.sleep(0.3)  # still importing torch and reading the config
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "gpen-watch ready" in daemon.log_text(), 90, daemon, "ready despite the early SIGHUP")
        wait_for(lambda: _reloaded(daemon), 30, daemon, "the early SIGHUP handled as a reload")
        assert daemon.running()


def test_a_reload_that_adds_an_extension_or_slows_the_gate_applies_to_running_folders(tmp_path):
    """Settings every watcher and gate was built with (extensions, stability_delay) take effect on reload, not only
    after a restart, as "configuration reloaded" says."""
    config, layout = write_config(tmp_path, extra='extensions = [".jpg"]')
    with _running(config) as daemon:
        (layout.hot["a"] / "first.jpg").write_bytes(face_photo(0))  # the folder's watcher and gate are at work
        wait_for(lambda: (layout.out["a"] / "first.jpg").exists(), 60, daemon, "the first JPEG published")
        config.write_text(config.read_text().replace('extensions = [".jpg"]', 'extensions = [".jpg", ".png"]'))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon), 60, daemon, "first reload handled")
        (layout.hot["a"] / "p.png").write_bytes(face_photo(1, "PNG"))
        wait_for(lambda: (layout.out["a"] / "p.png").exists(), 30, daemon, "the PNG published")
        config.write_text(config.read_text().replace("stability_delay = 0.3", "stability_delay = 6"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon, 2), 60, daemon, "second reload handled")
        started = time.monotonic()
        (layout.hot["a"] / "late.jpg").write_bytes(face_photo(2))
        wait_for(lambda: (layout.out["a"] / "late.jpg").exists(), 60, daemon, "the last JPEG published")
        assert time.monotonic() - started >= 6  # the new, longer quiet time was waited for


# ----------------------------------------------------------------- mounts changed, then SIGHUP
# Real mounts (a tmpfs stands for the share): root only. The share is unmounted lazily (umount -l), as a
# stuck NFS share would be, so the daemon's open folders do not block it.


def _mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(*paths: Path) -> None:
    for path in paths:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _count(daemon: Daemon, text: str) -> int:
    return daemon.log_text().count(text)


@contextmanager
def _share_lost(tmp_path: Path, folder: str) -> Iterator[tuple[Path, Layout, Daemon]]:
    """A running daemon whose ``folder`` "a" ("hot" or "out") is a share (a tmpfs) that took part in one result and
    was then unmounted."""
    config, layout = write_config(tmp_path)
    share = getattr(layout, folder)["a"]
    if not _mount_tmpfs(share):
        pytest.skip("cannot mount a tmpfs here")
    try:
        with _running(config) as daemon:
            drop(layout.hot["a"] / "one.jpg", small_face_photo(1))
            wait_for(lambda: (layout.out["a"] / "one.jpg").exists(), 60, daemon, "the first result")
            _umount(share)
            yield config, layout, daemon
    finally:
        _umount(share.parent, share)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_reload_takes_an_output_share_mounted_one_level_higher_but_not_an_unmounted_one(tmp_path):
    """An unmounted share's empty mount point is not taken for the folder on SIGHUP (results keep waiting, the
    local disk stays empty); the same share mounted one level higher is, and the waiting result is published."""
    with _share_lost(tmp_path, "out") as (_, layout, daemon):
        share = layout.out["a"]
        drop(layout.hot["a"] / "two.jpg", small_face_photo(2))
        wait_for(lambda: "is no longer mounted" in daemon.log_text(), 60, daemon, "a retry naming the lost share")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon), 60, daemon, "the reload with the share unmounted")
        assert "still looks unmounted" in daemon.log_text()
        retries = _count(daemon, "is no longer mounted")
        wait_for(lambda: _count(daemon, "is no longer mounted") > retries, 30, daemon, "still retried after it")
        assert files_under(share) == []  # the local mount point
        assert (layout.hot["a"] / "two.jpg").exists()

        assert _mount_tmpfs(share.parent)  # the administrator mounts the share one level higher
        share.mkdir()
        retries = _count(daemon, "is no longer mounted")
        wait_for(lambda: _count(daemon, "is no longer mounted") > retries, 30, daemon, "waiting until SIGHUP")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon, 2), 60, daemon, "the reload with the share one level higher")
        wait_for(lambda: (share / "two.jpg").exists() and not (layout.hot["a"] / "two.jpg").exists(), 60,
                 daemon, "the waiting result published on the share")
        assert "taken on reload" in daemon.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_share_mounted_on_an_output_then_sighup_is_guarded_against_its_unmount(tmp_path):
    """A share mounted onto a plain output folder after start is recorded on SIGHUP: once it is unmounted, results
    wait for it instead of landing on the local disk under its mount point."""
    config, layout = write_config(tmp_path)
    share = layout.out["a"]
    try:
        with _running(config) as daemon:
            if not _mount_tmpfs(share):
                pytest.skip("cannot mount a tmpfs here")
            daemon.signal(signal.SIGHUP)
            wait_for(lambda: _reloaded(daemon), 60, daemon, "the reload with the new share")
            assert "taken on reload" in daemon.log_text()
            drop(layout.hot["a"] / "one.jpg", small_face_photo(1))
            wait_for(lambda: (share / "one.jpg").exists(), 60, daemon, "the first result on the share")
            _umount(share)
            drop(layout.hot["a"] / "two.jpg", small_face_photo(2))
            wait_for(lambda: "is no longer mounted" in daemon.log_text(), 30, daemon, "a retry naming the lost share")
            assert files_under(share) == []
            assert (layout.hot["a"] / "two.jpg").exists()
    finally:
        _umount(share)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_reload_resumes_a_hot_folder_whose_share_was_mounted_one_level_higher(tmp_path):
    """The hot folder's watcher pauses when its share seems unmounted; SIGHUP after the share was mounted one level
    higher resumes it, and the file waiting there is processed."""
    with _share_lost(tmp_path, "hot") as (_, layout, daemon):
        hot = layout.hot["a"]
        assert _mount_tmpfs(hot.parent)
        drop(hot / "two.jpg", small_face_photo(2))
        wait_for(lambda: "hot folder paused" in daemon.log_text(), 30, daemon, "the folder paused")
        time.sleep(2)
        assert not (layout.out["a"] / "two.jpg").exists()  # without a reload it stays paused
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon), 60, daemon, "the reload")
        wait_for(lambda: (layout.out["a"] / "two.jpg").exists(), 60, daemon, "the waiting file processed")
        assert "hot folder resumed" in daemon.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_reload_that_rebuilds_a_paused_folders_watcher_resumes_it_once_its_share_is_back(tmp_path):
    """A hot folder paused because its share went away, edited (new preset) and reloaded while the share is still
    gone: it stays paused (its empty mount point is not taken for the share), and resumes when the share is back."""
    with _share_lost(tmp_path, "hot") as (config, layout, daemon):
        hot = layout.hot["a"]
        wait_for(lambda: _count(daemon, "hot folder paused") == 1, 30, daemon, "paused")
        config.write_text(config.read_text().replace('preset = "test"', 'preset = "test2"'))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon), 60, daemon, "reload")
        wait_for(lambda: _count(daemon, "hot folder paused") == 2, 30, daemon, "paused again by the new watcher")
        assert _mount_tmpfs(hot)  # the share is back where it was
        drop(hot / "two.jpg", small_face_photo(2))
        wait_for(lambda: (layout.out["a"] / "two.jpg").exists(), 60, daemon, "two.jpg after the share returned")
        assert _count(daemon, "hot folder resumed") >= 1


def test_a_reload_applies_max_pixels_everywhere_and_names_what_waits_for_a_restart(tmp_path):
    """max_pixels raised by a reload is the gate's limit too (a photo above the old one is published), and a
    changed setting that only a restart applies (log_level) is named in the log instead of silently kept."""
    config, layout = write_config(tmp_path, extra="max_pixels = 1000")
    with _running(config) as daemon:
        raised = 'max_pixels = 100000000\nlog_level = "debug"'
        config.write_text(config.read_text().replace("max_pixels = 1000", raised))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon), 60, daemon, "reload handled")
        [changed] = [e for e in daemon.log_lines() if str(e.get("event", "")).startswith("settings that take effect")]
        assert changed["settings"] == ["log_level"]
        inputs = {("a", "big.jpg"): face_photo(4)}
        drop(layout.hot["a"] / "big.jpg", inputs[("a", "big.jpg")])
        wait_for(lambda: account(layout, inputs).published, 60, daemon, "published under the new limit")


def test_a_removed_hot_folder_leaves_its_unprocessed_files_untouched_and_uncounted(tmp_path):
    """Files still queued when their hot folder leaves the config stay where they are, and neither the job
    table nor `gpen-watch status` counts them as work any more (it used to show them as ready for good)."""
    config, layout = write_config(tmp_path, folders=(("a", "test"), ("b", "test2")))
    inputs = {("b", f"q{i}.jpg"): face_photo(i) for i in range(24)}
    with _running(config, {"GPEN_WATCH_FAILPOINTS": "generate=sleep:1.0"}) as daemon:
        for (_, name), data in inputs.items():
            drop(layout.hot["b"] / name, data)
        wait_for(lambda: len(account(layout, inputs, read=False).published) >= 1, 60, daemon, "first publish")
        text = config.read_text()
        config.write_text(text[: text.index(f'[[folders]]\npath = "{layout.hot["b"]}"')])
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(daemon), 60, daemon, "reloaded")
        [removed] = [e for e in daemon.log_lines() if str(e.get("event", "")).startswith("hot folder removed")]
        wait_for(lambda: not [j for s in ("pending", "ready", "retry", "processing") for j in _rows(tmp_path, s)],
                 30, daemon, "no unfinished rows left")
        acc = account(layout, inputs)
        left = {f"b/{p.name}" for p in files_under(layout.hot["b"])}
        assert acc.failed == {} and acc.duplicated == [] and acc.bad_backup == []
        assert left and sorted(acc.lost) == sorted(left)  # not published: still in the hot folder, as they came
        assert all((layout.hot["b"] / k[2:]).read_bytes() == inputs[("b", k[2:])] for k in left)
        assert removed["files"] >= 1
    report = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(config), "--json"],
                            capture_output=True, text=True)
    assert json.loads(report.stdout)["queue_depths"] == {}


def _rows(root: Path, state: str) -> list[object]:
    from daemon.jobs import JobTable

    with JobTable.open(root / "state" / "jobs.sqlite3") as table:
        return list(table.in_state(state))
