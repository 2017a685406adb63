"""``gpen-watch init DIR``: the folder layout for the built-in presets and a commented config."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from daemon.publish import write_atomic
from gpen_engine.options import BUILTIN_PRESETS

CONFIG_NAME = "gpen-watch.toml"
_ROOT_LINE = re.compile(r"(?m)^root = .*$")
_MODELS_LINE = re.compile(r"(?m)^#models_dir = .*$")


def template_candidates() -> list[Path]:
    """Where the documented example config may be: the source tree, or share/ of an installed package."""
    return [
        Path(__file__).resolve().parents[1] / "config" / CONFIG_NAME,
        Path(sys.prefix) / "share" / "gpen-watch" / CONFIG_NAME,
    ]


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def config_text(root: Path, template: str | None) -> str:
    """The example config with ``root`` set and weights kept in ROOT/models (bare if there is no template).

    An absolute models_dir matters: under systemd the working directory is /, where a relative
    "models" would point somewhere else.
    """
    root_line = f"root = {_toml_string(str(root))}"
    models_line = f"models_dir = {_toml_string(str(root / 'models'))}"
    if template is None:
        return (
            "# gpen-watch configuration written by `gpen-watch init`.\n"
            "# The documented example (config/gpen-watch.toml in the source) lists every setting.\n"
            f"{root_line}\n{models_line}\n"
        )
    text = _ROOT_LINE.sub(lambda _m: root_line, template, count=1)
    if text == template:
        text = f"{root_line}\n{text}"
    if _MODELS_LINE.search(text):
        return _MODELS_LINE.sub(lambda _m: models_line, text, count=1)
    return text.replace(root_line, f"{root_line}\n{models_line}", 1)


def create_layout(root: Path) -> list[Path]:
    """Create in/, out/, backup/, failed/ per built-in preset, state/ and models/; returns those made."""
    made = []
    kinds = ("in", "out", "backup", "failed")
    folders = [root / kind / preset for kind in kinds for preset in BUILTIN_PRESETS]
    for folder in [*folders, root / "state", root / "models"]:
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            made.append(folder)
    return made


def _read_template() -> str | None:
    for candidate in template_candidates():
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return None


def command(args: Any) -> int:
    if not str(args.dir).strip():  # `init "$DIR"` with DIR unset: not a wish to fill the current folder
        print("gpen-watch init: DIR is empty; name the folder to create the layout in (\".\" for this one)",
              file=sys.stderr)
        return 2
    root = Path(args.dir).expanduser().absolute()
    if root.exists() and not root.is_dir():
        print(f"gpen-watch init: {root} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        made = create_layout(root)
    except OSError as exc:
        print(f"gpen-watch init: cannot create the folders under {root}: {exc}", file=sys.stderr)
        return 1
    print(f"Layout in {root}: {len(made)} folder(s) created" + ("" if made else " (all were there already)"))

    config = root / CONFIG_NAME
    if config.is_symlink() and not config.exists():
        print(f"gpen-watch init: left {config} alone: it is a link to a missing file; remove it or create "
              "its target, then run init again.", file=sys.stderr)
        return 1
    if config.exists():
        print(f"Kept the existing {config}: it is never overwritten (compare with the example by hand).")
    else:
        template = _read_template()
        try:
            write_atomic(config, config_text(root, template).encode("utf-8"), root=root, replace=False)
        except FileExistsError:
            print(f"Kept the existing {config}: it appeared meanwhile and is never overwritten.")
        else:
            note = "" if template else " (the documented example was not found; only root is set)"
            print(f"Wrote {config}{note}.")

    print(
        "\nNext steps:\n"
        f"  1. Check the settings in {config} (every setting is listed there with its default).\n"
        "  2. Fetch the weights (GPEN weights are for non-commercial use only):\n"
        f"       gpen-watch models --config {shlex.quote(str(config))} download\n"
        f"  3. Check the device:  gpen-watch doctor --config {shlex.quote(str(config))}\n"
        f"  4. Start the service: gpen-watch run --config {shlex.quote(str(config))}\n"
        f"  5. Drop photos into {root / 'in' / 'fast'} (or quality, low-spec); results appear in\n"
        f"     {root / 'out'}, untouched originals in {root / 'backup'}, problems in {root / 'failed'}.\n"
        "  To run it as a systemd service, see systemd/README.md."
    )
    return 0


