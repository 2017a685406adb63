"""Settings: what a user writes in the TOML file becomes the presets the engine runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.settings import ConfigError, load_settings, preset_table


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'root = "{tmp_path}"\n{text}')
    return path


def test_max_long_side_zero_means_never_scale_down(tmp_path: Path) -> None:
    """0 turns the base preset's cap off; any other value replaces it."""
    settings = load_settings(write(tmp_path, "[presets.archive]\nbase = \"quality\"\nmax_long_side = 0\n"
                                             "[presets.fast]\nmax_long_side = 1024\n"))
    presets = preset_table(settings)
    assert presets["archive"].max_long_side is None
    assert presets["quality"].max_long_side == 2560  # the base itself is unchanged
    assert presets["fast"].max_long_side == 1024


@pytest.mark.parametrize("value", [1, 63, -5])
def test_a_tiny_max_long_side_is_refused_by_name(tmp_path: Path, value: int) -> None:
    """Sizes between 0 and 64 (and negatives) stop the start with the setting, the value and why."""
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, f"[presets.fast]\nmax_long_side = {value}\n"))
    assert f"presets.fast.max_long_side = {value}" in str(exc.value)


@pytest.mark.parametrize(("text", "named"), [
    ('[presets.fast]\nmodel = "GPEN-BFR-9999"\n', "presets.fast.model = 'GPEN-BFR-9999': unknown GPEN model"),
    ('[presets.fast]\ndevice = "gpu7"\n', "presets.fast.device = 'gpu7': must be auto, cpu, cuda or cuda:N"),
])
def test_a_preset_naming_an_unknown_model_or_device_is_refused_at_load(tmp_path: Path, text: str,
                                                                      named: str) -> None:
    """Found when the config is read, so that a reload keeps the running configuration."""
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text))
    assert named in str(exc.value)


def test_a_users_own_model_is_known(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[[models]]\nname = "studio"\npath = "studio.pth"\nsize = 512\n'
                                             '[presets.fast]\nmodel = "studio"\n'))
    assert preset_table(settings)["fast"].model == "studio"
