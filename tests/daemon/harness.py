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
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
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


def account(layout: Layout, inputs: dict[tuple[str, str], bytes]) -> Accounting:
    """Match each input (folder, relpath) -> original bytes against the output, backup and failed trees."""
    acc = Accounting()
    for (folder, relpath), data in inputs.items():
        key = f"{folder}/{relpath}"
        stem = Path(relpath).with_suffix("")
        outs = [p for p in files_under(layout.out[folder]) if _same_stem(p, stem.name)
                and p.parent == (layout.out[folder] / relpath).parent]
        backups = [p for p in files_under(layout.backup[folder])
                   if _same_stem(p, stem.name) and p.parent == (layout.backup[folder] / relpath).parent]
        if any(p.read_bytes() != data for p in backups):
            acc.bad_backup.append(key)
        failed = [p for p in files_under(layout.failed[folder])
                  if not p.name.endswith(".error.json") and _same_stem(p, stem.name)
                  and p.parent == (layout.failed[folder] / relpath).parent]
        if outs and backups:
            acc.published[key] = outs[0]
            if len(outs) > 1 or len(backups) > 1:
                acc.duplicated.append(key)
        elif failed:
            acc.failed[key] = failed[0]
            if not failed[0].with_name(failed[0].name + ".error.json").is_file():
                acc.lost.append(key + " (failed without sidecar)")
        else:
            acc.lost.append(key)
    return acc
