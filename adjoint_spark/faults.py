"""Fault injection, for the reliability tests and for rehearsing failures on a cluster.

Switched on only by environment variables read on the driver; nothing in a config file
can turn it on.

- ``ADJOINT_FAIL_TASKS="embed:0,2;shards:1;search:0"``: the FIRST attempt of the listed
  partitions of a Spark stage raises :class:`InjectedFault`, so Spark's task retries
  (``spark.task.maxFailures``; ``local[N,F]`` in local mode) must recover. Stages:
  ``embed`` (item and query vectors), ``shards`` (index shards), ``search`` (retrieve).
- ``ADJOINT_SLOW_TASKS="shards:1"`` (same syntax): the FIRST attempt of the listed
  partitions sleeps ``ADJOINT_SLOW_TASK_SECONDS`` (default 30) before it starts, so
  that speculative execution (``spark.speculation``) launches a second attempt.
- ``ADJOINT_KILL_AT="index/merge"``: the driver kills itself with SIGKILL when the named
  phase (a :class:`~adjoint_spark.timing.Timer` path, e.g. ``prepare/write``,
  ``train/epochs``, ``retrieve/search``) starts, as a killed job would stop.
- ``ADJOINT_KILL_AFTER_EPOCHS=n``: the driver kills itself after ``n`` finished
  training epochs (their checkpoint written).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

TASK_STAGES = ("embed", "shards", "search")


class InjectedFault(RuntimeError):
    """A failure asked for by ``ADJOINT_FAIL_TASKS``."""


@dataclass(frozen=True)
class TaskFaults:
    """Partitions of one stage whose first attempt fails (``fail``) or first sleeps
    ``slow_seconds`` (``slow``). Built on the driver; travels in the task's closure."""

    fail: frozenset[int] = frozenset()
    slow: frozenset[int] = frozenset()
    slow_seconds: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.fail or self.slow)


NO_FAULTS = TaskFaults()


def parse_fail_tasks(value: str, variable: str = "ADJOINT_FAIL_TASKS") -> dict:
    """``"embed:0,2;shards:1"`` -> {"embed": {0, 2}, "shards": {1}}."""
    spec: dict[str, frozenset[int]] = {}
    for part in filter(None, (p.strip() for p in value.split(";"))):
        stage, _, partitions = part.partition(":")
        stage = stage.strip()
        if stage not in TASK_STAGES or not partitions.strip():
            raise ValueError(
                f"{variable} entry {part!r}: expected STAGE:P[,P...] with STAGE one "
                f"of {TASK_STAGES}"
            )
        spec[stage] = frozenset(int(p) for p in partitions.split(","))
    return spec


def task_faults(stage: str) -> TaskFaults:
    """The faults asked for in ``stage`` (read on the driver, so they travel to the
    executors inside the task's closure)."""
    fail = parse_fail_tasks(os.environ.get("ADJOINT_FAIL_TASKS", "")).get(stage, frozenset())
    slow = parse_fail_tasks(os.environ.get("ADJOINT_SLOW_TASKS", ""), "ADJOINT_SLOW_TASKS")
    slow = slow.get(stage, frozenset())
    faults = TaskFaults(fail, slow, float(os.environ.get("ADJOINT_SLOW_TASK_SECONDS", "30")))
    if fail:
        logger.warning("fault injection: first attempt of partitions %s of '%s' will fail",
                       sorted(fail), stage)  # fmt: skip
    if slow:
        logger.warning("fault injection: first attempt of partitions %s of '%s' sleeps %.0f s",
                       sorted(slow), stage, faults.slow_seconds)  # fmt: skip
    return faults


def maybe_fail_task(stage: str, faults: TaskFaults) -> None:
    """Inside a task: sleep, or raise, on the first attempt of a listed partition."""
    if not faults:
        return
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None or ctx.attemptNumber() != 0:
        return
    if ctx.partitionId() in faults.slow:
        time.sleep(faults.slow_seconds)
    if ctx.partitionId() in faults.fail:
        raise InjectedFault(
            f"injected fault: first attempt of partition {ctx.partitionId()} of '{stage}'"
        )


def maybe_kill(phase: str) -> None:
    """Kill this process when ``phase`` is the one named by ``ADJOINT_KILL_AT``."""
    if os.environ.get("ADJOINT_KILL_AT") == phase:
        logger.warning("fault injection: killing the driver at the start of '%s'", phase)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_after_epoch(epochs_done: int) -> None:
    value = os.environ.get("ADJOINT_KILL_AFTER_EPOCHS")
    if value and int(value) == epochs_done:
        logger.warning("fault injection: killing the driver after epoch %d", epochs_done)
        os.kill(os.getpid(), signal.SIGKILL)
