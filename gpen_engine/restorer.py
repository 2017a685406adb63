"""The restorer: decoded images in, restored images out, faces batched across images.

Per call: cap the long side -> detect faces in all images (batched by bucket shape) -> for each
generator batch (up to ``preset.batch_size`` faces, drawn from any image): align the crops on
the device, denoise, run GPEN, build paste masks (parsing model or GPEN's rectangle), soften
small faces, restore detail, sharpen, protect skin (the order ``adjust`` documents) -> as soon
as all faces of an image are done, paste them back into that image.

Out-of-memory on the generator splits the batch in halves and retries, lowers the batch cap to
the half that was tried, and grows the cap back by one face after ``grow_after`` clean batches
(the cap lives on the Restorer, so it is remembered across calls). A single face that does not
fit fails its own image only.

``strength`` is applied at paste time, in image space (``original + s * mask * (restored -
original)``), rather than by blending crops: a crop-space blend would mix in the original face
after a forward and an inverse resampling, softening it, and strength 0 would not return the
input bytes. Strength 0 skips the generator altogether.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from . import adjust
from .align import face_matrices, footprint, image_window, warp_crops
from .checkpoint import load_generator
from .detect import detect_faces, load_detector, search_copy
from .gpen import VARIANTS, GpenArch, create_generator
from .imageio import resize_long_side
from .masks import load_parser, parse_masks, rectangle_mask
from .options import DetectorName, Precision, Preset
from .paste import clusters, composite
from .precision import prepare_generator, resolve_precision
from .types import DeviceOutOfMemory, EngineError, Face, InputError, NoFaceFound, RestoredImage, StageTimes


@dataclass
class EngineModels:
    """Loaded networks and where they run."""

    generator: nn.Module
    face_size: int
    detector: nn.Module
    parser: nn.Module | None
    device: torch.device
    precision: str


def load_engine_models(
    *,
    generator_path: str | Path | None,
    arch: GpenArch | str,
    detector_path: str | Path,
    detector_name: DetectorName,
    parser_path: str | Path | None = None,
    device: torch.device | str,
    precision: Precision,
    random_generator: bool = False,
    random_parser: bool = False,
) -> EngineModels:
    """Load the generator (``arch``: a ``GpenArch`` or a variant name), detector and optional parser.

    ``random_generator`` builds the architecture with random weights (tests and benchmarks only);
    ``random_parser`` does the same for the parsing model when no ``parser_path`` is given (benchmarks
    only: its masks are meaningless, its cost is the real one).
    """
    device = torch.device(device)
    if isinstance(arch, str):
        if arch not in VARIANTS:
            raise EngineError(f"unknown GPEN model {arch!r}; known: {', '.join(VARIANTS)}")
        arch = VARIANTS[arch]
    if not isinstance(arch, GpenArch):
        raise TypeError(f"arch must be a GpenArch or a variant name, not {type(arch).__name__}")
    if random_generator:
        module = create_generator(arch)
    else:
        if generator_path is None:
            raise EngineError("no generator weight file given")
        module = load_generator(generator_path, arch)
    generator = prepare_generator(module, device, precision)
    detector = load_detector(detector_path, detector_name, device)
    parser = load_parser(parser_path, device) if parser_path is not None or random_parser else None
    # Record what actually runs (fp16 asked for on a CPU runs as fp32).
    return EngineModels(generator, arch.size, detector, parser, device, resolve_precision(device, precision))


# What a RuntimeError says when memory ran out outside torch's caching allocator: the CUDA runtime ("CUDA error:
# out of memory"), the CPU allocator, and the CUDA libraries' own allocations, e.g. cuBLAS creating a handle on a
# full device ("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), or cuDNN, cuFFT, cuSOLVER.
_OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory", "ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device (or host) running out of memory."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OUT_OF_MEMORY_TEXTS)


_T = TypeVar("_T")


def _unless_out_of_memory(run: Callable[[], _T]) -> _T | None:
    """``run()``, or None where it runs out of memory. The error is dropped at once: its traceback holds the
    failed call's tensors, which the smaller retry needs the memory of."""
    try:
        return run()
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    return None


