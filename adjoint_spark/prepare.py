"""The prepare stage: validate, encode, split and write the feature tables as Parquet.

Outputs under ``<output>/prepared/`` (published whole, see :mod:`adjoint_spark.storage`):

- ``queries/``: ``query_id`` (input id), ``query_idx`` (dense 0..num_queries-1),
  ``num`` (array<float>, scaled), ``cat`` (array<int>, per-column vocabulary ids, 0 for
  unseen or rare), ``seq_<name>`` (array<int> of ``item_idx + 1``, 0 pads, length
  ``max_len``); a part is absent when the table has no feature of that kind.
- ``items/``: the same with ``item_id`` and ``item_idx``.
- ``train_pairs/``, ``test_pairs/``: ``query_id``, ``item_id``, ``query_idx``,
  ``item_idx``, ``ts``.
- ``rejects/``: ``table``, ``source``, ``row``, ``raw``, ``reason``.
- ``vocab/``: ``table``, ``column``, ``value``, ``id``, ``count``.
- ``manifest.json``: feature spec, statistics, counts, split and input fingerprints.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from adjoint_spark import __version__
from adjoint_spark.config import Config, PrepareConfig
from adjoint_spark.readers import (
    EntityFrame,
    LabelFrame,
    PrepareError,
    RawDataset,
    SequenceField,
    mark_duplicates,
    read_dataset,
)
from adjoint_spark.storage import Staging, Storage, join
from adjoint_spark.timing import Timer

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
REJECT_COLUMNS = ["table", "source", "row", "raw", "reason"]


@dataclass
class PrepareResult:
    path: str
    manifest: dict


# ---------------------------------------------------------------------------- helpers


def table_counts(frame: DataFrame) -> dict[str, int]:
    """read / accepted / rejected of a frame with a ``reason`` column."""
    row = frame.agg(
        F.count(F.lit(1)).alias("read"),
        F.count(F.when(F.col("reason").isNull(), 1)).alias("accepted"),
    ).first()
    read, accepted = int(row["read"]), int(row["accepted"])
    return {"read": read, "accepted": accepted, "rejected": read - accepted}


def top_reasons(frame: DataFrame, limit: int = 3) -> list[str]:
    rows = (
        frame.where(F.col("reason").isNotNull())
        .groupBy("reason")
        .count()
        .orderBy(F.desc("count"), "reason")
        .limit(limit)
        .collect()
    )
    return [f"{r['count']} x {r['reason']}" for r in rows]


def check_table(table: str, frame: DataFrame, files: list[str], counts: dict[str, int]) -> None:
    """Stop the job when a table is empty or none of its rows is usable."""
    where = files[0] if len(files) == 1 else f"{len(files)} files under {files[0]}"
    if counts["read"] == 0:
        raise PrepareError(f"{table}: {where} has no rows")
    if counts["accepted"] == 0:
        reasons = "; ".join(top_reasons(frame))
        raise PrepareError(
            f"{table}: no row of {where} is usable (does the config's column count fit "
            f"the file?); most common problems: {reasons}"
        )


def dense_index(
    spark: SparkSession, df: DataFrame, order: list[Column], out: str, keep
) -> DataFrame:
    """Add ``out``: each row's position 0..n-1 in ``order``, without a one-partition sort.

    The rows are range-sorted and persisted (through ``keep``, which the caller
    unpersists when done); per-partition counts give each partition's offset, and the
    monotonically increasing id gives the position inside it. ``order`` must be a total
    order (ties would make the positions depend on the partitioning).
    """
    ordered = keep(
        df.orderBy(*order)
        .withColumn("_p", F.spark_partition_id())
        .withColumn("_m", F.monotonically_increasing_id())
    )
    parts = ordered.groupBy("_p").agg(F.count(F.lit(1)).alias("_n"), F.min("_m").alias("_first"))
    offsets, start = [], 0
    for p in sorted(parts.collect(), key=lambda r: r["_p"]):
        offsets.append((int(p["_p"]), int(p["_first"]), start))
        start += int(p["_n"])
    offsets_df = spark.createDataFrame(offsets, "_p int, _first long, _offset long")
    index = (F.col("_m") - F.col("_first") + F.col("_offset")).cast("int")
    return (
        ordered.join(F.broadcast(offsets_df), "_p")
        .withColumn(out, index)
        .drop("_p", "_m", "_first", "_offset")
    )


def pad(seq: Column, max_len: int) -> Column:
    """The last ``max_len`` elements of ``seq``, right-padded with 0 to ``max_len``."""
    start = F.greatest(F.size(seq) - max_len + 1, F.lit(1))
    kept = F.slice(seq, start, max_len)
    return F.concat(kept, F.array_repeat(F.lit(0), F.lit(max_len) - F.size(kept)))


# ---------------------------------------------------------------------------- labels


def attach_indexes(labels: DataFrame, query_map: DataFrame, item_map: DataFrame) -> DataFrame:
    """Join dense indexes; a valid label naming an unknown query or item is rejected."""
    q = query_map.withColumnRenamed("key", "query_key")
    i = item_map.withColumnRenamed("key", "item_key")
    joined = labels.join(q, "query_key", "left").join(i, "item_key", "left")
    reason = F.coalesce(
        F.col("reason"),
        F.when(
            F.col("query_idx").isNull(),
            F.concat(F.lit("unknown query "), F.col("query_key").cast("string")),
        ),
        F.when(
            F.col("item_idx").isNull(),
            F.concat(F.lit("unknown item "), F.col("item_key").cast("string")),
        ),
    )
    return joined.withColumn("reason", reason)


def validate_labels(
    frame: LabelFrame, query_map: DataFrame, item_map: DataFrame, train: DataFrame | None = None
) -> DataFrame:
    """Labels with unknown ids, duplicate pairs and (test labels) train pairs rejected."""
    df = attach_indexes(frame.frame, query_map, item_map)
    df = mark_duplicates(df, ["query_key", "item_key"], "pair")
    if train is not None:
        seen = train.select("query_key", "item_key").withColumn("_in_train", F.lit(True))
        df = df.join(seen, ["query_key", "item_key"], "left")
        df = df.withColumn(
            "reason",
            F.coalesce(
                F.col("reason"), F.when(F.col("_in_train"), F.lit("pair is also a train label"))
            ),
        ).drop("_in_train")
    return df.persist(StorageLevel.MEMORY_AND_DISK)


def random_split(labels: DataFrame, test_fraction: float, seed: int) -> DataFrame:
    """Add ``is_train``: per query, a seeded random ``1 - test_fraction`` of its pairs.

    The order is a hash of (seed, query, item), so the split does not depend on how
    the data are partitioned; a query keeps round(n * (1 - test_fraction)) pairs, at
    least one, for training.
    """
    order = F.xxhash64(F.lit(seed), F.col("query_key"), F.col("item_key"))
    w = Window.partitionBy("query_idx").orderBy(order, "item_key")
    n = F.count(F.lit(1)).over(Window.partitionBy("query_idx"))
    num_train = F.greatest(F.round(n * (1.0 - test_fraction)), F.lit(1))
    return labels.withColumn("is_train", F.row_number().over(w) <= num_train)


def pair_columns() -> list[Column]:
    """The columns of ``train_pairs`` and ``test_pairs``."""
    return [
        F.col("query_key").alias("query_id"),
        F.col("item_key").alias("item_id"),
        F.col("query_idx"),
        F.col("item_idx"),
        F.col("ts"),
    ]


# ---------------------------------------------------------------------------- features


def numeric_stats(frame: DataFrame, columns: list[str]) -> list[dict]:
    if not columns:
        return []
    aggs = []
    for c in columns:
        aggs += [F.mean(c), F.stddev_pop(c), F.min(c), F.max(c), F.count(c)]
    row = frame.agg(*aggs).first()
    stats = []
    for i, _ in enumerate(columns):
        mean, std, lo, hi, present = row[5 * i : 5 * i + 5]
        stats.append({"mean": mean, "std": std, "min": lo, "max": hi, "present": int(present)})
    return stats


def scaled(column: str, stat: dict, scaling: str) -> Column:
    """The scaled value as float; a missing value becomes the column mean's image."""
    mean = stat["mean"] if stat["mean"] is not None else 0.0
    value = F.coalesce(F.col(column), F.lit(mean))
    if scaling == "standard":
        std = stat["std"] if stat["std"] else 1.0
        value = (value - F.lit(mean)) / F.lit(std)
    elif scaling == "minmax":
        lo = stat["min"] if stat["min"] is not None else 0.0
        span = (stat["max"] - lo) if stat["max"] is not None and stat["max"] > lo else 1.0
        value = (value - F.lit(lo)) / F.lit(span)
    return value.cast("float")


