"""Strangers kept out: allow-lists, the secure default, DICOM TLS with DCMTK, limits, time-outs,
UIDs from the wire, and results only to configured destinations.

The SCP runs in the test's process (pynetdicom, a free port); the peers are DCMTK's echoscu and
storescu, pynetdicom where a crafted data set has to go out exactly as made.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ComputedRadiographyImageStorage
from pynetdicom import AE

from dicom_node import dimse_status
from dicom_node.jobs.steps import NodeRuntime, deliver
from dicom_node.receiving.checks import Verdict, check_instance
from dicom_node.receiving.scp import VERIFICATION
from dicom_node.receiving.security import (
    ExposureError,
    address_allowed,
    check_exposure,
    is_loopback,
    is_valid_uid,
    networks,
)
from dicom_node.records.ledger import DeliveryState, Job, JobState
from dicom_node.settings import Settings
from tests.conftest import PLUMBING_BUNDLE, Peer, free_port, node_env, require_tool, wait_for
from tests.peers import Scp

CR = ComputedRadiographyImageStorage


# --- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        (VERIFICATION, True),
        ("1.2.03.4", True),  # leading zero: not standard, common, harmless
        ("../../x", False),
        ("1.2.3/../../etc", False),
        ("1.2..3", False),
        ("1.2.3.", False),
        ("", False),
        ("1." * 40 + "1", False),  # over 64 characters
        ("1.2.3\x00", False),
    ],
)
def test_uid_validation(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_address_allow_list() -> None:
    allowed = networks(Settings(allowed_addresses="10.1.0.0/16, 127.0.0.1, ::1"))  # type: ignore[arg-type]
    assert address_allowed("10.1.2.3", allowed)
    assert address_allowed("127.0.0.1", allowed)
    assert address_allowed("::ffff:127.0.0.1", allowed)  # IPv4 seen through an IPv6 socket
    assert address_allowed("::1", allowed)
    assert not address_allowed("10.2.0.1", allowed)
    assert not address_allowed("127.0.0.2", allowed)
    assert not address_allowed("not-an-address", allowed)
    assert address_allowed("192.0.2.1", [])  # no list: anyone
    with pytest.raises(ValueError):
        Settings(allowed_addresses="10.0.0.0/33")  # type: ignore[arg-type]


def test_secure_default_refuses_an_open_node() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")
    with pytest.raises(ExposureError, match="CXR_ACCEPT_ANY_CALLER"):
        check_exposure(Settings(bind="0.0.0.0"))
    check_exposure(Settings(bind="127.0.0.1"))
    check_exposure(Settings(bind="0.0.0.0", allowed_calling_aes="PACS"))  # type: ignore[arg-type]
    check_exposure(Settings(bind="0.0.0.0", allowed_addresses="10.0.0.0/8"))  # type: ignore[arg-type]
    check_exposure(Settings(bind="0.0.0.0", accept_any_caller=True))


def test_tls_settings_must_be_complete(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        Settings(tls_cert=tmp_path / "a.pem")
    with pytest.raises(ValueError, match="tls_require_client_cert"):
        Settings(
            tls_cert=tmp_path / "a.pem", tls_key=tmp_path / "k.pem", tls_require_client_cert=True
        )


def test_serve_refuses_to_start_exposed(tmp_path: Path) -> None:
    env = node_env(tmp_path / "node", free_port(), bind="0.0.0.0")
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "refusing to start" in done.stdout and "CXR_ALLOWED_CALLING_AES" in done.stdout


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_crafted_uids_are_refused_by_the_check(chest_cr: Path) -> None:
    ds = dcmread(chest_cr)
    ds.SOPInstanceUID = "../../x"
    check = check_instance(ds, CR, 10**8)
    assert check.verdict is Verdict.REFUSE and check.status == dimse_status.INVALID_UID
    assert "SOPInstanceUID" in check.reason


# --- an SCP in this process -----------------------------------------------------------------


def echoscu(port: int, *args: str, calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    exe = require_tool("echoscu")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", "CXRNODE", *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def storescu(port: int, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu")
    return subprocess.run(
        [exe, "-aet", "MODALITY", "-aec", "CXRNODE", *args, "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_calling_ae_allow_list(scp: Callable[..., Scp]) -> None:
    node = scp(allowed_calling_aes="MODALITY,PACS")
    assert echoscu(node.port, calling="MODALITY").returncode == 0
    stranger = echoscu(node.port, calling="STRANGER")
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr


def audit_refusals(node: Scp) -> list[dict[str, object]]:
    """The audit log's connections refused before any association."""
    path = node.settings.audit_path
    lines = path.read_text().splitlines() if path.exists() else []
    return [
        line
        for line in map(json.loads, lines)
        if line["event"] == "association" and line["outcome"] == "refused"
    ]


