"""Training batches from the prepared Parquet, read through Petastorm.

A :class:`TrainBatch` holds the features of B queries, of the U distinct items among
their positives and negatives, and the positions of each row's positive and negatives
among those U items, so the item tower runs once per distinct item.

The ``memory`` feed reads the query, item and pair tables once (Petastorm, several
reader threads) into tensors and draws each epoch's order and negatives on the driver.
The ``stream`` feed (:mod:`adjoint_spark.stream`) has Spark write each epoch's examples
with their features and reads them back in order; both build batches with
:func:`assemble_batch` from the same draws, so they give the same batches.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from adjoint_spark.sampling import (
    NegativeSpec,
    PairSet,
    draw_negatives,
    epoch_order,
    hash_columns,
)
from adjoint_spark.storage import to_uri

logger = logging.getLogger(__name__)


def read_parquet_columns(
    path: str,
    columns: list[str] | None = None,
    workers: int = 2,
    shard: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Read a Parquet folder through Petastorm's batch reader into NumPy columns.

    List columns (fixed length, padded by the prepare job) come back as 2-D arrays.
    The row order follows the reader threads and is not stable: callers sort.
    ``shard=(cur_shard, shard_count)`` reads only row groups ``k`` with
    ``k % shard_count == cur_shard`` (Petastorm's sharding; it needs at least
    ``shard_count`` row groups).
    """
    from petastorm import make_batch_reader

    cur_shard, shard_count = shard if shard else (None, None)

    chunks: dict[str, list[np.ndarray]] = {}
    with warnings.catch_warnings():
        # Petastorm 0.12 uses pyarrow's legacy dataset API and warns on every call;
        # drop this filter when Petastorm moves to pyarrow.dataset.
        warnings.simplefilter("ignore", FutureWarning)
        with make_batch_reader(
            to_uri(path),
            num_epochs=1,
            workers_count=workers,
            reader_pool_type="thread",
            shuffle_row_groups=False,
            schema_fields=columns,
            cur_shard=cur_shard,
            shard_count=shard_count,
        ) as reader:
            for batch in reader:
                for name, values in batch._asdict().items():
                    chunks.setdefault(name, []).append(np.asarray(values))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


@dataclass
class FeatureTable:
    """The features of all queries or all items, row ``k`` holding entity index ``k``."""

    columns: dict[str, Tensor]

    @staticmethod
    def from_columns(
        data: dict[str, np.ndarray], idx_column: str, num_rows: int, feature_columns: list[str]
    ) -> FeatureTable:
        idx = data[idx_column].astype(np.int64)
        if len(idx) != num_rows or not np.array_equal(np.sort(idx), np.arange(num_rows)):
            raise ValueError(
                f"{idx_column} does not cover 0..{num_rows - 1} exactly once "
                f"({len(idx)} rows read): the prepared data do not match the manifest"
            )
        order = np.argsort(idx)
        cols = {"idx": torch.from_numpy(idx[order])}
        for name in feature_columns:
            values = data[name][order]
            dtype = torch.float32 if name == "num" else torch.int64
            cols[name] = torch.as_tensor(np.ascontiguousarray(values)).to(dtype)
        return FeatureTable(cols)

    def gather(self, index: Tensor) -> dict[str, Tensor]:
        return {name: col[index] for name, col in self.columns.items()}

    def __len__(self) -> int:
        return len(self.columns["idx"])


@dataclass
class TrainBatch:
    """One training step's inputs.

    Attributes:
        query: features of the B queries (``idx`` included).
        items: features of the U distinct items among positives and valid negatives.
        pos: (B,) positions of each row's positive in ``items``.
        neg: (B, N) positions of each row's negatives in ``items`` (0 where invalid).
        neg_valid: (B, N) False where no negative could be drawn.
        own: (B, B) True where row r's history holds row c's positive, or None.
    """

    query: dict[str, Tensor]
    items: dict[str, Tensor]
    pos: Tensor
    neg: Tensor
    neg_valid: Tensor
    own: Tensor | None = None

    def to(self, device: torch.device) -> TrainBatch:
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        return TrainBatch(
            move(self.query),
            move(self.items),
            self.pos.to(device),
            self.neg.to(device),
            self.neg_valid.to(device),
            None if self.own is None else self.own.to(device),
        )


