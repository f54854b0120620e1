"""The assembly of model inputs, shared by serving (`worker.inference`) and training.

numpy + OpenCV only (no onnxruntime, no torch), so that training imports exactly the code the
worker runs without needing the inference runtime.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Channel order of every ensemble member's input. Part of the bundle contract.
MEMBER_CHANNELS: tuple[str, str, str] = ("image", "lung", "zeros")


def resize_batch(x: np.ndarray, size: int) -> np.ndarray:
    """float32 [N,C,H,W] -> [N,C,size,size] (area when shrinking, bilinear when enlarging)."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    interpolation = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    out = np.empty((n, c, size, size), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            out[i, j] = cv2.resize(x[i, j], (size, size), interpolation=interpolation)
    return out


def member_input(image: np.ndarray, lung: np.ndarray, size: int) -> np.ndarray:
    """Normalised image [N,1,S,S] + lung probability [N,1,S',S'] -> member input [N,3,size,size]."""
    image = resize_batch(image.astype(np.float32, copy=False), size)
    lung = resize_batch(lung.astype(np.float32, copy=False), size)
    zeros = np.zeros_like(image)
    return np.ascontiguousarray(np.concatenate([image, lung, zeros], axis=1))
