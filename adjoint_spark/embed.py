"""Embedding rows of the prepared tables with one tower of a trained model, in Spark.

The driver reads ``model/model.json`` and ``model/model.pt`` once (:class:`ModelArtifact`;
``model.pt`` memory-mapped, never whole in the driver's memory). A tower reaches the
executors in two parts: its layers' weights as a broadcast (small: they do not grow
with the data), and its embedding tables (the item-id table, a query-id table, the
categorical table: their rows grow with the catalogue and the vocabularies) in
``model.pt`` itself, shipped once as a Spark file and memory-mapped by each Python
worker. So the driver never reads the tables, and the Python workers of a host share
one copy of them through the page cache. Each worker rebuilds a tower once and keeps it
for the tasks it runs. The functions given to ``mapInPandas`` are built by
:func:`embed_partitions` and take their thread count from the task's ``spark.task.cpus``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from adjoint_spark.faults import NO_FAULTS, TaskFaults, maybe_fail_task
from adjoint_spark.model import Tower, TowerShape, TowerSpec, reads_item_table
from adjoint_spark.storage import (
    ArtifactError,
    Storage,
    files_dir,
    join,
    local_path,
    sha256_file,
    ship_file,
)

logger = logging.getLogger(__name__)

SIDES = {"query": ("queries", "query_id", "query_idx"), "item": ("items", "item_id", "item_idx")}
ITEM_TABLE = "item_table.weight"  # the shared item-id table, as named in a tower's state
# A tower's embedding tables, as named in its state: their rows grow with the catalogue,
# the queries and the vocabularies, so they reach executors in the shipped model.pt.
TABLES = (ITEM_TABLE, "own_ids.weight", "categorical.weight")


@dataclass(frozen=True)
class ModelArtifact:
    """A trained model as published by the train stage.

    Attributes:
        info: the parsed ``model.json``.
        state: the state dict of ``model.pt``, memory-mapped from ``file``, so a tensor is
            read from disk only when something reads it.
        fingerprint: SHA-256 of ``model.pt``; the index records it.
        file: the local ``model.pt`` (the output's own file, or a copy in
            :func:`files_dir` when the output is not on the local file system).
        identity: inode, size and modification time of ``file`` when it was hashed.
    """

    path: str
    info: dict
    state: dict
    fingerprint: str
    file: str
    identity: tuple[int, int, int]

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
            return ModelArtifact.read_file(path, info, local)

        # Copied to the driver's disk through Hadoop (streamed, not through py4j) and kept
        # under its content's name in the folder of shipped files, once per process.
        download = os.path.join(files_dir(), f"model-download-{uuid.uuid4().hex[:12]}.pt")
        storage.copy_to_local(join(path, "model.pt"), download)
        fingerprint, state = load_state(download, path)
        local = os.path.join(files_dir(), shipped_name(fingerprint))
        if os.path.exists(local):
            os.remove(download)  # an earlier copy of the same content (its pages stay mapped)
        else:
            os.replace(download, local)
        return ModelArtifact(path, info, state, fingerprint, local, file_identity(local))

    @staticmethod
    def read_file(path: str, info: dict, file: str) -> ModelArtifact:
        """The artifact of a local ``model.pt`` (``path`` names the model in errors)."""
        identity = file_identity(file)
        fingerprint, state = load_state(file, path)
        return ModelArtifact(path, info, state, fingerprint, file, identity)

    @property
    def embedding_dim(self) -> int:
        return int(self.info["item_tower"]["embedding_dim"])  # both towers': checked in train

    @property
    def file_name(self) -> str:
        return shipped_name(self.fingerprint)

    def check_prepared(self, manifest: dict, manifest_path: str) -> None:
        """Refuse prepared data whose features differ from those the model was trained on."""
        for key in ("features", "num_items", "num_queries"):
            if manifest.get(key) != self.info.get(key):
                raise ArtifactError(
                    f"{self.path}/model.json and {manifest_path} disagree on '{key}': the model "
                    "was trained on other prepared data; train again on this data"
                )

    def tower_keys(self, side: str) -> tuple[dict[str, str], dict[str, str]]:
        """(layers, tables) of one tower: {name in the tower's state: key in model.pt}.
        Tables are the embedding tables (:data:`TABLES`) the tower reads; the shared
        item-id table only when the tower reads it (:func:`needs_item_table`)."""
        prefix = f"{side}_tower."
        keys = {k[len(prefix) :]: k for k in self.state if k.startswith(prefix)}
        assert keys, f"model.pt has no {side} tower weights"
        if not needs_item_table(self.info, side):
            keys.pop(ITEM_TABLE, None)
        tables = {name: key for name, key in keys.items() if name in TABLES}
        layers = {name: key for name, key in keys.items() if name not in TABLES}
        return layers, tables

    def tower_state(self, side: str) -> bytes:
        """The layers of one tower (its state without embedding tables), serialised."""
        layers, _ = self.tower_keys(side)
        buf = io.BytesIO()
        torch.save({name: self.state[key] for name, key in layers.items()}, buf)
        return buf.getvalue()

    def tower_tables(self, side: str) -> dict[str, torch.Tensor]:
        """The embedding tables of one tower, as mapped from ``file`` (nothing read)."""
        _, tables = self.tower_keys(side)
        return {name: self.state[key] for name, key in tables.items()}

    def tower_payload(self, side: str) -> dict:
        """What an executor needs to rebuild one tower, small enough to broadcast: the
        layers' weights, and where its embedding tables are in the shipped ``model.pt``."""
        _, tables = self.tower_keys(side)
        return {
            "side": side,
            "fingerprint": self.fingerprint,
            "info": json.dumps(
                {k: self.info[k] for k in ("features", "num_items", "num_queries", f"{side}_tower")}
            ),
            "state": self.tower_state(side),
            "tables": tables,
            "file": self.file_name if tables else None,
            "file_bytes": self.identity[1],
        }

    def ship_tower(self, spark, side: str) -> dict:
        """:meth:`tower_payload`, with ``model.pt`` shipped first when the tower has tables."""
        payload = self.tower_payload(side)
        if payload["file"]:
            self.ship(spark)
        return payload

    def ship(self, spark) -> None:
        """Ship ``model.pt`` to the executors (once per application, by its unique name).
        Refused when the file changed since it was hashed, checked before and after it is
        linked or copied for shipping."""
        self.check_unchanged()
        ship_file(spark, self.file, self.file_name)
        self.check_unchanged()

    def check_unchanged(self) -> None:
        if file_identity(self.file) != self.identity:
            raise ArtifactError(
                f"{self.path}/model.pt changed after it was read (another train stage wrote "
                "it?): wait for that stage to finish, then run this one again"
            )


def shipped_name(fingerprint: str) -> str:
    """The name ``model.pt`` is shipped (and copied) under: unique to its content."""
    return f"model-{fingerprint[:16]}.pt"


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


def build_tower(payload: dict, tables: dict[str, torch.Tensor] | None = None) -> Tower:
    """Rebuild one tower in eval mode from :meth:`ModelArtifact.tower_payload`: its layers
    from the payload, its embedding tables from ``tables`` (name in the tower's state ->
    tensor) or else from the shipped ``model.pt`` (:func:`shipped_tables`)."""
    info = json.loads(payload["info"])
    side = payload["side"]
    spec = TowerSpec.from_manifest(info, side)
    shape = TowerShape(**info[f"{side}_tower"])
    state = torch.load(io.BytesIO(payload["state"]), weights_only=True, map_location="cpu")
    state.update(shipped_tables(payload) if tables is None else tables)

    # A tower that never reads the item-id table gets a one-row stand-in, so that every
    # other weight still loads strictly.
    state.setdefault(ITEM_TABLE, torch.zeros(1, shape.feature_dim))

    # The tables are taken as they are: they stay memory-mapped, shared by the workers of
    # a host, never copied (nor first allocated and initialised); assign: the layers too.
    table = state[ITEM_TABLE]
    item_table = torch.nn.Embedding(*table.shape, padding_idx=0, _weight=table)
    tower = Tower(spec, shape, item_table, side, tables=state)
    tower.load_state_dict(state, assign=True)
    tower.eval()
    return tower


_MAPPED: dict[str, tuple[int, dict]] = {}  # Spark file name -> (bytes, mapped state)


def shipped_tables(payload: dict) -> dict[str, torch.Tensor]:
    """The embedding tables of a payload's tower, from ``model.pt`` as shipped by
    :meth:`ModelArtifact.ship` (``SparkFiles``), memory-mapped once per Python worker."""
    if not payload["tables"]:
        return {}
    name = payload["file"]
    if name not in _MAPPED:
        from pyspark import SparkFiles

        file = SparkFiles.get(name)
        if not os.path.exists(file):
            raise ArtifactError(
                f"no model file was shipped as {name}: ship it with ModelArtifact.ship_tower"
            )
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        _MAPPED.clear()
        _MAPPED[name] = os.path.getsize(file), state
    size, state = _MAPPED[name]
    if size != payload["file_bytes"]:
        raise ArtifactError(
            f"the model file shipped as {name} has {size:,} bytes, not the "
            f"{payload['file_bytes']:,} of model.pt: ship it with ModelArtifact.ship_tower"
        )
    return {table: state[key] for table, key in payload["tables"].items()}


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


def vector_columns(dim: int) -> list[str]:
    """The float columns :func:`embed_partitions` hands back, one per dimension."""
    return [f"e{i}" for i in range(dim)]


def embed_rows(rows, payload, side: str, dim: int, batch_size: int, faults=NO_FAULTS):
    """(id, idx, embedding array<float>) of every prepared row, embedded in
    Spark by ``payload``'s tower, a ``side`` tower with ``dim``-wide vectors.

    The Python function returns one float column per dimension, which Arrow takes as it
    is, and Spark assembles the array column: returned as an array column, every value
    would first become a list of Python floats in PySpark (measured on 1M items of the
    benchmark's shape, local[2]: the embed job took 12-13 s this way against 17-18 s).
    """
    from pyspark.sql import functions as F

    id_type = dict(rows.dtypes)[SIDES[side][1]]
    columns = vector_columns(dim)
    schema = f"id {id_type}, idx long, " + ", ".join(f"{c} float" for c in columns)
    flat = rows.mapInPandas(embed_partitions(payload, batch_size, faults), schema)
    return flat.select("id", "idx", F.array(*columns).alias("embedding"))


def write_vectors(embedded, path: str) -> None:
    """Write ``vectors/items`` or ``vectors/queries`` (:func:`embed_rows`) as Parquet,
    without dictionary encoding: embedding values are nearly all distinct, so the writer
    would fill a dictionary for every column chunk only to fall back to plain pages."""
    embedded.write.mode("overwrite").option("parquet.enable.dictionary", "false").parquet(path)


def embed_partitions(
    payload, batch_size: int, faults: TaskFaults = NO_FAULTS
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The function ``mapInPandas`` runs (:func:`embed_rows`): prepared rows in; id, idx
    and one float column per dimension (:func:`vector_columns`) out.

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
            # Column-major, so each column Arrow takes is one contiguous block.
            vectors = np.asfortranarray(embed_frame(tower, frame, batch_size))
            out = pd.DataFrame(vectors, columns=vector_columns(vectors.shape[1]), copy=False)
            out.insert(0, "idx", frame[idx_column].to_numpy(np.int64))
            out.insert(0, "id", frame[id_column].to_numpy())
            yield out

    return run
