"""The whole pipeline through spark-submit.sh: in local mode, and on a real standalone
cluster (a master and two workers on loopback addresses) against the same config; speculative
execution on that cluster (local mode never speculates)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import time

import pandas as pd
import pytest

from .artifacts import index_contents, recommendations
from .conftest import ROOT
from .standalone import StandaloneCluster

# The bundled MovieLens-100K with training cut short (the comparison needs the same
# config on both sides, not a good model).
SETTINGS = [
    "--config", "conf/movielens-100k.yaml",
    "--set", "train.epochs=2", "--set", "train.patience=0", "--set", "train.threads=1",
]  # fmt: skip
OUTPUTS = (
    "prepared/manifest.json", "model/model.pt", "model/model.json", "model/history.json",
    "index/items.faiss", "index/manifest.json", "metrics.json", "report/index.md",
)  # fmt: skip
TABLES = ("vectors/items", "vectors/queries", "recommendations")
EXECUTORS = ["--conf", "spark.executor.cores=1", "--conf", "spark.executor.memory=1g"]


def submit(
    *args: str, timeout: int = 1200, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [os.path.join(ROOT, "spark-submit.sh"), *args],
        cwd=ROOT,
        # The driver binds to loopback too (not the host's first interface).
        env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.perf_counter() - start


def read_json(out: str, name: str) -> dict:
    with open(os.path.join(out, name)) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local") / "run")
    done, seconds = submit("--master", "local[2]", "pipeline", *SETTINGS, "--output", out)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    print(f"pipeline in local[2]: {seconds:.0f} s")
    return out, done.stdout


def test_pipeline_job_writes_every_output(local_run):
    out, stdout = local_run
    for name in OUTPUTS:
        assert os.path.isfile(os.path.join(out, name)), name
    for name in TABLES:
        assert any(f.endswith(".parquet") for f in os.listdir(os.path.join(out, name))), name
    queries = read_json(out, "prepared/manifest.json")["num_queries"]
    assert re.search(rf"recommendations: .*\(\d[\d,]* rows, {queries:,} queries\)", stdout)
    assert f"report: {out}/report/index.md" in stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A master and two workers (127.0.0.1 and 127.0.0.2), one core and a folder each."""
    with StandaloneCluster(str(tmp_path_factory.mktemp("cluster")), workers=2) as started:
        yield started


@pytest.fixture(scope="module")
def cluster_run(cluster, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("on-cluster") / "run")
    done, seconds = submit(
        "--master", cluster.master_url, *EXECUTORS, "pipeline", *SETTINGS,
        "--output", "file://" + out,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    print(f"pipeline on the loopback cluster: {seconds:.0f} s")
    return out


def test_pipeline_on_a_standalone_cluster_matches_local_mode(local_run, cluster, cluster_run):
    local, out = local_run[0], cluster_run
    # The executors ran on both workers, each in its own working folder, and each was
    # sent the package as the zip that spark-submit.sh ships with --py-files.
    status = cluster.status()
    assert status["aliveworkers"] == 2
    assert [app["state"] for app in status["completedapps"]] == ["FINISHED"]
    for i in range(2):
        work = os.path.join(cluster.folder, f"worker-{i}")
        shipped = glob.glob(os.path.join(work, "app-*", "*", "adjoint_spark.zip"))
        assert shipped, f"worker-{i} ran no executor of the pipeline: {os.listdir(work)}"

    for name in OUTPUTS:
        assert os.path.isfile(os.path.join(out, name)), name
    a, b = read_json(local, "prepared/manifest.json"), read_json(out, "prepared/manifest.json")
    assert a["tables"] == b["tables"]
    assert (a["num_queries"], a["num_items"]) == (b["num_queries"], b["num_items"])
    for name in TABLES:
        assert len(pd.read_parquet(os.path.join(local, name))) == len(
            pd.read_parquet(os.path.join(out, name))
        ), name
    ia, ib = read_json(local, "index/manifest.json"), read_json(out, "index/manifest.json")
    assert (ia["ntotal"], ia["nlist"], ia["factory"]) == (ib["ntotal"], ib["nlist"], ib["factory"])
    ma, mb = read_json(local, "metrics.json"), read_json(out, "metrics.json")
    for key in ("num_queries", "queries_with_recommendations", "recommendation_rows", "top_k"):
        assert ma[key] == mb[key], key
    for key in ("exact", "index"):
        assert set(ma[key]) == set(mb[key])
        for metric, value in ma[key].items():
            if isinstance(value, str):
                assert value == mb[key][metric], (key, metric)
            else:
                assert abs(value - mb[key][metric]) <= 0.01, (key, metric, value, mb[key][metric])


def speculative_successes(event_log_dir: str) -> int:
    """Speculative task attempts that finished successfully, read from Spark's event log."""
    count = 0
    # Spark 4 writes rolling event logs: a folder per application.
    for name in glob.glob(os.path.join(event_log_dir, "*", "events_*")):
        with open(name) as fh:
            for line in fh:
                event = json.loads(line)
                if event.get("Event") != "SparkListenerTaskEnd":
                    continue
                if event["Task Info"].get("Speculative") and not event["Task Info"]["Failed"]:
                    count += 1
    return count


def test_speculative_attempts_give_the_same_index_and_recommendations(
    cluster, cluster_run, tmp_path
):
    # The first attempt of one partition of each executor stage sleeps; speculation
    # starts a second attempt, which finishes first.
    out = str(tmp_path / "run")
    for name in ("prepared", "model"):
        shutil.copytree(os.path.join(cluster_run, name), os.path.join(out, name))
    events = tmp_path / "events"
    events.mkdir()
    speculation = [
        "--conf", "spark.speculation=true", "--conf", "spark.speculation.interval=200ms",
        "--conf", "spark.speculation.quantile=0.5", "--conf", "spark.speculation.multiplier=2",
        "--conf", "spark.speculation.minTaskRuntime=1s", "--conf", "spark.eventLog.enabled=true",
        "--conf", "spark.eventLog.compress=false", "--conf", f"spark.eventLog.dir=file://{events}",
    ]  # fmt: skip
    env = {"ADJOINT_SLOW_TASKS": "embed:1;shards:1;search:1", "ADJOINT_SLOW_TASK_SECONDS": "30"}
    for job in ("index", "retrieve"):
        done, seconds = submit(
            "--master", cluster.master_url, *EXECUTORS, *speculation, job, *SETTINGS,
            "--output", "file://" + out, env=env,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        print(f"{job} with speculation on the loopback cluster: {seconds:.0f} s")
    # embed (items), shards, embed (queries), search: one speculative success each.
    assert speculative_successes(str(events)) >= 4
    assert index_contents(out) == index_contents(cluster_run)
    got, expected = recommendations(out), recommendations(cluster_run)
    assert not got.duplicated(["query_idx", "rank"]).any()
    pd.testing.assert_frame_equal(got, expected)
