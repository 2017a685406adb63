"""`gpen-watch models ...`, `doctor` and start-up model fetching, on small real and broken weight files."""

from __future__ import annotations

import hashlib
import http.server
import os
import pathlib
import shlex
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from daemon.cli import build_parser, main
from daemon.modelfiles import MissingModelError, download_command, ensure_models, models_of, resolve_path
from daemon.settings import load_settings, settings_from_args
from gpen_engine.gpen import GpenArch, create_generator
from gpen_engine.registry import builtin_models

REPO = Path(__file__).resolve().parents[2]
DETECTOR = "detection_mobilenet0.25_Final.pth"
TINY = GpenArch(64, style_dim=64, n_mlp=2, channel_multiplier=1, narrow=0.25)


def real_detector() -> Path:
    for candidate in (REPO / "tests" / "data" / DETECTOR, REPO.parent / "shared" / "models" / DETECTOR):
        if candidate.is_file():
            return candidate
    pytest.skip(f"{DETECTOR} not found in tests/data or ../shared/models")


def tiny_generator_file(path: Path, arch: GpenArch = TINY) -> Path:
    torch.manual_seed(0)
    torch.save(create_generator(arch).state_dict(), path)
    return path


class Payload:
    """Building it while unpickling would create a file: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A models folder and a config naming it, with one user GPEN entry ('tiny')."""
    for name in ("GPEN_WATCH_CONFIG", "GPEN_WATCH_MODELS_DIR", "GPEN_WATCH_DEVICE", "GPEN_WATCH_DOWNLOAD"):
        monkeypatch.delenv(name, raising=False)
    models = tmp_path / "models"
    models.mkdir()
    config = tmp_path / "gpen-watch.toml"
    config.write_text(_config(models))
    return {"models": models, "config": config, "tmp": tmp_path}


def _config(models: Path, url: str | None = None, download: bool = True) -> str:
    text = f'models_dir = "{models}"\ndevice = "cpu"\ndownload = {str(download).lower()}\n'
    text += (
        '[[models]]\nname = "tiny"\npath = "tiny.pth"\nsize = 64\nstyle_dim = 64\nn_mlp = 2\n'
        "channel_multiplier = 1\nnarrow = 0.25\n"
    )
    if url:
        text += f'url = "{url}"\n'
    return text


def run(env: dict[str, Path], *argv: str) -> int:
    command, *rest = argv
    return main([command, "--config", str(env["config"]), *rest])


class TestModelsList:
    def test_lists_state_size_and_licence(self, env, capsys) -> None:
        """`models list` shows each file as present (with its size) or missing, and GPEN's licence."""
        shutil.copy(real_detector(), env["models"] / DETECTOR)
        assert run(env, "models", "list") == 0
        lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
        assert "present" in lines["retinaface-mobile0.25"] and "1.8 MB" in lines["retinaface-mobile0.25"]
        assert "missing" in lines["GPEN-BFR-512"] and "non-commercial" in lines["GPEN-BFR-512"]
        assert "missing" in lines["tiny"]
        assert "fast" in lines["GPEN-BFR-512"]  # the preset that needs it


