"""Weight files on disk: where each lives, fetching the missing ones, and strict checks.

``gpen-watch models list|download|verify`` is handled here, and so is ``ensure_models``, which the
daemon and ``enhance`` call at start-up to get a path for every file their presets need.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.downloads import DownloadError, download, part_path, redact_url, sha256_of
from daemon.settings import ConfigError, Settings, hot_folders, preset_table, settings_from_args
from gpen_engine.arch import GpenArch
from gpen_engine.registry import ModelSpec, detector_network, model_table, preset_models
from gpen_engine.types import ModelFileError

if TYPE_CHECKING:
    from torch import nn

Log = Callable[[str], Any]


class MissingModelError(Exception):
    """Needed weight files are missing and cannot be fetched; the message says which, where and from where."""


def user_specs(settings: Settings) -> list[ModelSpec]:
    """The config's ``[[models]]`` entries as registry entries (always GPEN generators)."""
    return [
        ModelSpec(
            name=entry.name,
            filename=str(entry.path),
            kind="gpen",
            arch=GpenArch(entry.size, entry.style_dim, entry.n_mlp, entry.channel_multiplier, entry.narrow),
            urls=(entry.url,) if entry.url else (),
            licence="your own checkpoint",
            key=entry.key,
            sha256=entry.sha256,
        )
        for entry in settings.models
    ]


def models_of(settings: Settings) -> dict[str, ModelSpec]:
    return model_table(user_specs(settings))


def resolve_path(settings: Settings, spec: ModelSpec) -> Path:
    """Where ``spec``'s file lives: its own absolute path, or inside the models folder."""
    path = Path(spec.filename).expanduser()
    if not path.is_absolute():
        path = settings.models_dir.expanduser() / path
    return path.absolute()


def download_command(settings: Settings, *names: str) -> str:
    """The ``gpen-watch models download`` line that fetches into this configuration's models folder.

    It names the config file and the models folder these settings came with, so that following the hint
    from another directory, or without the --config the user gave, still finds the same files.
    """
    words = ["gpen-watch", "models", "download", *names]
    toml = settings.model_config.get("toml_file")
    if isinstance(toml, Path):  # load_settings records the one file it read
        words += ["--config", str(toml.absolute())]
    if settings.models_dir != Path("models"):
        words += ["--models-dir", str(settings.models_dir.expanduser().absolute())]
    return shlex.join(words)


def needed_models(settings: Settings) -> dict[str, list[str]]:
    """Model name -> the presets (of the configured hot folders, else all presets) that need it."""
    presets = preset_table(settings)
    try:
        used = sorted({folder.preset for folder in hot_folders(settings)})
    except ConfigError:  # no folders configured: every preset may be used by `enhance`
        used = sorted(presets)
    needed: dict[str, list[str]] = {}
    for name in used:
        for model in preset_models(presets[name]):
            needed.setdefault(model, []).append(name)
    return needed


# --- strict checks -------------------------------------------------------------------------------------


def verify_file(spec: ModelSpec, path: Path) -> None:
    """Load ``path`` strictly into the network ``spec`` describes; raise ModelFileError if it does not fit."""
    # Here, not at the top: `models list` and the daemon's configuration code need no torch.
    from gpen_engine.checkpoint import load_into, verify_generator_file

    if spec.kind == "gpen":
        if spec.arch is None:
            raise ModelFileError(f"{spec.name}: no architecture given for a GPEN file")
        verify_generator_file(path, spec.arch, key=spec.key)
        return
    load_into(_facexlib_network(spec), path, name=spec.name)


def _facexlib_network(spec: ModelSpec) -> nn.Module:
    # Built directly: facexlib's init_* helpers download into site-packages when a file is missing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice about `pretrained=False` inside RetinaFace
        if spec.kind == "detector":
            from facexlib.detection.retinaface import RetinaFace

            return RetinaFace(network_name=detector_network(spec), half=False, phase="test", device="cpu")
        from facexlib.parsing.parsenet import ParseNet

        return ParseNet(in_size=512, out_size=512, parsing_ch=19)


# --- start-up -------------------------------------------------------------------------------------------


