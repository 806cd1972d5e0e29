"""The ``stream`` feed: Spark writes each epoch's examples, Petastorm reads them back.

For data that do not fit on the driver. Per epoch, Spark (on the executors):

1. draws the epoch order and the negatives of every train pair with the same
   counter-based functions as the memory feed (:mod:`adjoint_spark.sampling`), inside
   ``mapInPandas``, each row carrying its query's train items for the exclusion;
2. numbers the examples 0..n-1 in that order (``rank``);
3. joins the features of the query, the positive and the N negatives (negatives
   flattened into fixed-length lists, as Petastorm needs);
4. writes them range-partitioned and sorted by rank to ``<stream dir>/epoch=<e>/``.

The driver reads the folder with several Petastorm reader threads; row groups arrive
in any order, so a small reorder buffer (at most the reader's queue) puts them back in
rank order. Driver memory is bounded by a few row groups, whatever the size of the item
and pair tables. The next epoch is written while the current one trains.
"""

from __future__ import annotations

import heapq
import logging
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from adjoint_spark.feed import (
    HistoryRule,
    TrainBatch,
    assemble_batch,
    feature_columns,
    history_columns,
)
from adjoint_spark.prepare import dense_index
from adjoint_spark.sampling import NegativeSpec, PairSet, draw_negatives, epoch_order_key
from adjoint_spark.storage import Storage, join, to_uri

logger = logging.getLogger(__name__)

ROW_GROUP_BYTES = 4 << 20


def read_item_cdf(counts_path: str, num_items: int) -> np.ndarray:
    """Cumulative train pairs per item from the (item_idx, count) file Spark wrote."""
    import pyarrow.parquet as pq

    counts = pq.read_table(to_uri(counts_path)).to_pandas()
    dense = np.zeros(num_items, dtype=np.int64)
    dense[counts["item_idx"].to_numpy()] = counts["count"].to_numpy()
    return np.cumsum(dense)


def negatives_udf(spec: NegativeSpec, epoch: int, counts_path: str, num_items: int):
    """The function ``mapInPandas`` runs: order key and negatives per train pair."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        item_cdf = read_item_cdf(counts_path, num_items)
        for frame in frames:
            q = frame["query_idx"].to_numpy(np.int64)
            i = frame["item_idx"].to_numpy(np.int64)
            lists = frame["positives"].to_numpy()
            lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
            own = np.concatenate(lists).astype(np.int64) if len(lists) else np.zeros(0, np.int64)
            positives = PairSet(np.repeat(q, lengths), own, num_items)
            neg, valid = draw_negatives(q, i, spec, epoch, item_cdf, positives, num_items)
            yield pd.DataFrame(
                {
                    "order_key": epoch_order_key(q, i, spec.seed, epoch),
                    "query_idx": q.astype(np.int32),
                    "item_idx": i.astype(np.int32),
                    "neg_idx": list(neg.astype(np.int32)),
                    "neg_valid": list(valid.astype(np.int8)),
                }
            )

    return run


NEG_SCHEMA = (
    "order_key long, query_idx int, item_idx int, neg_idx array<int>, neg_valid array<tinyint>"
)


def materialize_epoch(
    spark: SparkSession,
    prepared: str,
    manifest: dict,
    spec: NegativeSpec,
    epoch: int,
    folder: str,
    counts_path: str,
) -> str:
    """Write epoch ``epoch``'s examples with their features; return the folder."""
    pairs = spark.read.parquet(join(prepared, "train_pairs")).select("query_idx", "item_idx")
    lists = pairs.groupBy("query_idx").agg(F.collect_list("item_idx").alias("positives"))
    drawn = pairs.join(lists, "query_idx").mapInPandas(
        negatives_udf(spec, epoch, counts_path, manifest["num_items"]), NEG_SCHEMA
    )
    order = [F.col("order_key"), F.col("query_idx"), F.col("item_idx")]
    persisted: list[DataFrame] = []

    def keep(df: DataFrame) -> DataFrame:
        persisted.append(df.persist(StorageLevel.MEMORY_AND_DISK))
        return df

    ranked = dense_index(spark, drawn, order, "rank", keep).drop("order_key")

    queries = spark.read.parquet(join(prepared, "queries"))
    qcols = feature_columns(manifest, "queries")
    examples = ranked.join(
        queries.select("query_idx", *[F.col(c).alias(f"q_{c}") for c in qcols]), "query_idx"
    )
    items = spark.read.parquet(join(prepared, "items"))
    icols = feature_columns(manifest, "items")
    examples = examples.join(
        items.select(
            F.col("item_idx").alias("item_idx"), *[F.col(c).alias(f"p_{c}") for c in icols]
        ),
        "item_idx",
    )
    if spec.num_negatives:
        examples = examples.join(negative_features(ranked, items, icols), "rank")
    out = join(folder, f"epoch={epoch}")
    try:
        (
            examples.repartitionByRange(max(1, spark.sparkContext.defaultParallelism), "rank")
            .sortWithinPartitions("rank")
            .write.mode("overwrite")
            .option("parquet.block.size", ROW_GROUP_BYTES)
            .parquet(out)
        )
    finally:
        for df in persisted:
            df.unpersist()
    return out


