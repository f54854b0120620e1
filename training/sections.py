"""The report's sections as JSON-able dicts, computed from scored sets (numpy; no torch).

Every interval is a 95% percentile bootstrap resampling patient groups, pooled over the K
splits whose ensembles are trained (metrics.estimates).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from training import plots
from training.analysis import fit_logistic, knn_vote, project_2d
from training.data import Record, mixed_sources, stratum
from training.metrics import (
    METRICS,
    Estimate,
    SplitScores,
    binary_metrics,
    confusion,
    estimate_one,
    estimates,
    roc_auc,
)
from training.results import (
    Breakdown,
    Case,
    Cases,
    Curves,
    DataSection,
    DayBin,
    Days,
    Embeddings,
    EstimateJson,
    Estimates,
    GroupSections,
    Headline,
    MaskScores,
    MemberResult,
    MemberSection,
    Retrieval,
    SameSource,
    SegmentationResult,
    SegmentationSection,
    SplitCounts,
)
from training.scored import ScoredSet
from training.splits import Split
from worker.classes import CLASS_MAP


def _est(e: dict[str, Estimate]) -> Estimates:
    return {name: e[name].as_dict() for name in e}


def _subset_estimates(
    tests: Sequence[ScoredSet],
    keep: Callable[[ScoredSet], np.ndarray],
    samples: int,
    seed: int,
    member: str | None = None,
) -> tuple[Estimates, int, int, int]:
    """Estimates on the rows `keep` selects in every split; (estimates, test images and
    positives summed over the splits, splits)."""
    parts: list[SplitScores] = []
    n = pos = 0
    for t in tests:
        sel = keep(t)
        if not sel.any():
            continue
        sub = t.subset(sel)
        parts.append(sub.split_scores(member))
        n += len(sub)
        pos += int(sub.y.sum())
    if not parts:
        return {}, 0, 0, 0
    return _est(estimates(parts, samples, seed)), n, pos, len(parts)


def section_data(
    records: Sequence[Record],
    splits: Sequence[Split],
    info: Mapping[str, object],
    licence_text: str,
) -> DataSection:
    """The data and splits; `info`: the cache's (csv, load summary, skipped images, limit)."""
    by_id = {r.id: r for r in records}

    def strata(ids: Sequence[str]) -> dict[str, int]:
        return dict(sorted(Counter(stratum(by_id[i]) for i in ids).items()))

    def groups(ids: Sequence[str]) -> int:
        return len({by_id[i].patient_group for i in ids})

    counts: list[SplitCounts] = [
        {
            "split": k,
            "train": strata(split.train),
            "train_groups": groups(split.train),
            "val": strata(split.val),
            "val_groups": groups(split.val),
            "test": strata(split.test),
            "test_groups": groups(split.test),
        }
        for k, split in enumerate(splits)
    ]
    train = [by_id[i] for i in splits[0].train]
    licences = Counter(f"{r.source}: {r.license or 'not stated'}" for r in train)
    return {
        "images": len(records),
        "patient_groups": len({r.patient_group for r in records}),
        "strata": dict(sorted(Counter(stratum(r) for r in records).items())),
        "mixed_sources": mixed_sources(records),
        "splits": counts,
        "train_licences": dict(licences.most_common()),
        "licence_terms": licence_text,
        "csv": info.get("csv"),
        "load_summary": info.get("load_summary"),
        "skipped": info.get("skipped"),
        "limit": info.get("limit"),
    }


def section_headline(tests: Sequence[ScoredSet], samples: int, seed: int) -> Headline:
    parts = [t.split_scores() for t in tests]
    split0 = binary_metrics(tests[0].y, tests[0].score, tests[0].threshold)
    return {
        "estimates": _est(estimates(parts, samples, seed)),
        "split0": split0,
        "thresholds": [t.threshold for t in tests],
        "splits_used": [t.split for t in tests],
        "test_images_split0": len(tests[0]),
    }


def section_same_source(
    tests: Sequence[ScoredSet], mixed: Sequence[str], samples: int, seed: int
) -> SameSource:
    if not mixed:
        return {"sources": [], "note": "no source holds both classes: no same-source contrast"}
    est, n, pos, used = _subset_estimates(
        tests, lambda t: np.isin(t.sources, list(mixed)), samples, seed
    )
    labels = Counter(r.label_text for r in tests[0].records if r.source in set(mixed))
    return {
        "sources": list(mixed),
        "estimates": est,
        "n": n,
        "positives": pos,
        "splits_used": used,
        "labels_split0": dict(labels),
    }


