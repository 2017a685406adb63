"""The GPEN generator (Yang et al., "GAN Prior Embedded Network for Blind Face Restoration", CVPR 2021).

A convolutional encoder reads the degraded face down to 4x4; its last features become the latent code of
a StyleGAN2 synthesis network (the GAN prior), and its feature map at every resolution takes the place
of StyleGAN2's noise. Attribute names (``ecd0..``, ``final_linear``, ``generator.*``) are the contract
with the official weight files and are spelled out explicitly here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import VARIANTS, GpenArch
from .stylegan2 import ConstantInput, ConvLayer, EqualLinear, PixelNorm, StyledConv, ToRGB

# Below glibc's largest mmap threshold (32 MiB): bigger tensors are mapped and page-faulted afresh on
# every allocation, which costs more than the arithmetic on them on the CPU.
DEFAULT_CHUNK_BYTES = 16 << 20


class StyleGenerator(nn.Module):
    """StyleGAN2 synthesis network whose noise inputs are the encoder's feature maps."""

    def __init__(self, arch: GpenArch, lr_mlp: float = 0.01) -> None:
        super().__init__()
        ch = arch.channels
        self.style = nn.Sequential(
            PixelNorm(),
            *(EqualLinear(arch.style_dim, arch.style_dim, lr_mul=lr_mlp, activation=True)
              for _ in range(arch.n_mlp)),
        )
        self.input = ConstantInput(ch(4))
        self.conv1 = StyledConv(ch(4), ch(4), 3, arch.style_dim)
        self.to_rgb1 = ToRGB(ch(4) * 2, arch.style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channel = ch(4)
        for log_res in range(3, arch.log_size + 1):
            out_channel = ch(2**log_res)
            self.convs.append(StyledConv(in_channel * 2, out_channel, 3, arch.style_dim, upsample=True))
            self.convs.append(StyledConv(out_channel * 2, out_channel, 3, arch.style_dim))
            self.to_rgbs.append(ToRGB(out_channel * 2, arch.style_dim))
            in_channel = out_channel

    def forward(self, z: Tensor, features: list[Tensor], *, max_chunk_bytes: int | None = None) -> Tensor:
        """``z``: (N, style_dim) code; ``features``: encoder maps from 4x4 up to full size.

        Resolution levels whose activations would exceed ``max_chunk_bytes`` run on slices of the batch:
        low resolutions are weight-bound and gain from the whole batch, high resolutions are
        activation-bound and gain nothing from it but memory pressure (and, on the CPU, page faults).
        """
        n = z.shape[0]
        w = self.style(z.float())
        start = self.input(n).to(features[0].dtype, memory_format=torch.channels_last)  # the encoder's layout
        out = self.conv1(start, w, features[0])
        rgb = self.to_rgb1(out, w)
        split, chunk = self._split_levels(n, out.element_size(), max_chunk_bytes)
        for level in range(split):
            out, rgb = self.block(level, out, w, features[level + 1], rgb)
        if split == len(self.to_rgbs):
            return rgb
        parts = []
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            o, r = out[part], rgb[part]
            for level in range(split, len(self.to_rgbs)):
                o, r = self.block(level, o, w[part], features[level + 1][part], r)
            parts.append(r)
        return torch.cat(parts)

    def block(self, level: int, x: Tensor, w: Tensor, feature: Tensor, rgb: Tensor) -> tuple[Tensor, Tensor]:
        """One resolution doubling: upsampling styled conv, styled conv, RGB skip."""
        out = self.convs[2 * level](x, w, feature)
        out = self.convs[2 * level + 1](out, w, feature)
        return out, self.to_rgbs[level](out, w, rgb)

    def _split_levels(self, n: int, element_size: int, max_chunk_bytes: int | None) -> tuple[int, int]:
        """First level to run in batch slices, and the slice size (from the largest level)."""
        levels = len(self.to_rgbs)
        if max_chunk_bytes is None:
            return levels, n
        per_face = [
            self.to_rgbs.get_parameter(f"{level}.conv.weight").shape[2] * (8 << level) ** 2 * element_size
            for level in range(levels)
        ]
        split = next((lv for lv in range(levels) if n * per_face[lv] > max_chunk_bytes), levels)
        return split, max(1, max_chunk_bytes // per_face[-1])


class FullGenerator(nn.Module):
    """GPEN: encoder -> latent code + per-resolution features -> GAN prior decoder -> restored face.

    Maps (N, 3, size, size) RGB in [-1, 1] to (N, 3, size, size) RGB, returned in the input's dtype
    whatever precision the weights are in (see ``gpen_engine/precision.py``).
    """

    def __init__(self, arch: GpenArch) -> None:
        super().__init__()
        self.arch = arch
        self.max_chunk_bytes: int | None = DEFAULT_CHUNK_BYTES
        ch = arch.channels
        self.generator = StyleGenerator(arch)
        # The official files name the encoder layers ecd0 (1x1 from RGB), ecd1.. (one per halving).
        self.ecd0 = nn.Sequential(ConvLayer(3, ch(arch.size), 1))
        in_channel = ch(arch.size)
        for i, log_res in enumerate(range(arch.log_size, 2, -1), start=1):
            out_channel = ch(2 ** (log_res - 1))
            self.add_module(f"ecd{i}", nn.Sequential(ConvLayer(in_channel, out_channel, 3, downsample=True)))
            in_channel = out_channel
        self.final_linear = nn.Sequential(EqualLinear(ch(4) * 16, arch.style_dim, activation=True))

    def encoder(self) -> list[nn.Module]:
        """Encoder layers from full resolution down to 4x4."""
        return [self.get_submodule(f"ecd{i}") for i in range(self.arch.log_size - 1)]

    def forward(self, x: Tensor) -> Tensor:
        """Encode the degraded face, then let the GAN prior re-synthesise it from code and features."""
        size = self.arch.size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (size, size):
            raise ValueError(f"GPEN-{size} expects (N, 3, {size}, {size}) faces, got {tuple(x.shape)}")
        # Channels-last is the fast layout for oneDNN and for tensor cores; every layer keeps it.
        compute_dtype = self.ecd0.get_parameter("0.0.weight").dtype
        h = x.to(compute_dtype).contiguous(memory_format=torch.channels_last)
        features = []
        for layer in self.encoder():
            h = layer(h)
            features.append(h)
        z = self.final_linear(h.flatten(1))
        rgb = self.generator(z, features[::-1], max_chunk_bytes=self.max_chunk_bytes)
        return rgb.to(x.dtype).contiguous()

    def fp32_submodules(self) -> list[nn.Module]:
        """Modules that stay float32 under half precision: style MLP, modulations, the RGB skip path."""
        mods: list[nn.Module] = [self.generator.style, self.generator.to_rgb1, *self.generator.to_rgbs]
        mods += [m for name, m in self.named_modules() if name.endswith(".modulation")]
        return mods


def create_generator(arch: GpenArch) -> nn.Module:
    """Build a GPEN generator (random weights) for ``arch``; use the ``meta`` device context to skip init."""
    return FullGenerator(arch)


__all__ = ["VARIANTS", "FullGenerator", "GpenArch", "StyleGenerator", "create_generator"]
