"""A real Orthanc PACS for tests: its own config, storage and free ports in a temp folder.

`start_orthanc` runs Debian's /usr/sbin/Orthanc (`apt-get install orthanc`) with a JSON
config written for the test: HTTP and DICOM on free ports bound to localhost, storage and
index in the folder, no authentication, no plugins, and the DICOM peers it knows
(DicomModalities; more can be added while it runs with `add_modality`). The REST API is
spoken with urllib. The `orthanc` fixture (imported by conftest) starts one per test and
stops it afterwards; tests skip when Orthanc is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")


def orthanc_executable() -> str | None:
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((p for p in ORTHANC_CANDIDATES if os.access(p, os.X_OK)), None)


@dataclass
class Orthanc:
    """A running Orthanc: its ports, AE title, folder and REST helpers."""

    aet: str
    http_port: int
    dicom_port: int
    folder: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        """As the node's CXR_DESTINATIONS wants it."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    # --- REST ------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(req, timeout=60) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: object) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return json.loads(self.request("POST", path, body) or b"null")

    def put(self, path: str, payload: object) -> Any:
        return json.loads(self.request("PUT", path, json.dumps(payload).encode()) or b"null")

    # --- conveniences ----------------------------------------------------------------

    def upload(self, path: Path) -> str:
        """Store a DICOM file through REST; its Orthanc instance id."""
        return str(self.post("/instances", path.read_bytes())["ID"])

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def send_to_modality(self, name: str, instance_ids: list[str]) -> None:
        """C-STORE instances to a known modality (as a PACS forwarding rule would)."""
        self.post(f"/modalities/{name}/store", {"Resources": instance_ids, "Synchronous": True})

    def study_id(self, study_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_instance_uid.encode())
        ids = [f["ID"] for f in found if f.get("Type") == "Study"]
        return ids[0] if ids else None

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of the study with its simplified tags (empty if no such study)."""
        study = self.study_id(study_instance_uid)
        if study is None:
            return []
        return [
            {"ID": i["ID"], **self.get(f"/instances/{i['ID']}/simplified-tags")}
            for i in self.get(f"/studies/{study}/instances")
        ]

    def download(self, instance_id: str, target: Path) -> Path:
        target.write_bytes(self.request("GET", f"/instances/{instance_id}/file"))
        return target

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orthanc(
    folder: Path,
    http_port: int,
    dicom_port: int,
    modalities: dict[str, tuple[str, str, int]] | None = None,
    aet: str = "ORTHANC",
    timeout: float = 60.0,
) -> Orthanc:
    exe = orthanc_executable()
    if exe is None:
        pytest.skip("Orthanc is not installed (deploy/install-system-deps.sh installs it)")
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "cxr-node-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpDescribeErrors": True,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {
            name: [m_aet, host, port] for name, (m_aet, host, port) in (modalities or {}).items()
        },
        "DicomModalitiesInDatabase": False,
        "Plugins": [],
        "SaveJobs": False,
        "ConcurrentJobs": 2,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = (folder / "orthanc.log").open("wb")
    process = subprocess.Popen(
        [exe, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=folder
    )
    server = Orthanc(aet, http_port, dicom_port, folder, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"Orthanc exited: {server.log_path.read_text(errors='replace')}")
        try:
            server.get("/system")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    server.stop()
    raise AssertionError(f"Orthanc did not answer within {timeout:.0f} s")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    from tests.conftest import free_port

    server = start_orthanc(tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port())
    yield server
    server.stop()
