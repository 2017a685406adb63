"""Weight files: strict, safe loading, and errors that name the file, the architecture and the keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpen_engine.checkpoint import load_generator, load_state_dict_file, verify_generator_file
from gpen_engine.gpen import GpenArch
from gpen_engine.types import ModelFileError

DATA = Path(__file__).resolve().parents[1] / "data"


class Opaque:
    """A custom class: unpickling it would mean importing and running arbitrary code."""


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(DATA / "golden_tiny64.pt", map_location="cpu", weights_only=True)


@pytest.fixture()
def arch(golden: dict) -> GpenArch:
    return GpenArch(**golden["ctor"])


@pytest.fixture()
def weights(tmp_path: Path, golden: dict) -> Path:
    path = tmp_path / "tiny.pth"
    torch.save(golden["state_dict"], path)
    return path


def _load(path: Path, arch: GpenArch, **kwargs: object) -> torch.nn.Module:
    return load_generator(path, size=arch.size, style_dim=arch.style_dim, n_mlp=arch.n_mlp,
                          channel_multiplier=arch.channel_multiplier, narrow=arch.narrow, **kwargs)


class TestLoadGenerator:
    def test_bare_state_dict_loads_and_reproduces_golden(self, weights: Path, arch: GpenArch,
                                                         golden: dict) -> None:
        """A bare official-style state dict loads strictly and the model gives the official output."""
        model = _load(weights, arch)
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        with torch.inference_mode():
            out = model(golden["input"])
        assert (out - golden["output"]).abs().max().item() < 1e-4

    def test_arch_object_is_accepted(self, weights: Path, arch: GpenArch) -> None:
        """The architecture can be given as a GpenArch instead of the constructor arguments."""
        model = load_generator(weights, arch)
        assert model.arch == arch

    @pytest.mark.parametrize(
        ("wrapper", "key"), [("params_ema", None), ("g_ema", None), ("weights", "weights")]
    )
    def test_wrapped_state_dicts_load(self, tmp_path: Path, golden: dict, arch: GpenArch,
                                      wrapper: str, key: str | None) -> None:
        """Trainer checkpoints (params_ema, g_ema, or a named key) load, extra entries ignored."""
        path = tmp_path / "wrapped.pth"
        torch.save({wrapper: golden["state_dict"], "iter": 1000, "optimizer": {}}, path)
        state = _load(path, arch, key=key).state_dict()
        assert torch.equal(state["final_linear.0.weight"], golden["state_dict"]["final_linear.0.weight"])

    def test_dataparallel_prefix_is_stripped(self, tmp_path: Path, golden: dict, arch: GpenArch) -> None:
        """Keys saved from a DataParallel model (``module.`` prefix) load."""
        path = tmp_path / "dp.pth"
        torch.save({"g_ema": {f"module.{k}": v for k, v in golden["state_dict"].items()}}, path)
        assert _load(path, arch).arch == arch

    def test_half_precision_file_loads_as_float32(self, tmp_path: Path, golden: dict, arch: GpenArch) -> None:
        """A checkpoint saved in fp16 still gives a float32 model (precision is chosen later)."""
        path = tmp_path / "half.pth"
        torch.save({k: v.half() for k, v in golden["state_dict"].items()}, path)
        assert all(p.dtype == torch.float32 for p in _load(path, arch).parameters())


class TestErrors:
    def test_missing_file(self, tmp_path: Path, arch: GpenArch) -> None:
        """A missing file is named as missing."""
        with pytest.raises(ModelFileError, match=r"nothere\.pth: weight file not found"):
            _load(tmp_path / "nothere.pth", arch)

    def test_empty_file(self, tmp_path: Path, arch: GpenArch) -> None:
        """An empty file (a copy that never started) says so."""
        (tmp_path / "empty.pth").write_bytes(b"")
        with pytest.raises(ModelFileError, match="empty"):
            _load(tmp_path / "empty.pth", arch)

    def test_truncated_file(self, weights: Path, arch: GpenArch) -> None:
        """A half-copied file is reported as truncated or corrupt, naming the file."""
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelFileError, match="truncated or corrupt") as info:
            _load(weights, arch)
        assert str(weights) in str(info.value)

    def test_text_file(self, tmp_path: Path, arch: GpenArch) -> None:
        """A text file (an HTML error page saved as .pth, say) is not a checkpoint."""
        path = tmp_path / "page.pth"
        path.write_text("<html>404 Not Found</html>\n")
        with pytest.raises(ModelFileError, match="not a PyTorch checkpoint"):
            _load(path, arch)

    def test_unsafe_pickle_is_refused(self, tmp_path: Path, arch: GpenArch) -> None:
        """A pickle holding a custom object is refused for safety, never unpickled."""
        path = tmp_path / "unsafe.pth"
        torch.save({"model": Opaque()}, path)
        with pytest.raises(ModelFileError, match="refused for safety"):
            _load(path, arch)

    def test_wrong_architecture_names_misshaped_key(self, weights: Path, arch: GpenArch) -> None:
        """Loading with the wrong width names the expected architecture and a misshaped key."""
        with pytest.raises(ModelFileError) as info:
            _load(weights, GpenArch(arch.size, arch.style_dim, arch.n_mlp, arch.channel_multiplier, 0.125))
        message = str(info.value)
        assert "narrow=0.125" in message and "shape mismatches" in message
        assert "generator.input.input" in message

    def test_wrong_size_names_missing_and_unexpected_keys(self, weights: Path, arch: GpenArch) -> None:
        """A 64-px file loaded as 128 px lists missing keys (and the first few only)."""
        with pytest.raises(ModelFileError, match=r"missing keys: .*\(\+\d+ more\)") as info:
            _load(weights, GpenArch(128, arch.style_dim, arch.n_mlp, arch.channel_multiplier, arch.narrow))
        assert "ecd5" in str(info.value) or "generator.convs.8" in str(info.value)

    def test_missing_key_is_named(self, tmp_path: Path, golden: dict, arch: GpenArch) -> None:
        """A state dict lacking one tensor names exactly that key."""
        state = dict(golden["state_dict"])
        del state["generator.to_rgb1.bias"]
        torch.save(state, tmp_path / "partial.pth")
        with pytest.raises(ModelFileError, match=r"missing keys: generator\.to_rgb1\.bias"):
            _load(tmp_path / "partial.pth", arch)

    def test_not_a_state_dict(self, tmp_path: Path, arch: GpenArch) -> None:
        """A checkpoint holding something else than a dict of tensors says what it holds."""
        torch.save([1, 2, 3], tmp_path / "list.pth")
        with pytest.raises(ModelFileError, match="not a state dict"):
            _load(tmp_path / "list.pth", arch)

    def test_missing_custom_key(self, weights: Path, arch: GpenArch) -> None:
        """Asking for a wrapper key that is not there lists the keys that are."""
        with pytest.raises(ModelFileError, match="no entry 'ema'"):
            _load(weights, arch, key="ema")


class TestHelpers:
    def test_verify_generator_file(self, weights: Path, arch: GpenArch) -> None:
        """verify_generator_file accepts a fitting file and rejects a misfit with ModelFileError."""
        verify_generator_file(weights, arch)
        with pytest.raises(ModelFileError, match="expected architecture"):
            verify_generator_file(weights, GpenArch(128, arch.style_dim, arch.n_mlp, 1, arch.narrow))

    def test_load_state_dict_file_unwraps_and_strips(self, tmp_path: Path) -> None:
        """The generic helper (shared with the detector loader) unwraps a key and strips ``module.``."""
        path = tmp_path / "det.pth"
        torch.save({"net": {"module.body.weight": torch.ones(2)}}, path)
        state = load_state_dict_file(path, key="net")
        assert list(state) == ["body.weight"]
        assert torch.equal(state["body.weight"], torch.ones(2))
