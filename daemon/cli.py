"""The ``gpen-watch`` command line: one sub-command per job, each handled in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence

# sub-command -> "module:function"; imported lazily so `gpen-watch --help` stays instant.
HANDLERS = {
    "run": "daemon.service:command",
    "enhance": "daemon.oneshot:command",
    "bench": "daemon.benchcmd:command",
    "models": "daemon.modelfiles:command",
    "doctor": "daemon.doctor:command",
    "init": "daemon.layout:command",
    "status": "daemon.status:command",
}


def _count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}")
        return value
    return parse


def _common(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    # With suppress, a parent parser accepts the options too without overwriting what a sub-parser parsed.
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("--config", metavar="FILE", default=default,
                   help="TOML config (default: $GPEN_WATCH_CONFIG, /etc/gpen-watch/config.toml)")
    p.add_argument("--device", default=default, help="auto, cpu, cuda or cuda:N (overrides the config)")
    p.add_argument("--models-dir", metavar="DIR", default=default,
                   help="where weight files live (overrides the config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpen-watch", description="Restore faces in photos dropped into hot folders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the watch-folder daemon")
    _common(p)
    p.add_argument("--root", metavar="DIR", help="use DIR/in/<preset> hot folders and DIR/{out,backup,failed}/<preset>")
    p.add_argument("--no-download", action="store_true", help="never download missing weight files")

    p = sub.add_parser("enhance", help="restore files or folders once and exit")
    _common(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="photos, or folders to restore recursively")
    p.add_argument("-o", "--output", metavar="DIR", help="write results into DIR (default: beside each input)")
    p.add_argument("--preset", default="fast", help="preset name (default: fast)")
    p.add_argument("--compare", action="store_true", help="also write a side-by-side before/after image per file")
    p.add_argument("--no-download", action="store_true", help="never download missing weight files")
    p.add_argument("--random-weights", action="store_true",
                   help="test the pipeline without the GPEN weights: a RANDOM-weight generator (the real detector "
                        "still finds and pastes faces; results are not restorations)")

    p = sub.add_parser("bench", help="measure the engine's speed")
    _common(p)
    p.add_argument("--preset", default="fast")
    p.add_argument("--images", metavar="DIR", help="photos to use (default: sets made from the Solvay photo)")
    p.add_argument("--batch", type=_count(1, 256), help="generator batch size, 1-256 (default: the preset's)")
    p.add_argument("--random-weights", action="store_true", help="random generator weights (speed only)")
    p.add_argument("--baseline", action="store_true",
                   help="also run the official GPEN way (one face at a time, full-frame paste) and its generator")
    p.add_argument("--repeat", type=_count(1, 100), default=3, help="timed passes over the images")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")

    p = sub.add_parser("models", help="list, download or verify weight files")
    _common(p, suppress=True)
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    _common(msub.add_parser("list", help="each model, whether its file is present, and its size"), suppress=True)
    d = msub.add_parser("download",
                        help="download missing weight files (those the configured presets use, or the ones named)")
    _common(d, suppress=True)
    d.add_argument("names", nargs="*", metavar="NAME")
    d.add_argument("--force", action="store_true", help="download again even if present")
    _common(msub.add_parser("verify", help="load every present weight file strictly; fail if a configured "
                                           "folder's preset needs one that is not there"), suppress=True)

    p = sub.add_parser("doctor", help="report on torch, the device and the weight files")
    _common(p)

    p = sub.add_parser("init", help="create a hot-folder layout and a commented config")
    p.add_argument("dir", metavar="DIR")

    p = sub.add_parser("status", help="per-folder counts, recent failures and throughput")
    _common(p)
    p.add_argument("--root", metavar="DIR", help="the --root that `gpen-watch run` was given")
    p.add_argument("--json", action="store_true", help="the same report as JSON, for scripts")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        # SIGHUP's default action ends the process. Until the service installs its handler (after importing
        # torch and reading the config), a reload request waits here instead; the service then unblocks it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    module_name, func_name = HANDLERS[args.command].split(":")
    try:
        # Inside the try: importing torch takes seconds, and Ctrl-C then is an answer, not a traceback.
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`gpen-watch models list | head -1`): not an error to report. Point stdout at
        # /dev/null so that flushing it at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
