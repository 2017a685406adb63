import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from daemon.jobs import ACTIVE_STATES, JobStateError, JobTable, JobTableError, claim_instance, instance_stopped

FOLDER = "/srv/in/fast"


@pytest.fixture
def table(tmp_path):
    with JobTable.open(tmp_path / "state" / "jobs.sqlite3") as t:
        yield t


def ready_job(table, relpath, preset="fast", sha="0" * 64):
    job = table.note_candidate(FOLDER, relpath, preset)
    table.mark_ready(job.id, 10, 123, sha)
    return job


class TestStateMachine:
    def test_happy_path(self, table):
        """A file goes pending -> ready -> processing -> done, with identity, attempts and faces recorded."""
        job = table.note_candidate(FOLDER, "a.jpg", "fast")
        assert job.state == "pending"
        table.mark_ready(job.id, 1234, 99, "ab" * 32)
        [claimed] = table.claim("fast", 8)
        assert (claimed.id, claimed.state, claimed.attempts) == (job.id, "processing", 1)
        table.set_targets(job.id, "/out/a.jpg", "/backup/a.jpg")
        table.finish(job.id, faces=3)
        done = table.get(job.id)
        assert (done.state, done.size, done.mtime_ns, done.faces) == ("done", 1234, 99, 3)
        assert done.sha256 == "ab" * 32
        assert (done.output_path, done.backup_path) == ("/out/a.jpg", "/backup/a.jpg")

    def test_forbidden_transitions_raise(self, table):
        """A change the current state does not allow is refused, and the row is left as it was."""
        job = table.note_candidate(FOLDER, "a.jpg", "fast")
        with pytest.raises(JobStateError):
            table.finish(job.id, 1)
        with pytest.raises(JobStateError):
            table.set_targets(job.id, "/o", "/b")
        with pytest.raises(JobStateError, match="does not exist"):
            table.mark_ready(999, 1, 1, "x")
        assert table.get(job.id).state == "pending"

    def test_one_active_row_per_file(self, table):
        """Noting the same file again returns its active row instead of creating a second one."""
        first = table.note_candidate(FOLDER, "a.jpg", "fast")
        again = table.note_candidate(FOLDER, "a.jpg", "fast")
        assert first.id == again.id
        assert table.counts() == {FOLDER: {"pending": 1}}

    def test_unique_index_guards_against_duplicates(self, table):
        """Even a direct insert cannot create a second active row for one file (the partial unique index)."""
        table.note_candidate(FOLDER, "a.jpg", "fast")
        con = sqlite3.connect(table.path)
        with pytest.raises(sqlite3.IntegrityError):
            con.execute(
                "INSERT INTO jobs (folder, relpath, preset, state, created_at, updated_at) "
                "VALUES (?, 'a.jpg', 'fast', 'ready', 0, 0)",
                (FOLDER,),
            )
        con.close()

    def test_new_row_after_terminal_state(self, table):
        """A file dropped again after its job ended gets a fresh job; the old one is kept as history."""
        job = ready_job(table, "a.jpg")
        table.claim("fast", 1)
        table.finish(job.id, 1)
        again = table.note_candidate(FOLDER, "a.jpg", "fast", size=11, mtime_ns=5)
        assert again.id != job.id
        assert again.state == "pending"

    def test_same_file_seen_again_is_not_new_work(self, table):
        """With after=keep, the finished original found by a rescan (same size and mtime) is no new job."""
        job = ready_job(table, "a.jpg")
        table.claim("fast", 1)
        table.finish(job.id, 1)
        seen = table.note_candidate(FOLDER, "a.jpg", "fast", size=10, mtime_ns=123)
        assert (seen.id, seen.state) == (job.id, "done")
        assert table.is_unchanged_done(FOLDER, "a.jpg", 10, 123)
        assert not table.is_unchanged_done(FOLDER, "a.jpg", 10, 124)

    def test_a_failed_file_moved_back_is_new_work_unless_its_original_stayed(self, table):
        """A failed original went to failed/: moved back (mv keeps size and mtime), it is new work even with
        after=keep. One whose original stayed in the hot folder (it could not be removed), or one that crashed the
        daemon, is the same failure seen again, in every mode."""
        moved = ready_job(table, "moved.jpg")
        table.fail(moved.id, "restore", "no face found")
        again = table.note_candidate(FOLDER, "moved.jpg", "fast", size=10, mtime_ns=123)
        assert again.id != moved.id and again.state == "pending"

        stayed = ready_job(table, "stayed.jpg")
        table.fail(stayed.id, "decode", "not an image", kept="the original could not be removed: Read-only")
        crashed = ready_job(table, "crashed.jpg")
        table.claim("fast", 8)
        table.requeue_in_flight(max_attempts=1)
        assert table.get(crashed.id).state == "failed"
        for only_kept in (False, True):
            for job in (stayed, crashed):
                seen = table.note_candidate(FOLDER, job.relpath, "fast", size=10, mtime_ns=123, only_kept=only_kept)
                assert (seen.id, seen.state) == (job.id, "failed")

    def test_a_skipped_duplicate_that_stayed_is_known_when_seen_again(self, table):
        """A duplicate the hot folder would not let go (after=delete): the rescan finds the skipped row, not new
        work that is read, hashed and skipped again every 30 s."""
        dup = ready_job(table, "dup.jpg")
        table.mark_skipped(dup.id, "identical to a file processed before", kept="could not be removed")
        seen = table.note_candidate(FOLDER, "dup.jpg", "fast", size=10, mtime_ns=123, only_kept=True)
        assert (seen.id, seen.state) == (dup.id, "skipped")

    def test_a_version_2_table_is_migrated_keeping_what_it_knew(self, tmp_path):
        """A table from before the `kept` column still knows its done rows whose originals stayed, and gets the
        output-path index."""
        path = tmp_path / "jobs.sqlite3"
        with JobTable.open(path) as table:
            job = ready_job(table, "ro.jpg")
            table.claim("fast", 1)
            table.finish(job.id, 1, kept="the original could not be deleted: Read-only file system")
        con = sqlite3.connect(path)
        con.execute("ALTER TABLE jobs DROP COLUMN kept")
        con.execute("DROP INDEX jobs_by_output")  # version 2 never had it: its migration was numbered past the end
        con.execute("PRAGMA user_version = 2")
        con.commit()
        con.close()
        with JobTable.open(path) as table:
            seen = table.note_candidate(FOLDER, "ro.jpg", "fast", size=10, mtime_ns=123, only_kept=True)
            assert (seen.id, seen.kept) == (job.id, "the original could not be deleted: Read-only file system")
            indexes = {row[0] for row in table._read("SELECT name FROM sqlite_master WHERE type = 'index'")}
            assert "jobs_by_output" in indexes  # collisions = "overwrite" looks results up by it

    def test_gone_skipped_failed(self, table):
        """Vanished, skipped and failed files end in their own terminal states with the reason kept."""
        gone = table.note_candidate(FOLDER, "gone.jpg", "fast")
        table.mark_gone(gone.id)
        skipped = ready_job(table, "dup.jpg")
        table.mark_skipped(skipped.id, "identical to a file processed before")
        bad = table.note_candidate(FOLDER, "bad.jpg", "fast")
        table.fail(bad.id, "readiness", "still not a complete image after 600 s")
        assert [table.get(j.id).state for j in (gone, skipped, bad)] == ["gone", "skipped", "failed"]
        [failure] = table.recent_failures(5)
        assert (failure.relpath, failure.error_stage) == ("bad.jpg", "readiness")
        assert "600 s" in failure.last_error

    def test_requeue_pending_clears_hash_and_names(self, table):
        """A source that changed after it was queued goes back through the gate as a new file: its old hash is
        dropped, and so are the names chosen for the old bytes, which may already hold their published backup."""
        job = ready_job(table, "a.jpg")
        table.claim("fast", 1)
        table.set_targets(job.id, "/out/a.jpg", "/backup/a.jpg")
        table.requeue_pending(job.id, "source changed after it was queued")
        row = table.get(job.id)
        assert (row.state, row.sha256, row.output_path, row.backup_path) == ("pending", None, None, None)


