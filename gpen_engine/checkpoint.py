"""Loading weight files safely, with errors a person can act on.

Weight files come from the internet and from half-finished copies on shares, so every failure says which
file, what was expected and what was found, and raises ``ModelFileError``. Files are opened with
``torch.load(weights_only=True)``: a pickle that needs arbitrary code is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .gpen import VARIANTS, FullGenerator, GpenArch
from .types import ModelFileError

WRAPPER_KEYS = ("params_ema", "g_ema")  # where trainers (GPEN, BasicSR, rosinality) put the EMA weights
_SHOWN = 5  # keys listed per category in an error message

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # legacy torch.save files are a pickle stream starting with PROTO


def load_state_dict_file(path: str | os.PathLike[str], key: str | None = None) -> dict[str, Tensor]:
    """Read a state dict from ``path`` on the CPU: bare, or wrapped under ``key`` / params_ema / g_ema.

    ``module.`` prefixes (DataParallel) are stripped; floating tensors are returned as stored.
    """
    path = Path(path)
    obj = _torch_load(path)
    tensors: dict[str, Tensor] = {}
    bad = []
    for k, v in _unwrap(obj, path, key).items():
        if isinstance(k, str) and isinstance(v, Tensor):
            tensors[_strip_module(k)] = v
        else:
            bad.append(k)
    if bad:
        raise ModelFileError(f"{path}: not a state dict (entries that are not tensors: {_first(bad)})")
    return tensors


def load_generator(
    path: str | os.PathLike[str],
    arch: GpenArch | None = None,
    *,
    size: int | None = None,
    style_dim: int = 512,
    n_mlp: int = 8,
    channel_multiplier: int = 2,
    narrow: float = 1.0,
    key: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a GPEN generator from ``path`` strictly, in eval mode, float32, without gradients.

    The architecture is either ``arch`` or the official constructor arguments (``size``, ...). The model
    is built on the ``meta`` device and the file's tensors are assigned to it, so no time is spent on a
    random initialisation that would be overwritten.
    """
    if (arch is None) == (size is None):
        raise TypeError("load_generator needs exactly one of `arch` or `size`")
    if arch is None:
        assert size is not None
        arch = GpenArch(size, style_dim, n_mlp, channel_multiplier, narrow)
    state = load_state_dict_file(path, key)
    _check_architecture(state, arch, Path(path))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = FullGenerator(arch)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def verify_generator_file(path: str | os.PathLike[str], arch: GpenArch, key: str | None = None) -> None:
    """Check that ``path`` is a readable, safe checkpoint holding exactly ``arch``'s weights.

    Same checks as ``load_generator`` but no model is built (shapes come from a ``meta`` model).
    """
    _check_architecture(load_state_dict_file(path, key), arch, Path(path))


def expected_shapes(arch: GpenArch) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of ``arch``, computed on the ``meta`` device (no memory, no init)."""
    with torch.device("meta"):
        model = FullGenerator(arch)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _torch_load(path: Path) -> object:
    if not path.exists():
        raise ModelFileError(f"{path}: weight file not found")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a regular file")
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read weight file: {e}") from e
    if not head:
        raise ModelFileError(f"{path}: weight file is empty (an interrupted download or copy?)")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        raise ModelFileError(
            f"{path}: not a PyTorch checkpoint (it starts with {head!r}, neither a zip archive nor a "
            "pickle; an HTML error page or a text file saved under a .pth name?)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise ModelFileError(
                f"{path}: refused for safety: the file contains Python objects that a weights-only load "
                f"does not allow, and unpickling them could run arbitrary code ({_refusal_reason(e)})"
            ) from e
        raise ModelFileError(f"{path}: corrupt checkpoint: {_first_line(e)}") from e
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ModelFileError(
            f"{path}: truncated or corrupt checkpoint ({os.path.getsize(path)} bytes; an interrupted "
            f"download or copy?): {type(e).__name__}: {_first_line(e)}"
        ) from e


def _unwrap(obj: object, path: Path, key: str | None) -> Mapping[object, object]:
    if not isinstance(obj, Mapping):
        raise ModelFileError(f"{path}: not a state dict (the file holds a {type(obj).__name__})")
    if key is not None:
        if key not in obj:
            raise ModelFileError(
                f"{path}: no entry {key!r} in the checkpoint (top-level keys: {_first(obj)})"
            )
        inner = obj[key]
        if not isinstance(inner, Mapping):
            raise ModelFileError(f"{path}: entry {key!r} is a {type(inner).__name__}, not a state dict")
        return inner
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    for wrapper in WRAPPER_KEYS:
        if isinstance(obj.get(wrapper), Mapping):
            return obj[wrapper]
    return obj


def key_problems(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What keeps ``state`` from loading strictly where ``expected`` (key -> shape) is wanted; empty if nothing."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatches: {_first(misshaped)}")
    return problems


def load_into(module: nn.Module, path: str | os.PathLike[str], *, name: str, key: str | None = None) -> nn.Module:
    """Load the weight file ``path`` strictly into ``module`` (a detector, a parser...); errors name what is off."""
    state = load_state_dict_file(path, key)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if problems := key_problems(state, expected):
        raise ModelFileError(f"{path}: not a {name} weight file: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module


def _check_architecture(state: Mapping[str, Tensor], arch: GpenArch, path: Path) -> None:
    problems = key_problems(state, expected_shapes(arch))
    if not problems:
        return
    hint = _guess_variant(state)
    raise ModelFileError(
        f"{path}: weights do not fit the expected architecture {arch}: " + "; ".join(problems)
        + (f" (the file looks like {hint})" if hint else "")
    )


def _guess_variant(state: Mapping[str, Tensor]) -> str | None:
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, arch in VARIANTS.items():
        if expected_shapes(arch) == shapes:
            return f"{name} ({arch})"
    return None


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _first(items: Iterable[object]) -> str:
    seq = [str(x) for x in items]
    more = f" (+{len(seq) - _SHOWN} more)" if len(seq) > _SHOWN else ""
    return ", ".join(seq[:_SHOWN]) + more


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's text, without terminal escape codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0].rstrip(".")


def _refusal_reason(e: BaseException) -> str:
    """The offending global named in a weights-only refusal, when torch says which."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return f"it needs {found.group(1)}" if found else _first_line(e)
