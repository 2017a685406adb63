"""Run the real daemon as a subprocess on a temporary hot-folder tree, and account for every file.

Used by the end-to-end, crash and fault-injection tests. The generator is a tiny random-weight GPEN
checkpoint written to disk (loaded through the real checkpoint path); the detector is the real
RetinaFace mobile0.25 from ../shared/models.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
DETECTOR = SHARED / "models" / "detection_mobilenet0.25_Final.pth"
SOLVAY = SHARED / "testdata" / "solvay_1927.png"
TINY_ARCH = {"size": 64, "style_dim": 32, "n_mlp": 2, "channel_multiplier": 1, "narrow": 0.0625}
TEMP_MARK = ".gpen-watch."


def have_shared_data() -> bool:
    return DETECTOR.is_file() and SOLVAY.is_file()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def face_photo(index: int, fmt: str = "JPEG", width: int = 420) -> bytes:
    """A crop of the Solvay photo that holds several faces; ``index`` picks a different crop."""
    with Image.open(SOLVAY) as im:
        rgb = im.convert("RGB")
    x = (index * 97) % (rgb.width - width)
    crop = rgb.crop((x, 100, x + width, 330))
    buf = io.BytesIO()
    crop.save(buf, fmt, quality=92) if fmt == "JPEG" else crop.save(buf, fmt)
    return buf.getvalue()


def plain_photo(seed: int = 0, size: tuple[int, int] = (320, 240)) -> bytes:
    """A smooth gradient with no face in it."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // w), (yy * 255 // h), np.full_like(xx, (seed * 37) % 256)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Layout:
    root: Path
    hot: dict[str, Path] = field(default_factory=dict)
    out: dict[str, Path] = field(default_factory=dict)
    backup: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, Path] = field(default_factory=dict)

    def all_dirs(self) -> list[Path]:
        return [*self.hot.values(), *self.out.values(), *self.backup.values(), *self.failed.values()]


def make_models_dir(root: Path) -> Path:
    from gpen_engine.gpen import GpenArch, create_generator

    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DETECTOR, models / DETECTOR.name)
    torch.manual_seed(0)
    torch.save(create_generator(GpenArch(**TINY_ARCH)).state_dict(), models / "tiny-gpen.pth")
    return models


def write_config(
    root: Path,
    *,
    folders: Iterable[tuple[str, str]] = (("a", "test"),),
    watch: str = "poll",
    stability_delay: float = 0.3,
    max_ready_wait: float = 4.0,
    extra: str = "",
    preset_extra: str = "",
) -> tuple[Path, Layout]:
    """A config with a tiny-model preset ``test`` (and ``test2``), one hot folder per (name, preset)."""
    models = make_models_dir(root)
    layout = Layout(root)
    lines = [
        f'models_dir = "{models}"',
        f'state_dir = "{root / "state"}"',
        "download = false",
        'device = "cpu"',
        "poll_interval = 0.2",
        "rescan_interval = 1.0",
        f"max_ready_wait = {max_ready_wait}",
        "max_batch_delay = 0.2",
        "retry_backoff = 0.5",
        "retry_backoff_max = 2.0",
        'log_format = "json"',
        extra,
        "[[models]]",
        'name = "tiny"',
        'path = "tiny-gpen.pth"',
        *(f"{k} = {v}" for k, v in TINY_ARCH.items()),
    ]
    for name in ("test", "test2"):
        lines += [
            f"[presets.{name}]",
            'base = "low-spec"',
            'model = "tiny"',
            'detector = "mobile0.25"',
            "use_parsing = false",
            "batch_size = 4",
            "max_long_side = 800",
            "det_confidence = 0.9",
            preset_extra,
        ]
    for name, preset in folders:
        for kind, table in (("in", layout.hot), ("out", layout.out), ("backup", layout.backup),
                            ("failed", layout.failed)):
            table[name] = root / kind / name
        lines += [
            "[[folders]]",
            f'path = "{layout.hot[name]}"',
            f'preset = "{preset}"',
            f'output = "{layout.out[name]}"',
            f'backup = "{layout.backup[name]}"',
            f'failed = "{layout.failed[name]}"',
            f'watch = "{watch}"',
            f"stability_delay = {stability_delay}",
        ]
    for d in layout.all_dirs():
        d.mkdir(parents=True, exist_ok=True)
    config = root / "gpen-watch.toml"
    config.write_text("\n".join(lines) + "\n")
    return config, layout


