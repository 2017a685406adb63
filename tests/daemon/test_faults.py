import errno

import pytest

from daemon.faults import FailPoints


class TestFailPoints:
    def test_unset_points_do_nothing(self):
        """With no failpoints configured, every named point is a no-op."""
        FailPoints.from_env({}).hit("publish")

    def test_raise_fires_count_times(self):
        """A counted failpoint raises the configured error exactly that many times."""
        fp = FailPoints.parse("publish=raise:enospc*2")
        for _ in range(2):
            with pytest.raises(OSError) as info:
                fp.hit("publish")
            assert errno.ENOSPC == info.value.errno
        fp.hit("publish")

    def test_oom_is_torch_out_of_memory(self):
        """The oom action raises the same exception type a real CUDA OOM does."""
        import torch

        with pytest.raises(torch.OutOfMemoryError):
            FailPoints.parse("generate=raise:oom").hit("generate")

    def test_bad_spec_is_rejected(self):
        """A typo in the failpoint spec is an error, not a silently disarmed test."""
        with pytest.raises(ValueError, match="unknown action"):
            FailPoints.parse("generate=explode")
