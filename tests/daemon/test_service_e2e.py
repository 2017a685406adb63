"""End to end: the real daemon process on a temporary hot-folder tree (issue 4's "done when")."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import time

import pytest
from PIL import Image

from tests.daemon.harness import (
    Daemon,
    account,
    face_photo,
    files_under,
    have_shared_data,
    plain_photo,
    temp_leftovers,
    wait_for,
    wait_ready,
    write_config,
)

pytestmark = pytest.mark.skipif(not have_shared_data(), reason="needs ../shared (detector weights, Solvay photo)")


def _drop(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".incoming-" + path.name)
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.mark.parametrize("watch", ["events", "poll"])
def test_every_kind_of_drop_ends_where_it_should(tmp_path, watch):
    """Good, slow, truncated, fake, face-less and nested files each reach their documented outcome; nothing is lost."""
    config, layout = write_config(tmp_path, watch=watch, max_ready_wait=4.0)
    hot = layout.hot["a"]
    photo = face_photo(1)
    nested = face_photo(2, "PNG")
    plain = plain_photo()
    truncated = face_photo(3)[: len(face_photo(3)) // 2]
    text = b"this is not a picture, just text with a .jpg name\n"
    slow = face_photo(4)
    unicode_name = "Ünïcode photo – 1.jpg"

    _drop(hot / "before-start.jpg", photo)  # present when the daemon starts
    daemon = Daemon(config).start()
    try:
        _drop(hot / unicode_name, photo)
        _drop(hot / "sub" / "dir" / "nested.png", nested)
        _drop(hot / "plain.png", plain)
        _drop(hot / "truncated.jpg", truncated)
        _drop(hot / "notes.jpg", text)
        with open(hot / "slow.jpg", "wb") as fh:  # written in chunks, pausing longer than the stability delay
            for start in range(0, len(slow), len(slow) // 4 + 1):
                fh.write(slow[start:start + len(slow) // 4 + 1])
                fh.flush()
                time.sleep(0.8)
        (hot / ".DS_Store").write_bytes(b"junk")

        inputs = {
            ("a", "before-start.jpg"): photo,
            ("a", unicode_name): photo,
            ("a", "sub/dir/nested.png"): nested,
            ("a", "plain.png"): plain,
            ("a", "truncated.jpg"): truncated,
            ("a", "notes.jpg"): text,
            ("a", "slow.jpg"): slow,
        }
        wait_for(lambda: account(layout, inputs).settled == len(inputs), 150, daemon, "every file settled")
        acc = account(layout, inputs)
        assert acc.lost == [] and acc.duplicated == [] and acc.bad_backup == []
        assert {"a/truncated.jpg", "a/notes.jpg"} == set(acc.failed)
        for key, stored in acc.failed.items():
            sidecar = json.loads(stored.with_name(stored.name + ".error.json").read_text())
            assert sidecar["stage"] and sidecar["error"], key
        assert (layout.out["a"] / "sub" / "dir" / "nested.png").is_file()
        # A photo without a face is published unchanged, byte for byte.
        assert plain == (layout.out["a"] / "plain.png").read_bytes()
        # Restored photos keep their size.
        from PIL import Image

        with Image.open(layout.out["a"] / unicode_name) as out, Image.open(layout.backup["a"] / unicode_name) as src:
            assert src.size == out.size
        wait_for(lambda: [p for p in files_under(hot) if p.name != ".DS_Store"] == [], 10, daemon, "hot folder empty")
        assert temp_leftovers(layout) == []
        assert daemon.running()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_text()[-3000:]
    published = [e for e in daemon.log_lines() if e.get("event") == "published"]
    assert all("faces" in e and "ms" in e for e in published)


def test_sigkill_mid_batch_then_restart_publishes_each_file_exactly_once(tmp_path):
    """A daemon killed with SIGKILL in the middle of publishing, restarted, leaves each input exactly once."""
    config, layout = write_config(tmp_path)
    inputs = {("a", f"photo-{i:02d}.jpg"): face_photo(i) for i in range(10)}
    for (_, rel), data in inputs.items():
        _drop(layout.hot["a"] / rel, data)
    # The first publication dies right after output and backup are written, before the source is disposed of.
    first = Daemon(config, env={"GPEN_WATCH_FAILPOINTS": "dispose=exit*1"}).start()
    code = first.wait(120)
    assert code == 137, first.log_text()[-3000:]
    second = Daemon(config).start()
    try:
        # Kill again as soon as something more is published.
        wait_for(lambda: len(files_under(layout.out["a"])) >= 3, 120, second, "a few published")
        second.signal(signal.SIGKILL)
        second.wait(10)
        third = Daemon(config).start()
        wait_for(lambda: account(layout, inputs).settled == len(inputs), 150, third, "all settled")
        acc = account(layout, inputs)
        assert acc.lost == [] and acc.duplicated == [] and acc.failed == {}
        assert len(inputs) == len(files_under(layout.out["a"]))
        assert len(inputs) == len(files_under(layout.backup["a"]))
        assert temp_leftovers(layout) == []
        assert third.stop() == 0
    finally:
        for d in (second,):
            if d.running():
                d.kill()
    from daemon.jobs import JobTable

    with JobTable.open(tmp_path / "state" / "jobs.sqlite3") as table:
        counts = table.counts()
    states = counts[str(layout.hot["a"])]
    assert len(inputs) == states.get("done", 0)
    assert sum(n for s, n in states.items() if s in ("pending", "ready", "processing", "retry")) == 0


def test_overwrite_replaces_only_the_same_sources_result_and_never_a_backup(tmp_path):
    """collisions = "overwrite": a.jpg dropped again replaces a.jpg's result; a.png (JPEG output too) gets
    a (1).jpg; every original keeps a backup of its own, and a face-less photo is converted at full size."""
    config, layout = write_config(tmp_path, extra='collisions = "overwrite"\noutput_format = "JPEG"')
    hot, out, backup = layout.hot["a"], layout.out["a"], layout.backup["a"]
    first, second, other = face_photo(1), face_photo(2), face_photo(3, "PNG")
    plain = plain_photo(size=(1600, 1000))  # above the preset's max_long_side (800)
    daemon = Daemon(config).start()
    try:
        _drop(hot / "a.jpg", first)
        wait_for(lambda: (backup / "a.jpg").is_file() and not (hot / "a.jpg").exists(), 60, daemon, "a.jpg")
        earlier = (out / "a.jpg").read_bytes()
        _drop(hot / "a.png", other)
        wait_for(lambda: (out / "a (1).jpg").is_file() and not (hot / "a.png").exists(), 60, daemon, "a.png")
        assert (out / "a.jpg").read_bytes() == earlier  # another source's result is never replaced
        _drop(hot / "a.jpg", second)
        wait_for(lambda: (backup / "a (1).jpg").is_file() and not (hot / "a.jpg").exists(), 60, daemon, "a.jpg again")
        wait_for(lambda: (out / "a.jpg").read_bytes() != earlier, 30, daemon, "a.jpg's result replaced")
        _drop(hot / "plain.png", plain)
        wait_for(lambda: (out / "plain.jpg").is_file(), 60, daemon, "plain.png")
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    assert (backup / "a.jpg").read_bytes() == first and (backup / "a (1).jpg").read_bytes() == second
    assert (backup / "a.png").read_bytes() == other
    assert sorted(p.name for p in files_under(out)) == ["a (1).jpg", "a.jpg", "plain.jpg"]
    with Image.open(out / "plain.jpg") as converted:
        assert (converted.format, converted.size) == ("JPEG", (1600, 1000))


def test_a_large_jpeg_is_published_at_the_size_the_preset_gives_and_a_faceless_one_at_full_size(tmp_path):
    """JPEGs above max_long_side (800) are decoded at a reduced scale: the restored photo still has exactly the
    capped size, and a face-less one converted to PNG keeps its full size."""
    config, layout = write_config(tmp_path, extra='output_format = "PNG"')
    hot, out = layout.hot["a"], layout.out["a"]
    with Image.open(io.BytesIO(face_photo(1, "PNG"))) as im:
        faces = im.convert("RGB").resize((1680, 920), Image.LANCZOS)  # 4x the crop: below half of it is 840 px
    with Image.open(io.BytesIO(plain_photo(size=(1600, 1000)))) as im:
        plain = im.convert("RGB")
    daemon = Daemon(config).start()
    try:
        _drop(hot / "faces.jpg", _jpeg(faces))
        _drop(hot / "plain.jpg", _jpeg(plain))
        wait_for(lambda: (out / "faces.png").is_file() and (out / "plain.png").is_file(), 60, daemon, "both")
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    with Image.open(out / "faces.png") as restored, Image.open(out / "plain.png") as converted:
        assert ("PNG", (800, 438)) == (restored.format, restored.size)  # round(920 * 800 / 1680)
        assert ("PNG", (1600, 1000)) == (converted.format, converted.size)


def _jpeg(pil: Image.Image) -> bytes:
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def test_a_kept_original_that_is_only_touched_is_not_processed_again(tmp_path):
    """after = "keep": a new mtime on the same bytes is not new work; new bytes under the name are."""
    config, layout = write_config(tmp_path)
    config.write_text(config.read_text().replace("stability_delay = 0.3", 'stability_delay = 0.3\nafter = "keep"'))
    hot, out = layout.hot["a"], layout.out["a"]
    daemon = Daemon(config).start()
    try:
        _drop(hot / "k.jpg", face_photo(1))
        wait_for(lambda: (out / "k.jpg").is_file(), 60, daemon, "k.jpg published")
        later = time.time() + 100
        os.utime(hot / "k.jpg", (later, later))
        wait_for(lambda: _skipped_in_table(tmp_path), 30, daemon, "the touched original seen and skipped")
        time.sleep(2.5)  # two more rescans
        assert sorted(p.name for p in files_under(out)) == ["k.jpg"]
        _drop(hot / "k.jpg", face_photo(2))
        wait_for(lambda: (out / "k (1).jpg").is_file(), 60, daemon, "changed content processed again")
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


def test_kept_originals_are_not_redone_when_the_job_table_is_lost(tmp_path):
    """after = "keep" leaves processed originals in the hot folder; only the job table knows they are done. Moved
    aside as corrupted (as its error says to), a new table finds them again: those with their backup and result
    on the outputs share are not restored and published a second time; one whose result never landed is."""
    config, layout = write_config(tmp_path)
    config.write_text(config.read_text().replace("stability_delay = 0.3", 'stability_delay = 0.3\nafter = "keep"'))
    hot, out, backup = layout.hot["a"], layout.out["a"], layout.backup["a"]
    daemon = Daemon(config).start()
    try:
        for i in (1, 2):
            _drop(hot / f"k{i}.jpg", face_photo(i))
        wait_for(lambda: (out / "k1.jpg").is_file() and (out / "k2.jpg").is_file(), 90, daemon, "both published")
    finally:
        assert daemon.stop() == 0
    for name in os.listdir(tmp_path / "state"):
        if name.startswith("jobs.sqlite3"):
            os.replace(tmp_path / "state" / name, tmp_path / f"aside-{name}")
    (out / "k2.jpg").unlink()  # as if the process had died between the backup and the result
    again = Daemon(config).start()
    try:
        wait_for(lambda: (out / "k2 (1).jpg").is_file(), 90, again, "k2 redone")
        wait_for(lambda: "already processed before this job table" in again.log_text(), 30, again, "k1 known")
        time.sleep(2.5)  # two more rescans
    finally:
        assert again.stop() == 0
    # k2's earlier backup is never replaced: its redo takes the next number, in both folders.
    assert sorted(p.name for p in files_under(out)) == ["k1.jpg", "k2 (1).jpg"]
    assert sorted(p.name for p in files_under(backup)) == ["k1.jpg", "k2 (1).jpg", "k2.jpg"]


def _skipped_in_table(root) -> bool:
    with sqlite3.connect(root / "state" / "jobs.sqlite3") as con:
        return bool(con.execute("SELECT 1 FROM jobs WHERE state = 'skipped'").fetchall())


def test_an_original_dropped_again_with_its_old_mtime_is_processed_again(tmp_path):
    """after = "delete": a processed file copied in again with `cp -p` (same bytes, size and mtime), or a failed
    one moved back from failed/ to retry it, is a new drop, not something to ignore silently."""
    config, layout = write_config(tmp_path)
    hot, out, failed = layout.hot["a"], layout.out["a"], layout.failed["a"]
    daemon = Daemon(config).start()
    try:
        photo, junk = face_photo(1), b"not an image at all"
        for name, data in (("p.jpg", photo), ("t.jpg", junk)):
            _drop(hot / name, data)
            os.utime(hot / name, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        wait_for(lambda: (out / "p.jpg").is_file() and (failed / "t.jpg").is_file(), 60, daemon, "first round")
        _drop(hot / "p.jpg", photo)
        os.utime(hot / "p.jpg", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        os.rename(failed / "t.jpg", hot / "t.jpg")
        wait_for(lambda: (out / "p (1).jpg").is_file() and (failed / "t.jpg").is_file()
                 and not any(hot.iterdir()), 60, daemon, "both processed again")
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


def test_start_up_removes_temporary_files_a_crash_left_in_every_folder_it_writes(tmp_path):
    """A crash mid-copy leaves a temporary file in output/, backup/, failed/ or (a cross-device move) done/;
    the next start removes them all."""
    from daemon.publish import host_tag
    from tests.daemon.test_publish import dead_pid

    config, layout = write_config(tmp_path)
    config.write_text(config.read_text().replace("stability_delay = 0.3", 'stability_delay = 0.3\nafter = "move"'))
    done = layout.backup["a"].parent / "done" / "a"
    dirs = [layout.out["a"], layout.backup["a"], layout.failed["a"], done]
    leftovers = [d / f".gpen-watch.{host_tag()}.{dead_pid()}.0123abcd.tmp" for d in dirs]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a copy")
    daemon = Daemon(config).start()
    try:
        wait_for(lambda: "gpen-watch ready" in daemon.log_text(), 90, daemon, "ready")
        assert [] == [str(p) for p in leftovers if p.exists()]
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


def test_start_up_prunes_old_job_history(tmp_path):
    """Finished rows older than history_days go at start-up; each file's newest row stays."""
    from tests.daemon.test_service import aged_history

    config, layout = write_config(tmp_path, extra="history_days = 30")
    table = tmp_path / "state" / "jobs.sqlite3"
    table.parent.mkdir()
    old, latest = aged_history(table, str(layout.hot["a"]), days=31)
    daemon = Daemon(config).start()
    try:
        wait_for(lambda: "gpen-watch ready" in daemon.log_text(), 90, daemon, "ready")
        with sqlite3.connect(table) as con:
            assert [(latest,)] == con.execute("SELECT id FROM jobs ORDER BY id").fetchall()
        con.close()
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


