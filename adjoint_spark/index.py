"""The index stage: item vectors and ONE faiss index built from per-partition shards.

1. embed: Spark runs the item tower on every partition of ``prepared/items``
   (``mapInPandas``) and writes ``vectors/items`` (id, idx, embedding).
2. train: a random sample of the vectors, drawn across all partitions, trains the
   WHOLE index once on the driver (coarse quantizer and scalar-quantizer ranges).
3. shards: every partition of the vectors gets a copy of the trained index, adds its
   vectors with their ``idx`` (dense, globally unique int64) as ids and writes one shard
   to the staging folder. Shards trained separately would not merge correctly.
4. merge: the shards are joined into one index, in memory or on disk
   (``faiss.contrib.ondisk``), then checked: ``ntotal`` equals the item count and the
   ids are exactly ``0 .. num_items - 1``, each the ``idx`` of one item.
5. sweep: ``nprobe`` is the smallest that reaches ``target_recall`` against exact
   search on a sample of query vectors.

Outputs: ``vectors/items/`` and ``index/`` (``items.faiss``, ``items-<build>.ivfdata`` for
an on-disk index, ``manifest.json``), each staged and published whole.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from adjoint_spark.config import Config, IndexConfig
from adjoint_spark.embed import (
    Broadcasts,
    ModelArtifact,
    embed_rows,
    set_threads,
    task_threads,
    write_vectors,
)
from adjoint_spark.faults import NO_FAULTS, TaskFaults, maybe_fail_task, task_faults
from adjoint_spark.storage import Staging, Storage, join, local_path, put_file, sha256_file
from adjoint_spark.timing import Timer

logger = logging.getLogger(__name__)

INDEX_FILE = "items.faiss"
SHARDS_DIR = "_shards"
SHARD_SCHEMA = "partition int, ntotal long, min_id long, max_id long, bytes long"


class IndexCheckError(RuntimeError):
    """The merged index failed a check (lost, duplicated or unknown ids)."""


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class IndexPlan:
    """The index actually built for a catalogue of ``num_items``.

    Attributes:
        factory: the faiss factory string after the nlist rule.
        nlist: inverted lists of that factory string.
        num_train: vectors in the training sample.
        rule: why nlist differs from the requested one ("" when it does not).
    """

    factory: str
    requested_factory: str
    nlist: int
    num_train: int
    rule: str


def parse_nlist(factory: str) -> int:
    match = re.search(r"IVF(\d+)", factory)
    if match is None:
        raise NotImplementedError(
            f"index factory {factory!r} has no IVF index: per-partition shards can only be "
            "merged for IVF indexes (e.g. IVF4096,SQ8 or IVF1024,Flat)"
        )
    return int(match.group(1))


def plan_index(factory: str, num_items: int, cfg: IndexConfig) -> IndexPlan:
    """nlist as asked when every list gets ``min_train_per_list`` training vectors,
    else the largest nlist that does (k-means needs about 39 points per centroid)."""
    if num_items < 1:
        raise ValueError("cannot build an index of 0 items")
    requested = parse_nlist(factory)
    nlist, rule = requested, ""
    if num_items < requested * cfg.min_train_per_list:
        nlist = max(1, num_items // cfg.min_train_per_list)
        rule = (
            f"{num_items:,} items give fewer than {cfg.min_train_per_list} training vectors "
            f"per list for nlist={requested}: nlist lowered to {nlist}"
        )
    built = re.sub(r"IVF\d+", f"IVF{nlist}", factory, count=1)
    num_train = min(num_items, nlist * cfg.max_train_per_list)
    return IndexPlan(built, factory, nlist, num_train, rule)


def nprobe_candidates(nlist: int) -> list[int]:
    """1, 2, 4, ... up to nlist (nlist itself included: exhaustive over the lists)."""
    values = [1 << i for i in range(int(math.log2(nlist)) + 1)]
    return sorted(set(values + [nlist]))


def choose_nprobe(sweep: list[dict], target: float) -> dict:
    """The first sweep point (smallest nprobe) with recall >= target, else the best."""
    for point in sorted(sweep, key=lambda p: p["nprobe"]):
        if point["recall"] >= target:
            return point
    return max(sweep, key=lambda p: (p["recall"], -p["nprobe"]))


def choose_merge(setting: str, estimated_bytes: int, limit_mb: int) -> str:
    if setting != "auto":
        return setting
    return "ondisk" if estimated_bytes > limit_mb * (1 << 20) else "memory"


def shard_name(partition: int) -> str:
    return f"shard-{partition:05d}.faiss"


def check_shards(rows: list[dict], num_partitions: int, num_vectors: int) -> None:
    """One shard per partition, and together they hold every vector once."""
    partitions = sorted(r["partition"] for r in rows)
    if partitions != list(range(num_partitions)):
        raise IndexCheckError(
            f"expected one shard for each of {num_partitions} partitions, got {partitions}"
        )
    total = sum(r["ntotal"] for r in rows)
    if total != num_vectors:
        raise IndexCheckError(f"the shards hold {total:,} vectors, the items {num_vectors:,}")


def check_ids(ids: np.ndarray, num_items: int) -> None:
    """The merged index's ids must be exactly the item indexes 0 .. num_items - 1."""
    if len(ids) != num_items:
        raise IndexCheckError(f"the merged index holds {len(ids):,} ids for {num_items:,} items")
    unique = np.unique(ids)
    if len(unique) != len(ids):
        raise IndexCheckError(f"{len(ids) - len(unique):,} ids occur more than once in the index")
    if len(ids) and (unique[0] != 0 or unique[-1] != num_items - 1):
        raise IndexCheckError(
            f"index ids span {unique[0]}..{unique[-1]}, not the item indexes 0..{num_items - 1}"
        )


