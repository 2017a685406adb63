"""The systemd units: they pass `systemd-analyze verify`, and they carry the hardening the issue asks for."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
SERVICE = SYSTEMD_DIR / "gpen-watch.service"
TEMPLATE = SYSTEMD_DIR / "gpen-watch@.service"
INSTALLED_BINARY = "/opt/gpen-watch/venv/bin/gpen-watch"

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd to run these checks)"
)


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: systemd allows a key several times."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def verify(unit_text: str, name: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on a copy of the unit whose ExecStart binary exists (a stand-in script).

    verify insists that ExecStart= is executable; everything else in the unit is checked as shipped.
    A template is checked through an instance name linked to it, as systemd would load it.
    """
    assert ANALYZE is not None
    fake = tmp_path / "bin" / "gpen-watch"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    assert INSTALLED_BINARY in unit_text
    (units / name).write_text(unit_text.replace(INSTALLED_BINARY, str(fake)))
    target = name
    if name.endswith("@.service"):
        target = name.replace("@.service", "@1.service")
        (units / target).symlink_to(name)
    env = {k: v for k, v in os.environ.items() if k not in ("SYSTEMD_UNIT_PATH", "NOTIFY_SOCKET")}
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", "--generators=no", str(units / target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    # verify exits 0 even for unknown keys or unparsable values; it only warns on stderr.
    assert (result.returncode, result.stderr.strip()) == (0, ""), result.stderr


