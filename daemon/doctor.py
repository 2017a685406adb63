"""``gpen-watch doctor``: what this machine can run, which device would run it and why, and the state of
every weight file, with what to do about each problem. It reads; it never changes the GPU or the files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from daemon.downloads import redact_url
from daemon.modelfiles import download_command, file_state, models_of, needed_models, resolve_path
from daemon.settings import ConfigError, Settings, preset_table, preset_warnings, settings_from_args
from gpen_engine.device import CudaProbe, DeviceReport, select_device
from gpen_engine.types import DeviceError

# Read-only query: clocks, persistence mode and power are reported, never set (shared servers).
_SMI_FIELDS = (
    "index,pci.bus_id,name,driver_version,persistence_mode,clocks.sm,clocks.max.sm,clocks.mem,"
    "power.draw,power.limit,temperature.gpu,utilization.gpu,memory.used,memory.total"
)


@dataclass
class Findings:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # break what the configured presets need
    warnings: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        self.lines.append(text)


def command(args: Any, *, probe: CudaProbe | None = None) -> int:
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    findings = Findings()
    findings.warnings += preset_warnings(settings)
    _torch_section(findings, probe or CudaProbe())
    _device_section(findings, settings, probe)
    _nvidia_smi_section(findings)
    _models_section(findings, settings)
    print("\n".join(findings.lines))
    print()
    for text in findings.warnings:
        print(f"warning: {text}")
    for text in findings.problems:
        print(f"PROBLEM: {text}")
    if findings.problems:
        print(f"{len(findings.problems)} problem(s): the configured presets cannot all run as they are.")
        return 1
    if findings.warnings:
        print("nothing blocks the configured presets, but see the warnings above.")
    else:
        print("everything the configured presets need is in place.")
    return 0


def _torch_section(f: Findings, probe: CudaProbe) -> None:
    f.say("torch")
    f.say(f"  version        {torch.__version__} (python {sys.version.split()[0]})")
    if probe.built_with is None:
        f.say("  CUDA build     none (CPU-only torch)")
        return
    f.say(f"  CUDA build     {probe.built_with}")
    f.say(f"  arch list      {' '.join(probe.get_arch_list()) or '-'}")
    driver = probe.driver().describe().removeprefix("driver: ").removeprefix("driver ")
    f.say(f"  NVIDIA driver  {driver}")


def _device_section(f: Findings, settings: Settings, probe: CudaProbe | None) -> None:
    f.say()
    f.say("device")
    requests = {settings.device: ["device setting"]}
    for name, preset in preset_table(settings).items():
        if preset.device != "auto" and preset.device != settings.device:
            requests.setdefault(preset.device, []).append(f"preset {name}")
    for request, users in requests.items():
        try:
            report = select_device(request, probe=probe)
        except DeviceError as exc:
            f.say(f"  {request:<13}  DOES NOT WORK ({', '.join(users)})")
            f.problems.append(f"{exc}. Fix that, or set device = \"auto\" or \"cpu\".")
            continue
        f.say(f"  {request:<13}  -> {report.device} ({report.name})")
        f.say(f"  {'':<13}     why: {report.reason}")
        _device_details(f, report)
        if report.fell_back:
            f.warnings.append(
                "running on the CPU although device = \"auto\" looked for a GPU: restoring will be slow. "
                "If this machine has an NVIDIA GPU, the reason above says what is in the way."
            )


def _device_details(f: Findings, report: DeviceReport) -> None:
    if report.capability:
        f.say(f"  {'':<13}     compute capability {report.capability[0]}.{report.capability[1]}")
    if report.device.type == "cuda" and (pci := _pci_address(report.device)) is not None:
        f.say(f"  {'':<13}     PCI {pci} (as nvidia-smi lists it below)")
    if report.total_memory:
        free = f", {_gib(report.free_memory)} free" if report.free_memory is not None else ""
        f.say(f"  {'':<13}     memory {_gib(report.total_memory)} total{free}")


def _pci_address(device: torch.device) -> str | None:
    """The device's PCI address as nvidia-smi writes it (``00000000:17:00.0``), or None where torch cannot say."""
    try:
        props: Any = torch.cuda.get_device_properties(device)  # the stubs lack the PCI fields
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except (AttributeError, RuntimeError, AssertionError):
        return None


def _nvidia_smi_section(f: Findings) -> None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return
    f.say()
    f.say("nvidia-smi (read only)")
    try:
        result = subprocess.run(
            [smi, f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=15, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        f.say(f"  could not run nvidia-smi: {exc}")
        return
    if result.returncode != 0:
        f.say(f"  nvidia-smi failed: {(result.stderr or result.stdout).strip()}")
        return
    # nvidia-smi numbers every GPU of the machine in PCI order; torch's cuda:N count only those in
    # CUDA_VISIBLE_DEVICES, fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID. The PCI address is the same in both.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    order = os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    if visible != "unset" or order != "PCI_BUS_ID":
        f.say(f"  (numbered as nvidia-smi does, not as cuda:N: CUDA_VISIBLE_DEVICES={visible}, "
              f"CUDA_DEVICE_ORDER={order}; match them by PCI address)")
    names = _SMI_FIELDS.split(",")
    for line in result.stdout.strip().splitlines():
        values = dict(zip(names, (v.strip() for v in line.split(",")), strict=False))
        f.say(f"  GPU {values.get('index')} (PCI {values.get('pci.bus_id')}): {values.get('name')}, "
              f"driver {values.get('driver_version')}")
        f.say(
            f"    persistence {values.get('persistence_mode')}, SM clock {values.get('clocks.sm')} "
            f"(max {values.get('clocks.max.sm')}), memory clock {values.get('clocks.mem')}"
        )
        f.say(
            f"    power {values.get('power.draw')} of {values.get('power.limit')}, "
            f"{values.get('temperature.gpu')} C, busy {values.get('utilization.gpu')}, "
            f"memory used {values.get('memory.used')} of {values.get('memory.total')}"
        )


def _models_section(f: Findings, settings: Settings) -> None:
    f.say()
    f.say(f"weight files in {settings.models_dir.expanduser().absolute()}")
    needed = needed_models(settings)
    for spec in models_of(settings).values():
        path = resolve_path(settings, spec)
        state = file_state(spec, path, check=True)
        users = needed.get(spec.name, [])
        size = f"{state.size / 1e6:.1f} MB" if state.size is not None else "-"
        used = f"needed by {', '.join(users)}" if users else "not used by the configured presets"
        label = {"ok": "ok", "corrupt": "CORRUPT", "missing": "missing", "partial": "partial",
                 "empty": "EMPTY"}[state.state]
        f.say(f"  {spec.name:<22} {label:<8} {size:>10}  {used}")
        if state.state == "corrupt":
            f.say(f"    {state.detail}")
            advice = f"{spec.name}: {path} is damaged or of the wrong kind: delete it and run " \
                     f"`{download_command(settings, spec.name)}` (or copy a good file there)"
            (f.problems if users else f.warnings).append(advice)
        elif state.state in ("missing", "partial", "empty") and users:
            if settings.download and spec.urls:
                f.warnings.append(
                    f"{spec.name} is not downloaded yet; it will be fetched on first start from "
                    f"{redact_url(spec.urls[0])} (or now: `{download_command(settings, spec.name)}`)"
                )
            else:
                where = redact_url(spec.urls[0]) if spec.urls else (spec.source or "its publisher")
                why = "downloads are off" if not settings.download else "no download address is known"
                f.problems.append(f"{spec.name} is missing and {why}: put the file at {path} (from {where})")


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 30):.1f} GiB"
