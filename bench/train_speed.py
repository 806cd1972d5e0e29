"""Training speed of the memory and stream feeds, and driver memory of the stream feed.

Generates items of the original system's shape (55 numeric, 6 categorical, 1
sequence column), queries and two label sets, the second with 4x the pairs; prepares
both; then trains 2 epochs per case in a child process (whose peak memory is
sampled) and reports the examples per second of the second epoch (the first stream
epoch waits for Spark to write it; later ones are written while the previous trains).

    .venv/bin/python bench/train_speed.py [--items 100000] [--queries 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import OUT, PeakMemory, local_session, save

TRAIN = [
    "train.loss=hinge", "train.margin=0.1", "train.optimizer=adam", "train.lr=0.002",
    "train.num_negatives=31", "train.num_popular_negatives=16", "train.batch_size=512",
    "train.epochs=2", "train.eval_queries=500", "train.patience=0", "train.threads=1",
    "train.reader_workers=2", "train.log_every=100",
]  # fmt: skip


def child(config_path: str, feed: str, result_path: str) -> None:
    """Train in this process and write the history (run by the parent, measured)."""
    from adjoint_spark.config import load_config
    from adjoint_spark.session import setup_logging
    from adjoint_spark.train import run_train

    setup_logging("INFO")
    spark = local_session("bench-train-speed")
    config = load_config(config_path, [*TRAIN, f"train.feed={feed}"])
    result = run_train(spark, config)
    with open(result_path, "w") as fh:
        json.dump(result.history, fh)


def prepare(folder: str, queries: int, items: int, per_query: int) -> str:
    import yaml

    from adjoint_spark.config import load_config
    from adjoint_spark.prepare import run_prepare
    from adjoint_spark.synth import (
        SEED_ITEM_SHAPE,
        SEED_QUERY_SHAPE,
        seed_config,
        write_seed_dataset,
    )

    config_path = os.path.join(folder, "config.yaml")
    if os.path.exists(os.path.join(folder, "run", "prepared", "manifest.json")):
        return config_path
    paths = write_seed_dataset(os.path.join(folder, "in"), queries, items, per_query,
                               num_clusters=64, test_pairs_per_query=2)  # fmt: skip
    data = seed_config(paths, os.path.join(folder, "run"), SEED_QUERY_SHAPE, SEED_ITEM_SHAPE,
                       num_partitions=8)  # fmt: skip
    with open(config_path, "w") as fh:
        yaml.safe_dump(data, fh)
    spark = local_session("bench-train-speed-prepare", driver_memory="6g")
    run_prepare(spark, load_config(config_path))
    return config_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--pairs-per-query", type=int, default=10)
    p.add_argument("--child", nargs=3, metavar=("CONFIG", "FEED", "RESULT"))
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return

    import subprocess

    cases = {}
    for scale in (1, 4):
        folder = os.path.join(OUT, f"speed-{args.items}-{args.queries}-{scale}x")
        per_query = args.pairs_per_query * scale
        cfg = prepare(folder, args.queries, args.items, per_query)
        feeds = ("memory", "stream") if scale == 1 else ("stream",)
        for feed in feeds:
            result_path = os.path.join(folder, f"history-{feed}.json")
            log = open(os.path.join(folder, f"train-{feed}.log"), "w")
            proc = subprocess.Popen([sys.executable, __file__, "--child", cfg, feed, result_path],
                                    stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            with PeakMemory(proc.pid) as mem:
                code = proc.wait()
            if code:
                sys.exit(f"training failed: see {log.name}")
            history = json.load(open(result_path))
            cases[f"{feed} {scale}x"] = {
                "train_pairs": history[-1]["examples"],
                "epoch2_examples_per_second": history[-1]["examples_per_second"],
                "epoch1_examples_per_second": history[0]["examples_per_second"],
                "epoch_seconds": [h["seconds"] for h in history],
                **mem.as_dict(),
            }
            print(f"{feed} {scale}x: {json.dumps(cases[f'{feed} {scale}x'])}", flush=True)
    memory, stream = cases["memory 1x"], cases["stream 1x"]
    result = {
        "cases": cases,
        "stream_over_memory_epoch2": round(
            stream["epoch2_examples_per_second"] / memory["epoch2_examples_per_second"], 3
        ),
        "stream_driver_memory_4x_over_1x": round(
            cases["stream 4x"]["peak_driver_process_mib"] / stream["peak_driver_process_mib"], 3
        ),
    }
    print(json.dumps(result, indent=2))
    print(f"saved {save('train_speed', result)}")


if __name__ == "__main__":
    main()
