"""The explicit, ordered class map shared by training, the bundle and the report."""

from __future__ import annotations

from enum import IntEnum


class CxrClass(IntEnum):
    """Output index of the 2-class classifier head. The order is the contract: never reorder."""

    NEGATIVE = 0  # no COVID-19: normal or other pneumonia
    COVID19 = 1

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {CxrClass.NEGATIVE: "negative", CxrClass.COVID19: "covid"}

#: What a bundle's manifest must declare, index by index.
CLASS_MAP: list[str] = [c.label for c in CxrClass]
POSITIVE_CLASS = CxrClass.COVID19

#: SNOMED CT concept of the finding reported in the SR.
# Code meaning: the SNOMED CT synonym, since the FSN is longer than a DICOM Code Meaning (64).
COVID19_SNOMED = ("840539006", "SCT", "COVID-19")