def section_members(
    tests: Sequence[ScoredSet], member_results: dict[str, MemberResult], samples: int, seed: int
) -> dict[str, MemberSection]:
    out: dict[str, MemberSection] = {}
    for name in tests[0].members:
        parts = [t.split_scores(name) for t in tests]
        res = member_results.get(name)
        run = res.run if res else None
        out[name] = {
            "test": _est(estimates(parts, samples, seed)),
            "validation": res.validation if res else {},
            "selected_on": res.selected_on if res else None,
            "best_epoch": res.best_epoch if res else None,
            "architecture": run.architecture if run else None,
            "input_size": run.input_size if run else None,
            "lung_crop": run.lung_crop if run else None,
            "lung_mask": run.lung_mask if run else None,
            "parameters": res.parameters if res else None,
        }
    return out


def section_curves(test: ScoredSet, out_dir: Path, with_plots: bool) -> Curves:
    y, score = test.y, test.score
    counts = confusion(y, score >= test.threshold)
    figures: dict[str, str] = {}
    if with_plots:
        curves = {f"ensemble (AUC {roc_auc(y, score):.3f})": (y, score)}
        for name, s in test.members.items():
            curves[f"{name} (AUC {roc_auc(y, s):.3f})"] = (y, s)
        figures["roc"] = plots.roc(curves, out_dir / "roc.png").name
        figures["pr"] = plots.pr(curves, out_dir / "pr.png").name
        figures["confusion"] = plots.confusion(counts, CLASS_MAP, out_dir / "confusion.png").name
        figures["histogram"] = plots.score_histogram(
            y, score, test.threshold, out_dir / "score_histogram.png"
        ).name
    tn, fp, fn, tp = counts
    return {
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "threshold": test.threshold,
        "figures": figures,
    }


def section_embeddings(
    train: ScoredSet,
    test: ScoredSet,
    out_dir: Path,
    seed: int,
    use_tsne: bool,
    max_points: int,
    with_plots: bool,
) -> Embeddings:
    rng = np.random.default_rng(seed)
    emb = np.vstack([train.embedding, test.embedding])
    labels = [f"{r.label.label}" for r in [*train.records, *test.records]]
    sources = [r.source for r in [*train.records, *test.records]]
    sets = ["train"] * len(train) + ["test"] * len(test)
    if len(emb) > max_points:
        keep = np.sort(rng.choice(len(emb), max_points, replace=False))
        emb = emb[keep]
        labels = [labels[i] for i in keep]
        sources = [sources[i] for i in keep]
        sets = [sets[i] for i in keep]
    points, method = project_2d(emb, seed, use_tsne)
    figures: dict[str, str] = {}
    if with_plots:
        title = f"{method} of {len(emb)} embeddings (train + test, split 0)"
        figures["by_label"] = plots.scatter(
            points, labels, f"{title}: label", out_dir / "tsne_label.png"
        ).name
        figures["by_source"] = plots.scatter(
            points, sources, f"{title}: source", out_dir / "tsne_source.png"
        ).name
    return {"method": method, "points": len(emb), "figures": figures, "sets": dict(Counter(sets))}


def section_retrieval(
    reference: ScoredSet, query: ScoredSet, k: int, samples: int, seed: int
) -> Retrieval:
    """kNN-k on the embedding member: reference = training set, query = test set."""
    result = knn_vote(query.embedding, query.y, reference.embedding, reference.y, k)
    y = query.y
    metrics = {
        "accuracy": lambda idx: float(np.mean(result.predicted[idx] == y[idx])),
        "sensitivity": lambda idx: (
            float(np.mean(result.predicted[idx][y[idx] == 1] == 1))
            if (y[idx] == 1).any()
            else float("nan")
        ),
        "specificity": lambda idx: (
            float(np.mean(result.predicted[idx][y[idx] == 0] == 0))
            if (y[idx] == 0).any()
            else float("nan")
        ),
        "vote_auc": lambda idx: roc_auc(y[idx], result.vote[idx]),
    }
    est = {
        name: estimate_one(fn, len(y), query.groups, samples, seed).as_dict()
        for name, fn in metrics.items()
    }
    same = result.neighbour_same
    nd = result.neighbour_distance
    return {
        "k": k,
        "reference": len(reference),
        "queries": len(query),
        "estimates": est,
        "neighbours_same_label": float(same.mean()),
        "distance_within_class": result.within,
        "distance_across_classes": result.across,
        "neighbour_distance_same_label": float(nd[same].mean()) if same.any() else None,
        "neighbour_distance_other_label": float(nd[~same].mean()) if (~same).any() else None,
        "space": "cosine (1 - cosine similarity), as the bundle index",
    }


