"""Training for real on small generated data with a planted cluster structure."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from adjoint_spark.config import load_config
from adjoint_spark.prepare import run_prepare
from adjoint_spark.synth import TableShape, seed_config, write_seed_dataset
from adjoint_spark.train import run_train

QUERY_SHAPE = TableShape(4, (4, 3), 0)
ITEM_SHAPE = TableShape(5, (4, 5), 1, 6)
TRAIN = {
    "embedding_dim": 16,
    "feature_dim": 16,
    "query": {"hidden_dim": 32},
    "item": {"hidden_dim": 32, "use_id": True},
    "dropout": 0.1,
    "batch_size": 128,
    "num_negatives": 7,
    "num_popular_negatives": 3,
    "optimizer": "adam",
    "lr": 0.01,
    "threads": 1,
    "patience": 0,
    "reader_workers": 1,
    "log_every": 1000,
}


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("train"))
    paths = write_seed_dataset(
        os.path.join(folder, "in"),
        240,
        160,
        6,
        QUERY_SHAPE,
        ITEM_SHAPE,
        num_clusters=4,
        test_pairs_per_query=3,
        seed=5,
    )
    data = seed_config(
        paths, os.path.join(folder, "out"), QUERY_SHAPE, ITEM_SHAPE, num_partitions=2
    )
    run_prepare(spark, load_config(data=data))
    return data


def config_for(data: dict, output: str, **train):
    return load_config(data={**data, "output": output, "train": {**TRAIN, **train}})


def copy_prepared(data: dict, output: str) -> None:
    import shutil

    shutil.copytree(os.path.join(data["output"], "prepared"), os.path.join(output, "prepared"))


@pytest.mark.parametrize("loss", ["hinge", "logistic", "sampled_softmax", "in_batch_softmax"])
def test_loss_falls_and_planted_clusters_are_recovered(spark, prepared, tmp_path, loss):
    out = str(tmp_path)
    copy_prepared(prepared, out)
    result = run_train(spark, config_for(prepared, out, loss=loss, epochs=6))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    # Test items lie in the query's cluster (40 of 160 items): a model that found the
    # clusters ranks them ~4x above chance (recall@10 of chance: about 10/157).
    assert result.best_metrics["recall@10"] > 3 * 10 / 157, result.best_metrics


def test_artifacts_load_safely(spark, prepared, tmp_path):
    out = str(tmp_path)
    copy_prepared(prepared, out)
    result = run_train(spark, config_for(prepared, out, epochs=2))
    state = torch.load(os.path.join(result.path, "model.pt"), weights_only=True)
    assert "item_table.weight" in state and state["item_table.weight"].shape == (161, 16)
    # The item-id table, shared by the model and both towers, is stored once.
    tables = [k for k in state if k.endswith("item_table.weight")]
    assert len(tables) == 3
    assert len({state[k].untyped_storage().data_ptr() for k in tables}) == 1
    with open(os.path.join(result.path, "model.json")) as fh:
        info = json.load(fh)
    assert info["metrics"] == result.best_metrics and info["best_epoch"] == result.best_epoch
    assert info["features"]["items"]["sequences"][0]["max_len"] == 6
    with open(os.path.join(result.path, "history.json")) as fh:
        assert [h["epoch"] for h in json.load(fh)] == [1, 2]
    assert os.path.getsize(os.path.join(result.path, "training.png")) > 1000
    assert not os.path.exists(os.path.join(out, "_checkpoint"))


def test_resume_continues_where_it_stopped(spark, prepared, tmp_path):
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    for out in (whole, resumed):
        copy_prepared(prepared, out)
    full = run_train(spark, config_for(prepared, whole, epochs=4))

    stopped = run_train(spark, config_for(prepared, resumed, epochs=4), stop_after_epochs=2)
    assert stopped.path is None and len(stopped.history) == 2
    assert os.path.exists(os.path.join(resumed, "_checkpoint", "train.pt"))
    done = run_train(spark, config_for(prepared, resumed, epochs=4))
    assert [h["epoch"] for h in done.history] == [1, 2, 3, 4]
    # Negatives and order are drawn from counters and the RNG state is restored, so
    # the resumed run ends with the same weights as the uninterrupted one (CPU).
    a = torch.load(os.path.join(full.path, "model.pt"), weights_only=True)
    b = torch.load(os.path.join(done.path, "model.pt"), weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert [h["loss"] for h in done.history] == [h["loss"] for h in full.history]


def test_both_feeds_give_the_same_batches(spark, prepared, tmp_path):
    from adjoint_spark.feed import MemoryFeed
    from adjoint_spark.sampling import NegativeSpec
    from adjoint_spark.storage import Storage
    from adjoint_spark.stream import StreamFeed

    prep = os.path.join(prepared["output"], "prepared")
    manifest = Storage(spark).read_json(os.path.join(prep, "manifest.json"))
    spec = NegativeSpec(num_negatives=5, num_popular=2, seed=9)
    memory = MemoryFeed(prep, manifest, spec, batch_size=100, workers=2)
    stream = StreamFeed(spark, prep, manifest, spec, 100, str(tmp_path / "stream"), workers=3)
    assert np.array_equal(stream.item_cdf, memory.item_cdf)
    for epoch in (0, 1):
        got = list(stream.batches(epoch, prefetch=False))
        want = list(memory.batches(epoch))
        assert len(got) == len(want) == memory.num_batches()
        for a, b in zip(got, want, strict=True):
            for name in ("pos", "neg", "neg_valid"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            for part in ("query", "items"):
                x, y = getattr(a, part), getattr(b, part)
                assert x.keys() == y.keys()
                for key in x:
                    assert torch.equal(x[key], y[key]), (part, key)
    stream.close()
    # Each epoch's example files are removed once read.
    assert not [p for p in os.listdir(tmp_path / "stream") if p.startswith("epoch=")]


def test_stream_training_matches_memory_training(spark, prepared, tmp_path):
    runs = {}
    for feed in ("memory", "stream"):
        out = str(tmp_path / feed)
        copy_prepared(prepared, out)
        runs[feed] = run_train(spark, config_for(prepared, out, epochs=2, feed=feed))
        assert not os.path.exists(os.path.join(out, "_stream"))
    # Same batches, same initial weights, one thread: the same losses and metrics.
    assert [h["loss"] for h in runs["stream"].history] == [
        h["loss"] for h in runs["memory"].history
    ]
    assert runs["stream"].best_metrics == runs["memory"].best_metrics


def test_cpu_copy_keeps_shared_tensors_shared_and_copies_the_rest():
    from adjoint_spark.train import cpu_copy

    table = torch.arange(12.0).reshape(4, 3)
    other = torch.ones(2)
    state = {"a": table, "b": table, "c": other, "d": table[1:]}
    copy = cpu_copy(state)
    assert copy["a"] is copy["b"] and copy["a"] is not table
    assert copy["d"] is not copy["a"]  # a view of other shape is a tensor of its own
    for name, tensor in state.items():
        assert torch.equal(copy[name], tensor)
    table += 1  # training goes on: the copy keeps the weights of its epoch
    assert copy["a"][0, 0] == 0.0
