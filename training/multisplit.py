"""`cxr-train multisplit`: one member trained and tested on several patient-level splits.

The same-source contrast (ieee8023 COVID-19 vs ieee8023 other pneumonia: the only one where
the image's source says nothing about its label) has a few dozen test images per split; one
split's bootstrap CI cannot tell a real gain from the luck of that split. Here the member is
trained on each of N seeded patient-level splits (`training.splits.make_plan`, the run's own
seed, so the run's splits are the first ones and their trained members are reused), and its
same-source test AUC is reported per split, with the mean and a t-interval over the splits.

Writes `<workdir>/report/multisplit-<member>.json`; the run's splits.json is left as it is.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from training.cache import Cache
from training.classify import member_run, read_predictions, train_member
from training.data import same_source_rows
from training.metrics import roc_auc
from training.pipeline import Context
from training.splits import SplitPlan, make_plan, split_sha
from training.torchutil import write_json

log = logging.getLogger(__name__)

Json = dict[str, Any]
CONFIDENCE = 0.95


def splits_for(ctx: Context, cache: Cache, n: int) -> SplitPlan:
    """N seeded splits; the first ones are the run's (same seed, same records)."""
    cfg = ctx.cfg
    plan = make_plan(cache.records, cfg.splits.val, cfg.splits.test, n, cfg.seed)
    if ctx.paths.splits.is_file():
        saved = SplitPlan.load(ctx.paths.splits)
        for k, (a, b) in enumerate(zip(saved.splits, plan.splits, strict=False)):
            if split_sha(a) != split_sha(b):
                raise ValueError(
                    f"split {k} of {ctx.paths.splits} is not the one the config makes now "
                    "(another seed or other records): use a new workdir"
                )
    return plan


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Json:
    """Mean, sample SD and the t-interval of the mean over splits (NaN ones left out), for
    values in [0, 1] such as AUCs."""
    v = np.array([x for x in values if np.isfinite(x)], dtype=np.float64)
    out: Json = {"n": len(v), "mean": float(v.mean()) if len(v) else float("nan")}
    if len(v) < 2:
        return {**out, "sd": float("nan"), "ci": [float("nan"), float("nan")]}
    from scipy import stats

    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1)) * sd / math.sqrt(len(v))
    low, high = out["mean"] - half, out["mean"] + half
    # AUCs live in [0, 1]: the interval is clipped to it.
    return {**out, "sd": sd, "ci": [max(low, 0.0), min(high, 1.0)], "level": confidence}


def split_scores(cache: Cache, plan: SplitPlan, k: int, folder: Any) -> Json:
    """One split's test AUCs: all test images, and the same-source contrast."""
    split = plan.splits[k]
    rows = cache.rows(split.test)
    y = cache.labels[rows]
    prob = read_predictions(folder, split.test).probability
    same = same_source_rows(cache.records, rows)
    ys = y[same]
    return {
        "split": k,
        "test_images": len(rows),
        "same_source_images": int(same.sum()),
        "same_source_positives": int(ys.sum()),
        "auc": roc_auc(y, prob) if len(np.unique(y)) == 2 else float("nan"),
        "same_source_auc": roc_auc(ys, prob[same]) if len(np.unique(ys)) == 2 else float("nan"),
    }


def run_multisplit(ctx: Context, cache: Cache, lungs: np.ndarray, member: str, n: int) -> Json:
    """Train `member` on each of `n` splits (reusing finished ones) and summarise."""
    if n < 2:
        raise ValueError("multisplit needs at least 2 splits")
    plan = splits_for(ctx, cache, n)
    device = ctx.device()
    per_split: list[Json] = []
    for k in range(n):
        run = member_run(ctx.cfg, member, k, checkpoint_base=ctx.base)
        folder = ctx.paths.member(k, member)
        result = train_member(
            run,
            ctx.cfg,
            cache,
            lungs,
            plan.splits[k],
            folder,
            device,
            ctx.resume,
            features_dir=ctx.paths.features,
        )
        scores = split_scores(cache, plan, k, folder)
        scores["best_epoch"] = result.get("best_epoch")
        per_split.append(scores)
        log.info(
            "%s split %d: same-source AUC %.3f (%d images), all test AUC %.3f",
            member,
            k,
            scores["same_source_auc"],
            scores["same_source_images"],
            scores["auc"],
        )
    out: Json = {
        "member": member,
        "splits": n,
        "seed": ctx.cfg.seed,
        "contrast": "sources holding both classes (pool: ieee8023 COVID-19 vs other pneumonia)",
        "per_split": per_split,
        "same_source_auc": mean_interval([s["same_source_auc"] for s in per_split]),
        "auc": mean_interval([s["auc"] for s in per_split]),
        "interval": "t-interval of the mean over splits",
    }
    write_json(ctx.paths.report / f"multisplit-{member}.json", out)
    return out
