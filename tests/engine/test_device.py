"""Device selection: a GPU is used only when it provably works, and every choice says why."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from gpen_engine.device import CudaProbe, DriverInfo, arch_supported, select_device
from gpen_engine.types import DeviceError

GIB = 1 << 30


def fake_gpu(**changes: object) -> CudaProbe:
    """A probe that reports one working 'A100' without touching torch.cuda."""
    probe = CudaProbe(
        built_with="13.0",
        is_available=lambda: True,
        device_count=lambda: 1,
        get_device_name=lambda i: "NVIDIA A100-SXM4-40GB",
        get_device_capability=lambda i: (8, 0),
        get_arch_list=lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"],
        mem_get_info=lambda i: (30 * GIB, 40 * GIB),
        smoke_test=lambda device: None,
        driver=lambda: DriverInfo("580.65.06", (13, 0)),
    )
    return replace(probe, **changes)  # type: ignore[arg-type]


NO_DRIVER = DriverInfo(None, None)


def no_gpu(driver: DriverInfo = NO_DRIVER, warning: str | None = None) -> CudaProbe:
    def is_available() -> bool:
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=1)
        return False

    return fake_gpu(is_available=is_available, device_count=lambda: 0, driver=lambda: driver)


class TestSelectDevice:
    def test_cpu_request(self) -> None:
        """'cpu' runs on the CPU, which is itself checked, and is not reported as a fall-back."""
        report = select_device("cpu")
        assert report.device == torch.device("cpu")
        assert report.fell_back is False
        assert report.torch_version == torch.__version__

    def test_auto_uses_working_gpu(self) -> None:
        """'auto' takes a GPU that passes the kernel test, with its name, capability and memory."""
        report = select_device("auto", probe=fake_gpu())
        assert report.device == torch.device("cuda", 0)
        assert report.name == "NVIDIA A100-SXM4-40GB"
        assert report.capability == (8, 0)
        assert (report.free_memory, report.total_memory) == (30 * GIB, 40 * GIB)
        assert report.fell_back is False
        assert "passed a test kernel launch" in report.reason

    def test_auto_falls_back_with_reason(self) -> None:
        """No driver: 'auto' runs on the CPU; the reason names torch's CUDA build and the missing driver."""
        report = select_device("auto", probe=no_gpu())
        assert report.device == torch.device("cpu")
        assert report.fell_back is True
        assert "no CUDA device visible" in report.reason
        assert "built with CUDA 13.0" in report.reason
        assert "driver: not found" in report.reason

    def test_auto_skips_gpu_that_fails_kernel_test(self) -> None:
        """A GPU whose test kernel fails is not used by 'auto'; the failure is in the reason."""

        def broken(device: torch.device) -> None:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

        report = select_device("auto", probe=fake_gpu(smoke_test=broken))
        assert report.device == torch.device("cpu")
        assert report.fell_back is True
        assert "no kernel image" in report.reason

    def test_explicit_cuda_without_driver_is_error(self) -> None:
        """An explicit 'cuda' with no driver raises, naming the cause, instead of running on the CPU."""
        with pytest.raises(DeviceError, match="driver: not found"):
            select_device("cuda", probe=no_gpu())

    def test_old_driver_named(self) -> None:
        """A driver older than torch's CUDA build is called out as the cause, with what to do."""
        with pytest.raises(DeviceError, match="driver is too old") as info:
            select_device("cuda", probe=no_gpu(DriverInfo("535.104.05", (12, 2))))
        assert "12.2" in str(info.value) and "13.0" in str(info.value)

    def test_torch_warning_kept_in_reason(self) -> None:
        """What torch itself warns while probing CUDA ends up in the error, not on the console as noise."""
        with pytest.raises(DeviceError, match="CUDA initialization: unexpected error"):
            probe = no_gpu(DriverInfo("580.1", (13, 0)), "CUDA initialization: unexpected error")
            select_device("cuda", probe=probe)

    def test_torch_without_cuda(self) -> None:
        """A CPU-only torch build is named as the cause of an explicit 'cuda' failing."""
        with pytest.raises(DeviceError, match="built without CUDA"):
            select_device("cuda", probe=fake_gpu(built_with=None))

    def test_unsupported_architecture(self) -> None:
        """A GPU whose compute capability this torch has no kernels for is refused with both named."""
        probe = fake_gpu(get_device_capability=lambda i: (6, 1), get_device_name=lambda i: "GeForce GTX 1080")
        with pytest.raises(DeviceError) as info:
            select_device("cuda:0", probe=probe)
        message = str(info.value)
        assert "6.1" in message and "GeForce GTX 1080" in message and "sm_75" in message

    def test_index_out_of_range(self) -> None:
        """'cuda:3' on a one-GPU machine says how many devices there are."""
        with pytest.raises(DeviceError, match="out of range: 1 CUDA device"):
            select_device("cuda:3", probe=fake_gpu())

    def test_malformed_request(self) -> None:
        """A device string that is not auto/cpu/cuda/cuda:N is rejected."""
        with pytest.raises(DeviceError, match="must be auto, cpu, cuda or cuda:N"):
            select_device("gpu0", probe=fake_gpu())

    def test_this_machine_auto_is_honest(self) -> None:
        """On the real torch of this machine, 'auto' reports a device that matches what torch can do."""
        report = select_device("auto")
        if torch.cuda.is_available():
            assert report.device.type == "cuda"
        else:
            assert report.device.type == "cpu" and report.fell_back and report.reason


class TestArchSupported:
    @pytest.mark.parametrize(
        ("capability", "arch_list", "expected"),
        [
            ((8, 6), ["sm_80"], True),  # same major, newer minor: binary compatible
            ((8, 0), ["sm_86"], False),  # older minor cannot run newer code
            ((9, 0), ["sm_80"], False),  # no PTX, different major
            ((9, 0), ["sm_80", "compute_80"], True),  # PTX is JIT-compiled for newer GPUs
            ((10, 0), ["sm_100a"], True),
            ((10, 3), ["sm_100a"], False),  # arch-specific code runs on that exact capability only
            ((12, 0), ["sm_120"], True),
        ],
    )
    def test_compatibility_rules(
        self, capability: tuple[int, int], arch_list: list[str], expected: bool
    ) -> None:
        """Compute capability vs. torch's arch list follows CUDA's binary and PTX compatibility rules."""
        assert arch_supported(capability, arch_list) is expected
