"""Readers: turn raw input tables into validated, row-numbered Spark frames.

Every reader produces the same shape, so validation and encoding are written once:

- an entity frame (queries or items): ``source``, ``row`` (1-based within its file),
  ``raw`` (the input text, or the row as JSON for Parquet), ``reason`` (null when the row
  is valid, else why it is rejected), ``key`` (the entity id, long), ``n_<i>`` (double)
  per numeric feature, ``c_<j>`` (string) per categorical feature and ``s_<k>``
  (array<long> of item keys) per sequence feature;
- a label frame: ``source``, ``row``, ``raw``, ``reason``, ``query_key``, ``item_key``
  and ``ts`` (long, null when the input has no time).

The checks of a row are a list of (condition, message) pairs; the first that holds is
the row's reason. Nothing is dropped: a row is either valid or carries a reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from adjoint_spark.config import DatasetConfig, EntitySource, LabelSource, PrepareConfig
from adjoint_spark.storage import Storage

logger = logging.getLogger(__name__)

# Univocity's default limit on the fields of one CSV record (more stop the whole job).
CSV_MAX_COLUMNS = 20480
# Columns read_table adds for CSV: the text of a record whose field count is not the
# header's (Spark pads or cuts such a record silently) and the reason it gives.
CSV_MALFORMED = "_adjoint_malformed_record"
TABLE_STRUCTURE = "_adjoint_structure"
DELIMITERS = {"auto": "[\\t\\x1b]", "tab": "\\t", "esc": "\\x1b", "comma": ","}
MOVIELENS_GENRES = (
    "unknown",
    "action",
    "adventure",
    "animation",
    "children",
    "comedy",
    "crime",
    "documentary",
    "drama",
    "fantasy",
    "film_noir",
    "horror",
    "musical",
    "mystery",
    "romance",
    "sci_fi",
    "thriller",
    "war",
    "western",
)


class PrepareError(RuntimeError):
    """A problem that stops the prepare job: nothing is published."""


@dataclass(frozen=True)
class SequenceField:
    name: str
    max_len: int


@dataclass
class EntityFrame:
    """A parsed query or item table and the names of its features."""

    table: str
    frame: DataFrame
    numeric: list[str]
    categorical: list[str]
    sequences: list[SequenceField]
    files: list[str] = field(default_factory=list)
    structure_reasons: tuple[str, ...] = ()


@dataclass
class LabelFrame:
    table: str
    frame: DataFrame
    files: list[str] = field(default_factory=list)


@dataclass
class RawDataset:
    queries: EntityFrame
    items: EntityFrame
    labels: LabelFrame
    test_labels: LabelFrame | None


# ---------------------------------------------------------------------------- lines


def list_input(storage: Storage, table: str, path: str) -> list[str]:
    files = storage.list_files(path)
    if not files:
        raise PrepareError(f"{table}: input {path} does not exist or holds no data files")
    return files


def number_rows(spark: SparkSession, df: DataFrame) -> DataFrame:
    """Add ``row``, the 1-based position of each row within its file.

    ``df`` must carry ``source`` (file), ``_block`` (split start) and ``_mono``
    (monotonically increasing id, contiguous within one split). One small aggregation
    gives each split's row count; cumulative counts per file give the offsets.
    """
    blocks = (
        df.groupBy("source", "_block")
        .agg(F.count(F.lit(1)).alias("_n"), F.min("_mono").alias("_first"))
        .collect()
    )
    offsets = []
    running: dict[str, int] = {}
    for b in sorted(blocks, key=lambda r: (r["source"], r["_block"])):
        start = running.get(b["source"], 0)
        offsets.append((b["source"], int(b["_block"]), int(b["_first"]), start))
        running[b["source"]] = start + int(b["_n"])
    schema = "source string, _block long, _first long, _offset long"
    offsets_df = spark.createDataFrame(offsets, schema)
    row = F.col("_mono") - F.col("_first") + F.col("_offset") + 1
    return (
        df.join(F.broadcast(offsets_df), ["source", "_block"])
        .withColumn("row", row)
        .drop("_block", "_mono", "_first", "_offset")
    )


def read_lines(spark: SparkSession, files: list[str]) -> DataFrame:
    """Text files as (source, row, raw); invalid UTF-8 bytes become U+FFFD."""
    df = spark.read.text(files).select(
        F.regexp_replace("value", "\r$", "").alias("raw"),
        F.col("_metadata.file_path").alias("source"),
        F.col("_metadata.file_block_start").alias("_block"),
        F.monotonically_increasing_id().alias("_mono"),
    )
    return number_rows(spark, df)


def column(name: str) -> Column:
    """The column of this exact name (it may hold dots, spaces or backticks)."""
    return F.col("`" + name.replace("`", "``") + "`")


def read_csv(spark: SparkSession, files: list[str]) -> DataFrame:
    """CSV with a header, every value a string, plus ``CSV_MALFORMED``.

    Univocity fails the job on a record wider than its ``maxColumns``, so the limit is
    raised to the widest line (counting every comma) found by one pass over the text.
    """
    widest = spark.read.text(files).agg(F.max(F.size(F.split("value", ",", -1)))).first()[0]
    reader = (
        spark.read.option("header", "true")
        .option("mode", "PERMISSIVE")
        .option("maxColumns", max(CSV_MAX_COLUMNS, (widest or 0) + 1))
    )
    header = reader.csv(files).schema
    schema = StructType([*header.fields, StructField(CSV_MALFORMED, StringType())])
    return reader.schema(schema).option("columnNameOfCorruptRecord", CSV_MALFORMED).csv(files)


def read_table(spark: SparkSession, files: list[str], file_format: str) -> DataFrame:
    """Parquet or CSV (with a header) as its columns plus source, row, raw (JSON, or the
    text of a CSV record that does not fit the header) and ``TABLE_STRUCTURE`` (null,
    or why the record is rejected whatever its values)."""
    if file_format == "parquet":
        df = spark.read.parquet(*files)
    else:
        df = read_csv(spark, files)
    columns = [c for c in df.columns if c != CSV_MALFORMED]
    raw = F.to_json(F.struct(*[column(c) for c in columns]))
    structure = F.lit(None).cast("string")
    if CSV_MALFORMED in df.columns:
        raw = F.coalesce(F.col(CSV_MALFORMED), raw)
        structure = F.when(
            F.col(CSV_MALFORMED).isNotNull(),
            F.lit(f"expected {len(columns)} fields as in the header, found another number"),
        )
    df = df.select(
        *[column(c) for c in columns],
        raw.alias("raw"),
        structure.alias(TABLE_STRUCTURE),
        F.col("_metadata.file_path").alias("source"),
        F.col("_metadata.file_block_start").alias("_block"),
        F.monotonically_increasing_id().alias("_mono"),
    )
    return number_rows(spark, df)


def table_structure_check() -> tuple[Column, Column]:
    return (F.col(TABLE_STRUCTURE).isNotNull(), F.col(TABLE_STRUCTURE))


# ---------------------------------------------------------------------------- checks


def first_reason(checks: list[tuple[Column, Column | str]]) -> Column:
    """The message of the first check whose condition holds, else null."""
    if not checks:
        return F.lit(None).cast("string")
    return F.coalesce(
        *[F.when(cond, msg if isinstance(msg, Column) else F.lit(msg)) for cond, msg in checks]
    )


def _quoted(value: Column, width: int = 40) -> Column:
    return F.concat(F.lit("'"), F.substring(F.coalesce(value, F.lit("")), 1, width), F.lit("'"))


def _blank(value: Column) -> Column:
    return value.isNull() | (F.trim(value) == "")


def key_checks(raw: Column, what: str) -> list[tuple[Column, Column]]:
    parsed = F.trim(raw).try_cast("long")
    return [
        (_blank(raw), F.lit(f"{what} is empty")),
        (parsed.isNull(), F.concat(F.lit(f"{what} "), _quoted(raw), F.lit(" is not an integer"))),
        (parsed < 0, F.concat(F.lit(f"{what} "), _quoted(raw), F.lit(" is negative"))),
    ]


def numeric_checks(name: str, raw: Column, allow_missing: bool) -> list[tuple[Column, Column]]:
    parsed = F.trim(raw).try_cast("double")
    label = f"numeric column {name}"
    checks = []
    if not allow_missing:
        checks.append((_blank(raw), F.lit(f"{label} is empty")))
    checks += [
        (
            ~_blank(raw) & parsed.isNull(),
            F.concat(F.lit(f"{label}: "), _quoted(raw), F.lit(" is not a number")),
        ),
        (
            F.isnan(parsed) | (F.abs(parsed) == float("inf")),
            F.concat(F.lit(f"{label}: "), _quoted(raw), F.lit(" is NaN or infinite")),
        ),
    ]
    return checks


def categorical_checks(name: str, raw: Column, lo: int, hi: int) -> list[tuple[Column, Column]]:
    """Checks of a globally offset integer categorical column whose range is [lo, hi)."""
    parsed = F.trim(raw).try_cast("long")
    label = f"categorical column {name}"
    return [
        (parsed.isNull(), F.concat(F.lit(f"{label}: "), _quoted(raw), F.lit(" is not an integer"))),
        (
            (parsed < lo) | (parsed >= hi),
            F.concat(
                F.lit(f"{label}: "),
                parsed.cast("string"),
                F.lit(f" is outside its range [{lo}, {hi})"),
            ),
        ),
    ]


def parse_sequence(raw: Column) -> Column:
    """A comma-separated list of item keys as array<long>; bad elements become null."""
    return F.transform(F.split(F.trim(raw), ","), lambda x: F.trim(x).try_cast("long"))


def sequence_checks(name: str, raw: Column, allow_empty: bool) -> list[tuple[Column, Column]]:
    label = f"sequence column {name}"
    checks = []
    if not allow_empty:
        checks.append((_blank(raw), F.lit(f"{label} is empty")))
    bad = F.exists(parse_sequence(raw), lambda x: x.isNull() | (x < 0))
    checks.append(
        (
            ~_blank(raw) & bad,
            F.concat(
                F.lit(f"{label}: "), _quoted(raw), F.lit(" holds a non-integer or negative item")
            ),
        )
    )
    return checks


def mark_duplicates(df: DataFrame, keys: list[str], what: str) -> DataFrame:
    """Reject every valid row whose ``keys`` repeat an earlier valid row (file, row order)."""
    w = Window.partitionBy(F.col("reason").isNull(), *keys).orderBy("source", "row")
    first = F.first("row").over(w)
    key_text = F.concat_ws(", ", *[F.col(k).cast("string") for k in keys])
    reason = F.when(
        F.col("reason").isNull() & (F.row_number().over(w) > 1),
        F.concat(
            F.lit(f"duplicate {what} "),
            key_text,
            F.lit(" (first at row "),
            first.cast("string"),
            F.lit(")"),
        ),
    ).otherwise(F.col("reason"))
    return df.withColumn("reason", reason)


# ---------------------------------------------------------------------------- entities


@dataclass
class EntityLayout:
    """Where each field of an entity row is, as string-valued Spark columns."""

    key: Column
    numeric: list[tuple[str, Column]]
    categorical: list[tuple[str, Column, tuple[int, int] | None]]
    sequences: list[tuple[SequenceField, Column]]
    structure: list[tuple[Column, Column | str]] = field(default_factory=list)


def parse_entities(
    table: str, df: DataFrame, layout: EntityLayout, options: PrepareConfig, files: list[str]
) -> EntityFrame:
    """Apply the layout's checks and parse its fields into the entity frame's shape."""
    allow_missing = options.numeric_missing == "impute"
    checks = list(layout.structure) + key_checks(layout.key, "index")
    for name, raw in layout.numeric:
        checks += numeric_checks(name, raw, allow_missing)
    for name, raw, bounds in layout.categorical:
        if bounds is not None:
            checks += categorical_checks(name, raw, *bounds)
    for seq, raw in layout.sequences:
        checks += sequence_checks(seq.name, raw, options.empty_sequence == "allow")

    columns = [
        "source",
        "row",
        "raw",
        first_reason(checks).alias("reason"),
        F.trim(layout.key).try_cast("long").alias("key"),
    ]
    for i, (_, raw) in enumerate(layout.numeric):
        columns.append(F.trim(raw).try_cast("double").alias(f"n_{i}"))
    for j, (_, raw, bounds) in enumerate(layout.categorical):
        value = F.trim(raw)
        if bounds is not None:
            value = value.try_cast("long").cast("string")
        columns.append(value.alias(f"c_{j}"))
    for k, (_, raw) in enumerate(layout.sequences):
        seq = F.when(_blank(raw), F.array().cast("array<long>")).otherwise(parse_sequence(raw))
        columns.append(seq.alias(f"s_{k}"))
    parsed = mark_duplicates(df.select(*columns), ["key"], "index")
    structure = tuple(str(m) for _, m in layout.structure if isinstance(m, str))
    return EntityFrame(
        table=table,
        frame=parsed,
        numeric=[n for n, _ in layout.numeric],
        categorical=[n for n, _, _ in layout.categorical],
        sequences=[s for s, _ in layout.sequences],
        files=files,
        structure_reasons=structure,
    )


def field_count_check(fields: Column, expected: int) -> tuple[Column, Column]:
    return (
        F.size(fields) != expected,
        F.concat(F.lit(f"expected {expected} fields, found "), F.size(fields).cast("string")),
    )


def blank_line_check(raw: Column) -> tuple[Column, Column]:
    return (F.trim(raw) == "", F.lit("blank line"))


def _field(fields: Column, i: int) -> Column:
    return F.try_element_at(fields, F.lit(i + 1))


def seed_entity_layout(source: EntitySource, fields: Column, raw: Column) -> EntityLayout:
    """The seed text format: index, floats, offset integers, comma-separated lists."""
    num_numeric = source.num_numeric or len(source.numeric)
    num_cat = len(source.categorical_sizes)
    expected = 1 + num_numeric + num_cat + len(source.sequences)
    pos = 1
    numeric = []
    for name in source.numeric_names():
        numeric.append((name, _field(fields, pos)))
        pos += 1
    categorical = []
    lo = source.categorical_base
    for name, size in zip(source.categorical_names(), source.categorical_sizes, strict=True):
        categorical.append((name, _field(fields, pos), (lo, lo + size)))
        lo += size
        pos += 1
    sequences = []
    for seq in source.sequences:
        sequences.append((SequenceField(seq.name, seq.max_len), _field(fields, pos)))
        pos += 1
    structure = [blank_line_check(raw), field_count_check(fields, expected)]
    return EntityLayout(_field(fields, 0), numeric, categorical, sequences, structure)


def table_entity_layout(source: EntitySource, df: DataFrame, table: str) -> EntityLayout:
    """Named columns of a Parquet or CSV table; array columns become comma lists."""
    wanted = [source.key, *source.numeric, *source.categorical]
    wanted += [s.column for s in source.sequences]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise PrepareError(
            f"{table}: {source.path} has no column(s) {missing}; it has {df.columns}"
        )
    types = dict(df.dtypes)

    def text(name: str) -> Column:
        col = column(name)
        if types[name].startswith("array"):
            return F.array_join(col.cast("array<string>"), ",")
        return col.cast("string")

    return EntityLayout(
        key=text(source.key),
        numeric=[(n, text(n)) for n in source.numeric],
        categorical=[(n, text(n), None) for n in source.categorical],
        sequences=[(SequenceField(s.name, s.max_len), text(s.column)) for s in source.sequences],
        structure=[table_structure_check()],
    )


def read_entities(
    spark: SparkSession,
    storage: Storage,
    table: str,
    source: EntitySource,
    dataset: DatasetConfig,
    options: PrepareConfig,
) -> EntityFrame:
    files = list_input(storage, table, source.path)
    if source.file_format == "text":
        lines = read_lines(spark, files)
        fields = F.split(F.col("raw"), DELIMITERS[dataset.delimiter], -1)
        layout = seed_entity_layout(source, fields, F.col("raw"))
        return parse_entities(table, lines, layout, options, files)
    df = read_table(spark, files, source.file_format)
    layout = table_entity_layout(source, df, table)
    return parse_entities(table, df, layout, options, files)


# ---------------------------------------------------------------------------- labels


def parse_labels(
    table: str,
    df: DataFrame,
    query: Column,
    item: Column,
    ts: Column | None,
    structure: list,
    files: list[str],
) -> LabelFrame:
    checks = list(structure) + key_checks(query, "query index") + key_checks(item, "item index")
    if ts is not None:
        checks.append(
            (
                ~_blank(ts) & F.trim(ts).try_cast("long").isNull(),
                F.concat(F.lit("timestamp "), _quoted(ts), F.lit(" is not an integer")),
            )
        )
    ts_value = F.trim(ts).try_cast("long") if ts is not None else F.lit(None).cast("long")
    parsed = df.select(
        "source",
        "row",
        "raw",
        first_reason(checks).alias("reason"),
        F.trim(query).try_cast("long").alias("query_key"),
        F.trim(item).try_cast("long").alias("item_key"),
        ts_value.alias("ts"),
    )
    return LabelFrame(table, parsed, files)


def read_labels(
    spark: SparkSession, storage: Storage, table: str, source: LabelSource, dataset: DatasetConfig
) -> LabelFrame:
    files = list_input(storage, table, source.path)
    if source.file_format == "text":
        lines = read_lines(spark, files)
        fields = F.split(F.col("raw"), DELIMITERS[dataset.delimiter], -1)
        expected = 3 if source.timestamp else 2
        structure = [blank_line_check(F.col("raw")), field_count_check(fields, expected)]
        ts = _field(fields, 2) if source.timestamp else None
        return parse_labels(
            table, lines, _field(fields, 0), _field(fields, 1), ts, structure, files
        )
    df = read_table(spark, files, source.file_format)
    wanted = [source.query_key, source.item_key] + ([source.timestamp] if source.timestamp else [])
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise PrepareError(
            f"{table}: {source.path} has no column(s) {missing}; it has {df.columns}"
        )
    ts = column(source.timestamp).cast("string") if source.timestamp else None
    return parse_labels(
        table,
        df,
        column(source.query_key).cast("string"),
        column(source.item_key).cast("string"),
        ts,
        [table_structure_check()],
        files,
    )


# ---------------------------------------------------------------------------- MovieLens


def read_movielens(
    spark: SparkSession, storage: Storage, dataset: DatasetConfig, options: PrepareConfig
) -> RawDataset:
    """MovieLens-100K's raw files: u.user (queries), u.item (items), u.data (labels).

    Users: age (numeric); gender, occupation and the first ``zip_prefix_len``
    characters of the zip code (categorical). Movies: release year (numeric, may be
    missing) and the 19 genre flags (numeric 0/1). Ratings: every rating is a positive
    pair, with its time.
    """
    base = dataset.path.rstrip("/")
    user_files = list_input(storage, "queries", f"{base}/u.user")
    users = read_lines(spark, user_files)
    f = F.split(F.col("raw"), "\\|", -1)
    user_layout = EntityLayout(
        key=_field(f, 0),
        numeric=[("age", _field(f, 1))],
        categorical=[
            ("gender", _field(f, 2), None),
            ("occupation", _field(f, 3), None),
            (
                "zip_prefix",
                F.substring(F.upper(F.trim(_field(f, 4))), 1, dataset.zip_prefix_len),
                None,
            ),
        ],
        sequences=[],
        structure=[blank_line_check(F.col("raw")), field_count_check(f, 5)],
    )
    queries = parse_entities("queries", users, user_layout, options, user_files)

    item_files = list_input(storage, "items", f"{base}/u.item")
    movies = read_lines(spark, item_files)
    date = F.trim(_field(f, 2))
    year = F.when(F.length(date) >= 4, F.substring(date, -4, 4)).otherwise(F.lit(""))
    item_layout = EntityLayout(
        key=_field(f, 0),
        numeric=[("year", year)]
        + [(f"genre_{g}", _field(f, 5 + i)) for i, g in enumerate(MOVIELENS_GENRES)],
        categorical=[],
        sequences=[],
        structure=[blank_line_check(F.col("raw")), field_count_check(f, 24)],
    )
    items = parse_entities("items", movies, item_layout, options, item_files)

    label_files = list_input(storage, "labels", f"{base}/u.data")
    ratings = read_lines(spark, label_files)
    g = F.split(F.col("raw"), "\\t", -1)
    structure = [blank_line_check(F.col("raw")), field_count_check(g, 4)]
    labels = parse_labels(
        "labels", ratings, _field(g, 0), _field(g, 1), _field(g, 3), structure, label_files
    )
    return RawDataset(queries, items, labels, None)


def read_dataset(
    spark: SparkSession, storage: Storage, dataset: DatasetConfig, options: PrepareConfig
) -> RawDataset:
    """Read and check every input table of the data set (lazily; nothing runs yet)."""
    if dataset.format == "movielens":
        return read_movielens(spark, storage, dataset, options)
    queries = read_entities(spark, storage, "queries", dataset.queries, dataset, options)
    items = read_entities(spark, storage, "items", dataset.items, dataset, options)
    labels = read_labels(spark, storage, "labels", dataset.labels, dataset)
    test_labels = None
    if dataset.test_labels is not None:
        test_labels = read_labels(spark, storage, "test_labels", dataset.test_labels, dataset)
    return RawDataset(queries, items, labels, test_labels)
