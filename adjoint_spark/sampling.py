"""Epoch order and negative items, drawn from counters rather than a random state.

Every random choice is a hash of (seed, epoch, query, item, slot, round), so the same
pure NumPy functions give the same examples whether they run on the driver (the
``memory`` feed) or inside Spark tasks (the ``stream`` feed), in any partitioning, and
a resumed run draws exactly what an uninterrupted one would have.

Negatives of a positive pair (q, i): ``num_negatives`` slots; the first
``num_popular`` slots take the item of a uniformly drawn train pair (so items are
drawn in proportion to their number of positives: "positives of other queries"), the
rest a uniform item of the catalogue. Popular draws use the cumulative count of train
pairs per item (``item_cdf``), which is as long as the catalogue, not the pair table.
A draw that is one of q's own train positives is
drawn again with the next round; after ``max_rounds`` the slot is marked invalid and
the losses ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective scramble of uint64 values."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash_columns(*columns: np.ndarray | int) -> np.ndarray:
    """One uint64 hash per row of the given integer columns (scalars broadcast)."""
    arrays = np.broadcast_arrays(*[np.asarray(c).astype(np.int64) for c in columns])
    h = np.zeros(arrays[0].shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in arrays:
            h = mix64(h + _GOLDEN + a.astype(np.uint64))
    return h


def uniform_int(h: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Map hashes to integers in [0, n) (53 random bits, so unbiased for n << 2**53)."""
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return np.minimum((u * n).astype(np.int64), np.asarray(n, dtype=np.int64) - 1)


def epoch_order_key(query: np.ndarray, item: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The sort key that shuffles train pairs for one epoch (ties: by query, item)."""
    return (hash_columns(seed, epoch, 0x5EED, query, item) >> np.uint64(1)).astype(np.int64)


def epoch_order(query: np.ndarray, item: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Positions of the train pairs in the order they are visited in ``epoch``."""
    key = epoch_order_key(query, item, seed, epoch)
    return np.lexsort((item, query, key))


@dataclass(frozen=True)
class NegativeSpec:
    num_negatives: int = 31
    num_popular: int = 16
    max_rounds: int = 16
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0 <= self.num_popular <= self.num_negatives:
            raise ValueError(
                f"num_popular {self.num_popular} must lie in "
                f"[0, num_negatives={self.num_negatives}]"
            )


def pair_keys(query: np.ndarray, item: np.ndarray, num_items: int) -> np.ndarray:
    return query.astype(np.int64) * np.int64(num_items) + item.astype(np.int64)


class PairSet:
    """Membership of (query, item) pairs, by binary search over sorted int64 keys."""

    def __init__(self, query: np.ndarray, item: np.ndarray, num_items: int):
        self.num_items = num_items
        self.keys = np.unique(pair_keys(query, item, num_items))

    def contains(self, query: np.ndarray, item: np.ndarray) -> np.ndarray:
        keys = pair_keys(query, item, self.num_items)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        return self.keys[pos] == keys


def draw_candidates(
    query: np.ndarray,
    item: np.ndarray,
    slots: np.ndarray,
    round_: int,
    spec: NegativeSpec,
    epoch: int,
    num_pairs: int,
    num_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One round of draws for (query, item, slot) rows.

    Returns ``(is_popular, value)``: for popular slots ``value`` is a uniform position
    among all train pairs, which ``item_cdf`` maps to an item; for uniform slots it is
    the item index itself.
    """
    h = hash_columns(spec.seed, epoch, 0x4E47, round_, query, item, slots)
    popular = slots < spec.num_popular
    value = np.where(popular, uniform_int(h, num_pairs), uniform_int(h, num_items))
    return popular, value


def draw_negatives(
    query: np.ndarray,
    item: np.ndarray,
    spec: NegativeSpec,
    epoch: int,
    item_cdf: np.ndarray,
    positives: PairSet,
    num_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(B, N) negative item indexes for positive pairs, and a (B, N) validity mask.

    Args:
        query, item: (B,) the positive pairs.
        item_cdf: (num_items,) cumulative number of train pairs of items 0..i.
        positives: the train pairs, for excluding a query's own positives.
    """
    b, n = len(query), spec.num_negatives
    if n == 0:
        return np.zeros((b, 0), dtype=np.int64), np.zeros((b, 0), dtype=bool)
    q = np.repeat(query, n)
    i = np.repeat(item, n)
    slots = np.tile(np.arange(n), b)
    result = np.full(b * n, -1, dtype=np.int64)
    todo = np.arange(b * n)
    for round_ in range(spec.max_rounds):
        if not len(todo):
            break
        popular, value = draw_candidates(
            q[todo], i[todo], slots[todo], round_, spec, epoch, int(item_cdf[-1]), num_items
        )
        by_count = np.searchsorted(item_cdf, value, side="right")
        candidate = np.where(popular, by_count, value)
        clash = positives.contains(q[todo], candidate)
        result[todo[~clash]] = candidate[~clash]
        todo = todo[clash]
    result = result.reshape(b, n)
    return np.maximum(result, 0), result >= 0
