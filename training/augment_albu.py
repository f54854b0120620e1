"""The albumentations pipeline behind `training.augment` (imported only when augmenting).

Kept in its own module so that `training` imports without albumentations, and so that the
custom transforms are module-level classes that DataLoader workers can unpickle.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

from training.config import AugmentConfig

#: Words burned into X-rays by modalities and case-report figures (markers, views, stamps).
_TEXTS = ("L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "A", "B", "C", "1", "2", "->")


class BlackBorders(A.ImageOnlyTransform):
    """Black bars of up to 12% of the side on random edges (residual frames, scan margins)."""

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        fractions = [
            self.py_random.uniform(0.02, 0.12) if self.py_random.random() < 0.5 else 0.0
            for _ in range(4)
        ]
        if not any(fractions):
            fractions[self.py_random.randrange(4)] = self.py_random.uniform(0.02, 0.12)
        return {"fractions": fractions}

    def apply(self, img: np.ndarray, fractions: list[float], **params: Any) -> np.ndarray:
        out = img.copy()
        h, w = out.shape[:2]
        top, bottom, left, right = (
            int(fractions[0] * h),
            int(fractions[1] * h),
            int(fractions[2] * w),
            int(fractions[3] * w),
        )
        out[:top] = 0
        out[h - bottom :] = 0
        out[:, :left] = 0
        out[:, w - right :] = 0
        return out


class BurnedInText(A.ImageOnlyTransform):
    """One to three bright words or markers at random places (laterality, view, panel letters)."""

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h, w = params["shape"][:2]
        items = []
        for _ in range(self.py_random.randint(1, 3)):
            scale = self.py_random.uniform(0.6, 1.6) * min(h, w) / 256.0
            items.append(
                {
                    "text": self.py_random.choice(_TEXTS),
                    "origin": (
                        int(self.py_random.uniform(0.02, 0.85) * w),
                        int(self.py_random.uniform(0.08, 0.98) * h),
                    ),
                    "scale": scale,
                    "thickness": max(1, round(scale * self.py_random.uniform(1.0, 2.5))),
                    "value": self.py_random.randint(200, 255),
                }
            )
        return {"items": items}

    def apply(self, img: np.ndarray, items: list[dict[str, Any]], **params: Any) -> np.ndarray:
        out = np.ascontiguousarray(img.copy())
        for item in items:
            cv2.putText(
                out,
                item["text"],
                item["origin"],
                cv2.FONT_HERSHEY_SIMPLEX,
                item["scale"],
                int(item["value"]),
                item["thickness"],
                cv2.LINE_AA,
            )
        return out


def build_compose(cfg: AugmentConfig, mask_interpolation: int, seed: int) -> A.Compose:
    """The paper's set with its probabilities, preceded by the anti-shortcut options."""
    geometry: dict[str, Any] = {
        "border_mode": cv2.BORDER_CONSTANT,
        "fill": 0,
        "fill_mask": 0,
        "mask_interpolation": mask_interpolation,
    }
    transforms: list[Any] = []
    # Acquisition and figure artefacts first: they belong to the image before anything else.
    if cfg.jpeg:
        transforms.append(A.ImageCompression(quality_range=cfg.jpeg_quality, p=cfg.jpeg))
    if cfg.rescale:
        transforms.append(
            A.Downscale(
                scale_range=cfg.rescale_range,
                interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR},
                p=cfg.rescale,
            )
        )
    if cfg.borders:
        transforms.append(BlackBorders(p=cfg.borders))
    if cfg.text:
        transforms.append(BurnedInText(p=cfg.text))
    transforms += [
        A.RandomBrightnessContrast(
            brightness_limit=(0.0, cfg.brightness_limit), contrast_limit=0.0, p=cfg.brightness
        ),
        A.RandomGamma(gamma_limit=(80, 120), p=cfg.gamma),
        A.CLAHE(clip_limit=(1.0, 4.0), tile_grid_size=(8, 8), p=cfg.clahe),
        A.Affine(rotate=(-cfg.rotate_limit, cfg.rotate_limit), p=cfg.rotate, **geometry),
        A.Affine(shear=(-cfg.shear_limit, cfg.shear_limit), p=cfg.shear, **geometry),
        A.Affine(scale=(1 - cfg.scale_limit, 1 + cfg.scale_limit), p=cfg.scale, **geometry),
        A.HorizontalFlip(p=cfg.hflip),
        A.OneOf(
            [A.Sharpen(alpha=(0.1, 0.3), p=1.0), A.GaussianBlur(blur_limit=(3, 5), p=1.0)],
            p=cfg.sharpen_or_blur,
        ),
    ]
    return A.Compose(transforms, seed=seed)