def list_ids(index) -> tuple[np.ndarray, np.ndarray]:
    """All ids stored in an IVF index, and the size of every inverted list."""
    import faiss

    invlists = faiss.extract_index_ivf(index).invlists
    sizes = np.array([invlists.list_size(i) for i in range(invlists.nlist)], dtype=np.int64)
    ids = np.empty(int(sizes.sum()), dtype=np.int64)
    offset = 0
    for i, size in enumerate(sizes):
        if size == 0:
            continue
        ptr = invlists.get_ids(i)
        try:
            faiss.memcpy(faiss.swig_ptr(ids[offset : offset + size]), ptr, int(size) * 8)
        finally:
            invlists.release_ids(i, ptr)
        offset += size
    return ids, sizes


def list_size_stats(sizes: np.ndarray) -> dict:
    return {
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "max": int(sizes.max()),
        "mean": float(sizes.mean()),
        "std": float(sizes.std()),
        "empty": int((sizes == 0).sum()),
        "max_over_mean": float(sizes.max() / max(sizes.mean(), 1e-9)),
    }


# ---------------------------------------------------------------------------- executors


def add_partitions(
    trained, shard_dir: str, faults: TaskFaults = NO_FAULTS
) -> Callable[[Iterator[pd.DataFrame]], Iterator]:
    """The function ``mapInPandas`` runs: vectors in, one shard written, one row out.

    ``trained`` is a broadcast of the serialised trained index. A retried or speculative
    attempt writes the same shard under the same name (atomic rename), so the shard
    folder always holds one complete shard per partition.
    """

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import faiss
        from pyspark import TaskContext

        maybe_fail_task("shards", faults)
        set_threads(task_threads())
        ctx = TaskContext.get()
        partition = ctx.partitionId() if ctx is not None else 0
        data = trained.value if hasattr(trained, "value") else trained
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        lo, hi = np.iinfo(np.int64).max, -1
        for frame in frames:
            if not len(frame):
                continue
            vectors = np.ascontiguousarray(np.stack(frame["embedding"].to_numpy()), np.float32)
            ids = frame["idx"].to_numpy(np.int64)
            index.add_with_ids(vectors, ids)
            lo, hi = min(lo, int(ids.min())), max(hi, int(ids.max()))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "shard.faiss")
            faiss.write_index(index, path)
            size = os.path.getsize(path)
            put_file(path, join(shard_dir, shard_name(partition)))
        yield pd.DataFrame(
            {
                "partition": [partition],
                "ntotal": [index.ntotal],
                "min_id": [lo if hi >= 0 else -1],
                "max_id": [hi],
                "bytes": [size],
            }
        )

    return run