def build_vocabs(frame: DataFrame, columns: list[str], min_count: int) -> DataFrame:
    """Vocabularies of all categorical ``columns`` in one pass over ``frame``.

    Returns (``col`` position, ``value``, ``count``, ``id``): ids 1..V per column for
    values seen at least ``min_count`` times, most frequent first (ties by value); id 0
    is left for unseen and rare values.
    """
    stacked = frame.select(
        F.explode(
            F.array(
                *[
                    F.struct(F.lit(j).alias("col"), F.col(c).alias("value"))
                    for j, c in enumerate(columns)
                ]
            )
        ).alias("_v")
    ).select("_v.col", "_v.value")
    counts = stacked.groupBy("col", "value").count()
    counts = counts.where(F.col("value").isNotNull() & (F.col("count") >= min_count))
    # One window partition per column: vocabularies are small next to the tables.
    w = Window.partitionBy("col").orderBy(F.desc("count"), "value")
    return counts.withColumn("id", F.row_number().over(w).cast("int"))


def map_sequence(
    frame: DataFrame, column: str, item_map: DataFrame, max_len: int
) -> tuple[DataFrame, DataFrame]:
    """Item keys in ``column`` as ``item_idx + 1``, padded; also the unmapped elements.

    An element naming an item that is not in the item table is left out of the
    sequence and counted in the manifest (the row itself is kept).
    """
    exploded = frame.select("key", F.posexplode(column).alias("pos", "item_key"))
    items = item_map.withColumnRenamed("key", "item_key")
    mapped = exploded.join(items, "item_key", "left")
    unknown = mapped.where(F.col("item_idx").isNull())
    grouped = (
        mapped.where(F.col("item_idx").isNotNull())
        .groupBy("key")
        .agg(F.sort_array(F.collect_list(F.struct("pos", "item_idx"))).alias("_l"))
        .select("key", F.transform("_l", lambda x: x["item_idx"] + 1).alias("_seq"))
    )
    result = frame.join(grouped, "key", "left").withColumn(
        column, pad(F.coalesce(F.col("_seq"), F.array().cast("array<int>")), max_len)
    )
    return result.drop("_seq"), unknown