@dataclass
class Daemon:
    """The real `gpen-watch run` in a subprocess, its JSON log captured to a file."""

    config: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self) -> Daemon:
        self.log_path = self.config.with_name(f"daemon-{time.monotonic_ns()}.log")
        # The code of this checkout, even where another checkout is installed in the environment (editable).
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **self.env}
        env.pop("NOTIFY_SOCKET", None) if "NOTIFY_SOCKET" not in self.env else None
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.config.parent,
        )
        return self

    def log_lines(self) -> list[dict[str, object]]:
        assert self.log_path is not None
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            text = line[line.index(">") + 1:] if line.startswith("<") else line
            try:
                out.append(json.loads(text))
            except ValueError:
                out.append({"event": text})
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wait_for(condition: Callable[[], bool], timeout: float, daemon: Daemon | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if daemon is not None and not daemon.running():
            raise AssertionError(f"daemon exited early ({daemon.proc.returncode}) waiting for {what}:\n"
                                 + daemon.log_text()[-4000:])
        time.sleep(0.2)
    tail = daemon.log_text()[-4000:] if daemon else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def temp_leftovers(layout: Layout) -> list[Path]:
    return [p for d in layout.all_dirs() for p in files_under(d) if p.name.startswith(TEMP_MARK)]


def _same_stem(path: Path, stem: str) -> bool:
    """``name.ext`` or a collision-suffixed ``name (N).ext``; never a temporary file."""
    return not path.name.startswith(TEMP_MARK) and re.fullmatch(re.escape(stem) + r"( \(\d+\))?", path.stem) is not None


@dataclass
class Accounting:
    """Where every input ended up: published (output + identical backup) or failed (original + sidecar)."""

    published: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, Path] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    bad_backup: list[str] = field(default_factory=list)

    @property
    def settled(self) -> int:
        return len(self.published) + len(self.failed)


def _index(root: Path) -> dict[tuple[Path, str], list[Path]]:
    """Files under ``root`` by (folder, stem without a collision suffix); temporary files left out."""
    found: dict[tuple[Path, str], list[Path]] = {}
    for p in files_under(root):
        if p.name.startswith(TEMP_MARK):
            continue
        name = p.name[: -len(".error.json")] if p.name.endswith(".error.json") else p.name
        stem = re.sub(r" \(\d+\)\Z", "", Path(name).stem)
        found.setdefault((p.parent, stem), []).append(p)
    return found


def _matches(index: dict[tuple[Path, str], list[Path]], root: Path, relpath: str) -> list[Path]:
    target = root / relpath
    return [p for p in index.get((target.parent, target.stem), []) if _same_stem(p, target.stem)]


def account(layout: Layout, inputs: dict[tuple[str, str], bytes], *, read: bool = True) -> Accounting:
    """Match each input (folder, relpath) -> original bytes against the output, backup and failed trees.

    ``read=False`` skips comparing backup bytes (a cheap progress check while waiting).
    """
    acc = Accounting()
    indexes: dict[Path, dict[tuple[Path, str], list[Path]]] = {}

    def matches(root: Path, relpath: str) -> list[Path]:
        if root not in indexes:
            indexes[root] = _index(root)
        return _matches(indexes[root], root, relpath)

    for (folder, relpath), data in inputs.items():
        key = f"{folder}/{relpath}"
        outs = matches(layout.out[folder], relpath)
        backups = matches(layout.backup[folder], relpath)
        if read and any(p.read_bytes() != data for p in backups):
            acc.bad_backup.append(key)
        failed = [p for p in matches(layout.failed[folder], relpath) if not p.name.endswith(".error.json")]
        if outs and backups:
            acc.published[key] = outs[0]
            if len(outs) > 1 or len(backups) > 1:
                acc.duplicated.append(key)
        elif failed and failed[0].with_name(failed[0].name + ".error.json").is_file():
            acc.failed[key] = failed[0]
        elif failed:
            # The original lands in failed/ a moment before its sidecar (so a crash between loses nothing);
            # until the sidecar is there the file is not settled, and if it never comes it is lost.
            acc.lost.append(key + " (failed without sidecar)")
        else:
            acc.lost.append(key)
    return acc


# ------------------------------------------------------------------------------------------------------------
# Fault-injection, bad-input and load helpers (issue 6). The scenario runners below are shared by the CI tests
# (short form) and tools/reliability.py (long form), so the published figures come from the same code.

READY_EVENT = "gpen-watch ready"