def exact_top_k_partitions(queries, k: int) -> Callable[[Iterator[pd.DataFrame]], Iterator]:
    """Per partition of item vectors, the exact top ``k`` of each query (inner product);
    :func:`top_k_per_query` merges the partitions' lists. ``queries`` is a broadcast
    (Q, D) array."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        set_threads(task_threads())
        q = queries.value if hasattr(queries, "value") else queries
        best_scores = np.zeros((len(q), 0), np.float32)
        best_ids = np.zeros((len(q), 0), np.int64)
        for frame in frames:
            if not len(frame):
                continue
            vectors = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
            scores = np.concatenate([best_scores, q @ vectors.T], axis=1)
            ids = np.concatenate(
                [best_ids, np.broadcast_to(frame["idx"].to_numpy(np.int64), (len(q), len(frame)))],
                axis=1,
            )
            kk = min(k, scores.shape[1])
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            best_scores = np.take_along_axis(scores, top, axis=1)
            best_ids = np.take_along_axis(ids, top, axis=1)
        yield pd.DataFrame(
            {
                "query": np.repeat(np.arange(len(q), dtype=np.int64), best_ids.shape[1]),
                "idx": best_ids.ravel(),
                "score": best_scores.ravel(),
            }
        )

    return run


def top_k_per_query(rows, k: int):
    """The ``k`` best (query, idx, score) rows of each query, merged in Spark from the
    partitions' top-k lists, so the driver collects (queries x k) rows whatever the
    number of partitions. Ties are broken as in :func:`merge_exact` (lower idx first)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy("query").orderBy(F.col("score").desc(), F.col("idx"))
    ranked = rows.withColumn("rank", F.row_number().over(order))
    return ranked.where(F.col("rank") <= k).drop("rank")


def merge_exact(rows: pd.DataFrame, num_queries: int, k: int) -> list[np.ndarray]:
    """The global top ``k`` ids of each query from the partitions' top-k lists."""
    rows = rows.sort_values(["query", "score", "idx"], ascending=[True, False, True])
    out = [np.zeros(0, np.int64)] * num_queries
    for query, group in rows.groupby("query", sort=False):
        out[int(query)] = group["idx"].to_numpy(np.int64)[:k]
    return out


def index_recall(found: np.ndarray, exact: list[np.ndarray], k: int) -> float:
    """Mean over queries of |found top-k ∩ exact top-k| / |exact top-k|."""
    values = [
        len(np.intersect1d(found[q, :k], truth)) / len(truth)
        for q, truth in enumerate(exact)
        if len(truth)
    ]
    return float(np.mean(values)) if values else 0.0


# ---------------------------------------------------------------------------- driver


@dataclass
class IndexResult:
    path: str
    manifest: dict


def read_json_required(storage: Storage, uri: str, stage: str) -> dict:
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} does not exist: run the {stage} stage first")
    return storage.read_json(uri)


def sample_frame(df, n: int, seed: int, key: str):
    """A seeded random sample of exactly ``n`` rows (all when fewer), drawn across all
    partitions by ordering on a hash of the row's key."""
    from pyspark.sql import functions as F

    return df.orderBy(F.xxhash64(F.lit(seed), F.col(key)), F.col(key)).limit(n)


