"""Failures on purpose: task retries, killed stages, damaged input artifacts, unsafe
files, and determinism (the same seed and config give the same outputs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from adjoint_spark.config import ConfigError, load_config
from adjoint_spark.faults import InjectedFault, TaskFaults, maybe_fail_task, parse_fail_tasks
from adjoint_spark.index import run_index
from adjoint_spark.pipeline import run_stages
from adjoint_spark.storage import ArtifactError, Staging, Storage

from .artifacts import index_contents, recommendations
from .conftest import ROOT
from .pipeline_data import SETTINGS, config_for

OUTPUTS = ("prepared", "model", "vectors", "index", "recommendations", "metrics.json")


def copy_run(config, out: str, names=OUTPUTS) -> None:
    for name in names:
        src = os.path.join(config.output, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(out, name))
        else:
            shutil.copy(src, os.path.join(out, name))


def child(data: dict, out: str, stages: str, env: dict, master: str = "local[2]"):
    """Run ``stages`` on ``out`` in a new Python + JVM, with fault switches in ``env``."""
    path = os.path.join(out, "config.json")
    with open(path, "w") as fh:
        json.dump({**data, **SETTINGS, "output": out}, fh)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "stage_runner.py"), path, stages, master],
        cwd=ROOT,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def snapshot(out: str) -> dict[str, bytes]:
    """Every published file (``_staging`` and the child's config left out)."""
    found = {}
    for root, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if d not in ("_staging", "_checkpoint")]
        for name in files:
            path = os.path.join(root, name)
            if name != "config.json":
                found[os.path.relpath(path, out)] = open(path, "rb").read()
    return found


def test_fault_switch_parsing_and_first_attempt_only():
    assert parse_fail_tasks("embed:0,2; shards:1") == {
        "embed": frozenset({0, 2}),
        "shards": frozenset({1}),
    }
    with pytest.raises(ValueError, match="expected STAGE:P"):
        parse_fail_tasks("merge:1")
    maybe_fail_task("embed", TaskFaults(fail=frozenset({0})))  # outside a task: nothing to fail


def test_task_retries_complete_with_identical_outputs(pipeline_run, tmp_path):
    data, config = pipeline_run
    out = str(tmp_path)
    copy_run(config, out, ("prepared", "model"))
    done = child(
        data, out, "index,retrieve",
        {"ADJOINT_FAIL_TASKS": "embed:0,1;shards:0,2;search:1"}, master="local[2,4]",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(InjectedFault.__name__) >= 5, "the faults did not fire"
    assert index_contents(out) == index_contents(config.output)
    got, expected = recommendations(out), recommendations(config.output)
    assert not got.duplicated(["query_idx", "rank"]).any()
    pd.testing.assert_frame_equal(got, expected)


def test_task_faults_without_retries_fail_and_publish_nothing(pipeline_run, tmp_path):
    data, config = pipeline_run
    out = str(tmp_path)
    copy_run(config, out)
    before = snapshot(out)
    done = child(data, out, "index", {"ADJOINT_FAIL_TASKS": "shards:0"}, master="local[2]")
    assert done.returncode != 0 and InjectedFault.__name__ in done.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "stages, phase",
    [
        ("prepare", "prepare/write"),
        ("index", "index/shards"),
        ("index", "index/merge"),
        ("retrieve", "retrieve/search"),
    ],
)
def test_killed_stage_leaves_outputs_and_rerun_completes(spark, pipeline_run, tmp_path,
                                                         stages, phase):  # fmt: skip
    data, config = pipeline_run
    out = str(tmp_path)
    copy_run(config, out)
    before = snapshot(out)
    done = child(data, out, stages, {"ADJOINT_KILL_AT": phase})
    assert done.returncode == -9, done.stderr[-3000:]
    assert f"killing the driver at the start of '{phase}'" in done.stderr
    assert snapshot(out) == before

    # A rerun clears what the killed run left and publishes the same outputs again.
    run_stages(config_for(data, out), stages.split(","))
    assert os.listdir(os.path.join(out, "_staging")) == []
    after = snapshot(out)
    if stages == "prepare":
        for table in ("queries", "items", "train_pairs", "test_pairs", "rejects"):
            a = pd.read_parquet(os.path.join(out, "prepared", table))
            b = pd.read_parquet(os.path.join(config.output, "prepared", table))
            key = [c for c in ("query_idx", "item_idx", "row") if c in a.columns]
            a, b = (f.sort_values(key).reset_index(drop=True) for f in (a, b))
            pd.testing.assert_frame_equal(a, b)
    else:
        assert index_contents(out) == index_contents(config.output)
        pd.testing.assert_frame_equal(recommendations(out), recommendations(config.output))
    assert {k.split("/")[0] for k in after} == {k.split("/")[0] for k in before}


