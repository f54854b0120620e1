"""How the label of a similar image reads in the SR and on the summary image.

The bundle's reference set (`index.jsonl`) labels each item with its class: "covid" or
"negative". "negative" is the model's negative class, which holds both images without a
finding and other pneumonias (worker/classes.py); shown as "negative" a reader takes it for
"no disease". So the label is named as it is: an item that says which of the two it is (an
optional `finding` field with the pool's own label: "covid", "other_pneumonia", or
"negative" for no pneumonia) is shown as that, and a bare "negative" says that it may be
either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from dicom_node.results.sr.codes import DIAGNOSIS_TEXT
from worker.contracts import SimilarItem

#: The reference label, as the SR's "Label" and the summary image show it.
REFERENCE_LABEL_TEXT = {
    "covid": "COVID-19",
    "other_pneumonia": "no COVID-19: other pneumonia",
    "no_finding": "no finding",
    "negative": "no COVID-19 (no finding or other pneumonia)",
}

#: A reference item's optional `finding` (the public pool's label column) -> its label.
_FINDING_LABEL = {
    "covid": "covid",
    "other_pneumonia": "other_pneumonia",
    "negative": "no_finding",  # the pool's "negative": COVID-negative without pneumonia
    "no_finding": "no_finding",
}


def reference_label(label: str | None, finding: str | None = None) -> str | None:
    """The most precise label a reference-set row gives: its finding when it has a known
    one, else its class label."""
    precise = _FINDING_LABEL.get((finding or "").strip().lower())
    return precise or label


def reference_label_text(label: str) -> str:
    """How a reference label reads; an unknown one as it is."""
    return REFERENCE_LABEL_TEXT.get(label, label)


def similar_cases_line(
    items: Sequence[SimilarItem], show_reference: bool, show_hospital: bool
) -> str | None:
    """The summary image's line on the similar cases, their labels counted in order:
    "similar cases: 2 COVID-19, 1 no COVID-19: other pneumonia"; None when no label may be
    shown. Hospital studies count with their confirmed diagnosis only."""
    texts: list[str] = []
    for item in items:
        if not item.label:
            continue
        if item.kind == "hospital":
            if show_hospital:
                texts.append(DIAGNOSIS_TEXT.get(item.label, item.label))
        elif show_reference:
            texts.append(reference_label_text(item.label))
    if not texts:
        return None
    counts = Counter(texts)
    return "similar cases: " + ", ".join(f"{n} {text}" for text, n in counts.items())