@dataclass(frozen=True)
class HistoryRule:
    """How training treats query sequences built from train pairs.

    Each row's positive is always removed from them (left in, the model would learn to
    copy it). With ``sample`` > 0, a row keeps a random ``sample`` of the remaining
    items, redrawn every epoch (a hash of seed, epoch, query, item and position), while
    evaluation sees the whole history: an augmentation that regularises strongly.
    """

    columns: tuple[str, ...]
    sample: int = 0
    seed: int = 0


def history_mask(rule: HistoryRule, query: dict[str, Tensor], pos_item: Tensor,
                 epoch: int) -> None:  # fmt: skip
    """Apply ``rule`` to the history columns of a batch, in place."""
    for column in rule.columns:
        seq = query[column].masked_fill(query[column] == (pos_item + 1).unsqueeze(1), 0)
        if rule.sample > 0 and seq.shape[1] > rule.sample:
            rows = query["idx"].numpy()[:, None]
            slots = np.arange(seq.shape[1])[None, :]
            keys = hash_columns(rule.seed, epoch, 0x4853, rows, pos_item.numpy()[:, None], slots)
            keys = torch.from_numpy((keys >> np.uint64(1)).astype(np.int64))
            keys = keys.masked_fill(seq == 0, torch.iinfo(torch.int64).max)
            keep = keys.topk(rule.sample, dim=1, largest=False).indices.sort(dim=1).values
            seq = torch.gather(seq, 1, keep)
        query[column] = seq


def own_items_mask(query: dict[str, Tensor], columns: tuple[str, ...],
                   pos_item: Tensor) -> Tensor | None:  # fmt: skip
    """(B, B): True where row r's history holds column c's positive (before masking).

    In-batch softmax uses it to keep a query's other train items from counting as its
    negatives; exact when the history holds all of a query's train items.
    """
    if not columns:
        return None
    seq = query[columns[0]]
    b, width = seq.shape
    num = int(max(int(seq.max()), int(pos_item.max()) + 1)) + 1
    rows = torch.arange(b).unsqueeze(1).expand(b, width)
    keys = torch.unique(rows[seq > 0] * num + seq[seq > 0])
    wanted = torch.arange(b).unsqueeze(1) * num + (pos_item + 1).unsqueeze(0)
    pos = torch.searchsorted(keys, wanted).clamp(max=max(len(keys) - 1, 0))
    found = keys[pos] == wanted if len(keys) else torch.zeros_like(wanted, dtype=torch.bool)
    return found & ~torch.eye(b, dtype=torch.bool)


def assemble_batch(
    query: dict[str, Tensor],
    pos_item: Tensor,
    neg_item: Tensor,
    neg_valid: Tensor,
    item_features,
    rule: HistoryRule,
    epoch: int,
) -> TrainBatch:
    """Build a :class:`TrainBatch` from per-row query features and item indexes.

    ``item_features(unique_items)`` returns the features of the given sorted item
    indexes; the distinct items are the positives and the valid negatives.
    """
    candidates = torch.cat([pos_item, neg_item[neg_valid]])
    unique, inverse = torch.unique(candidates, sorted=True, return_inverse=True)
    b = len(pos_item)
    pos = inverse[:b]
    neg = torch.zeros_like(neg_item)
    neg[neg_valid] = inverse[b:]
    own = own_items_mask(query, rule.columns, pos_item)
    history_mask(rule, query, pos_item, epoch)
    return TrainBatch(query, item_features(unique), pos, neg, neg_valid, own)


