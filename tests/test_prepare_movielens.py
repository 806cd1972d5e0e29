"""The prepare job on the bundled MovieLens-100K (protocol P1 of the design)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def movielens(movielens_prepared):
    result = movielens_prepared
    tables = {
        name: pd.read_parquet(os.path.join(result.path, name))
        for name in ("queries", "items", "train_pairs", "test_pairs", "rejects")
    }
    return result, tables


def test_counts_match_the_data_set(movielens):
    result, tables = movielens
    m = result.manifest
    assert m["tables"]["queries"] == {"read": 943, "accepted": 943, "rejected": 0}
    assert m["tables"]["items"] == {"read": 1682, "accepted": 1682, "rejected": 0}
    assert m["tables"]["labels"] == {"read": 100_000, "accepted": 100_000, "rejected": 0}
    num_train, num_test = len(tables["train_pairs"]), len(tables["test_pairs"])
    assert num_train + num_test == 100_000
    assert 74_000 < num_train < 76_000
    assert len(tables["rejects"]) == 0


def test_split_is_75_25_per_user(movielens):
    _, tables = movielens
    train = tables["train_pairs"].groupby("query_id").size()
    test = tables["test_pairs"].groupby("query_id").size().reindex(train.index, fill_value=0)
    total = train + test
    assert (train == np.maximum(np.floor(total * 0.75 + 0.5), 1)).all()
    merged = tables["train_pairs"].merge(tables["test_pairs"], on=["query_id", "item_id"])
    assert merged.empty


def test_history_holds_only_train_items(movielens):
    result, tables = movielens
    max_len = result.manifest["features"]["queries"]["sequences"][0]["max_len"]
    queries, train = tables["queries"], tables["train_pairs"]
    train_sets = train.groupby("query_idx")["item_idx"].apply(set).to_dict()
    for idx, hist in zip(queries["query_idx"], queries["seq_history"], strict=True):
        items = [h - 1 for h in hist if h > 0]
        assert len(hist) == max_len
        assert set(items) <= train_sets[idx]
        assert len(items) == min(max_len, len(train_sets[idx]))


def test_features_and_spec(movielens):
    result, tables = movielens
    spec = result.manifest["features"]
    assert [n["name"] for n in spec["queries"]["numeric"]] == ["age", "log_train_count"]
    assert [c["name"] for c in spec["queries"]["categorical"]] == [
        "gender",
        "occupation",
        "zip_prefix",
    ]
    assert spec["queries"]["categorical"][0]["vocab_size"] == 3  # M, F and unseen
    assert spec["queries"]["categorical"][1]["vocab_size"] == 22  # 21 occupations
    items = spec["items"]["numeric"]
    assert items[0]["name"] == "year" and items[0]["imputed"] == 1
    assert len(items) == 1 + 19 + 1
    num = np.stack(tables["items"]["num"].to_numpy())
    assert num.shape == (1682, 21) and np.isfinite(num).all()
    assert abs(num[:, 0].mean()) < 1e-3  # standard scaling, the missing year at the mean
    assert sorted(tables["items"]["item_idx"]) == list(range(1682))
