"""The source adversary (training.adversary): gradient reversal, which classes it acts on."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: install the `train` extra")

from training.adversary import (  # noqa: E402
    SourceAdversary,
    contested_classes,
    reverse_gradient,
    source_codes,
)


def test_gradient_is_reversed_and_scaled() -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    out = reverse_gradient(x, 0.5)
    torch.testing.assert_close(out, x.detach())
    (out * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, -1.0, -2.0]))


def test_source_codes_and_contested_classes() -> None:
    codes, names = source_codes(["nih", "ieee", "nih", "jsrt", "ieee"])
    assert names == ["ieee", "jsrt", "nih"]
    np.testing.assert_array_equal(codes, [2, 0, 2, 1, 0])
    labels = np.array([0, 1, 0, 0, 1])  # class 1 from ieee only: the source is the label there
    assert contested_classes(labels, codes) == [0]


def test_loss_uses_the_contested_rows_only_and_trains_the_head_against_the_member() -> None:
    torch.manual_seed(0)
    adversary = SourceAdversary(embedding_dim=4, n_sources=3, classes=[0], scale=1.0)
    embedding = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    sources = torch.tensor([0, 2, 1, 0, 0, 0])
    loss, rows, correct = adversary.loss(embedding, labels, sources)
    assert rows == 3 and 0 <= correct <= 3
    loss.backward()
    assert embedding.grad is not None
    assert torch.all(embedding.grad[3:] == 0)  # class 1 is not contested: no pull on it
    assert torch.any(embedding.grad[:3] != 0)
    # The member's gradient is the head's, reversed: a step along it raises the head's loss.
    with torch.no_grad():
        stepped = embedding - 0.1 * embedding.grad
        after, _, _ = adversary.loss(stepped, labels, sources)
    assert float(after) > float(loss.detach())
