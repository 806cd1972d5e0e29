"""Runs pipeline stages in a process of their own (to be killed, or with task retries).

python tests/stage_runner.py CONFIG.json STAGE[,STAGE...] [MASTER]
"""

from __future__ import annotations

import json
import sys

from pyspark.sql import SparkSession

from adjoint_spark.config import load_config
from adjoint_spark.pipeline import run_stages
from adjoint_spark.session import setup_logging


def main(config_path: str, stages: str, master: str = "local[2]") -> int:
    setup_logging("INFO")
    with open(config_path) as fh:
        config = load_config(data=json.load(fh))
    (
        SparkSession.builder.master(master)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "4")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    return run_stages(config, stages.split(","))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
