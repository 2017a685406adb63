"""What only a CUDA device can show: the generator and the pipeline on the GPU (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpen_engine.gpen import GpenArch, create_generator
from gpen_engine.precision import prepare_generator
from tests.conftest import SHARED_DIRS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def small_golden(shared_dir: Path) -> Path:
    path = shared_dir / "reference" / "golden_small128.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _golden(path: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    golden = torch.load(path, map_location="cpu", weights_only=True)
    model = create_generator(GpenArch(**golden["ctor"]))
    model.load_state_dict(golden["state_dict"], strict=True)
    return model.eval().requires_grad_(False), golden["input"], golden["output"]


@pytest.fixture
def no_tf32():
    # TF32 matmuls/convs are a deliberate 1e-3-level approximation; the exactness check runs without them.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name", ["golden_tiny64.pt", "golden_small128.pt"])
def test_fp32_on_cuda_matches_official_output(name, no_tf32, request):
    """The CUDA formulation (folded blurs, phase upsampling) computes the official output in fp32."""
    path = DATA / name if name == "golden_tiny64.pt" else request.getfixturevalue("small_golden")
    model, x, expected = _golden(path)
    model = prepare_generator(model, "cuda", "fp32")
    for batch in (1, len(x)):
        with torch.inference_mode():
            out = torch.cat([model(x[i:i + batch].cuda()).cpu() for i in range(0, len(x), batch)])
        assert (out - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize(("precision", "bound"), [("fp16", 2e-2), ("bf16", 1e-1)])
def test_half_precision_stays_close_to_fp32(precision, bound, no_tf32):
    """fp16/bf16 (style MLP, modulation and demodulation in fp32) stay close to the fp32 output."""
    small = [path for d in SHARED_DIRS if (path := d / "reference" / "golden_small128.pt").is_file()]
    path = small[0] if small else DATA / "golden_tiny64.pt"  # runs without the shared data too
    model, x, expected = _golden(path)
    half = prepare_generator(model, "cuda", precision)
    # The convolutions really run in half precision: most of their weights are stored in it (the style MLP,
    # modulation and ToRGB stay fp32).
    sizes: dict[torch.dtype, int] = {}
    for tensor in half.parameters():
        if tensor.dim() >= 4:
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    assert max(sizes, key=lambda dtype: sizes[dtype]) == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    with torch.inference_mode():
        out = half(x.cuda()).float().cpu()
    assert out.dtype == torch.float32
    err = (out - expected).abs().max().item()
    print(f"{precision} vs official fp32 on {path.name}: max abs {err:.2e}")
    assert err < bound


def test_fp16_layers_stay_channels_last_on_cuda():
    """Every layer of the fp16 generator hands on a channels-last tensor, the layout tensor cores read.

    A contiguous (NCHW) tensor in between makes cuDNN transpose around every later convolution.
    """
    from gpen_engine.stylegan2 import ConvLayer, StyledConv

    model, x, _ = _golden(DATA / "golden_tiny64.pt")
    model = prepare_generator(model, "cuda", "fp16")
    layouts: dict[str, bool] = {}
    for name, module in model.named_modules():
        if isinstance(module, (ConvLayer, StyledConv)):
            module.register_forward_hook(lambda mod, args, out, name=name: layouts.__setitem__(
                name, out.is_contiguous(memory_format=torch.channels_last)))
    with torch.inference_mode():
        model(x.cuda())
    assert len(layouts) > 10
    assert [name for name, channels_last in layouts.items() if not channels_last] == []


def test_restorer_on_cuda_keeps_background_and_finds_faces(detector_path, solvay_rgb):
    """On the GPU the whole pipeline finds the 29 Solvay faces and leaves pixels away from faces untouched."""
    from gpen_engine.options import BUILTIN_PRESETS
    from gpen_engine.restorer import Restorer, load_engine_models

    preset = BUILTIN_PRESETS["low-spec"].with_(max_long_side=None, strength=100, precision="fp16")
    models = load_engine_models(
        generator_path=None, arch="GPEN-BFR-256", detector_path=detector_path, detector_name="mobile0.25",
        device="cuda", precision="fp16", random_generator=True,
    )
    (result,) = Restorer(models, preset).restore([np.array(solvay_rgb)])
    assert not isinstance(result, Exception), result
    assert 29 == len(result.faces)
    assert result.rgb.shape == solvay_rgb.shape
    changed = np.any(result.rgb != solvay_rgb, axis=2)
    assert changed.any()
    boxes = np.zeros(changed.shape, bool)
    for face in result.faces:
        x1, y1, x2, y2 = face.box
        w, h = x2 - x1, y2 - y1
        boxes[max(0, int(y1 - h)):int(y2 + h), max(0, int(x1 - w)):int(x2 + w)] = True
    assert not (changed & ~boxes).any(), "pixels far from every face changed"


def test_device_selection_proves_the_gpu():
    """`auto` picks the GPU after a real kernel launch and says why."""
    from gpen_engine.device import select_device

    report = select_device("auto")
    assert "cuda" == report.device.type
    assert not report.fell_back
    assert report.reason