def drop(path: Path, data: bytes) -> None:
    """Put a file into a hot folder the way a careful client does: a hidden temporary name, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".incoming-" + path.name)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def small_face_photo(index: int, fmt: str = "JPEG") -> bytes:
    """A small (160x230) crop of the Solvay photo with one or two faces in it; cheap to restore on a CPU."""
    return face_photo(index, fmt, width=160)


def is_ready(daemon: Daemon) -> bool:
    return daemon.log_path is not None and READY_EVENT in daemon.log_text()


def wait_ready(daemon: Daemon, timeout: float = 120) -> None:
    wait_for(lambda: is_ready(daemon), timeout, daemon, "the daemon to be ready")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB, or 0 when it cannot be read (the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def sidecar_of(stored: Path) -> dict[str, object]:
    return json.loads(stored.with_name(stored.name + ".error.json").read_text())


def failure_reasons(acc: Accounting) -> dict[str, int]:
    """How many inputs failed at each stage (the sidecar's ``stage``)."""
    reasons: dict[str, int] = {}
    for stored in acc.failed.values():
        try:
            stage = str(sidecar_of(stored).get("stage"))
        except (OSError, ValueError):
            stage = "no sidecar"
        reasons[stage] = reasons.get(stage, 0) + 1
    return reasons


def partial_outputs(layout: Layout) -> list[Path]:
    """Files under final names in the output trees that are not complete images (a torn write would show here)."""
    from gpen_engine import imageio
    from gpen_engine.types import InputError

    bad = []
    for root in layout.out.values():
        for path in files_under(root):
            if path.name.startswith(TEMP_MARK):
                continue
            try:
                imageio.check_complete(path.read_bytes())
            except InputError:
                bad.append(path)
    return bad


def strays(layout: Layout, inputs: dict[tuple[str, str], bytes]) -> list[Path]:
    """Files in output/backup trees that belong to no input: a result published under a second, wrong name."""
    wanted = {(folder, Path(rel).parent.as_posix(), Path(rel).stem) for folder, rel in inputs}
    found = []
    for folder in {f for f, _ in inputs}:
        for root in (layout.out[folder], layout.backup[folder]):
            for path in files_under(root):
                rel = path.relative_to(root)
                stem = re.sub(r" \(\d+\)\Z", "", rel.stem)
                if (folder, rel.parent.as_posix(), stem) not in wanted:
                    found.append(path)
    return found


@dataclass
class Figures:
    """One row of the reliability table."""

    scenario: str
    files_in: int
    files_out: int
    failed: dict[str, int]
    lost: int
    duplicated: int
    peak_rss_mib: float
    files_per_s: float
    note: str = ""

    HEADER = ("scenario", "files in", "files out", "failed (reason)", "lost", "duplicated", "peak RSS MiB",
              "files/s", "note")

    def cells(self) -> list[str]:
        failed = ", ".join(f"{n} {stage}" for stage, n in sorted(self.failed.items())) or "0"
        return [self.scenario, str(self.files_in), str(self.files_out), failed, str(self.lost),
                str(self.duplicated), f"{self.peak_rss_mib:.0f}", f"{self.files_per_s:.2f}", self.note]


def figures_table(rows: Iterable[Figures], *, markdown: bool) -> str:
    cells = [list(Figures.HEADER), *(r.cells() for r in rows)]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "---|" * len(Figures.HEADER))
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(Figures.HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def _figures(scenario: str, layout: Layout, inputs: dict[tuple[str, str], bytes], acc: Accounting,
             rss: float, seconds: float, note: str = "") -> Figures:
    return Figures(
        scenario=scenario, files_in=len(inputs), files_out=len(acc.published), failed=failure_reasons(acc),
        lost=len(acc.lost), duplicated=len(acc.duplicated) + len(acc.bad_backup) + len(strays(layout, inputs)),
        peak_rss_mib=rss, files_per_s=acc.settled / seconds if seconds > 0 else 0.0, note=note,
    )


def run_kill_rounds(root: Path, *, files: int, kills: int, seed: int, max_delay: float = 2.5,
                    timeout: float = 600) -> tuple[Figures, Layout, dict[tuple[str, str], bytes]]:
    """Drop ``files`` photos, SIGKILL the daemon ``kills`` times at random moments, then let it finish.

    Most kills land after the daemon is ready, at a random delay up to ``max_delay`` s (mid-batch, mid-publish);
    one in four lands during start-up (model loading, the first scan, requeueing).
    """
    import random

    rng = random.Random(seed)
    # The crash-loop guard gives up on a file found in flight at max_attempts crashes; random kills can hit the
    # same batch that often, and the guard cannot tell them from a file that kills the daemon. Raised here so the
    # figures count what the kills did to good files, not the guard's (documented) verdict.
    config, layout = write_config(root, extra="max_attempts = 50")
    inputs = {("a", f"k{i:04d}.jpg"): small_face_photo(i) for i in range(files)}
    # Files arrive in waves, one before each start, so that every round has work in flight when it is killed.
    items = list(inputs.items())
    waves = [items[i::kills + 1] for i in range(kills + 1)]
    started = time.monotonic()
    rss = 0.0
    done_kills = 0
    while done_kills < kills:
        for (_, rel), data in waves[done_kills]:
            drop(layout.hot["a"] / rel, data)
        daemon = Daemon(config).start()
        assert daemon.proc is not None
        try:
            if rng.random() < 0.25:
                time.sleep(rng.uniform(0.2, 3.0))
            else:
                wait_ready(daemon)
                time.sleep(rng.uniform(0.0, max_delay))
            rss = max(rss, peak_rss_mib(daemon.proc.pid))
        finally:
            daemon.kill()
        done_kills += 1
    for (_, rel), data in waves[-1]:
        drop(layout.hot["a"] / rel, data)
    final = Daemon(config).start()
    assert final.proc is not None
    try:
        wait_ready(final)
        wait_for(lambda: account(layout, inputs, read=False).settled == len(inputs), timeout, final,
                 "every file settled")
        wait_for(lambda: files_under(layout.hot["a"]) == [], 30, final, "hot folder empty")
        rss = max(rss, peak_rss_mib(final.proc.pid))
    finally:
        code = final.stop()
    seconds = time.monotonic() - started
    assert code == 0, final.log_text()[-3000:]
    acc = account(layout, inputs)
    return _figures(f"SIGKILL x{done_kills}", layout, inputs, acc, rss, seconds), layout, inputs


def run_load(root: Path, *, per_folder: int, trickle: int, trickle_every: float = 0.2,
             timeout: float = 900,
             ) -> tuple[Figures, Layout, dict[tuple[str, str], bytes], dict[str, tuple[float, float]]]:
    """``per_folder`` small images dropped at once into three folders (presets test, test2, test) while
    ``trickle`` more arrive one by one in a fourth folder (preset test2); returns the figures and, per file
    ("folder/relpath"), when it was dropped and when its result was first seen (monotonic seconds)."""
    import threading

    folders = (("a", "test"), ("b", "test2"), ("c", "test"), ("t", "test2"))
    config, layout = write_config(root, folders=folders, extra="io_threads = 4")
    daemon = Daemon(config).start()
    assert daemon.proc is not None
    inputs: dict[tuple[str, str], bytes] = {}
    dropped_at: dict[str, float] = {}
    try:
        wait_ready(daemon)
        started = time.monotonic()
        bulk = {}
        for name, _ in folders[:3]:
            for i in range(per_folder):
                data = small_face_photo(i) if i % 3 else plain_photo(i, (160, 120))
                bulk[(name, f"sub{i % 4}/l{i:05d}." + ("jpg" if i % 3 else "png"))] = data
        inputs.update(bulk)
        for (name, rel), data in bulk.items():
            drop(layout.hot[name] / rel, data)
            dropped_at[f"{name}/{rel}"] = time.monotonic()

        def trickle_files() -> None:
            for i in range(trickle):
                rel = f"t{i:04d}.jpg"
                inputs[("t", rel)] = small_face_photo(1000 + i)
                drop(layout.hot["t"] / rel, inputs[("t", rel)])
                dropped_at[f"t/{rel}"] = time.monotonic()
                time.sleep(trickle_every)

        feeder = threading.Thread(target=trickle_files, daemon=True)
        feeder.start()
        published_at: dict[str, float] = {}

        def all_settled() -> bool:
            alive = feeder.is_alive()
            wanted = dict(inputs)  # a copy: the feeder thread adds to ``inputs`` meanwhile
            acc = account(layout, wanted, read=False)
            now = time.monotonic()
            for key in (*acc.published, *acc.failed):
                published_at.setdefault(key, now)
            return not alive and acc.settled == len(wanted)

        wait_for(all_settled, timeout, daemon, "every file settled")
        seconds = time.monotonic() - started
        rss = peak_rss_mib(daemon.proc.pid)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_text()[-3000:]
    acc = account(layout, inputs)
    timeline = {key: (dropped_at[key], published_at[key]) for key in published_at if key in dropped_at}
    longest = max((b - a for a, b in timeline.values()), default=0)
    trickled = max((b - a for key, (a, b) in timeline.items() if key.startswith("t/")), default=0)
    note = f"longest wait {longest:.0f} s (bulk), {trickled:.0f} s (trickle)"
    figures = _figures(f"load {3 * per_folder}+{trickle} trickle", layout, inputs, acc, rss, seconds, note)
    return figures, layout, inputs, timeline
