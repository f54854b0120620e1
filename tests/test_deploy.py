"""The deployment files are consistent with the code: commands exist, settings load, paths exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from dicom_node.operations.cli import app
from dicom_node.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CLI_COMMANDS = set(get_command(app).commands)  # type: ignore[attr-defined]


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.mark.parametrize(
    "name", ["single-host.env", "node-with-gpu-workers.env", "worker.env", "compose.env"]
)
def test_example_env_files_are_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in __import__("os").environ if k.startswith("CXR_")]:
        monkeypatch.delenv(key)
    values = env_file(DEPLOY / "examples" / name)
    assert values and all(k.startswith("CXR_") for k in values)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    known = {f"CXR_{field.upper()}" for field in Settings.model_fields}
    assert set(values) <= known, set(values) - known
    if "CXR_DESTINATIONS" in values:
        assert settings.destinations


def test_example_toml_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_CONFIG", str(DEPLOY / "examples" / "node.toml"))
    assert str(Settings().destinations[0]) == "PACS@pacs.hospital.local:104"


@pytest.mark.parametrize(
    "unit", sorted((DEPLOY / "systemd").glob("*.service")), ids=lambda p: p.name
)
def test_systemd_units_run_real_commands(unit: Path) -> None:
    text = unit.read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", text, re.M)
    assert exec_start is not None
    argv = exec_start[1].split()
    if argv[0].endswith("cxr-node"):
        assert argv[1] in CLI_COMMANDS
    verify = shutil.which("systemd-analyze")
    if verify:
        out = subprocess.run(
            [verify, "verify", "--man=no", str(unit)], capture_output=True, text=True
        )
        # Users and binaries of the target host do not exist here; syntax errors do show.
        bad = [
            line
            for line in out.stderr.splitlines()
            if ("Unknown" in line or "Invalid" in line or "bad" in line.lower())
            and "user" not in line.lower()
        ]
        assert bad == [], bad


def test_compose_file_refers_to_existing_files_and_commands() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "node", "worker", "worker-gpu"} <= set(services)
    for name, service in services.items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        command = service.get("command")
        if command and name != "redis":
            assert command[0] in CLI_COMMANDS, name
        for env in [service.get("env_file")] if service.get("env_file") else []:
            assert (DEPLOY / env).is_file()


@pytest.mark.parametrize(
    "dockerfile", sorted((DEPLOY / "docker").glob("Dockerfile*")), ids=lambda p: p.name
)
def test_dockerfiles_copy_existing_paths(dockerfile: Path) -> None:
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            sources = line.split()[1:-1]
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name}: {source} does not exist"
    cmd = re.search(r'^CMD \["([a-z-]+)"', dockerfile.read_text(), re.M)
    assert cmd is not None and cmd[1] in CLI_COMMANDS


def test_shell_scripts_parse() -> None:
    for script in [DEPLOY / "install.sh", DEPLOY / "install-system-deps.sh", REPO / ".ci" / "run"]:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_monitoring_files_use_the_metrics_the_node_exports() -> None:
    from dicom_node.records.metrics_store import COUNTERS

    exported = {f"cxr_{name}_total" for name in COUNTERS} | {
        "cxr_stage_seconds_bucket",
        "cxr_jobs",
        "cxr_queue_depth",
        "cxr_disk_free_bytes",
        "cxr_bundle_info",
    }
    prometheus = yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["cxr-alerts.yml"]
    rules = yaml.safe_load((DEPLOY / "monitoring" / "cxr-alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"\bcxr_[a-z_]+", expr)}
    assert used and used <= exported, used - exported
    promtool = shutil.which("promtool")
    if promtool:
        out = subprocess.run(
            [promtool, "check", "rules", str(DEPLOY / "monitoring" / "cxr-alerts.yml")],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout + out.stderr