class TestModelsVerify:
    def test_good_detector(self, env, capsys) -> None:
        """The real RetinaFace mobile0.25 file loads strictly: verify says ok and exits 0."""
        shutil.copy(real_detector(), env["models"] / DETECTOR)
        assert run(env, "models", "verify") == 0
        assert "retinaface-mobile0.25: ok" in capsys.readouterr().out

    def test_truncated_file(self, env, capsys) -> None:
        """A half-copied detector file is reported as truncated and the command fails."""
        data = real_detector().read_bytes()
        (env["models"] / DETECTOR).write_bytes(data[: len(data) // 2])
        assert run(env, "models", "verify") == 1
        out = capsys.readouterr().out
        assert "retinaface-mobile0.25: CORRUPT" in out and "truncated" in out

    def test_wrong_architecture(self, env, capsys) -> None:
        """The mobile0.25 weights under the ResNet50 name are rejected with the mismatching keys named."""
        shutil.copy(real_detector(), env["models"] / "detection_Resnet50_Final.pth")
        assert run(env, "models", "verify") == 1
        out = capsys.readouterr().out
        assert "retinaface-resnet50: CORRUPT" in out and "missing key" in out and "body.conv1.weight" in out

    def test_text_file(self, env, capsys) -> None:
        """A text file under a weight file's name is reported as not a PyTorch checkpoint."""
        (env["models"] / "parsing_parsenet.pth").write_text("<html>404 Not Found</html>\n")
        assert run(env, "models", "verify") == 1
        assert "not a PyTorch checkpoint" in capsys.readouterr().out

    def test_pickle_with_code_is_refused_and_not_run(self, env, capsys) -> None:
        """A pickle that would run code is refused by the weights_only loader, and the code never runs."""
        marker = env["tmp"] / "code-ran"
        target = env["models"] / "parsing_parsenet.pth"
        torch.save({"weight": torch.zeros(1), "extra": Payload(marker)}, target)
        assert run(env, "models", "verify") == 1
        out = capsys.readouterr().out
        assert "parsenet: CORRUPT" in out and "refused" in out
        assert not marker.exists()

    def test_good_and_wrong_gpen_checkpoint(self, env, capsys) -> None:
        """A user GPEN entry verifies when the file fits its architecture and fails when it does not."""
        tiny_generator_file(env["models"] / "tiny.pth")
        assert run(env, "models", "verify") == 0
        assert "tiny: ok" in capsys.readouterr().out
        tiny_generator_file(env["models"] / "tiny.pth", GpenArch(64, style_dim=64, n_mlp=2, narrow=0.25))
        assert run(env, "models", "verify") == 1
        assert "tiny: CORRUPT" in capsys.readouterr().out


    def test_a_known_checksum_catches_damage_that_still_loads(self, env, capsys) -> None:
        """Bytes flipped inside a tensor still load strictly; with sha256 in the entry, verify says CORRUPT."""
        path = tiny_generator_file(env["models"] / "tiny.pth")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        env["config"].write_text(env["config"].read_text() + f'sha256 = "{digest}"\n')
        assert run(env, "models", "verify") == 0
        assert "tiny: ok" in capsys.readouterr().out
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0x55 for b in data[middle : middle + 64])
        path.write_bytes(bytes(data))
        assert run(env, "models", "verify") == 1
        out = capsys.readouterr().out
        assert "tiny: CORRUPT" in out and "SHA-256" in out


class TestFilesThatAreNotThere:
    def test_verify_fails_when_a_configured_folder_needs_a_missing_file(self, env, capsys) -> None:
        """Offline servers copy the weights by hand and run verify: a file under the wrong name must not pass.
        Without folders (enhance only), a missing file is listed but fails nothing."""
        shutil.copy(real_detector(), env["models"] / DETECTOR)
        tiny_generator_file(env["models"] / "tiny.pth")
        assert run(env, "models", "verify") == 0
        hot = env["tmp"] / "hot"
        env["config"].write_text(
            _config(env["models"]) + '[presets.low-spec]\nmodel = "tiny"\n'
            + f'[[folders]]\npath = "{hot}"\npreset = "low-spec"\noutput = "{hot}-out"\nbackup = "{hot}-bk"\n'
            + f'failed = "{hot}-failed"\n')
        assert run(env, "models", "verify") == 0  # low-spec: tiny and the mobile0.25 detector, both there
        (env["models"] / "tiny.pth").rename(env["models"] / "tiny-copy.pth")
        capsys.readouterr()
        assert run(env, "models", "verify") == 1
        out = capsys.readouterr().out
        assert "tiny: MISSING, needed by preset(s) low-spec (tiny.pth)" in out
        assert "1 needed but not there" in out
        assert "GPEN-BFR-512: missing (GPEN-BFR-512.pth; no configured preset uses it)" in out

    def test_an_empty_file_is_not_taken_for_weights(self, env, file_server, capsys) -> None:
        """A 0-byte file (a copy that failed, a touch) is listed as empty, and downloading replaces it."""
        root, base = file_server
        tiny_generator_file(root / "tiny.pth")
        env["config"].write_text(_config(env["models"], url=f"{base}/tiny.pth"))
        (env["models"] / "tiny.pth").write_bytes(b"")
        assert run(env, "models", "list") == 0
        assert "empty" in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny "))
        settings = load_settings(env["config"])
        paths = ensure_models(settings, ["tiny"], download=True, log=lambda m: None, progress=False)
        assert paths["tiny"].read_bytes() == (root / "tiny.pth").read_bytes()
        (env["models"] / "tiny.pth").write_bytes(b"")
        assert run(env, "models", "download", "tiny") == 0
        assert (env["models"] / "tiny.pth").read_bytes() == (root / "tiny.pth").read_bytes()
        (env["models"] / DETECTOR).write_bytes(b"")
        capsys.readouterr()
        assert run(env, "doctor") == 0  # downloads are on: an empty file is fetched again, a warning
        out = capsys.readouterr().out
        assert "retinaface-mobile0.25  EMPTY" in out and "retinaface-mobile0.25 is not downloaded yet" in out


class TestEnsureModels:
    def test_present_file_is_used(self, env) -> None:
        """A file already in the models folder is returned as is, without any download."""
        shutil.copy(real_detector(), env["models"] / DETECTOR)
        settings = load_settings(env["config"])
        paths = ensure_models(settings, ["retinaface-mobile0.25"], download=False, log=lambda m: None)
        assert paths == {"retinaface-mobile0.25": env["models"] / DETECTOR}

    def test_missing_file_message(self, env) -> None:
        """Offline, one error names the file, the path it must go to, where it comes from and its licence."""
        settings = load_settings(env["config"])
        with pytest.raises(MissingModelError) as info:
            ensure_models(settings, ["GPEN-BFR-512", "parsenet"], download=False, log=lambda m: None)
        message = str(info.value)
        spec = builtin_models()["GPEN-BFR-512"]
        assert "GPEN-BFR-512.pth" in message
        assert str(env["models"] / "GPEN-BFR-512.pth") in message
        assert spec.urls[0] in message
        assert "non-commercial" in message
        assert "parsing_parsenet.pth" in message  # every missing file in the same message

    def test_resolve_path(self, env, tmp_path: Path) -> None:
        """Relative model paths live in the models folder; absolute ones stay where they are."""
        settings = load_settings(env["config"])
        table = builtin_models()
        assert resolve_path(settings, table["parsenet"]) == env["models"] / "parsing_parsenet.pth"
        absolute = replace(table["parsenet"], filename=str(tmp_path / "p.pth"))
        assert resolve_path(settings, absolute) == tmp_path / "p.pth"


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator:
    """Serves files from a folder over HTTP on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class TestDownloads:
    def test_start_up_fetches_and_verifies(self, env, file_server) -> None:
        """With downloads on, a missing user checkpoint is fetched, strictly loaded, and put in place."""
        root, base = file_server
        tiny_generator_file(root / "tiny.pth")
        env["config"].write_text(_config(env["models"], url=f"{base}/tiny.pth"))
        settings = load_settings(env["config"])
        paths = ensure_models(settings, ["tiny"], download=True, log=lambda m: None, progress=False)
        assert paths["tiny"].read_bytes() == (root / "tiny.pth").read_bytes()

    def test_wrong_download_never_lands(self, env, file_server) -> None:
        """A downloaded file of the wrong architecture is rejected; nothing appears under the final name."""
        root, base = file_server
        tiny_generator_file(root / "tiny.pth", GpenArch(64, style_dim=64, n_mlp=2, narrow=0.5))
        env["config"].write_text(_config(env["models"], url=f"{base}/tiny.pth"))
        settings = load_settings(env["config"])
        with pytest.raises(MissingModelError, match="failed verification"):
            ensure_models(settings, ["tiny"], download=True, log=lambda m: None, progress=False)
        assert not (env["models"] / "tiny.pth").exists()

    def test_logs_and_messages_hide_tokens_in_the_address(self, env, file_server) -> None:
        """A token in a configured URL's query reaches neither the download log line nor a missing-file message."""
        root, base = file_server
        tiny_generator_file(root / "tiny.pth")
        env["config"].write_text(_config(env["models"], url=f"{base}/tiny.pth?token=s3cret"))
        settings = load_settings(env["config"])
        with pytest.raises(MissingModelError) as info:
            ensure_models(settings, ["tiny"], download=False, log=lambda m: None)
        assert "s3cret" not in str(info.value) and f"{base}/tiny.pth" in str(info.value)
        logged: list[str] = []
        ensure_models(settings, ["tiny"], download=True, log=logged.append, progress=False)
        assert logged and not [line for line in logged if "s3cret" in line]
        assert f"{base}/tiny.pth" in logged[0]

    def test_models_download_command(self, env, file_server, capsys) -> None:
        """`models download tiny` fetches the named file; a second run skips it as present."""
        root, base = file_server
        tiny_generator_file(root / "tiny.pth")
        env["config"].write_text(_config(env["models"], url=f"{base}/tiny.pth"))
        assert run(env, "models", "download", "tiny") == 0
        assert (env["models"] / "tiny.pth").is_file()
        assert run(env, "models", "download", "tiny") == 0
        assert "present" in capsys.readouterr().out

    def test_models_download_fetches_a_damaged_file_again(self, env, file_server, capsys) -> None:
        """An error page saved under the weight file's name is not "present, skipped": `run` would refuse it.
        It is named corrupt and fetched again; without an address to fetch from, the command fails."""
        root, base = file_server
        tiny_generator_file(root / "tiny.pth")
        (env["models"] / "tiny.pth").write_text("<html>403 Forbidden</html>")
        env["config"].write_text(_config(env["models"], url=f"{base}/tiny.pth"))
        assert run(env, "models", "download", "tiny") == 0
        assert "present but CORRUPT" in capsys.readouterr().out
        assert (env["models"] / "tiny.pth").read_bytes() == (root / "tiny.pth").read_bytes()
        (env["models"] / "tiny.pth").write_text("<html>403 Forbidden</html>")
        env["config"].write_text(_config(env["models"]))
        assert run(env, "models", "download", "tiny") == 1
        assert "copy a good file to" in capsys.readouterr().err

    def test_models_download_without_names_fetches_what_the_presets_use(self, env, file_server, capsys) -> None:
        """Not every known model (seven files, some of 300 MB): only those the configured folders' presets name."""
        root, base = file_server
        tiny_generator_file(root / "tiny.pth")
        tiny_generator_file(root / "spare.pth")
        shutil.copy(real_detector(), env["models"] / DETECTOR)
        hot = env["tmp"] / "hot"
        env["config"].write_text(
            _config(env["models"], url=f"{base}/tiny.pth")
            + '[[models]]\nname = "spare"\npath = "spare.pth"\nsize = 64\nstyle_dim = 64\nn_mlp = 2\n'
            + f'channel_multiplier = 1\nnarrow = 0.25\nurl = "{base}/spare.pth"\n'
            + '[presets.low-spec]\nmodel = "tiny"\n'
            + f'[[folders]]\npath = "{hot}"\npreset = "low-spec"\noutput = "{hot}-out"\nbackup = "{hot}-bk"\n'
            + f'failed = "{hot}-failed"\n')
        assert run(env, "models", "download") == 0
        assert (env["models"] / "tiny.pth").is_file()
        assert not (env["models"] / "spare.pth").exists()
        assert not (env["models"] / "GPEN-BFR-512.pth").exists()
        assert "retinaface-mobile0.25: present" in capsys.readouterr().out

    def test_force_on_a_file_without_an_address_keeps_it_and_says_why(self, env, capsys) -> None:
        """A user's own checkpoint has no URL: --force cannot refetch it, and must not call it missing."""
        tiny_generator_file(env["models"] / "tiny.pth")
        env["config"].write_text(_config(env["models"]))
        assert run(env, "models", "download", "tiny", "--force") == 1
        err = capsys.readouterr().err
        assert "present, kept: no download address" in err and "missing" not in err
        assert (env["models"] / "tiny.pth").is_file()

    def test_unknown_name(self, env, capsys) -> None:
        """`models download` with an unknown name fails and lists the known names."""
        assert run(env, "models", "download", "GPEN-BFR-4096") == 2
        assert "GPEN-BFR-512" in capsys.readouterr().err


class TestDoctor:
    def test_reports_device_and_files(self, env, capsys) -> None:
        """doctor names torch, the device with its reason, and each file's state with what to do."""
        shutil.copy(real_detector(), env["models"] / DETECTOR)
        (env["models"] / "GPEN-BFR-256.pth").write_text("not weights")
        env["config"].write_text(_config(env["models"], download=False))
        assert run(env, "doctor") == 1  # low-spec needs GPEN-BFR-256, which is broken
        out = capsys.readouterr().out
        assert torch.__version__ in out
        assert "-> cpu" in out and "cpu requested" in out
        assert "retinaface-mobile0.25  ok" in out
        assert "GPEN-BFR-256" in out and "CORRUPT" in out
        assert "gpen-watch models download GPEN-BFR-256" in out
        assert "GPEN-BFR-512 is missing and downloads are off" in out

    def test_explicit_cuda_without_gpu_is_a_problem(self, env, capsys) -> None:
        """doctor with device=cuda on a machine where CUDA does not work exits 1 and says why."""
        if torch.cuda.is_available():
            pytest.skip("this machine has a working GPU")
        assert run(env, "doctor", "--device", "cuda") == 1
        assert "device cuda does not work" in capsys.readouterr().out


def test_doctor_lists_gpus_by_pci_address_so_nvidia_smi_and_cuda_numbers_can_be_matched(
        env, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi numbers every GPU in PCI order, torch only the visible ones (fastest first): doctor prints the
    PCI address on both sides and says the numbers differ."""
    from daemon import doctor

    fake = env["tmp"] / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '0, 00000000:17:00.0, NVIDIA H100, 550.54, Enabled, 1980 MHz, 1980 MHz, "
                    "2619 MHz, 70 W, 700 W, 31, 0 %, 1 MiB, 81559 MiB'\n"
                    "echo '1, 00000000:2A:00.0, NVIDIA H100, 550.54, Enabled, 1980 MHz, 1980 MHz, "
                    "2619 MHz, 70 W, 700 W, 30, 0 %, 1 MiB, 81559 MiB'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")

    class Props:
        pci_domain_id, pci_bus_id, pci_device_id = 0, 0x2A, 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    lines = doctor.Findings()
    doctor._device_details(lines, doctor.DeviceReport(torch.device("cuda:0"), "NVIDIA H100", "cuda requested",
                                                      torch.__version__, "13.0"))
    doctor._nvidia_smi_section(lines)
    out = "\n".join(lines.lines)
    assert "PCI 00000000:2A:00.0 (as nvidia-smi lists it below)" in out
    assert "GPU 1 (PCI 00000000:2A:00.0): NVIDIA H100" in out
    assert "CUDA_VISIBLE_DEVICES=1" in out


def test_the_download_hint_fetches_into_the_configured_folder_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Followed as printed, from another directory, the hint's command targets the same file as the run that gave it."""
    config = tmp_path / "gw" / "gpen-watch.toml"
    config.parent.mkdir()
    config.write_text('models_dir = "weights"\n')
    monkeypatch.chdir(config.parent)
    settings = load_settings(config)
    wanted = resolve_path(settings, models_of(settings)["GPEN-BFR-512"])
    assert wanted == config.parent / "weights" / "GPEN-BFR-512.pth"
    words = shlex.split(download_command(settings, "GPEN-BFR-512"))
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(words[1:])
    again = settings_from_args(args)
    assert args.names == ["GPEN-BFR-512"]
    assert resolve_path(again, models_of(again)["GPEN-BFR-512"]) == wanted
