"""Shared helpers of the benchmarks: peak memory of a process tree, timing, reports."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")


class PeakMemory:
    """Samples the resident memory of a process and its children every ``interval`` s.

    ``peak_root`` is the RSS of the process itself (the Python driver when a job is
    run in-process), ``peak_python`` the largest RSS of Python processes (the driver, in local mode
    also the Python workers one at a time), ``peak_jvm`` that of the JVM (in local mode
    the driver and the executors share it), ``peak_total`` that of the whole tree.
    """

    def __init__(self, pid: int, interval: float = 0.2):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_python = self.peak_jvm = self.peak_total = self.peak_root = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = python = jvm = 0
            try:
                self.peak_root = max(self.peak_root, self.root.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = p.name()
                except psutil.NoSuchProcess:
                    continue
                total += rss
                if name.startswith("java"):
                    jvm = max(jvm, rss)
                elif name.startswith("python"):
                    python = max(python, rss)
            self.peak_total = max(self.peak_total, total)
            self.peak_python = max(self.peak_python, python)
            self.peak_jvm = max(self.peak_jvm, jvm)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict[str, float]:
        mib = 1 << 20
        return {
            "peak_driver_process_mib": round(self.peak_root / mib, 1),
            "peak_python_mib": round(self.peak_python / mib, 1),
            "peak_jvm_mib": round(self.peak_jvm / mib, 1),
            "peak_total_mib": round(self.peak_total / mib, 1),
        }


def run_measured(cmd: list[str], log_path: str) -> tuple[float, dict, int]:
    """Run ``cmd`` with its output in ``log_path``; return seconds, peak memory, exit code."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        with PeakMemory(proc.pid) as mem:
            code = proc.wait()
        seconds = time.perf_counter() - start
    return seconds, mem.as_dict(), code


def local_session(app: str, driver_memory: str = "4g"):
    """A local[2] Spark session for a benchmark, its Python workers on this interpreter."""
    import sys

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName(app)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.driver.memory", driver_memory)
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def save(name: str, result: dict) -> str:
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    return path
