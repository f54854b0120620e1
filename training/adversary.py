"""A source adversary for ensemble members, against the source shortcut (the pool's README).

During training only, a small head tries to tell an image's source from the member's
embedding, separately within each class (on the pool every COVID-19 image comes from one
source, so "which source" across classes is the label itself; within the negatives it is
not). Its gradient reaches the member reversed and scaled (gradient reversal, Ganin and
Lempitsky 2015): the member is pushed to an embedding from which the source cannot be read
within a class. The head is not part of the exported member.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float
    ) -> torch.Tensor:
        ctx.scale = scale  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None  # type: ignore[attr-defined]


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by -scale on the way back."""
    out: torch.Tensor = _ReverseGradient.apply(x, scale)
    return out


def source_codes(sources: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each row's source as an index into the sorted source names."""
    names = sorted(set(sources))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[s] for s in sources], dtype=np.int64), names


def contested_classes(labels: np.ndarray, codes: np.ndarray) -> list[int]:
    """Classes whose training images come from more than one source: only there can the
    embedding carry the source without carrying the label."""
    return [int(c) for c in np.unique(labels) if len(np.unique(codes[labels == c])) > 1]


class SourceAdversary(nn.Module):
    """One source classifier per contested class, fed through gradient reversal."""

    def __init__(
        self,
        embedding_dim: int,
        n_sources: int,
        classes: Sequence[int],
        scale: float,
        width: int = 128,
    ) -> None:
        super().__init__()
        self.classes = [int(c) for c in classes]
        self.scale = scale
        self.heads = nn.ModuleDict(
            {
                str(c): nn.Sequential(
                    nn.Linear(embedding_dim, width), nn.ReLU(), nn.Linear(width, n_sources)
                )
                for c in self.classes
            }
        )

    def loss(
        self, embedding: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        """(mean source cross-entropy over the batch's contested rows, rows, correct guesses)."""
        reversed_embedding = reverse_gradient(embedding, self.scale)
        total = embedding.new_zeros(())
        rows = correct = 0
        for c in self.classes:
            mask = labels == c
            n = int(mask.sum())
            if n == 0:
                continue
            logits = self.heads[str(c)](reversed_embedding[mask])
            total = total + F.cross_entropy(logits, sources[mask], reduction="sum")
            correct += int((logits.argmax(dim=1) == sources[mask]).sum())
            rows += n
        return total / max(rows, 1), rows, correct
