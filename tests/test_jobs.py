"""The jobs as users run them: through spark-submit.sh, in their own Spark process."""

from __future__ import annotations

import json
import os
import re
import subprocess

from .conftest import ROOT


def submit(*args, timeout=600):
    return subprocess.run(
        [os.path.join(ROOT, "spark-submit.sh"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_prepare_job_through_spark_submit(tmp_path):
    out = str(tmp_path / "run")
    done = submit("prepare", "--config", "conf/seed-example.yaml", "--output", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"queries +read +200 +accepted +200 +rejected +0", done.stdout), done.stdout
    with open(os.path.join(out, "prepared", "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["tables"]["labels"]["accepted"] == 929
    assert manifest["split"]["method"] == "given"
    assert manifest["config"]["output"] == out


def test_user_errors_exit_2_with_a_message(tmp_path):
    out = str(tmp_path / "run")
    done = submit(
        "prepare",
        "--config",
        "conf/seed-example.yaml",
        "--output",
        out,
        "--set",
        "dataset.labels.path=/nonexistent/labels.txt",
    )
    assert done.returncode == 2
    # spark-submit passes the Python driver's stderr on through its own stdout.
    output = done.stdout + done.stderr
    assert "error: labels: input /nonexistent/labels.txt does not exist" in output
    assert not os.path.exists(os.path.join(out, "prepared"))

    done = submit(
        "prepare", "--config", "conf/seed-example.yaml", "--set", "prepare.num_partitions=0"
    )
    assert done.returncode == 2
    assert "config key 'prepare.num_partitions': 0 is not allowed" in done.stdout + done.stderr


def test_unknown_job_is_refused():
    done = submit("no-such-job")
    assert done.returncode == 2
    assert "no job 'no-such-job'" in done.stderr
