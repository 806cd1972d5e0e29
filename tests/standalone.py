"""A real Spark standalone cluster on loopback: a master on 127.0.0.1 and N workers on
127.0.0.1, 127.0.0.2, ... (one address each, so that Spark sees N hosts: it never runs a
speculative copy of a task on the host of the first attempt), started with the
``spark-class`` of the installed pyspark, each worker in its own working folder.

    with StandaloneCluster(folder, workers=2) as cluster:
        run(["./spark-submit.sh", "--master", cluster.master_url, ...])

Every daemon runs in its own process group and is killed on exit, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


class StandaloneCluster:
    def __init__(self, folder: str, workers: int = 2, cores: int = 1, memory: str = "2g"):
        self.folder = folder
        self.workers = workers
        self.cores = cores
        self.memory = memory
        self.port = free_port()
        self.ui_port = free_port()
        self.master_url = f"spark://127.0.0.1:{self.port}"
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def _start(self, name: str, host: str, *args: str) -> None:
        home = spark_home()
        log = open(os.path.join(self.folder, f"{name}.log"), "w")
        env = {
            **os.environ,
            "SPARK_HOME": home,
            "SPARK_LOCAL_IP": host,
            "SPARK_LOG_DIR": self.folder,
            "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
        }
        proc = subprocess.Popen(
            [os.path.join(home, "bin", "spark-class"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.procs.append((name, proc))

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=5) as r:
            return json.load(r)

    def _wait_for_workers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log(name)}")
            try:
                if self.status().get("aliveworkers", 0) >= self.workers:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.workers} workers did not register in {timeout:.0f} s")

    def log(self, name: str) -> str:
        with open(os.path.join(self.folder, f"{name}.log")) as fh:
            return fh.read()[-3000:]

    def __enter__(self) -> StandaloneCluster:
        os.makedirs(self.folder, exist_ok=True)
        try:
            self._start(
                "master", "127.0.0.1", "org.apache.spark.deploy.master.Master",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--webui-port", str(self.ui_port),
            )  # fmt: skip
            for i in range(self.workers):
                work = os.path.join(self.folder, f"worker-{i}")
                os.makedirs(work, exist_ok=True)
                host = f"127.0.0.{i + 1}"
                self._start(
                    f"worker-{i}", host, "org.apache.spark.deploy.worker.Worker", self.master_url,
                    "--host", host, "--cores", str(self.cores),
                    "--memory", self.memory, "--work-dir", work, "--webui-port", "0",
                )  # fmt: skip
            self._wait_for_workers(120)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
