"""A small generated data set and the config the pipeline tests share."""

from __future__ import annotations

import os

from adjoint_spark.config import load_config
from adjoint_spark.pipeline import run_stages
from adjoint_spark.prepare import run_prepare
from adjoint_spark.synth import TableShape, seed_config, write_seed_dataset
from adjoint_spark.train import run_train

QUERY_SHAPE = TableShape(4, (4, 3), 0)
ITEM_SHAPE = TableShape(5, (4, 5), 1, 6)
SETTINGS = {
    "train": {
        "embedding_dim": 16,
        "feature_dim": 16,
        "query": {"hidden_dim": 32},
        "item": {"hidden_dim": 32, "use_id": True},
        "batch_size": 128,
        "num_negatives": 7,
        "num_popular_negatives": 3,
        "optimizer": "adam",
        "lr": 0.01,
        "epochs": 3,
        "threads": 1,
        "reader_workers": 1,
        "log_every": 1000,
    },
    "index": {"factory": "IVF4096,SQ8", "sweep_queries": 100, "sweep_k": 20},
    "retrieve": {"top_k": 20, "eval_ks": [10, 20]},
}


def config_for(data: dict, output: str, **sections):
    merged = {**data, **SETTINGS, "output": output}
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return load_config(data=merged)


def make_run(spark, folder: str):
    """prepare -> train -> index -> retrieve -> report on 240 queries and 900 items."""
    paths = write_seed_dataset(
        os.path.join(folder, "in"), 240, 900, 6, QUERY_SHAPE, ITEM_SHAPE,
        num_clusters=4, test_pairs_per_query=3, seed=11,
    )  # fmt: skip
    data = seed_config(paths, os.path.join(folder, "out"), QUERY_SHAPE, ITEM_SHAPE,
                       num_partitions=3)  # fmt: skip
    config = config_for(data, data["output"])
    run_prepare(spark, config)
    run_train(spark, config)
    run_stages(config, ["index", "retrieve", "report"])
    return data, config