@pytest.mark.integration
def test_source_address_allow_list(scp: Callable[..., Scp]) -> None:
    elsewhere = scp(allowed_addresses="192.0.2.0/24")
    refused = echoscu(elsewhere.port)
    assert refused.returncode != 0
    here = scp(allowed_addresses="127.0.0.0/8")
    assert echoscu(here.port).returncode == 0
    # the refused connection did not stop the first node from answering the next one
    assert echoscu(elsewhere.port).returncode != 0
    # refused before any association, and audited all the same (not only in the node log);
    # the server writes the line as it refuses, which the client may see first
    wait_for(lambda: len(audit_refusals(elsewhere)) >= 2, 10, "two refusals audited")
    refusals = audit_refusals(elsewhere)
    assert len(refusals) == 2
    assert {(r["address"], r["reason"]) for r in refusals} == {("127.0.0.1", "address not allowed")}
    assert audit_refusals(here) == refusals  # one data folder: the same file


@pytest.mark.integration
def test_max_associations(scp: Callable[..., Scp]) -> None:
    node = scp(max_associations=1)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION)
    held = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert held.is_established
    try:
        second = echoscu(node.port)
        assert second.returncode != 0
        assert "Local Limit Exceeded" in second.stdout + second.stderr
    finally:
        held.release()
    time.sleep(0.5)  # the node notices the release
    assert echoscu(node.port).returncode == 0


@pytest.mark.integration
def test_max_pdu_is_announced(scp: Callable[..., Scp]) -> None:
    node = scp(max_pdu_size=65536)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 65536
    assoc.release()


