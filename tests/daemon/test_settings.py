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


def _folder(path: Path, out: Path, **extra: str) -> str:
    lines = ["[[folders]]", f'path = "{path}"', f'output = "{out}"', f'backup = "{out}-b"', f'failed = "{out}-f"']
    return "\n".join(lines + [f"{k} = {v}" for k, v in extra.items()]) + "\n"


@pytest.mark.parametrize(("folders", "named"), [
    (lambda t: _folder(t / "in", t / "out") + _folder(t / "in", t / "out2"), "folders.1.path"),
    (lambda t: _folder(t / "in", t / "out") + _folder(t / "in" / "sub", t / "out2"), "folders.1.path"),
    (lambda t: _folder(t / "in", t / "in"), "folders.0.output"),
    (lambda t: _folder(t / "a", t / "b" / "x") + _folder(t / "b", t / "out2"), "folders.0.output"),
])
def test_folders_that_feed_each_other_are_refused(tmp_path: Path, folders, named: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, folders(tmp_path)))
    assert named in str(exc.value)


def _roles(path: Path, output: Path, backup: Path, failed: Path) -> str:
    return f'[[folders]]\npath = "{path}"\noutput = "{output}"\nbackup = "{backup}"\nfailed = "{failed}"\n'


@pytest.mark.parametrize(("folders", "named"), [
    # The backup overwritten by its result: the original would be lost.
    (lambda t: _roles(t / "in", t / "out", t / "out", t / "failed"), "folders.0.backup = "),
    (lambda t: _roles(t / "in", t / "out", t / "out" / "originals", t / "failed"), "folders.0.backup = "),
    (lambda t: _roles(t / "in", t / "out", t / "bk", t / "bk"), "folders.0.failed = "),
    (lambda t: _roles(t / "a", t / "out", t / "bk", t / "failed") + _roles(t / "b", t / "bk", t / "bk2", t / "f2"),
     "folders.1.output = "),
    (lambda t: _roles(t / "in", t / "out", t / "bk", t / "failed") + 'after = "move"\ndone = "' + str(t / "out")
     + '"\n', "folders.0.done = "),
])
def test_results_backups_and_failed_files_never_share_a_folder(tmp_path: Path, folders, named: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, folders(tmp_path)))
    assert named in str(exc.value) and "would overwrite each other" in str(exc.value)


def test_hot_folders_may_share_an_output_folder(tmp_path: Path) -> None:
    shared = tmp_path / "restored"
    load_settings(write(tmp_path, _roles(tmp_path / "a", shared, tmp_path / "bk", tmp_path / "failed")
                        + _roles(tmp_path / "b", shared, tmp_path / "bk", tmp_path / "failed")))


def test_folders_below_a_hot_folder_that_does_not_recurse_are_free(tmp_path: Path) -> None:
    """A non-recursive hot folder takes only files put straight into it: another folder's output may sit below it."""
    top = tmp_path / "photos"
    load_settings(write(tmp_path, _folder(top, top / "restored" / "top", recursive="false")
                        + _folder(top / "portraits", top / "restored" / "portraits")))


def test_an_output_inside_its_own_hot_folder_is_allowed(tmp_path: Path) -> None:
    load_settings(write(tmp_path, _folder(tmp_path / "in", tmp_path / "in" / "results")))


def test_a_base_may_be_defined_later_in_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[presets.portrait]\nbase = "studio"\nstrength = 60\n'
                                             '[presets.studio]\nbase = "quality"\nsharpen = 10\n'))
    portrait = preset_table(settings)["portrait"]
    assert (portrait.model, portrait.sharpen, portrait.strength) == ("GPEN-BFR-1024", 10, 60)


