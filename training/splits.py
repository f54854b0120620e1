"""Patient-level splits: train / validation / test, stratified by source and label, seeded.

Whole patient groups go to one set: a patient's follow-up images never appear in two sets.
Each group is stratified by its most common (source, label); within a stratum the groups are
shuffled and dealt to test, validation and train until each holds its share of the images.
Split 0 is the main split (the bundle is trained on it); splits 1..K-1 are further random
splits with other seeds, for confidence intervals.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from training.data import Record, stratum
from training.results import StageResult

SETS: tuple[str, str, str] = ("train", "val", "test")


class LeakageError(ValueError):
    """A patient group appears in two sets of one split."""


class Split(BaseModel):
    train: list[str]
    val: list[str]
    test: list[str]

    def ids(self, which: str) -> list[str]:
        if which not in SETS:
            raise KeyError(f"no set {which!r}; sets are {SETS}")
        ids: list[str] = getattr(self, which)
        return ids


class SplitPlan(BaseModel):
    seed: int
    val: float
    test: float
    splits: list[Split] = Field(min_length=1)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> SplitPlan:
        return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))


def _groups(records: Sequence[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.patient_group, []).append(r)
    return groups


def split_sha(split: Split) -> str:
    """Identifies a split: models record it, evaluation checks it."""
    payload = json.dumps(split.model_dump(), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


def check_trained_on(result: StageResult | Mapping[str, object], split: Split, what: str) -> None:
    """Refuse to evaluate a model on a split it was not trained for (its test set may be
    another split's training set)."""
    trained = result.split_sha if isinstance(result, StageResult) else result.get("split_sha")
    if trained != split_sha(split):
        raise LeakageError(
            f"{what} was trained on another split than the run's splits.json: retrain it"
        )


def make_split(records: Sequence[Record], val: float, test: float, seed: int) -> Split:
    """One seeded, stratified, patient-level split."""
    if not 0 < val + test < 1:
        raise ValueError(f"val {val} + test {test} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    groups = _groups(records)
    strata: dict[str, list[str]] = {}
    for g in sorted(groups):
        key = Counter(stratum(r) for r in groups[g]).most_common(1)[0][0]
        strata.setdefault(key, []).append(g)
    assignment: dict[str, str] = {}
    for key in sorted(strata):
        names = strata[key]
        order = [names[i] for i in rng.permutation(len(names))]
        total = sum(len(groups[g]) for g in names)
        targets = {"test": round(total * test), "val": round(total * val)}
        counts = {"test": 0, "val": 0}
        for g in order:
            which = "train"
            for candidate in ("test", "val"):
                if counts[candidate] < targets[candidate]:
                    which = candidate
                    break
            if which != "train":
                counts[which] += len(groups[g])
            assignment[g] = which
    sets: dict[str, list[str]] = {s: [] for s in SETS}
    for r in records:
        sets[assignment[r.patient_group]].append(r.id)
    split = Split(**sets)
    check_no_leakage(split, records)
    return split


def make_plan(records: Sequence[Record], val: float, test: float, k: int, seed: int) -> SplitPlan:
    """K seeded splits; split i uses seed + i."""
    return SplitPlan(
        seed=seed,
        val=val,
        test=test,
        splits=[make_split(records, val, test, seed + i) for i in range(k)],
    )


def check_no_leakage(split: Split, records: Sequence[Record]) -> None:
    """Every record in exactly one set; no patient group in two sets."""
    group_of = {r.id: r.patient_group for r in records}
    seen: dict[str, str] = {}
    for which in SETS:
        for rid in split.ids(which):
            if rid in seen:
                raise LeakageError(f"image {rid} is in both {seen[rid]} and {which}")
            seen[rid] = which
    if set(seen) != set(group_of):
        raise LeakageError(f"{len(set(group_of) ^ set(seen))} images not assigned exactly once")
    group_sets: dict[str, set[str]] = {}
    for rid, which in seen.items():
        group_sets.setdefault(group_of[rid], set()).add(which)
    leaking = {g: s for g, s in group_sets.items() if len(s) > 1}
    if leaking:
        g, s = next(iter(leaking.items()))
        raise LeakageError(f"{len(leaking)} patient groups in two sets, e.g. {g}: {sorted(s)}")


def describe(split: Split, records: Sequence[Record]) -> dict[str, dict[str, int]]:
    """Image counts per set and stratum (source/label)."""
    by_id = {r.id: r for r in records}
    return {
        which: dict(sorted(Counter(stratum(by_id[i]) for i in split.ids(which)).items()))
        for which in SETS
    }
