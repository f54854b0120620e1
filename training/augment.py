"""On-the-fly training augmentation (albumentations), image and mask together.

`Augmenter(cfg, kind)` applies the paper's augmentations (brighten 0.4, gamma 0.3, CLAHE 0.4,
rotate 0.4, shear 0.4, scale 0.4, horizontal flip 0.5, sharpen or blur) and the optional
anti-shortcut ones (JPEG re-encoding, rescale down/up, black borders, burned-in text) to a
uint8 image, and the same geometry to its mask: nearest for label masks (`kind="labels"`,
values 0/127/255 kept), bilinear for a lung probability map (`kind="probability"`).
Pixel-level changes never touch the mask. Size and dtype are kept.

albumentations is imported on first use, so the rest of `training` imports without it.
"""

from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np

from training.config import AugmentConfig


class AugmentUnavailable(ImportError):
    """albumentations is missing: install it, or train with augment.enabled = false."""


def _compose(cfg: AugmentConfig, mask_interpolation: int, seed: int) -> Any:
    try:
        from training.augment_albu import build_compose
    except ImportError as exc:
        raise AugmentUnavailable(
            f"augmentation needs albumentations ({exc}); install the `train` extra "
            "(pip install 'albumentations>=1.4') or set [augment] enabled = false"
        ) from exc
    return build_compose(cfg, mask_interpolation, seed)


class Augmenter:
    """Callable (image, mask | None) -> (image, mask | None); picklable; reseedable."""

    def __init__(
        self, cfg: AugmentConfig, kind: Literal["labels", "probability"], seed: int = 0
    ) -> None:
        self.cfg = cfg
        self.kind = kind
        interpolation = cv2.INTER_NEAREST if kind == "labels" else cv2.INTER_LINEAR
        self._compose = _compose(cfg, interpolation, seed)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Seed every transform with its own stream.

        albumentations' `set_random_seed` gives every transform the same seed, so their
        apply-with-probability-p draws are identical: brighten (0.4) and rotate (0.4) would
        always fire together. Each transform gets a seed derived from (seed, position).
        """
        self._compose.set_random_seed(seed)
        for position, transform in enumerate(_walk(self._compose)):
            transform.set_random_seed((seed * 1_000_003 + 7919 * (position + 1)) % 2**32)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"expected a uint8 2-D image, got {image.dtype} {image.shape}")
        if mask is None:
            out = self._compose(image=image)
            return np.ascontiguousarray(out["image"]), None
        if mask.shape != image.shape:
            raise ValueError(f"mask {mask.shape} differs from the image {image.shape}")
        out = self._compose(image=image, mask=mask)
        return np.ascontiguousarray(out["image"]), np.ascontiguousarray(out["mask"])


def _walk(compose: Any) -> list[Any]:
    """Every transform under a Compose/OneOf, depth first."""
    out = []
    for transform in getattr(compose, "transforms", []):
        out.append(transform)
        out += _walk(transform)
    return out


def make_augmenter(
    cfg: AugmentConfig, kind: Literal["labels", "probability"], seed: int
) -> Augmenter | None:
    return Augmenter(cfg, kind, seed) if cfg.enabled else None
