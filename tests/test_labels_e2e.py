"""Confirmed diagnoses end to end, with real DCMTK storescu in and storescp out: a labelled set
goes in, `cxr-node label --csv` loads the diagnoses, the status page and /metrics show the
agreement figures that scikit-learn computes here independently, `cxr-node export-dataset`
writes a dataset without patient identifiers, `cxr-train calibrate` makes a new bundle
version from it, `cxr-node models install` takes it, and the node then reports with the new
threshold (and tests its recent scores for drift against the calibration set's).

The images: pydicom-data's chest CR (RG1_UNCI), each a different crop, flip and contrast of
it at 320 px (so each gets its own score), with header edits making 12 studies of 8
patients, plus a lateral view in the first study; the plumbing bundle (random weights: the
figures mean nothing, they only have to be right).
"""

from __future__ import annotations

import csv
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from dicom_node.records.keys import keyed_hash
from dicom_node.records.ledger import JobState, Ledger
from tests.conftest import PLUMBING_BUNDLE, REPO, NodeProcess, Peer, free_port, wait_for
from tests.sr_reading import sr_summary
from tests.test_e2e import of_class, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.train]

metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")

STUDIES = 12
PATIENTS = 8
BOOTSTRAP = 300
COVID = {0, 2, 3, 5, 8, 10}  # the studies confirmed positive; the others negative


def phi(n: int) -> dict[str, str]:
    """Distinctive identifiers of patient n: none may reach the dataset or a log line."""
    return {
        "PatientName": f"Zyqoxwelt^Marguerite{chr(65 + n)}",
        "PatientID": f"PHI44719{n:02d}",
        "OtherPatientIDs": f"OPID83{n:03d}",
        "PatientBirthDate": f"1931041{n % 10}",
    }


def variant(pixels: np.ndarray, n: int) -> np.ndarray:
    """Image n: its own crop, flip and contrast of the chest CR, 320 x 300 pixels."""
    rng = np.random.default_rng(n)
    h, w = pixels.shape
    dy, dx = rng.integers(0, 300, 2)
    crop = pixels[dy : dy + h - 300, dx : dx + w - 300].astype(np.float64)
    if n % 2:
        crop = crop[:, ::-1]
    top = float(crop.max())
    crop = top * (crop / top) ** (0.6 + 0.08 * n)
    small = cv2.resize(crop, (300, 320), interpolation=cv2.INTER_AREA)
    return np.clip(small, 0, 2**15 - 1).astype(np.uint16)


def instance(
    source: Dataset, pixels: np.ndarray, patient: int, study: str, accession: str, view: str
) -> Dataset:
    ds = source.copy()
    for keyword, value in phi(patient).items():
        setattr(ds, keyword, value)
    ds.AccessionNumber = accession
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ViewPosition = view
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return ds


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        body: bytes = response.read()
    return body.decode()


def gauges(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def expected_interval(pos: np.ndarray, neg: np.ndarray, resamples: int) -> tuple[float, float]:
    """The documented bootstrap (dicom_node.learning.agreement), AUCs from scikit-learn."""
    pos, neg = np.sort(pos), np.sort(neg)  # each class in score order, as documented
    rng = np.random.default_rng(0)
    aucs = []
    for _ in range(resamples):
        p = pos[rng.integers(0, len(pos), len(pos))]
        q = neg[rng.integers(0, len(neg), len(neg))]
        aucs.append(metrics.roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(q))], np.r_[p, q]))
    low, high = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(high)