@pytest.mark.parametrize("swapped", ["hot", "out"])
def test_a_folder_swapped_for_a_link_while_running_is_never_followed(tmp_path, swapped):
    """Someone replaces a configured folder by a link to another folder while the daemon runs. Following it would
    read, restore and delete the photos there (the hot folder), or write results there (the output folder). The
    folder is taken as unavailable instead: nothing outside is touched, and once the folder is back, work goes on."""
    config, layout = write_config(tmp_path)
    hot, out = layout.hot["a"], layout.out["a"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "victim.jpg").write_bytes(face_photo(3))
    daemon = Daemon(config).start()
    try:
        _drop(hot / "first.jpg", face_photo(1))
        wait_for(lambda: (out / "first.jpg").is_file(), 60, daemon, "first.jpg published")
        folder = hot if swapped == "hot" else out
        folder.rename(folder.with_name(folder.name + ".real"))
        folder.symlink_to(outside, target_is_directory=True)
        if swapped == "out":
            _drop(hot / "second.jpg", face_photo(2))
        time.sleep(4.0)  # many polls and retries
        assert sorted(p.name for p in outside.iterdir()) == ["victim.jpg"]
        assert (outside / "victim.jpg").read_bytes() == face_photo(3)
        assert not any(p.name == "victim.jpg" for p in files_under(layout.backup["a"]))
        folder.unlink()
        folder.with_name(folder.name + ".real").rename(folder)  # back as it was
        if swapped == "hot":
            _drop(hot / "second.jpg", face_photo(2))
        wait_for(lambda: (out / "second.jpg").is_file(), 60, daemon, "work going on once the folder is back")
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    assert any("swapped for a link" in line.get("event", "") + str(line.get("reason", "")) + str(line.get("error", ""))
               for line in daemon.log_lines())


def test_debug_logs_say_why_a_file_waits_and_leave_library_chatter_out(tmp_path):
    """log_level = "debug" is for finding out why a file is not processed yet: the service's own reasons, each
    once as it changes, not every raw inotify event of the watching library."""
    config, layout = write_config(tmp_path, watch="events", extra='log_level = "debug"')
    photo = face_photo(1)
    daemon = Daemon(config).start()
    try:
        wait_ready(daemon)
        with open(layout.hot["a"] / "slow.jpg", "wb") as fh:
            fh.write(photo[: len(photo) // 2])
            fh.flush()
            wait_for(lambda: "not ready yet" in daemon.log_text(), 30, daemon, "the wait explained")
            fh.write(photo[len(photo) // 2 :])
        wait_for(lambda: (layout.out["a"] / "slow.jpg").exists(), 60, daemon, "the result")
    finally:
        assert daemon.stop() == 0
    waits = [line for line in daemon.log_lines() if line.get("event") == "not ready yet"]
    assert waits and all(line["path"] == "slow.jpg" for line in waits)
    assert len({line["reason"] for line in waits}) == len(waits)  # each reason once in a row
    assert any(line.get("event") == "ready; queued" for line in daemon.log_lines())
    assert "watchdog" not in daemon.log_text()
