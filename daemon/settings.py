"""Configuration: a TOML file plus ``GPEN_WATCH_*`` environment overrides.

Precedence, highest first: command-line flags, environment, the TOML file, defaults.
config/gpen-watch.toml documents every setting; keep the two in step.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from gpen_engine.options import BUILTIN_PRESETS, DecodeOptions, EncodeOptions, EngineOptions, Preset
from gpen_engine.registry import builtin_models

SYSTEM_CONFIG = Path("/etc/gpen-watch/config.toml")
ENV_PREFIX = "GPEN_WATCH_"
# GPEN_WATCH_* variables that are not settings: the config file's path, and fault injection (daemon/faults.py).
OWN_VARIABLES = frozenset({"GPEN_WATCH_CONFIG", "GPEN_WATCH_FAILPOINTS"})
DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")

Percent = Annotated[float, Field(ge=0, le=100)]


class ConfigError(Exception):
    """The configuration is invalid; the message names the setting, the value and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PresetSettings(_Strict):
    """Overrides for a built-in preset, or a new preset based on one (``base``)."""

    base: str | None = None
    model: str | None = None
    batch_size: Annotated[int, Field(ge=1, le=256)] | None = None
    max_long_side: Annotated[int, Field(ge=0)] | None = None  # 0: never scale down
    strength: Percent | None = None
    denoise: Percent | None = None
    sharpen: Percent | None = None
    skin_protection: bool | None = None
    detail: Percent | None = None
    precision: Literal["fp32", "fp16", "bf16"] | None = None
    device: str | None = None
    detector: Literal["resnet50", "mobile0.25"] | None = None
    detect_long_side: Annotated[int, Field(ge=64)] | None = None
    det_confidence: Annotated[float, Field(gt=0, lt=1)] | None = None
    min_face_size: Annotated[int, Field(ge=1)] | None = None
    max_faces: Annotated[int, Field(ge=1)] | None = None
    use_parsing: bool | None = None
    faces_required: bool | None = None


    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        return None if value is None else _device_name(value)

    @field_validator("max_long_side")
    @classmethod
    def _zero_or_a_real_size(cls, value: int | None) -> int | None:
        if value is not None and 0 < value < 64:
            raise ValueError("must be 0 (keep the full size) or at least 64")
        return value