@pytest.mark.integration
def test_oversized_instance_refused_out_of_resources(
    scp: Callable[..., Scp], chest_cr: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over CXR_MAX_INSTANCE_MB: 0xA700; over twice that, the transfer is aborted while it
    arrives (the node does not hold it in memory)."""
    from tests.synthetic import synthetic_cr, write

    node = scp(max_instance_mb=1)
    over = write(synthetic_cr(size=900), tmp_path / "over.dcm")  # 1.6 MB of pixel data
    assert 1024 * 1024 < over.stat().st_size < 2 * 1024 * 1024
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CR)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    response = assoc.send_c_store(dcmread(over))
    assoc.release()
    assert response.Status == dimse_status.OUT_OF_RESOURCES

    assert chest_cr.stat().st_size > 3 * 1024 * 1024
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    response = assoc.send_c_store(dcmread(chest_cr))
    assert not response  # no status: the node aborted the association
    wait_for(lambda: not assoc.is_established, 30, "the association to end")
    assert "aborted: data set over 2097152 bytes" in caplog.text
    assert node.ledger.counts()["received"] == 0
    assert list(node.settings.spool_dir.iterdir()) == []
    assert echoscu(node.port).returncode == 0


@pytest.mark.integration
def test_idle_connection_is_closed(scp: Callable[..., Scp]) -> None:
    """A peer that connects and says nothing is dropped after the ACSE time-out, and an
    association left idle after the network time-out."""
    node = scp(acse_timeout_s=1, network_timeout_s=2)
    with socket.create_connection(("127.0.0.1", node.port), timeout=60) as silent:
        started = time.monotonic()
        assert silent.recv(1024) in (b"", b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        assert time.monotonic() - started < 50
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    deadline = time.monotonic() + 60
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not assoc.is_established  # the node ended the idle association
    assert echoscu(node.port).returncode == 0


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_crafted_sop_instance_uid_over_the_wire(
    scp: Callable[..., Scp], chest_cr: Path, tmp_path: Path
) -> None:
    node = scp()
    ds = dcmread(chest_cr)
    ds.SOPInstanceUID = "../../x"
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CR)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    response = assoc.send_c_store(ds)
    assoc.release()
    assert response.Status == dimse_status.INVALID_UID
    assert sum(node.ledger.counts().values()) == 0
    assert list(node.settings.spool_dir.iterdir()) == []
    everything = {p.name for p in tmp_path.rglob("*")}
    assert "x" not in everything and "x.dcm" not in everything
    assert echoscu(node.port).returncode == 0


# --- DICOM TLS ------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    node_cert: Path
    node_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    exe = require_tool("openssl")
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def _ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip


def _leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "otherca")
    common = (
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _leaf(folder, "node", "ca", common + "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
          "extendedKeyUsage=serverAuth\n")  # fmt: skip
    _leaf(folder, "client", "ca", common + "extendedKeyUsage=clientAuth\n")
    _leaf(folder, "stranger", "otherca", common + "extendedKeyUsage=clientAuth\n")
    return Pki(
        folder / "ca.crt",
        folder / "node.crt",
        folder / "node.key",
        folder / "client.crt",
        folder / "client.key",
        folder / "stranger.crt",
        folder / "stranger.key",
    )


@pytest.mark.integration
def test_tls_with_client_certificates(scp: Callable[..., Scp], pki: Pki, chest_cr: Path) -> None:
    node = scp(
        tls_cert=pki.node_cert,
        tls_key=pki.node_key,
        tls_ca=pki.ca,
        tls_require_client_cert=True,
    )
    client = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    ok = echoscu(node.port, *client)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # plaintext is refused, and so are a client without a certificate and one from another CA
    assert echoscu(node.port).returncode != 0
    assert echoscu(node.port, "+tla", "+cf", str(pki.ca)).returncode != 0
    stranger = ["+tls", str(pki.stranger_key), str(pki.stranger_cert), "+cf", str(pki.ca)]
    assert echoscu(node.port, *stranger).returncode != 0
    # a client that does not trust the node's certificate does not talk to it either
    assert echoscu(node.port, "+tls", str(pki.client_key), str(pki.client_cert)).returncode != 0

    # after all that, an instance still arrives over TLS
    sent = storescu(node.port, chest_cr, *client)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    sop = str(dcmread(chest_cr, stop_before_pixels=True).SOPInstanceUID)
    job = node.ledger.by_sop_instance(sop)
    assert job is not None and job.state is JobState.RECEIVED
    assert node.enqueued == [job.job_id]


@pytest.mark.integration
def test_tls_without_client_certificates(scp: Callable[..., Scp], pki: Pki) -> None:
    node = scp(tls_cert=pki.node_cert, tls_key=pki.node_key)
    assert echoscu(node.port, "+tla", "+cf", str(pki.ca)).returncode == 0
    assert echoscu(node.port).returncode != 0  # plaintext refused
    wait_for(lambda: len(audit_refusals(node)) >= 1, 10, "the refusal audited")
    (refusal,) = audit_refusals(node)
    assert refusal["reason"] == "TLS handshake failed" and refusal["address"] == "127.0.0.1"


@pytest.mark.integration
def test_silent_tls_client_does_not_block_others(scp: Callable[..., Scp], pki: Pki) -> None:
    node = scp(tls_cert=pki.node_cert, tls_key=pki.node_key, acse_timeout_s=2)
    with socket.create_connection(("127.0.0.1", node.port), timeout=60):
        # the handshake of the silent peer times out; then the next peer is served
        assert echoscu(node.port, "+tla", "+cf", str(pki.ca)).returncode == 0


# --- results go only to configured destinations ---------------------------------------------


@pytest.mark.integration
def test_results_only_to_configured_destinations(storescp: Peer, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "node",
        bundle=PLUMBING_BUNDLE,
        destinations="PACS@127.0.0.1:1",  # type: ignore[arg-type]
    )
    settings.make_dirs()
    node = NodeRuntime(settings)
    job = Job.received(
        "j1",
        sop_instance_uid="1.2.3.4",
        sop_class_uid=CR,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        calling_ae="MODALITY",
        spool_path=None,
    )
    node.ledger.add(job)
    node.ledger.set_state("j1", JobState.ANALYSED)
    node.result_path("j1").write_bytes(b"not sent anyway")
    # a queue message (or an old ledger row) naming a peer that is not configured
    node.ledger.add_deliveries("j1", [storescp.address])
    outcome = deliver(node, "j1", storescp.address)
    assert not outcome.delivered and outcome.retry_in is None
    (row,) = node.ledger.deliveries("j1")
    assert row.state is DeliveryState.FAILED
    assert "not a configured destination" in (row.last_error or "")
    assert storescp.received() == []


@pytest.mark.parametrize("name", ["single-host.env", "node-with-gpu-workers.env", "compose.env"])
def test_shipped_node_examples_pass_the_exposure_check(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_deploy import DEPLOY, env_file

    for key in [k for k in __import__("os").environ if k.startswith("CXR_")]:
        monkeypatch.delenv(key)
    for key, value in env_file(DEPLOY / "examples" / name).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.allowed_calling_aes  # the examples keep strangers out
    check_exposure(settings)


def test_defaults_start_out_of_the_box_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run` with no settings: listens on loopback, so the exposure check lets it start."""
    for name in ("CXR_BIND", "CXR_CONFIG", "CXR_ACCEPT_ANY_CALLER"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    assert defaults.bind == "127.0.0.1"
    check_exposure(defaults)
