"""The GPEN generator: exactness against the official implementation, architecture, precision, speed paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpen_engine import stylegan2
from gpen_engine.gpen import DEFAULT_CHUNK_BYTES, VARIANTS, GpenArch, create_generator
from gpen_engine.precision import prepare_generator, resolve_precision
from gpen_engine.stylegan2 import Blur, ConvLayer, ModulatedConv2d, StyledConv, Upsample, fold_blur, upsample_conv

DATA = Path(__file__).resolve().parents[1] / "data"
REPO = Path(__file__).resolve().parents[2]
SMALL_GOLDEN = REPO.parent / "shared" / "reference" / "golden_small128.pt"
TOLERANCE = 1e-4


def _load_golden(path: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    golden = torch.load(path, map_location="cpu", weights_only=True)
    model = create_generator(GpenArch(**golden["ctor"]))
    model.load_state_dict(golden["state_dict"], strict=True)
    return model.eval().requires_grad_(False), golden["input"], golden["output"]


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    return _load_golden(DATA / "golden_tiny64.pt")


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class TestGoldenOutputs:
    @pytest.mark.parametrize("batch", [1, 2, 3])
    def test_tiny64_matches_official_output(self, tiny, batch: int) -> None:
        """The output equals what the official GPEN code produced, for batches of 1, 2 and 3 faces."""
        model, inputs, expected = tiny
        with torch.inference_mode():
            out = model(inputs[:batch])
        assert out.shape == expected[:batch].shape
        assert _max_error(out, expected[:batch]) < TOLERANCE

    def test_split_and_merged_batches_agree_with_official(self, tiny) -> None:
        """Faces run one by one and as one batch both give the official output: samples never mix."""
        model, inputs, expected = tiny
        with torch.inference_mode():
            merged = model(inputs)
            split = torch.cat([model(inputs[i : i + 1]) for i in range(inputs.shape[0])])
        assert _max_error(merged, expected) < TOLERANCE
        assert _max_error(split, expected) < TOLERANCE

    def test_batch_slices_at_high_resolution_agree_with_official(self, tiny) -> None:
        """Running the high-resolution levels on slices of the batch (memory bound) changes nothing."""
        model, inputs, expected = tiny
        model.max_chunk_bytes = 1  # every level is sliced, one face at a time
        try:
            with torch.inference_mode():
                out = model(inputs)
        finally:
            model.max_chunk_bytes = DEFAULT_CHUNK_BYTES
        assert _max_error(out, expected) < TOLERANCE

    def test_cuda_formulations_agree_with_official(self, tiny, monkeypatch) -> None:
        """The CUDA formulations (blur folded into the upsampling and encoder convs) agree too."""
        model, inputs, expected = tiny
        monkeypatch.setattr(stylegan2, "_gpu_formulation", lambda x: True)
        with torch.inference_mode():
            out = model(inputs)
        assert _max_error(out, expected) < TOLERANCE

    def test_works_with_autograd_recording(self, tiny) -> None:
        """The in-place fast path steps aside when autograd records: same output, gradients flow."""
        model, inputs, expected = tiny
        x = inputs[:1].clone().requires_grad_(True)
        out = model(x)
        out.sum().backward()
        assert _max_error(out.detach(), expected[:1]) < TOLERANCE
        assert x.grad is not None and torch.isfinite(x.grad).all()

    @pytest.mark.skipif(not SMALL_GOLDEN.exists(), reason=f"{SMALL_GOLDEN} not present (../shared is absent)")
    @pytest.mark.parametrize("batch", [1, 3])
    def test_small128_matches_official_output(self, batch: int) -> None:
        """A 128-px configuration with the official style width (512, 8 MLP layers) matches too."""
        model, inputs, expected = _load_golden(SMALL_GOLDEN)
        with torch.inference_mode():
            out = model(inputs[:batch])
        assert _max_error(out, expected[:batch]) < TOLERANCE


class TestOfficialArchitectures:
    @pytest.mark.parametrize("name", list(VARIANTS))
    def test_state_dict_keys_and_shapes_are_official(self, name: str) -> None:
        """Each official configuration has exactly the official keys, in order, with the official shapes."""
        official = json.loads((DATA / "official_state_dict_shapes.json").read_text())[name]
        assert GpenArch(**official["ctor"]) == VARIANTS[name]
        device = "cpu" if name == "GPEN-BFR-256" else "meta"
        with torch.device(device):
            model = create_generator(VARIANTS[name])
        state = model.state_dict()
        assert {k: list(v.shape) for k, v in state.items()} == official["keys"]
        assert list(state) == list(official["keys"])
        assert sum(v.numel() for v in state.values()) == official["params"]

    def test_forward_maps_faces_to_faces_of_the_same_size(self) -> None:
        """(N, 3, size, size) in, (N, 3, size, size) float32 contiguous out, on the 256 architecture."""
        model = create_generator(VARIANTS["GPEN-BFR-256"]).eval()
        with torch.inference_mode():
            out = model(torch.zeros(1, 3, 256, 256))
        assert out.shape == (1, 3, 256, 256)
        assert out.dtype == torch.float32 and out.is_contiguous()

    def test_invalid_size_is_rejected(self) -> None:
        """A size that is not a power of two cannot describe a GPEN network."""
        with pytest.raises(ValueError, match="power of two"):
            GpenArch(300)


def _upfirdn(x: torch.Tensor, kernel: torch.Tensor, up: int, pad: tuple[int, int]) -> torch.Tensor:
    """Textbook upfirdn2d: zero insertion, padding, true convolution with ``kernel``."""
    n, c, h, w = x.shape
    z = x.new_zeros(n, c, h * up, w * up)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, [pad[0], pad[1], pad[0], pad[1]])
    weight = torch.flip(kernel, [0, 1]).expand(c, 1, *kernel.shape)
    return F.conv2d(z, weight, groups=c)


class TestFastFormulations:
    """The batch-friendly formulations equal the textbook definitions (asymmetric kernels catch flips)."""

    def test_blur_is_the_padded_fir_filter(self) -> None:
        """Blur with (p, p) padding equals upfirdn2d with the same kernel and padding."""
        blur = Blur((1, 3, 3, 1), pad=(2, 2))
        blur.kernel = torch.rand(4, 4)
        x = torch.randn(2, 5, 9, 9)
        assert _max_error(blur(x), _upfirdn(x, blur.kernel, 1, (2, 2))) < 1e-5

    def test_upsample_is_zero_insertion_then_fir(self) -> None:
        """The transposed-convolution upsampling equals zero insertion + pad (2, 1) + FIR."""
        up = Upsample((1, 3, 3, 1))
        up.kernel = torch.rand(4, 4)
        x = torch.randn(2, 3, 7, 7)
        assert _max_error(up(x), _upfirdn(x, up.kernel, 2, (2, 1))) < 1e-5

    @pytest.mark.parametrize("cuda_formulation", [False, True])
    def test_upsample_conv_is_transposed_conv_then_blur(self, cuda_formulation: bool, monkeypatch) -> None:
        """Both upsampling formulations equal conv_transpose2d(stride 2) + blur (pad 1), asymmetric blur."""
        monkeypatch.setattr(stylegan2, "_gpu_formulation", lambda x: cuda_formulation)
        x, weight = torch.randn(2, 6, 5, 7, dtype=torch.float64), torch.randn(4, 6, 3, 3, dtype=torch.float64)
        blur = Blur((1, 3, 3, 1), pad=(1, 1), upsample_factor=2).double()
        blur.kernel = torch.rand(4, 4, dtype=torch.float64)
        expected = _upfirdn(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2), blur.kernel, 1, (1, 1))
        assert _max_error(upsample_conv(x, weight, blur), expected) < 1e-12

    def test_blur_then_strided_conv_folds_into_one_conv(self) -> None:
        """Blur + stride-2 conv is one 6x6 stride-2 conv, which is a 3x3 conv after space-to-depth."""
        layer = ConvLayer(5, 7, 3, downsample=True).double()
        layer[0].kernel = torch.rand(4, 4, dtype=torch.float64)
        x = torch.randn(2, 5, 16, 16, dtype=torch.float64)
        with torch.no_grad():
            folded = fold_blur(layer[1].weight * layer[1].scale, layer[0].kernel)
            expected = layer[1](layer[0](x))
            assert _max_error(F.conv2d(x, folded, stride=2, padding=2), expected) < 1e-12
            space_to_depth = stylegan2.stride2_conv_space_to_depth(x, stylegan2.space_to_depth_weight(folded), 2)
            assert _max_error(space_to_depth, expected) < 1e-12

    def test_depth_to_space_is_a_pixel_shuffle_that_keeps_channels_last(self) -> None:
        """Phase-major depth_to_space / space_to_depth are pixel (un)shuffles, and hand on channels-last.

        On CUDA ``F.pixel_shuffle`` returns a contiguous tensor, which would make every later conv
        transpose its operands; these run the same reshapes on any device.
        """
        x = torch.randn(2, 4 * 5, 3, 4).contiguous(memory_format=torch.channels_last)
        phase_major = x.unflatten(1, (4, 5)).transpose(1, 2).flatten(1, 2)  # (phase, c) -> (c, phase)
        up = stylegan2.depth_to_space(x)
        assert torch.equal(up, F.pixel_shuffle(phase_major, 2))
        assert up.is_contiguous(memory_format=torch.channels_last)
        down = stylegan2.space_to_depth(up)
        assert torch.equal(down, x)
        assert down.is_contiguous(memory_format=torch.channels_last)

    def test_cuda_formulations_keep_every_layer_channels_last(self, tiny, monkeypatch) -> None:
        """Every encoder and synthesis layer of the CUDA formulation hands on a channels-last tensor."""
        model, inputs, _ = tiny
        monkeypatch.setattr(stylegan2, "_gpu_formulation", lambda x: True)
        layouts: dict[str, bool] = {}
        handles = [
            module.register_forward_hook(
                lambda mod, args, out, name=name: layouts.__setitem__(
                    name, out.is_contiguous(memory_format=torch.channels_last)))
            for name, module in model.named_modules() if isinstance(module, (ConvLayer, StyledConv))
        ]
        try:
            with torch.inference_mode():
                model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        assert len(layouts) > 10
        assert [name for name, channels_last in layouts.items() if not channels_last] == []

    def test_cuda_weights_are_made_once_and_follow_the_parameters(self, tiny, monkeypatch) -> None:
        """The folded CUDA weights are made once, not per call, and are made again when new weights load."""
        model, inputs, expected = tiny
        monkeypatch.setattr(stylegan2, "_gpu_formulation", lambda x: True)
        made = []
        phases = stylegan2.upsample_phases
        monkeypatch.setattr(stylegan2, "upsample_phases", lambda *a: made.append(1) or phases(*a))
        fresh = create_generator(model.arch).eval().requires_grad_(False)  # random weights
        with torch.inference_mode():
            first = fresh(inputs)
            per_call = len(made)
            again = fresh(inputs)
        assert per_call > 0 and len(made) == per_call
        assert torch.equal(first, again)
        fresh.load_state_dict(model.state_dict())
        with torch.inference_mode():
            assert _max_error(fresh(inputs), expected) < TOLERANCE

    def test_cuda_formulation_still_trains(self, monkeypatch) -> None:
        """With autograd recording, nothing kept stands in for the parameters: their gradients arrive."""
        monkeypatch.setattr(stylegan2, "_gpu_formulation", lambda x: True)
        layer = ConvLayer(4, 6, 3, downsample=True)
        x = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            layer(x)
        layer(x).square().sum().backward()
        assert layer[1].weight.grad is not None and layer[1].weight.grad.abs().sum() > 0

    @pytest.mark.parametrize(("kernel_size", "upsample", "demodulate"), [
        (3, False, True), (3, True, True), (1, False, False), (1, False, True),
    ])
    def test_modulated_conv_equals_per_sample_weights(self, kernel_size: int, upsample: bool,
                                                      demodulate: bool) -> None:
        """Input scaling + shared conv + demodulation equals a conv with each sample's own weight."""
        torch.manual_seed(0)
        conv = ModulatedConv2d(6, 5, kernel_size, 8, upsample=upsample, demodulate=demodulate)
        if upsample:
            conv.blur.kernel = torch.rand(4, 4)
        x, style = torch.randn(3, 6, 8, 8), torch.randn(3, 8)
        with torch.no_grad():
            expected = []
            for i in range(3):
                s = conv.modulation(style[i : i + 1])[0]
                weight = conv.scale * conv.weight[0] * s[None, :, None, None]
                if demodulate:
                    weight = weight * torch.rsqrt(weight.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
                if upsample:
                    out = F.conv_transpose2d(x[i : i + 1], weight.transpose(0, 1), stride=2)
                    out = _upfirdn(out, conv.blur.kernel, 1, (1, 1))
                else:
                    out = F.conv2d(x[i : i + 1], weight, padding=kernel_size // 2)
                expected.append(out)
            assert _max_error(conv(x, style), torch.cat(expected)) < 1e-4


class TestFusedInference:
    """Without autograd, layers fold their memory-bound steps together; they must equal the layers as written.

    The folded scales are made in float32 (as for half-precision weights), hence float32 rounding here.
    """

    @pytest.mark.parametrize("cuda_formulation", [False, True])
    @pytest.mark.parametrize("upsample", [False, True])
    def test_styled_conv_equals_conv_then_injection_then_activation(
            self, upsample: bool, cuda_formulation: bool, monkeypatch) -> None:
        """Demodulation, feature injection and the biased leaky ReLU in one pass give the three steps' result."""
        monkeypatch.setattr(stylegan2, "_gpu_formulation", lambda x: cuda_formulation)
        torch.manual_seed(1)
        layer = StyledConv(6, 5, 3, 8, upsample=upsample).double()
        size = 10 if upsample else 5
        with torch.no_grad():
            layer.noise.weight.fill_(-0.7)  # zero in a fresh layer: it would hide the feature half
            layer.activate.bias.normal_()
            x = torch.randn(3, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
            style = torch.randn(3, 8, dtype=torch.float64)
            feature = torch.randn(3, 5, size, size, dtype=torch.float64)
            fused = layer(x, style, feature)
            expected = layer.activate(layer.noise(layer.conv(x, style), feature))
        assert fused.shape == (3, 10, size, size)
        assert _max_error(fused, expected) < 1e-5

    @pytest.mark.parametrize("cuda_formulation", [False, True])
    @pytest.mark.parametrize("downsample", [False, True])
    def test_encoder_layer_with_bias_and_gain_in_the_conv_equals_the_layers(
            self, downsample: bool, cuda_formulation: bool, monkeypatch) -> None:
        """Folding the activation's bias and gain into the conv changes nothing but rounding."""
        monkeypatch.setattr(stylegan2, "_gpu_formulation", lambda x: cuda_formulation)
        torch.manual_seed(2)
        layer = ConvLayer(4, 6, 3, downsample=downsample).double()
        x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
        with torch.no_grad():
            layer[-1].bias.normal_()
            fused = layer(x)
            expected = x
            for step in layer:
                expected = step(expected)
        assert _max_error(fused, expected) < 1e-5


class TestPrecision:
    def test_bf16_on_cpu_stays_close_to_fp32(self, tiny) -> None:
        """The mixed-precision path runs (bf16 convs, fp32 islands), and fp32 goes in and comes out."""
        _, inputs, expected = tiny
        model, _, _ = _load_golden(DATA / "golden_tiny64.pt")
        model = prepare_generator(model, "cpu", "bf16")
        assert model.ecd0[0][0].weight.dtype == torch.bfloat16
        assert model.generator.convs[0].conv.weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in model.generator.style.parameters())
        assert model.generator.convs[0].conv.modulation.weight.dtype == torch.float32
        with torch.inference_mode():
            out = model(inputs)
        assert out.dtype == torch.float32
        assert _max_error(out, expected) < 0.1
        assert (out - expected).abs().mean().item() < 0.02

    @pytest.mark.parametrize("cuda_formulation", [False, True])
    @pytest.mark.parametrize("upsample", [False, True])
    def test_fp16_modulated_conv_with_large_styles_stays_finite(
            self, upsample: bool, cuda_formulation: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """Before demodulation a layer's values are larger than its output by 1 / demod: with large styles (a
        bias of 1000) they used to pass fp16's 65504 and come out as inf, a black face. Now they stay finite and
        match fp32, in the CPU and the CUDA formulation alike."""
        from gpen_engine import stylegan2
        from gpen_engine.stylegan2 import ModulatedConv2d

        monkeypatch.setattr(stylegan2, "_gpu_formulation", lambda x: cuda_formulation and x.dtype == torch.half)

        torch.manual_seed(0)
        conv = ModulatedConv2d(64, 64, 3, 32, upsample=upsample).eval().requires_grad_(False)
        conv.modulation.bias.fill_(1000.0)
        x, style = torch.randn(2, 64, 16, 16) * 20, torch.randn(2, 32)
        expected = conv(x, style)
        got = conv(x.half(), style)
        assert torch.isfinite(got).all()
        assert ((got.float() - expected).norm() / expected.norm()).item() < 2e-3
        out, demod, phase_major = conv.undemodulated(x.half(), style)  # the fused layers' route
        assert demod is not None and torch.isfinite(out).all()
        if phase_major:  # (N, 4 * out, H, W), the four output phases side by side: scaled alike
            out = out.view(2, 4, 64, 16, 16) * demod[:, None, :, None, None].half()
            out = out.view(2, 2, 2, 64, 16, 16).permute(0, 3, 4, 1, 5, 2).reshape(2, 64, 32, 32)
        else:
            out = out * demod[:, :, None, None].half()
        assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-3

    def test_fp16_falls_back_to_fp32_on_cpu(self) -> None:
        """Half precision is a GPU feature: on the CPU fp16 runs as fp32, bf16 only when asked for."""
        assert resolve_precision("cpu", "fp16") == "fp32"
        assert resolve_precision("cpu", "bf16") == "bf16"
        assert resolve_precision("cpu", "fp32") == "fp32"
        model = prepare_generator(create_generator(GpenArch(8, style_dim=8, n_mlp=1)), "cpu", "fp16")
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert not any(p.requires_grad for p in model.parameters()) and not model.training

    def test_bf16_becomes_fp16_on_gpus_without_bf16_units(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Turing and Volta (compute capability 7.x) only emulate bf16: such a GPU runs fp16 instead, judged by the
        target device, not by whichever GPU is current."""
        asked: list[object] = []

        def capability(device: object = None) -> tuple[int, int]:
            asked.append(device)
            return {1: (7, 5), 2: (9, 0)}[torch.device(device).index]

        monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
        assert resolve_precision("cuda:1", "bf16") == "fp16"
        assert resolve_precision("cuda:2", "bf16") == "bf16"
        assert resolve_precision("cuda:1", "fp16") == "fp16"
        assert [torch.device(d) for d in asked] == [torch.device("cuda:1"), torch.device("cuda:2")]

    def test_unknown_precision_is_rejected(self) -> None:
        """A typo in the precision is an error, not a silent fp32."""
        with pytest.raises(ValueError, match="precision"):
            resolve_precision("cpu", "fp8")  # type: ignore[arg-type]


class TestDeterminism:
    def test_same_input_gives_identical_output(self, tiny) -> None:
        """Inference has no noise: running the same batch twice gives bit-identical results."""
        model, inputs, _ = tiny
        with torch.inference_mode():
            assert torch.equal(model(inputs), model(inputs))
