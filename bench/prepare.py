"""Benchmark of the prepare job on a generated seed-format data set.

Generates (once, cached under bench/out/) items of the original system's shape
(55 numeric, 6 categorical, 1 sequence column), queries and labels, runs the prepare
job through spark-submit.sh in local mode, and reports input rows per second per core
and the peak memory of the driver process tree.

    .venv/bin/python bench/prepare.py [--items 1000000] [--queries 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adjoint_spark.synth import SEED_ITEM_SHAPE, SEED_QUERY_SHAPE, seed_config, write_seed_dataset
from bench.common import OUT, ROOT, run_measured, save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=100_000)
    p.add_argument("--pairs-per-query", type=int, default=10)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="8g")
    p.add_argument("--partitions", type=int, default=8)
    args = p.parse_args()
    cores = int(args.master[6:-1]) if args.master.startswith("local[") else os.cpu_count()

    folder = os.path.join(OUT, f"seed-{args.items}-{args.queries}-{args.pairs_per_query}")
    if not os.path.exists(os.path.join(folder, "labels.txt")):
        start = time.perf_counter()
        write_seed_dataset(
            folder + ".tmp", args.queries, args.items, args.pairs_per_query, num_clusters=64
        )
        os.rename(folder + ".tmp", folder)
        print(f"generated {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    paths = {n: os.path.join(folder, f"{n}.txt") for n in ("queries", "items", "labels")}
    input_bytes = sum(os.path.getsize(p) for p in paths.values())

    output = os.path.join(OUT, "prepare-run")
    config = seed_config(
        paths, output, SEED_QUERY_SHAPE, SEED_ITEM_SHAPE, num_partitions=args.partitions
    )
    config["spark"] = {"conf": {"spark.sql.shuffle.partitions": str(4 * cores)}}
    config_path = os.path.join(OUT, "prepare-bench.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump(config, fh)

    cmd = [
        os.path.join(ROOT, "spark-submit.sh"),
        "--master",
        args.master,
        "--driver-memory",
        args.driver_memory,
        "prepare",
        "--config",
        config_path,
    ]
    seconds, memory, code = run_measured(cmd, os.path.join(OUT, "prepare-bench.log"))
    if code != 0:
        sys.exit(f"prepare failed (exit {code}); see {OUT}/prepare-bench.log")
    with open(os.path.join(output, "prepared", "manifest.json")) as fh:
        manifest = json.load(fh)
    rows = sum(t["read"] for t in manifest["tables"].values())
    result = {
        "items": args.items,
        "queries": args.queries,
        "label_rows": manifest["tables"]["labels"]["read"],
        "input_rows": rows,
        "input_mib": round(input_bytes / (1 << 20), 1),
        "master": args.master,
        "cores": cores,
        "wall_seconds_incl_startup": round(seconds, 1),
        "rows_per_second_per_core": round(rows / seconds / cores),
        "mib_per_second_per_core": round(input_bytes / (1 << 20) / seconds / cores, 2),
        **memory,
        "driver_memory_setting": args.driver_memory,
    }
    print(json.dumps(result, indent=2))
    print(f"saved {save('prepare', result)}")


if __name__ == "__main__":
    main()