def age_band(age: float | None, bands: Sequence[int]) -> str:
    if age is None:
        return "unknown"
    edges = sorted(bands)
    if age < edges[0]:
        return f"<{edges[0]}"
    for lo, hi in itertools.pairwise(edges):
        if lo <= age < hi:
            return f"{lo}-{hi - 1}"
    return f"{edges[-1]}+"


def _breakdown(
    tests: Sequence[ScoredSet],
    key: Callable[[Record], str],
    samples: int,
    seed: int,
    order: Sequence[str] = (),
) -> dict[str, Breakdown]:
    found = {key(r) for t in tests for r in t.records}
    values = [v for v in order if v in found] + sorted(found - set(order))
    out: dict[str, Breakdown] = {}
    for value in values:

        def keep(t: ScoredSet, v: str = value) -> np.ndarray:
            return np.array([key(r) == v for r in t.records], dtype=bool)

        est, n, pos, used = _subset_estimates(tests, keep, samples, seed)
        out[value] = {"n": n, "positives": pos, "splits_used": used, "estimates": est}
    return out


def age_bands(bands: Sequence[int]) -> list[str]:
    """The band names in order, e.g. <40, 40-59, 60-79, 80+, unknown."""
    edges = sorted(bands)
    names = [f"<{edges[0]}"] + [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(edges)]
    return [*names, f"{edges[-1]}+", "unknown"]