class TestQueue:
    def test_claim_oldest_first_up_to_limit(self, table):
        """Claims take ready jobs of one preset, oldest first, at most ``limit``, all with one batch id."""
        ids = [ready_job(table, f"{i}.jpg").id for i in range(5)]
        ready_job(table, "other.jpg", preset="quality")
        batch = table.claim("fast", 3)
        assert [j.id for j in batch] == ids[:3]
        assert len({j.batch_id for j in batch}) == 1
        assert [j.id for j in table.claim("fast", 10)] == ids[3:]
        assert table.claim("fast", 10) == []
        assert table.queue_depths() == {"quality": 1}

    def test_what_the_table_remembers_of_a_file_and_its_names(self, table):
        """``remembers``: another row of the same file, or a name another job planned; not the row asked about."""
        first = table.note_candidate("/hot", "p.jpg", "fast")
        assert not table.remembers("/hot", "p.jpg", ["/out/p.jpg"], besides=first.id)
        table.mark_gone(first.id)
        again = table.note_candidate("/hot", "p.jpg", "fast")
        assert table.remembers("/hot", "p.jpg", [], besides=again.id)  # an earlier version of the file
        job = ready_job(table, "q.jpg")
        [claimed] = table.claim("fast", 1)
        assert table.set_targets(claimed.id, "/out/q.jpg", "/backup/q.jpg")
        new = table.note_candidate("/other", "q.jpg", "fast")
        assert table.remembers("/other", "q.jpg", ["/backup/q.jpg"], besides=new.id)
        assert not table.remembers("/other", "q.jpg", ["/backup/r.jpg"], besides=new.id)
        assert job.id == claimed.id

    def test_retry_waits_until_due(self, table):
        """A transient failure is claimable again only once its delay has passed, and counts attempts."""
        job = ready_job(table, "a.jpg")
        [claimed] = table.claim("fast", 1)
        table.retry_later(job.id, "ENOSPC", delay_s=60)
        assert table.claim("fast", 1, now=claimed.updated_at + 1) == []
        assert table.queue_depths(now=claimed.updated_at + 1) == {}
        [again] = table.claim("fast", 1, now=claimed.updated_at + 120)
        assert (again.id, again.attempts, again.last_error) == (job.id, 2, "ENOSPC")

    def test_concurrent_claims_never_share_a_job(self, table):
        """Workers claiming from several threads at once never get the same job twice."""
        for i in range(200):
            ready_job(table, f"{i}.jpg")
        got: list[int] = []
        lock = threading.Lock()

        def worker():
            while batch := table.claim("fast", 7):
                with lock:
                    got.extend(j.id for j in batch)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == len(set(got)) == 200

    def test_counts_and_throughput(self, table):
        """Counts per folder and state, and files done per minute, reflect the table."""
        for i in range(3):
            job = ready_job(table, f"{i}.jpg")
            table.claim("fast", 1)
            table.finish(job.id, 0)
        table.note_candidate("/srv/in/quality", "q.jpg", "quality")
        assert table.counts() == {FOLDER: {"done": 3}, "/srv/in/quality": {"pending": 1}}
        assert table.throughput(60.0) == pytest.approx(3.0)

    def test_duplicates_by_hash(self, table):
        """An identical file (same SHA-256) already done in the folder is found for the duplicates policy."""
        job = ready_job(table, "a.jpg", sha="f" * 64)
        assert table.find_done_by_hash(FOLDER, "f" * 64) is None
        table.claim("fast", 1)
        table.finish(job.id, 1)
        assert table.find_done_by_hash(FOLDER, "f" * 64).id == job.id
        assert table.find_done_by_hash("/elsewhere", "f" * 64) is None

    def test_prune_keeps_the_newest_row_per_file(self, table):
        """Pruning drops old history but keeps each file's newest row and everything still active."""
        first = ready_job(table, "a.jpg")
        table.claim("fast", 1)
        table.finish(first.id, 1)
        second = ready_job(table, "a.jpg")
        table.claim("fast", 1)
        table.finish(second.id, 1)
        waiting = table.note_candidate(FOLDER, "b.jpg", "fast")
        assert table.prune_finished(older_than_s=60, now=table.get(second.id).updated_at + 3600) == 1
        with pytest.raises(JobStateError):
            table.get(first.id)
        assert (table.get(second.id).state, table.get(waiting.id).state) == ("done", "pending")

    def test_reassign_preset_moves_queued_jobs_only(self, table):

        """After a reload changes a folder's preset, queued jobs follow it; jobs in flight stay."""
        in_flight = ready_job(table, "a.jpg")
        table.claim("fast", 1)
        queued = ready_job(table, "b.jpg")
        assert table.reassign_preset(FOLDER, "quality") == 1
        assert (table.get(in_flight.id).preset, table.get(queued.id).preset) == ("fast", "quality")


