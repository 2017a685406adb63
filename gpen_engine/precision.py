"""Run the generator in half precision where that is safe and fast.

On CUDA the convolutions (nearly all of the work) run in fp16 or bf16 on tensor cores, while the style
MLP, the modulation layers, the demodulation factors and the RGB skip path stay float32: they are cheap,
and they are where reduced precision would be visible (styles span orders of magnitude; demodulation is
a reciprocal square root of a sum over thousands of terms). Callers always pass and get float32.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .gpen import DEFAULT_CHUNK_BYTES
from .options import Precision

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# On a GPU there is no page-fault cost to avoid; slices of the batch only bound peak memory.
CUDA_CHUNK_BYTES = 256 << 20


@runtime_checkable
class _Chunked(Protocol):
    """A generator that runs high resolutions on slices of the batch (``FullGenerator``)."""

    max_chunk_bytes: int | None


def resolve_precision(device: str | torch.device, precision: Precision) -> Precision:
    """The precision that will actually run on ``device``.

    fp16 on the CPU falls back to fp32 (CPU half convolutions are slow or missing); bf16 is honoured on
    the CPU when asked for explicitly (it exercises the mixed-precision path, and CPUs with AMX run it
    fast); bf16 on a GPU without bf16 support falls back to fp16.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    dev = torch.device(device)
    if dev.type == "cpu":
        return "fp32" if precision == "fp16" else precision
    # Not is_bf16_supported(): by default it also says yes for emulated bf16 (any GPU), and asks the current device.
    if dev.type == "cuda" and precision == "bf16" and torch.cuda.get_device_capability(dev) < (8, 0):
        return "fp16"
    return precision


def prepare_generator(
    module: nn.Module, device: str | torch.device, precision: Precision = "fp32"
) -> nn.Module:
    """Move ``module`` to ``device`` and cast it for ``precision`` (see ``resolve_precision``); in place.

    Returns the module in eval mode without gradients. Parts listed by the module's
    ``fp32_submodules()`` stay float32.
    """
    dev = torch.device(device)
    dtype = DTYPES[resolve_precision(dev, precision)]
    module.to(device=dev, dtype=dtype)
    if dtype != torch.float32:
        fp32_parts = getattr(module, "fp32_submodules", None)
        for part in fp32_parts() if callable(fp32_parts) else []:
            part.float()
    if isinstance(module, _Chunked):
        module.max_chunk_bytes = CUDA_CHUNK_BYTES if dev.type == "cuda" else DEFAULT_CHUNK_BYTES
    return module.eval().requires_grad_(False)
