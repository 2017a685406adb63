from daemon.batcher import pick_queue


class TestPickQueue:
    def test_empty_queues_give_none(self):
        """Nothing to do means no queue is picked."""
        assert pick_queue({"fast": 0, "quality": 0}, {}, {}, now=100.0) is None

    def test_higher_priority_goes_first(self):
        """A folder's priority decides which preset is served when both have waited equally."""
        depths = {"fast": 3, "quality": 3}
        assert "quality" == pick_queue(depths, {"quality": 5, "fast": 0}, {"fast": 90, "quality": 90}, now=100)

    def test_low_priority_queue_does_not_starve(self):
        """A low-priority queue that has waited long enough overtakes a busy high-priority one."""
        depths = {"fast": 50, "archive": 1}
        prios = {"fast": 3, "archive": 0}
        assert "fast" == pick_queue(depths, prios, {"fast": 99, "archive": 90}, now=100)
        assert "archive" == pick_queue(depths, prios, {"fast": 99, "archive": 50}, now=100)

    def test_simulated_stream_serves_every_queue(self):
        """Under a saturated high-priority queue the other queue still waits a bounded time (priority gap x aging)."""
        depths = {"hot": 10_000, "cold": 10_000}
        prios = {"hot": 5, "cold": 0}
        waiting = {"hot": 0.0, "cold": 0.0}
        served = {"hot": 0, "cold": 0}
        longest_cold_wait = 0.0
        now = 0.0
        for _ in range(1000):
            now += 1.0  # one batch a second
            name = pick_queue(depths, prios, waiting, now, aging_s=10.0)
            assert name is not None
            if name == "cold":
                longest_cold_wait = max(longest_cold_wait, now - waiting["cold"])
            served[name] += 1
            waiting[name] = now
        assert served["cold"] >= 15
        assert longest_cold_wait <= 5 * 10.0 + 2
        assert served["hot"] > served["cold"]
