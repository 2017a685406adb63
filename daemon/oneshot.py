"""``gpen-watch enhance PATH...``: restore files or folders once, with a progress bar, and exit.

Pipeline: read + decode in a thread pool -> the engine restores several images per call (faces from
all of them share generator batches) -> encode + write in the pool. A bad file costs one error line
and the run goes on. Results go beside each input as ``NAME.restored.EXT`` or into ``-o DIR``
(folders keep their inner structure). Nothing is ever overwritten: an input never, and an existing
output neither (``NAME.restored (1).EXT``); every file appears complete or not at all.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from daemon.executor import Raised, device_lost, run_narrowing
from daemon.modelfiles import MissingModelError, ensure_models, models_of
from daemon.paths import (
    FileTooLarge,
    UnsafePath,
    is_candidate,
    is_ignored_name,
    max_file_bytes,
    normalize_extensions,
    read_no_follow,
)
from daemon.publish import fit_stem, write_atomic
from daemon.settings import ConfigError, Settings, engine_options, preset_table, settings_from_args
from gpen_engine import imageio
from gpen_engine.device import select_device
from gpen_engine.options import EncodeOptions, EngineOptions, Preset
from gpen_engine.registry import detector_spec, parser_spec
from gpen_engine.restorer import EngineModels, Restorer, WorkingImage, load_engine_models, prepare_image
from gpen_engine.types import DecodedImage, EngineError, RestoredImage

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --random-weights: the generator has RANDOM weights. Outputs are NOT restorations; "
    "use this only to test the pipeline."
)
# Our own outputs: re-running on a folder must not restore its earlier results again.
_OWN_OUTPUT = re.compile(r"\.(restored|compare)( \(\d+\))?\.[^.]+\Z", re.IGNORECASE)
_COMPARE_HALF = 2048  # long side of each half of a before/after image


@dataclass(frozen=True)
class Item:
    """One input file and where its result goes."""

    source: Path
    target_dir: Path
    stem: str  # result name without extension


@dataclass
class Decoded:
    item: Item
    data: bytes  # the file as read: a photo without faces is written as it was
    image: DecodedImage
    working: WorkingImage


@dataclass
class Names:
    """Result names, handed out in input order.

    Two inputs can want one name (``x.jpg`` and ``x.jpeg``; ``a/p.jpg`` and ``b/p.jpg`` into one
    ``-o``). Claiming names here, in order, rather than when each parallel write lands, means the
    first input always gets the plain name and the next ``NAME (1)``, run after run.
    """

    claimed: set[Path] = field(default_factory=set)

    def claim(self, folder: Path, stem: str, ext: str) -> Path:
        for path in _numbered(folder, stem, ext):
            if path not in self.claimed and not os.path.lexists(path):
                self.claimed.add(path)
                return path
        raise FileExistsError(f"no free name for {folder / (stem + ext)}")


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    faces: int = 0
    interrupted: bool = False  # Ctrl-C: the files neither ok nor failed were not done
    device_lost: str | None = None  # the device stopped computing: the files neither ok nor failed were not done


def command(args: Any) -> int:
    try:
        settings = settings_from_args(args)
        presets = preset_table(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.preset not in presets:
        print(f"error: unknown preset {args.preset!r} (known: {', '.join(sorted(presets))})", file=sys.stderr)
        return 2
    preset = presets[args.preset]
    random_weights = bool(getattr(args, "random_weights", False))
    if random_weights:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)

    output = Path(args.output).expanduser() if args.output else None
    if output is not None:
        try:  # before any work: an unusable -o would otherwise fail every file after restoring it
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = "a file, not a folder" if output.exists() and not output.is_dir() else exc.strerror or exc
            print(f"error: output folder {output}: {why}", file=sys.stderr)
            return 2
    skipped: list[tuple[Path, str]] = []
    items, problems = collect_inputs([Path(p) for p in args.paths], output, settings.extensions, skipped)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    _say_skipped(skipped)
    if not items:
        print("error: no image files to restore", file=sys.stderr)
        return 1

    try:
        models = load_models(settings, preset, device=args.device, random_weights=random_weights)
    except (MissingModelError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = engine_options(settings, preset)
    tally = run(items, Restorer(models, preset), options, io_threads=settings.io_threads,
                compare=bool(args.compare), log=lambda m: tqdm.write(m, file=sys.stderr))
    tally.failed += len(problems)
    summary = f"{tally.ok} ok, {tally.failed} failed, {tally.faces} faces" + (
        f", {len(skipped)} skipped" if skipped else "")
    if tally.device_lost is not None:
        not_done = len(items) + len(problems) - tally.ok - tally.failed
        print(f"error: the device stopped working ({tally.device_lost}); even a blank test image fails, so the "
              f"run stopped: {summary}, {not_done} not done", file=sys.stderr)
        return 1
    if tally.interrupted:
        not_done = len(items) + len(problems) - tally.ok - tally.failed
        print(f"interrupted: {summary}, {not_done} not done", file=sys.stderr)
        return 130
    print(summary, file=sys.stderr)
    if random_weights:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    return 1 if tally.failed else 0


def _say_skipped(skipped: list[tuple[Path, str]], shown: int = 3) -> None:
    """One line per reason, naming the first few files: found in the folders, left alone, never silently."""
    by_reason: dict[str, list[Path]] = {}
    for path, why in skipped:
        by_reason.setdefault(why, []).append(path)
    for why, paths in by_reason.items():
        names = ", ".join(str(p) for p in paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown
                                                           else "")
        print(f"skipped {len(paths)} file(s), {why}: {names}", file=sys.stderr)


def load_models(settings: Settings, preset: Preset, *, device: str | None, random_weights: bool,
                random_parser: bool = False,
                log: Callable[[str], object] = lambda m: print(m, file=sys.stderr)) -> EngineModels:
    """The preset's generator, detector and (when asked for and present) parser, on the chosen device.

    ``random_parser``: a preset that asks for parsing without the parser's weights gets a random-weight parser
    (``bench``: so that the figures include the parser's cost), not the rectangle mask.
    """
    table = models_of(settings)
    if preset.model not in table or table[preset.model].arch is None:
        raise MissingModelError(f"preset {preset.name}: unknown generator model {preset.model!r}")
    spec = table[preset.model]
    arch = spec.arch
    assert arch is not None  # checked above
    detector = detector_spec(preset.detector, table)
    names = [detector.name] + ([] if random_weights else [spec.name])
    paths = ensure_models(settings, names, download=settings.download, log=log)
    parser_path = None
    if preset.use_parsing:
        try:
            parser_path = ensure_models(settings, [parser_spec(table).name], download=settings.download,
                                        log=log)[parser_spec(table).name]
        except MissingModelError as exc:
            if random_parser:
                log("note: no face-parsing weights; timing a parser with RANDOM weights (its masks are meaningless)")
            else:
                log(f"note: no face-parsing weights, using the rectangle mask ({exc})")
    request = device or (preset.device if preset.device != "auto" else settings.device)
    report = select_device(request)
    log(f"device: {report.name} ({report.reason})")
    return load_engine_models(
        generator_path=None if random_weights else paths[spec.name],
        arch=arch,
        detector_path=paths[detector.name],
        detector_name=preset.detector,
        parser_path=parser_path,
        device=report.device,
        precision=preset.precision,
        random_generator=random_weights,
        random_parser=random_parser and preset.use_parsing and parser_path is None,
    )


# ----------------------------------------------------------------------------------------- inputs


def collect_inputs(
    paths: list[Path], output: Path | None, extensions: list[str], skipped: list[tuple[Path, str]] | None = None,
) -> tuple[list[Item], list[str]]:
    """Files to restore (folders walked recursively) and a message for each argument that cannot be used.

    Inside folders only candidate images count: junk, hidden and temporary names are passed over; other
    extensions, symbolic links and this command's own earlier outputs are skipped, each added to ``skipped``
    with why; a folder that cannot be read is a problem, not a silent gap. A file named on the command line is
    read even through a link (the user chose it); its result goes beside the name given. A result that would
    land in its source's own folder is always marked ``.restored``, so that a later run does not take it for
    an input.
    """
    exts = normalize_extensions(extensions)
    # An -o inside a folder being walked: its results would be inputs to the next run on that folder.
    out = output.resolve() if output is not None else None
    mark = out is not None and any(
        p.is_dir() and (out == p.resolve() or p.resolve() in out.parents) for p in paths
    )
    items: list[Item] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
            continue
        if stat.S_ISDIR(st.st_mode):
            for rel in _walk(path, exts, output, problems, [] if skipped is None else skipped):
                source = path / rel
                _add(items, seen, _item(source, source, (output / rel).parent if output else source.parent, mark))
        elif stat.S_ISREG(st.st_mode):
            _add(items, seen, _item(Path(os.path.realpath(path)), path, output or path.parent, mark))
        else:
            problems.append(f"{path}: not a regular file or folder")
    return items, problems


def _item(source: Path, named: Path, target_dir: Path, mark: bool = False) -> Item:
    beside = mark or _same_folder(target_dir, named.parent)
    return Item(source, target_dir, named.stem + ".restored" if beside else named.stem)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # not there yet: only -o creates folders, and only new ones
        return a.resolve() == b.resolve()


def _add(items: list[Item], seen: set[Path], item: Item) -> None:
    key = item.source.resolve()  # the same file however it was spelled or linked
    if key not in seen:
        seen.add(key)
        items.append(item)


def _walk(root: Path, exts: frozenset[str], output: Path | None, problems: list[str],
          skipped: list[tuple[Path, str]]) -> Iterator[str]:
    """POSIX relative paths of candidate images below ``root``, sorted, never through a link."""
    skip = output.resolve() if output else None

    def unreadable(exc: OSError) -> None:
        problems.append(f"{exc.filename}: cannot read folder: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if skip is None or (here / d).resolve() != skip)
        for name in sorted(filenames):
            full = here / name
            rel = full.relative_to(root).as_posix()
            if any(is_ignored_name(part) for part in rel.split("/")):
                continue  # junk, hidden and temporary names: not the user's photos
            if full.is_symlink():
                skipped.append((full, "links inside folders are not followed"))
            elif not is_candidate(rel, exts):
                skipped.append((full, "not an image type that is restored"))
            elif _OWN_OUTPUT.search(name):
                skipped.append((full, "a result of an earlier run (.restored, .compare)"))
            else:
                yield rel


# ----------------------------------------------------------------------------------------- run


def run(items: list[Item], restorer: Restorer, options: EngineOptions, *, io_threads: int = 4,
        compare: bool = False, log: Callable[[str], object] = print) -> Tally:
    """Restore every item; each failure is logged with its file name and counted, never raised."""
    per_call = max(4, options.preset.batch_size)  # images per engine call: their faces share batches
    tally = Tally()
    t0 = time.perf_counter()
    with (ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="enhance-io") as pool,
          tqdm(total=len(items), unit="img", file=sys.stderr, dynamic_ncols=True) as bar):
        # Decoding runs ahead of the engine, but only so far: a folder of camera files must not fill memory.
        pending: deque[Future[Decoded | str]] = deque()
        queue = iter(items)
        writes: deque[tuple[Future[tuple[Item, str | None]], int]] = deque()
        names = Names()

        def top_up() -> None:
            while len(pending) < 2 * per_call:
                item = next(queue, None)
                if item is None:
                    return
                pending.append(pool.submit(_read_decode, item, options))

        def finish_writes(block: bool) -> None:
            while writes and (block or writes[0][0].done()):
                done, faces = writes.popleft()
                item, error = done.result()
                if error:
                    tally.failed += 1
                    log(f"error: {item.source}: {error}")
                else:
                    tally.ok += 1
                    tally.faces += faces
                bar.update(1)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{tally.faces / elapsed:.2f} faces/s, {tally.faces} faces")

        try:
            top_up()
            while pending:
                chunk: list[Decoded] = []
                while pending and len(chunk) < per_call:
                    got = pending.popleft().result()
                    top_up()
                    if isinstance(got, str):
                        tally.failed += 1
                        log(f"error: {got}")
                        bar.update(1)
                    else:
                        for note in ("damaged", "dropped"):
                            if text := got.image.info.get(note):
                                log(f"warning: {got.item.source}: {text}")
                        chunk.append(got)
                if not chunk:
                    continue
                results = _restore(restorer, chunk)
                if (lost := device_lost(results, restorer.warm_up)) is not None:
                    # Every later file would fail the same way: stop, and say the rest was not done.
                    tally.device_lost = str(lost) or type(lost).__name__
                    for future in pending:
                        future.cancel()
                    break
                for decoded, result in zip(chunk, results, strict=True):
                    if isinstance(result, EngineError | Raised):
                        tally.failed += 1
                        reason = result.error if isinstance(result, Raised) else result
                        log(f"error: {decoded.item.source}: {str(reason) or type(reason).__name__}")
                        bar.update(1)
                        continue
                    try:
                        targets = _targets(names, decoded, options, compare)
                    except (OSError, ValueError) as exc:
                        tally.failed += 1
                        log(f"error: {decoded.item.source}: cannot write result: {exc}")
                        bar.update(1)
                        continue
                    if targets[0].stem != decoded.item.stem:  # the plain name was taken: say which input this is
                        log(f"{decoded.item.source}: its result is {targets[0].name} "
                            f"({decoded.item.stem}{targets[0].suffix} was taken)")
                    writes.append((pool.submit(_encode_write, decoded, result, options, *targets), len(result.faces)))
                finish_writes(block=False)
        except KeyboardInterrupt:
            # Ctrl-C: read and restore nothing more. Results already handed to the pool are still
            # written whole (each write is atomic) and counted, so the summary says what exists.
            tally.interrupted = True
            for future in pending:
                future.cancel()
        finish_writes(block=True)
    return tally


def _restore(restorer: Restorer, chunk: list[Decoded]) -> list[RestoredImage | EngineError | Raised]:
    """The engine's outcome per image; a call that raises is narrowed down to the image that makes it raise."""
    return run_narrowing(lambda part: restorer.restore([d.working for d in part]), chunk, lambda *_: None)


def _read_decode(item: Item, options: EngineOptions) -> Decoded | str:
    """The decoded item, or an error line naming the file."""
    try:
        data, _ = read_no_follow(item.source, max_bytes=max_file_bytes(options.decode.max_pixels))
        if not data:
            return f"{item.source}: empty file (0 bytes)"
        image = imageio.decode(data, max_pixels=options.decode.max_pixels, long_side=options.preset.max_long_side)
        return Decoded(item, data, image, prepare_image(image.rgb, options.preset))
    except FileTooLarge as exc:
        return f"file too large: {exc}"
    except MemoryError:  # the other files, one at a time, may still fit
        return f"{item.source}: not enough memory to read and decode it"
    except (OSError, UnsafePath) as exc:
        return f"{item.source}: cannot read: {getattr(exc, 'strerror', None) or exc}"
    except EngineError as exc:
        return f"{item.source}: {exc}"


def _targets(names: Names, decoded: Decoded, options: EngineOptions, compare: bool) -> tuple[Path, Path | None]:
    """Where the result (and the before/after image) of ``decoded`` go: names claimed now, in input order."""
    item = decoded.item
    ext = imageio.extension_for(options.encode.format or decoded.image.format)
    result = names.claim(item.target_dir, item.stem, ext)
    side = names.claim(item.target_dir, item.stem.removesuffix(".restored") + ".compare", ".jpg") if compare else None
    return result, side


def _encode_write(decoded: Decoded, result: RestoredImage, options: EngineOptions,
                  target: Path, compare_target: Path | None) -> tuple[Item, str | None]:
    item = decoded.item
    try:
        data, _ = imageio.encode_result(decoded.data, decoded.image, result.rgb, restored=bool(result.faces),
                                        options=options.encode, max_pixels=options.decode.max_pixels)
        _write_claimed(target, data)
        if compare_target is not None:
            side = side_by_side(decoded.working.rgb, result.rgb)
            jpeg, _ = imageio.encode(DecodedImage(rgb=side, format="JPEG", mode="RGB"), side,
                                     options=EncodeOptions(format="JPEG", jpeg_quality=90))
            _write_claimed(compare_target, jpeg)
    except (OSError, ValueError, EngineError) as exc:
        return item, f"cannot write result: {exc}"
    return item, None


def _write_claimed(path: Path, data: bytes) -> Path:
    try:
        return write_atomic(path, data, replace=False)
    except FileExistsError:  # something outside this run took the name since it was claimed
        return write_new(path.parent, path.stem, path.suffix, data)


def _numbered(folder: Path, stem: str, ext: str) -> Iterator[Path]:
    """``stem+ext``, then ``stem (1)+ext``, ``stem (2)+ext``... in ``folder``: the names a result may take.

    A name too long for the file system loses the end of its stem, never the ``.restored`` mark: without it a
    later run would take the result for a photo to restore."""
    mark = next((m for m in (".restored", ".compare") if stem.endswith(m)), "")
    base = stem.removesuffix(mark) if mark else stem
    for n in range(10_000):
        tag = "" if n == 0 else f" ({n})"
        yield folder / f"{fit_stem(base, len(os.fsencode(mark + tag + ext)))}{mark}{tag}{ext}"


def write_new(folder: Path, stem: str, ext: str, data: bytes) -> Path:
    """Write ``folder/stem+ext`` atomically under a name that does not exist yet (``stem (1)ext``, ...)."""
    for path in _numbered(folder, stem, ext):
        if os.path.lexists(path):
            continue
        try:
            return write_atomic(path, data, replace=False)
        except FileExistsError:  # someone took the name meanwhile
            continue
    raise FileExistsError(f"no free name for {folder / (stem + ext)}")


def side_by_side(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Before | after, each at most ``_COMPARE_HALF`` px on its long side, with a thin white gap."""
    h, w = before.shape[:2]
    scale = min(1.0, _COMPARE_HALF / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale < 1:
        before = cv2.resize(before, size, interpolation=cv2.INTER_AREA)
        after = cv2.resize(after, size, interpolation=cv2.INTER_AREA)
    gap = np.full((size[1], max(2, size[0] // 100), 3), 255, np.uint8)
    return np.ascontiguousarray(np.concatenate([before, gap, after], axis=1))
