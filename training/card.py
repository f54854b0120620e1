"""The model card's body: data and licences, training, metrics with CIs, audit, use, limits.

`training.export.write_bundle` writes the card's head (identity, intended use, the models with
their ONNX parity); this text follows it. Built from the evaluation report.
"""

from __future__ import annotations

from typing import Any

from training.config import ExperimentConfig
from training.report import METRIC_LABELS, ci

Json = dict[str, Any]


def _table(rows: dict[str, Json], cols: tuple[str, ...] = ("n", "positives")) -> list[str]:
    lines = [
        "| | " + " | ".join(cols) + " | " + " | ".join(METRIC_LABELS.values()) + " |",
        "|---" * (1 + len(cols) + len(METRIC_LABELS)) + "|",
    ]
    for key, row in rows.items():
        est = row.get("estimates", {})
        lines.append(
            f"| {key} | "
            + " | ".join(str(row.get(c, "")) for c in cols)
            + " | "
            + " | ".join(ci(est.get(m)) for m in METRIC_LABELS)
            + " |"
        )
    return lines


def card_notes(cfg: ExperimentConfig, report: Json) -> str:
    data = report["data"]
    weights = [f"`{m.name}` from `{m.checkpoint}`" for m in cfg.members if m.checkpoint]
    origin = (
        "No pretrained weights: trained from scratch."
        if not weights
        else "Initialised from local checkpoints: " + ", ".join(weights) + "; all others from"
        " scratch."
    )
    lines = [
        "## Intended use and users",
        "",
        "Research; not for diagnostic use; not a medical device. For ML engineers and"
        " researchers evaluating the CXR node, never for decisions about a patient. Trained and"
        " evaluated on a public research pool only: no clinical performance is claimed.",
        "",
        "## Weights",
        "",
        f"{origin} Experiment `{cfg.name}` {cfg.version}, seed {cfg.seed}; the full config is in"
        " the manifest (`config`).",
        "",
        "## Training data",
        "",
        f"`{data.get('csv')}`: {data['images']} images, {data['patient_groups']} patient"
        f" groups ({data.get('load_summary')}). Patient-level splits (train / validation /"
        f" test), stratified by source and label; {len(data['splits'])} random split(s) for the"
        " confidence intervals; the bundle's models come from split 0.",
        "",
        "| stratum | images |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in data["strata"].items()),
        "",
        "Licences of the training images (as stated by the sources):",
        "",
        *(f"- {k}: {v} images" for k, v in data["train_licences"].items()),
        "",
    ]
    if data.get("licence_terms"):
        lines += ["Terms stated by the data's README:", "", data["licence_terms"].strip(), ""]
    h = report["headline"]
    est = h["estimates"]
    first = next(iter(est.values()))
    lines += [
        "## Metrics (test set, 95% CI)",
        "",
        f"Bootstrap over patient groups, {first['samples']} samples x {first['splits']}"
        f" split(s); threshold {report['threshold']['value']:.3f} chosen on validation.",
        "",
        "| | " + " | ".join(METRIC_LABELS.values()) + " |",
        "|---" * (1 + len(METRIC_LABELS)) + "|",
        "| ensemble | " + " | ".join(ci(est.get(m)) for m in METRIC_LABELS) + " |",
        "",
    ]
    ss = report["same_source"]
    if ss.get("sources"):
        lines += [
            f"Same-source contrast ({', '.join(ss['sources'])}, both classes from one source):"
            f" ROC AUC {ci(ss['estimates'].get('roc_auc'))}.",
            "",
        ]
    lines += ["Per source:", "", *_table(report["per_source"]), ""]
    seg = report.get("segmentation", {})
    if "dice" in seg:
        lines += [
            f"Lung U-Net on held-out masks: Dice {ci(seg['dice'])}, IoU {ci(seg['iou'])}.",
            "",
        ]
    sa = report["shortcut_audit"]
    lm = sa["lung_masking"]
    lines += [
        "## Shortcut audit",
        "",
        f"- ensemble ROC AUC with the lungs masked out: {ci(lm['lungs_masked_out'])}"
        f" (original {ci(lm['original'])}); with everything but the lungs masked out:"
        f" {ci(lm['lungs_only'])}.",
    ]
    for source, e in sa.get("source_from_embeddings", {}).items():
        lines.append(f"- source `{source}` predicted from the embeddings: ROC AUC {ci(e)}.")
    if sa.get("label_from_trivial_features"):
        lines.append(
            "- label predicted from trivial image features (histogram, borders, sharpness):"
            f" ROC AUC {ci(sa['label_from_trivial_features'])}."
        )
    lines += [
        "",
        "## Known limits",
        "",
        "- Public COVID-19 X-ray sets carry source shortcuts (on the pool, every COVID-19"
        " image is an ieee8023 case-report figure). High AUCs there can reflect the source; the"
        " same-source contrast and the audit above are the honest numbers.",
        "- The threshold comes from this pool's validation data: recalibrate on local data.",
        "- Frontal views only; adults mostly; portable AP images are confounded with the label.",
        "- The score supports, never replaces, a radiologist's reading.",
    ]
    return "\n".join(lines) + "\n"
