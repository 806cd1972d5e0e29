"""The retrieve stage: query vectors, top-K items per query through the merged index,
and the evaluation of those recommendations against the test pairs, all in Spark.

The index reaches the executors as a Spark file (``SparkContext.addFile``), never
through the driver's memory; each Python worker opens it once. Before anything is
written, the index files are checked against their manifest (size and SHA-256) and the
manifest's model fingerprint against ``model/model.pt``.

Outputs: ``vectors/queries/`` (id, idx, embedding), ``recommendations/`` (query_id,
rank, item_id, score, plus query_idx and item_idx) and ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from adjoint_spark.config import Config
from adjoint_spark.embed import (
    ModelArtifact,
    embed_rows,
    set_threads,
    task_threads,
    write_vectors,
)
from adjoint_spark.faults import NO_FAULTS, TaskFaults, maybe_fail_task, task_faults
from adjoint_spark.index import read_json_required
from adjoint_spark.storage import ArtifactError, Staging, Storage, join, sha256_file, ship_file
from adjoint_spark.timing import Timer

logger = logging.getLogger(__name__)

RECOMMENDATION_SCHEMA = "query_id {id}, query_idx long, rank int, item_idx long, score float"


# ---------------------------------------------------------------------------- executors

_INDEXES: dict[str, object] = {}


def open_index(name: str, ondisk: bool):
    """The index shipped as Spark file ``name``, opened once per Python worker."""
    import faiss
    from pyspark import SparkFiles

    if name not in _INDEXES:
        _INDEXES.clear()
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else 0
        _INDEXES[name] = faiss.read_index(SparkFiles.get(name), flags)
    return _INDEXES[name]


def top_k_unseen(
    scores: np.ndarray, ids: np.ndarray, seen: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first ``k`` results that are neither empty (-1) nor in ``seen``.

    Returns (Q, k) scores and ids; rows with fewer results are padded with id -1.
    """
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    for row in range(len(ids)):
        keep = ids[row] >= 0
        if len(seen[row]):
            keep &= ~np.isin(ids[row], seen[row])
        kept = np.flatnonzero(keep)[:k]
        out_ids[row, : len(kept)] = ids[row, kept]
        out_scores[row, : len(kept)] = scores[row, kept]
    return out_scores, out_ids


