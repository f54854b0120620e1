"""The PLUMBING bundle: randomly initialised models in a valid bundle, to test everything but
the medicine (export, load, inference, retrieval, reports) without any training data.

Weights stay as initialised (seeded); only the BatchNorm running statistics are estimated on
synthetic images, without which every input would give nearly the same output. The heads are
narrower than the paper's (1024, 512, 256) to keep the committed bundle small;
the embedding keeps the paper's 256 dimensions, so downstream code sees real shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.bundle_writer import (
    ExportReport,
    MemberExport,
    ReferenceItem,
    SegmentationExport,
    torch_embeddings,
    write_bundle,
)
from training.models import UNet, UNetExport, build_classifier, calibrate_batchnorm
from training.synthetic import synthetic_batch, synthetic_labels
from worker.inference import member_input
from worker.preprocess import PreprocessParams, to_model_input

PLUMBING_MEMBERS: tuple[str, ...] = ("mobilenet_v3_small", "shufflenet_v2_x0_5")
PLUMBING_HEAD: tuple[int, int, int] = (128, 128, 256)
PLUMBING_UNET_WIDTH = 4
PLUMBING_REFERENCE_COUNT = 40
CALIBRATION_COUNT = 64


def build_plumbing_bundle(
    out_dir: Path, size: int = 128, seed: int = 0, reference_count: int = PLUMBING_REFERENCE_COUNT
) -> ExportReport:
    """Seeded random members + tiny U-Net + synthetic reference set -> bundle at out_dir."""
    torch.manual_seed(seed)
    params = PreprocessParams(size=size)
    unet = UNet(base_width=PLUMBING_UNET_WIDTH, depth=4)
    members = [
        MemberExport(name=arch, model=build_classifier(arch, PLUMBING_HEAD), input_size=size)
        for arch in PLUMBING_MEMBERS
    ]
    # BatchNorm statistics from other synthetic images than the reference set.
    x = to_model_input(synthetic_batch(CALIBRATION_COUNT, params, seed=seed + 1), params)
    calibrate_batchnorm(unet, torch.from_numpy(x))
    with torch.no_grad():
        lung = UNetExport(unet)(torch.from_numpy(x)).numpy()
    for member in members:
        calibrate_batchnorm(member.model, torch.from_numpy(member_input(x, lung, size)))

    images = synthetic_batch(reference_count, params, seed=seed)
    embedding_member = members[0]
    embeddings = torch_embeddings(unet, size, embedding_member.model, size, images, params)
    items = [
        ReferenceItem(id=f"synthetic-{i:03d}", label=label.label, source="synthetic")
        for i, label in enumerate(synthetic_labels(reference_count))
    ]
    return write_bundle(
        out_dir,
        name="plumbing",
        version="0.0.0-random",
        members=members,
        segmentation=SegmentationExport(model=unet, input_size=size),
        reference_embeddings=embeddings,
        reference_items=items,
        embedding_member=embedding_member.name,
        preprocessing=params,
        threshold=0.5,
        sample_images=images,
        training_data={"note": "random weights, no training data: proves plumbing only"},
        random_weights=True,
        config={
            "seed": seed,
            "batchnorm_statistics": f"estimated on {CALIBRATION_COUNT} synthetic images "
            f"(seed {seed + 1}); no gradient step",
            "head": list(PLUMBING_HEAD),
            "reference_images": f"training.synthetic.synthetic_batch({reference_count}, "
            f"PreprocessParams(size={size}), seed={seed})",
        },
        card_notes=(
            "Weights: as initialised (seeded), never trained; BatchNorm running statistics"
            " estimated on synthetic images so that outputs vary with the input.\n\n"
            "Reference set: synthetic chest-like images (training/synthetic.py), labels"
            " alternating negative/covid, unrelated to their content. Made by"
            f" `cxr-train export-random <dir> --size {size} --seed {seed}`."
        ),
    )
