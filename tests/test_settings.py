from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.settings import Destination, Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("CXR_AE_TITLE", "CXR_PORT", "CXR_BROKER_URL", "CXR_DESTINATIONS", "CXR_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert (s.ae_title, s.port, s.embedded, s.destinations) == ("CXRNODE", 11112, True, [])


def test_env_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DESTINATIONS", "PACS@10.0.0.5:104, VIEW@viewer:11112")
    monkeypatch.setenv("CXR_ALLOWED_CALLING_AES", "CR01,DX02")
    monkeypatch.setenv("CXR_BROKER_URL", "redis://127.0.0.1:6379/0")
    s = Settings()
    assert s.destinations == [
        Destination(ae_title="PACS", host="10.0.0.5", port=104),
        Destination(ae_title="VIEW", host="viewer", port=11112),
    ]
    assert s.allowed_calling_aes == ["CR01", "DX02"]
    assert not s.embedded


def test_bad_destination_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DESTINATIONS", "PACS-at-host")
    with pytest.raises(ValueError, match="AE@host:port"):
        Settings()


def test_toml_file_and_env_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('ae_title = "FROMTOML"\nport = 4104\ndestinations = "P@h:1"\n')
    monkeypatch.setenv("CXR_CONFIG", str(config))
    monkeypatch.setenv("CXR_PORT", "5104")
    monkeypatch.delenv("CXR_AE_TITLE", raising=False)
    s = Settings()
    assert (s.ae_title, s.port) == ("FROMTOML", 5104)
    assert [str(d) for d in s.destinations] == ["P@h:1"]


def test_result_objects_and_hospital_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("CXR_PRODUCE_SC", "CXR_PRODUCE_SEG", "CXR_HOSPITAL_FIELDS", "CXR_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert (s.produce_sc, s.produce_seg, s.hospital_index) == (True, False, True)
    assert s.hospital_fields == ["date", "score", "label", "distance"]
    monkeypatch.setenv("CXR_HOSPITAL_FIELDS", "label, distance")
    monkeypatch.setenv("CXR_PRODUCE_SEG", "true")
    s = Settings()
    assert s.hospital_fields == ["label", "distance"] and s.produce_seg
    monkeypatch.setenv("CXR_HOSPITAL_FIELDS", "")
    assert Settings().hospital_fields == []  # UIDs only
    monkeypatch.setenv("CXR_HOSPITAL_FIELDS", "date,patient_name")
    with pytest.raises(ValueError, match="patient_name"):
        Settings()
