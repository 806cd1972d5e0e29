"""Typed, validated configuration loaded from YAML, with command-line overrides.

A config file has one section per stage. Every section is a frozen dataclass; a key the
dataclass does not know, a value of the wrong type or a value out of range raises
``ValueError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

DATASET_FORMATS = ("seed", "movielens", "table")
FILE_FORMATS = ("text", "csv", "parquet")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config key '{key}': {value!r} is not allowed; expected {allowed}")


@dataclass(frozen=True)
class SequenceSpec:
    """A sequence feature: a list of item keys per row, cut to the last ``max_len``."""

    name: str
    column: str | None = None
    max_len: int = 20

    def validate(self, key: str) -> None:
        if not self.name.isidentifier():
            _fail(f"{key}.name", self.name, "an identifier (letters, digits, _)")
        if self.max_len < 1:
            _fail(f"{key}.max_len", self.max_len, "an integer >= 1")


@dataclass(frozen=True)
class EntitySource:
    """Where a query or item table comes from and which of its columns are features.

    For the seed text format the columns are positional: the index, ``num_numeric``
    floats, one integer per entry of ``categorical_sizes`` (globally offset ranges,
    starting at ``categorical_base``), then one comma-separated list per sequence.
    For Parquet or CSV tables the columns are named by ``key``, ``numeric``,
    ``categorical`` and each sequence's ``column``.
    """

    path: str
    file_format: str = "text"
    key: str | None = None
    numeric: tuple[str, ...] = ()
    num_numeric: int = 0
    categorical: tuple[str, ...] = ()
    categorical_sizes: tuple[int, ...] = ()
    categorical_base: int = 0
    sequences: tuple[SequenceSpec, ...] = ()

    def validate(self, key: str, dataset_format: str) -> None:
        if self.file_format not in FILE_FORMATS:
            _fail(f"{key}.file_format", self.file_format, f"one of {FILE_FORMATS}")
        if self.num_numeric < 0:
            _fail(f"{key}.num_numeric", self.num_numeric, "an integer >= 0")
        for i, size in enumerate(self.categorical_sizes):
            if size < 1:
                _fail(f"{key}.categorical_sizes[{i}]", size, "an integer >= 1")
        if self.categorical_base < 0:
            _fail(f"{key}.categorical_base", self.categorical_base, "an integer >= 0")
        for i, seq in enumerate(self.sequences):
            seq.validate(f"{key}.sequences[{i}]")
        names = [s.name for s in self.sequences]
        if len(set(names)) != len(names):
            _fail(f"{key}.sequences", names, "distinct sequence names")
        if dataset_format == "seed" and self.file_format != "text":
            _fail(f"{key}.file_format", self.file_format, "'text' for the seed format")
        if dataset_format == "table":
            if self.file_format not in ("csv", "parquet"):
                _fail(f"{key}.file_format", self.file_format, "'csv' or 'parquet' for tables")
            if not self.key:
                _fail(f"{key}.key", self.key, "the name of the id column")
            for i, seq in enumerate(self.sequences):
                if not seq.column:
                    _fail(f"{key}.sequences[{i}].column", seq.column, "a column name")

    def numeric_names(self) -> tuple[str, ...]:
        """Feature names of the numeric columns (``num_0``, ... in the seed format)."""
        if self.numeric:
            return self.numeric
        return tuple(f"num_{i}" for i in range(self.num_numeric))

    def categorical_names(self) -> tuple[str, ...]:
        if self.categorical:
            return self.categorical
        return tuple(f"cat_{i}" for i in range(len(self.categorical_sizes)))


@dataclass(frozen=True)
class LabelSource:
    """Positive (query, item) pairs; the seed format has two integer columns."""

    path: str
    file_format: str = "text"
    query_key: str = "query_id"
    item_key: str = "item_id"
    timestamp: str | None = None

    def validate(self, key: str, dataset_format: str) -> None:
        if self.file_format not in FILE_FORMATS:
            _fail(f"{key}.file_format", self.file_format, f"one of {FILE_FORMATS}")
        if dataset_format == "table" and self.file_format == "text":
            _fail(f"{key}.file_format", self.file_format, "'csv' or 'parquet' for tables")


@dataclass(frozen=True)
class DatasetConfig:
    """The input data set.

    ``format``: ``seed`` (the original system's text files), ``movielens`` (the raw
    MovieLens-100K folder in ``path``) or ``table`` (Parquet or CSV tables).
    """

    name: str
    format: str
    path: str | None = None
    queries: EntitySource | None = None
    items: EntitySource | None = None
    labels: LabelSource | None = None
    test_labels: LabelSource | None = None
    delimiter: Literal["auto", "tab", "esc", "comma"] = "auto"
    zip_prefix_len: int = 3

    def validate(self) -> None:
        if self.format not in DATASET_FORMATS:
            _fail("dataset.format", self.format, f"one of {DATASET_FORMATS}")
        if self.format == "movielens":
            if not self.path:
                _fail("dataset.path", self.path, "the MovieLens-100K folder")
            if self.zip_prefix_len < 1:
                _fail("dataset.zip_prefix_len", self.zip_prefix_len, "an integer >= 1")
            return
        for section in ("queries", "items", "labels"):
            if getattr(self, section) is None:
                _fail(f"dataset.{section}", None, f"a {section} table for format {self.format}")
        self.queries.validate("dataset.queries", self.format)
        self.items.validate("dataset.items", self.format)
        self.labels.validate("dataset.labels", self.format)
        if self.test_labels is not None:
            self.test_labels.validate("dataset.test_labels", self.format)


@dataclass(frozen=True)
class SplitConfig:
    """Per-query seeded random split, used when no test labels are given."""

    test_fraction: float = 0.25
    seed: int = 42

    def validate(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            _fail("prepare.split.test_fraction", self.test_fraction, "a number in (0, 1)")


@dataclass(frozen=True)
class HistoryConfig:
    """A query sequence feature built from the query's train pairs (most recent last)."""

    enabled: bool = False
    name: str = "history"
    max_len: int = 50

    def validate(self) -> None:
        if self.max_len < 1:
            _fail("prepare.history.max_len", self.max_len, "an integer >= 1")
        if not self.name.isidentifier():
            _fail("prepare.history.name", self.name, "an identifier")