def history_sequences(train: DataFrame, max_len: int) -> DataFrame:
    """Per query, its train items (``item_idx + 1``) oldest first, last ``max_len`` kept."""
    ordered = F.sort_array(F.collect_list(F.struct(F.coalesce("ts", F.lit(0)), "row", "item_idx")))
    return (
        train.groupBy(F.col("query_key").alias("key"))
        .agg(ordered.alias("_l"))
        .select("key", pad(F.transform("_l", lambda x: x["item_idx"] + 1), max_len).alias("_h"))
    )


def train_counts(train: DataFrame, key: str) -> DataFrame:
    return train.groupBy(F.col(key).alias("key")).agg(F.count(F.lit(1)).alias("_count"))


LABEL_TIMES = (("train_ts_mean", F.mean), ("train_ts_first", F.min), ("train_ts_last", F.max))


def train_times(train: DataFrame, key: str) -> tuple[DataFrame, float]:
    """Mean, first and last timestamp of each entity's train pairs, and the mean over all
    train pairs (what an entity without timestamped train pairs takes instead).

    Raises :class:`PrepareError` when no train pair has a timestamp.
    """
    timed = train.where(F.col("ts").isNotNull())
    overall = timed.agg(F.mean("ts")).first()[0]
    if overall is None:
        raise PrepareError(
            "prepare.label_times needs timestamps on the labels, and no train label has one:"
            " name the labels' time column (labels.timestamp) or set label_times: false"
        )
    aggs = [fn("ts").cast("double").alias(f"_{name}") for name, fn in LABEL_TIMES]
    return timed.groupBy(F.col(key).alias("key")).agg(*aggs), float(overall)