def test_labels_measure_the_model_and_recalibrate_it(
    start_node: Callable[..., NodeProcess], storescp: Peer, chest_cr: Path, tmp_path: Path
) -> None:
    source = dcmread(chest_cr)
    pixels = source.pixel_array
    studies = [generate_uid() for _ in range(STUDIES)]
    accessions = [f"ACX9{n:05d}" for n in range(STUDIES)]
    files, sops = [], []
    for n, study in enumerate(studies):
        ds = instance(source, variant(pixels, n), n % PATIENTS, study, accessions[n], "PA")
        files.append(tmp_path / f"s{n:02d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
        sops.append(str(ds.SOPInstanceUID))
    lateral = instance(source, variant(pixels, 99), 0, studies[0], accessions[0], "LL")
    files.append(tmp_path / "lateral.dcm")
    lateral.save_as(files[-1], enforce_file_format=True)

    http = free_port()
    node = start_node(
        destinations=storescp.address,
        bundle=str(PLUMBING_BUNDLE),
        http_port=str(http),
        agreement_bootstrap=str(BOOTSTRAP),
        drift_min_scores="5",
        produce_sc="false",
    )
    assert storescu(node, files) == 0
    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    wait_for(
        lambda: ledger.counts()["delivered"] == STUDIES and ledger.counts()["rejected"] == 1,
        120,
        "12 analysed and delivered, the lateral view rejected",
    )
    outputs: list[str] = []  # everything the commands print: no identifier may be in it

    # --- diagnoses in bulk: by accession number or Study Instance UID, lab words allowed
    labels = tmp_path / "lab-export.csv"
    rows = [["AccessionNumber", "Study Instance UID", "Diagnosis"]]
    for n in range(STUDIES):
        word = ("positive" if n % 3 else "covid") if n in COVID else "negative"
        rows.append([accessions[n], "", word] if n % 2 else ["", studies[n], word])
    rows += [["", generate_uid(), "covid"], ["ACX999999", "", "negative"], [accessions[1], "", "?"]]
    with labels.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    done = node.cli("label", "--csv", str(labels))
    outputs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "15 rows: 12 studies labelled" in done.stdout, done.stdout
    assert "2 of a study the node has not received: lines 14-15" in done.stdout, done.stdout
    assert "that is not covid, negative or none: line 16" in done.stdout, done.stdout

    # --- the figures, computed here with scikit-learn from the ledger's scores
    score = {}
    for sop, study in zip(sops, studies, strict=True):
        job = ledger.by_sop_instance(sop)
        assert job is not None and job.probability is not None
        score[study] = job.probability
    s = np.array([score[u] for u in studies])
    y = np.array([n in COVID for n in range(STUDIES)])
    threshold = 0.5  # the plumbing bundle's
    tn, _, _, tp = metrics.confusion_matrix(y, s >= threshold, labels=[False, True]).ravel()
    auc = metrics.roc_auc_score(y, s)
    low, high = expected_interval(s[y], s[~y], BOOTSTRAP)
    page = get(f"http://127.0.0.1:{http}/")
    assert f"{tp / 6:.4f} ({tp}/6)" in page and f"{tn / 6:.4f} ({tn}/6)" in page, page
    assert f"{auc:.4f} ({low:.4f}-{high:.4f})" in page, page
    assert "no reference distribution in the bundle" in page  # the plumbing bundle has none
    scraped = gauges(get(f"http://127.0.0.1:{http}/metrics"))
    plumbing = (("bundle", "plumbing 0.0.0-random"),)

    def gauge(name: str, labels: tuple[tuple[str, str], ...], **extra: str) -> float:
        for (metric, found), value in scraped.items():
            if metric == name and set(labels) | set(extra.items()) <= set(found):
                return value
        raise AssertionError(f"no {name} {labels} {extra}")

    assert gauge("cxr_agreement_studies", plumbing, diagnosis="covid") == 6
    assert gauge("cxr_agreement_sensitivity", plumbing) == pytest.approx(tp / 6)
    assert gauge("cxr_agreement_specificity", plumbing) == pytest.approx(tn / 6)
    assert gauge("cxr_agreement_roc_auc", plumbing, bound="value") == pytest.approx(auc)
    assert gauge("cxr_agreement_roc_auc", plumbing, bound="low") == pytest.approx(low)
    assert gauge("cxr_agreement_roc_auc", plumbing, bound="high") == pytest.approx(high)
    status = node.cli("status")
    outputs += [status.stdout, status.stderr]
    assert f"{auc:.4f} ({low:.4f}-{high:.4f})" in status.stdout, status.stdout

    # --- the dataset: cxr-train reads it as it is; no identifier in it
    export = tmp_path / "export"
    done = node.cli("export-dataset", str(export))
    outputs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12 images of 8 patient groups exported (6 covid, 6 negative)" in done.stdout
    assert "skipped 1: not analysed: lateral view" in done.stdout, done.stdout
    table = list(csv.DictReader((export / "metadata.csv").open()))
    key = (node.data_dir / "keys" / "export.key").read_bytes()
    by_id = {row["id"]: row for row in table}
    group_of = {}
    for n, sop in enumerate(sops):
        row = by_id["i" + keyed_hash(key, "instance", sop)[:20]]
        assert row["label"] == ("covid" if n in COVID else "negative")
        assert float(row["node_score"]) == pytest.approx(s[n], abs=1e-6)
        group_of[n] = row["patient_group"]
    assert all(group_of[n] == group_of[n % PATIENTS] for n in range(STUDIES))
    assert len(set(group_of.values())) == PATIENTS
    exported = [(export / "metadata.csv").read_bytes()]
    exported += [p.read_bytes() for p in (export / "images").iterdir()]
    identifiers = [v for p in range(PATIENTS) for v in phi(p).values()] + accessions
    identifiers.append("Zyqoxwelt")
    for blob in exported:  # nor the hospital's UIDs: the images have new ones
        for value in [*identifiers, *studies, *sops]:
            assert value.encode() not in blob, value

    # --- recalibration: a threshold for sensitivity >= 0.8, as a new bundle version
    calibrated, scores_csv = tmp_path / "calibrated", tmp_path / "scores.csv"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "training.cli", "calibrate", str(PLUMBING_BUNDLE), str(export)),
            *("--sensitivity", "0.8", "--out", str(calibrated), "--scores", str(scores_csv)),
            *("--bootstrap", "200"),
        ],
        env=node.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    outputs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stdout + done.stderr
    rescored = {r["id"]: float(r["score"]) for r in csv.DictReader(scores_csv.open())}
    for image_id, row in by_id.items():  # the export kept the pixels: the same scores
        assert rescored[image_id] == pytest.approx(float(row["node_score"]), abs=1e-5)
    positives = np.sort(s[y])[::-1]
    new_threshold = float(positives[4])  # 5 of the 6 positives at or above it
    from worker.bundle import load_bundle

    manifest = load_bundle(calibrated).manifest
    assert manifest.threshold == pytest.approx(new_threshold, abs=1e-6)
    assert manifest.calibration is not None and manifest.calibration.images == STUDIES
    assert manifest.reference_scores is not None and len(manifest.reference_scores.scores) == 12
    assert "## Calibration on export" in (calibrated / "model_card.md").read_text()
    done = node.cli("models", "install", str(calibrated))
    outputs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stdout + done.stderr

    # --- the node reports with the new threshold, and tests drift against the new reference
    later = []
    for n in range(5):
        ds = instance(source, variant(pixels, 20 + n), 20 + n, generate_uid(), "", "PA")
        later.append(tmp_path / f"later{n}.dcm")
        ds.save_as(later[-1], enforce_file_format=True)
    assert storescu(node, later) == 0
    wait_for(lambda: ledger.counts()["delivered"] == STUDIES + 5, 120, "5 more delivered")
    later_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in later}
    recent = []
    for path in of_class(storescp.received(), ComprehensiveSRStorage):
        sr = dcmread(path)
        summary = sr_summary(sr)
        (uid,) = summary["referenced_sop_instance_uids"]
        if uid not in later_uids:
            continue
        assert summary["device_uid"] == manifest.device_uid
        p = summary["probability"]
        assert p is not None and summary["finding_present"] == (p >= manifest.threshold - 5e-5)
        assert f"decision threshold={manifest.threshold:g}" in str(sr.to_json_dict())
        job = ledger.by_sop_instance(uid)
        assert job is not None and job.state is JobState.DELIVERED
        recent.append(job.probability)
    assert len(recent) == 5
    d = stats.ks_2samp(recent, manifest.reference_scores.scores).statistic
    p_value = stats.kstwobign.sf(np.sqrt(5 * 12 / 17) * d)
    new = (("device_uid", manifest.device_uid),)
    scraped = gauges(get(f"http://127.0.0.1:{http}/metrics"))
    assert gauge("cxr_drift_ks_statistic", new) == pytest.approx(d)
    assert gauge("cxr_drift_p_value", new) == pytest.approx(p_value, abs=1e-9)
    assert gauge("cxr_drift_warning", new) == float(p_value < 0.01)
    assert f"{d:.4f}" in get(f"http://127.0.0.1:{http}/")

    stores = [node.data_dir / "ledger.sqlite3", node.data_dir / "hospital" / "hospital.sqlite3"]
    for path in stores:  # the accession numbers are known by their keyed hashes only
        for suffix in ("", "-wal"):
            if Path(f"{path}{suffix}").is_file():
                blob = Path(f"{path}{suffix}").read_bytes()
                assert not any(a.encode() in blob for a in accessions), path
    logs = node.logs() + "".join(outputs)  # UIDs may be logged (README); identifiers not
    for value in identifiers:
        assert value not in logs, value
