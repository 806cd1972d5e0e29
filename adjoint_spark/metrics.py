"""Ranking metrics of protocol P1, computed from top-K lists with NumPy.

For each query with at least one test item: precision@K, recall@K, NDCG@K (binary
relevance, ideal DCG over min(|test items|, K)) and MAP@K (average precision at the
hit ranks, divided by min(|test items|, K)), averaged over queries; plus the original
system's micro recall@K = all hits / all held-out pairs.
"""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (10, 40)


def hits_matrix(top_items: np.ndarray, test_items: list[np.ndarray]) -> np.ndarray:
    """``hits[q, r]`` is True when the item at rank ``r`` of query ``q`` is a test item.

    Args:
        top_items: (Q, K) int array of ranked item indexes (-1 marks an empty slot).
        test_items: Q arrays of held-out item indexes.
    """
    assert top_items.ndim == 2 and len(test_items) == len(top_items), "one test set per query"
    hits = np.zeros(top_items.shape, dtype=bool)
    for q, relevant in enumerate(test_items):
        if len(relevant):
            hits[q] = np.isin(top_items[q], relevant) & (top_items[q] >= 0)
    return hits


def ranking_metrics(
    hits: np.ndarray, num_relevant: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS
) -> dict[str, float]:
    """Protocol P1 metrics from a (Q, K_max) hit matrix and each query's test count.

    Queries without test items are left out of the averages.
    """
    keep = num_relevant > 0
    hits, num_relevant = hits[keep], num_relevant[keep].astype(np.float64)
    out: dict[str, float] = {"num_queries": int(keep.sum())}
    if not len(hits):
        return out
    discounts = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    for k in ks:
        assert k <= hits.shape[1], f"K={k} needs at least {k} ranked items per query"
        h = hits[:, :k].astype(np.float64)
        num_hits = h.sum(axis=1)
        dcg = (h * discounts[:k]).sum(axis=1)
        ideal_len = np.minimum(num_relevant, k).astype(int)
        ideal = np.cumsum(discounts[:k])[ideal_len - 1]
        precision_at_hit = np.cumsum(h, axis=1) / np.arange(1, k + 1)
        ap = (precision_at_hit * h).sum(axis=1) / np.minimum(num_relevant, k)
        out[f"precision@{k}"] = float(np.mean(num_hits / k))
        out[f"recall@{k}"] = float(np.mean(num_hits / num_relevant))
        out[f"ndcg@{k}"] = float(np.mean(dcg / ideal))
        out[f"map@{k}"] = float(np.mean(ap))
        out[f"micro_recall@{k}"] = float(num_hits.sum() / num_relevant.sum())
    return out


def evaluate_top_k(
    top_items: np.ndarray, test_items: list[np.ndarray], ks: tuple[int, ...] = DEFAULT_KS
) -> dict[str, float]:
    """All metrics for ranked lists ``top_items`` against ``test_items`` (see above)."""
    hits = hits_matrix(top_items, test_items)
    num_relevant = np.array([len(t) for t in test_items])
    return ranking_metrics(hits, num_relevant, ks)
