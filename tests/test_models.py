"""Model refresh: `cxr-node models install | list | rollback` and a switch under load.

A second bundle is the plumbing bundle with a new version and device UID written into its
manifest (the ONNX files and their checksums are unchanged; the manifest is the bundle's
identity and fingerprint)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.jobs.model_store import BundleCache, ModelStore, smoke_test
from dicom_node.records.ledger import JobState, Ledger
from dicom_node.results.sr.codes import COMPREHENSIVE_SR
from tests.conftest import PLUMBING_BUNDLE, NodeProcess, Peer, wait_for
from tests.sr_reading import sr_summary
from tests.test_e2e import of_class, storescu
from worker.bundle import BundleError, load_bundle
from worker.contracts import InferRequest, InferResult


def make_bundle(
    target: Path, version: str, device_uid: str | None = None, **changes: object
) -> Path:
    """A copy of the plumbing bundle with a new version and device UID (and `changes`)."""
    shutil.copytree(PLUMBING_BUNDLE, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(version=version, device_uid=device_uid or generate_uid(), **changes)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def plumbing_uid() -> str:
    return str(load_bundle(PLUMBING_BUNDLE).manifest.device_uid)


def test_install_switches_keeps_previous_and_rolls_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    smoked: list[str] = []
    new = make_bundle(tmp_path / "v2", "0.0.1-random")
    target = store.install(new, PLUMBING_BUNDLE, lambda b: smoked.append(b.manifest.version))
    assert smoked == ["0.0.1-random"]
    assert (store.root / "current").is_symlink()
    assert store.current == target.resolve()
    assert load_bundle(store.root / "current").manifest.version == "0.0.1-random"
    # the bundle in use before is kept, as previous
    assert store.previous is not None
    assert load_bundle(store.previous).manifest.device_uid == plumbing_uid()
    assert {i.bundle.manifest.version for i in store.installed()} == {
        "0.0.0-random",
        "0.0.1-random",
    }

    # a process following the link sees the switch at its next job, and still finds the
    # bundle a job was preprocessed for
    cache = BundleCache(lambda: store.root / "current", store)
    v2 = cache.current()
    assert v2.manifest.version == "0.0.1-random"
    old_fingerprint = load_bundle(PLUMBING_BUNDLE).fingerprint
    assert cache.by_fingerprint(old_fingerprint).manifest.device_uid == plumbing_uid()

    previous = store.previous
    assert store.rollback() == previous
    assert cache.current().manifest.device_uid == plumbing_uid()
    assert load_bundle(store.root / "previous").manifest.version == "0.0.1-random"
    assert cache.by_device_uid(v2.manifest.device_uid).fingerprint == v2.fingerprint


@pytest.mark.parametrize(
    ("why", "changes"),
    [
        ("class map", {"class_map": ["covid", "normal"]}),
        ("schema", {"schema_version": 2}),
    ],
)
def test_install_refuses_other_class_map_or_schema(
    tmp_path: Path, why: str, changes: dict[str, object]
) -> None:
    store = ModelStore(tmp_path / "models")
    bad = make_bundle(tmp_path / "bad", "9.9.9", None, **changes)
    with pytest.raises(BundleError, match=why):
        store.install(bad, PLUMBING_BUNDLE, lambda b: None)
    assert store.current is None and store.folders() == []


def test_install_refuses_bad_checksum_and_reused_device_uid(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    corrupt = make_bundle(tmp_path / "corrupt", "1.0.1")
    member = json.loads((corrupt / "manifest.json").read_text())["members"][0]["file"]
    with (corrupt / member).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="checksum"):
        store.install(corrupt, PLUMBING_BUNDLE, lambda b: None)
    same_uid = make_bundle(tmp_path / "same", "1.0.2", device_uid=plumbing_uid())
    with pytest.raises(BundleError, match="device UID"):
        store.install(same_uid, PLUMBING_BUNDLE, lambda b: None)
    assert store.current is None


def test_smoke_inference_runs_the_bundle() -> None:
    outcome = smoke_test(load_bundle(PLUMBING_BUNDLE), onnx_threads=1)
    assert 0.0 <= outcome["probability"] <= 1.0
    assert outcome["similar"] >= 1


def test_cli_refuses_without_touching_the_current_bundle(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(CXR_DATA_DIR=str(tmp_path / "data"), CXR_BUNDLE=str(PLUMBING_BUNDLE))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicom_node", "models", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    bad = make_bundle(tmp_path / "bad", "9.9.9", class_map=["covid", "normal"])
    refused = cli("install", str(bad))
    assert refused.returncode == 1 and "refused" in refused.stdout
    good = make_bundle(tmp_path / "good", "0.0.2-random")
    done = cli("install", str(good))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke inference" in done.stdout
    listed = cli("list")
    assert "0.0.2-random" in listed.stdout and "current" in listed.stdout
    assert cli("rollback").returncode == 0
    assert load_bundle(tmp_path / "data" / "models" / "current").manifest.version == "0.0.0-random"


def _copies(source: Path, folder: Path, n: int, tag: str) -> list[Path]:
    paths = []
    for i in range(n):
        ds = dcmread(source)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{tag}{i}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def _device_by_source(pacs: Peer) -> dict[str, str | None]:
    found = {}
    for path in of_class(pacs.received(), COMPREHENSIVE_SR):
        summary = sr_summary(dcmread(path))
        found[summary["referenced_sop_instance_uids"][0]] = summary["device_uid"]
    return found


def _uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.integration
@pytest.mark.slow
def test_new_bundle_installed_while_jobs_run_loses_none(
    start_node: Callable[..., NodeProcess],
    storescp: Peer,
    chest_cr: Path,
    tmp_path: Path,
) -> None:
    old_uid = plumbing_uid()
    new_uid = generate_uid()
    v2 = make_bundle(tmp_path / "v2", "0.0.1-random", device_uid=new_uid)
    node = start_node(destinations=storescp.address, produce_sc="false")
    ledger = Ledger(node.data_dir / "ledger.sqlite3")

    before = _copies(chest_cr, tmp_path, 4, "before")
    assert storescu(node, before) == 0
    # the first job is preprocessed for the old bundle before the switch
    wait_for(
        lambda: (
            (job := ledger.by_sop_instance(_uid(before[0]))) is not None
            and job.state is not JobState.RECEIVED
        ),
        120,
        "the first job under way",
    )
    installed = node.cli("models", "install", str(v2))
    assert installed.returncode == 0, installed.stdout + installed.stderr

    after = _copies(chest_cr, tmp_path, 3, "after")
    assert storescu(node, after) == 0
    wait_for(lambda: len(_device_by_source(storescp)) == 7, 300, "7 SRs")
    devices = _device_by_source(storescp)
    assert set(devices) == {_uid(p) for p in before + after}  # none lost, none twice
    assert devices[_uid(before[0])] == old_uid  # finished with the bundle it started on
    assert {devices[_uid(p)] for p in before} <= {old_uid, new_uid}
    assert {devices[_uid(p)] for p in after} == {new_uid}  # later SRs: the new model
    wait_for(lambda: ledger.counts()["delivered"] == 7, 60, "all delivered")
    assert ledger.counts()["failed"] == 0

    assert node.cli("models", "rollback").returncode == 0
    (again,) = _copies(chest_cr, tmp_path, 1, "rolledback")
    assert storescu(node, [again]) == 0
    wait_for(lambda: len(_device_by_source(storescp)) == 8, 240, "the 8th SR")
    assert _device_by_source(storescp)[_uid(again)] == old_uid


def test_a_job_started_before_a_switch_finishes_on_its_bundle(
    tmp_path: Path, chest_cr: Path
) -> None:
    """Deterministic version of the race: prepare on the old bundle, switch, then infer and
    finalize as the worker and the node do (bundle looked up by fingerprint / device UID)."""
    from dicom_node.jobs import steps
    from tests.test_pipeline import make_node, receive
    from worker.inference import get_ensemble, run_infer

    node = make_node(tmp_path, hospital_k=0)
    started = receive(node, chest_cr, "PAT1")
    request = steps.prepare(node, started)  # preprocessed for the plumbing bundle
    assert isinstance(request, InferRequest)

    new_uid = generate_uid()
    v2 = make_bundle(tmp_path / "v2", "0.0.1-random", device_uid=new_uid)
    ModelStore(node.settings.models_dir).install(v2, node.settings.bundle_in_use, lambda b: None)
    assert node.bundles.current().manifest.device_uid == new_uid  # the node sees the switch at once

    def work(job_request: InferRequest) -> str:
        # what the infer task does, then finalize on the node; the SR's device UID
        bundle = node.bundles.by_fingerprint(job_request.bundle_fingerprint)
        bundle, ensemble = get_ensemble(bundle.root, 1)
        result = run_infer(job_request, ensemble, bundle)
        assert isinstance(result, InferResult)
        steps.finalize(node, result)
        sr = dcmread(node.result_path(result.job_id))
        return str(sr_summary(sr)["device_uid"])

    assert work(request) == plumbing_uid()  # finished on the bundle it started on
    later = receive(node, chest_cr, "PAT2")
    later_request = steps.prepare(node, later)
    assert isinstance(later_request, InferRequest)
    assert later_request.bundle_fingerprint != request.bundle_fingerprint
    assert work(later_request) == new_uid  # new jobs: the new model
    assert node.ledger.counts()["analysed"] == 2
