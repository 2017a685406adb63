"""Benchmark: how fast the engine restores faces, and how that compares with one face at a time.

Figures (all from runs in this process, never estimated):

* the device's matrix-multiply rate in the generator's compute dtype: the faster of a large square matmul
  (MKL or cuBLAS) and the same product as a 1x1 convolution (oneDNN or cuDNN, the library the generator's
  convolutions run on; on some CPUs it multiplies twice as fast as MKL, and a fraction of the slower one
  would be of nothing the hardware is limited to);
* generator FLOPs per face, counted on one forward pass (``torch.utils.flop_counter``);
* a generator-only sweep over batch sizes: faces/s and achieved FLOP/s as a fraction of the matmul rate,
  with the baseline also for the official formulation at the same batch sizes;
* end-to-end passes over a set of photos (decode, detect, align, generate, paste, encode): images/s,
  faces/s, milliseconds per stage, peak host RSS and peak device memory;
* optionally the same photos restored the way the official GPEN scripts do it (``baseline_restore``),
  with the same detector and generator weights, and the speed-up ratio.

Timings are the best of ``repeat`` passes: on a shared machine the fastest pass is the one least
disturbed by other processes, and the same rule applies to both sides of every ratio.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from . import imageio
from .align import similarity_transform
from .detect import detect_faces
from .gpen import FullGenerator, GpenArch, create_generator
from .masks import rectangle_mask
from .options import EngineOptions, Preset
from .restorer import WorkingImage, prepare_image
from .stylegan2 import Blur, ConvLayer, ModulatedConv2d, StyledConv, ToRGB, fused_leaky_relu
from .types import EngineError, RestoredImage

STAGES = ("decode", "detect", "align", "generate", "paste", "encode")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_T = TypeVar("_T")
_M = TypeVar("_M", bound=nn.Module)


# ------------------------------------------------------------------------------------ device rate


@dataclass(frozen=True)
class MatmulRate:
    """Measured dense matrix-multiply throughput of the device: the faster of two libraries."""

    flops_per_s: float
    dtype: str
    n: int
    matmul_flops_per_s: float = 0.0  # torch.mm (MKL, cuBLAS)
    conv_flops_per_s: float = 0.0  # the same product as a 1x1 convolution (oneDNN, cuDNN)
    tf32: bool = False  # fp32 on CUDA: both measured with the TF32 setting the generator's convolutions get


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    for _ in range(2):  # warm-up: kernel selection, thread pool start
        run()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _matmul_size(device: torch.device, dtype: torch.dtype) -> int:
    """The side of the products that measure ``device``: 8192 on a GPU; on a CPU up to 2048, smaller where one
    product takes long enough to time already. CPUs differ in half precision by orders of magnitude: without
    AVX-512 BF16 it is emulated (about 1 GFLOP/s on two cores), and 2048 would take minutes to measure."""
    if device.type == "cuda":
        return 8192
    n = 256
    with torch.inference_mode():
        while n < 2048:
            a = torch.randn(n, n, device=device, dtype=dtype)
            a @ a  # the first call of a size starts the library's threads and picks its kernel
            started = time.perf_counter()
            a @ a
            if time.perf_counter() - started > 0.05:
                break
            n *= 2
    return n


def measure_matmul(device: torch.device, dtype: torch.dtype, *, n: int | None = None,
                   repeats: int = 5) -> MatmulRate:
    """Best rate of ``repeats`` n x n @ n x n products (2 n^3 FLOPs each), as a matmul and as a 1x1 conv.

    The convolution multiplies an (n pixels, n channels) channels-last image by an (n, n) weight: the same
    FLOPs through the convolution library. On CUDA in fp32 the matmul runs with cuDNN's TF32 setting, so
    that both sides of the fraction use (or do not use) the tensor cores alike.
    """
    n = n or _matmul_size(device, dtype)
    tf32 = device.type == "cuda" and dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32)
    side = 32
    pixels = max(1, n // side**2) * side**2
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    image = torch.randn(pixels // side**2, n, side, side, device=device, dtype=dtype).to(
        memory_format=torch.channels_last)
    weight = torch.randn(n, n, 1, 1, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = tf32 or saved
        with torch.inference_mode():
            mm = 2.0 * n**3 / _best_seconds(lambda: a @ b, device, repeats)
            conv = 2.0 * pixels * n * n / _best_seconds(lambda: F.conv2d(image, weight), device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return MatmulRate(max(mm, conv), str(dtype).removeprefix("torch."), n, mm, conv, tf32)


def compute_dtype(generator: nn.Module) -> torch.dtype:
    """The dtype the bulk of the generator's weights (its convolutions) run in."""
    return max(generator.parameters(), key=lambda p: p.numel()).dtype