def negative_features(ranked: DataFrame, items: DataFrame, icols: list[str]) -> DataFrame:
    """Per example, the negatives' features flattened in slot order."""
    slots = ranked.select("rank", F.posexplode("neg_idx").alias("slot", "neg_item"))
    feats = items.select(F.col("item_idx").alias("neg_item"), *icols)
    joined = slots.join(feats, "neg_item")
    grouped = joined.groupBy("rank").agg(
        F.sort_array(F.collect_list(F.struct("slot", *icols))).alias("_n")
    )
    return grouped.select("rank", *[F.flatten(F.col("_n")[c]).alias(f"n_{c}") for c in icols])


class ReorderBuffer:
    """Yields rows in rank order from chunks that arrive in any order.

    Each chunk holds a contiguous run of ranks; chunks wait in a heap until the next
    expected rank arrives, so at most the chunks the reader already holds are kept.
    """

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, dict]] = []
        self.next_rank = 0
        self.count = 0
        self.max_held = 0

    def push(self, chunk: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        order = np.argsort(chunk["rank"], kind="stable")
        chunk = {k: v[order] for k, v in chunk.items()}
        heapq.heappush(self.heap, (int(chunk["rank"][0]), self.count, chunk))
        self.count += 1
        self.max_held = max(self.max_held, len(self.heap))
        while self.heap and self.heap[0][0] == self.next_rank:
            _, _, ready = heapq.heappop(self.heap)
            self.next_rank = int(ready["rank"][-1]) + 1
            yield ready


class StreamFeed:
    """Training batches from per-epoch example files written by Spark (see module doc)."""

    def __init__(
        self,
        spark: SparkSession,
        prepared: str,
        manifest: dict,
        spec: NegativeSpec,
        batch_size: int,
        folder: str,
        workers: int = 2,
        num_epochs: int | None = None,
        history_sample: int = 0,
    ):
        self.spark, self.prepared, self.manifest = spark, prepared, manifest
        self.num_epochs = num_epochs
        self.spec, self.batch_size, self.folder, self.workers = spec, batch_size, folder, workers
        self.storage = Storage(spark)
        self.num_items = manifest["num_items"]
        self.rule = HistoryRule(tuple(history_columns(manifest)), history_sample, spec.seed)
        self.qcols = feature_columns(manifest, "queries")
        self.icols = feature_columns(manifest, "items")
        pairs = spark.read.parquet(join(prepared, "train_pairs"))
        self.counts_path = join(folder, "item_counts")
        counts = pairs.groupBy("item_idx").count()
        counts.coalesce(1).write.mode("overwrite").parquet(self.counts_path)
        counts_rows = spark.read.parquet(self.counts_path)
        self.num_pairs = int(counts_rows.agg(F.sum("count")).first()[0])
        self._item_cdf = None
        self._pending: dict[int, tuple[threading.Thread, list]] = {}
        logger.info("stream feed: %d train pairs, examples under %s", self.num_pairs, folder)

    @property
    def item_cdf(self) -> np.ndarray:
        """Cumulative train pairs per item (for logQ); read from the counts file."""
        if self._item_cdf is None:
            self._item_cdf = read_item_cdf(self.counts_path, self.num_items)
        return self._item_cdf

    def num_batches(self) -> int:
        return -(-self.num_pairs // self.batch_size)

    def _start(self, epoch: int) -> None:
        if epoch in self._pending:
            return
        result: list = []

        def work() -> None:
            try:
                result.append(
                    materialize_epoch(
                        self.spark,
                        self.prepared,
                        self.manifest,
                        self.spec,
                        epoch,
                        self.folder,
                        self.counts_path,
                    )
                )
            except BaseException as exc:  # handed to the training thread below
                result.append(exc)

        thread = threading.Thread(target=work, name=f"materialize-epoch-{epoch}", daemon=True)
        thread.start()
        self._pending[epoch] = (thread, result)

    def _wait(self, epoch: int) -> str:
        self._start(epoch)
        thread, result = self._pending.pop(epoch)
        thread.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def batches(self, epoch: int, prefetch: bool = True) -> Iterator[TrainBatch]:
        """Epoch ``epoch``'s batches; the next epoch is written meanwhile (``prefetch``)."""
        path = self._wait(epoch)
        if prefetch and (self.num_epochs is None or epoch + 1 < self.num_epochs):
            self._start(epoch + 1)
        try:
            yield from self.read_batches(path, epoch)
        finally:
            self.storage.delete(path)

    def close(self) -> None:
        for thread, _ in self._pending.values():
            thread.join()
        self._pending.clear()

    def read_batches(self, path: str, epoch: int) -> Iterator[TrainBatch]:
        from petastorm import make_batch_reader

        buffer = ReorderBuffer()
        carry: dict[str, np.ndarray] | None = None
        with warnings.catch_warnings():
            # Petastorm 0.12 warns about pyarrow's legacy dataset API on every call.
            warnings.simplefilter("ignore", FutureWarning)
            with make_batch_reader(
                to_uri(path),
                num_epochs=1,
                workers_count=self.workers,
                reader_pool_type="thread",
                shuffle_row_groups=False,
            ) as reader:
                for raw in reader:
                    chunk = {k: np.asarray(v) for k, v in raw._asdict().items()}
                    for ready in buffer.push(chunk):
                        carry = (
                            ready
                            if carry is None
                            else {k: np.concatenate([carry[k], ready[k]]) for k in ready}
                        )
                        while len(carry["rank"]) >= self.batch_size:
                            head = {k: v[: self.batch_size] for k, v in carry.items()}
                            carry = {k: v[self.batch_size :] for k, v in carry.items()}
                            yield self.to_batch(head, epoch)
        if carry is not None and len(carry["rank"]):
            yield self.to_batch(carry, epoch)
        assert not buffer.heap, f"ranks missing after {buffer.next_rank} in {path}"
        logger.debug("reorder buffer held at most %d chunks", buffer.max_held)

    def to_batch(self, rows: dict[str, np.ndarray], epoch: int) -> TrainBatch:
        b = len(rows["rank"])
        n = self.spec.num_negatives
        query = {"idx": torch.from_numpy(rows["query_idx"].astype(np.int64))}
        for c in self.qcols:
            query[c] = _tensor(c, rows[f"q_{c}"])
        pos_item = rows["item_idx"].astype(np.int64)
        neg_item = rows["neg_idx"].astype(np.int64).reshape(b, n)
        valid = rows["neg_valid"].astype(bool).reshape(b, n)
        # Item rows of positives then negatives; a distinct item takes its first row.
        all_idx = np.concatenate([pos_item, neg_item.ravel()])
        feats = {}
        for c in self.icols:
            pos = rows[f"p_{c}"]
            neg = rows[f"n_{c}"].reshape(b * n, -1) if n else pos[:0]
            feats[c] = np.concatenate([pos, neg])
        order = np.argsort(all_idx, kind="stable")
        sorted_idx = all_idx[order]

        def item_features(unique: torch.Tensor) -> dict[str, torch.Tensor]:
            wanted = unique.numpy()
            rows_at = order[np.searchsorted(sorted_idx, wanted)]
            out = {"idx": torch.from_numpy(wanted.astype(np.int64))}
            for c in self.icols:
                out[c] = _tensor(c, feats[c][rows_at])
            return out

        return assemble_batch(
            query,
            torch.from_numpy(pos_item),
            torch.from_numpy(neg_item),
            torch.from_numpy(valid),
            item_features,
            self.rule,
            epoch,
        )


def _tensor(column: str, values: np.ndarray) -> torch.Tensor:
    dtype = torch.float32 if column == "num" else torch.int64
    return torch.as_tensor(np.ascontiguousarray(values)).to(dtype)
