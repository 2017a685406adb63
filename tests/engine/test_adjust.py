"""Tests for gpen_engine.adjust: each knob does what its docstring promises."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from gpen_engine.adjust import (
    blend,
    default_skin_mask,
    denoise,
    detail_band,
    gaussian_blur,
    protect_skin,
    restore_detail,
    sharpen,
    soften_small,
)

SIZE = 256  # the smallest model's crop: the knobs' spatial constants are defined at model sizes
SKIN = (0.80, 0.58, 0.47)


def _faces(n: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Face-like crops: a skin-coloured ellipse with fine texture on a bluish background."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    inside = (((xs - 0.5) / 0.3) ** 2 + ((ys - 0.58) / 0.36) ** 2 <= 1).float()
    skin = torch.tensor(SKIN).view(3, 1, 1)
    background = torch.tensor([0.2, 0.3, 0.6]).view(3, 1, 1)
    base = inside * skin + (1 - inside) * background
    texture = gaussian_blur(torch.randn(n, 1, size, size, generator=gen), 0.7) * 0.12
    return (base.unsqueeze(0) + texture).clamp(0, 1)


def _high_frequency_energy(x: torch.Tensor) -> float:
    return float(((x - gaussian_blur(x, 1.0)) ** 2).mean())


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


class TestBlend:
    def test_strength_0_is_the_original_and_100_the_restored_face(self) -> None:
        """Strength 0 leaves the face unchanged; strength 100 gives exactly the restored face."""
        original, restored = _faces(seed=1), _faces(seed=2)
        assert torch.equal(blend(restored, original, 0), original)
        assert torch.equal(blend(restored, original, 100), restored)

    def test_strength_is_a_linear_mix(self) -> None:
        """Strength 30 is 30% restored, 70% original."""
        original, restored = _faces(seed=1), _faces(seed=2)
        torch.testing.assert_close(blend(restored, original, 30), 0.3 * restored + 0.7 * original)

    def test_per_face_strengths(self) -> None:
        """A (N,) tensor gives each face its own strength, with the exact ends kept."""
        original, restored = _faces(3, seed=1), _faces(3, seed=2)
        out = blend(restored, original, torch.tensor([0.0, 50.0, 100.0]))
        assert torch.equal(out[0], original[0]) and torch.equal(out[2], restored[2])
        torch.testing.assert_close(out[1], (restored[1] + original[1]) / 2)

    def test_out_of_range_strength_is_refused(self) -> None:
        """Percentages outside 0..100 are a configuration error, not silently clamped."""
        with pytest.raises(ValueError, match="0..100"):
            blend(_faces(), _faces(), 150)


class TestSharpen:
    def test_amount_0_is_identity(self) -> None:
        """Sharpen 0 returns the face unchanged."""
        faces = _faces()
        assert torch.equal(sharpen(faces, 0), faces)

    def test_high_frequency_energy_rises_monotonically_with_amount(self) -> None:
        """More sharpening, more high-frequency energy."""
        faces = _faces()
        energies = [_high_frequency_energy(sharpen(faces, amount)) for amount in (0, 25, 50, 75, 100)]
        assert all(a < b for a, b in zip(energies, energies[1:], strict=False)), energies
        assert energies[-1] > 1.5 * energies[0]

    def test_low_frequencies_are_kept(self) -> None:
        """Unsharp masking leaves the average colour of the face alone."""
        faces = _faces()
        means = sharpen(faces, 100).mean(dim=(2, 3))
        torch.testing.assert_close(means, faces.mean(dim=(2, 3)), atol=0.01, rtol=0)


class TestDenoise:
    @staticmethod
    def _noisy_edge() -> tuple[torch.Tensor, torch.Tensor]:
        clean = torch.full((1, 3, SIZE, SIZE), 0.3)
        clean[..., SIZE // 2 :] = 0.9  # a strong vertical edge in the middle
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3)) * 0.04
        return clean, (clean + noise).clamp(0, 1)

    def test_amount_0_is_identity(self) -> None:
        """Denoise 0 returns the crop unchanged."""
        faces = _faces()
        assert torch.equal(denoise(faces, 0), faces)

    def test_noise_variance_drops_on_a_flat_patch(self) -> None:
        """On a noisy flat area the noise variance falls, and falls further with a higher amount."""
        _, noisy = self._noisy_edge()
        flat = (slice(None), slice(None), slice(8, -8), slice(8, SIZE // 2 - 8))
        variances = [float(denoise(noisy, amount)[flat].var()) for amount in (0, 50, 100)]
        assert variances[0] > variances[1] > variances[2]
        assert variances[2] < 0.3 * variances[0]

    def test_matches_the_documented_guided_filter(self) -> None:
        """Denoise is the self-guided filter of its docstring: box radius S/256, eps = (0.08 * amount/100)^2."""
        _, noisy = self._noisy_edge()
        radius, eps = 1, (0.08 * 0.6) ** 2

        def box(v: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(F.pad(v, (radius,) * 4, mode="replicate"), 2 * radius + 1, stride=1)

        mean = box(noisy)
        gain = (box(noisy * noisy) - mean * mean).clamp_min(0) / ((box(noisy * noisy) - mean * mean).clamp_min(0) + eps)
        expected = (box(gain) * noisy + box(mean - gain * mean)).clamp(0, 1)
        torch.testing.assert_close(denoise(noisy, 60), expected, atol=1e-5, rtol=0)

    def test_strong_edges_survive(self) -> None:
        """The step between the two sides of a strong edge stays sharp (edge-preserving, not a blur)."""
        clean, noisy = self._noisy_edge()
        out = denoise(noisy, 100)
        step = out[..., SIZE // 2].mean() - out[..., SIZE // 2 - 1].mean()
        assert float(step) > 0.9 * 0.6
        blurred_step = gaussian_blur(noisy, 2.0)
        gaussian_step = blurred_step[..., SIZE // 2].mean() - blurred_step[..., SIZE // 2 - 1].mean()
        assert float(step) > float(gaussian_step)


class TestSkinProtection:
    def test_default_mask_covers_the_face_centre_but_not_the_corners(self) -> None:
        """The fallback skin mask is on in the middle of a skin-coloured face, off on background."""
        mask = default_skin_mask(_faces())
        assert float(mask[:, 0, SIZE // 2 + 4, SIZE // 2].min()) > 0.9
        assert float(mask[:, 0, :16, :16].max()) == 0.0

    def test_default_mask_is_empty_for_gray_faces(self) -> None:
        """Without skin chroma (a gray photo) nothing is treated as skin."""
        gray = _faces().mean(dim=1, keepdim=True).repeat(1, 3, 1, 1)
        assert float(default_skin_mask(gray).max()) == 0.0

    def test_mean_skin_colour_moves_back_towards_the_original(self) -> None:
        """A waxy, discoloured restoration gets the original's mean skin colour back."""
        original = _faces()
        waxy = gaussian_blur(original, 1.5) * 0.7 + torch.tensor([0.3, 0.28, 0.3]).view(1, 3, 1, 1)
        mask = default_skin_mask(original)

        def mean_skin(x: torch.Tensor) -> torch.Tensor:
            return (x * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3))

        before = (mean_skin(waxy) - mean_skin(original)).norm(dim=1)
        after = (mean_skin(protect_skin(waxy, original, mask)) - mean_skin(original)).norm(dim=1)
        assert bool((after < 0.25 * before).all()), (before, after)

    def test_pixels_outside_the_mask_are_untouched(self) -> None:
        """Skin protection only changes the skin region."""
        original, restored = _faces(seed=1), _faces(seed=2) * 0.9
        mask = torch.zeros(2, 1, SIZE, SIZE)
        mask[..., 80:160, 80:160] = 1.0
        out = protect_skin(restored, original, mask)
        assert torch.equal(out[..., :80, :], restored[..., :80, :])
        assert not torch.allclose(out[..., 80:160, 80:160], restored[..., 80:160, 80:160])

    def test_matches_the_documented_ycbcr_statistics_transfer(self) -> None:
        """The output is the docstring's formula: weighted YCbCr mean/std moved to the original's, mixed by mask."""
        original, restored = _faces(seed=1), gaussian_blur(_faces(seed=2), 1.5) * 0.8 + 0.1
        mask = default_skin_mask(original) * 0.7  # a soft mask: the mix must follow it per pixel
        to_ycc = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
        offset = torch.tensor([0.0, 0.5, 0.5]).view(1, 3, 1, 1)
        ycc_r = torch.einsum("kc,nchw->nkhw", to_ycc, restored) + offset
        ycc_o = torch.einsum("kc,nchw->nkhw", to_ycc, original) + offset
        total = mask.sum(dim=(2, 3), keepdim=True)

        def stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mean = (v * mask).sum(dim=(2, 3), keepdim=True) / total
            return mean, (((v - mean) ** 2 * mask).sum(dim=(2, 3), keepdim=True) / total).sqrt()

        (mean_r, std_r), (mean_o, std_o) = stats(ycc_r), stats(ycc_o)
        moved = (ycc_r - mean_r) * (std_o / std_r).clamp(0.5, 2.0) + mean_o
        mixed = ycc_r + mask * (moved - ycc_r) - offset
        expected = torch.einsum("ck,nkhw->nchw", torch.linalg.inv(to_ycc), mixed).clamp(0, 1)
        torch.testing.assert_close(protect_skin(restored, original, mask), expected, atol=1e-5, rtol=0)

    def test_a_face_with_too_little_skin_is_returned_unchanged(self) -> None:
        """Below 16 px of skin the statistics mean nothing: that face is untouched, the others are not."""
        original, restored = _faces(seed=1), _faces(seed=2) * 0.9
        mask = torch.zeros(2, 1, SIZE, SIZE)
        mask[0, :, 100:103, 100:105] = 1.0  # 15 px
        mask[1, :, 100:110, 100:110] = 1.0
        out = protect_skin(restored, original, mask)
        assert torch.equal(out[0], restored[0])
        assert not torch.equal(out[1], restored[1])


