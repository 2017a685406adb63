"""What a GPEN generator is made of: its size and widths, and the published variants.

Kept apart from the model code so that reading a configuration (which names models by these) does not
import torch: `gpen-watch status` and `init` start in a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GpenArch:
    """Constructor arguments of a GPEN generator (those of the official ``FullGenerator``)."""

    size: int
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    narrow: float = 1.0

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 2048 or self.size & (self.size - 1):
            raise ValueError(f"GPEN size must be a power of two from 8 to 2048, got {self.size}")

    def channels(self, resolution: int) -> int:
        """Feature channels at ``resolution`` (the official table)."""
        base = {4: 512, 8: 512, 16: 512, 32: 512}
        if resolution in base:
            return int(base[resolution] * self.narrow)
        width = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16, 2048: 8}[resolution]
        return int(width * self.channel_multiplier * self.narrow)

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))


VARIANTS: dict[str, GpenArch] = {
    "GPEN-BFR-256": GpenArch(256, channel_multiplier=1, narrow=0.5),
    "GPEN-BFR-512": GpenArch(512, channel_multiplier=2, narrow=1.0),
    "GPEN-BFR-1024": GpenArch(1024, channel_multiplier=2, narrow=1.0),
    "GPEN-BFR-2048": GpenArch(2048, channel_multiplier=2, narrow=1.0),
}