def search_partitions(
    index_name: str,
    ondisk: bool,
    nprobe: int,
    k: int,
    batch_size: int,
    faults: TaskFaults = NO_FAULTS,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The function ``mapInPandas`` runs: query vectors (+ ``seen`` train items) in,
    (query_id, query_idx, rank, item_idx, score) out.

    A batch searches ``k`` plus its longest ``seen`` list, so after the query's train
    items are removed ``k`` remain; queries are sorted by ``seen`` length first so that
    one long history does not widen every search of its batch.
    """

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import faiss

        maybe_fail_task("search", faults)
        set_threads(task_threads())
        index = open_index(index_name, ondisk)
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        for frame in frames:
            if not len(frame):
                continue
            seen = [
                np.zeros(0, np.int64) if s is None else np.asarray(s, np.int64)
                for s in frame["seen"]
            ]
            order = np.argsort([len(s) for s in seen], kind="stable")
            for start in range(0, len(frame), batch_size):
                rows = order[start : start + batch_size]
                batch_seen = [seen[r] for r in rows]
                vectors = np.stack(frame["embedding"].to_numpy()[rows]).astype(np.float32)
                top_scores, top_ids = search_unseen(index, vectors, batch_seen, k, nprobe)
                yield ranked_rows(frame.iloc[rows], top_scores, top_ids)

    return run


def search_unseen(
    index, vectors: np.ndarray, seen: list[np.ndarray], k: int, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` unseen items per query. A query whose probed lists hold fewer than ``k``
    unseen items (a long history, small lists) is searched again with nprobe doubled,
    up to every list, so it gets ``k`` items whenever the catalogue has them."""
    import faiss

    params = faiss.ParameterSpace()
    nlist = faiss.extract_index_ivf(index).nlist
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    width = min(index.ntotal, k + max((len(s) for s in seen), default=0))
    scores, ids = index.search(vectors, width)
    top_scores, top_ids = top_k_unseen(scores, ids, seen, k)
    available = np.array([min(k, index.ntotal - len(s)) for s in seen])
    probe = nprobe
    short = np.flatnonzero((top_ids >= 0).sum(axis=1) < available)
    while len(short) and probe < nlist:
        probe = min(nlist, probe * 2)
        params.set_index_parameter(index, "nprobe", probe)
        scores, ids = index.search(vectors[short], width)
        top_scores[short], top_ids[short] = top_k_unseen(scores, ids, [seen[r] for r in short], k)
        short = short[(top_ids[short] >= 0).sum(axis=1) < available[short]]
    params.set_index_parameter(index, "nprobe", nprobe)
    return top_scores, top_ids


def ranked_rows(frame: pd.DataFrame, scores: np.ndarray, ids: np.ndarray) -> pd.DataFrame:
    """Long format: one row per (query, rank) with a result; ranks start at 1."""
    q, r = np.nonzero(ids >= 0)
    return pd.DataFrame(
        {
            "query_id": frame["id"].to_numpy()[q],
            "query_idx": frame["idx"].to_numpy(np.int64)[q],
            "rank": (r + 1).astype(np.int32),
            "item_idx": ids[q, r],
            "score": scores[q, r].astype(np.float32),
        }
    )


# ---------------------------------------------------------------------------- evaluation


def spark_ranking_metrics(recs, test, ks: tuple[int, ...]) -> dict[str, float]:
    """Protocol P1 metrics of ranked lists, computed in Spark.

    ``recs``: (query_idx, rank, item_idx), ranks from 1; ``test``: (query_idx, item_idx).
    Same definitions as :func:`adjoint_spark.metrics.ranking_metrics`: averages over
    queries with at least one test item (a query without recommendations scores 0).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    relevant = test.groupBy("query_idx").agg(F.count("*").alias("num_relevant"))
    hits = recs.select("query_idx", "item_idx", "rank").join(
        test.select("query_idx", "item_idx"), ["query_idx", "item_idx"]
    )
    hits = hits.withColumn(
        "hit_no", F.row_number().over(Window.partitionBy("query_idx").orderBy("rank"))
    )
    aggs = []
    for k in ks:
        within = F.col("rank") <= k
        aggs += [
            F.sum(F.when(within, 1.0).otherwise(0.0)).alias(f"hits_{k}"),
            F.sum(F.when(within, 1.0 / F.log2(F.col("rank") + 1.0)).otherwise(0.0)).alias(
                f"dcg_{k}"
            ),
            F.sum(F.when(within, F.col("hit_no") / F.col("rank")).otherwise(0.0)).alias(f"ap_{k}"),
        ]
    per_query = relevant.join(hits.groupBy("query_idx").agg(*aggs), "query_idx", "left")
    per_query = per_query.fillna(0.0)
    n = F.col("num_relevant").cast("double")
    out_cols = [F.count("*").alias("num_queries")]
    for k in ks:
        ideal_len = F.least(n, F.lit(float(k)))
        ideal = F.aggregate(
            F.sequence(F.lit(1), ideal_len.cast("int")),
            F.lit(0.0),
            lambda acc, i: acc + 1.0 / F.log2(i + 1.0),
        )
        out_cols += [
            F.avg(F.col(f"hits_{k}") / k).alias(f"precision@{k}"),
            F.avg(F.col(f"hits_{k}") / n).alias(f"recall@{k}"),
            F.avg(F.col(f"dcg_{k}") / ideal).alias(f"ndcg@{k}"),
            F.avg(F.col(f"ap_{k}") / ideal_len).alias(f"map@{k}"),
            (F.sum(f"hits_{k}") / F.sum(n)).alias(f"micro_recall@{k}"),
        ]
    row = per_query.agg(*out_cols).first().asDict()
    return {key: (int(v) if key == "num_queries" else float(v or 0.0)) for key, v in row.items()}


# ---------------------------------------------------------------------------- driver


@dataclass
class RetrieveResult:
    path: str
    metrics: dict


def fetch_index(storage: Storage, index_dir: str, manifest: dict, tmp: str) -> dict[str, str]:
    """Copy the index files to local disk under names unique to this index and check
    them against the manifest; returns {manifest file name: local path}."""
    local = {}
    for name, expected in manifest["files"].items():
        uri = join(index_dir, name)
        if not storage.exists(uri):
            raise ArtifactError(f"{uri} is missing: build the index again (index stage)")
        # Spark files are keyed by name: a name unique to this build never collides
        # with an earlier index shipped from the same session.
        unique = name if name.endswith(".ivfdata") else f"items-{expected['sha256'][:16]}.faiss"
        path = os.path.join(tmp, unique)
        storage.copy_to_local(uri, path)
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise ArtifactError(
                f"{uri} has {size:,} bytes, its manifest says {expected['bytes']:,}: the file is "
                "truncated or was replaced; build the index again"
            )
        digest = sha256_file(path)
        if digest != expected["sha256"]:
            raise ArtifactError(
                f"{uri} does not match the SHA-256 in {index_dir}/manifest.json "
                f"({digest[:16]}... against {expected['sha256'][:16]}...): build the index again"
            )
        local[name] = path
    return local


def seen_items(spark, prepared: str):
    from pyspark.sql import functions as F

    train = spark.read.parquet(join(prepared, "train_pairs"))
    return train.groupBy("query_idx").agg(
        F.collect_list(F.col("item_idx").cast("long")).alias("seen")
    )


def run_retrieve(spark, config: Config, timer: Timer | None = None) -> RetrieveResult:
    """Embed every query, search the index, evaluate; publish vectors/queries,
    recommendations and metrics.json."""
    from pyspark.sql import functions as F

    timer = timer or Timer()
    cfg = config.retrieve
    storage = Storage(spark)
    output = config.output
    prepared = join(output, "prepared")
    index_dir = join(output, "index")
    started = time.perf_counter()
    with timer.phase("retrieve"), tempfile.TemporaryDirectory() as tmp:
        # Refuse mismatched or damaged artifacts before writing anything.
        manifest = read_json_required(storage, join(prepared, "manifest.json"), "prepare")
        model = ModelArtifact.read(storage, output)
        model.check_prepared(manifest, join(prepared, "manifest.json"))
        index_manifest = read_json_required(storage, join(index_dir, "manifest.json"), "index")
        if index_manifest["model_fingerprint"] != model.fingerprint:
            raise ArtifactError(
                f"{index_dir}/manifest.json was built with another model than "
                f"{model.path}/model.pt (fingerprint {index_manifest['model_fingerprint'][:16]}... "
                f"against {model.fingerprint[:16]}...): run the index stage again"
            )
        files = fetch_index(storage, index_dir, index_manifest, tmp)
        for path in files.values():
            ship_file(spark, path, os.path.basename(path))
        index_name = os.path.basename(files[index_manifest["file"]])
        ondisk = index_manifest.get("ivfdata") is not None
        nprobe = cfg.nprobe or index_manifest["nprobe"]
        logger.info(
            "searching %s (%s, nprobe %d) for the top %d items of every query",
            index_manifest["file"],
            index_manifest["factory"],
            nprobe,
            cfg.top_k,
        )

        with (
            Staging(storage, output, "vectors/queries") as vectors_stage,
            Staging(storage, output, "recommendations") as recs_stage,
        ):
            with timer.phase("embed"):
                queries = spark.read.parquet(join(prepared, "queries"))
                if cfg.num_partitions:
                    queries = queries.repartition(cfg.num_partitions, "query_idx")
                payload = spark.sparkContext.broadcast(model.ship_tower(spark, "query"))
                id_type = dict(queries.dtypes)["query_id"]
                embedded = embed_rows(queries, payload, "query", model.embedding_dim,
                                      cfg.batch_size, task_faults("embed"))  # fmt: skip
                write_vectors(embedded, vectors_stage.path)
                payload.unpersist()

            with timer.phase("search"):
                vectors = spark.read.parquet(vectors_stage.path)
                if cfg.exclude_train:
                    seen = seen_items(spark, prepared).withColumnRenamed("query_idx", "idx")
                    vectors = vectors.join(seen, "idx", "left")
                else:
                    vectors = vectors.withColumn("seen", F.lit(None).cast("array<long>"))
                found = vectors.mapInPandas(
                    search_partitions(
                        index_name, ondisk, nprobe, cfg.top_k, cfg.batch_size, task_faults("search")
                    ),
                    RECOMMENDATION_SCHEMA.format(id=id_type),
                )
                items = spark.read.parquet(join(prepared, "items")).select(
                    F.col("item_idx").cast("long"), "item_id"
                )
                recs = found.join(items, "item_idx").select(
                    "query_id", "rank", "item_id", "score", "query_idx", "item_idx"
                )
                recs.sortWithinPartitions("query_idx", "rank").write.mode("overwrite").parquet(
                    recs_stage.path
                )

            with timer.phase("evaluate"):
                written = spark.read.parquet(recs_stage.path)
                counts = written.agg(
                    F.countDistinct("query_idx").alias("queries"), F.count("*").alias("rows")
                ).first()
                test = spark.read.parquet(join(prepared, "test_pairs"))
                through_index = spark_ranking_metrics(written, test, cfg.eval_ks)
                metrics = {
                    "index": through_index,
                    "exact": exact_metrics(model.info),
                    "index_recall": {
                        f"recall@{index_manifest['recall_k']}": index_manifest["nprobe_recall"],
                        "nprobe": index_manifest["nprobe"],
                        "sweep_queries": index_manifest["sweep_queries"],
                    },
                    "nprobe": nprobe,
                    "top_k": cfg.top_k,
                    "exclude_train": cfg.exclude_train,
                    "num_queries": manifest["num_queries"],
                    "queries_with_recommendations": int(counts["queries"]),
                    "recommendation_rows": int(counts["rows"]),
                    "model_fingerprint": model.fingerprint,
                    "index_build_id": index_manifest["build_id"],
                    "seconds": round(time.perf_counter() - started, 3),
                }
            vectors_stage.publish()
            path = recs_stage.publish()
            storage.publish_json(join(output, "metrics.json"), metrics)
    logger.info("recommendations: %s", path)
    return RetrieveResult(path, metrics)


def exact_metrics(info: dict) -> dict:
    """The model's metrics by exact search over all items, measured by the train stage
    at its best epoch (on every test query unless train.eval_queries sampled them)."""
    return {
        **info["metrics"],
        "source": f"train stage, exact search, best epoch {info['best_epoch']}",
        "eval_queries": info["train"].get("eval_queries", 0) or "all",
    }