class TestDetail:
    def test_amount_0_is_identity(self) -> None:
        """Detail 0 returns the restored face unchanged."""
        original, restored = _faces(seed=1), _faces(seed=2)
        assert torch.equal(restore_detail(restored, original, 0), restored)

    def test_correlation_with_the_original_detail_band_rises_with_amount(self) -> None:
        """Where the generator smoothed texture away, detail brings back the original's detail band."""
        original = _faces(seed=4)
        smoothed = gaussian_blur(original, 1.5)
        band = detail_band(original)
        correlations = [_correlation(detail_band(restore_detail(smoothed, original, a)), band)
                        for a in (0, 25, 50, 75, 100)]
        assert all(a < b for a, b in zip(correlations, correlations[1:], strict=False)), correlations
        assert correlations[-1] > 0.99

    def test_a_blurry_original_does_not_erase_restored_detail(self) -> None:
        """When the original has less detail than the restoration (a small, soft face), nothing changes."""
        sharp = _faces(seed=5)
        blurry_original = gaussian_blur(sharp, 3.0)
        out = restore_detail(sharp, blurry_original, 100)
        assert float((out - sharp).abs().mean()) < 0.1 * float((blurry_original - sharp).abs().mean())

    def test_only_luma_changes(self) -> None:
        """Detail adds the same offset to R, G and B, so colour differences are kept."""
        original = _faces(seed=4)
        smoothed = gaussian_blur(original, 1.5)
        delta = restore_detail(smoothed, original, 100) - smoothed
        inner = (slice(None), slice(None), slice(64, 192), slice(64, 192))  # away from clamping
        torch.testing.assert_close(delta[inner][:, 0], delta[inner][:, 1], atol=1e-5, rtol=0)


