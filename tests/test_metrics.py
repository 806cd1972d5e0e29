import math

import numpy as np
import pytest

from adjoint_spark.metrics import evaluate_top_k


def test_metrics_match_a_hand_computation():
    top = np.array([[5, 1, 7], [2, 3, 4], [1, 2, 3]])
    test = [np.array([1, 9]), np.array([2]), np.array([], dtype=int)]
    m = evaluate_top_k(top, test, ks=(2,))
    ndcg_q0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["num_queries"] == 2  # the query without test items is left out
    assert m["precision@2"] == pytest.approx(0.5)
    assert m["recall@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["ndcg@2"] == pytest.approx((ndcg_q0 + 1.0) / 2)
    assert m["map@2"] == pytest.approx(((1 / 2) / 2 + 1.0) / 2)
    assert m["micro_recall@2"] == pytest.approx(2 / 3)


def test_perfect_and_empty_rankings():
    test = [np.array([3, 4]), np.array([0])]
    perfect = evaluate_top_k(np.array([[3, 4, 9], [0, 8, 9]]), test, ks=(1, 3))
    assert perfect["ndcg@3"] == pytest.approx(1.0) and perfect["map@3"] == pytest.approx(1.0)
    assert perfect["recall@3"] == pytest.approx(1.0)
    assert perfect["precision@1"] == pytest.approx(1.0)
    empty = evaluate_top_k(np.full((2, 3), -1), test, ks=(3,))
    assert empty["ndcg@3"] == 0.0 and empty["recall@3"] == 0.0


def test_ideal_dcg_uses_at_most_k_items():
    # 5 relevant items, K = 2, both ranked items relevant: NDCG and AP are 1.
    m = evaluate_top_k(np.array([[0, 1]]), [np.arange(5)], ks=(2,))
    assert m["ndcg@2"] == pytest.approx(1.0) and m["map@2"] == pytest.approx(1.0)
    assert m["recall@2"] == pytest.approx(2 / 5)
