"""Reload and stop behaviour of the real daemon process (issue 5, items 2 and 3)."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from daemon.jobs import JobTable
from tests.daemon.harness import Daemon, account, face_photo, have_shared_data, wait_for, write_config

pytestmark = pytest.mark.skipif(not have_shared_data(), reason="needs ../shared (detector weights, Solvay photo)")


def _count(daemon: Daemon, event: str) -> int:
    return sum(1 for e in daemon.log_lines() if e.get("event") == event)


def test_reload_adds_a_folder_and_changes_a_preset_without_reloading_models(tmp_path):
    """SIGHUP applies a new folder and a changed preset; models whose file, device and precision are unchanged stay."""
    config, layout = write_config(tmp_path)
    daemon = Daemon(config).start()
    try:
        wait_for(lambda: "gpen-watch ready" in daemon.log_text(), 90, daemon, "ready")
        assert 1 == _count(daemon, "loading models")

        new_hot = tmp_path / "in" / "b"
        text = config.read_text().replace("sharpen = 30", "sharpen = 10")
        text += "\n".join([
            "[[folders]]",
            f'path = "{new_hot}"',
            'preset = "test2"',
            f'output = "{tmp_path / "out" / "b"}"',
            f'backup = "{tmp_path / "backup" / "b"}"',
            f'failed = "{tmp_path / "failed" / "b"}"',
            'watch = "poll"',
            "stability_delay = 0.3",
        ]) + "\n"
        for d in ("in", "out", "backup", "failed"):
            (tmp_path / d / "b").mkdir(parents=True, exist_ok=True)
        config.write_text(text)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in daemon.log_text(), 60, daemon, "reloaded")
        assert 1 == _count(daemon, "loading models"), "an unchanged model was loaded again"

        layout.hot["b"], layout.out["b"] = new_hot, tmp_path / "out" / "b"
        layout.backup["b"], layout.failed["b"] = tmp_path / "backup" / "b", tmp_path / "failed" / "b"
        inputs = {("a", "one.jpg"): face_photo(1), ("b", "two.jpg"): face_photo(2)}
        for (folder, rel), data in inputs.items():
            (layout.hot[folder] / rel).write_bytes(data)
        wait_for(lambda: account(layout, inputs).settled == 2, 90, daemon, "both folders served")
        acc = account(layout, inputs)
        assert [] == acc.lost and {} == acc.failed
    finally:
        assert 0 == daemon.stop()


def test_sigterm_finishes_the_batch_in_flight_and_exits_zero(tmp_path):
    """SIGTERM during a slow batch lets that batch publish, then exits 0; files not started wait for the next run."""
    config, layout = write_config(tmp_path)
    # Every generator call takes 3 s, so the stop arrives while a batch is on the device.
    daemon = Daemon(config, env={"GPEN_WATCH_FAILPOINTS": "generate=sleep:3"}).start()
    try:
        wait_for(lambda: "gpen-watch ready" in daemon.log_text(), 90, daemon, "ready")
        first = {("a", "first.jpg"): face_photo(1)}
        (layout.hot["a"] / "first.jpg").write_bytes(first[("a", "first.jpg")])
        time.sleep(2.0)  # ready after the stability delay, claimed, now in the slow generator call
        daemon.signal(signal.SIGTERM)
        assert 0 == daemon.wait(60), daemon.log_text()[-3000:]
    finally:
        if daemon.running():
            daemon.kill()
    acc = account(layout, first)
    assert ["a/first.jpg"] == list(acc.published), daemon.log_text()[-3000:]

    # What arrives while stopped is picked up by the next start.
    later = {("a", "later.jpg"): face_photo(2)}
    (layout.hot["a"] / "later.jpg").write_bytes(later[("a", "later.jpg")])
    again = Daemon(config).start()
    try:
        wait_for(lambda: account(layout, later).settled == 1, 90, again, "picked up after restart")
    finally:
        assert 0 == again.stop()


def test_a_second_ctrl_c_exits_at_once_and_says_so(tmp_path):
    """SIGINT twice during a slow batch: the process ends at once (exit 1), with a line saying why and what happens
    to the work in flight, which the next start redoes and publishes once."""
    config, layout = write_config(tmp_path)
    daemon = Daemon(config, env={"GPEN_WATCH_FAILPOINTS": "generate=sleep:3*1"}).start()
    inputs = {("a", "slow.jpg"): face_photo(1)}
    try:
        wait_for(lambda: "gpen-watch ready" in daemon.log_text(), 90, daemon, "ready")
        (layout.hot["a"] / "slow.jpg").write_bytes(inputs[("a", "slow.jpg")])
        time.sleep(2.0)  # in the slow generator call
        daemon.signal(signal.SIGINT)
        time.sleep(0.2)
        daemon.signal(signal.SIGINT)
        assert 1 == daemon.wait(30)
    finally:
        if daemon.running():
            daemon.kill()
    [forced] = [e for e in daemon.log_lines() if str(e.get("event", "")).startswith("second stop signal")]
    assert forced["signal"] == "SIGINT" and "redone at the next start" in forced["event"]
    again = Daemon(config).start()
    try:
        wait_for(lambda: account(layout, inputs).settled == 1, 90, again, "redone after the restart")
        assert account(layout, inputs).duplicated == []
    finally:
        assert 0 == again.stop()


def test_work_in_flight_of_a_killed_instance_is_taken_over_by_another(tmp_path):
    """gpen-watch@1 is killed (-9) with files in flight and not started again: another instance takes its work
    over (at its start, and every half minute while it runs), so nothing waits for @1 to come back."""
    config, layout = write_config(tmp_path)
    inputs = {("a", f"held-{i}.jpg"): face_photo(i) for i in range(3)}
    first = Daemon(config, env={"GPEN_WATCH_INSTANCE": "1", "GPEN_WATCH_FAILPOINTS": "generate=sleep:30"}).start()
    try:
        wait_for(lambda: "gpen-watch ready" in first.log_text(), 90, first, "ready")
        for (_, rel), data in inputs.items():
            (layout.hot["a"] / rel).write_bytes(data)
        with JobTable.open(tmp_path / "state" / "jobs.sqlite3") as table:
            wait_for(lambda: len(table.in_state("processing")) == len(inputs), 30, first, "all in flight")
        first.kill()
    finally:
        if first.running():
            first.kill()
    second = Daemon(config, env={"GPEN_WATCH_INSTANCE": "0"}).start()
    try:
        wait_for(lambda: account(layout, inputs).settled == len(inputs), 90, second, "taken over and published")
        acc = account(layout, inputs)
        assert acc.lost == [] and acc.duplicated == [] and acc.failed == {}
        assert "work in flight when another instance stopped is redone here" in second.log_text()
    finally:
        assert 0 == second.stop()


def test_two_instances_share_hot_folders_and_publish_each_file_once(tmp_path):
    """Two daemons (one per GPU, as gpen-watch@0/@1) on one config and job table: each file is published once."""
    config, layout = write_config(tmp_path)
    inputs = {("a", f"shared-{i:02d}.jpg"): face_photo(i) for i in range(16)}
    first = Daemon(config, env={"GPEN_WATCH_INSTANCE": "0"}).start()
    second = Daemon(config, env={"GPEN_WATCH_INSTANCE": "1"}).start()
    try:
        for d in (first, second):
            wait_for(lambda d=d: "gpen-watch ready" in d.log_text(), 120, d, "ready")
        for (_, rel), data in inputs.items():
            (layout.hot["a"] / rel).write_bytes(data)
        wait_for(lambda: account(layout, inputs).settled == len(inputs), 150, first, "all settled")
        acc = account(layout, inputs)
        assert [] == acc.lost and [] == acc.duplicated and {} == acc.failed
        assert len(inputs) == len([p for p in layout.out["a"].iterdir() if p.is_file()])
    finally:
        codes = [first.stop(), second.stop()]
    assert [0, 0] == codes
    published = [sum(1 for e in d.log_lines() if e.get("event") == "published") for d in (first, second)]
    assert len(inputs) == sum(published)


def test_an_unexpected_error_that_repeats_ends_in_failed_with_its_reason(tmp_path):
    """An error neither transient nor the photo's fault is retried max_attempts times, then failed/ + sidecar."""
    config, layout = write_config(tmp_path, extra="max_attempts = 2")
    daemon = Daemon(config, env={"GPEN_WATCH_FAILPOINTS": "publish=raise:error"}).start()
    inputs = {("a", "unlucky.jpg"): face_photo(3)}
    try:
        (layout.hot["a"] / "unlucky.jpg").write_bytes(inputs[("a", "unlucky.jpg")])
        wait_for(lambda: account(layout, inputs).settled == 1, 90, daemon, "settled")
    finally:
        assert 0 == daemon.stop()
    acc = account(layout, inputs)
    assert ["a/unlucky.jpg"] == list(acc.failed)
    stored = acc.failed["a/unlucky.jpg"]
    assert inputs[("a", "unlucky.jpg")] == stored.read_bytes()
    import json

    sidecar = json.loads(stored.with_name(stored.name + ".error.json").read_text())
    assert "publish" == sidecar["stage"] and "unexpected failure" in sidecar["error"]


