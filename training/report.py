"""report.md from report.json (and export.json once the bundle is exported).

Rendering only: every number comes from the JSON, so the Markdown and the machine-readable
report never disagree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.results import (
    Breakdown,
    Cases,
    EstimateJson,
    EvaluationReport,
    ExportResult,
    Headline,
    SameSource,
)
from training.separation import separation_lines
from worker.markdown import markdown_table

REPORT_MD = "report.md"
EXPORT_JSON = "export.json"
METRIC_LABELS = {
    "accuracy": "accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC",
}

#: Headings of report.md, in order; the smoke test checks that each one is present.
SECTIONS: tuple[str, ...] = (
    "Data and splits",
    "Headline metrics",
    "Same-source contrast",
    "Ensemble members",
    "ROC, PR, confusion matrix, score histogram",
    "Embeddings (t-SNE)",
    "kNN retrieval",
    "Per source",
    "Per subgroup",
    "Score vs days since admission",
    "Test cases to look at",
    "Lung segmentation",
    "Ablation",
    "Shortcut audit",
    "Export",
    "Known limits",
)


def ci(e: EstimateJson | None, digits: int = 3) -> str:
    """ "value (low-high)" from an Estimate dict; "n/a" when undefined."""
    if not e or e.get("value") is None:
        return "n/a"
    text = f"{e['value']:.{digits}f}"
    if e.get("low") is not None and e.get("high") is not None:
        text += f" ({e['low']:.{digits}f}-{e['high']:.{digits}f})"
    return text


def member_input_text(m: Mapping[str, Any]) -> str:
    """A member's input for the tables: its size, and the lung crop and mask when it has them."""
    crop, mask = m.get("lung_crop"), m.get("lung_mask")
    text = f"{m.get('input_size')}"
    if crop is not None:
        text += f", lung box +{float(crop):.0%} per side"
    if mask is not None:
        text += f", lungs only (+{float(mask):.0%} of the side)"
    return text


def _cases_lines(cases: Cases) -> list[str]:
    titles = (
        (cases["confident_positive"], "most confident COVID-19 calls"),
        (cases["confident_negative"], "most confident negative calls"),
        (cases["false_positive"], "worst false positives"),
        (cases["false_negative"], "worst false negatives"),
    )
    out = [
        "## Test cases to look at",
        "",
        f"Split-0 test images (PyTorch ensemble scores, threshold {_num(cases['threshold'])}), by"
        " dataset id: the calls to trust least are the errors; open them before trusting the"
        " model. `tests/test_default_bundle.py` takes its clear cases from the first two"
        " lists.",
        "",
        *markdown_table(
            ("list", "id", "source", "score"),
            [
                (title, c["id"], c["source"], _num(c["score"]))
                for listed, title in titles
                for c in listed
            ],
        ),
    ]
    return [*out, ""]


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if 0 < abs(v) < 10 ** -(digits - 1) else f"{v:.{digits}f}"
    return str(v)


def _sci(v: Any) -> str:
    return "n/a" if v is None else f"{v:.1e}"


def _metric_rows(
    rows: Mapping[str, Breakdown | Headline | SameSource], prefix_cols: tuple[str, ...] = ()
) -> list[str]:
    header = ["", *prefix_cols, *METRIC_LABELS.values()]
    return markdown_table(
        header,
        [
            [
                key,
                *(row.get(c, "") for c in prefix_cols),
                *(ci(row.get("estimates", {}).get(m)) for m in METRIC_LABELS),
            ]
            for key, row in rows.items()
        ],
    )


def _figure(name: str | None, alt: str) -> list[str]:
    return [f"![{alt}]({name})", ""] if name else []


def _ci_source(headline: Headline) -> str:
    est = next(iter(headline["estimates"].values()))
    return (
        f"95% CIs: percentile bootstrap over patient groups, {est['samples']} samples x "
        f"{est['splits']} split(s) (splits {headline['splits_used']})."
    )