def test_killed_training_resumes_and_reaches_every_epoch(spark, pipeline_run, tmp_path):
    data, config = pipeline_run
    out = str(tmp_path)
    copy_run(config, out, ("prepared", "model"))
    before = snapshot(out)
    done = child(data, out, "train", {"ADJOINT_KILL_AFTER_EPOCHS": "2"})
    assert done.returncode == -9, done.stderr[-3000:]
    assert snapshot(out) == before  # the published model is untouched
    assert os.path.exists(os.path.join(out, "_checkpoint", "train.pt"))

    run_stages(config_for(data, out), ["train"])
    history = json.load(open(os.path.join(out, "model", "history.json")))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    resumed = torch.load(os.path.join(out, "model", "model.pt"), weights_only=True)
    reference = torch.load(os.path.join(config.output, "model", "model.pt"), weights_only=True)
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_interrupted_publish_is_restored(spark, tmp_path):
    storage = Storage(spark)
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "_staging", "index-0123456789ab-previous"))
    open(os.path.join(out, "_staging", "index-0123456789ab-previous", "f"), "w").write("old")
    os.makedirs(os.path.join(out, "_staging", "index-ba9876543210"))
    with Staging(storage, out, "index") as stage:
        assert open(os.path.join(out, "index", "f")).read() == "old"
        assert os.listdir(os.path.join(out, "_staging")) == [os.path.basename(stage.path)]


def test_same_seed_same_outputs(spark, pipeline_run, tmp_path):
    data, config = pipeline_run
    out = str(tmp_path)
    run_stages(config_for(data, out), ["prepare", "train", "index", "retrieve"])
    for table in ("queries", "items", "train_pairs", "test_pairs"):
        a = pd.read_parquet(os.path.join(out, "prepared", table))
        b = pd.read_parquet(os.path.join(config.output, "prepared", table))
        key = [c for c in ("query_idx", "item_idx") if c in a.columns]
        a, b = (f.sort_values(key) for f in (a, b))
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert (
        open(os.path.join(out, "model", "model.pt"), "rb").read()
        == open(os.path.join(config.output, "model", "model.pt"), "rb").read()
    )
    assert index_contents(out) == index_contents(config.output)
    pd.testing.assert_frame_equal(recommendations(out), recommendations(config.output))


def test_unsafe_files_are_refused_without_running_them(spark, pipeline_run, tmp_path):
    data, config = pipeline_run
    marker = tmp_path / "executed"
    yaml_path = tmp_path / "evil.yaml"
    yaml_path.write_text(f"output: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(yaml_path))

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = str(tmp_path / "run")
    copy_run(config, out, ("prepared", "model"))
    torch.save({"item_tower.x": Payload()}, os.path.join(out, "model", "model.pt"))
    with pytest.raises(ArtifactError, match=r"model\.pt cannot be loaded as a plain state dict"):
        run_index(spark, config_for(data, out))
    assert not marker.exists()
    assert not os.path.exists(os.path.join(out, "index"))