class TestSoftenSmall:
    def test_only_faces_smaller_than_100_px_are_blurred(self) -> None:
        """A 60 px face is blurred 3x3; a 150 px face is left as restored."""
        faces = _faces()
        out = soften_small(faces, [60.0, 150.0])
        assert torch.equal(out[1], faces[1])
        assert _high_frequency_energy(out[:1]) < _high_frequency_energy(faces[:1])

    def test_a_small_face_is_blurred_the_same_in_any_batch(self) -> None:
        """Which other faces share the batch does not change how a small face is blurred."""
        faces = _faces(5)
        mixed = soften_small(faces, [60.0, 150.0, 40.0, 30.0, 200.0])
        for i in (0, 2, 3):
            assert torch.equal(mixed[i], soften_small(faces[i : i + 1], [50.0])[0])
        assert torch.equal(mixed[1], faces[1]) and torch.equal(mixed[4], faces[4])

    def test_no_small_face_is_identity(self) -> None:
        """With only large faces the batch is returned as is."""
        faces = _faces()
        assert soften_small(faces, torch.tensor([120.0, 300.0])) is faces


class TestGaussianBlur:
    @pytest.mark.parametrize("sigma", [0.5, 1.0, 2.7, 6.0])
    def test_is_a_normalised_gaussian_of_radius_3_sigma_with_replicated_edges(self, sigma: float) -> None:
        """The blur equals a 2-D convolution with the truncated, normalised Gaussian on edge-replicated input."""
        x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(7))
        radius = max(1, int(torch.tensor(3.0 * sigma).ceil()))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        kernel = torch.outer(taps, taps) / taps.sum() ** 2
        padded = F.pad(x, (radius,) * 4, mode="replicate")
        expected = F.conv2d(padded, kernel.expand(3, 1, -1, -1).contiguous(), groups=3)
        torch.testing.assert_close(gaussian_blur(x, sigma), expected, atol=1e-5, rtol=0)

    def test_does_not_modify_its_input(self) -> None:
        """Blurring returns a new tensor and leaves the caller's one as it was."""
        x = _faces()
        before = x.clone()
        gaussian_blur(x, 2.0)
        assert torch.equal(x, before)


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_KNOBS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "denoise": lambda r, o: denoise(r, 40),
    "sharpen": lambda r, o: sharpen(r, 40),
    "blend": lambda r, o: blend(r, o, 40),
    "protect_skin": lambda r, o: protect_skin(r, o, default_skin_mask(o)),
    "default_skin_mask": lambda r, o: default_skin_mask(r),
    "restore_detail": lambda r, o: restore_detail(r, o, 40),
    "soften_small": lambda r, o: soften_small(r, [50.0] * r.shape[0]),
}