def ensure_models(
    settings: Settings,
    names: Iterable[str],
    *,
    download: bool,
    log: Log = print,
    progress: bool | None = None,
) -> dict[str, Path]:
    """The path of each named model's file, downloading missing ones when ``download`` is true.

    Raises MissingModelError naming every file that is still missing: where it must go and where it
    comes from. ``progress`` (default: when stderr is a terminal) shows a progress bar per download.
    """
    table = models_of(settings)
    if progress is None:
        progress = sys.stderr.isatty()
    paths: dict[str, Path] = {}
    problems: list[str] = []
    for name in dict.fromkeys(names):
        spec = table.get(name)
        if spec is None:
            problems.append(
                f"unknown model {name!r} (known: {', '.join(table)}); "
                "add a [[models]] entry for your own file"
            )
            continue
        path = resolve_path(settings, spec)
        if _present(path):
            paths[name] = path
            continue
        if not download or not spec.urls:
            problems.append(missing_message(spec, path, downloads_off=not download,
                                            command=download_command(settings, name)))
            continue
        try:
            paths[name] = fetch(spec, path, log=log, progress=progress, skip_if_present=True)
        except DownloadError as exc:
            problems.append(str(exc) + _licence_line(spec))
    if problems:
        raise MissingModelError("\n".join(problems))
    return paths


def fetch(spec: ModelSpec, path: Path, *, log: Log, progress: bool, skip_if_present: bool = False) -> Path:
    """Download ``spec`` to ``path`` from its first URL that works, verified by a strict load."""
    errors: list[str] = []
    for url in spec.urls:
        log(f"downloading {spec.name} from {redact_url(url)} to {path}")
        try:
            result = download(
                url, path, progress=progress, expected_sha256=spec.sha256,
                verify=lambda p: verify_file(spec, p), skip_if_present=skip_if_present,
            )
        except DownloadError as exc:
            errors.append(str(exc))
            continue
        log(f"downloaded {spec.name}: {_human(result.stat().st_size)}, verified")
        return result
    if not errors:
        raise DownloadError(missing_message(spec, path, downloads_off=False))
    if spec.source:
        errors.append(f"  it can also be fetched by hand from: {spec.source}")
    raise DownloadError("\n".join(errors))


def missing_message(spec: ModelSpec, path: Path, *, downloads_off: bool, command: str | None = None) -> str:
    """Why a weight file is missing and how to get it (``command``: the download line, see ``download_command``)."""
    lines = [f"missing weight file {path.name} (model {spec.name})", f"  it must go to: {path}"]
    for url in spec.urls:
        lines.append(f"  it comes from: {redact_url(url)}")
    if spec.source:
        lines.append(f"  get it by hand from: {spec.source}, saved as {path.name}")
    if not spec.urls and not spec.source:
        lines.append("  no download address is known: copy the file there by hand")
    if downloads_off and spec.urls:
        lines.append(
            f"  downloads are off: run `{command or 'gpen-watch models download ' + spec.name}` or copy the file there"
        )
    return "\n".join(lines) + _licence_line(spec)


def _licence_line(spec: ModelSpec) -> str:
    return f"\n  licence: {spec.licence}" if spec.kind == "gpen" else ""


# --- the `models` command ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileState:
    state: str  # "present", "missing", "empty", "partial", "ok", "corrupt"
    size: int | None
    detail: str = ""


