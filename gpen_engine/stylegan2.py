"""StyleGAN2 building blocks in pure PyTorch, one module per paper concept.

Attribute names (``weight``, ``bias``, ``modulation``, ``blur.kernel``, ...) are the contract with the
official weight files: a strict ``load_state_dict`` of an official GPEN checkpoint must work unchanged.
Equalized learning rate: weights are stored as drawn (N(0, 1)) and the He constant is applied in
``forward``, exactly as the files expect.

Speed and exactness: the official code computes a modulated convolution as a *grouped* convolution with
one weight per sample, which gets slower per face as the batch grows. Here the style scales the input,
one convolution with the shared weight runs on the whole batch, and demodulation scales the output. This
is the same linear map (the per-sample weight is ``W * s`` scaled per output channel), so it is exact up
to float rounding, and any batch size runs as ordinary dense convolutions.

Mixed precision: convolutions run in the dtype of their input; style vectors, the modulation linear
layers and the demodulation factors are computed in float32 (see ``gpen_engine/precision.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLUR_KERNEL: tuple[int, ...] = (1, 3, 3, 1)
_LRELU_SLOPE = 0.2
_LRELU_GAIN = math.sqrt(2.0)


def make_blur_kernel(taps: Sequence[float]) -> Tensor:
    """2-D FIR kernel from 1-D taps (outer product), normalised to sum 1."""
    k = torch.tensor(taps, dtype=torch.float32)
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def _gpu_formulation(x: Tensor) -> bool:
    """Whether to use the formulations measured faster on CUDA (same results up to float rounding)."""
    return x.device.type == "cuda"


def _writes_in_place(*tensors: Tensor) -> bool:
    """In-place ops and ``out=`` save a pass and an allocation, but only when autograd is not recording."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def derived_weight(module: nn.Module, name: str, make: Callable[[], Tensor], *sources: Tensor) -> Tensor:
    """``make()``, kept on ``module`` for as long as ``sources`` (the parameters it is made from) are unchanged.

    The CUDA formulations run on weights rebuilt from the parameters (blurs folded in, phases split out):
    rebuilding them on every call cost as much as a small batch's convolutions. A parameter that is
    loaded, moved or cast gets a new version or address, which makes the kept weight stale. Nothing is
    kept while autograd records, so gradients reach the parameters as usual.
    """
    if torch.is_grad_enabled():
        return make()
    try:
        key = tuple((t.data_ptr(), t._version, t.device) for t in sources)
    except RuntimeError:  # parameters created under inference mode carry no version counter
        return make()
    kept = module.__dict__.setdefault("_derived_weights", {})
    if name not in kept or kept[name][0] != key:
        kept[name] = (key, make())
    return kept[name][1]


def fused_leaky_relu(x: Tensor, bias: Tensor, *, inplace: bool = False) -> Tensor:
    """Bias, leaky ReLU (slope 0.2) and the gain sqrt(2) that keeps activations at unit variance.

    Computed as ``leaky_relu(g*x + g*b)`` (the same thing, as g > 0) so the in-place form is two passes.
    """
    b = bias.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2)) * _LRELU_GAIN
    if inplace and _writes_in_place(x, b):
        torch.add(b, x, alpha=_LRELU_GAIN, out=x)
        return F.leaky_relu_(x, _LRELU_SLOPE)
    return F.leaky_relu(x * _LRELU_GAIN + b, _LRELU_SLOPE)


class FusedLeakyReLU(nn.Module):
    """Per-channel bias followed by the scaled leaky ReLU (the official CUDA op, in plain torch).

    Works in place: its input is always a fresh convolution or concatenation output.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(x, self.bias, inplace=True)


class PixelNorm(nn.Module):
    """Normalise each latent vector to unit root-mean-square before the mapping network."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate (weights N(0, 1)/lr_mul, scaled at run time)."""

    def __init__(
        self, in_dim: int, out_dim: int, *, bias_init: float = 0.0, lr_mul: float = 1.0,
        activation: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)
        if self.activation:
            out = F.linear(x, self.weight * self.scale)
            return fused_leaky_relu(out, self.bias * self.lr_mul, inplace=True)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    """Conv2d with equalized learning rate."""

    def __init__(
        self, in_channel: int, out_channel: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:
        weight = (self.weight * self.scale).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, stride=self.stride, padding=self.padding)