@dataclass
class EncodedTable:
    frame: DataFrame
    spec: dict
    vocab: DataFrame | None


def encode_entities(
    spark: SparkSession,
    entity: EntityFrame,
    accepted: DataFrame,
    index: DataFrame,
    role: str,
    item_map: DataFrame,
    train: DataFrame,
    options: PrepareConfig,
    keep,
) -> EncodedTable:
    """Scale numerics, map categoricals to vocabulary ids, map and pad sequences."""
    df = accepted.join(index, "key")
    numeric = list(entity.numeric)
    num_cols = [f"n_{i}" for i in range(len(numeric))]
    sequences = list(entity.sequences)
    seq_cols = [f"s_{k}" for k in range(len(sequences))]
    sources = ["column"] * len(sequences)

    # Derived features come from train pairs only, so test pairs leak nothing.
    label_key = "query_key" if role == "query" else "item_key"
    if options.label_counts:
        df = df.join(train_counts(train, label_key), "key", "left").withColumn(
            "n_count", F.log1p(F.coalesce(F.col("_count"), F.lit(0)).cast("double"))
        )
        numeric.append("log_train_count")
        num_cols.append("n_count")
    if options.label_times:
        times, overall = train_times(train, label_key)
        df = df.join(times, "key", "left")
        for name, _ in LABEL_TIMES:
            df = df.withColumn(f"n_{name}", F.coalesce(F.col(f"_{name}"), F.lit(overall)))
            numeric.append(name)
            num_cols.append(f"n_{name}")
    if role == "query" and options.history.enabled:
        df = df.join(history_sequences(train, options.history.max_len), "key", "left")
        empty = F.array_repeat(F.lit(0), options.history.max_len)
        df = df.withColumn("s_hist", F.coalesce(F.col("_h"), empty))
        sequences.append(SequenceField(options.history.name, options.history.max_len))
        seq_cols.append("s_hist")
        sources.append("train_pairs")

    # One persisted frame serves the statistics, the vocabularies and the write.
    df = keep(df)
    stats = numeric_stats(df, num_cols)
    num_rows = df.count()
    unknown_counts = []
    for col, seq, source in zip(seq_cols, sequences, sources, strict=True):
        if source == "column":
            df, unknown = map_sequence(df, col, item_map, seq.max_len)
            unknown_counts.append(unknown.count())
        else:
            unknown_counts.append(0)

    cat_specs, cat_cols, vocab = [], [], None
    if entity.categorical:
        names = [f"c_{j}" for j in range(len(entity.categorical))]
        vocab = keep(build_vocabs(df, names, options.categorical_min_count))
        sizes = dict(vocab.groupBy("col").count().collect())
        for j, name in enumerate(entity.categorical):
            ids = vocab.where(F.col("col") == j).select(
                F.col("value").alias(f"c_{j}"), F.col("id").alias(f"v_{j}")
            )
            df = df.join(ids, f"c_{j}", "left")
            cat_cols.append(F.coalesce(F.col(f"v_{j}"), F.lit(0)))
            cat_specs.append({"name": name, "vocab_size": sizes.get(j, 0) + 1, "unseen_id": 0})
        names_map = F.create_map(
            *[x for j, n in enumerate(entity.categorical) for x in (F.lit(j), F.lit(n))]
        )
        vocab = vocab.select(
            F.lit(role).alias("table"),
            names_map[F.col("col")].alias("column"),
            "value",
            "id",
            "count",
        )

    id_name, idx_name = f"{role}_id", f"{role}_idx"
    out = [F.col("key").alias(id_name), F.col(idx_name)]
    if num_cols:
        out.append(
            F.array(
                *[
                    scaled(c, s, options.numeric_scaling)
                    for c, s in zip(num_cols, stats, strict=True)
                ]
            ).alias("num")
        )
    if cat_cols:
        out.append(F.array(*cat_cols).alias("cat"))
    for col, seq in zip(seq_cols, sequences, strict=True):
        out.append(F.col(col).cast("array<int>").alias(f"seq_{seq.name}"))

    spec = {
        "numeric": [
            {"name": n, **s, "imputed": num_rows - s["present"]}
            for n, s in zip(numeric, stats, strict=True)
        ],
        "numeric_scaling": options.numeric_scaling,
        "categorical": cat_specs,
        "sequences": [
            {
                "name": s.name,
                "column": f"seq_{s.name}",
                "max_len": s.max_len,
                "source": src,
                "unknown_items": n,
            }
            for s, src, n in zip(sequences, sources, unknown_counts, strict=True)
        ],
    }
    return EncodedTable(df.select(*out), spec, vocab)