class TestCrashRecovery:
    def test_requeue_keeps_targets(self, tmp_path):
        """After a crash, jobs in flight are ready again with the output names chosen before the crash."""
        path = tmp_path / "jobs.sqlite3"
        table = JobTable.open(path)
        job = ready_job(table, "a.jpg")
        table.claim("fast", 1)
        table.set_targets(job.id, "/out/a.jpg", "/backup/a.jpg")
        table._con.close()  # no orderly close: the process "died" here

        table = JobTable.open(path)
        assert table.requeue_in_flight() == 1
        row = table.get(job.id)
        assert (row.state, row.output_path, row.backup_path) == ("ready", "/out/a.jpg", "/backup/a.jpg")
        assert table.reserved_targets() == {"/out/a.jpg", "/backup/a.jpg"}
        table.close()

    def test_requeue_gives_up_on_a_file_that_keeps_killing_the_daemon(self, table):
        """A job in flight at max_attempts crashes fails (stage 'crash') instead of looping forever."""
        job = ready_job(table, "bomb.jpg")
        for _ in range(3):
            table.claim("fast", 1)
            table.requeue_in_flight(max_attempts=3)
        row = table.get(job.id)
        assert (row.state, row.error_stage, row.attempts) == ("failed", "crash", 3)

    def test_only_the_file_that_keeps_killing_the_daemon_fails_not_its_batch(self, table):
        """A batch of 8 with one fatal file, and the next batch already claimed beside it: after five crashes the
        fatal file alone has failed; the other eleven were each charged one crash, ran alone and are done."""
        jobs = [ready_job(table, f"{i}.jpg") for i in range(12)]
        fatal = jobs[5].id
        in_flight = table.claim("fast", 8) + table.claim("fast", 8)  # the prep thread claims ahead of the device
        assert len(in_flight) == 12
        crashes = 0
        while crashes < 10:
            if fatal in {j.id for j in in_flight}:
                crashes += 1
                table.requeue_in_flight(max_attempts=5)  # the process died; this is the restart
                in_flight = []
            for job in in_flight:
                table.finish(job.id, faces=1)
            in_flight = table.claim("fast", 8) + table.claim("fast", 8)
            if not in_flight:
                break
            if any(j.crashes for j in in_flight):
                assert len(in_flight) == 1  # a suspect never shares the device, nor the prep thread's batch
        assert crashes == 5
        assert [j.id for j in table.in_state("failed")] == [fatal]
        assert len(table.in_state("done")) == 11

    def test_a_suspect_waits_until_nothing_else_is_in_flight(self, table):
        """A suspect is not claimed beside work in flight, and nothing is claimed beside a running suspect."""
        suspect, other, later = ready_job(table, "s.jpg"), ready_job(table, "o.jpg"), ready_job(table, "l.jpg")
        table.claim("fast", 1)
        table.requeue_in_flight(max_attempts=5)  # s.jpg was in flight: a suspect now
        assert table.suspect_preset(["quality"]) is None and table.suspect_preset(["fast", "quality"]) == "fast"
        table._con.execute("UPDATE jobs SET state = 'processing', owner = '' WHERE id = ?", (other.id,))
        assert table.claim("fast", 8) == []  # o.jpg is in flight: the suspect waits
        table.finish(other.id, faces=0)
        assert [j.id for j in table.claim("fast", 8)] == [suspect.id]
        assert table.claim("fast", 8) == []  # l.jpg waits while the suspect runs
        table.finish(suspect.id, faces=0)
        assert [j.id for j in table.claim("fast", 8)] == [later.id]

    def test_instances_cannot_record_the_same_names(self, tmp_path):
        """Two instances (one per GPU) that planned the same backup name: the second to record it is told to plan
        again, so two originals never share one backup."""
        path = tmp_path / "jobs.sqlite3"
        gpu0, gpu1 = JobTable.open(path, owner="0"), JobTable.open(path, owner="1")
        a = ready_job(gpu0, "a/IMG_0001.JPG")
        b = ready_job(gpu0, "b/IMG_0001.JPG")
        gpu0.claim("fast", 1)
        gpu1.claim("fast", 1)
        assert gpu0.set_targets(a.id, "/out/a/IMG_0001.JPG", "/backup/IMG_0001.JPG")
        assert not gpu1.set_targets(b.id, "/out/b/IMG_0001.JPG", "/backup/IMG_0001.JPG")
        assert gpu1.get(b.id).backup_path is None
        assert gpu1.set_targets(b.id, "/out/b/IMG_0001.JPG", "/backup/IMG_0001 (1).JPG")
        assert gpu0.set_targets(a.id, "/out/a/IMG_0001.JPG", "/backup/IMG_0001.JPG")  # its own names again: fine
        gpu0.close()
        gpu1.close()

    def test_a_stopped_instance_s_work_in_flight_can_be_taken_over(self, tmp_path):
        """Instance 1 holds rows in flight. While it runs (its lock held), nobody may take them; once it is gone,
        instance 0 puts them back in the queue, each charged one crash, and 1 cannot start meanwhile."""
        path = tmp_path / "jobs.sqlite3"
        gpu0, gpu1 = JobTable.open(path, owner="0"), JobTable.open(path, owner="1")
        job = ready_job(gpu1, "a.jpg")
        gpu1.claim("fast", 1)
        lock = claim_instance(tmp_path, "1")
        with instance_stopped(tmp_path, "1") as stopped:
            assert not stopped
        os.close(lock)  # instance 1 died
        with instance_stopped(tmp_path, "1") as stopped:
            assert stopped
            with pytest.raises(JobTableError, match="already runs"):
                claim_instance(tmp_path, "1")  # it cannot start while its work is being taken over
            assert gpu0.requeue_in_flight(max_attempts=5, owner="1") == 1
        row = gpu0.get(job.id)
        assert (row.state, row.crashes) == ("ready", 1)
        os.close(claim_instance(tmp_path, "1"))  # and afterwards it can
        with instance_stopped(tmp_path, "2") as stopped:
            assert not stopped  # no lock file: nothing is known about it
        gpu0.close()
        gpu1.close()

    def test_a_row_stuck_in_processing_does_not_hold_suspects_back_for_ever(self, table):
        """A row left in "processing" by a bug (untouched for over an hour) no longer counts as in flight: the
        suspects waiting to run alone are claimed, instead of every claim returning nothing until a restart."""
        suspect, stuck = ready_job(table, "s.jpg"), ready_job(table, "stuck.jpg")
        table.claim("fast", 1)
        table.requeue_in_flight(max_attempts=5)  # s.jpg is a suspect now
        table._con.execute("UPDATE jobs SET state = 'processing', updated_at = updated_at - 7200 WHERE id = ?",
                           (stuck.id,))
        assert [j.id for j in table.claim("fast", 8)] == [suspect.id]

    def test_requeue_only_own_instance(self, tmp_path):
        """With one instance per GPU sharing a table, a restart requeues only its own jobs in flight."""
        path = tmp_path / "jobs.sqlite3"
        gpu0, gpu1 = JobTable.open(path, owner="0"), JobTable.open(path, owner="1")
        a, b = ready_job(gpu0, "a.jpg"), ready_job(gpu0, "b.jpg")
        gpu0.claim("fast", 1)
        gpu1.claim("fast", 1)
        assert gpu0.requeue_in_flight() == 1
        assert {gpu0.get(a.id).state, gpu0.get(b.id).state} == {"ready", "processing"}
        gpu0.close()
        gpu1.close()

    def test_sigkill_during_transactions_leaves_a_consistent_table(self, tmp_path):
        """SIGKILL of a writer mid-stream loses no committed change and leaves no half transaction."""
        path = tmp_path / "jobs.sqlite3"
        script = textwrap.dedent(
            f"""
            import sys
            from daemon.jobs import JobTable
            t = JobTable.open({str(path)!r})
            i = 0
            while True:
                for k in range(5):
                    job = t.note_candidate("/in", f"{{i}}-{{k}}.jpg", "fast")
                    t.mark_ready(job.id, 1, 1, "0" * 64)
                batch = t.claim("fast", 5)
                print("claimed", batch[0].batch_id, len(batch), flush=True)
                for job in batch[:3]:
                    t.set_targets(job.id, f"/out/{{job.relpath}}", f"/backup/{{job.relpath}}")
                    t.finish(job.id, 1)
                    print("done", job.id, flush=True)
                i += 1
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        reported: list[list[str]] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            reported.append(line.split())
            if len(reported) >= 80:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        table = JobTable.open(path)  # quick check passes, schema intact
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for kind, *rest in reported:
            if kind == "claimed":
                batch_id, size = rest
                n = con.execute("SELECT COUNT(*) FROM jobs WHERE batch_id = ?", (batch_id,)).fetchone()[0]
                assert n == int(size)  # a claim is all or nothing
            else:
                row = table.get(int(rest[0]))
                assert (row.state, row.faces) == ("done", 1)
                assert row.output_path == f"/out/{row.relpath}"
        # Every batch claimed in one transaction: its rows share one batch id, never partly claimed.
        partial = con.execute(
            "SELECT batch_id FROM jobs WHERE batch_id IS NOT NULL GROUP BY batch_id HAVING COUNT(*) != 5"
        ).fetchall()
        assert partial == []
        con.close()
        active_dupes = table._read(
            f"SELECT folder, relpath FROM jobs WHERE state IN {ACTIVE_STATES!r} GROUP BY folder, relpath "
            "HAVING COUNT(*) > 1"
        )
        assert active_dupes == []
        table.requeue_in_flight()
        assert table.in_state("processing") == []
        table.close()


class TestDatabaseTrouble:
    def test_locked_database_says_what_to_do(self, tmp_path):
        """A table locked by another process gives a clear JobTableError naming the cause and the fix."""
        path = tmp_path / "jobs.sqlite3"
        JobTable.open(path).close()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        table = JobTable.open(path, busy_timeout=0.1)
        try:
            with pytest.raises(JobTableError, match="is locked.*state_dir"):
                table.note_candidate(FOLDER, "a.jpg", "fast")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert table.note_candidate(FOLDER, "a.jpg", "fast").state == "pending"
        table.close()

    def test_corrupted_database_says_what_to_do(self, tmp_path):
        """A damaged file is reported at open with what to do, and the bytes on disk are left alone."""
        path = tmp_path / "jobs.sqlite3"
        table = JobTable.open(path)
        for i in range(300):
            table.note_candidate(FOLDER, f"{i:04d}-{'x' * 80}.jpg", "fast")
        table.close()
        data = bytearray(path.read_bytes())
        data[4096:8192] = os.urandom(4096)  # wreck pages of the table, keep the header
        path.write_bytes(bytes(data))
        with pytest.raises(JobTableError, match="corrupted.*move the file"):
            JobTable.open(path)
        assert path.read_bytes() == bytes(data)

    def test_not_a_database(self, tmp_path):
        """A file that is no SQLite database at all is reported as corrupted, not overwritten."""
        path = tmp_path / "jobs.sqlite3"
        path.write_bytes(b"this is not a database" * 100)
        with pytest.raises(JobTableError, match="corrupted"):
            JobTable.open(path)
        assert path.read_bytes() == b"this is not a database" * 100

    def test_newer_schema_is_refused(self, tmp_path):
        """A table written by a newer gpen-watch is not downgraded silently."""
        path = tmp_path / "jobs.sqlite3"
        JobTable.open(path).close()
        con = sqlite3.connect(path)
        con.execute("PRAGMA user_version = 99")
        con.commit()
        con.close()
        with pytest.raises(JobTableError, match="newer"):
            JobTable.open(path)

    def test_wal_and_full_sync(self, table):
        """The table runs in WAL mode with synchronous=FULL, the settings its crash safety relies on."""
        assert table._read("PRAGMA journal_mode")[0][0] == "wal"
        assert table._read("PRAGMA synchronous")[0][0] == 2
