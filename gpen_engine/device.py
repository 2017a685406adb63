"""Choose the device the engine runs on, and prove that it works before trusting it.

A machine can claim CUDA and still be unable to run a kernel (driver older than the toolkit torch was
built for, a GPU architecture this torch build has no code for). So a GPU is used only after a real
kernel launch and an exact host -> device -> host round trip; ``auto`` says loudly why it chose what it
chose, and an explicit ``cuda`` that does not work is an error, never a quiet fall-back to the CPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .types import DeviceError


@dataclass(frozen=True)
class DeviceReport:
    """Which device runs, and why."""

    device: torch.device
    name: str
    reason: str
    torch_version: str
    cuda_version: str | None  # the CUDA toolkit torch was built with; None for CPU-only builds
    capability: tuple[int, int] | None = None
    total_memory: int | None = None
    free_memory: int | None = None
    fell_back: bool = False  # ``auto`` wanted a GPU and ended on the CPU


@dataclass(frozen=True)
class CudaProbe:
    """The torch.cuda calls device selection relies on, gathered so tests can stand in for a GPU."""

    built_with: str | None = field(default_factory=lambda: torch.version.cuda)
    is_available: Callable[[], bool] = torch.cuda.is_available
    device_count: Callable[[], int] = torch.cuda.device_count
    get_device_name: Callable[[int], str] = torch.cuda.get_device_name
    get_device_capability: Callable[[int], tuple[int, int]] = torch.cuda.get_device_capability
    get_arch_list: Callable[[], list[str]] = torch.cuda.get_arch_list
    mem_get_info: Callable[[int], tuple[int, int]] = torch.cuda.mem_get_info
    smoke_test: Callable[[torch.device], None] = field(default_factory=lambda: smoke_test)
    driver: Callable[[], DriverInfo] = field(default_factory=lambda: driver_info)


@dataclass(frozen=True)
class DriverInfo:
    """What the NVIDIA driver says about itself, read without touching the GPU's settings."""

    version: str | None  # e.g. "550.54.15"; None when no driver is installed
    cuda: tuple[int, int] | None  # the newest CUDA version the driver supports

    def describe(self) -> str:
        if self.version is None and self.cuda is None:
            return "driver: not found"
        parts = [f"driver {self.version}" if self.version else "driver: loaded"]
        if self.cuda:
            parts.append(f"supports CUDA up to {self.cuda[0]}.{self.cuda[1]}")
        return ", ".join(parts)


