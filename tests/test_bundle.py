"""The committed plumbing bundle loads, and load_bundle refuses altered copies of it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from worker.bundle import MANIFEST_NAME, SCHEMA_VERSION, BundleError, load_bundle
from worker.classes import CLASS_MAP

PLUMBING = Path(__file__).parent / "data" / "plumbing-bundle"


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(PLUMBING, target)
    return target


def _edit_manifest(root: Path, **changes: object) -> None:
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def test_plumbing_bundle_loads() -> None:
    bundle = load_bundle(PLUMBING)
    manifest = bundle.manifest
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.class_map == CLASS_MAP
    assert manifest.random_weights is True
    assert (manifest.name, manifest.version) == ("plumbing", "0.0.0-random")
    assert len(manifest.members) >= 2
    assert manifest.embedding_member in bundle.member_by_name
    member = bundle.member_by_name[manifest.embedding_member]
    assert manifest.index.dim == member.embedding_dim == 256
    assert bundle.fingerprint == hashlib.sha256((PLUMBING / MANIFEST_NAME).read_bytes()).hexdigest()


def test_plumbing_bundle_says_its_scores_mean_nothing() -> None:
    card = (PLUMBING / "model_card.md").read_text(encoding="utf-8")
    assert "RANDOM WEIGHTS" in card
    assert "mean nothing" in card


def test_plumbing_bundle_is_small() -> None:
    total = sum(p.stat().st_size for p in PLUMBING.iterdir())
    assert total < 8_000_000, f"committed plumbing bundle grew to {total / 1e6:.1f} MB"


def test_reference_items_hold_only_id_label_source() -> None:
    manifest = load_bundle(PLUMBING).manifest
    rows = [
        json.loads(line)
        for line in (PLUMBING / manifest.index.items.file).read_text(encoding="utf-8").splitlines()
    ]
    assert len(rows) == manifest.index.count
    for row in rows:
        assert set(row) == {"id", "label", "source"}
        assert row["label"] in CLASS_MAP


def test_one_changed_byte_in_a_member_is_refused(bundle_copy: Path) -> None:
    member = load_bundle(bundle_copy).manifest.members[0].file
    path = bundle_copy / member
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"checksum mismatch for {member}"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "segmentation.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing bundle file segmentation\.onnx"):
        load_bundle(bundle_copy)


def test_reversed_class_map_is_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, class_map=list(reversed(CLASS_MAP)))
    with pytest.raises(BundleError, match="class map"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, None])
def test_wrong_schema_version_is_refused(bundle_copy: Path, version: int | None) -> None:
    _edit_manifest(bundle_copy, schema_version=version)
    with pytest.raises(BundleError, match="schema version"):
        load_bundle(bundle_copy)


def test_unknown_embedding_member_is_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, embedding_member="resnet9000")
    with pytest.raises(BundleError, match="embedding member"):
        load_bundle(bundle_copy)