def generator_flops(generator: nn.Module, size: int, device: torch.device) -> float:
    """FLOPs of one face through the generator, counted on a forward pass.

    Counted on a copy of the architecture on the ``meta`` device when the module names its ``arch``: the
    figure then belongs to the model (it matches the published GFLOPs per face), not to whichever
    kernels a device path happens to use, and nothing is computed.
    """
    arch = getattr(generator, "arch", None)
    if isinstance(arch, GpenArch):
        with torch.device("meta"):
            model = create_generator(arch).eval()
        return _count_flops(model, size, torch.device("meta"))
    return _count_flops(generator, size, device)


def _count_flops(generator: nn.Module, size: int, device: torch.device) -> float:
    flags = [p.requires_grad for p in generator.parameters()]
    # The counter's module tracker wants autograd nodes for tensors that require grad; inference has none.
    generator.requires_grad_(False)
    try:
        x = torch.zeros(1, 3, size, size, device=device)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            generator(x)
        return float(counter.get_total_flops())
    finally:
        for p, flag in zip(generator.parameters(), flags, strict=True):
            p.requires_grad_(flag)


@dataclass(frozen=True)
class SweepPoint:
    """Generator alone at one batch size."""

    batch: int
    faces_per_s: float
    flops_per_s: float
    fraction: float  # of the measured matmul rate


def sweep_generator(
    generator: Callable[[Tensor], Tensor], size: int, device: torch.device, *, batches: Sequence[int],
    flops_per_face: float, peak: MatmulRate, repeats: int = 3,
) -> list[SweepPoint]:
    """Faces/s and FLOP/s fraction of ``generator`` (the module, or ``official_forward`` bound to it) on random
    input at each batch size (best of repeats)."""
    points = []
    with torch.inference_mode():
        for batch in batches:
            x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
            generator(x)  # warm-up for this shape
            _sync(device)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                generator(x)
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            rate = flops_per_face * batch / best
            points.append(SweepPoint(batch, batch / best, rate, rate / peak.flops_per_s))
    return points


