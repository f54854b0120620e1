"""Where a training run keeps its files (one working folder per experiment).

<workdir>/
  config.json             the resolved experiment config
  cache.npz               preprocessed images and masks (unless [cache] path says otherwise)
  splits.json             split 0 (the bundle's) and the K-1 further random splits
  segmentation/           U-Net: last.pt, best.pt, result.json (Dice/IoU on held-out masks)
  lungmaps.npz            U-Net lung probability maps of every cached image
  lungmaps-raw.npz        the same for the un-preprocessed variant (ablation)
  split-<k>/<member>/     one trained member: last.pt, best.pt, result.json, predictions.npz
  split-0/<member>--no-seg/, split-0/<member>--no-prep/    ablation members
  features/               frozen backbones' pooled features of every image (warm-up)
  report/                 report.md, report.json, *.png
  bundle/                 the model bundle
  variants/fp16/ ...      bundle variants with other weight precisions
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NO_SEG = "no-seg"
NO_PREP = "no-prep"


@dataclass(frozen=True)
class RunPaths:
    root: Path
    cache_override: Path | None = None

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def cache(self) -> Path:
        return self.cache_override or self.root / "cache.npz"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def segmentation(self) -> Path:
        return self.root / "segmentation"

    @property
    def lungmaps(self) -> Path:
        return self.root / "lungmaps.npz"

    @property
    def lungmaps_raw(self) -> Path:
        return self.root / "lungmaps-raw.npz"

    def member(self, split: int, name: str, variant: str | None = None) -> Path:
        folder = name if variant is None else f"{name}--{variant}"
        return self.root / f"split-{split}" / folder

    @property
    def features(self) -> Path:
        """Frozen backbones' pooled features, shared by the splits (training.frozen_head)."""
        return self.root / "features"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def variants(self) -> Path:
        return self.root / "variants"
