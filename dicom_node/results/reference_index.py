"""Retrieval on the node host: the k nearest items of the bundle's reference set (hnswlib)."""

from __future__ import annotations

import json

import hnswlib
import numpy as np

from dicom_node.results.labels import reference_label
from worker.bundle import Bundle
from worker.contracts import SimilarItem


class ReferenceIndex:
    def __init__(self, bundle: Bundle) -> None:
        spec = bundle.manifest.index
        self.k_default = spec.k
        self.index = hnswlib.Index(space=spec.space, dim=spec.dim)
        self.index.load_index(str(bundle.path(spec.index)), max_elements=spec.count)
        self.index.set_ef(max(spec.ef_search, spec.k))
        with bundle.path(spec.items).open(encoding="utf-8") as fh:
            self.items: list[dict[str, str]] = [json.loads(line) for line in fh if line.strip()]
        if len(self.items) != self.index.get_current_count():
            raise ValueError(
                f"index holds {self.index.get_current_count()} vectors but "
                f"{len(self.items)} item rows"
            )

    def query(self, embedding: list[float] | np.ndarray, k: int) -> list[SimilarItem]:
        k = min(k, len(self.items))
        if k <= 0:
            return []
        vector = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        labels, distances = self.index.knn_query(vector, k=k)
        return [
            SimilarItem(
                kind="reference",
                item_id=str(self.items[i]["id"]),
                label=reference_label(self.items[i].get("label"), self.items[i].get("finding")),
                source=self.items[i].get("source"),
                distance=float(d),
            )
            for i, d in zip(labels[0], distances[0], strict=True)
        ]
