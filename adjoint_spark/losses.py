"""Losses over cosine scores of one positive and N negative items per query.

Shapes: ``pos`` (B,), ``neg`` (B, N) cosine scores, ``valid`` (B, N) bool (False marks
a negative slot that could not be drawn). ``scale`` is the inverse temperature of the
softmax and logistic losses.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

LOSSES = ("hinge", "logistic", "sampled_softmax", "in_batch_softmax")


def hinge_loss(pos: Tensor, neg: Tensor, valid: Tensor, margin: float) -> Tensor:
    """sum_j max(0, s_neg_j - s_pos + margin), averaged over the batch (the original)."""
    violation = F.relu(neg - pos.unsqueeze(1) + margin) * valid
    return violation.sum(1).mean()


def logistic_loss(pos: Tensor, neg: Tensor, valid: Tensor, scale: Tensor) -> Tensor:
    """Binary cross-entropy of every candidate: the positive as 1, each negative as 0."""
    pos_term = F.softplus(-scale * pos)
    neg_term = (F.softplus(scale * neg) * valid).sum(1)
    return (pos_term + neg_term).mean()


def sampled_softmax_loss(pos: Tensor, neg: Tensor, valid: Tensor, scale: Tensor) -> Tensor:
    """Cross-entropy of the positive among its 1 + N candidates, logits = scale * cosine."""
    logits = torch.cat([pos.unsqueeze(1), neg.masked_fill(~valid, float("-inf"))], dim=1)
    target = torch.zeros(len(pos), dtype=torch.long, device=pos.device)
    return F.cross_entropy(scale * logits, target)


def in_batch_softmax_loss(
    query: Tensor,
    item: Tensor,
    item_idx: Tensor,
    log_q: Tensor,
    scale: Tensor,
    neg: Tensor | None = None,
    neg_valid: Tensor | None = None,
    neg_log_q: Tensor | None = None,
    own: Tensor | None = None,
) -> Tensor:
    """Softmax over the batch's positive items (plus optional sampled negatives).

    Each candidate's logit is corrected by minus the log of its sampling probability
    (logQ correction): in a batch, items appear in proportion to their number of
    positives, which would otherwise push popular items down. A column holding the
    row's own positive item again (a duplicate in the batch) is masked.

    Args:
        query, item: (B, D) unit vectors of the batch's queries and positive items.
        item_idx: (B,) the positive items, for masking duplicates.
        log_q: (B,) log sampling probability of each positive item.
        neg, neg_valid, neg_log_q: (B, N) cosines, mask and log-probabilities of extra
            sampled negatives per row, or None.
        own: (B, B) True where column c's item is another train item of row r's query;
            masked like duplicates, so a query's positives are not its negatives.
    """
    logits = scale * (query @ item.T) - log_q.unsqueeze(0)
    same = item_idx.unsqueeze(0) == item_idx.unsqueeze(1)
    eye = torch.eye(len(item_idx), dtype=torch.bool, device=query.device)
    masked = same & ~eye
    if own is not None:
        masked = masked | (own & ~eye)
    logits = logits.masked_fill(masked, float("-inf"))
    if neg is not None:
        extra = (scale * neg - neg_log_q).masked_fill(~neg_valid, float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    target = torch.arange(len(item_idx), device=query.device)
    return F.cross_entropy(logits, target)