def render(report: EvaluationReport, export: ExportResult | None) -> str:
    r = report
    out: list[str] = [
        f"# Evaluation report: {r['name']} {r['version']} ({r['kind']})",
        "",
        "Research use only; not for diagnostic use. Numbers on the public pool are not clinical"
        " performance.",
        "",
    ]
    # -- data
    d = r["data"]
    out += ["## Data and splits", ""]
    if r["kind"] == "internal":
        out += [
            f"{d['images']} images, {d['patient_groups']} patient groups, from `{d.get('csv')}`"
            f" ({d.get('load_summary')}).",
            "",
            *markdown_table(("stratum", "images"), list(d["strata"].items())),
            "",
            *markdown_table(
                ("split", "train", "val", "test", "groups (train/val/test)"),
                [
                    [
                        s["split"],
                        *(
                            ", ".join(f"{k} {v}" for k, v in s[w].items())
                            for w in ("train", "val", "test")
                        ),
                        f"{s['train_groups']}/{s['val_groups']}/{s['test_groups']}",
                    ]
                    for s in d["splits"]
                ],
            ),
        ]
        out += ["", "Patient groups never cross sets (checked for every split)."]
        if r.get("splits_missing"):
            out.append(f"Splits without trained ensembles (left out of CIs): {r['splits_missing']}")
    else:
        out += [f"External CSV `{d.get('csv')}`: {d['images']} images. {d.get('note', '')}"]
    th = r["threshold"]
    out += [
        "",
        f"Decision threshold {th['value']:.3f} ({th['method']}, chosen on {th['chosen_on']}).",
        "",
    ]

    # -- headline
    h = r["headline"]
    out += [
        "## Headline metrics",
        "",
        f"Ensemble (mean of member probabilities), test set. {_ci_source(h)}",
        "",
        *_metric_rows({"ensemble": h}),
        "",
    ]
    # -- same source
    ss = r["same_source"]
    out += ["## Same-source contrast", ""]
    if ss.get("sources"):
        auc = ss["estimates"].get("roc_auc")
        out += [
            f"**Same-source ROC AUC ({', '.join(ss['sources'])}: "
            f"{', '.join(f'{k} {v}' for k, v in ss.get('labels_split0', {}).items())}): "
            f"{ci(auc)}**",
            "",
            "The only contrast where source cannot explain the score: both classes come from the"
            " same source.",
            "",
            *_metric_rows({"same source": ss}),
            "",
        ]
    else:
        out += [ss.get("note", "n/a"), ""]
    # -- members
    members = []
    for name, m in r["members"].items():
        members.append(
            (
                name,
                m.get("architecture"),
                member_input_text(m),
                f"{m['parameters']:,}" if m.get("parameters") else "n/a",
                m.get("selected_on"),
                m.get("best_epoch"),
                ", ".join(f"{k} {_num(v)}" for k, v in m.get("validation", {}).items()),
                ci(m["test"].get("roc_auc")),
                ci(m["test"].get("pr_auc")),
            )
        )
    out += [
        "## Ensemble members",
        "",
        *markdown_table(
            (
                "member",
                "architecture",
                "input",
                "parameters",
                "selected on",
                "best epoch",
                "validation",
                "test ROC AUC",
                "test PR AUC",
            ),
            members,
        ),
        "",
    ]
    # -- curves
    c = r["curves"]
    cm = c["confusion"]
    out += [
        "## ROC, PR, confusion matrix, score histogram",
        "",
        f"Split 0 test set, threshold {c['threshold']:.3f}: TN {cm['tn']}, FP {cm['fp']}, "
        f"FN {cm['fn']}, TP {cm['tp']}.",
        "",
    ]
    figs = c.get("figures", {})
    for key, alt in (
        ("roc", "ROC"),
        ("pr", "PR"),
        ("confusion", "confusion matrix"),
        ("histogram", "score histogram"),
    ):
        out += _figure(figs.get(key), alt)
    if not figs:
        out += ["(figures skipped: matplotlib is not installed)", ""]
    # -- embeddings
    e = r["embeddings"]
    out += [
        "## Embeddings (t-SNE)",
        "",
        f"{e['method']} of {e['points']} embeddings of the embedding member ({e['sets']}),"
        " coloured by label and by source. Clusters by source rather than label are a warning"
        " sign of shortcut learning.",
        "",
        *_figure(e["figures"].get("by_label"), "embeddings by label"),
        *_figure(e["figures"].get("by_source"), "embeddings by source"),
    ]
    # -- retrieval
    k = r["retrieval"]
    est = k["estimates"]
    out += [
        "## kNN retrieval",
        "",
        f"k = {k['k']}, reference = split-0 training set ({k['reference']} images), query ="
        f" test set ({k['queries']} images), {k['space']}. Vote = majority label of the k"
        " neighbours (ties: the nearest one).",
        "",
        *markdown_table(
            ("vote accuracy", "vote sensitivity", "vote specificity", "vote-fraction AUC"),
            [[ci(est[m]) for m in ("accuracy", "sensitivity", "specificity", "vote_auc")]],
        ),
        "",
        f"Neighbours sharing the query's label: {k['neighbours_same_label']:.3f}. Mean distance"
        f" within class {_num(k['distance_within_class'])}, across classes"
        f" {_num(k['distance_across_classes'])} (all query-reference pairs); to the k neighbours:"
        f" same label {_num(k['neighbour_distance_same_label'])}, other label"
        f" {_num(k['neighbour_distance_other_label'])}.",
        "",
        *separation_lines(r.get("retrieval_separation")),
        "",
    ]
    # -- per source / subgroup
    out += [
        "## Per source",
        "",
        "n and positives: test images summed over the splits; metrics"
        " pooled over splits. An AUC needs both classes: n/a where a source holds one.",
        "",
    ]
    out += _metric_rows(r["per_source"], ("n", "positives"))
    out += ["", "## Per subgroup", ""]
    for group, rows in r["per_subgroup"].items():
        out += [f"### {group}", "", *_metric_rows(rows, ("n", "positives")), ""]
    # -- days
    dy = r["days"]
    out += ["## Score vs days since admission", ""]
    if dy.get("n"):
        out += [
            f"{dy['n']} test images with days since admission or symptom onset (out-of-sample"
            f" scores, averaged over the splits that held each image in test). Spearman"
            f" correlation of score and days among COVID-19 images: {_num(dy['spearman_covid'])}.",
            "",
            *markdown_table(
                ("days", "images", "covid", "mean score"),
                [(b["days"], b["n"], b["covid"], _num(b["mean_score"])) for b in dy["bins"]],
            ),
            "",
            *_figure(dy.get("figures", {}).get("days"), "score vs days"),
        ]
    else:
        out += [dy.get("note", "n/a"), ""]
    # -- cases
    if r.get("cases"):
        out += _cases_lines(r["cases"])
    # -- segmentation
    sg = r["segmentation"]
    out += ["## Lung segmentation", ""]
    if "dice" in sg:
        out += [
            f"U-Net {sg.get('architecture', '')} ({_num(sg.get('parameters'))} parameters, input"
            f" {sg.get('input_size')}), trained on {sg.get('train_masks')} masks, selected on"
            f" {sg.get('val_masks')} (val Dice {_num(sg.get('val_dice'))}). Held-out test masks:"
            f" {sg['test_masks']}; pixels marked 127 are ignored.",
            "",
            f"- Dice {ci(sg['dice'])}",
            f"- IoU {ci(sg['iou'])}",
            "",
            *markdown_table(
                ("source", "masks", "Dice", "IoU"),
                [
                    (s, v["n"], f"{v['dice']:.3f}", f"{v['iou']:.3f}")
                    for s, v in sg["per_source"].items()
                ],
            ),
            "",
        ]
    else:
        out += [sg.get("note", "n/a"), ""]
    # -- ablation
    ab = r["ablation"]
    out += ["## Ablation", ""]
    if "baseline" in ab:
        out += [
            f"Member `{ab['member']}` retrained on split 0 under each condition; test ROC AUC,"
            " and the paired bootstrap difference from the baseline.",
            "",
            *markdown_table(
                ("condition", "ROC AUC", "difference vs baseline"),
                [
                    ("baseline (the recipe as configured)", ci(ab["baseline"]), ""),
                    *(
                        (v["description"], ci(v["auc"]), ci(v["difference_vs_baseline"]))
                        if "auc" in v
                        else (v["description"], v.get("note"), "")
                        for v in ab["variants"].values()
                    ),
                ],
            ),
        ]
        out += ["", *_figure(ab.get("figure"), "ablation")]
    else:
        out += [ab.get("note", "n/a"), ""]
    # -- shortcut audit
    sa = r["shortcut_audit"]
    lm = sa["lung_masking"]
    out += [
        "## Shortcut audit",
        "",
        "If the ensemble still separates the classes with the lungs hidden, it reads something"
        " other than the lungs (source, text, devices, borders).",
        "",
        f"Lung region: U-Net map >= 0.5, {lm['lung_fraction']:.1%} of the pixels; replaced by"
        " each image's mean gray.",
        "",
        *markdown_table(
            ("input", "ensemble ROC AUC"),
            [
                ("original", ci(lm["original"])),
                ("lungs masked out", ci(lm["lungs_masked_out"])),
                ("everything but the lungs masked out", ci(lm["lungs_only"])),
            ],
        ),
        "",
    ]
    if "source_from_embeddings" in sa:
        out += [
            "Probes (logistic regression fitted on the split-0 training set, AUC on test):",
            "",
            *markdown_table(
                ("probe", "target", "ROC AUC"),
                [
                    *(
                        ("embeddings -> source", f"{s} vs rest", ci(e2))
                        for s, e2 in sa["source_from_embeddings"].items()
                    ),
                    *(
                        ("trivial image features -> source", f"{s} vs rest", ci(e2))
                        for s, e2 in sa["source_from_trivial_features"].items()
                    ),
                    (
                        "trivial image features -> label",
                        "covid vs negative",
                        ci(sa["label_from_trivial_features"]),
                    ),
                ],
            ),
        ]
        out += [
            "",
            "Trivial features: intensity histogram, brightness, contrast, dark borders,"
            " sharpness. A label AUC far above 0.5 from them means the data itself carries a"
            " shortcut; a source AUC near 1 from the embeddings means the model encodes the"
            " source.",
            "",
        ]
    else:
        out += [sa.get("note", ""), ""]
    # -- export
    out += ["## Export", ""]
    if export:
        out += [
            f"Bundle `{export['bundle']}`: {export['total_mb']:.1f} MB (limit"
            f" {export['max_bundle_mb']:.0f} MB), device UID {export['device_uid']}.",
            "",
            *markdown_table(
                ("file", "MB", "ONNX parity (max abs diff, fp32)"),
                [
                    (f, f"{mb:.2f}", _sci(export["parity"][f]) if f in export["parity"] else "")
                    for f, mb in export["sizes_mb"].items()
                ],
            ),
            "",
            f"Bundle served through the worker's ONNX path on the split-0 test set: ROC AUC"
            f" {_num(export['onnx_auc'])} (PyTorch {_num(export['torch_auc'])}).",
            "",
        ]
        if export.get("variants"):
            out += markdown_table(
                (
                    "variant",
                    "MB",
                    "ROC AUC",
                    "change vs fp32",
                    "same-source AUC",
                    "change",
                    "max score change",
                    "calls changed",
                    "note",
                ),
                [
                    (
                        name,
                        _num(v.get("total_mb"), 1),
                        _num(v.get("auc")),
                        _num(v.get("auc_change"), 4),
                        _num(v.get("same_source_auc")),
                        _num(v.get("same_source_auc_change"), 4),
                        _sci(v.get("max_score_change")),
                        v.get("calls_changed", "n/a"),
                        v.get("note", ""),
                    )
                    for name, v in export["variants"].items()
                ],
            )
            out += [
                "",
                "An AUC change on a small test set follows the order of near-equal scores; the"
                " maximum score change is the robust measure of what a conversion altered.",
                "",
            ]
    elif r["kind"] == "external":
        out += ["Not applicable: an external evaluation of the run's split-0 models.", ""]
    else:
        out += ["(not exported yet: run `cxr-train export`)", ""]
    # -- limits
    out += [
        "## Known limits",
        "",
        "- Public data with source shortcuts: on the pool every COVID-19 image comes from"
        " ieee8023 (case-report figures), most negatives from NIH. Read the same-source contrast"
        " and the shortcut audit before any other number.",
        "- The decision threshold is chosen on validation data of this pool; a site must"
        " recalibrate it on its own data.",
        "- The U-Net is trained once, on split 0's training masks; for splits > 0 some test"
        " images' masks were seen by it (it never sees a COVID-19 label).",
        "- No pretrained weights: every network is trained from scratch.",
        "",
    ]
    return "\n".join(out)


def write_report(folder: Path) -> Path:
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    export_path = folder / EXPORT_JSON
    export = json.loads(export_path.read_text(encoding="utf-8")) if export_path.is_file() else None
    path = folder / REPORT_MD
    path.write_text(render(report, export), encoding="utf-8")
    return path