# ---------------------------------------------------------------------------- the stage


def _rejects(frame: DataFrame, table: str) -> DataFrame:
    return frame.where(F.col("reason").isNotNull()).select(
        F.lit(table).alias("table"), "source", "row", "raw", "reason"
    )


def _fingerprints(storage: Storage, files: list[str]) -> list[dict]:
    return [storage.fingerprint(f) for f in files]


def run_prepare(spark: SparkSession, config: Config, timer: Timer | None = None) -> PrepareResult:
    """Read, validate, encode and split the data set; publish ``<output>/prepared``.

    Raises :class:`PrepareError` (nothing published) when an input is missing or
    empty, or when no row of a table fits the config.
    """
    timer = timer or Timer()
    options = config.prepare
    storage = Storage(spark)
    persisted: list[DataFrame] = []

    def keep(df: DataFrame) -> DataFrame:
        persisted.append(df.persist(StorageLevel.MEMORY_AND_DISK))
        return df

    try:
        with timer.phase("prepare"):
            with timer.phase("read and check entities"):
                raw = read_dataset(spark, storage, config.dataset, options)
                tables: dict[str, dict] = {}
                for entity in (raw.queries, raw.items):
                    keep(entity.frame)
                    tables[entity.table] = table_counts(entity.frame)
                    check_table(entity.table, entity.frame, entity.files, tables[entity.table])
                    logger.info("%s: %s", entity.table, tables[entity.table])
                # Accepted rows without their raw text: only the rejects need it.
                slim = ["raw", "source", "row", "reason"]
                queries_ok = keep(raw.queries.frame.where(F.col("reason").isNull()).drop(*slim))
                items_ok = keep(raw.items.frame.where(F.col("reason").isNull()).drop(*slim))
                query_map = keep(
                    dense_index(spark, queries_ok.select("key"), [F.col("key")], "query_idx", keep)
                )
                item_map = keep(
                    dense_index(spark, items_ok.select("key"), [F.col("key")], "item_idx", keep)
                )

            with timer.phase("check and split labels"):
                labels, train, test, split = _labels_and_split(
                    raw, query_map, item_map, options, tables, keep
                )

            with timer.phase("encode features"):
                q = encode_entities(
                    spark,
                    raw.queries,
                    queries_ok,
                    query_map,
                    "query",
                    item_map,
                    train,
                    options,
                    keep,
                )
                i = encode_entities(
                    spark, raw.items, items_ok, item_map, "item", item_map, train, options, keep
                )

            with timer.phase("write"), Staging(storage, config.output, "prepared") as stage:
                manifest = _write(
                    spark,
                    storage,
                    stage.path,
                    config,
                    raw,
                    q,
                    i,
                    train,
                    test,
                    labels,
                    tables,
                    split,
                )
                stage.publish()
        return PrepareResult(join(config.output, "prepared"), manifest)
    finally:
        for df in persisted:
            df.unpersist()