def test_a_second_daemon_under_the_same_instance_name_is_refused(tmp_path):
    """Two daemons with one state directory and one instance name would take each other's work in flight:
    the second stops at once and says why, and the first goes on (two instance names: the test above)."""
    config, layout = write_config(tmp_path)
    first = Daemon(config).start()
    try:
        wait_for(lambda: "gpen-watch ready" in first.log_text(), 90, first, "ready")
        second = Daemon(config).start()
        assert second.wait(60) == 1
        assert f"pid {first.proc.pid}" in second.log_text() and "GPEN_WATCH_INSTANCE" in second.log_text()
        inputs = {("a", "one.jpg"): face_photo(1)}
        (layout.hot["a"] / "one.jpg").write_bytes(inputs[("a", "one.jpg")])
        wait_for(lambda: account(layout, inputs).settled == 1, 90, first, "the first daemon still works")
        assert account(layout, inputs).published
    finally:
        assert 0 == first.stop()


def _failed_start(config, env=None) -> tuple[Daemon, str]:
    """The daemon started on ``config`` must stop with exit status 1 and one "start-up failed" line, without a
    traceback; that line's error."""
    daemon = Daemon(config, env=env or {}).start()
    try:
        assert 1 == daemon.wait(60), daemon.log_text()[-3000:]
    finally:
        if daemon.running():
            daemon.kill()
    failed = [e for e in daemon.log_lines() if e.get("event") == "start-up failed"]
    assert 1 == len(failed), daemon.log_text()[-3000:]
    assert "Traceback" not in daemon.log_text()
    return daemon, str(failed[0]["error"])


