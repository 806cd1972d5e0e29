import math

import torch

from adjoint_spark.losses import (
    hinge_loss,
    in_batch_softmax_loss,
    logistic_loss,
    sampled_softmax_loss,
)

POS = torch.tensor([0.9, 0.1])
NEG = torch.tensor([[0.5, 0.88, -1.0], [0.3, 0.0, 0.2]])
VALID = torch.tensor([[True, True, True], [True, True, False]])


def test_hinge_matches_its_definition():
    m = 0.05
    row0 = 0 + max(0, 0.88 - 0.9 + m) + 0
    row1 = max(0, 0.3 - 0.1 + m) + max(0, 0.0 - 0.1 + m)  # the invalid slot is ignored
    torch.testing.assert_close(hinge_loss(POS, NEG, VALID, m), torch.tensor((row0 + row1) / 2))


def test_logistic_matches_its_definition():
    s = torch.tensor(5.0)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    row0 = sp(-5 * 0.9) + sp(5 * 0.5) + sp(5 * 0.88) + sp(-5.0)
    row1 = sp(-5 * 0.1) + sp(5 * 0.3) + sp(0.0)
    torch.testing.assert_close(logistic_loss(POS, NEG, VALID, s), torch.tensor((row0 + row1) / 2))


def test_sampled_softmax_ignores_invalid_slots():
    s = torch.tensor(10.0)
    logits0 = torch.tensor([0.9, 0.5, 0.88, -1.0]) * 10
    logits1 = torch.tensor([0.1, 0.3, 0.0]) * 10
    expected = (-torch.log_softmax(logits0, 0)[0] - torch.log_softmax(logits1, 0)[0]) / 2
    torch.testing.assert_close(sampled_softmax_loss(POS, NEG, VALID, s), expected)


def test_in_batch_softmax_corrects_for_popularity_and_masks_duplicates():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    items = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.5, 0.9], [0.5, 0.9]]), dim=1)
    idx = torch.tensor([7, 3, 3])  # rows 1 and 2 share their positive item
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    s = torch.tensor(4.0)
    got = in_batch_softmax_loss(q, items, idx, log_q, s)
    logits = 4.0 * q @ items.T - log_q.unsqueeze(0)
    logits[1, 2] = logits[2, 1] = float("-inf")
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    torch.testing.assert_close(got, expected)