def test_an_environment_value_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPEN_WATCH_MAX_ATTEMPTS", "abc")
    with pytest.raises(ConfigError, match=r"\(from \$GPEN_WATCH_MAX_ATTEMPTS\)"):
        load_settings(write(tmp_path, ""))
    monkeypatch.setenv("GPEN_WATCH_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("GPEN_WATCH_EXTENSIONS", ".jpg")
    with pytest.raises(ConfigError, match=r"\$GPEN_WATCH_EXTENSIONS is not valid JSON") as exc:
        load_settings(write(tmp_path, ""))
    assert "EnvSettingsSource" not in str(exc.value)  # the library's own words for where it read it


def test_bases_that_go_round_in_a_circle_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"circle \(a -> b -> a\)"):
        load_settings(write(tmp_path, '[presets.a]\nbase = "b"\n[presets.b]\nbase = "a"\n'))


def test_a_misspelt_environment_variable_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPEN_WATCH_MAX_ATEMPTS=3 is refused with the likely name, as a misspelt key in the file is, instead of
    being ignored; the variables the code reads itself are not settings and are left alone."""
    monkeypatch.setenv("GPEN_WATCH_CONFIG", str(write(tmp_path, "")))
    monkeypatch.setenv("GPEN_WATCH_FAILPOINTS", "")
    monkeypatch.setenv("GPEN_WATCH_MAX_ATTEMPTS", "3")
    assert 3 == load_settings(None).max_attempts
    monkeypatch.setenv("GPEN_WATCH_MAX_ATEMPTS", "4")
    monkeypatch.setenv("GPEN_WATCH_METRIC__ENABLED", "true")
    with pytest.raises(ConfigError) as exc:
        load_settings(None)
    assert "$GPEN_WATCH_MAX_ATEMPTS: not a setting (did you mean $GPEN_WATCH_MAX_ATTEMPTS?)" in str(exc.value)
    assert "did you mean $GPEN_WATCH_METRICS__ENABLED?" in str(exc.value)


@pytest.mark.parametrize(("text", "said"), [
    ("max_ready_wiat = 3\n", "max_ready_wiat: not a setting; did you mean max_ready_wait?"),
    ("[metrics]\nenable = true\n", "metrics.enable: not a setting; did you mean metrics.enabled?"),
    ('[[folder]]\npath = "/srv/in"\n',
     "folder: not a setting; did you mean folders? (its tables are written [[folders]])"),
    ("[presets.fast]\nstrength = 60\nmax_ready_wait = 30\n",
     "presets.fast.max_ready_wait: not a setting; max_ready_wait is a top-level setting: in TOML a key written "
     "below a [table] header belongs to that table"),
])
def test_an_unknown_key_says_what_was_likely_meant(tmp_path: Path, text: str, said: str) -> None:
    """A misspelt key, a [[folder]] for [[folders]], or a top-level setting written below a table (which TOML
    puts inside it) is refused with what was likely meant, not pydantic's "Extra inputs are not permitted"."""
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text))
    assert said in str(exc.value) and "Extra inputs" not in str(exc.value)


def test_an_empty_extension_list_is_refused(tmp_path: Path) -> None:
    """With no extensions every file would be ignored, silently."""
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, "extensions = []\n"))
    assert "extensions" in str(exc.value)


def test_a_misspelt_preset_table_is_pointed_out(tmp_path: Path) -> None:
    """[presets.lowspec] makes a new preset and leaves low-spec as it was: said, with the name meant. A new
    preset a folder uses, or one with a base, is meant; without hot folders (enhance only) nothing is said."""
    from daemon.settings import preset_warnings

    settings = load_settings(write(tmp_path, "[presets.lowspec]\nbatch_size = 2\n"
                                             "[presets.archive]\nbase = \"quality\"\n"))
    assert preset_warnings(settings) == [
        "presets.lowspec is a new preset (based on fast: it names no base) that no hot folder uses; "
        "did you mean presets.low-spec?"]
    assert preset_table(settings)["low-spec"].batch_size == 1
    enhance_only = tmp_path / "enhance.toml"
    enhance_only.write_text("[presets.lowspec]\nbatch_size = 2\n")
    assert preset_warnings(load_settings(enhance_only)) == []


def test_a_bad_value_from_a_command_line_option_is_said_to_come_from_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, ""), device="gpu")
    assert "device = 'gpu': must be auto, cpu, cuda or cuda:N (from --device)" in str(exc.value)