def test_a_metrics_port_in_use_stops_start_up_before_the_models_load(tmp_path):
    """A taken metrics port is a configuration problem: one clear error line, before minutes of model loading,
    not a crash with a traceback after them."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config, _ = write_config(tmp_path, extra=f"[metrics]\nenabled = true\nport = {port}\n")
        daemon, error = _failed_start(config)
    assert f"127.0.0.1:{port}" in error, daemon.log_text()[-3000:]
    assert 0 == _count(daemon, "loading models")


def test_a_state_folder_that_cannot_be_made_stops_start_up_with_one_clear_line(tmp_path):
    """An operating-system error at start (here the state folder's parent is a file) is said in one line that
    names the folder, without a traceback."""
    (tmp_path / "a-file").write_text("not a folder")
    config, _ = write_config(tmp_path)
    config.write_text(config.read_text().replace(f'state_dir = "{tmp_path / "state"}"',
                                                 f'state_dir = "{tmp_path / "a-file" / "state"}"'))
    _, error = _failed_start(config)
    assert f"the state folder {tmp_path / 'a-file' / 'state'} cannot be created: Not a directory" in error


def test_a_second_job_table_on_the_same_hot_folder_is_refused(tmp_path):
    """The config does not set state_dir: run by hand its state is in the home folder, under systemd in
    $STATE_DIRECTORY. Started under systemd while the manual run goes on, it would restore and publish every
    photo a second time (two job tables know nothing of each other's claims): it stops and says why."""
    config, layout = write_config(tmp_path)
    config.write_text(config.read_text().replace(f'state_dir = "{tmp_path / "state"}"\n', ""))
    home = tmp_path / "home"
    home.mkdir()
    by_hand = Daemon(config, env={"HOME": str(home)}).start()
    try:
        wait_for(lambda: "gpen-watch ready" in by_hand.log_text(), 90, by_hand, "ready")
        _, error = _failed_start(config, {"HOME": str(home), "STATE_DIRECTORY": str(tmp_path / "var-lib")})
        assert f"another gpen-watch runs with the job table in {home / '.local/state/gpen-watch'}" in error
        assert str(layout.hot["a"]) in error
        assert by_hand.running()
    finally:
        assert 0 == by_hand.stop()
    # With the manual run stopped, the service starts (the stale job table in the home folder is not in use).
    service = Daemon(config, env={"HOME": str(home), "STATE_DIRECTORY": str(tmp_path / "var-lib")}).start()
    try:
        wait_for(lambda: "gpen-watch ready" in service.log_text(), 90, service, "ready")
    finally:
        assert 0 == service.stop()
