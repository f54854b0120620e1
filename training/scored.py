"""Scored evaluation sets: the ensemble's out-of-sample scores of one split's images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.cache import Cache
from training.classify import read_predictions
from training.config import ExperimentConfig
from training.data import Record
from training.layout import RunPaths
from training.metrics import SplitScores, youden_threshold
from training.results import StageResult
from training.splits import SplitPlan, check_trained_on


@dataclass
class ScoredSet:
    """One split's images with labels, the ensemble score (mean of members) and embeddings."""

    split: int
    records: list[Record]
    score: np.ndarray
    members: dict[str, np.ndarray]
    embedding: np.ndarray
    threshold: float = 0.5
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def y(self) -> np.ndarray:
        return np.array([int(r.label) for r in self.records], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([r.patient_group for r in self.records])

    @property
    def sources(self) -> np.ndarray:
        return np.array([r.source for r in self.records])

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, keep: np.ndarray) -> ScoredSet:
        keep = np.asarray(keep, dtype=bool)
        return ScoredSet(
            split=self.split,
            records=[r for r, k in zip(self.records, keep, strict=True) if k],
            score=self.score[keep],
            members={n: s[keep] for n, s in self.members.items()},
            embedding=self.embedding[keep],
            threshold=self.threshold,
            rows=self.rows[keep] if len(self.rows) else self.rows,
        )

    def split_scores(self, member: str | None = None) -> SplitScores:
        score = self.score if member is None else self.members[member]
        return SplitScores(self.y, score, self.groups, self.threshold)


def members_done(paths: RunPaths, split: int, names: Sequence[str]) -> bool:
    return all((paths.member(split, n) / "result.json").is_file() for n in names)


def scored_from_predictions(
    folders: dict[str, Path],
    cache: Cache,
    ids: list[str],
    split: int,
    embedding_member: str,
) -> ScoredSet:
    """Mean of the members' stored scores for `ids`."""
    members = {n: read_predictions(f, ids) for n, f in folders.items()}
    score = np.mean(np.stack([p.probability for p in members.values()]), axis=0)
    rows = cache.rows(ids)
    return ScoredSet(
        split=split,
        records=[cache.records[r] for r in rows],
        score=score,
        members={n: p.probability for n, p in members.items()},
        embedding=members[embedding_member].embedding,
        rows=rows,
    )


def choose_threshold(cfg: ExperimentConfig, val: ScoredSet) -> float:
    """The decision threshold, from validation only: Youden's J or the fixed value."""
    if cfg.evaluation.threshold == "fixed" or len(np.unique(val.y)) < 2:
        return cfg.evaluation.fixed_threshold
    return youden_threshold(val.y, val.score, fallback=cfg.evaluation.fixed_threshold)


@dataclass
class RunSets:
    """Per available split: validation and test sets; split 0's training set (the reference)."""

    tests: list[ScoredSet]
    vals: list[ScoredSet]
    train0: ScoredSet
    missing_splits: list[int]


def run_sets(cfg: ExperimentConfig, paths: RunPaths, cache: Cache, plan: SplitPlan) -> RunSets:
    names = [m.name for m in cfg.members]
    tests: list[ScoredSet] = []
    vals: list[ScoredSet] = []
    missing: list[int] = []
    train0: ScoredSet | None = None
    for k, split in enumerate(plan.splits):
        if not members_done(paths, k, names):
            if k == 0:
                raise FileNotFoundError(
                    f"split 0 members are not all trained in {paths.root} (run `cxr-train "
                    "classifier` for each member, or `cxr-train all`)"
                )
            missing.append(k)
            continue
        folders = {n: paths.member(k, n) for n in names}
        for n, folder in folders.items():
            check_trained_on(StageResult.read(folder), split, f"member {n} (split {k})")
        val = scored_from_predictions(folders, cache, split.val, k, cfg.embedding_member)
        test = scored_from_predictions(folders, cache, split.test, k, cfg.embedding_member)
        val.threshold = test.threshold = choose_threshold(cfg, val)
        vals.append(val)
        tests.append(test)
        if k == 0:
            train0 = scored_from_predictions(folders, cache, split.train, k, cfg.embedding_member)
            train0.threshold = val.threshold
    assert train0 is not None
    return RunSets(tests, vals, train0, missing)
