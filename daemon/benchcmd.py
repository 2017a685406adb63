"""``gpen-watch bench``: measure the engine on real photos (``--images DIR``) or on synthetic sets.

The synthetic sets are built from the Solvay 1927 group photo (29 faces) when it can be found beside the
repository (``../shared/testdata``), in ``shared/testdata`` inside it, or in ``tests/data``: the photo itself
and a 24-megapixel JPEG made from it. The measuring itself lives in ``gpen_engine.bench``; this module finds
files, loads models and prints.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from daemon.modelfiles import MissingModelError, models_of, resolve_path
from daemon.oneshot import RANDOM_WEIGHTS_WARNING, collect_inputs, load_models
from daemon.paths import UnsafePath, read_no_follow
from daemon.settings import ConfigError, Settings, engine_options, preset_table, settings_from_args
from gpen_engine import imageio
from gpen_engine.align import template
from gpen_engine.bench import BenchModels, format_report, run_benchmark, synthetic_sets
from gpen_engine.options import Preset
from gpen_engine.precision import resolve_precision
from gpen_engine.registry import parser_spec
from gpen_engine.restorer import EngineModels, Restorer
from gpen_engine.types import EngineError, InputError

PORTRAITS_GPU, PORTRAITS_CPU = 64, 4
_REPO = Path(__file__).resolve().parents[1]
SAMPLE_PHOTOS = (
    _REPO.parent / "shared" / "testdata" / "solvay_1927.png",
    _REPO / "shared" / "testdata" / "solvay_1927.png",  # a lent GPU machine gets only the checkout
    _REPO / "tests" / "data" / "solvay_1927.png",
)


def command(args: Any) -> int:
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        settings = settings_from_args(args)
        presets = preset_table(settings)
    except ConfigError as exc:
        log(f"error: {exc}")
        return 2
    if args.preset not in presets:
        log(f"error: unknown preset {args.preset!r} (known: {', '.join(sorted(presets))})")
        return 2
    preset = presets[args.preset]
    if args.batch is not None:
        preset = preset.with_(batch_size=args.batch)
    if args.json and (problem := _unwritable(Path(args.json))):
        log(f"error: --json {args.json}: {problem}")  # found now, not after minutes of measuring
        return 2
    if args.random_weights:
        log(RANDOM_WEIGHTS_WARNING)
    try:
        models = load_models(settings, preset, device=args.device, random_weights=bool(args.random_weights),
                             random_parser=bool(args.random_weights), log=log)
    except (MissingModelError, EngineError) as exc:
        log(f"error: {exc}")
        return 2
    # Single-portrait throughput matters on a GPU; on a CPU a few portraits show the trend.
    portraits = PORTRAITS_GPU if models.device.type == "cuda" else PORTRAITS_CPU
    try:
        sets = photo_sets(args.images, settings.extensions, max_pixels=settings.max_pixels,
                          detector=models.detector, portraits=portraits, log=log)
    except (OSError, ValueError, EngineError) as exc:
        log(f"error: {exc}")
        return 2
    restorer = Restorer(models, preset)
    bench_models = BenchModels(
        detector=models.detector, generator=models.generator, device=models.device,
        precision=resolve_precision(models.device, preset.precision), size=models.face_size,
        template=template(models.face_size), restore=restorer.restore, mask=_mask_kind(models, preset, settings),
    )
    report = run_benchmark(
        bench_models, engine_options(settings, preset), sets, model_name=preset.model,
        random_weights=bool(args.random_weights), repeat=args.repeat, baseline=bool(args.baseline),
        io_threads=settings.io_threads, images_per_call=max(8, preset.batch_size), log=log,
    )
    print(format_report(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        except OSError as exc:
            log(f"error: --json {args.json}: {exc.strerror or exc}")
            return 1
    return 0


def _mask_kind(models: EngineModels, preset: Preset, settings: Settings) -> str:
    """Which paste mask the engine's figures include, for the report."""
    if models.parser is None or not preset.use_parsing:
        return "rectangle"
    # load_models (asked for random_parser) gives a random-weight parser exactly when the file is missing.
    present = resolve_path(settings, parser_spec(models_of(settings))).is_file()
    return "parsing" if present else "parsing, random weights"


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot take the JSON report, or None."""
    if path.is_dir():
        return "is a folder"
    folder = path.parent
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "not writable"
    return None


def photo_sets(images: str | None, extensions: list[str], *, max_pixels: int, detector: nn.Module | None = None,
               portraits: int = 0, log: Callable[[str], object] = print) -> dict[str, list[bytes]]:
    """``--images DIR``'s photos as one set, else the synthetic sets built from the sample photo.

    Files that are not complete images are left out with a note: counted in, they would make the
    images per second look faster than any real photo goes.
    """
    if images:
        items, problems = collect_inputs([Path(images)], None, extensions)
        if problems:
            raise ValueError("; ".join(problems))
        data = []
        for item in items:
            try:
                content = read_no_follow(item.source)[0]
                imageio.check_complete(content, max_pixels=max_pixels)
            except (OSError, UnsafePath, InputError) as exc:
                log(f"note: left out {item.source}: {exc}")
                continue
            data.append(content)
        if not data:
            raise ValueError(f"{images}: no usable images found")
        return {Path(images).name or "images": data}
    for path in SAMPLE_PHOTOS:
        if path.is_file():
            return synthetic_sets(path.read_bytes(), detector=detector, portraits=portraits,
                                  max_pixels=max_pixels)
    raise ValueError("no sample photo found (looked for " + ", ".join(map(str, SAMPLE_PHOTOS))
                     + "); pass --images DIR with photos that have faces")
