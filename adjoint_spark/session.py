"""The Spark session a job runs in, and logging set-up for jobs."""

from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

from adjoint_spark.config import SparkSettings

# Settings every stage relies on: Arrow for pandas UDFs, and the legacy behaviour of
# nothing else. ANSI mode stays on (Spark 4 default); parsing uses try_cast.
DEFAULT_CONF = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
}


def get_spark(settings: SparkSettings) -> SparkSession:
    """The active session, or a new one with the config's defaults.

    Settings given to spark-submit win: the config only fills in what is unset.
    """
    builder = SparkSession.builder.appName(settings.app_name)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    from pyspark import SparkConf, SparkContext

    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        # Started by spark-submit: connect to its JVM first, so that SparkConf() sees the
        # --master and --conf it was given (without the JVM, SparkConf is empty and the
        # defaults below would override them).
        SparkContext._ensure_initialized()
    # Python workers of a session started here (not by spark-submit) use this Python,
    # which has the dependencies; the interpreter on PATH may not.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    submitted = SparkConf()
    if settings.master and not submitted.contains("spark.master"):
        builder = builder.master(settings.master)
    elif not submitted.contains("spark.master"):
        builder = builder.master("local[2]")
    for key, value in {**DEFAULT_CONF, **settings.conf}.items():
        if not submitted.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # Petastorm logs a line per dataset it opens (it cannot find its own metadata in
    # Parquet written by Spark, which is expected here).
    logging.getLogger("petastorm").setLevel(logging.WARNING)
