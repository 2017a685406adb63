"""Reliability figures: run the fault and load scenarios against the real daemon and print the table.

    .venv/bin/python tools/reliability.py            # short form (what CI runs, a few minutes)
    .venv/bin/python tools/reliability.py --long     # long form: 20+ kills over 200 files, 2,000-file load
    .venv/bin/python tools/reliability.py --long --markdown reliability.md

Needs ../shared (the real mobile0.25 detector and the Solvay photo) beside the repository, like the tests; the
generator is the tests' tiny random-weight GPEN, so the figures measure the daemon (watching, readiness, job
table, publishing), not restoration quality. Exit status 1 when any file was lost or duplicated.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.daemon.harness import (  # noqa: E402 - the harness lives with the tests
    Figures,
    figures_table,
    have_shared_data,
    run_kill_rounds,
    run_load,
)

SHORT = {"kill_files": 40, "kills": 5, "load_per_folder": 50, "trickle": 20}
LONG = {"kill_files": 200, "kills": 20, "load_per_folder": 634, "trickle": 100}  # 3 x 634 + 100 = 2,002 files


def run(long: bool, seed: int) -> list[Figures]:
    sizes = LONG if long else SHORT
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpen-reliability-") as tmp:
        started = time.monotonic()
        figures, _, _ = run_kill_rounds(Path(tmp) / "kills", files=sizes["kill_files"], kills=sizes["kills"],
                                        seed=seed, timeout=1800)
        rows.append(figures)
        print(f"... kills done in {time.monotonic() - started:.0f} s", file=sys.stderr)
        started = time.monotonic()
        figures, _, _, _ = run_load(Path(tmp) / "load", per_folder=sizes["load_per_folder"],
                                    trickle=sizes["trickle"], timeout=3600)
        rows.append(figures)
        print(f"... load done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="the long form (20 kills / 200 files, 2,000-file load)")
    parser.add_argument("--seed", type=int, default=20, help="seed for the kill moments")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")
    args = parser.parse_args(argv)
    if not have_shared_data():
        print("needs ../shared (detector weights, Solvay photo) beside the repository", file=sys.stderr)
        return 2
    rows = run(args.long, args.seed)
    print(figures_table(rows, markdown=False))
    if args.markdown:
        where = f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only"
        args.markdown.write_text(
            f"{figures_table(rows, markdown=True)}\n\n"
            f"`tools/reliability.py{' --long' if args.long else ''} --seed {args.seed}` on {where}.\n"
        )
    return 1 if any(r.lost or r.duplicated for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