def train_index(vectors: np.ndarray, plan: IndexPlan):
    import faiss

    index = faiss.index_factory(vectors.shape[1], plan.factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    return index


def merge_shards(trained, shard_files: list[str], mode: str, ivfdata: str):
    """One index from the shards: ``memory`` merges the inverted lists into the trained
    index; ``ondisk`` streams them (memory-mapped) into ``ivfdata``."""
    import faiss

    index = faiss.clone_index(trained)
    if mode == "ondisk":
        from faiss.contrib.ondisk import merge_ondisk

        merge_ondisk(index, shard_files, ivfdata)
        return index
    ivf = faiss.extract_index_ivf(index)
    for path in shard_files:
        shard = faiss.read_index(path)
        ivf.merge_from(faiss.extract_index_ivf(shard), 0)
    index.ntotal = ivf.ntotal
    return index


def sweep_nprobe(index, queries: np.ndarray, exact: list[np.ndarray], k: int) -> list[dict]:
    import faiss

    params = faiss.ParameterSpace()
    sweep = []
    for nprobe in nprobe_candidates(faiss.extract_index_ivf(index).nlist):
        params.set_index_parameter(index, "nprobe", nprobe)
        start = time.perf_counter()
        _, found = index.search(queries, k)
        seconds = time.perf_counter() - start
        point = {
            "nprobe": nprobe,
            "recall": round(index_recall(found, exact, k), 5),
            "queries_per_second": round(len(queries) / max(seconds, 1e-9), 1),
        }
        logger.info("nprobe %d: recall@%d %.4f, %.0f queries/s",
                    nprobe, k, point["recall"], point["queries_per_second"])  # fmt: skip
        sweep.append(point)
    return sweep


def run_index(spark, config: Config, timer: Timer | None = None) -> IndexResult:
    """Embed every item, build and check the merged index; publish vectors/items, index."""
    import faiss
    from pyspark.sql import functions as F

    timer = timer or Timer()
    cfg = config.index
    storage = Storage(spark)
    output = config.output
    prepared = join(output, "prepared")
    started = time.perf_counter()
    with timer.phase("index"):
        manifest = read_json_required(storage, join(prepared, "manifest.json"), "prepare")
        model = ModelArtifact.read(storage, output)
        model.check_prepared(manifest, join(prepared, "manifest.json"))
        num_items = manifest["num_items"]
        plan = plan_index(cfg.factory, num_items, cfg)
        if plan.rule:
            logger.warning("%s", plan.rule)
        logger.info("index %s over %d items, trained on %d vectors",
                    plan.factory, num_items, plan.num_train)  # fmt: skip
        driver_threads = max(1, len(os.sched_getaffinity(0)))
        faiss.omp_set_num_threads(driver_threads)
        build_id = uuid.uuid4().hex[:12]

        with (
            Broadcasts(spark) as broadcasts,
            Staging(storage, output, "vectors/items") as vectors_stage,
            Staging(storage, output, "index") as index_stage,
        ):
            # Both towers go out now (layers as broadcasts, the driver keeps no copy of a
            # value it broadcasts; tables in the shipped model.pt) and model.pt is unmapped.
            fingerprint, dim = model.fingerprint, model.embedding_dim
            item_tower = broadcasts.add("item tower", model.ship_tower(spark, "item"))
            query_tower = broadcasts.add("query tower", model.ship_tower(spark, "query"))
            del model

            with timer.phase("embed"):
                items = spark.read.parquet(join(prepared, "items"))
                if cfg.num_partitions:
                    items = items.repartition(cfg.num_partitions, "item_idx")
                embedded = embed_rows(
                    items, item_tower, "item", dim, cfg.batch_size, task_faults("embed")
                )
                write_vectors(embedded, vectors_stage.path)
                broadcasts.destroy("item tower")
                vectors = spark.read.parquet(vectors_stage.path)

            with timer.phase("train"):
                sample = sample_frame(vectors, plan.num_train, cfg.seed, "idx")
                sample = np.stack(sample.select("embedding").toPandas()["embedding"].to_numpy())
                trained = train_index(sample.astype(np.float32), plan)
                trained_bytes = faiss.serialize_index(trained).tobytes()
                del sample

            with timer.phase("shards"):
                shard_dir = join(index_stage.path, SHARDS_DIR)
                storage.mkdirs(shard_dir)
                num_partitions = vectors.rdd.getNumPartitions()
                shipped = broadcasts.add("trained index", trained_bytes)
                rows = vectors.mapInPandas(
                    add_partitions(shipped, shard_dir, task_faults("shards")), SHARD_SCHEMA
                )
                shards = [r.asDict() for r in rows.collect()]
                check_shards(shards, num_partitions, num_items)
                broadcasts.destroy("trained index")

            with timer.phase("merge"), tempfile.TemporaryDirectory() as tmp:
                code_size = faiss.extract_index_ivf(trained).code_size
                estimated = num_items * (code_size + 8) + len(trained_bytes)
                mode = choose_merge(cfg.merge, estimated, cfg.merge_memory_mb)
                logger.info("merging %d shards %s (index about %.1f MiB, limit %d MiB)",
                            len(shards), "in memory" if mode == "memory" else "on disk",
                            estimated / 2**20, cfg.merge_memory_mb)  # fmt: skip
                files = local_files(storage, shard_dir, len(shards), tmp)
                out_dir = local_path(index_stage.path) or os.path.join(tmp, "out")
                os.makedirs(out_dir, exist_ok=True)
                ivfdata_name = f"items-{build_id}.ivfdata"
                index = merge_shards(trained, files, mode, os.path.join(out_dir, ivfdata_name))
                storage.delete(shard_dir)

                with timer.phase("check"):
                    ids, sizes = list_ids(index)
                    check_ids(ids, num_items)
                    check_vectors_table(vectors, num_items, F)
                    del ids

                with timer.phase("sweep"):
                    queries, exact = sweep_sample(spark, query_tower, dim, prepared, vectors, cfg)
                    broadcasts.destroy("query tower")
                    sweep = sweep_nprobe(index, queries, exact, cfg.sweep_k)
                    chosen = choose_nprobe(sweep, cfg.target_recall)
                    faiss.ParameterSpace().set_index_parameter(index, "nprobe", chosen["nprobe"])
                    if chosen["recall"] < cfg.target_recall:
                        logger.warning(
                            "no nprobe reached recall@%d %.2f (best %.4f at nprobe %d): use a "
                            "finer quantizer (SQ8 -> Flat) or a smaller nlist",
                            cfg.sweep_k, cfg.target_recall, chosen["recall"], chosen["nprobe"],
                        )  # fmt: skip

                faiss.write_index(index, os.path.join(out_dir, INDEX_FILE))
                del index
                written = [INDEX_FILE] + ([ivfdata_name] if mode == "ondisk" else [])
                checksums = {
                    name: {
                        "bytes": os.path.getsize(os.path.join(out_dir, name)),
                        "sha256": sha256_file(os.path.join(out_dir, name)),
                    }
                    for name in written
                }
                if local_path(index_stage.path) is None:
                    for name in written:
                        storage.copy_from_local(
                            os.path.join(out_dir, name), join(index_stage.path, name)
                        )

            total_bytes = sum(c["bytes"] for c in checksums.values())
            index_manifest = {
                "factory": plan.factory,
                "requested_factory": plan.requested_factory,
                "nlist_rule": plan.rule,
                "metric": "inner_product",
                "dim": int(dim),
                "nlist": plan.nlist,
                "nprobe": chosen["nprobe"],
                "nprobe_recall": chosen["recall"],
                "recall_k": cfg.sweep_k,
                "target_recall": cfg.target_recall,
                "sweep_queries": int(len(queries)),
                "sweep": sweep,
                "ntotal": num_items,
                "num_train": plan.num_train,
                "num_shards": len(shards),
                "merge": mode,
                "file": INDEX_FILE,
                "ivfdata": ivfdata_name if mode == "ondisk" else None,
                "files": checksums,
                "code_size": int(code_size),
                "bytes_per_vector": round(total_bytes / num_items, 2),
                "list_sizes": list_size_stats(sizes),
                "list_size_values": sizes.tolist() if len(sizes) <= 65536 else None,
                "model_fingerprint": fingerprint,
                "build_id": build_id,
                "seconds": round(time.perf_counter() - started, 3),
            }
            storage.write_json(join(index_stage.path, "manifest.json"), index_manifest)
            vectors_stage.publish()
            path = index_stage.publish()
    return IndexResult(path, index_manifest)


def local_files(storage: Storage, shard_dir: str, num_shards: int, tmp: str) -> list[str]:
    """Local paths of the shards (copied from a remote file system when needed)."""
    names = [shard_name(p) for p in range(num_shards)]
    base = local_path(shard_dir)
    if base is not None:
        return [os.path.join(base, n) for n in names]
    os.makedirs(os.path.join(tmp, "shards"), exist_ok=True)
    files = []
    for name in names:
        dst = os.path.join(tmp, "shards", name)
        storage.copy_to_local(join(shard_dir, name), dst)
        files.append(dst)
    return files


def check_vectors_table(vectors, num_items: int, F) -> None:
    """Every item index once in vectors/items, so every index id maps to one item id."""
    row = vectors.agg(F.count("*").alias("n"), F.countDistinct("idx").alias("d")).first()
    if row["n"] != num_items or row["d"] != num_items:
        raise IndexCheckError(
            f"vectors/items holds {row['n']:,} rows and {row['d']:,} distinct item indexes "
            f"for {num_items:,} items"
        )


def sweep_sample(spark, query_tower, dim: int, prepared: str, vectors, cfg: IndexConfig):
    """A seeded sample of query vectors and their exact top-k items (computed in Spark;
    the driver receives (queries x k) rows, not (partitions x queries x k)).
    ``query_tower``: a broadcast of the query tower's payload."""
    queries = sample_frame(
        spark.read.parquet(join(prepared, "queries")), cfg.sweep_queries, cfg.seed, "query_idx"
    )
    embedded = embed_rows(queries, query_tower, "query", dim, cfg.batch_size).toPandas()
    embedded = embedded.sort_values("idx")
    query_vectors = np.ascontiguousarray(np.stack(embedded["embedding"].to_numpy()), np.float32)

    # Each partition keeps its top k per query; Spark merges them per query.
    shipped = spark.sparkContext.broadcast(query_vectors)
    rows = vectors.mapInPandas(
        exact_top_k_partitions(shipped, cfg.sweep_k), "query long, idx long, score float"
    )
    rows = top_k_per_query(rows, cfg.sweep_k).toPandas()
    shipped.unpersist()
    return query_vectors, merge_exact(rows, len(query_vectors), cfg.sweep_k)