@needs_analyze
class TestVerify:
    def test_service_passes_verify(self, tmp_path: Path) -> None:
        """gpen-watch.service loads without a single warning from systemd-analyze verify."""
        assert_clean(verify(SERVICE.read_text(), SERVICE.name, tmp_path))

    def test_template_instance_passes_verify(self, tmp_path: Path) -> None:
        """gpen-watch@1.service (the template instantiated) loads without warnings."""
        assert_clean(verify(TEMPLATE.read_text(), TEMPLATE.name, tmp_path))

    def test_verify_reports_a_misspelled_setting(self, tmp_path: Path) -> None:
        """The check is not vacuous: a typo in a hardening key is reported."""
        broken = SERVICE.read_text().replace("ProtectHome=yes", "ProtectHom=yes")
        result = verify(broken, SERVICE.name, tmp_path)
        assert "ProtectHom" in result.stderr

    @pytest.mark.parametrize("unit", [SERVICE, TEMPLATE], ids=["service", "template"])
    def test_security_exposure_stays_low(self, unit: Path, tmp_path: Path) -> None:
        """`systemd-analyze security` rates the unit at most 2.0 (the README records the exact figure)."""
        assert ANALYZE is not None
        copy = tmp_path / unit.name.replace("@.service", "@0.service")
        copy.write_text(unit.read_text())
        result = subprocess.run(
            [ANALYZE, "security", "--offline=yes", "--no-pager", str(copy)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if "Unknown option" in result.stderr or "unrecognized option" in result.stderr:
            pytest.skip(f"this systemd-analyze cannot review offline: {result.stderr.strip()}")
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
        assert match, result.stdout + result.stderr
        assert float(match.group(1)) <= 2.0, result.stdout


class TestHardening:
    @pytest.fixture(params=[SERVICE, TEMPLATE], ids=["service", "template"])
    def unit(self, request: pytest.FixtureRequest) -> dict[str, list[tuple[str, str]]]:
        return parse_unit(request.param)

    def test_lifecycle_settings(self, unit: dict[str, list[tuple[str, str]]]) -> None:
        """Type=notify with a watchdog, SIGHUP reload and restart on failure, as the daemon implements."""
        service = dict(unit["Service"])
        assert service["Type"] == "notify"
        assert service["NotifyAccess"] == "main"
        assert int(service["WatchdogSec"]) >= 60
        assert service["Restart"] == "on-failure"
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert service["ExecStart"].startswith(INSTALLED_BINARY + " run --config /etc/gpen-watch/")
        assert "TimeoutStopSec" in service and "TimeoutStartSec" in service

    def test_sandbox_settings(self, unit: dict[str, list[tuple[str, str]]]) -> None:
        """The file system and privilege settings a security review looks for are all set."""
        service = dict(unit["Service"])
        expected = {
            "ProtectSystem": "strict",
            "PrivateTmp": "yes",
            "ProtectHome": "yes",
            "NoNewPrivileges": "yes",
            "PrivateDevices": "no",
            "DevicePolicy": "closed",
            "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes",
            "ProtectControlGroups": "yes",
            "RestrictNamespaces": "yes",
            "RestrictRealtime": "yes",
            "LockPersonality": "yes",
            "SystemCallArchitectures": "native",
            "CapabilityBoundingSet": "",
            "User": "gpen-watch",
            "Group": "gpen-watch",
        }
        assert {k: service.get(k) for k in expected} == expected
        assert values(unit, "Service", "ReadWritePaths"), (
            "the shares must be writable under ProtectSystem=strict"
        )
        assert values(unit, "Unit", "RequiresMountsFor")
        assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}

    def test_jit_compilers_keep_working(self, unit: dict[str, list[tuple[str, str]]]) -> None:
        """MemoryDenyWriteExecute is not set: numba's JIT (pulled in by facexlib) cannot import under it."""
        assert not values(unit, "Service", "MemoryDenyWriteExecute")

    def test_nvidia_device_nodes_allowed(self, unit: dict[str, list[tuple[str, str]]]) -> None:
        """The device cgroup admits the NVIDIA nodes under both the old and the new driver group names."""
        allowed = {v.split()[0]: v.split()[1] for v in values(unit, "Service", "DeviceAllow")}
        for group in ("char-nvidia-frontend", "char-nvidia", "char-nvidiactl", "char-nvidia-uvm"):
            assert allowed.get(group) == "rw", group

    def test_state_directory(self) -> None:
        """The single unit keeps its state in /var/lib/gpen-watch, each template instance in a subfolder."""
        assert values(parse_unit(SERVICE), "Service", "StateDirectory") == ["gpen-watch"]
        assert values(parse_unit(TEMPLATE), "Service", "StateDirectory") == ["gpen-watch"]


class TestTemplate:
    def test_instance_is_pinned_to_its_gpu(self) -> None:
        """gpen-watch@N sees only GPU N (as nvidia-smi numbers it) and addresses it as cuda:0."""
        env = values(parse_unit(TEMPLATE), "Service", "Environment")
        assert "CUDA_VISIBLE_DEVICES=%i" in env
        assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in env
        assert "GPEN_WATCH_DEVICE=cuda:0" in env

    def test_instances_share_config_and_job_table(self) -> None:
        """Every instance reads the one config and shares the job table, named by its GPU index: no file to edit."""
        (start,) = values(parse_unit(TEMPLATE), "Service", "ExecStart")
        assert start.endswith("--config /etc/gpen-watch/config.toml")
        assert "GPEN_WATCH_INSTANCE=%i" in values(parse_unit(TEMPLATE), "Service", "Environment")


def make_sysroot(root: Path) -> subprocess.CompletedProcess[str]:
    """Run sysusers.d on an empty file-system root, as systemd-sysusers does at package install."""
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed")
    etc = root / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        (etc / name).write_text("")
    result = subprocess.run(
        [tool, f"--root={root}", str(SYSTEMD_DIR / "gpen-watch.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"systemd-sysusers --root needs root here: {result.stderr.strip()}")
    return result


class TestAccounts:
    def test_sysusers_creates_a_locked_system_user(self, tmp_path: Path) -> None:
        """sysusers.d creates gpen-watch as a system user without a login shell, home in the state dir."""
        result = make_sysroot(tmp_path)
        assert result.returncode == 0, result.stderr
        (entry,) = [line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()]
        assert entry[0] == "gpen-watch"
        assert int(entry[2]) < 1000  # a system user
        assert entry[5] == "/var/lib/gpen-watch"
        assert entry[6].endswith("nologin")
        assert (tmp_path / "etc/group").read_text().startswith("gpen-watch:")

    def test_tmpfiles_create_the_shared_weights_folder(self, tmp_path: Path) -> None:
        """tmpfiles.d makes /var/lib/gpen-watch/models, owned by the service user, shared by instances."""
        tool = shutil.which("systemd-tmpfiles")
        if tool is None:
            pytest.skip("systemd-tmpfiles is not installed")
        assert make_sysroot(tmp_path).returncode == 0
        result = subprocess.run(
            [tool, f"--root={tmp_path}", "--create", str(SYSTEMD_DIR / "gpen-watch.tmpfiles")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        models = tmp_path / "var/lib/gpen-watch/models"
        (entry,) = [line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()]
        assert (models.stat().st_mode & 0o777, models.stat().st_uid) == (0o750, int(entry[2]))
