"""config/gpen-watch.toml documents every setting, with true defaults, and its examples load."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from daemon.settings import (
    FolderSettings,
    MetricsSettings,
    ModelEntry,
    PresetSettings,
    Settings,
    hot_folders,
    load_settings,
    preset_table,
)

CONFIG = Path(__file__).resolve().parents[2] / "config" / "gpen-watch.toml"
# A line like `#key = value` or `#[table]`: a setting shown at its default or as an example.
SETTING_LINE = re.compile(r"^#(?=[A-Za-z_\[])")
# Settings whose default is "unset": TOML cannot write that, so the file shows an example value.
UNSET_BY_DEFAULT = {"root", "state_dir", "output_format"}
EXAMPLES = {"folders", "presets", "models"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file alone decides: no GPEN_WATCH_* variables from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("GPEN_WATCH_"):
            monkeypatch.delenv(name)


def with_root(text: str, root: Path) -> str:
    # json.dumps writes a valid TOML basic string.
    return re.sub(r'(?m)^root = ".*"$', lambda _m: f"root = {json.dumps(str(root))}", text)


def uncommented(text: str) -> str:
    return "\n".join(SETTING_LINE.sub("", line) for line in text.splitlines())


class TestConfigDocumentation:
    @pytest.mark.parametrize("model", [Settings, FolderSettings, PresetSettings, ModelEntry, MetricsSettings])
    def test_every_field_appears(self, model: type[BaseModel]) -> None:
        """Each field of the settings models is written out in the example file (docs cannot drift)."""
        text = CONFIG.read_text()
        # A plain key (`#name = ...`) or a table (`#[metrics]`, `#[[folders]]`, `#[presets.portrait]`).
        pattern = r"(?m)^#?(?:{0} = |\[\[?{0}[\].])"
        missing = [n for n in model.model_fields if not re.search(pattern.format(re.escape(n)), text)]
        assert missing == []

    def test_loads_as_shipped(self, tmp_path: Path) -> None:
        """The file loads unchanged once root is set, and gives the simple layout under root."""
        path = tmp_path / "gpen-watch.toml"
        path.write_text(with_root(CONFIG.read_text(), tmp_path))
        settings = load_settings(path)
        assert settings.root == tmp_path
        expected = [tmp_path / "in" / p for p in ("fast", "quality", "low-spec")]
        assert [f.path for f in hot_folders(settings)] == expected

    def test_commented_defaults_are_the_real_defaults(self, tmp_path: Path) -> None:
        """Uncommenting every documented default changes nothing: the values shown are the code's defaults."""
        path = tmp_path / "all.toml"
        path.write_text(with_root(uncommented(CONFIG.read_text()), tmp_path))
        shown = load_settings(path)
        default = Settings()
        skip = UNSET_BY_DEFAULT | EXAMPLES
        assert shown.model_dump(exclude=skip) == default.model_dump(exclude=skip)

    def test_examples_are_valid(self, tmp_path: Path) -> None:
        """Uncommented, the folder, preset and model examples validate and wire together."""
        path = tmp_path / "all.toml"
        path.write_text(with_root(uncommented(CONFIG.read_text()), tmp_path))
        settings = load_settings(path)
        presets = preset_table(settings)
        assert {f.preset for f in settings.folders} <= set(presets)
        assert presets["fast"].batch_size == 2
        assert presets["portrait"].model in {m.name for m in settings.models}
        assert settings.output_format == "JPEG"
        # Every example key is really set in the uncommented file, so each one was validated.
        raw = tomllib.loads(path.read_text())
        assert set(raw["folders"][0]) == set(FolderSettings.model_fields)
        assert set(raw["presets"]["portrait"]) == set(PresetSettings.model_fields)
        assert set(raw["models"][0]) == set(ModelEntry.model_fields)


def test_the_gpu_check_presets_load_and_measure_what_they_say() -> None:
    """tools/gpu-check.sh runs `bench` with tools/gpu-bench.toml on a lent GPU, where a config error would waste the
    lease: its presets load, use the detector whose weights are at hand, gpu-512 is GPEN-BFR-512 in fp16 with every
    knob off and gpu-fast the fast preset with that detector."""
    presets = preset_table(load_settings(CONFIG.parents[1] / "tools" / "gpu-bench.toml"))
    plain, fast = presets["gpu-512"], presets["gpu-fast"]
    assert ("GPEN-BFR-512", "fp16", 32) == (plain.model, plain.precision, plain.batch_size)
    assert (100, 0, 0, False, 0) == (plain.strength, plain.denoise, plain.sharpen, plain.skin_protection, plain.detail)
    assert {"mobile0.25"} == {plain.detector, fast.detector} and not plain.use_parsing
    assert presets["fast"].with_(name="gpu-fast", detector="mobile0.25") == fast