@dataclass(frozen=True)
class PrepareConfig:
    num_partitions: int = 4
    numeric_scaling: Literal["standard", "minmax", "none"] = "standard"
    numeric_missing: Literal["reject", "impute"] = "reject"
    categorical_min_count: int = 1
    empty_sequence: Literal["reject", "allow"] = "reject"
    label_counts: bool = False
    label_times: bool = False
    split: SplitConfig = field(default_factory=SplitConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)

    def validate(self) -> None:
        if self.num_partitions < 1:
            _fail("prepare.num_partitions", self.num_partitions, "an integer >= 1")
        if self.categorical_min_count < 1:
            _fail("prepare.categorical_min_count", self.categorical_min_count, "an integer >= 1")
        self.split.validate()
        self.history.validate()


@dataclass(frozen=True)
class TowerConfig:
    """Widths of one tower; ``feature_dim`` and ``embedding_dim`` are shared (see train)."""

    hidden_dim: int = 64
    mlp_layers: int = 1
    use_id: bool = False

    def validate(self, key: str) -> None:
        if self.hidden_dim < 1:
            _fail(f"{key}.hidden_dim", self.hidden_dim, "an integer >= 1")
        if self.mlp_layers < 1:
            _fail(f"{key}.mlp_layers", self.mlp_layers, "an integer >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Model, loss, negatives, optimiser and feed. Defaults follow the original system."""

    embedding_dim: int = 32
    feature_dim: int = 32
    query: TowerConfig = field(default_factory=lambda: TowerConfig(hidden_dim=128))
    item: TowerConfig = field(default_factory=lambda: TowerConfig(hidden_dim=64, use_id=True))
    dropout: float = 0.1
    pooling: Literal["mean", "max", "attention"] = "mean"
    final_activation: Literal["tanh", "none"] = "tanh"
    loss: Literal["hinge", "logistic", "sampled_softmax", "in_batch_softmax"] = "hinge"
    margin: float = 0.05
    temperature: float = 0.05
    learn_temperature: bool = False
    num_negatives: int = 31
    num_popular_negatives: int = 16
    history_sample: int = 0  # 0: the whole history; else a random sample per example
    combine: Literal["seed", "mlp"] = "seed"
    sequence_projection: bool = True
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.5
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    clip_grad_norm: float = 0.5
    weight_decay: float = 0.0
    batch_size: int = 512
    epochs: int = 20
    eval_every: int = 1
    patience: int = 3
    select_metric: str = "ndcg@10"
    eval_ks: tuple[int, ...] = (10, 40)
    eval_queries: int = 0  # 0: every test query; else a seeded sample of this many
    feed: Literal["memory", "stream"] = "memory"
    reader_workers: int = 2
    threads: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_processes: int = 1  # > 1: data-parallel over processes (TorchDistributor)
    seed: int = 42
    log_every: int = 50

    def validate(self) -> None:
        positive_ints = (
            "embedding_dim",
            "feature_dim",
            "batch_size",
            "epochs",
            "eval_every",
            "reader_workers",
            "lr_step_epochs",
            "log_every",
            "num_processes",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                _fail(f"train.{name}", getattr(self, name), "an integer >= 1")
        self.query.validate("train.query")
        self.item.validate("train.item")
        if not 0.0 <= self.dropout < 1.0:
            _fail("train.dropout", self.dropout, "a number in [0, 1)")
        for name in ("lr", "temperature"):
            if getattr(self, name) <= 0:
                _fail(f"train.{name}", getattr(self, name), "a number > 0")
        for name in ("margin", "clip_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                _fail(f"train.{name}", getattr(self, name), "a number >= 0 (0 turns it off)")
        if self.num_negatives < 0 or (self.num_negatives == 0 and self.loss != "in_batch_softmax"):
            _fail(
                "train.num_negatives",
                self.num_negatives,
                "an integer >= 1 (0 only with loss in_batch_softmax)",
            )
        if not 0 <= self.num_popular_negatives <= self.num_negatives:
            _fail(
                "train.num_popular_negatives",
                self.num_popular_negatives,
                f"an integer in [0, num_negatives={self.num_negatives}]",
            )
        if self.num_processes > 1 and self.feed != "memory":
            _fail(
                "train.num_processes",
                self.num_processes,
                "1 with feed 'stream' (the processes each read their shard into memory)",
            )
        if not 0 < self.lr_gamma <= 1:
            _fail("train.lr_gamma", self.lr_gamma, "a number in (0, 1]")
        if self.history_sample < 0:
            _fail("train.history_sample", self.history_sample, "an integer >= 0")
        if self.patience < 0 or self.threads < 0 or self.eval_queries < 0:
            _fail(
                "train.patience/threads/eval_queries",
                (self.patience, self.threads, self.eval_queries),
                "integers >= 0",
            )
        if not self.eval_ks or min(self.eval_ks) < 1:
            _fail("train.eval_ks", self.eval_ks, "a non-empty list of integers >= 1")
        metric, _, k = self.select_metric.partition("@")
        if metric not in ("precision", "recall", "ndcg", "map", "micro_recall") or (
            not k.isdigit() or int(k) not in self.eval_ks
        ):
            _fail(
                "train.select_metric",
                self.select_metric,
                f"one of precision|recall|ndcg|map|micro_recall @ one of {self.eval_ks}",
            )


@dataclass(frozen=True)
class IndexConfig:
    """The faiss index built from the item vectors by the index stage.

    ``factory`` is a faiss factory string whose index is IVF (so shards built on
    partitions can be merged); its nlist is lowered by rule when the catalogue has
    fewer than ``min_train_per_list`` items per list. The whole index is trained once
    on a random sample of at most ``max_train_per_list`` vectors per list.
    """

    factory: str = "IVF4096,SQ8"
    min_train_per_list: int = 39
    max_train_per_list: int = 256
    merge: Literal["auto", "memory", "ondisk"] = "auto"
    merge_memory_mb: int = 2048  # auto: merge on disk when the index is larger
    target_recall: float = 0.95
    sweep_queries: int = 1000
    sweep_k: int = 40
    num_partitions: int = 0  # 0: the partitions of the prepared items
    batch_size: int = 4096
    seed: int = 7

    def validate(self) -> None:
        if "IVF" not in self.factory:
            _fail("index.factory", self.factory, "a faiss factory string with an IVF index")
        if not 1 <= self.min_train_per_list <= self.max_train_per_list:
            _fail(
                "index.min_train_per_list/max_train_per_list",
                (self.min_train_per_list, self.max_train_per_list),
                "1 <= min_train_per_list <= max_train_per_list",
            )
        if not 0.0 < self.target_recall <= 1.0:
            _fail("index.target_recall", self.target_recall, "a number in (0, 1]")
        for name in ("merge_memory_mb", "sweep_queries", "sweep_k", "batch_size"):
            if getattr(self, name) < 1:
                _fail(f"index.{name}", getattr(self, name), "an integer >= 1")
        if self.num_partitions < 0:
            _fail("index.num_partitions", self.num_partitions, "an integer >= 0")


@dataclass(frozen=True)
class RetrieveConfig:
    """Top-K items per query through the merged index (retrieve stage)."""

    top_k: int = 40
    exclude_train: bool = True
    nprobe: int = 0  # 0: the nprobe the index stage chose by its recall sweep
    num_partitions: int = 0  # 0: the partitions of the prepared queries
    batch_size: int = 1024
    eval_ks: tuple[int, ...] = (10, 40)

    def validate(self) -> None:
        for name in ("top_k", "batch_size"):
            if getattr(self, name) < 1:
                _fail(f"retrieve.{name}", getattr(self, name), "an integer >= 1")
        if self.nprobe < 0 or self.num_partitions < 0:
            _fail("retrieve.nprobe/num_partitions", (self.nprobe, self.num_partitions),
                  "integers >= 0")  # fmt: skip
        if not self.eval_ks or min(self.eval_ks) < 1 or max(self.eval_ks) > self.top_k:
            _fail("retrieve.eval_ks", self.eval_ks, f"integers in [1, top_k={self.top_k}]")


@dataclass(frozen=True)
class SparkSettings:
    """Defaults for the Spark session; spark-submit options take precedence."""

    app_name: str = "adjoint-spark"
    master: str | None = None
    conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig
    output: str
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    spark: SparkSettings = field(default_factory=SparkSettings)

    def validate(self) -> None:
        if not self.output:
            _fail("output", self.output, "a folder or URI")
        self.dataset.validate()
        self.prepare.validate()
        self.train.validate()
        self.index.validate()
        self.retrieve.validate()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``, or raise naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            _fail(key, value, f"one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            _fail(key, value, "a list")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, "a mapping")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(key, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            _fail(key, value, "a string")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _build(cls: type, data: Any, key: str) -> Any:
    if not isinstance(data, dict):
        _fail(key or "<top>", data, f"a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(set(data) - names):
        _fail(f"{key}.{unknown}".lstrip("."), data[unknown], f"one of the keys {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f"{key}.{f.name}".lstrip(".")
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{sub}' is required")
    return cls(**kwargs)


def _apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to nested ``data``."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _resolve_paths(data: dict, base: str) -> None:
    """Make relative input paths relative to the config file's project root."""
    dataset = data.get("dataset", {})
    if isinstance(dataset.get("path"), str):
        dataset["path"] = _join(base, dataset["path"])
    for section in ("queries", "items", "labels", "test_labels"):
        table = dataset.get(section)
        if isinstance(table, dict) and isinstance(table.get("path"), str):
            table["path"] = _join(base, table["path"])


def _join(base: str, path: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base, path))


def load_config(
    path: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    data: dict | None = None,
    base_dir: str | None = None,
) -> Config:
    """Load a config from a YAML file (or a dict), apply ``key=value`` overrides, validate.

    Relative input paths are taken relative to ``base_dir``: by default the folder that
    holds the ``conf/`` folder of the file (the project root), else the current folder.
    """
    if data is None:
        if path is None:
            raise ConfigError("no config given: pass --config FILE")
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    data = _deep_copy(data)
    for assignment in overrides:
        _apply_override(data, assignment)
    if base_dir is None:
        base_dir = os.getcwd()
        if path is not None:
            conf_dir = os.path.dirname(os.path.abspath(path))
            base_dir = (
                os.path.dirname(conf_dir) if os.path.basename(conf_dir) == "conf" else conf_dir
            )
    _resolve_paths(data, base_dir)
    if isinstance(data.get("output"), str):
        data["output"] = _join(os.getcwd(), data["output"])
    config = _build(Config, data, "")
    config.validate()
    return config


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