def driver_info() -> DriverInfo:
    version = None
    try:
        with open("/proc/driver/nvidia/version") as f:
            match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", f.read())
        version = match.group(1) if match else None
    except OSError:
        pass
    cuda = None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        value = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(value)) == 0 and value.value:
            cuda = (value.value // 1000, (value.value % 1000) // 10)
    except (OSError, AttributeError):
        pass
    return DriverInfo(version, cuda)


def smoke_test(device: torch.device) -> None:
    """Launch a real kernel on ``device`` and check a round trip bit for bit.

    Small integers keep the product exact in any matmul precision (TF32 included), so equality is fair.
    """
    host = (torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) % 5) - 2
    on_device = host.to(device)
    back = on_device.to("cpu")
    if not torch.equal(back, host):
        raise DeviceError(f"{device}: a host -> device -> host copy came back changed")
    product = (on_device @ on_device.T).to("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not torch.equal(product, host @ host.T):
        raise DeviceError(f"{device}: a small matrix product gave wrong numbers")


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Can this torch build run kernels on a GPU of ``capability``?

    ``sm_XY`` code runs on the same major version with an equal or newer minor; ``sm_XYa`` only on exactly
    X.Y; ``compute_XY`` (PTX) is compiled by the driver for any GPU of X.Y or newer.
    """
    for entry in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", entry)
        if not match:
            continue
        kind, major, minor, suffix = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        if kind == "compute" and capability >= (major, minor):
            return True
        if kind == "sm" and suffix == "a" and capability == (major, minor):
            return True
        if kind == "sm" and suffix != "a" and capability[0] == major and capability[1] >= minor:
            return True
    return False


def select_device(request: str = "auto", *, probe: CudaProbe | None = None) -> DeviceReport:
    """Resolve ``auto | cpu | cuda | cuda:N`` to a device that has been proven to work.

    Raises DeviceError for a malformed request or an explicit CUDA device that does not work.
    """
    probe = probe or CudaProbe()
    request = request.strip().lower()
    if request == "cpu":
        return _cpu_report("cpu requested", probe, fell_back=False)
    if request == "auto":
        return _auto(probe)
    match = re.fullmatch(r"cuda(?::(\d+))?", request)
    if not match:
        raise DeviceError(f"device {request!r}: must be auto, cpu, cuda or cuda:N")
    index = int(match.group(1) or 0)
    report, cause = _try_cuda(index, probe)
    if report is None:
        raise DeviceError(f"device {request} does not work: {cause}")
    return report


def _auto(probe: CudaProbe) -> DeviceReport:
    count, cause = _visible_gpus(probe)
    causes = [cause] if cause else []
    for index in range(count):
        report, cause = _try_cuda(index, probe)
        if report is not None:
            return report
        causes.append(cause)
    return _cpu_report("auto: " + "; ".join(causes) + " -> running on the CPU", probe, fell_back=True)


def _visible_gpus(probe: CudaProbe) -> tuple[int, str | None]:
    """How many GPUs torch can use, or 0 and the reason why none."""
    if probe.built_with is None:
        return 0, f"torch {torch.__version__} is built without CUDA (install a CUDA build of torch)"
    # torch reports driver trouble as a warning from is_available(); keep its words for the reason.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = probe.is_available()
        count = probe.device_count() if available else 0
    if count > 0:
        return count, None
    driver = probe.driver()
    context = f"torch {torch.__version__} built with CUDA {probe.built_with}, {driver.describe()}"
    if driver.cuda is not None and driver.cuda < _version_tuple(probe.built_with):
        return 0, (
            f"the NVIDIA driver is too old for this torch ({context}): update the driver, "
            f"or install a torch build for CUDA {driver.cuda[0]}.{driver.cuda[1]} or older"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        context += f", CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    detail = "; ".join(str(w.message).strip() for w in caught)
    return 0, f"no CUDA device visible ({context})" + (f": {detail}" if detail else "")


def _try_cuda(index: int, probe: CudaProbe) -> tuple[DeviceReport | None, str]:
    count, cause = _visible_gpus(probe)
    if cause:
        return None, cause
    if index >= count:
        return None, f"cuda:{index} is out of range: {count} CUDA device(s) visible (cuda:0..{count - 1})"
    device = torch.device("cuda", index)
    name = probe.get_device_name(index)
    capability = tuple(probe.get_device_capability(index))
    arch_list = list(probe.get_arch_list())
    cap = f"{capability[0]}.{capability[1]}"
    if not arch_supported(capability, arch_list):  # type: ignore[arg-type]
        return None, (
            f"cuda:{index} ({name}) has compute capability {cap}, which torch {torch.__version__} has no "
            f"kernels for (built for {' '.join(arch_list) or 'nothing'}): "
            f"install a torch build that supports sm_{capability[0]}{capability[1]}"
        )
    try:
        probe.smoke_test(device)
    except Exception as exc:  # any failure here means the GPU cannot be trusted
        return None, f"cuda:{index} ({name}) failed a test kernel launch: {exc}"
    free, total = probe.mem_get_info(index)
    reason = f"cuda:{index} ({name}, compute capability {cap}) passed a test kernel launch and round trip"
    report = DeviceReport(
        device=device, name=name, reason=reason, torch_version=torch.__version__,
        cuda_version=probe.built_with, capability=capability,  # type: ignore[arg-type]
        total_memory=total, free_memory=free, fell_back=False,
    )
    return report, ""


def _cpu_report(reason: str, probe: CudaProbe, *, fell_back: bool) -> DeviceReport:
    device = torch.device("cpu")
    smoke_test(device)
    total, free = _host_memory()
    return DeviceReport(
        device=device, name=_cpu_name(), reason=reason, torch_version=torch.__version__,
        cuda_version=probe.built_with, total_memory=total, free_memory=free, fell_back=fell_back,
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} threads)"


def _host_memory() -> tuple[int | None, int | None]:
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
        return info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError):
        return None, None


def _version_tuple(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor.split(".")[0] or 0)
