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
    times = ["train_ts_mean", "train_ts_first", "train_ts_last"]
    assert [n["name"] for n in spec["queries"]["numeric"]] == ["age", "log_train_count", *times]
    assert [c["name"] for c in spec["queries"]["categorical"]] == [
        "gender",
        "occupation",
        "zip_prefix",
    ]
    assert spec["queries"]["categorical"][0]["vocab_size"] == 3  # M, F and unseen
    assert spec["queries"]["categorical"][1]["vocab_size"] == 22  # 21 occupations
    items = spec["items"]["numeric"]
    assert items[0]["name"] == "year" and items[0]["imputed"] == 1
    assert len(items) == 1 + 19 + 1 + 3
    num = np.stack(tables["items"]["num"].to_numpy())
    assert num.shape == (1682, 24) and np.isfinite(num).all()
    assert abs(num[:, 0].mean()) < 1e-3  # standard scaling, the missing year at the mean
    assert sorted(tables["items"]["item_idx"]) == list(range(1682))


@pytest.mark.parametrize("table,key", [("queries", "query_idx"), ("items", "item_idx")])
def test_label_times_come_from_train_pairs_only(movielens, table, key):
    result, tables = movielens
    spec = result.manifest["features"][table]["numeric"]
    first = [n["name"] for n in spec].index("train_ts_mean")
    frame = tables[table].sort_values(key)
    scaled = np.stack(frame["num"].to_numpy())[:, first : first + 3].astype(np.float64)
    mean = np.array([spec[first + j]["mean"] for j in range(3)])
    std = np.array([spec[first + j]["std"] for j in range(3)])
    seconds = scaled * std + mean

    # The reference: mean, first and last time of the entity's train pairs; an entity
    # with no train pair takes the mean over all train pairs.
    train = tables["train_pairs"]
    stats = train.groupby(key)["ts"].agg(["mean", "min", "max"])
    expected = np.full((len(frame), 3), train["ts"].mean())
    expected[stats.index.to_numpy()] = stats.to_numpy()
    np.testing.assert_allclose(seconds, expected, rtol=0, atol=1e-5 * std.max())  # float32
    if table == "items":
        assert len(stats) < len(frame), "some movies have no train pair"
