"""Load against the real daemon (issue 6): many small images dropped at once into several folders with different
presets while a steady trickle arrives in another; all are processed and none starves behind the bulk.
"""

from __future__ import annotations

import pytest

from tests.daemon.harness import figures_table, have_shared_data, partial_outputs, run_load, temp_leftovers

pytestmark = pytest.mark.skipif(not have_shared_data(), reason="needs ../shared (detector weights, Solvay photo)")


def _check(figures, layout, inputs, timeline) -> None:
    print("\n" + figures_table([figures], markdown=False))
    assert (figures.lost, figures.duplicated, figures.failed) == (0, 0, {})
    assert figures.files_out == figures.files_in == len(inputs)
    assert partial_outputs(layout) == [] and temp_leftovers(layout) == []
    assert figures.peak_rss_mib > 0
    # No queue starves: the first trickled file (queued behind one folder's bulk, in the other preset's queue)
    # is published before the last file of the bulk, not after the whole bulk.
    last_bulk = max(done for key, (_, done) in timeline.items() if not key.startswith("t/"))
    assert timeline["t/t0000.jpg"][1] < last_bulk


def test_load_bulk_and_trickle_all_processed(tmp_path):
    """150 small files at once in three folders (two presets) plus a trickle: all published, none lost or doubled."""
    _check(*run_load(tmp_path, per_folder=50, trickle=20))


@pytest.mark.slow
def test_load_long(tmp_path):
    """900 files at once plus a 100-file trickle: all published, none lost or doubled (the long form is
    tools/reliability.py --long)."""
    _check(*run_load(tmp_path, per_folder=300, trickle=100))
