"""A random-weight bundle with the shipped configuration's shapes (training/configs/cpu.toml).

Timing depends on the networks' shapes, not their weights. This builds, into a git-ignored
folder, what `cxr-train all -c training/configs/cpu.toml` ships: 224 px members resnet18,
shufflenet_v2_x1_0 and mobilenet_v3_small with the paper's 3-layer head (256-d embedding), a
U-Net of base width 16 at 256 px and a reference index of ~1,000 items (the pool's training
split); bench.inference makes the fp16/int8 conversions itself. Weights are seeded random with
BatchNorm statistics from synthetic images (as `cxr-train export-random`), so outputs vary
with the input. The PyTorch weights go beside the bundle (`<out>.torch.pt`).

    python -m bench.make_bundle [--out var/bench/bundle-cpu] [--references 1000]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from bench.common import DEFAULT_BUNDLE

MEMBERS = (
    ("resnet18", "resnet18"),
    ("shufflenet_v2", "shufflenet_v2_x1_0"),
    ("mobilenet_v3_small", "mobilenet_v3_small"),
)
SIZE = 224
SEG_SIZE = 256
UNET_WIDTH = 16
EMBEDDING_MEMBER = "resnet18"


def torch_weights_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".torch.pt")


def build(
    out: Path,
    references: int = 1000,
    seed: int = 0,
    members_: tuple[tuple[str, str], ...] = MEMBERS,
    size: int = SIZE,
    seg_size: int = SEG_SIZE,
    unet_width: int = UNET_WIDTH,
) -> Path:
    import torch

    from training.bundle_writer import (
        MemberExport,
        ReferenceItem,
        SegmentationExport,
        torch_embeddings,
        write_bundle,
    )
    from training.models import PAPER_HEAD, UNet, UNetExport, build_classifier, calibrate_batchnorm
    from training.synthetic import synthetic_batch, synthetic_labels
    from worker.model_input import member_input, resize_batch
    from worker.preprocess import PreprocessParams, to_model_input

    torch.manual_seed(seed)
    params = PreprocessParams(size=size)
    unet = UNet(base_width=unet_width, depth=4)
    members = [
        MemberExport(name=name, model=build_classifier(arch, PAPER_HEAD), input_size=size)
        for name, arch in members_
    ]
    embedding_member = members_[0][0] if members_ != MEMBERS else EMBEDDING_MEMBER
    x = to_model_input(synthetic_batch(32, params, seed=seed + 1), params)
    calibrate_batchnorm(unet, torch.from_numpy(resize_batch(x, seg_size)), batch_size=16)
    with torch.no_grad():
        lung = UNetExport(unet)(torch.from_numpy(resize_batch(x, seg_size))).numpy()
    for member in members:
        calibrate_batchnorm(
            member.model, torch.from_numpy(member_input(x, lung, size)), batch_size=16
        )
    images = synthetic_batch(references, params, seed=seed)
    emb_model = next(m for m in members if m.name == embedding_member).model
    embeddings = torch_embeddings(unet, seg_size, emb_model, size, images, params)
    items = [
        ReferenceItem(id=f"synthetic-{i:05d}", label=label.label, source="synthetic")
        for i, label in enumerate(synthetic_labels(references))
    ]
    shape = (
        "training/configs/cpu.toml"
        if members_ == MEMBERS and size == SIZE
        else f"members {','.join(a for _, a in members_)} at {size} px, "
        f"U-Net {unet_width} at {seg_size} px"
    )
    if out.exists():
        shutil.rmtree(out)
    write_bundle(
        out,
        name="bench-cpu-shape",
        version="0.0.0-random",
        members=members,
        segmentation=SegmentationExport(model=unet, input_size=seg_size),
        reference_embeddings=embeddings,
        reference_items=items,
        embedding_member=embedding_member,
        preprocessing=params,
        threshold=0.5,
        sample_images=images[:8],
        training_data={"note": "random weights: for timing only"},
        random_weights=True,
        config={"shape_of": shape, "seed": seed},
        card_notes="Random weights, the shipped configuration's shapes: for benchmarks only.",
    )
    # The same weights for PyTorch eager in bench.inference (beside the bundle, not in it).
    state = {m.name: m.model.state_dict() for m in members}
    state["segmentation"] = unet.state_dict()
    torch.save(state, torch_weights_path(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--references", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--members", default="", help="architectures (default: the shipped ones)")
    parser.add_argument("--size", type=int, default=SIZE, help="members' input side")
    parser.add_argument("--seg-size", type=int, default=SEG_SIZE, help="U-Net input side")
    parser.add_argument("--unet-width", type=int, default=UNET_WIDTH)
    args = parser.parse_args()
    members = tuple((a, a) for a in args.members.split(",") if a) or MEMBERS
    start = time.perf_counter()
    build(args.out, args.references, args.seed, members, args.size, args.seg_size, args.unet_width)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