def _labels_and_split(raw: RawDataset, query_map, item_map, options, tables, keep):
    labels = keep(validate_labels(raw.labels, query_map, item_map))
    tables["labels"] = table_counts(labels)
    check_table("labels", labels, raw.labels.files, tables["labels"])
    ok = labels.where(F.col("reason").isNull())
    frames = {"labels": labels}
    if raw.test_labels is not None:
        train = keep(ok)
        test_frame = keep(validate_labels(raw.test_labels, query_map, item_map, train=train))
        tables["test_labels"] = table_counts(test_frame)
        check_table("test_labels", test_frame, raw.test_labels.files, tables["test_labels"])
        test = test_frame.where(F.col("reason").isNull())
        frames["test_labels"] = test_frame
        split = {"method": "given", "test_labels": raw.test_labels.files}
    else:
        marked = keep(random_split(ok, options.split.test_fraction, options.split.seed))
        train = keep(marked.where("is_train"))
        test = marked.where(~F.col("is_train"))
        split = {
            "method": "random_per_query",
            "test_fraction": options.split.test_fraction,
            "seed": options.split.seed,
            "order": "xxhash64(seed, query_id, item_id)",
        }
    return frames, train, test, split


def _write(spark, storage, path, config, raw, q, i, train, test, labels, tables, split) -> dict:
    n = config.prepare.num_partitions
    outputs = {}

    def write(name: str, df: DataFrame, partitions: int) -> None:
        df.repartition(partitions).write.parquet(join(path, name))
        written = spark.read.parquet(join(path, name))
        outputs[name] = {"rows": written.count(), "partitions": partitions}

    write("queries", q.frame, n)
    write("items", i.frame, n)
    write("train_pairs", train.select(*pair_columns()), n)
    write("test_pairs", test.select(*pair_columns()), n)

    rejects = _rejects(raw.queries.frame, "queries").unionByName(_rejects(raw.items.frame, "items"))
    for name, frame in labels.items():
        rejects = rejects.unionByName(_rejects(frame, name))
    num_rejected = sum(t["rejected"] for t in tables.values())
    write("rejects", rejects, max(1, min(n, math.ceil(num_rejected / 1_000_000))))

    vocab = q.vocab
    if i.vocab is not None:
        vocab = i.vocab if vocab is None else vocab.unionByName(i.vocab)
    if vocab is not None:
        write("vocab", vocab, 1)

    _check_counts(tables, outputs, split)
    files = raw.queries.files + raw.items.files + raw.labels.files
    if raw.test_labels is not None:
        files += raw.test_labels.files
    manifest = {
        "version": MANIFEST_VERSION,
        "adjoint_spark": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dataset": {"name": config.dataset.name, "format": config.dataset.format},
        "tables": tables,
        "num_queries": outputs["queries"]["rows"],
        "num_items": outputs["items"]["rows"],
        "item_vocab_size": outputs["items"]["rows"] + 1,
        "padding_id": 0,
        "features": {"queries": q.spec, "items": i.spec},
        "split": {
            **split,
            "num_train": outputs["train_pairs"]["rows"],
            "num_test": outputs["test_pairs"]["rows"],
        },
        "outputs": outputs,
        "inputs": _fingerprints(storage, files),
        "config": config.to_dict(),
    }
    storage.write_json(join(path, "manifest.json"), manifest)
    return manifest


def _check_counts(tables: dict, outputs: dict, split: dict) -> None:
    """Every input row is in an output or in the rejects: fail loudly if not."""
    for name, t in tables.items():
        assert t["read"] == t["accepted"] + t["rejected"], f"{name}: counts do not add up: {t}"
    assert outputs["rejects"]["rows"] == sum(t["rejected"] for t in tables.values()), (
        f"rejects written ({outputs['rejects']['rows']}) differ from rejects counted ({tables})"
    )
    assert outputs["queries"]["rows"] == tables["queries"]["accepted"], "queries lost"
    assert outputs["items"]["rows"] == tables["items"]["accepted"], "items lost"
    pairs = outputs["train_pairs"]["rows"] + outputs["test_pairs"]["rows"]
    accepted = tables["labels"]["accepted"] + tables.get("test_labels", {}).get("accepted", 0)
    assert pairs == accepted, f"{pairs} pairs written for {accepted} accepted labels ({split})"