# ------------------------------------------------------------------------------------ photos


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def synthetic_sets(seed: bytes, *, detector: nn.Module | None = None, portraits: int = 0,
                   max_pixels: int = 100_000_000) -> dict[str, list[bytes]]:
    """Benchmark photo sets built from one seed photo that has faces (the Solvay group photo).

    ``photo``: the seed itself, bytes unchanged. ``24mp``: a 6000x4000 JPEG made by upscaling a crop of the
    seed's central part (about ten faces, each then several hundred pixels wide), the kind of camera file
    where full-frame work per face dominates. ``portraits`` (when a detector is given and ``portraits`` > 0):
    that many 1280x1920 single-portrait JPEGs, each framed around one face the detector finds in the seed.
    """
    rgb = imageio.decode(seed, max_pixels=max_pixels).rgb
    h, w = rgb.shape[:2]
    cw = max(16, w // 3)
    ch = max(16, cw * 2 // 3)
    x0 = max(0, (w - cw) // 2)
    y0 = max(0, min(h - ch, h // 6))
    crop = rgb[y0 : y0 + ch, x0 : x0 + cw]
    big = cv2.resize(crop, (6000, 4000), interpolation=cv2.INTER_CUBIC)
    sets = {"photo": [seed], "24mp": [encode_jpeg(big)]}
    if detector is not None and portraits > 0:
        faces = detect_faces(detector, [rgb], long_side=1000)[0]
        sets["portraits"] = [portrait(rgb, faces[i % len(faces)].box) for i in range(portraits)] if faces else []
    return sets


def portrait(rgb: np.ndarray, box: np.ndarray, size: tuple[int, int] = (1280, 1920)) -> bytes:
    """A single-portrait JPEG of ``size`` (width, height): the face of ``box`` fills ~60% of the width,
    so its neighbours in a group photo fall outside the frame."""
    out_w, out_h = size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    scale = out_w / (1.6 * max(box[2] - box[0], box[3] - box[1]))
    matrix = np.array([[scale, 0, out_w / 2 - scale * cx], [0, scale, out_h / 2 - scale * cy]])
    framed = cv2.warpAffine(rgb, matrix, (out_w, out_h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    return encode_jpeg(framed)


# ------------------------------------------------------------------------------------ passes


@dataclass
class PassStats:
    """One way of restoring one photo set: the best pass and what it cost."""

    method: str
    images: int
    faces: int
    failed: int
    seconds: float
    images_per_s: float
    faces_per_s: float
    ms_per_image: dict[str, float]  # per stage, mean over the images of the best pass
    generator_fraction: float | None  # achieved generator FLOP/s / matmul rate during this pass
    peak_rss_mb: float | None
    peak_device_mb: float | None
    errors: list[str] = field(default_factory=list)
    # Share of the wall time the device's thread spent restoring, and waiting for decoded images.
    # Near 100 % busy: the device's thread is the limit; much waiting: the CPU pool is.
    restore_busy: float | None = None
    decode_wait: float | None = None


@dataclass
class _Pass:
    seconds: float
    faces: int
    failed: int
    stage_ms: dict[str, float]
    errors: list[str]
    restore_s: float | None = None  # time the calling thread spent inside the engine's restore calls
    wait_s: float | None = None  # time it spent waiting for the pool to finish decoding


def _reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: "5" resets this process's peak RSS (VmHWM) so each phase gets its own figure.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process (since the last reset, where the kernel allows resets)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peak_device_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _timed(fn: Callable[[], _T]) -> tuple[_T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1000


@dataclass
class _Best:
    """The fastest pass of one method, and the largest memory peaks seen over all its passes."""

    best: _Pass | None = None
    rss: float | None = None
    device_mb: float | None = None

    def add(self, p: _Pass, rss: float | None, device_mb: float | None) -> None:
        if self.best is None or p.seconds < self.best.seconds:
            self.best = p
        self.rss = max(filter(None, (self.rss, rss)), default=None)
        self.device_mb = max(filter(None, (self.device_mb, device_mb)), default=None)


def _interleaved(runs: dict[str, Callable[[], _Pass]], repeat: int, device: torch.device,
                 others_mb: dict[str, Callable[[], float]] | None = None) -> dict[str, _Best]:
    """Best of ``repeat`` passes per method, the methods taking turns so that both sides of a ratio see
    the same machine (other processes come and go); one untimed warm-up pass each first.

    ``others_mb``: device memory held for the other methods during a method's passes (the baseline's fp32
    copy of the generator during the engine's), left out of its peak."""
    for run in runs.values():
        run()  # warm-up: kernel choice, allocator, thread pools
    bests = {name: _Best() for name in runs}
    for _ in range(max(1, repeat)):
        for name, run in runs.items():
            _reset_peaks(device)
            p = run()
            peak = _peak_device_mb(device)
            if peak is not None and (other := (others_mb or {}).get(name)) is not None:
                peak -= other()
            bests[name].add(p, peak_rss_mb(), peak)
    return bests


def module_mb(module: nn.Module) -> float:
    """Device memory a module's parameters, buffers and kept derived weights hold, in MiB."""
    tensors = [*module.parameters(), *module.buffers()]
    for part in module.modules():
        tensors += [t for _key, t in part.__dict__.get("_derived_weights", {}).values() if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine, reported beside the timings."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def engine_pass(
    restore: Callable[[list[WorkingImage]], list[RestoredImage | EngineError]],
    inputs: Sequence[bytes],
    options: EngineOptions,
    pool: ThreadPoolExecutor,
    *,
    images_per_call: int,
    device: torch.device,
) -> _Pass:
    """The engine's way: decode in the pool, restore several images per call (faces batched across them),
    encode in the pool while the next call runs."""
    preset = options.preset

    def decode(data: bytes) -> tuple[tuple[imageio.DecodedImage, WorkingImage] | EngineError, float]:
        def work() -> tuple[imageio.DecodedImage, WorkingImage]:
            image = imageio.decode(data, max_pixels=options.decode.max_pixels, long_side=preset.max_long_side)
            return image, prepare_image(image.rgb, preset)

        try:
            return _timed(work)
        except EngineError as exc:
            return exc, 0.0

    def encode(image: imageio.DecodedImage, rgb: np.ndarray) -> float:
        return _timed(lambda: imageio.encode(image, rgb, options=options.encode))[1]

    t0 = time.perf_counter()
    stage = dict.fromkeys(STAGES, 0.0)
    faces = failed = 0
    errors: list[str] = []
    decoded = [pool.submit(decode, data) for data in inputs]
    encodes = []
    restore_s = wait_s = 0.0
    for start in range(0, len(inputs), images_per_call):
        t_wait = time.perf_counter()
        chunk = [f.result() for f in decoded[start : start + images_per_call]]
        t_restore = time.perf_counter()
        wait_s += t_restore - t_wait
        good = [(out, ms) for out, ms in chunk if not isinstance(out, EngineError)]
        for out, _ in chunk:
            if isinstance(out, EngineError):
                failed += 1
                errors.append(str(out))
        results = restore([out[1] for out, _ in good]) if good else []
        _sync(device)
        restore_s += time.perf_counter() - t_restore
        for ((image, working), decode_ms), result in zip(good, results, strict=True):
            stage["decode"] += decode_ms - working.prepare_ms  # preparing is in the engine's detect time
            if isinstance(result, EngineError):
                failed += 1
                errors.append(str(result))
                continue
            faces += len(result.faces)
            for name, ms in result.times.as_dict().items():
                if name not in ("decode", "encode"):
                    stage[name] += ms
            encodes.append(pool.submit(encode, image, result.rgb))
    for future in encodes:
        stage["encode"] += future.result()
    seconds = time.perf_counter() - t0
    n = max(1, len(inputs))
    return _Pass(seconds, faces, failed, {k: v / n for k, v in stage.items()}, errors, restore_s, wait_s)


# ------------------------------------------------------------------------------------ baseline


def _per_channel_fir(x: Tensor, kernel: Tensor, *, up: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """FIR resampling as the official pure-PyTorch fallback lays it out: every channel of every sample
    becomes its own one-channel image (N*C, 1, H, W), zero-stuffed, padded and filtered by one conv."""
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    if up > 1:
        y = F.pad(y.reshape(n * c, 1, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1])
        y = y.reshape(n * c, 1, h * up, w * up)
    p0, p1 = pad
    y = F.pad(y, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    y = y[:, :, max(-p0, 0) : y.shape[2] - max(-p1, 0), max(-p0, 0) : y.shape[3] - max(-p1, 0)]
    y = F.conv2d(y, torch.flip(kernel, [0, 1]).to(y.dtype)[None, None])
    return y.reshape(n, c, y.shape[2], y.shape[3])


def _grouped_modulated_conv(conv: ModulatedConv2d, x: Tensor, style: Tensor) -> Tensor:
    """StyleGAN2's modulated convolution as the official code computes it: a weight per sample
    (scaled by the style, demodulated), run as one grouped convolution with ``groups = batch``."""
    n, cin, h, w = x.shape
    s = conv.modulation(style).float()
    weight = conv.scale * conv.weight.float() * s.view(n, 1, cin, 1, 1)  # (N, out, in, k, k)
    if conv.demodulate:
        weight = weight * torch.rsqrt(weight.square().sum((2, 3, 4)) + 1e-8).view(n, -1, 1, 1, 1)
    cout, k = weight.shape[1], weight.shape[-1]
    if conv.upsample:
        per_sample = weight.transpose(1, 2).reshape(n * cin, cout, k, k)
        out = F.conv_transpose2d(x.reshape(1, n * cin, h, w), per_sample, stride=2, groups=n)
        out = out.reshape(n, cout, out.shape[2], out.shape[3])
        return _per_channel_fir(out, conv.blur.kernel, pad=conv.blur.pad)
    out = F.conv2d(x.reshape(1, n * cin, h, w), weight.reshape(n * cout, cin, k, k), padding=k // 2, groups=n)
    return out.reshape(n, cout, h, w)


def _official_styled(layer: StyledConv, x: Tensor, w: Tensor, feature: Tensor) -> Tensor:
    out = _grouped_modulated_conv(layer.conv, x, w)
    out = torch.cat((out, layer.noise.weight.float() * feature.float()), dim=1)
    return fused_leaky_relu(out, layer.activate.bias.float())


def _official_to_rgb(layer: ToRGB, x: Tensor, w: Tensor, skip: Tensor | None) -> Tensor:
    out = _grouped_modulated_conv(layer.conv, x, w) + layer.bias.float()
    if skip is None:
        return out
    # StyleGAN2's skip upsampling: zero-stuff by 2, pad (2, 1), the 4-tap FIR kernel of the weight file.
    return out + _per_channel_fir(skip, layer.upsample.kernel, up=2, pad=(2, 1))


def _expect(module: nn.Module, kind: type[_M]) -> _M:
    """``module``, which must be a ``kind``: torch's containers hand their layers back as plain Modules."""
    if not isinstance(module, kind):
        raise TypeError(f"expected a GPEN {kind.__name__}, got a {type(module).__name__}")
    return module


@torch.inference_mode()
def official_forward(generator: nn.Module, x: Tensor) -> Tensor:
    """The same GPEN generator and weights, computed the way the official implementation does on a
    machine without its CUDA extensions: float32, grouped modulated convolutions, per-channel FIR filters.

    Same function as ``generator(x)`` (tests check it); only the formulation, and so the speed, differs.
    """
    gpen = _expect(generator, FullGenerator)
    h = x.float()
    features = []
    for layer in gpen.encoder():
        for module in _expect(layer.get_submodule("0"), ConvLayer):
            h = _per_channel_fir(h, module.kernel, pad=module.pad) if isinstance(module, Blur) else module(h.float())
        features.append(h.float())
    z = gpen.final_linear(h.flatten(1)).float()
    synth = gpen.generator
    w = synth.style(z).float()
    features.reverse()
    out = _official_styled(synth.conv1, synth.input(x.shape[0]).float(), w, features[0])
    rgb = _official_to_rgb(synth.to_rgb1, out, w, None)
    for i, to_rgb in enumerate(synth.to_rgbs):
        out = _official_styled(_expect(synth.convs[2 * i], StyledConv), out, w, features[i + 1])
        out = _official_styled(_expect(synth.convs[2 * i + 1], StyledConv), out, w, features[i + 1])
        rgb = _official_to_rgb(_expect(to_rgb, ToRGB), out, w, rgb)
    return rgb


def baseline_restore(
    rgb: np.ndarray,
    *,
    detector: nn.Module,
    generator: nn.Module,
    device: torch.device,
    size: int,
    template: np.ndarray,
    preset: Preset,
    strength: float = 1.0,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, int, dict[str, float]]:
    """Restore ``rgb`` as the official GPEN scripts do: one face at a time, whole-frame work per face.

    Per face: an OpenCV warp of the crop, the generator on a batch of one in the official formulation
    (``official_forward``: float32, grouped modulated convolutions), then the restored face and its
    mask are each warped back over the *whole* frame, and the frame-sized mask and image are updated
    where this face's mask is larger; one final whole-frame blend. Same detector, generator and
    rectangle mask as the engine, none of the engine's batching or region-of-interest paste.
    ``mask``: that rectangle mask as an array, made once at start-up as the official scripts do.
    Returns the image, the number of faces and milliseconds per stage.
    """
    ms = dict.fromkeys(STAGES, 0.0)
    t = time.perf_counter()
    faces = detect_faces(
        detector, [rgb], long_side=preset.detect_long_side, confidence=preset.det_confidence,
        min_face_size=preset.min_face_size, max_faces=preset.max_faces,
    )[0]
    ms["detect"] = (time.perf_counter() - t) * 1000
    mask = official_mask(size) if mask is None else mask
    h, w = rgb.shape[:2]
    frame = rgb.astype(np.float32)
    full_face = np.zeros_like(frame)
    full_mask = np.zeros((h, w), np.float32)
    for face in faces:
        t = time.perf_counter()
        affine = similarity_transform(face.landmarks, template)
        crop = cv2.warpAffine(rgb, affine, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT)
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].to(device, torch.float32) / 127.5 - 1
        ms["align"] += (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        y = official_forward(generator, x)
        out = ((y[0].float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).round().byte().cpu().numpy()
        ms["generate"] += (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        if strength < 1:
            out = cv2.addWeighted(out, strength, crop, 1 - strength, 0)
        inverse = cv2.invertAffineTransform(affine)
        # The official scripts pass flags=3 (INTER_AREA), which warpAffine runs as bilinear.
        face_full = cv2.warpAffine(out, inverse, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32)
        mask_full = cv2.warpAffine(mask, inverse, (w, h), flags=cv2.INTER_LINEAR)
        larger = mask_full > full_mask  # several faces: the larger mask wins, decided over the whole frame
        full_mask[larger] = mask_full[larger]
        full_face[larger] = face_full[larger]
        ms["paste"] += (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    alpha = np.clip(full_mask, 0, 1)[:, :, None]
    result = np.clip(frame * (1 - alpha) + full_face * alpha, 0, 255).round().astype(np.uint8)
    ms["paste"] += (time.perf_counter() - t) * 1000
    return result, len(faces), ms


def official_mask(size: int) -> np.ndarray:
    """GPEN's fallback (rectangle) mask at ``size``, the engine's too, as a float32 array."""
    return rectangle_mask(size)[0, 0].float().cpu().numpy()


def baseline_pass(
    inputs: Sequence[bytes], options: EngineOptions, *, detector: nn.Module, generator: nn.Module,
    device: torch.device, size: int, template: np.ndarray, mask: np.ndarray,
) -> _Pass:
    """The official way over a photo set: one image after another, in one thread."""
    preset = options.preset
    t0 = time.perf_counter()
    stage = dict.fromkeys(STAGES, 0.0)
    faces = failed = 0
    errors: list[str] = []
    for data in inputs:
        try:
            (image, rgb), decode_ms = _timed(functools.partial(_decode_working, data, options))
        except EngineError as exc:
            failed += 1
            errors.append(str(exc))
            continue
        out, n, ms = baseline_restore(
            rgb, detector=detector, generator=generator, device=device, size=size, template=template,
            preset=preset, strength=preset.strength / 100, mask=mask)
        _, encode_ms = _timed(functools.partial(imageio.encode, image, out, options=options.encode))
        faces += n
        ms["decode"], ms["encode"] = decode_ms, encode_ms
        for k, v in ms.items():
            stage[k] += v
    seconds = time.perf_counter() - t0
    n_images = max(1, len(inputs))
    return _Pass(seconds, faces, failed, {k: v / n_images for k, v in stage.items()}, errors)


def _decode_working(data: bytes, options: EngineOptions) -> tuple[imageio.DecodedImage, np.ndarray]:
    image = imageio.decode(data, max_pixels=options.decode.max_pixels)
    return image, imageio.resize_long_side(image.rgb, options.preset.max_long_side)


# ------------------------------------------------------------------------------------ report


@dataclass
class SetReport:
    name: str
    sizes: list[str]
    engine: PassStats
    baseline: PassStats | None = None
    speedup: float | None = None  # baseline seconds / engine seconds


@dataclass
class BenchReport:
    load_average: tuple[float | None, float | None]  # 1-minute load at the start and end of the timed passes
    device: str
    precision: str
    model: str
    random_weights: bool
    batch_size: int
    matmul: MatmulRate
    gflops_per_face: float
    sweep: list[SweepPoint]
    best_batch: int
    best_fraction: float
    sets: list[SetReport]
    repeat: int
    torch_threads: int
    mask: str = "rectangle"  # the engine's paste mask (the baseline always uses the rectangle)
    official_sweep: list[SweepPoint] = field(default_factory=list)  # with the baseline: official_forward alone
    # The fp32 rate the official way's fractions are of, where the engine runs in another precision.
    official_matmul: MatmulRate | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _remeasured(rate: MatmulRate, device: torch.device, dtype: torch.dtype, sweeps: Sequence[list[SweepPoint]],
                passes: Sequence[PassStats | None]) -> MatmulRate:
    """The matmul rate measured again at the end; the higher of the two is the machine's (less disturbed), and
    the fractions of the sweeps and passes measured against ``rate`` are rescaled to it."""
    again = measure_matmul(device, dtype, n=rate.n)  # the same products: the two rates compare
    if again.flops_per_s <= rate.flops_per_s:
        return rate
    factor = rate.flops_per_s / again.flops_per_s
    for sweep in sweeps:
        sweep[:] = [SweepPoint(p.batch, p.faces_per_s, p.flops_per_s, p.fraction * factor) for p in sweep]
    for stats in passes:
        if stats is not None and stats.generator_fraction is not None:
            stats.generator_fraction *= factor
    return again


def _stats(method: str, p: _Pass, images: int, flops_per_face: float, peak: MatmulRate,
           rss: float | None, dev: float | None) -> PassStats:
    gen_s = p.stage_ms["generate"] * images / 1000
    fraction = (flops_per_face * p.faces / gen_s / peak.flops_per_s) if gen_s > 0 and p.faces else None
    return PassStats(
        method=method, images=images, faces=p.faces, failed=p.failed, seconds=p.seconds,
        images_per_s=images / p.seconds, faces_per_s=p.faces / p.seconds,
        ms_per_image={k: round(v, 2) for k, v in p.stage_ms.items()}, generator_fraction=fraction,
        peak_rss_mb=rss, peak_device_mb=dev, errors=p.errors,
        restore_busy=None if p.restore_s is None else p.restore_s / p.seconds,
        decode_wait=None if p.wait_s is None else p.wait_s / p.seconds,
    )


@dataclass(frozen=True)
class BenchModels:
    """What a benchmark needs from loaded engine models."""

    detector: nn.Module
    generator: nn.Module
    device: torch.device
    precision: str
    size: int  # the generator's face size
    template: np.ndarray  # the 5-point crop template at that size
    restore: Callable[[list[WorkingImage]], list[RestoredImage | EngineError]]
    mask: str = "rectangle"  # the engine's paste mask: "rectangle", "parsing" or "parsing, random weights"


def run_benchmark(
    models: BenchModels,
    options: EngineOptions,
    sets: dict[str, list[bytes]],
    *,
    model_name: str,
    random_weights: bool,
    repeat: int = 3,
    baseline: bool = False,
    io_threads: int = 4,
    images_per_call: int = 8,
    sweep_batches: Sequence[int] | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> BenchReport:
    """Measure the device, sweep the generator, then time every photo set (and the baseline on it)."""
    device, generator = models.device, models.generator
    size = models.size
    dtype = compute_dtype(generator)
    log(f"measuring {dtype} matmul rate on {device}")
    peak = measure_matmul(device, dtype)
    # The official way runs in fp32: on an fp32 copy of the generator, its fractions of the fp32 rate.
    official, peak32 = generator, peak
    if baseline and dtype != torch.float32:
        official = copy.deepcopy(generator).float()
        log(f"measuring {torch.float32} matmul rate on {device}, for the official formulation")
        peak32 = measure_matmul(device, torch.float32)
    flops = generator_flops(generator, size, device)
    batches = list(sweep_batches or ((1, 2, 4, 8) if device.type == "cpu" else (1, 4, 16, 32, 64)))
    log(f"generator sweep over batch sizes {batches}")
    sweep = sweep_generator(generator, size, device, batches=batches, flops_per_face=flops, peak=peak,
                            repeats=repeat)
    official_sweep = []
    if baseline:
        # Up to 16 faces: enough to show it slowing down per face, and a GPU's minutes are counted.
        small = [b for b in batches if b <= 16]
        log(f"official formulation over batch sizes {small}")
        official_sweep = sweep_generator(functools.partial(official_forward, official), size, device,
                                         batches=small, flops_per_face=flops, peak=peak32, repeats=repeat)
    mask = official_mask(size)
    load_start = load_average()
    reports: list[SetReport] = []
    with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="bench-io") as pool:
        for name, inputs in sets.items():
            sizes = [_size_of(data, options) for data in inputs]
            more = " ..." if len(sizes) > 3 else ""
            log(f"set {name}: {len(inputs)} image(s) {', '.join(sizes[:3])}{more}")
            runs: dict[str, Callable[[], _Pass]] = {
                "engine": lambda inputs=inputs: engine_pass(  # type: ignore[misc]
                    models.restore, inputs, options, pool, images_per_call=images_per_call, device=device),
            }
            if baseline:
                runs["baseline"] = lambda inputs=inputs: baseline_pass(  # type: ignore[misc]
                    inputs, options, detector=models.detector, generator=official, device=device,
                    size=size, template=models.template, mask=mask)
            others: dict[str, Callable[[], float]] = {} if official is generator else {
                "engine": functools.partial(module_mb, official), "baseline": functools.partial(module_mb, generator)}
            passes = _interleaved(runs, repeat, device, others)
            stats = {
                name: _stats(name, b.best, len(inputs), flops, peak if name == "engine" else peak32,  # type: ignore[arg-type]
                             b.rss, b.device_mb)
                for name, b in passes.items()
            }
            report = SetReport(name, sizes, stats["engine"], stats.get("baseline"))
            if report.baseline is not None:
                report.speedup = report.baseline.seconds / report.engine.seconds
            reports.append(report)
    engine_passes, official_passes = [r.engine for r in reports], [r.baseline for r in reports]
    if peak32 is peak:
        peak = peak32 = _remeasured(peak, device, dtype, (sweep, official_sweep), engine_passes + official_passes)
    else:
        peak = _remeasured(peak, device, dtype, (sweep,), engine_passes)
        peak32 = _remeasured(peak32, device, torch.float32, (official_sweep,), official_passes)
    best = max(sweep, key=lambda p: p.fraction)
    return BenchReport(
        load_average=(load_start, load_average()),
        device=str(device), precision=models.precision, model=model_name, random_weights=random_weights,
        batch_size=options.preset.batch_size, matmul=peak, gflops_per_face=flops / 1e9, sweep=sweep,
        best_batch=best.batch, best_fraction=best.fraction, sets=reports, repeat=repeat,
        torch_threads=torch.get_num_threads(), mask=models.mask, official_sweep=official_sweep,
        official_matmul=None if peak32 is peak else peak32,
    )


def _size_of(data: bytes, options: EngineOptions) -> str:
    try:
        w, h = imageio.check_complete(data, max_pixels=options.decode.max_pixels)
        return f"{w}x{h}"
    except EngineError:
        return "unreadable"


def format_report(report: BenchReport) -> str:
    """The report as the lines a person reads."""
    lines = []
    if report.random_weights:
        lines.append("!! RANDOM GENERATOR WEIGHTS: speed figures only, the images are not restorations !!")
    m = report.matmul
    lines.append(f"device {report.device}, {report.precision}, model {report.model}, preset batch "
                 f"{report.batch_size}, torch threads {report.torch_threads}, best of {report.repeat}, "
                 f"paste mask: {report.mask}")
    start, end = report.load_average
    if start is not None and end is not None:
        lines.append(f"load average {start:.2f} at the start, {end:.2f} at the end (other work on this machine "
                     "slows every figure)")
    tf32 = " (TF32 allowed, as for the convolutions)" if m.tf32 else ""
    lines.append(f"matmul rate {m.dtype}{tf32}: {m.flops_per_s / 1e9:.1f} GFLOP/s, the faster of torch.mm "
                 f"{m.matmul_flops_per_s / 1e9:.1f} and a 1x1 convolution {m.conv_flops_per_s / 1e9:.1f} "
                 f"(size {m.n}); generator {report.gflops_per_face:.2f} GFLOP per face")
    if (m32 := report.official_matmul) is not None:
        lines.append(f"the official way runs in fp32, its fractions of the fp32 rate{' (TF32 allowed)' * m32.tf32}: "
                     f"{m32.flops_per_s / 1e9:.1f} GFLOP/s")
    official = {p.batch: p for p in report.official_sweep}
    header = "generator alone:  batch  faces/s  GFLOP/s  of matmul"
    lines.append(header + ("  | official formulation (fp32): faces/s  of matmul" if official else ""))
    for p in report.sweep:
        row = f"                  {p.batch:5d}  {p.faces_per_s:7.2f}  {p.flops_per_s / 1e9:7.1f}  {p.fraction:8.1%}"
        if (o := official.get(p.batch)) is not None:
            row += f"  |                              {o.faces_per_s:7.2f}  {o.fraction:8.1%}"
        lines.append(row)
    lines.append(f"best batch size {report.best_batch}: {report.best_fraction:.1%} of the matmul rate")
    fractions = [p.fraction for p in (*report.sweep, *report.official_sweep)]
    fractions += [st.generator_fraction or 0.0 for r in report.sets for st in (r.engine, r.baseline) if st]
    if max(fractions, default=0.0) > 1.0:
        lines.append("!! a fraction above 100 %: the measured matmul rate is below this device's real peak; "
                     "compare fractions within this run only !!")
    for s in report.sets:
        lines.append(f"set {s.name} ({len(s.sizes)} image(s): {', '.join(s.sizes[:3])})")
        for stats in (s.engine, s.baseline):
            if stats is None:
                continue
            stage = " ".join(f"{k} {v:.0f}" for k, v in stats.ms_per_image.items())
            # The engine's generate stage also holds the face parser and the knobs; the baseline's, only the
            # generator and the conversion back to bytes.
            frac = (f", generate stage at {stats.generator_fraction:.1%} of matmul"
                    if stats.generator_fraction else "")
            dev = f", peak device {stats.peak_device_mb:.0f} MB" if stats.peak_device_mb is not None else ""
            rss = f", peak RSS {stats.peak_rss_mb:.0f} MB" if stats.peak_rss_mb is not None else ""
            lines.append(f"  {stats.method:8s} {stats.seconds:7.2f} s  {stats.images_per_s:6.2f} images/s  "
                         f"{stats.faces_per_s:7.2f} faces/s  ({stats.faces} faces, {stats.failed} failed)"
                         f"{frac}{rss}{dev}")
            lines.append(f"           ms per image: {stage}")
            if stats.restore_busy is not None and stats.decode_wait is not None:
                lines.append(f"           the restoring thread: {stats.restore_busy:.0%} of the time in restore calls, "
                             f"{stats.decode_wait:.0%} waiting for decoded images")
        if s.speedup is not None and s.baseline is not None:
            lines.append(f"  speed-up vs the official GPEN way (one face at a time, fp32, full-frame paste): "
                         f"{s.speedup:.2f}x")
            if (s.baseline.faces, s.baseline.failed) != (s.engine.faces, s.engine.failed):
                lines.append(f"  !! not the same work: the engine restored {s.engine.faces} faces "
                             f"({s.engine.failed} failed), the baseline {s.baseline.faces} ({s.baseline.failed}) !!")
    if report.sets and any(s.baseline for s in report.sets) and report.device.startswith("cuda"):
        lines.append("note: the baseline runs the official code's pure-PyTorch path; on CUDA the official code "
                     "compiles its own upfirdn2d and fused_act kernels, which this run does not have")
    return "\n".join(lines)


__all__ = [
    "BenchModels",
    "BenchReport",
    "MatmulRate",
    "PassStats",
    "SetReport",
    "SweepPoint",
    "baseline_restore",
    "format_report",
    "generator_flops",
    "measure_matmul",
    "official_forward",
    "portrait",
    "run_benchmark",
    "sweep_generator",
    "synthetic_sets",
]
