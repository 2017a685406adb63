"""SIGHUP with work queued and in flight: a reload is applied whole or not at all, and strands no file."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemon.harness import Daemon, account, face_photo, files_under, have_shared_data, wait_for, write_config

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


def test_a_reload_that_moves_or_adds_folders_applies_them_like_a_start(tmp_path):
    """An output moved inside the hot folder is excluded from watching at once (no result of a result), and a
    new folder's output/backup/failed folders are created as at start-up."""
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
        wait_for(lambda: (results / "x.jpg").is_file() and (new["out"] / "c0.jpg").is_file(), 60, daemon,
                 "both published")
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
