import numpy as np
import pytest

from adjoint_spark.sampling import NegativeSpec, PairSet, draw_negatives, epoch_order


def _pairs(seed=0, num_queries=50, num_items=40):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, num_queries, 600)
    i = (rng.zipf(1.5, 600) - 1) % num_items
    keys = np.unique(q * num_items + i)
    return keys // num_items, keys % num_items


def test_negatives_are_never_own_positives_and_are_deterministic():
    q, i = _pairs()
    num_items = 40
    positives = PairSet(q, i, num_items)
    cdf = np.cumsum(np.bincount(i, minlength=num_items))
    spec = NegativeSpec(num_negatives=31, num_popular=16, seed=3)
    neg, valid = draw_negatives(q, i, spec, 5, cdf, positives, num_items)
    assert neg.shape == (len(q), 31)
    assert not positives.contains(np.repeat(q, 31)[valid.ravel()], neg.ravel()[valid.ravel()]).any()
    assert valid.mean() > 0.99
    # The same rows in another grouping (as in Spark partitions) draw the same items.
    half = len(q) // 2
    a, va = draw_negatives(q[:half], i[:half], spec, 5, cdf, positives, num_items)
    b, vb = draw_negatives(q[half:], i[half:], spec, 5, cdf, positives, num_items)
    assert np.array_equal(np.vstack([a, b]), neg) and np.array_equal(np.vstack([va, vb]), valid)
    # Another epoch draws other items.
    other, _ = draw_negatives(q, i, spec, 6, cdf, positives, num_items)
    assert (other != neg).mean() > 0.5


def test_popular_slots_follow_positive_counts():
    num_items = 10
    i = np.repeat(np.arange(num_items), np.arange(1, num_items + 1) ** 2)
    q = np.arange(len(i))  # one query per pair: exclusions are rare
    positives = PairSet(q, i, num_items)
    cdf = np.cumsum(np.bincount(i, minlength=num_items))
    spec = NegativeSpec(num_negatives=200, num_popular=100, seed=1)
    neg, valid = draw_negatives(q, i, spec, 0, cdf, positives, num_items)
    popular = np.bincount(neg[:, :100][valid[:, :100]], minlength=num_items)
    uniform = np.bincount(neg[:, 100:][valid[:, 100:]], minlength=num_items)
    # A row draws in proportion to counts, its own positive excluded (redrawn).
    counts = (np.arange(1, num_items + 1) ** 2).astype(float)
    expected = np.zeros(num_items)
    for own in i:
        c = counts.copy()
        c[own] = 0
        expected += c / c.sum()
    expected /= len(i)
    assert popular / popular.sum() == pytest.approx(expected, abs=0.006)
    own_share = np.bincount(i, minlength=num_items) / len(i)
    expected_uniform = (1 - own_share) / (num_items - 1)
    assert uniform / uniform.sum() == pytest.approx(expected_uniform, abs=0.006)


def test_a_query_owning_every_item_gets_invalid_slots():
    num_items = 5
    q = np.zeros(num_items, dtype=np.int64)
    i = np.arange(num_items)
    cdf = np.cumsum(np.ones(num_items, dtype=np.int64))
    neg, valid = draw_negatives(
        q, i, NegativeSpec(4, 2, max_rounds=3), 0, cdf, PairSet(q, i, num_items), num_items
    )
    assert not valid.any() and (neg == 0).all()


def test_epoch_order_is_a_seeded_permutation():
    q, i = _pairs()
    a = epoch_order(q, i, seed=1, epoch=0)
    assert sorted(a) == list(range(len(q)))
    assert np.array_equal(a, epoch_order(q, i, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(q, i, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(q, i, seed=2, epoch=0))
