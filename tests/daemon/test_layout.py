"""`gpen-watch init DIR`: the folder layout and a config that loads and points at it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.layout import config_text
from daemon.settings import hot_folders, load_settings, state_dir


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the written file decides what loads: no GPEN_WATCH_* or STATE_DIRECTORY from the test machine."""
    for name in list(os.environ):
        if name.startswith("GPEN_WATCH_") or name == "STATE_DIRECTORY":
            monkeypatch.delenv(name)


class TestInit:
    def test_creates_layout_and_loadable_config(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """init makes every hot/output/backup/failed folder the daemon will use, and a config rooted there."""
        root = tmp_path / "studio photos ü"
        assert main(["init", str(root)]) == 0
        settings = load_settings(root / "gpen-watch.toml")
        assert settings.root == root
        assert settings.models_dir == root / "models"
        for folder in hot_folders(settings):
            for d in (folder.path, folder.output, folder.backup, folder.failed):
                assert d.is_dir(), d
        assert state_dir(settings).is_dir()
        out = capsys.readouterr().out
        assert "Next steps" in out
        assert "gpen-watch run --config" in out

    def test_existing_config_is_never_overwritten(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Running init again keeps the user's edited config and says so."""
        assert main(["init", str(tmp_path)]) == 0
        config = tmp_path / "gpen-watch.toml"
        config.write_text('root = "/elsewhere"\n')
        capsys.readouterr()
        assert main(["init", str(tmp_path)]) == 0
        assert config.read_text() == 'root = "/elsewhere"\n'
        assert "never overwritten" in capsys.readouterr().out

    def test_an_empty_dir_is_an_error_not_the_current_folder(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`gpen-watch init "$DIR"` with DIR unset creates nothing in whatever folder the shell is in."""
        monkeypatch.chdir(tmp_path)
        assert main(["init", ""]) == 2
        assert "DIR is empty" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []

    def test_a_dangling_config_link_is_left_alone_and_named(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """init never writes through a link; a link to nothing is an error that says what to do."""
        (tmp_path / "gpen-watch.toml").symlink_to(tmp_path / "nowhere.toml")
        assert main(["init", str(tmp_path)]) == 1
        assert "link to a missing file" in capsys.readouterr().err
        assert not (tmp_path / "nowhere.toml").exists()

    def test_refuses_a_file_as_dir(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A DIR that is an existing file is an error, not a crash, and nothing is written."""
        target = tmp_path / "file"
        target.write_text("x")
        assert main(["init", str(target)]) != 0
        assert "not a folder" in capsys.readouterr().err
        assert target.read_text() == "x"


class TestConfigText:
    def test_without_template_still_loads(self, tmp_path: Path) -> None:
        """If the documented example is not installed, the bare config still names root and loads."""
        path = tmp_path / "c.toml"
        path.write_text(config_text(tmp_path / 'quote " and \\ back', None))
        assert load_settings(path).root == tmp_path / 'quote " and \\ back'
