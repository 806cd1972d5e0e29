"""Shared fixtures: one local[2] Spark session for the whole test run."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOVIELENS = os.path.join(ROOT, "data", "movielens-100k")


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("adjoint-spark-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def pipeline_run(spark, tmp_path_factory):
    """A whole pipeline run on small generated data: (data settings, config)."""
    from .pipeline_data import make_run

    return make_run(spark, str(tmp_path_factory.mktemp("pipeline")))


@pytest.fixture(scope="session")
def movielens_prepared(spark, tmp_path_factory):
    """The bundled MovieLens-100K prepared with its shipped config (a PrepareResult)."""
    from adjoint_spark.config import load_config
    from adjoint_spark.prepare import run_prepare

    out = str(tmp_path_factory.mktemp("ml"))
    config = load_config(os.path.join(ROOT, "conf", "movielens-100k.yaml"), [f"output={out}"])
    return run_prepare(spark, config)