@dataclass
class BatchCap:
    """Faces per generator call: halves on out-of-memory, grows back by one after clean batches."""

    limit: int
    grow_after: int = 8
    current: int = 0
    clean: int = 0

    def __post_init__(self) -> None:
        self.limit = max(1, self.limit)
        self.current = self.current or self.limit

    def failed(self, tried: int) -> None:
        self.current = max(1, min(self.current, tried // 2))
        self.clean = 0

    def succeeded(self) -> None:
        self.clean += 1
        if self.clean >= self.grow_after and self.current < self.limit:
            self.current += 1
            self.clean = 0


@dataclass(frozen=True)
class WorkingImage:
    """An image made ready for the device by ``prepare_image``."""

    rgb: np.ndarray  # the working image: the input capped at the preset's long side
    search: np.ndarray  # the smaller copy the face detector searches
    prepare_ms: float
    sides: tuple[int | None, int]  # the preset's (max_long_side, detect_long_side) it was made for


def prepare_image(image: np.ndarray, preset: Preset) -> WorkingImage:
    """The CPU part of restoring ``image`` (HxWx3 uint8 RGB): cap its size, make the detector's copy.

    Thread-safe and free of device work, so callers run it in their decode pool; the device's
    thread then starts at detection. ``Restorer.restore`` does it itself for plain arrays.
    Raises ``InputError`` for an array that is not an HxWx3 uint8 image.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 \
            or 0 in image.shape:
        raise InputError(f"expected an HxWx3 uint8 RGB image, got {getattr(image, 'shape', None)}")
    t0 = time.perf_counter()
    rgb = resize_long_side(image, preset.max_long_side)
    search = search_copy(rgb, preset.detect_long_side)
    sides = (preset.max_long_side, preset.detect_long_side)
    return WorkingImage(rgb, search, (time.perf_counter() - t0) * 1000.0, sides)


@dataclass
class _Work:
    """One image on its way through the pipeline."""

    rgb: np.ndarray
    search: np.ndarray
    faces: list[Face]
    times: StageTimes
    matrices: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 3)))
    windows: list[tuple[int, int, int, int]] = field(default_factory=list)  # per face
    groups: list[tuple[tuple[int, int, int, int], list[int]]] = field(default_factory=list)  # disjoint
    group_of: list[int] = field(default_factory=list)  # face index -> group index (-1: off the image)
    pixels: dict[int, Tensor] = field(default_factory=dict)  # group -> its window on the device
    crops: dict[int, Tensor] = field(default_factory=dict)  # face index -> restored (3, S, S)
    masks: dict[int, Tensor] = field(default_factory=dict)  # face index -> paste mask (1, S, S)
    error: EngineError | None = None


class _Clock:
    """Wall time per stage; waits for the device at each reading so GPU work lands in its stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self) -> float:
        """Milliseconds since the previous lap."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # not the thread's current device (cuda:0)
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1000.0, now
        return ms


class Restorer:
    """Restores faces in batches of images with one set of models and one preset."""

    def __init__(self, models: EngineModels, preset: Preset, *, grow_after: int = 8) -> None:
        self.models = models
        self.preset = preset
        self.cap = BatchCap(preset.batch_size, grow_after=grow_after)
        self._rect = rectangle_mask(models.face_size, models.device)[0]
        self._use_parser = preset.use_parsing and models.parser is not None

    def warm_up(self) -> None:
        """Run detection, the generator and the parsing model once on blank input: first-use costs and failures
        come now, and a device that no longer computes raises here (the daemon's test after a failed batch)."""
        size = self.models.face_size
        self.restore([np.full((256, 256, 3), 127, np.uint8)])  # detection only: a blank image has no face
        with torch.inference_mode():
            out = self._run_generator(torch.zeros((1, 3, size, size), device=self.models.device))
            if self.models.parser is not None and self._use_parser:
                with self._parser_autocast():
                    parse_masks(self.models.parser, out)

    def prepare(self, image: np.ndarray) -> WorkingImage:
        """``prepare_image`` with this restorer's preset (thread-safe)."""
        return prepare_image(image, self.preset)

    def restore(self, images: Sequence[np.ndarray | WorkingImage]) -> list[RestoredImage | EngineError]:
        """Restore every HxWx3 uint8 RGB image; a failed image's slot holds its error.

        An image may come as a ``WorkingImage`` from ``prepare`` (made with this preset), which
        saves the device's thread the resizing. Results are the size of the working image (the
        input capped at ``preset.max_long_side``). An image without faces comes back as the
        working image itself (not a copy), or as ``NoFaceFound`` when the preset requires faces.
        """
        with torch.inference_mode():
            return self._restore(images)

    # ---------------------------------------------------------------- stages

    def _restore(self, images: Sequence[np.ndarray | WorkingImage]) -> list[RestoredImage | EngineError]:
        clock = _Clock(self.models.device)
        works: list[_Work | EngineError] = []
        for image in images:
            try:
                ready = image if isinstance(image, WorkingImage) else prepare_image(image, self.preset)
                if ready.sides != (self.preset.max_long_side, self.preset.detect_long_side):
                    ready = prepare_image(ready.rgb, self.preset)  # made for an earlier version of the preset
            except InputError as exc:
                works.append(exc)
                continue
            # Resizing is part of detection's cost, wherever it ran.
            works.append(_Work(ready.rgb, ready.search, [], StageTimes(detect=ready.prepare_ms)))
        live = [w for w in works if isinstance(w, _Work)]
        clock.lap()
        self._detect(live)
        detect_ms = clock.lap() / max(1, len(live))
        for w in live:
            w.times.detect += detect_ms
            if w.error is None and not w.faces and self.preset.faces_required:
                w.error = NoFaceFound("no face found in the image")
        if self.preset.strength > 0:
            self._generate_and_paste([w for w in live if w.error is None and w.faces], clock)
        return [w if isinstance(w, EngineError) else self._result(w) for w in works]

    @staticmethod
    def _result(w: _Work) -> RestoredImage | EngineError:
        if w.error is not None:
            return w.error
        return RestoredImage(rgb=w.rgb, faces=w.faces, times=w.times)

    def _detect(self, works: list[_Work]) -> None:
        p = self.preset
        found = _unless_out_of_memory(lambda: detect_faces(
            self.models.detector, [w.rgb for w in works], long_side=p.detect_long_side,
            confidence=p.det_confidence, min_face_size=p.min_face_size, max_faces=p.max_faces,
            search=[w.search for w in works]))
        if found is None:
            if len(works) == 1:
                works[0].error = DeviceOutOfMemory("face detection does not fit in device memory")
                return
            for w in works:  # too many images at once: one at a time
                self._detect([w])
            return
        for w, faces in zip(works, found, strict=True):
            w.faces = faces

    def _generate_and_paste(self, works: list[_Work], clock: _Clock) -> None:
        size = self.models.face_size
        for w in works:
            w.matrices = face_matrices(np.stack([f.landmarks for f in w.faces]), size)
            w.windows = [footprint(m, size, w.rgb.shape[:2]) for m in w.matrices]
            w.groups = clusters(w.windows)
            w.group_of = [-1] * len(w.faces)
            for g, (_, members) in enumerate(w.groups):
                for k in members:
                    w.group_of[k] = g
        queue = deque((i, k) for i, w in enumerate(works) for k in range(len(w.faces)))
        clock.lap()
        while queue:
            chunk: list[tuple[int, int]] = []
            while queue and len(chunk) < self.cap.current:
                i, k = queue.popleft()
                if works[i].error is None:
                    chunk.append((i, k))
            if not chunk:
                break
            crops = _unless_out_of_memory(functools.partial(self._align, works, chunk))
            if crops is None:
                if len(chunk) == 1:
                    i, k = chunk[0]
                    works[i].error = DeviceOutOfMemory(f"face {k}'s part of the image does not fit in device memory")
                    self._release(works[i])
                else:  # fewer faces at a time: fewer image windows on the device at once
                    self.cap.failed(len(chunk))
                    queue.extendleft(reversed(chunk))
                continue
            self._share(works, chunk, "align", clock.lap())
            pending: deque[tuple[list[tuple[int, int]], Tensor]] = deque([(chunk, crops)])
            while pending:
                part, x = pending.popleft()
                part_ok = [j for j, (i, _) in enumerate(part) if works[i].error is None]
                if len(part_ok) < len(part):
                    part = [part[j] for j in part_ok]
                    x = x[part_ok]
                if not part:
                    continue
                try:  # the parsing model and the knobs run at the generator's batch size: split them alike
                    out, masks = self._finish(works, part, x, self._run_generator(x))
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    del exc
                    if len(part) == 1:
                        i, k = part[0]
                        works[i].error = DeviceOutOfMemory(
                            f"face {k} does not fit in device memory even alone ({size} px model)")
                        self._release(works[i])
                    else:
                        self.cap.failed(len(part))
                        half = len(part) // 2
                        pending.appendleft((part[half:], x[half:]))
                        pending.appendleft((part[:half], x[:half]))
                    continue
                self.cap.succeeded()
                for j, (i, k) in enumerate(part):
                    works[i].crops[k] = out[j]
                    works[i].masks[k] = masks[j]
                self._share(works, part, "generate", clock.lap())
                for i in dict.fromkeys(i for i, _ in part):
                    w = works[i]
                    if w.error is None and len(w.crops) == len(w.faces):
                        try:
                            self._paste(w)
                        except Exception as exc:
                            if not is_out_of_memory(exc):
                                raise
                            # This image alone: the others' faces are restored and paste on.
                            w.error = DeviceOutOfMemory("pasting the faces back does not fit in device memory")
                            self._release(w)
                        w.times.paste += clock.lap()

    @staticmethod
    def _share(works: list[_Work], part: list[tuple[int, int]], stage: str, ms: float) -> None:
        for i, _ in part:
            t = works[i].times
            setattr(t, stage, getattr(t, stage) + ms / len(part))

    def _align(self, works: list[_Work], chunk: list[tuple[int, int]]) -> Tensor:
        """Crops (n, 3, S, S) in [0, 1] for the chunk's faces, one warp call per group of faces."""
        size, device = self.models.face_size, self.models.device
        by_group: dict[tuple[int, int], list[int]] = {}
        for i, k in chunk:
            by_group.setdefault((i, works[i].group_of[k]), []).append(k)
        parts: dict[tuple[int, int], Tensor] = {}
        for (i, g), ks in by_group.items():
            w = works[i]
            if g < 0:  # the crop lies wholly off the image: it reads as black, and pastes nowhere
                crops = torch.zeros((len(ks), 3, size, size), device=device)
            else:
                window = w.groups[g][0]
                if g not in w.pixels:
                    w.pixels[g] = image_window(w.rgb, window, device)
                crops = warp_crops(w.pixels[g], w.matrices[ks], size, origin=window[:2]).to(device)
            for k, crop in zip(ks, crops, strict=True):
                parts[(i, k)] = crop
        x = torch.stack([parts[ik] for ik in chunk]).div_(255.0)
        if self.preset.denoise > 0:
            x = adjust.denoise(x, self.preset.denoise)
        return x

    def _run_generator(self, x: Tensor) -> Tensor:
        out = self.models.generator(x * 2.0 - 1.0)
        return ((out.float() + 1.0) / 2.0).clamp_(0.0, 1.0)

    def _finish(self, works: list[_Work], part: list[tuple[int, int]], x: Tensor, out: Tensor
                ) -> tuple[Tensor, Tensor]:
        """Post-generator adjustments and paste masks for one batch, in crop space."""
        p = self.preset
        # The parsing model reads the raw restored face, as in GPEN.
        skin: Tensor | None = None
        if self._use_parser:
            assert self.models.parser is not None
            with self._parser_autocast():
                masks, skin = parse_masks(self.models.parser, out)
            masks, skin = masks.float(), skin.float()
        else:
            masks = self._rect.expand(len(part), -1, -1, -1)
        out = adjust.soften_small(out, [works[i].faces[k].min_side for i, k in part])
        # ``x`` (the generator's input, after denoise) is the "original" the knobs compare with.
        if p.detail > 0:
            out = adjust.restore_detail(out, x, p.detail)
        if p.sharpen > 0:
            out = adjust.sharpen(out, p.sharpen)
        if p.skin_protection:
            out = adjust.protect_skin(out, x, skin if skin is not None else adjust.default_skin_mask(x))
        return out.clamp(0.0, 1.0), masks

    def _parser_autocast(self) -> torch.autocast:
        device = self.models.device
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.models.precision)
        enabled = device.type == "cuda" and dtype is not None
        return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=enabled)

    def _paste(self, w: _Work) -> None:
        # Read after the paste's own wait for the device, so the check costs no extra synchronisation.
        finite = torch.stack([torch.isfinite(crop).all() for crop in w.crops.values()])
        rgb = w.rgb.copy()
        for g, (window, members) in enumerate(w.groups):
            x0, y0, x1, y1 = window
            blended = composite(
                w.pixels[g], torch.stack([w.crops[k] for k in members]), torch.stack([w.masks[k] for k in members]),
                w.matrices[members], [w.windows[k] for k in members], (x0, y0),
                strength=self.preset.strength / 100.0)
            rgb[y0:y1, x0:x1] = blended.cpu().numpy()
        if not bool(finite.all()):  # NaN pastes as black: a restored photo with a black face, said to be fine
            w.error = EngineError(
                f"the generator's output for {int((~finite).sum())} of {len(finite)} faces is not a number "
                f"(NaN or infinity) at precision {self.models.precision}; precision = \"fp32\" avoids it")
        else:
            w.rgb = rgb
        self._release(w)

    @staticmethod
    def _release(w: _Work) -> None:
        w.pixels.clear()
        w.crops.clear()
        w.masks.clear()


__all__ = ["BatchCap", "DeviceOutOfMemory", "EngineModels", "Restorer", "WorkingImage", "is_out_of_memory",
           "load_engine_models", "prepare_image"]