def section_groups(
    tests: Sequence[ScoredSet], bands: Sequence[int], samples: int, seed: int
) -> GroupSections:
    return {
        "per_source": _breakdown(tests, lambda r: r.source, samples, seed),
        "per_subgroup": {
            "sex": _breakdown(tests, lambda r: r.sex or "unknown", samples, seed),
            "age band": _breakdown(
                tests, lambda r: age_band(r.age, bands), samples, seed, age_bands(bands)
            ),
            "view": _breakdown(tests, lambda r: r.view or "unknown", samples, seed),
        },
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation, ties given their average rank; NaN when undefined."""
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


DAY_BINS: tuple[tuple[float, float, str], ...] = (
    (-np.inf, 0, "before admission (<0)"),
    (0, 4, "0-3"),
    (4, 8, "4-7"),
    (8, 15, "8-14"),
    (15, np.inf, "15+"),
)


def section_days(tests: Sequence[ScoredSet], out_dir: Path, with_plots: bool) -> Days:
    """Out-of-sample scores (mean over the splits where the image was in test) vs days."""
    scores: dict[str, list[float]] = {}
    rec: dict[str, Record] = {}
    for t in tests:
        for r, s in zip(t.records, t.score, strict=True):
            if r.days_offset is not None:
                scores.setdefault(r.id, []).append(float(s))
                rec[r.id] = r
    if not scores:
        return {"n": 0, "note": "no test image has days since admission"}
    ids = sorted(scores)
    days = np.array([rec[i].days_offset for i in ids], dtype=np.float64)
    score = np.array([np.mean(scores[i]) for i in ids])
    labels = np.array([int(rec[i].label) for i in ids])
    bins: list[DayBin] = []
    for lo, hi, name in DAY_BINS:
        sel = (days >= lo) & (days < hi)
        bins.append(
            {
                "days": name,
                "n": int(sel.sum()),
                "covid": int(labels[sel].sum()),
                "mean_score": float(score[sel].mean()) if sel.any() else None,
            }
        )
    pos = labels == 1
    figures = {}
    if with_plots:
        figures["days"] = plots.days(days, score, labels, out_dir / "score_vs_days.png").name
    return {
        "n": len(ids),
        "bins": bins,
        "spearman_covid": _spearman(days[pos], score[pos]),
        "figures": figures,
    }


def section_segmentation(
    masks: MaskScores | None, unet: SegmentationResult | None, samples: int, seed: int
) -> SegmentationSection:
    """Dice and IoU on held-out `masks`; `unet` (the training result) describes the model."""
    if masks is None:
        return {"note": "no segmentation result"}
    dice, iou = np.array(masks.dice), np.array(masks.iou)
    out: SegmentationSection = {
        "architecture": unet.architecture if unet else None,
        "parameters": unet.parameters if unet else None,
        "input_size": unet.input_size if unet else None,
        "train_masks": unet.train_masks if unet else None,
        "val_masks": unet.val_masks if unet else None,
        "val_dice": unet.val_dice if unet else None,
        "test_masks": len(dice),
    }
    if len(dice):
        groups = np.array(masks.groups)
        out["dice"] = estimate_one(
            lambda idx: float(dice[idx].mean()), len(dice), groups, samples, seed
        ).as_dict()
        out["iou"] = estimate_one(
            lambda idx: float(iou[idx].mean()), len(iou), groups, samples, seed
        ).as_dict()
        sources = np.array(masks.sources)
        out["per_source"] = {
            s: {
                "n": int((sources == s).sum()),
                "dice": float(dice[sources == s].mean()),
                "iou": float(iou[sources == s].mean()),
            }
            for s in sorted(set(sources.tolist()))
        }
    else:
        out["note"] = "no held-out test image has a lung mask"
    return out


def auc_estimate(
    y: np.ndarray, score: np.ndarray, groups: np.ndarray, samples: int, seed: int
) -> EstimateJson:
    return estimate_one(
        lambda idx: roc_auc(y[idx], score[idx]), len(y), groups, samples, seed
    ).as_dict()


def paired_auc_difference(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray, samples: int, seed: int
) -> EstimateJson:
    """AUC(a) - AUC(b) on the same bootstrap resamples."""
    return estimate_one(
        lambda idx: roc_auc(y[idx], a[idx]) - roc_auc(y[idx], b[idx]), len(y), groups, samples, seed
    ).as_dict()


def probe_auc(
    train_x: np.ndarray,
    train_target: np.ndarray,
    test_x: np.ndarray,
    test_target: np.ndarray,
    groups: np.ndarray,
    samples: int,
    seed: int,
) -> EstimateJson | None:
    """AUC of a logistic regression predicting a binary target (None when undefined)."""
    if len(np.unique(train_target)) < 2 or len(np.unique(test_target)) < 2:
        return None
    model = fit_logistic(train_x, train_target)
    return auc_estimate(test_target, model.predict_proba(test_x)[:, 1], groups, samples, seed)


def source_probes(
    train_x: np.ndarray,
    train_sources: np.ndarray,
    test_x: np.ndarray,
    test_sources: np.ndarray,
    groups: np.ndarray,
    samples: int,
    seed: int,
) -> dict[str, EstimateJson]:
    """One-vs-rest source AUC for every source present in both sets."""
    out: dict[str, EstimateJson] = {}
    for source in sorted(set(test_sources.tolist()) & set(train_sources.tolist())):
        est = probe_auc(
            train_x,
            (train_sources == source).astype(int),
            test_x,
            (test_sources == source).astype(int),
            groups,
            samples,
            seed,
        )
        if est is not None:
            out[source] = est
    return out


METRIC_NAMES: tuple[str, ...] = METRICS


def section_cases(test: ScoredSet, n: int = 5) -> Cases:
    """Test images to look at: the most confident calls of each class and the worst errors
    (split 0, PyTorch scores). Dataset ids, sources and scores only."""
    y, score = test.y, test.score

    def rows(keep: np.ndarray, highest: bool) -> list[Case]:
        idx = np.flatnonzero(keep)
        order = idx[np.argsort(-score[idx] if highest else score[idx], kind="stable")][:n]
        return [
            {"id": test.records[i].id, "source": test.records[i].source, "score": float(score[i])}
            for i in order
        ]

    positive = y == 1
    negative_below = ~positive & (score < test.threshold)
    return {
        "threshold": test.threshold,
        "confident_positive": rows(positive & (score >= test.threshold), highest=True),
        "confident_negative": rows(negative_below, highest=False),
        "false_positive": rows(~positive & (score >= test.threshold), highest=True),
        "false_negative": rows(positive & (score < test.threshold), highest=False),
    }
