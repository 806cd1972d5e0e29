"""Data-parallel training with TorchDistributor: two CPU processes (gloo) against one,
on the bundled MovieLens-100K; and the pure parts of sharding."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from adjoint_spark.config import ConfigError, load_config
from adjoint_spark.distributed import count_row_groups, read_train_shard, step_sizes
from adjoint_spark.train import run_train

from .conftest import ROOT

EPOCHS = 3
# The shipped config, cut to a few epochs; every epoch is evaluated on every test user.
TRAIN = [f"train.epochs={EPOCHS}", "train.patience=0", "train.threads=1", "train.log_every=1000"]


def test_step_sizes_split_like_array_split():
    for num_pairs, num_steps in [(10, 3), (512, 512), (1000, 7), (5, 5)]:
        sizes = step_sizes(num_pairs, num_steps)
        expected = [len(s) for s in np.array_split(np.arange(num_pairs), num_steps)]
        assert sizes.tolist() == expected


def test_stream_feed_cannot_be_distributed():
    with pytest.raises(ConfigError, match="train.num_processes"):
        load_config(
            os.path.join(ROOT, "conf", "movielens-100k.yaml"),
            ["train.num_processes=2", "train.feed=stream"],
        )


def test_shards_are_disjoint_and_cover_every_train_pair(movielens_prepared):
    import pandas as pd

    path = movielens_prepared.path
    assert count_row_groups(os.path.join(path, "train_pairs")) >= 2
    shards = [read_train_shard(path, rank, 2, workers=1) for rank in range(2)]
    assert all(len(q) > 0 for q, _ in shards)
    got = pd.DataFrame(
        {"q": np.concatenate([q for q, _ in shards]), "i": np.concatenate([i for _, i in shards])}
    )
    expected = pd.read_parquet(os.path.join(path, "train_pairs"))[["query_idx", "item_idx"]]
    expected.columns = ["q", "i"]
    assert not got.duplicated().any()
    key = ["q", "i"]
    pd.testing.assert_frame_equal(
        got.sort_values(key).reset_index(drop=True),
        expected.sort_values(key).reset_index(drop=True).astype(got.dtypes),
    )


def train_run(spark, prepared: str, out: str, num_processes: int):
    shutil.copytree(prepared, os.path.join(out, "prepared"))
    overrides = [f"output={out}", f"train.num_processes={num_processes}", *TRAIN]
    config = load_config(os.path.join(ROOT, "conf", "movielens-100k.yaml"), overrides)
    return run_train(spark, config)


def test_two_processes_reach_single_process_quality(spark, movielens_prepared, tmp_path):
    one = train_run(spark, movielens_prepared.path, str(tmp_path / "one"), 1)
    two = train_run(spark, movielens_prepared.path, str(tmp_path / "two"), 2)

    # The same artifacts, the same architecture.
    assert sorted(os.listdir(tmp_path / "one" / "model")) == sorted(
        os.listdir(tmp_path / "two" / "model")
    )
    a = torch.load(tmp_path / "one" / "model" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model" / "model.pt", weights_only=True)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    meta_one = json.load(open(tmp_path / "one" / "model" / "model.json"))
    meta_two = json.load(open(tmp_path / "two" / "model" / "model.json"))
    assert meta_one["features"] == meta_two["features"]

    # Every epoch ran on every pair once, and the towers learned as much.
    history = json.load(open(tmp_path / "two" / "model" / "history.json"))
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    num_train = movielens_prepared.manifest["split"]["num_train"]
    assert all(h["examples"] == num_train for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    print("1 process:", one.best_metrics, "\n2 processes:", two.best_metrics)
    for metric in ("ndcg@10", "recall@40"):
        assert abs(two.best_metrics[metric] - one.best_metrics[metric]) <= 0.02, metric
    assert two.best_metrics["ndcg@10"] > 0.35  # far above popularity (0.256)
