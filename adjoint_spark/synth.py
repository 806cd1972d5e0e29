"""Generated data sets in the original system's text format, with planted structure.

Two kinds of structure, chosen by ``latent_dim``:

- clusters (``latent_dim=0``): every query and item belongs to one of ``num_clusters``
  clusters (``index % num_clusters``); a query's labels and an item's sequence name
  items of its own cluster, and the first numeric and categorical columns carry the
  cluster, so a model can recover it. Every item of a cluster is as good as another.
- graded preferences (``latent_dim > 0``): every query and item has a random unit
  vector in ``latent_dim`` dimensions (:func:`latents`), carried (with noise) by its
  first ``latent_dim`` numeric columns. A query's labels and an item's sequence are
  drawn among random candidate items with probability growing with the cosine of the
  two latent vectors (a softmax at ``temperature``), so a model that learns them
  scores items on a continuous scale, as a model trained on real data does.

Used by the tests (small) and the benchmarks (millions of rows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class TableShape:
    """Columns of one entity table: numerics, offset categoricals, sequences."""

    num_numeric: int
    categorical_sizes: tuple[int, ...]
    num_sequences: int = 0
    seq_len: int = 10


# The original system's item side: 55 numeric, 6 categorical and 1 sequence column.
SEED_ITEM_SHAPE = TableShape(55, (4, 8, 16, 32, 64, 128), 1, 20)
SEED_QUERY_SHAPE = TableShape(16, (4, 8, 16), 0)
LATENT_SEEDS = {"queries": 101, "items": 102}  # added to the data set's seed
LATENT_SIGNAL = 2.0  # std of a latent coordinate in the numeric columns (noise std 1)


@dataclass(frozen=True)
class Graded:
    """Graded preferences: latent vectors of all items, and how labels are drawn."""

    items: np.ndarray  # (num_items, latent_dim) unit vectors
    candidates: int = 1000
    temperature: float = 0.1

    def draw(self, rng: np.random.Generator, rows: np.ndarray, k: int) -> np.ndarray:
        """``k`` item indexes for each latent row of ``rows``: a Gumbel top-k over
        ``candidates`` random items, at logits cosine / temperature."""
        out = np.empty((len(rows), k), np.int64)
        candidates = min(self.candidates, len(self.items))
        for start in range(0, len(rows), 4096):
            part = rows[start : start + 4096]
            picks = rng.integers(0, len(self.items), size=(len(part), candidates))
            logits = np.einsum("rd,rcd->rc", part, self.items[picks]) / self.temperature
            logits += rng.gumbel(size=logits.shape)
            top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            out[start : start + len(part)] = np.take_along_axis(picks, top, axis=1)
        return out


def latents(num_rows: int, dim: int, seed: int) -> np.ndarray:
    """The (num_rows, dim) latent unit vectors of an entity table (graded preferences)."""
    x = np.random.default_rng(seed).normal(size=(num_rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _cluster_items(
    rng: np.random.Generator,
    clusters: np.ndarray,
    num_items: int,
    num_clusters: int,
    size: tuple[int, int],
) -> np.ndarray:
    """Random item indexes of the given clusters (item i is in cluster i % num_clusters)."""
    assert num_items >= num_clusters, f"{num_items} items cannot fill {num_clusters} clusters"
    per_cluster = num_items // num_clusters
    return clusters[:, None] + num_clusters * rng.integers(0, per_cluster, size=size)


def entity_frame(
    rng: np.random.Generator,
    first: int,
    count: int,
    shape: TableShape,
    num_items: int,
    num_clusters: int,
    latent: np.ndarray | None = None,
    graded: Graded | None = None,
) -> pd.DataFrame:
    """Rows ``first .. first+count-1`` of an entity table as a DataFrame of text-ready columns.

    With graded preferences, ``latent`` holds the rows' latent vectors and ``graded`` the
    items' (for the sequences); otherwise the rows' clusters shape them."""
    index = np.arange(first, first + count, dtype=np.int64)
    clusters = index % num_clusters
    cols: dict[str, object] = {"index": index}
    numeric = rng.normal(0.0, 1.0, size=(count, shape.num_numeric)).astype(np.float32)
    if latent is not None:
        dim = latent.shape[1]
        assert dim <= shape.num_numeric, f"{dim} latent dimensions need as many numeric columns"
        numeric[:, :dim] += LATENT_SIGNAL * np.sqrt(dim) * latent
    elif shape.num_numeric:
        numeric[:, 0] += 3.0 * np.cos(2 * np.pi * clusters / num_clusters)
    if latent is None and shape.num_numeric > 1:
        numeric[:, 1] += 3.0 * np.sin(2 * np.pi * clusters / num_clusters)
    for i in range(shape.num_numeric):
        cols[f"n{i}"] = numeric[:, i]
    offset = 0
    for j, size in enumerate(shape.categorical_sizes):
        values = clusters % size if j == 0 else rng.integers(0, size, size=count)
        cols[f"c{j}"] = values + offset
        offset += size
    for k in range(shape.num_sequences):
        lengths = rng.integers(1, shape.seq_len + 1, size=count)
        if graded is not None:
            items = graded.draw(rng, latent, shape.seq_len)
        else:
            items = _cluster_items(rng, clusters, num_items, num_clusters, (count, shape.seq_len))
        cols[f"s{k}"] = [",".join(map(str, row[:n])) for row, n in zip(items, lengths, strict=True)]
    return pd.DataFrame(cols)


def write_entities(
    path: str,
    num_rows: int,
    shape: TableShape,
    num_items: int,
    num_clusters: int,
    seed: int,
    chunk_rows: int = 100_000,
    latent: np.ndarray | None = None,
    graded: Graded | None = None,
) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for first in range(0, num_rows, chunk_rows):
            count = min(chunk_rows, num_rows - first)
            rows = None if latent is None else latent[first : first + count]
            frame = entity_frame(rng, first, count, shape, num_items, num_clusters, rows, graded)
            frame.to_csv(fh, sep="\t", header=False, index=False, float_format="%.4f")


def write_labels(
    path: str,
    num_queries: int,
    per_query: int,
    num_items: int,
    num_clusters: int,
    rng: np.random.Generator,
    query_latents: np.ndarray | None = None,
    graded: Graded | None = None,
) -> None:
    """``per_query`` labels of every query (duplicates removed)."""
    queries = np.repeat(np.arange(num_queries, dtype=np.int64), per_query)
    if graded is not None:
        items = graded.draw(rng, query_latents, per_query).reshape(-1)
    else:
        clusters = queries % num_clusters
        items = _cluster_items(rng, clusters, num_items, num_clusters, (len(queries), 1))[:, 0]
    pairs = pd.DataFrame({"q": queries, "i": items}).drop_duplicates()
    pairs.to_csv(path, sep="\t", header=False, index=False)


def write_seed_dataset(
    folder: str,
    num_queries: int,
    num_items: int,
    pairs_per_query: int,
    query_shape: TableShape = SEED_QUERY_SHAPE,
    item_shape: TableShape = SEED_ITEM_SHAPE,
    num_clusters: int = 8,
    test_pairs_per_query: int = 0,
    seed: int = 0,
    latent_dim: int = 0,
) -> dict[str, str]:
    """Write queries.txt, items.txt, labels.txt (and test_labels.txt) into ``folder``.

    ``latent_dim > 0`` plants graded preferences instead of clusters (module docstring;
    :func:`latents` with ``seed + LATENT_SEEDS[table]`` gives the latent vectors back).
    Returns the paths by table name. Duplicate pairs are removed, and test pairs that
    repeat a train pair are dropped, so every written label is valid.
    """
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, f"{name}.txt") for name in ("queries", "items", "labels")}
    query_latents = graded = item_latents = None
    if latent_dim:
        query_latents = latents(num_queries, latent_dim, seed + LATENT_SEEDS["queries"])
        item_latents = latents(num_items, latent_dim, seed + LATENT_SEEDS["items"])
        graded = Graded(item_latents)
    write_entities(paths["queries"], num_queries, query_shape, num_items, num_clusters, seed,
                   latent=query_latents)  # fmt: skip
    write_entities(paths["items"], num_items, item_shape, num_items, num_clusters, seed + 1,
                   latent=item_latents, graded=graded)  # fmt: skip
    rng = np.random.default_rng(seed + 2)
    label_args = (num_items, num_clusters, rng, query_latents, graded)
    write_labels(paths["labels"], num_queries, pairs_per_query, *label_args)
    if test_pairs_per_query:
        paths["test_labels"] = os.path.join(folder, "test_labels.txt")
        train = pd.read_csv(paths["labels"], sep="\t", header=None, names=["q", "i"])
        write_labels(paths["test_labels"], num_queries, test_pairs_per_query, *label_args)
        test = pd.read_csv(paths["test_labels"], sep="\t", header=None, names=["q", "i"])
        test = test.merge(train, how="left", indicator=True)
        test = test[test["_merge"] == "left_only"][["q", "i"]]
        test.to_csv(paths["test_labels"], sep="\t", header=False, index=False)
    return paths


def seed_config(
    paths: dict[str, str], output: str, query_shape: TableShape, item_shape: TableShape, **prepare
) -> dict:
    """A config dict for a data set written by :func:`write_seed_dataset`."""

    def entity(path: str, shape: TableShape) -> dict:
        return {
            "path": path,
            "num_numeric": shape.num_numeric,
            "categorical_sizes": list(shape.categorical_sizes),
            "sequences": [
                {"name": f"seq{k}", "max_len": shape.seq_len} for k in range(shape.num_sequences)
            ],
        }

    dataset = {
        "name": "generated",
        "format": "seed",
        "queries": entity(paths["queries"], query_shape),
        "items": entity(paths["items"], item_shape),
        "labels": {"path": paths["labels"]},
    }
    if "test_labels" in paths:
        dataset["test_labels"] = {"path": paths["test_labels"]}
    return {"dataset": dataset, "output": output, "prepare": prepare}