class Blur(nn.Module):
    """Anti-aliasing FIR filter around resampling (the kernel buffer is part of the weight file).

    A depthwise convolution (true convolution, hence the flip), padded by the conv itself.
    """

    kernel: Tensor

    def __init__(self, taps: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1) -> None:
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(taps) * upsample_factor**2)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        weight = torch.flip(self.kernel, [0, 1]).to(x.dtype).expand(c, 1, *self.kernel.shape)
        p0, p1 = self.pad
        if p0 != p1:
            x, p0 = F.pad(x, [p0, p1, p0, p1]), 0
        return F.conv2d(x, weight, padding=p0, groups=c)


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip path (the official upfirdn2d with up=2, pad=(2, 1)).

    Computed in polyphase form: each of the four output phases is a 3x3 depthwise filter of the input,
    one ordinary grouped convolution followed by a pixel shuffle (no zero-stuffed intermediate, and
    much faster than a depthwise transposed convolution on GPUs).
    """

    kernel: Tensor

    def __init__(self, taps: Sequence[float], factor: int = 2) -> None:
        super().__init__()
        if factor != 2 or len(taps) != 4:
            raise ValueError("Upsample supports the 4-tap kernel and factor 2 of StyleGAN2")
        self.register_buffer("kernel", make_blur_kernel(taps) * factor**2)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        weight = _fir_upsample_phases(self.kernel.to(x.dtype))
        out = F.conv2d(x, weight.expand(c, 4, 3, 3).reshape(c * 4, 1, 3, 3), padding=1, groups=c)
        return F.pixel_shuffle(out, 2)


def _fir_upsample_phases(kernel: Tensor) -> Tensor:
    """(4, 4) FIR kernel -> (4, 3, 3): output phase (r, s) of zero insertion + pad (2, 1) + FIR.

    In 1-D, out[2n] = k3 x[n-1] + k1 x[n] and out[2n+1] = k2 x[n] + k0 x[n+1]: with the kernel padded by
    one zero on each side (kz), phase 0 reads kz[4], kz[2], kz[0] and phase 1 kz[5], kz[3], kz[1].
    """
    kz = torch.flip(F.pad(kernel, (1, 1, 1, 1)), [0, 1])  # flipped: kz[4], kz[2], kz[0] are at 1, 3, 5
    rows = torch.stack((kz[1::2], kz[0::2]))  # (r, t, 6)
    taps = torch.stack((rows[..., 1::2], rows[..., 0::2]), dim=2)  # (r, t, s, u)
    return taps.permute(0, 2, 1, 3).reshape(4, 3, 3)


def upsample_conv(x: Tensor, weight: Tensor, blur: Blur, *, phases: Tensor | None = None) -> Tensor:
    """``conv_transpose2d(x, W, stride=2)`` followed by ``blur``: (N, in, H, W) -> (N, out, 2H, 2W).

    oneDNN (CPU) runs the transposed convolution well, and the blur is cheap there. cuDNN runs transposed
    convolutions slowly (and gave run-to-run differences here) and depthwise blurs very slowly, so on CUDA
    both are folded into one ordinary 3x3 convolution producing the four output phases, interleaved by
    ``depth_to_space`` (see ``upsample_phases``): more multiply-adds, far less time. ``phases`` may give
    that folded weight, made ahead.
    """
    if _gpu_formulation(x):
        phases = upsample_phases(weight, blur.kernel) if phases is None else phases
        return depth_to_space(upsample_conv_phase_major(x, phases))
    return blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))


def upsample_conv_phase_major(x: Tensor, phases: Tensor) -> Tensor:
    """``upsample_conv`` on CUDA before ``depth_to_space``: (N, 4 * out, H, W), for a caller that interleaves."""
    return F.conv2d(x, phases, padding=1)


def depth_to_space(x: Tensor) -> Tensor:
    """(N, 4C, H, W), channels ordered (row phase, column phase, channel) -> (N, C, 2H, 2W), channels-last.

    ``F.pixel_shuffle`` orders the phases inside each channel, and on CUDA it returns a contiguous (NCHW)
    tensor: a channels-last network would leave that layout after its first upsampling, and cuDNN would
    transpose around every later convolution. With the phases outermost, the one copy here moves runs of
    C adjacent values and the result stays channels-last.
    """
    n, c4, h, w = x.shape
    out = torch.empty((n, c4 // 4, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    cells_of(out).copy_(phases_of(x))
    return out


def phases_of(x: Tensor) -> Tensor:
    """View of a phase-major (N, 4C, H, W) tensor as (N, H, row phase, W, column phase, C)."""
    n, c4, h, w = x.shape
    return x.permute(0, 2, 3, 1).unflatten(3, (2, 2, c4 // 4)).permute(0, 1, 3, 2, 4, 5)


def cells_of(x: Tensor) -> Tensor:
    """View of an (N, C, 2H, 2W) tensor as (N, H, row phase, W, column phase, C): where ``phases_of`` lands."""
    return x.permute(0, 2, 3, 1).unflatten(1, (x.shape[2] // 2, 2)).unflatten(3, (x.shape[3] // 2, 2))


def space_to_depth(x: Tensor) -> Tensor:
    """(N, C, 2H, 2W) -> (N, 4C, H, W), channels ordered (row phase, column phase, channel), channels-last.

    The inverse of ``depth_to_space``, for the same reason preferred to ``F.pixel_unshuffle``.
    """
    n, c, h2, w2 = x.shape
    cells = x.permute(0, 2, 3, 1).reshape(n, h2 // 2, 2, w2 // 2, 2, c)
    return cells.permute(0, 1, 3, 2, 4, 5).reshape(n, h2 // 2, w2 // 2, 4 * c).permute(0, 3, 1, 2)


def upsample_phases(weight: Tensor, kernel: Tensor) -> Tensor:
    """(out, in, 3, 3) weight + (4, 4) blur -> (4 * out, in, 3, 3), channels ordered (row, column phase, out).

    In 1-D the transposed conv followed by the blur (padding 1) is a transposed conv with c = w * k (full
    convolution, 6 taps) and padding 2: z[2n + r] = c[r + 4] x[n - 1] + c[r + 2] x[n] + c[r] x[n + 1].
    With cf = c reversed, the taps over (x[n - 1], x[n], x[n + 1]) are cf[1 - r::2].
    """
    out_c, in_c = weight.shape[:2]
    cf = torch.flip(fold_blur(weight, torch.flip(kernel, [0, 1])), [2, 3])  # fold_blur(w, flip k) = w * k
    phases = [cf[:, :, 1 - r :: 2, 1 - s :: 2] for r in (0, 1) for s in (0, 1)]
    return torch.cat(phases).reshape(4 * out_c, in_c, 3, 3)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (StyleGAN2 Sec. 2.2), optionally upsampling by 2.

    Computed as ``demod * conv(x * s, W)``: exact, and batch-friendly because every sample shares W.
    With ``upsample`` it is a stride-2 transposed convolution followed by the blur, as in the paper
    (see ``upsample_conv``); demodulation is a per-channel scale, so it is applied after the blur.
    A 1x1 convolution (ToRGB, 3 outputs) modulates the tiny weight per sample instead of the input.
    """

    def __init__(
        self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, *,
        demodulate: bool = True, upsample: bool = False, blur_taps: Sequence[float] = BLUR_KERNEL,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        if upsample:
            p = (len(blur_taps) - 2) - (kernel_size - 1)
            self.blur = Blur(blur_taps, pad=((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.upsample = upsample

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        if self.kernel_size == 1 and not self.upsample:
            return self._pointwise(x, self.modulation(style).float() * self.scale)
        s, demod = self._styles(style, x.dtype)
        out = self._shared_conv(x, s)
        if demod is not None:
            demod = demod.to(out.dtype)[:, :, None, None]
            out = out.mul_(demod) if _writes_in_place(out, demod) else out * demod
        return out

    def _styles(self, style: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The per-sample input scales ``s`` (N, in) and demodulation factors (N, out) or None, in float32.

        In fp16, ``conv(x * s, W)`` before demodulation is larger than the layer's output by 1 / demod, which
        can pass fp16's 65504 where styles are large. Scaling a sample's ``s`` by ``a`` scales its demodulation by
        ``1 / a``, so the product is unchanged; with ``a`` the mean demodulation factor, the convolution's output
        has about the size of the layer's."""
        s = self.modulation(style).float() * self.scale  # (N, in), float32 whatever x's dtype
        if not self.demodulate:
            return s, None
        demod = self.demodulation(s)
        if dtype == torch.float16:
            a = demod.mean(dim=1, keepdim=True)
            s, demod = s * a, demod / a
        return s, demod

    def undemodulated(self, x: Tensor, style: Tensor) -> tuple[Tensor, Tensor | None, bool]:
        """``forward`` without its last step, for a caller that folds the per-channel scale into its own pass.

        Returns the shared conv's output, the demodulation factors (N, out) or None, and whether the output
        is still phase-major (N, 4 * out, H, W): an upsampling layer in the CUDA formulation leaves the
        interleaving (``phases_of`` -> ``cells_of``) to that same pass.
        """
        s, demod = self._styles(style, x.dtype)
        if self.upsample and _gpu_formulation(x):
            x = x * s.to(x.dtype)[:, :, None, None]
            return upsample_conv_phase_major(x, self._phases(x.dtype)), demod, True
        return self._shared_conv(x, s), demod, False

    def _shared_conv(self, x: Tensor, s: Tensor) -> Tensor:
        """``conv(x * s, W)`` (upsampling if asked): the one convolution every sample shares."""
        weight = self.weight[0].to(x.dtype)
        x = x * s.to(x.dtype)[:, :, None, None]
        if self.upsample:
            phases = self._phases(x.dtype) if _gpu_formulation(x) else None
            return upsample_conv(x, weight, self.blur, phases=phases)
        return F.conv2d(x, weight, padding=self.kernel_size // 2)

    def _phases(self, dtype: torch.dtype) -> Tensor:
        """``upsample_phases`` of this layer's weight and blur, made in float32 once and kept."""
        return derived_weight(
            self, f"phases {dtype}",
            lambda: upsample_phases(self.weight[0].float(), self.blur.kernel.float()).to(dtype),
            self.weight, self.blur.kernel)

    def demodulation(self, s: Tensor) -> Tensor:
        """1 / ||W * s|| per sample and output channel, in float32: (N, out)."""
        w_sq = derived_weight(  # (out, in)
            self, "squared norms", lambda: torch.linalg.vector_norm(self.weight[0].float(), dim=(2, 3)).square(),
            self.weight)
        return torch.rsqrt(s.square() @ w_sq.t() + 1e-8)

    def _pointwise(self, x: Tensor, s: Tensor) -> Tensor:
        weight = self.weight[0, :, :, 0, 0].float() * s[:, None, :]  # (N, out, in)
        if self.demodulate:
            weight = weight * self.demodulation(s)[:, :, None]
        return torch.einsum("nihw,noi->nohw", x, weight.to(x.dtype))


class NoiseInjection(nn.Module):
    """GPEN's noise injection: concatenates ``weight * feature`` to the activations.

    In GPEN the "noise" is the encoder's feature map at the same resolution (deterministic), and it is
    concatenated rather than added, so the channel count doubles after every styled convolution.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, feature: Tensor) -> Tensor:
        return torch.cat((x, self.weight.to(x.dtype) * feature.to(x.dtype)), dim=1)


class StyledConv(nn.Module):
    """Modulated conv, feature injection, activation: one synthesis layer.

    Without autograd the last three steps run fused (``demodulate_inject_activate``); with it, as written.
    """

    def __init__(
        self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, *,
        upsample: bool = False, blur_taps: Sequence[float] = BLUR_KERNEL,
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channel, out_channel, kernel_size, style_dim, upsample=upsample, blur_taps=blur_taps
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel * 2)

    def forward(self, x: Tensor, style: Tensor, feature: Tensor) -> Tensor:
        if not _writes_in_place(x, feature, self.noise.weight, self.activate.bias):
            out = self.conv(x, style)
            out = self.noise(out, feature)
            return self.activate(out)
        # The same three steps in one pass per half of the output (they are memory-bound; the conv is not).
        out, demod, phase_major = self.conv.undemodulated(x, style)
        return demodulate_inject_activate(out, demod, feature, self.noise.weight, self.activate.bias,
                                          phase_major=phase_major)


def demodulate_inject_activate(
    out: Tensor, demod: Tensor | None, feature: Tensor, noise_weight: Tensor, bias: Tensor, *,
    phase_major: bool = False,
) -> Tensor:
    """``fused_leaky_relu(cat(out * demod, noise_weight * feature), bias)``, written once into a new tensor.

    Each half is one ``addcmul`` (the gain and bias folded in: ``g*b + x*(g*scale)``, as g > 0) straight
    into its place in the concatenation, then one in-place leaky ReLU over both: three passes over the
    activations instead of six (demodulate, copy in, scale the feature, add the bias, activate). A
    ``phase_major`` ``out`` (N, 4C, H, W) is interleaved by the same ``addcmul``, which saves the copy too.
    """
    n, c = out.shape[:2]
    if phase_major:
        c //= 4
    h, w = feature.shape[2:]
    dtype = out.dtype
    result = torch.empty((n, c + feature.shape[1], h, w), dtype=dtype, device=out.device,
                         memory_format=_memory_format(out))
    gain_bias = (bias.float() * _LRELU_GAIN).to(dtype)
    scale = (torch.ones((n, c), device=out.device) if demod is None else demod.float()) * _LRELU_GAIN
    if phase_major:  # channels last in every view: (N, H, row, W, column, C)
        torch.addcmul(gain_bias[:c], phases_of(out), scale.to(dtype)[:, None, None, None, None, :],
                      out=cells_of(result[:, :c]))
    else:
        torch.addcmul(gain_bias[:c, None, None], out, scale.to(dtype)[:, :, None, None], out=result[:, :c])
    feature_scale = (noise_weight.float() * _LRELU_GAIN).to(dtype).view(1, 1, 1, 1)
    torch.addcmul(gain_bias[c:, None, None], feature.to(dtype), feature_scale, out=result[:, c:])
    return F.leaky_relu_(result, _LRELU_SLOPE)


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB (no demodulation), added to the upsampled skip image.

    The RGB skip path is accumulated in float32 even when the features are half precision.
    """

    def __init__(self, in_channel: int, style_dim: int, *, upsample: bool = True,
                 blur_taps: Sequence[float] = BLUR_KERNEL) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_taps)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, style).float() + self.bias.float()
        if skip is not None:
            out = out + self.upsample(skip.float())
        return out


class ConstantInput(nn.Module):
    """Learned 4x4 constant the synthesis network starts from."""

    def __init__(self, channel: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.expand(batch, -1, -1, -1)


class ConvLayer(nn.Sequential):
    """Encoder layer: [blur, stride-2] equalized conv, fused bias + leaky ReLU.

    A Sequential so that the official keys (``0.kernel``, ``1.weight``, ``2.bias``) come out as is.
    Without autograd the activation's bias and gain ride in the conv, leaving one in-place pass.
    On CUDA the blur is folded into the strided conv (one 6x6 stride-2 conv, see ``fold_blur``), run as
    a space-to-depth 3x3 conv: cuDNN's depthwise kernels on channels-last tensors took 40% of the whole
    generator's time, and it picks slow non-tensor-core kernels for 6x6 stride-2 convolutions.
    """

    def forward(self, x: Tensor) -> Tensor:
        conv, activate = self[-2], self[-1]
        if not isinstance(conv, EqualConv2d) or not isinstance(activate, FusedLeakyReLU):
            layers = [type(m).__name__ for m in self]
            raise TypeError(f"ConvLayer must end in EqualConv2d, FusedLeakyReLU, got {layers}")
        if not _writes_in_place(x, conv.weight, activate.bias):
            return super().forward(x)
        # leaky(g*conv(x, W) + g*b) = leaky(conv(x, g*W, g*b)): the bias and gain ride in the conv.
        bias = (activate.bias.float() * _LRELU_GAIN).to(x.dtype)
        first = self[0] if isinstance(self[0], Blur) else None
        if first is not None and _gpu_formulation(x):
            def folded() -> Tensor:
                blurred = fold_blur(conv.weight.float() * (conv.scale * _LRELU_GAIN), first.kernel.float())
                return space_to_depth_weight(blurred).to(x.dtype)

            weight = derived_weight(self, f"folded {x.dtype}", folded, conv.weight, first.kernel)
            out = stride2_conv_space_to_depth(x, weight, first.pad[0], bias)
        else:
            weight = (conv.weight * (conv.scale * _LRELU_GAIN)).to(x.dtype)  # as cheap as EqualConv2d's own
            out = F.conv2d(x if first is None else first(x), weight, bias, stride=conv.stride, padding=conv.padding)
        return F.leaky_relu_(out, _LRELU_SLOPE)

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, *, downsample: bool = False,
                 blur_taps: Sequence[float] = BLUR_KERNEL) -> None:
        layers: list[nn.Module] = []
        if downsample:
            p = (len(blur_taps) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_taps, pad=((p + 1) // 2, p // 2)))
            layers.append(EqualConv2d(in_channel, out_channel, kernel_size, stride=2, bias=False))
        else:
            layers.append(EqualConv2d(in_channel, out_channel, kernel_size, padding=kernel_size // 2,
                                      bias=False))
        layers.append(FusedLeakyReLU(out_channel))
        super().__init__(*layers)


def fold_blur(weight: Tensor, kernel: Tensor) -> Tensor:
    """The single conv kernel equal to ``Blur(kernel)`` followed by a conv with ``weight``: (o, i, k+3, k+3).

    The blur correlates with the flipped kernel and the conv correlates with ``weight``; two correlations
    in a row are one correlation with their full convolution, which is ``weight`` padded and correlated
    with the (unflipped) blur kernel. Strides and padding carry over unchanged.
    """
    out_c, in_c, kh, kw = weight.shape
    th, tw = kernel.shape
    padded = F.pad(weight.reshape(out_c * in_c, 1, kh, kw), [tw - 1, tw - 1, th - 1, th - 1])
    return F.conv2d(padded, kernel[None, None]).reshape(out_c, in_c, kh + th - 1, kw + tw - 1)


def stride2_conv_space_to_depth(x: Tensor, s2d_weight: Tensor, padding: int, bias: Tensor | None = None) -> Tensor:
    """``conv2d(x, weight, stride=2, padding=padding)`` for an even-sized kernel, as a stride-1 conv.

    ``s2d_weight`` is ``space_to_depth_weight(weight)``. Tap (2p + a, 2q + b) of the kernel meets input
    pixel (2y + 2p + a, 2x + 2q + b): after ``space_to_depth`` that is channel (a, b, c) at (y + p, x + q),
    an ordinary conv with half the kernel size.
    """
    return F.conv2d(space_to_depth(F.pad(x, [padding] * 4)), s2d_weight, bias)


def space_to_depth_weight(weight: Tensor) -> Tensor:
    """(out, in, 2k, 2k) kernel -> (out, 4 * in, k, k), input channels ordered as ``space_to_depth`` makes them."""
    out_c, in_c, kh, kw = weight.shape
    w = weight.reshape(out_c, in_c, kh // 2, 2, kw // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return w.reshape(out_c, 4 * in_c, kh // 2, kw // 2)


def _memory_format(x: Tensor) -> torch.memory_format:
    """Keep channels-last tensors channels-last (the fast layout for oneDNN and tensor cores)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
