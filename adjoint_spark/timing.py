"""Phase timing: each phase logs its seconds, nested phases indented under their parent."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from adjoint_spark.faults import maybe_kill

logger = logging.getLogger(__name__)


class Timer:
    """Records the seconds of named phases, nested, and logs each as it ends."""

    def __init__(self) -> None:
        self.records: list[tuple[int, str, float]] = []
        self._depth = 0
        self._open: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        depth = self._depth
        index = len(self.records)
        self.records.append((depth, name, 0.0))
        logger.info("%s%s ...", "  " * depth, name)
        self._open.append(name)
        maybe_kill("/".join(self._open))
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self._depth -= 1
            self._open.pop()
            self.records[index] = (depth, name, seconds)
            logger.info("%s%s: %.2f s", "  " * depth, name, seconds)

    def as_dict(self) -> dict[str, float]:
        """Phase seconds keyed by their path, e.g. ``prepare/read items``."""
        out: dict[str, float] = {}
        stack: list[str] = []
        for depth, name, seconds in self.records:
            del stack[depth:]
            stack.append(name)
            out["/".join(stack)] = round(seconds, 3)
        return out