class MemoryFeed:
    """All features and train pairs in memory; order and negatives drawn per epoch."""

    def __init__(
        self,
        prepared: str,
        manifest: dict,
        spec: NegativeSpec,
        batch_size: int,
        workers: int = 2,
        history_sample: int = 0,
    ):
        self.manifest = manifest
        self.spec = spec
        self.batch_size = batch_size
        self.num_items = manifest["num_items"]
        self.queries = load_features(prepared, manifest, "queries", workers)
        self.items = load_features(prepared, manifest, "items", workers)
        pairs = read_parquet_columns(f"{prepared}/train_pairs", ["query_idx", "item_idx"], workers)
        self.pair_query, self.pair_item = sorted_pairs(pairs)
        self.learn_pairs(self.pair_query, self.pair_item, history_sample)
        logger.info(
            "memory feed: %d queries, %d items, %d train pairs",
            len(self.queries),
            len(self.items),
            len(self.pair_query),
        )

    def learn_pairs(self, query: np.ndarray, item: np.ndarray, history_sample: int) -> None:
        """What sampling needs from ALL train pairs: each query's positives (never drawn
        as negatives), the items' pair counts (popular negatives, logQ) and the history
        rule."""
        self.positives = PairSet(query, item, self.num_items)
        self.item_cdf = np.cumsum(np.bincount(item, minlength=self.num_items))
        self.rule = HistoryRule(
            tuple(history_columns(self.manifest)), history_sample, self.spec.seed
        )

    @property
    def num_pairs(self) -> int:
        return len(self.pair_query)

    def num_batches(self) -> int:
        return -(-self.num_pairs // self.batch_size)

    def batches(self, epoch: int) -> Iterator[TrainBatch]:
        order = epoch_order(self.pair_query, self.pair_item, self.spec.seed, epoch)
        for start in range(0, self.num_pairs, self.batch_size):
            sel = order[start : start + self.batch_size]
            q, i = self.pair_query[sel], self.pair_item[sel]
            yield self.batch_for(q, i, epoch)

    def batch_for(self, q: np.ndarray, i: np.ndarray, epoch: int) -> TrainBatch:
        neg, valid = draw_negatives(
            q, i, self.spec, epoch, self.item_cdf, self.positives, self.num_items
        )
        query = self.queries.gather(torch.from_numpy(q))
        return assemble_batch(
            query,
            torch.from_numpy(i),
            torch.from_numpy(neg),
            torch.from_numpy(valid),
            self.items.gather,
            self.rule,
            epoch,
        )


def sorted_pairs(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(query_idx, item_idx)`` as int64, ordered by query, then item (the reader's row
    order is not stable)."""
    order = np.lexsort((columns["item_idx"], columns["query_idx"]))
    return columns["query_idx"][order].astype(np.int64), columns["item_idx"][order].astype(np.int64)


def feature_columns(manifest: dict, table: str) -> list[str]:
    features = manifest["features"][table]
    columns = []
    if features["numeric"]:
        columns.append("num")
    if features["categorical"]:
        columns.append("cat")
    columns += [s["column"] for s in features["sequences"]]
    return columns


def history_columns(manifest: dict) -> list[str]:
    """Query sequence columns built from train pairs (left-one-out in training)."""
    return [
        s["column"]
        for s in manifest["features"]["queries"]["sequences"]
        if s.get("source") == "train_pairs"
    ]


def load_features(prepared: str, manifest: dict, table: str, workers: int = 2) -> FeatureTable:
    idx_column = "query_idx" if table == "queries" else "item_idx"
    num_rows = manifest["num_queries" if table == "queries" else "num_items"]
    columns = feature_columns(manifest, table)
    data = read_parquet_columns(f"{prepared}/{table}", [idx_column, *columns], workers)
    return FeatureTable.from_columns(data, idx_column, num_rows, columns)
