"""How the node names itself and the received image in every object it writes (SR, SC, SEG)."""

from __future__ import annotations

import copy

import highdicom as hd
from pydicom import Dataset, config
from pydicom.sr.codedict import codes
from pydicom.valuerep import validate_value

from worker.bundle import Manifest

#: The Manufacturer this node writes into its results (SR, summary SC, SEG). A PACS that
#: routes every new image of a study to the node sends the summary SC back: it is a chest
#: "Secondary Capture" like any other, and analysing it would loop (receiving.checks).
OWN_MANUFACTURER = "cxr-node"

_TYPE2_EVIDENCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def model_equipment(
    manifest: Manifest, manufacturer: str, institution: str | None, contribution: str
) -> hd.ContributingEquipment:
    """Contributing Equipment naming the model bundle (its device UID changes with every
    version), shared by the SR, the summary SC and the SEG."""
    equipment = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=manifest.name,
        software_versions=manifest.version,
        institution_name=institution,
        contribution_description=contribution,
    )
    equipment.DeviceUID = manifest.device_uid
    return equipment


def evidence_header(source: Dataset) -> Dataset:
    """A copy of the source header that highdicom can take as evidence.

    Tolerant reading: type 2 patient/study attributes a modality left out are added empty,
    so the SR carries them empty (valid) rather than failing.
    """
    missing = [
        k
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not source.get(k)
    ]
    if missing:
        raise ValueError(f"source header lacks {', '.join(missing)}")
    header = copy.deepcopy(source)
    _drop_invalid_values(header)
    for keyword in _TYPE2_EVIDENCE:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _drop_invalid_values(header: Dataset) -> None:
    """Strict writing: a value the source got wrong (e.g. Patient's Age "68" instead of
    "068Y") is not copied into the SR; UIDs are kept as sent, since they identify the source."""
    for element in list(header):
        if element.VR in ("SQ", "UI", "OB", "OW", "UN") or element.value in (None, ""):
            continue
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                validate_value(element.VR, value, config.RAISE)
        except (ValueError, TypeError):
            del header[element.tag]
