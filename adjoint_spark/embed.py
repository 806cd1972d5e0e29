"""Embedding rows of the prepared tables with one tower of a trained model, in Spark.

The driver reads ``model/model.json`` and ``model/model.pt`` once (:class:`ModelArtifact`;
``model.pt`` memory-mapped, never whole in the driver's memory) and broadcasts the state
of ONE tower (its weights, and the shared item-id table only when that tower reads it);
each Python worker rebuilds that tower once and keeps it for the tasks it runs. The
functions given to ``mapInPandas`` are built by :func:`embed_partitions` and take their
thread count from the task's ``spark.task.cpus``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from adjoint_spark.faults import NO_FAULTS, TaskFaults, maybe_fail_task
from adjoint_spark.model import Tower, TowerShape, TowerSpec, reads_item_table
from adjoint_spark.storage import ArtifactError, Storage, join, local_path, sha256_file

logger = logging.getLogger(__name__)

SIDES = {"query": ("queries", "query_id", "query_idx"), "item": ("items", "item_id", "item_idx")}
ITEM_TABLE = "item_table.weight"  # the shared item-id table, as named in a tower's state


@dataclass(frozen=True)
class ModelArtifact:
    """A trained model as published by the train stage.

    Attributes:
        info: the parsed ``model.json``.
        state: the state dict of ``model.pt``, memory-mapped from the file (from a local
            copy when the output is not on the local file system), so a tensor is read
            from disk only when a tower payload serialises it.
        fingerprint: SHA-256 of ``model.pt``; the index records it.
    """

    path: str
    info: dict
    state: dict
    fingerprint: str

    @staticmethod
    def read(storage: Storage, output: str) -> ModelArtifact:
        path = join(output, "model")
        for name in ("model.json", "model.pt"):
            if not storage.exists(join(path, name)):
                raise FileNotFoundError(
                    f"{join(path, name)} does not exist: run the train stage first"
                )
        info = storage.read_json(join(path, "model.json"))
        local = local_path(join(path, "model.pt"))
        if local is not None:
            fingerprint, state = load_state(local, path)
        else:
            # Copied to the driver's disk through Hadoop (streamed, not through py4j). The
            # copy is deleted once mapped: its pages stay readable until the state is freed.
            with tempfile.TemporaryDirectory() as tmp:
                copy = os.path.join(tmp, "model.pt")
                storage.copy_to_local(join(path, "model.pt"), copy)
                fingerprint, state = load_state(copy, path)
        return ModelArtifact(path, info, state, fingerprint)

    def check_prepared(self, manifest: dict, manifest_path: str) -> None:
        """Refuse prepared data whose features differ from those the model was trained on."""
        for key in ("features", "num_items", "num_queries"):
            if manifest.get(key) != self.info.get(key):
                raise ArtifactError(
                    f"{self.path}/model.json and {manifest_path} disagree on '{key}': the model "
                    "was trained on other prepared data; train again on this data"
                )

    def tower_state(self, side: str) -> bytes:
        """The state dict of one tower, serialised: with the shared item-id table only
        when the tower reads it (:func:`needs_item_table`)."""
        prefix = f"{side}_tower."
        tower = {k[len(prefix) :]: v for k, v in self.state.items() if k.startswith(prefix)}
        assert tower, f"model.pt has no {side} tower weights"
        if not needs_item_table(self.info, side):
            tower.pop(ITEM_TABLE, None)
        buf = io.BytesIO()
        torch.save(tower, buf)
        return buf.getvalue()

    def tower_payload(self, side: str) -> dict:
        """What an executor needs to rebuild one tower: small enough to broadcast."""
        return {
            "side": side,
            "fingerprint": self.fingerprint,
            "info": json.dumps(
                {k: self.info[k] for k in ("features", "num_items", "num_queries", f"{side}_tower")}
            ),
            "state": self.tower_state(side),
        }


def load_state(file: str, model_dir: str) -> tuple[str, dict]:
    """The SHA-256 and the state dict of a local ``model.pt``, both streamed from the file:
    the state memory-mapped (zip format, as ``torch.save`` writes by default), so its
    tensors are not held in memory. ``model_dir`` names the file in errors."""
    before = file_identity(file)
    fingerprint = sha256_file(file)
    try:
        # weights_only: tensors and plain containers only, never arbitrary objects.
        state = torch.load(
            file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file)
        )
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
        raise ArtifactError(
            f"{model_dir}/model.pt cannot be loaded as a plain state dict ({exc}); "
            "it is damaged or not written by the train stage: train again"
        ) from None
    if file_identity(file) != before:
        raise ArtifactError(
            f"{model_dir}/model.pt changed while it was read (its fingerprint may not match "
            "the weights): wait for the train stage writing it to finish, then run again"
        )
    return fingerprint, state


def file_identity(file: str) -> tuple[int, int, int]:
    """Inode, size and modification time: a file replaced or rewritten changes them."""
    status = os.stat(file)
    return status.st_ino, status.st_size, status.st_mtime_ns


def needs_item_table(info: dict, side: str) -> bool:
    """Whether the ``side`` tower of the model described by ``model.json`` reads the
    shared item-id table (:func:`adjoint_spark.model.reads_item_table`)."""
    spec = TowerSpec.from_manifest(info, side)
    return reads_item_table(spec, TowerShape(**info[f"{side}_tower"]), side)


class Broadcasts:
    """Broadcast variables of one stage, destroyed when its block ends (after a failure
    too) unless :meth:`destroy` freed them earlier. Destroyed, not unpersisted: the
    driver's file of each value goes too."""

    def __init__(self, spark):
        self.context = spark.sparkContext
        self.live: dict[str, object] = {}

    def __enter__(self) -> Broadcasts:
        return self

    def add(self, name: str, value):
        self.live[name] = self.context.broadcast(value)
        return self.live[name]

    def destroy(self, name: str) -> None:
        self.live.pop(name).destroy()

    def __exit__(self, *exc) -> None:
        while self.live:
            self.destroy(next(iter(self.live)))