def _present(path: Path) -> bool:
    """A weight file is there; an empty one (a copy that failed, a ``touch``) is as good as missing."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def file_state(spec: ModelSpec, path: Path, *, check: bool) -> FileState:
    if not path.is_file():
        partial = part_path(path)
        if partial.is_file():
            detail = "an interrupted download; `gpen-watch models download` resumes it"
            return FileState("partial", partial.stat().st_size, detail)
        return FileState("missing", None)
    size = path.stat().st_size
    if size == 0:
        return FileState("empty", 0, "an empty file (a copy that failed?): it is downloaded again, or copy it again")
    if not check:
        return FileState("present", size)
    if spec.sha256 and (actual := sha256_of(path)) != spec.sha256.lower():
        # A damaged byte inside a tensor still loads: where the checksum is known, it is the check.
        return FileState("corrupt", size, f"SHA-256 {actual} is not the expected {spec.sha256.lower()}")
    try:
        verify_file(spec, path)
    except ModelFileError as exc:
        return FileState("corrupt", size, str(exc))
    return FileState("ok", size)


def command(args: Any) -> int:
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    action = args.models_command
    if action == "list":
        return _list(settings)
    if action == "download":
        return _download(settings, list(args.names), force=bool(args.force))
    if action == "verify":
        return _verify(settings)
    raise ValueError(f"unknown models action {action!r}")


def _list(settings: Settings) -> int:
    table = models_of(settings)
    needed = needed_models(settings)
    print(f"models folder: {settings.models_dir.expanduser().absolute()}")
    rows = [("NAME", "KIND", "FILE", "STATE", "SIZE", "USED BY", "LICENCE")]
    for spec in table.values():
        path = resolve_path(settings, spec)
        state = file_state(spec, path, check=False)
        size = state.size if state.size is not None else spec.size_bytes
        used_by = ",".join(needed.get(spec.name, [])) or "-"
        rows.append(
            (spec.name, spec.kind, _display(settings, path), state.state, _human(size), used_by, spec.licence)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    if any(row[3] == "present" for row in rows[1:]):
        print("present: the file is there, not yet checked; `gpen-watch models verify` loads each one strictly")
    return 0


def _download(settings: Settings, names: list[str], *, force: bool) -> int:
    table = models_of(settings)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    failed = 0
    if not names:  # what the configured presets use; a model no preset names is fetched when named
        names = [n for n in table if n in needed_models(settings)]
        print(f"fetching what the configured presets use: {', '.join(names)}")
    for name in names:
        spec = table[name]
        path = resolve_path(settings, spec)
        corrupt = None
        if _present(path) and not force:
            # Loaded (or its checksum taken) before it is called present: an error page saved under the name, or a
            # copy cut short, would otherwise be "skipped" here and refused by `run`.
            state = file_state(spec, path, check=True)
            if state.state != "corrupt":
                print(f"{name}: present ({_human(state.size)}, loads), skipped (use --force to fetch again)")
                continue
            corrupt = state.detail
            print(f"{name}: present but CORRUPT: {corrupt}" + ("; fetching it again" if spec.urls else ""))
        if not spec.urls:
            if corrupt is not None:
                print(f"{name}: no download address is configured for it: copy a good file to {path}",
                      file=sys.stderr)
            elif _present(path):  # --force on a file only the user can supply: keep it, nothing to fetch
                print(f"{name}: present, kept: no download address is configured for it", file=sys.stderr)
            else:
                print(missing_message(spec, path, downloads_off=False), file=sys.stderr)
            failed += 1
            continue
        if spec.kind == "gpen":
            print(f"{name}: licence: {spec.licence}")
        try:
            fetch(spec, path, log=print, progress=True)
        except DownloadError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _verify(settings: Settings) -> int:
    """Load every present file strictly. With hot folders configured, a file their presets need and that is not
    there is a problem too: the daemon would not start (offline servers copy the files by hand, then verify)."""
    needed = needed_models(settings)
    try:
        daemon = bool(hot_folders(settings))
    except ConfigError:  # no folders: `enhance` may use any preset, and needs only the one it is given
        daemon = False
    bad = checked = absent = 0
    for spec in models_of(settings).values():
        path = resolve_path(settings, spec)
        state = file_state(spec, path, check=True)
        if state.state in ("missing", "partial", "empty"):
            users = needed.get(spec.name)
            if users and daemon:
                absent += 1
                print(f"{spec.name}: {state.state.upper()}, needed by preset(s) {', '.join(users)} "
                      f"({_display(settings, path)})")
                print(f"  fix: `{download_command(settings, spec.name)}`, or copy the file to {path}")
            else:
                print(f"{spec.name}: {state.state} ({_display(settings, path)}; no configured preset uses it)")
            continue
        checked += 1
        if state.state == "corrupt":
            bad += 1
            print(f"{spec.name}: CORRUPT: {state.detail}")
            print(f"  fix: delete it and run `{download_command(settings, spec.name)}`")
        else:
            print(f"{spec.name}: ok ({_human(state.size)}, loads strictly)")
    print(f"{checked} file(s) checked, {bad} bad, {absent} needed but not there")
    return 1 if bad or absent else 0


def _display(settings: Settings, path: Path) -> str:
    try:
        return str(path.relative_to(settings.models_dir.expanduser().absolute()))
    except ValueError:
        return str(path)


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"