class TestContract:
    @pytest.mark.parametrize("device", _DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("n", [1, 5])
    @pytest.mark.parametrize("name", sorted(_KNOBS))
    def test_shape_dtype_and_device_are_kept(
        self, name: str, n: int, dtype: torch.dtype, device: str
    ) -> None:
        """Every knob works for 1 and 5 faces and returns the input's shape, dtype and device, in range."""
        restored = _faces(n, seed=1).to(device=device, dtype=dtype)
        original = _faces(n, seed=2).to(device=device, dtype=dtype)
        out = _KNOBS[name](restored, original)
        channels = 1 if name == "default_skin_mask" else 3
        assert (out.shape, out.dtype, out.device.type) == ((n, channels, SIZE, SIZE), dtype, device)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0

    @pytest.mark.parametrize("name", sorted(_KNOBS))
    def test_channels_last_input_gives_the_same_result(self, name: str) -> None:
        """A channels-last batch (what a convolutional pipeline often hands over) gives the same output."""
        restored, original = _faces(2, seed=1), _faces(2, seed=2)
        expected = _KNOBS[name](restored, original)
        last = torch.channels_last
        out = _KNOBS[name](restored.to(memory_format=last), original.to(memory_format=last))
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)

    @pytest.mark.parametrize("name", sorted(_KNOBS))
    def test_inputs_are_not_modified(self, name: str) -> None:
        """No knob writes into the caller's tensors (the engine reuses them for later steps)."""
        restored, original = _faces(2, seed=1), _faces(2, seed=2)
        copies = restored.clone(), original.clone()
        _KNOBS[name](restored, original)
        assert torch.equal(restored, copies[0]) and torch.equal(original, copies[1])

    @pytest.mark.parametrize("size", [32, 512])
    def test_knobs_work_at_other_sizes(self, size: int) -> None:
        """The spatial constants scale with the crop size; every knob runs and stays in range."""
        restored, original = _faces(1, size, seed=1), _faces(1, size, seed=2)
        for knob in _KNOBS.values():
            out = knob(restored, original)
            assert out.shape[-2:] == (size, size) and 0.0 <= float(out.min()) <= float(out.max()) <= 1.0