def build_tower(payload: dict) -> Tower:
    """Rebuild one tower in eval mode from :meth:`ModelArtifact.tower_payload`."""
    info = json.loads(payload["info"])
    side = payload["side"]
    spec = TowerSpec.from_manifest(info, side)
    shape = TowerShape(**info[f"{side}_tower"])
    state = torch.load(io.BytesIO(payload["state"]), weights_only=True, map_location="cpu")

    # A tower that never reads the item-id table is shipped without it and gets a
    # one-row stand-in, so that every other weight still loads strictly.
    rows = info["num_items"] + 1 if ITEM_TABLE in state else 1
    item_table = torch.nn.Embedding(rows, shape.feature_dim, padding_idx=0)
    tower = Tower(spec, shape, item_table, side)
    state.setdefault(ITEM_TABLE, item_table.weight.detach())
    tower.load_state_dict(state)
    tower.eval()
    return tower


_TOWERS: dict[tuple[str, str], Tower] = {}


def cached_tower(payload: dict) -> Tower:
    """One tower per Python worker and model (Spark reuses workers across tasks)."""
    key = (payload["fingerprint"], payload["side"])
    if key not in _TOWERS:
        _TOWERS.clear()
        _TOWERS[key] = build_tower(payload)
    return _TOWERS[key]


def task_threads() -> int:
    """The cores Spark gave this task (``spark.task.cpus``); 1 outside a task."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return max(1, int(ctx.cpus())) if ctx is not None else 1


def set_threads(threads: int) -> None:
    """Torch and faiss threads: each brings its own OpenMP pool; oversubscribed, they
    cost several times the run time, so both get exactly the task's cores."""
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def frame_to_batch(frame: pd.DataFrame, columns: list[str], idx_column: str) -> dict:
    """Tensors of one tower's inputs from a pandas frame of a prepared table."""
    batch = {"idx": torch.from_numpy(frame[idx_column].to_numpy(np.int64))}
    for name in columns:
        values = np.stack(frame[name].to_numpy()) if len(frame) else np.zeros((0, 0))
        dtype = np.float32 if name == "num" else np.int64
        batch[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=dtype))
    return batch


def tower_columns(spec: TowerSpec) -> list[str]:
    """The prepared-table columns a tower reads (besides the entity index)."""
    columns = ["num"] if spec.num_numeric else []
    columns += ["cat"] if spec.cat_sizes else []
    return columns + [column for column, _ in spec.sequences]


@torch.no_grad()
def embed_frame(tower: Tower, frame: pd.DataFrame, batch_size: int) -> np.ndarray:
    """(len(frame), D) float32 unit vectors of the rows of ``frame``."""
    idx_column = SIDES[tower.side][2]
    columns = tower_columns(tower.spec)
    out = []
    for start in range(0, len(frame), batch_size):
        part = frame.iloc[start : start + batch_size]
        out.append(tower(frame_to_batch(part, columns, idx_column)).numpy())
    dim = tower.shape.embedding_dim
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def vector_schema(id_type: str) -> str:
    """The Parquet schema of ``vectors/items`` and ``vectors/queries``."""
    return f"id {id_type}, idx long, embedding array<float>"


def write_vectors(embedded, path: str) -> None:
    """Write ``vectors/items`` or ``vectors/queries`` (:func:`vector_schema`) as Parquet,
    without dictionary encoding: embedding values are nearly all distinct, so the writer
    would fill a dictionary for every column chunk only to fall back to plain pages."""
    embedded.write.mode("overwrite").option("parquet.enable.dictionary", "false").parquet(path)


def embed_partitions(
    payload, batch_size: int, faults: TaskFaults = NO_FAULTS
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The function ``mapInPandas`` runs: prepared rows in, (id, idx, embedding) out.

    ``payload`` is a broadcast of :meth:`ModelArtifact.tower_payload` (or the dict);
    ``faults``: first attempts to fail or delay (:mod:`adjoint_spark.faults`).
    """

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        maybe_fail_task("embed", faults)
        value = payload.value if hasattr(payload, "value") else payload
        set_threads(task_threads())
        tower = cached_tower(value)
        _, id_column, idx_column = SIDES[value["side"]]
        for frame in frames:
            vectors = embed_frame(tower, frame, batch_size)
            # As lists of Python floats (exact for float32): PySpark turns every array
            # value into a list before Arrow takes it, which from a NumPy row costs more
            # (measured: 0.09 s against 0.06 s, the lists' making included, per 10,000
            # 32-wide rows).
            yield pd.DataFrame(
                {
                    "id": frame[id_column].to_numpy(),
                    "idx": frame[idx_column].to_numpy(np.int64),
                    "embedding": vectors.tolist(),
                }
            )

    return run