def _device_name(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError("must be auto, cpu, cuda or cuda:N")


class FolderSettings(_Strict):
    """One hot folder and where its results, backups and failures go."""

    path: Path
    preset: str = "fast"
    output: Path
    backup: Path
    failed: Path
    recursive: bool = True
    watch: Literal["auto", "events", "poll"] = "auto"
    stability_delay: Annotated[float, Field(ge=0)] = 2.0
    priority: int = 0
    after: Literal["delete", "keep", "move"] = "delete"
    # Where originals go with ``after = "move"``; default: a "done" folder beside the backup folder.
    done: Path | None = None

    @model_validator(mode="after")
    def _move_needs_target(self) -> FolderSettings:
        if self.after == "move" and self.done is None:
            object.__setattr__(self, "done", self.backup.parent / "done" / self.backup.name)
        return self


class ModelEntry(_Strict):
    """A user's own GPEN checkpoint: a file plus the architecture it was trained with."""

    name: str
    path: Path
    size: Annotated[int, Field(ge=16)]
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    narrow: float = 1.0
    key: str | None = None
    url: str | None = None
    sha256: str | None = None


class MetricsSettings(_Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 9477


class Settings(BaseSettings):
    """Everything gpen-watch reads at start-up (and again on SIGHUP)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    # With no [[folders]], the layout under root: in/<preset>, out/<preset>, backup/<preset>, failed/<preset>.
    root: Path | None = None
    folders: list[FolderSettings] = []
    presets: dict[str, PresetSettings] = {}
    models: list[ModelEntry] = []

    # systemd sets STATE_DIRECTORY for units with StateDirectory=.
    state_dir: Path | None = None
    # Names this daemon when several (one per GPU) share one state directory and the same hot folders;
    # the job table hands each file to exactly one of them. The systemd template sets it to the GPU index.
    instance: str = ""
    models_dir: Path = Path("models")
    download: bool = True
    device: str = "auto"

    extensions: Annotated[list[str], Field(min_length=1)] = list(DEFAULT_EXTENSIONS)
    poll_interval: Annotated[float, Field(gt=0)] = 2.0
    rescan_interval: Annotated[float, Field(gt=0)] = 30.0
    max_ready_wait: Annotated[float, Field(gt=0)] = 600.0
    max_batch_delay: Annotated[float, Field(ge=0)] = 0.5
    max_attempts: Annotated[int, Field(ge=1)] = 5
    retry_backoff: Annotated[float, Field(gt=0)] = 5.0
    retry_backoff_max: Annotated[float, Field(gt=0)] = 300.0
    # Days the job table keeps finished rows (pruned at start and once a day); each file's newest row stays.
    history_days: Annotated[float, Field(gt=0)] = 90.0

    duplicates: Literal["process", "skip"] = "process"
    collisions: Literal["suffix", "overwrite"] = "suffix"
    no_face: Literal["publish", "fail"] = "publish"

    max_pixels: Annotated[int, Field(ge=1)] = 100_000_000
    output_format: Literal["JPEG", "PNG", "WEBP", "TIFF", "BMP"] | None = None
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95
    io_threads: Annotated[int, Field(ge=1, le=64)] = 4

    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics: MetricsSettings = MetricsSettings()

    @field_validator("extensions")
    @classmethod
    def _dotted_lowercase(cls, value: list[str]) -> list[str]:
        return ["." + ext.lower().lstrip(".") for ext in value]

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return _device_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        presets = preset_table(self)
        # Checked here, not when models load: a reload must be refused before anything switches over.
        known = {name for name, spec in builtin_models().items() if spec.kind == "gpen"} | {m.name for m in self.models}
        for name, preset in sorted(presets.items()):
            if preset.model not in known:
                raise ValueError(
                    f"presets.{name}.model = {preset.model!r}: unknown GPEN model (known: {', '.join(sorted(known))}; "
                    "add your own under [[models]])"
                )
        for i, folder in enumerate(self.folders):
            if folder.preset not in presets:
                raise ValueError(
                    f"folders.{i}.preset = {folder.preset!r}: unknown preset (known: {', '.join(sorted(presets))})"
                )
        _folders_apart(self.folders)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def _folders_apart(folders: list[FolderSettings]) -> None:
    """Refuse folders that feed each other: a photo must reach exactly one hot folder, and a result none."""
    def norm(path: Path) -> Path:
        return Path(os.path.abspath(path.expanduser()))

    def under(path: Path, folder: Path) -> bool:
        return path == folder or folder in path.parents

    hot = [norm(f.path) for f in folders]
    for i, folder in enumerate(folders):
        for j in range(i):
            if hot[i] == hot[j]:
                raise ValueError(f"folders.{i}.path = '{folder.path}': also folders.{j}.path (one entry per folder)")
        for j in range(len(folders)):
            if hot[i] != hot[j] and folders[j].recursive and under(hot[i], hot[j]):
                raise ValueError(f"folders.{i}.path = '{folder.path}': inside the hot folder folders.{j}.path "
                                 "(its photos would be taken by both)")
        targets = [("output", folder.output), ("backup", folder.backup), ("failed", folder.failed)]
        if folder.done is not None:
            targets.append(("done", folder.done))
        for key, target in targets:
            for j, other in enumerate(hot):
                # Inside its own hot folder is fine (its watcher skips it); the hot folder itself is not.
                # A folder that does not watch its subfolders only takes files put straight into it.
                inside = under(norm(target), other) if folders[j].recursive else norm(target) == other
                if (j == i and norm(target) == other) or (j != i and inside):
                    where = "its own hot folder" if j == i else f"inside the hot folder folders.{j}.path"
                    raise ValueError(f"folders.{i}.{key} = '{target}': {where} "
                                     "(its files would be taken for new photos)")
    # A result, a backup and a failed or done original must never land on one path: a backup overwritten by its
    # result is an original lost. Folders may share a role (several hot folders writing into one output folder).
    roles = [(i, key, norm(target)) for i, f in enumerate(folders)
             for key, target in (("output", f.output), ("backup", f.backup), ("failed", f.failed), ("done", f.done))
             if target is not None]
    for n, (i, key, target) in enumerate(roles):
        for j, other_key, other in roles[:n]:
            if key != other_key and (under(target, other) or under(other, target)):
                relation = "the same folder as" if target == other else "nested with"
                raise ValueError(f"folders.{i}.{key} = '{folders[i].model_dump()[key]}': {relation} "
                                 f"folders.{j}.{other_key} (results, backups and failed or done originals "
                                 "would overwrite each other)")


def config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The config file to read: --config, then $GPEN_WATCH_CONFIG, then /etc/gpen-watch/config.toml if present."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("GPEN_WATCH_CONFIG"):
        return Path(env)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read and validate the configuration; raise ConfigError with a readable message."""
    toml_file = config_path(path)
    if toml_file is not None and not toml_file.is_file():
        what = "is a folder, not a file" if toml_file.is_dir() else "does not exist"
        raise ConfigError(f"config file {toml_file} {what}")
    _refuse_unknown_variables()
    # A subclass per file keeps the file choice out of global state.
    bound = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": toml_file}})
    try:
        return bound(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        flags = [k for k, v in overrides.items() if v is not None]
        raise ConfigError(format_validation_error(exc, toml_file, flags)) from None
    except SettingsError as exc:  # an environment variable that is not JSON where a list or table is needed
        field = re.search(r'field "([^"]+)"', str(exc))
        var = f"${ENV_PREFIX}{field[1].upper()}" if field else "an environment variable"
        raise ConfigError(
            f"invalid configuration: {var} is not valid JSON ({exc.__cause__}); lists and tables are written as "
            """JSON in the environment, e.g. GPEN_WATCH_EXTENSIONS='[".jpg", ".png"]'"""
        ) from None
    except (OSError, ValueError) as exc:  # unreadable file, TOML syntax error
        raise ConfigError(f"cannot read config {toml_file}: {exc}") from None


def _refuse_unknown_variables() -> None:
    """A misspelt GPEN_WATCH_* variable is refused, as an unknown key in the file is, not silently ignored."""
    known = {name.upper() for name in Settings.model_fields}
    lines = []
    for var in sorted(os.environ):
        name = var.upper().removeprefix(ENV_PREFIX)
        top, nested = name.partition("__")[::2]
        if name == var.upper() or var.upper() in OWN_VARIABLES or top in known:
            continue
        close = difflib.get_close_matches(top, known, n=1)
        if close:
            hint = f"did you mean ${ENV_PREFIX}{close[0]}{'__' if nested else ''}{nested}?"
        else:
            hint = f"{ENV_PREFIX} + a setting's name in upper case"
        lines.append(f"  ${var}: not a setting ({hint})")
    if lines:
        raise ConfigError("\n".join(["invalid configuration:", *lines]))


def format_validation_error(exc: ValidationError, source: Path | None, flags: Collection[str] = ()) -> str:
    """One line per bad setting, naming where its value came from. ``flags``: settings a command-line option set."""
    where = f" in {source}" if source else ""
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        name = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        top = str(err["loc"][0]) if err["loc"] else ""
        origin = f" (from --{top.replace('_', '-')})" if top in flags else _env_origin(err["loc"])
        if not name:  # a check across settings: its message names them
            lines.append(f"  {message}")
        elif err["type"] == "missing":
            lines.append(f"  {name}: required setting is missing{origin}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"  {name}: not a setting{origin}{_unknown_key_hint(err['loc'])}")
        elif "input" in err and not isinstance(err["input"], dict | list):
            lines.append(f"  {name} = {err['input']!r}: {message}{origin}")
        else:
            lines.append(f"  {name}: {message}{origin}")
    return "\n".join(lines)


# The tables a key can be in, by the path that leads to them (a name or an index in place of "*").
_TABLES: dict[tuple[str, ...], type[BaseModel]] = {
    ("folders", "*"): FolderSettings, ("presets", "*"): PresetSettings, ("models", "*"): ModelEntry,
    ("metrics",): MetricsSettings,
}


def _unknown_key_hint(loc: tuple[int | str, ...]) -> str:
    """'; did you mean ...?' for a key no table has, and where TOML put a top-level key written after a table."""
    key, parent = str(loc[-1]), loc[:-1]
    pattern = tuple("*" if i % 2 and parent[0] in ("folders", "presets", "models") else str(part)
                    for i, part in enumerate(parent))
    model = _TABLES.get(pattern) if parent else None
    known = list((model or Settings).model_fields)
    if model is not None and key in Settings.model_fields and key not in known:
        return (f"; {key} is a top-level setting: in TOML a key written below a [table] header belongs to that "
                "table, so move it above the first header")
    singular = {"folder": "[[folders]]", "model": "[[models]]", "preset": "[presets.NAME]"}
    if not parent and key in singular:
        return f"; did you mean {key}s? (its tables are written {singular[key]})"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {'.'.join(map(str, parent + (close[0],)))}?" if close else ""


def _env_origin(loc: tuple[int | str, ...]) -> str:
    """' (from $GPEN_WATCH_...)' when an environment variable set the setting at ``loc`` or a table holding it."""
    env = sorted(key.upper() for key in os.environ)
    for end in range(len(loc), 0, -1):
        var = "GPEN_WATCH_" + "__".join(str(part).upper() for part in loc[:end])
        named = [key for key in env if key == var or key.startswith(var + "__")]
        if named:
            return f" (from ${', $'.join(named)})"
    return ""


def preset_table(settings: Settings) -> dict[str, Preset]:
    """Built-in presets with the config's changes applied, plus the config's own presets.

    A ``base`` may name any preset, built-in or the config's own, wherever the file defines it.
    """
    table = dict(BUILTIN_PRESETS)
    done: dict[str, Preset] = {}

    def build(name: str, chain: tuple[str, ...]) -> Preset:
        if name in done:
            return done[name]
        custom = settings.presets.get(name)
        if custom is None:
            if name in table:
                return table[name]
            raise ValueError(f"presets.{chain[-1]}.base = {name!r}: unknown preset")
        if name in chain:
            raise ValueError(f"presets.{name}.base: the bases go round in a circle ({' -> '.join((*chain, name))})")
        base_name = custom.base or (name if name in table else "fast")
        base = table[name] if base_name == name and name in table else build(base_name, (*chain, name))
        changes = {k: v for k, v in custom.model_dump(exclude={"base"}).items() if v is not None}
        if changes.get("max_long_side") == 0:
            changes["max_long_side"] = None  # the engine's "no cap"
        done[name] = base.with_(name=name, **changes)
        return done[name]

    for name in settings.presets:
        build(name, ())
    return {**table, **done}


def preset_warnings(settings: Settings) -> list[str]:
    """Presets the config defines that look like typos: new (not built-in), without a ``base``, and used by no
    hot folder. ``[presets.lowspec] batch_size = 2`` makes such a preset, and the built-in one stays as it was.
    Nothing is said without hot folders: presets for ``enhance`` alone are used by no folder."""
    try:
        used = {folder.preset for folder in hot_folders(settings)}
    except ConfigError:
        return []
    found = []
    for name, custom in settings.presets.items():
        if name in BUILTIN_PRESETS or custom.base is not None or name in used:
            continue
        others = [n for n in (*BUILTIN_PRESETS, *settings.presets) if n != name]
        close = difflib.get_close_matches(name, others, n=1, cutoff=0.6)
        hint = f"; did you mean presets.{close[0]}?" if close else ""
        found.append(f"presets.{name} is a new preset (based on fast: it names no base) that no hot folder "
                     f"uses{hint}")
    return found


def hot_folders(settings: Settings) -> list[FolderSettings]:
    """The configured folders, or the default layout under ``root``: one hot folder per built-in preset."""
    if settings.folders:
        return list(settings.folders)
    if settings.root is None:
        raise ConfigError("no hot folders: pass --root DIR, set root in the config, or add [[folders]] entries")
    root = settings.root.expanduser().absolute()
    return [
        FolderSettings(
            path=root / "in" / name,
            preset=name,
            output=root / "out" / name,
            backup=root / "backup" / name,
            failed=root / "failed" / name,
        )
        for name in BUILTIN_PRESETS
    ]


SYSTEM_STATE_DIR = Path("/var/lib/gpen-watch")  # the shipped unit's StateDirectory=


def possible_state_dirs(roots: Iterable[Path | str | None] = ()) -> list[Path]:
    """Where a daemon keeps its state when the config does not name ``state_dir``: under systemd, beside each of
    ``roots`` (``root/state``), in the home folder, and the shipped unit's folder."""
    places = [Path(env.split(":")[0])] if (env := os.environ.get("STATE_DIRECTORY")) else []
    places += [Path(str(root)).expanduser().absolute() / "state" for root in roots if root]
    with contextlib.suppress(RuntimeError):  # a service user without a home
        places.append(Path.home() / ".local" / "state" / "gpen-watch")
    return [*places, SYSTEM_STATE_DIR]


def state_dir(settings: Settings) -> Path:
    if settings.state_dir is not None:
        return settings.state_dir
    if env := os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(env.split(":")[0])
    if settings.root is not None:
        return settings.root.expanduser().absolute() / "state"
    return Path.home() / ".local" / "state" / "gpen-watch"


def engine_options(settings: Settings, preset: Preset) -> EngineOptions:
    return EngineOptions(
        preset=preset,
        decode=DecodeOptions(max_pixels=settings.max_pixels),
        encode=EncodeOptions(format=settings.output_format, jpeg_quality=settings.jpeg_quality),
    )


def settings_from_args(args: Any) -> Settings:
    """Settings for a CLI command: its flags override the environment and the config file."""
    return load_settings(
        getattr(args, "config", None),
        root=getattr(args, "root", None),
        device=getattr(args, "device", None),
        models_dir=getattr(args, "models_dir", None),
        download=False if getattr(args, "no_download", False) else None,
    )
