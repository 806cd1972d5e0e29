"""The two towers: numeric, categorical and sequence features in, one unit vector out.

Inside a tower every feature becomes a vector of width ``feature_dim`` (V):

- numeric feature i: a learned vector scaled by the value;
- categorical feature j: a row of the tower's categorical table (one table for all
  columns, each column at its own offset);
- sequence feature: the items' rows of the item-id table SHARED by both towers, a
  linear layer + ReLU, pooled over non-padding positions (mean, max or attention);
- optionally the entity's own id: items from the shared item-id table, queries from a
  query-id table.

With ``combine: seed`` (the default, the original's), the F feature vectors are
combined two ways: their sum through a ReLU (a first-order,
factorisation-machine-like term) and their concatenation through an MLP. Sum, the MLP's
last hidden layer and its output are concatenated, passed through a layer of width
4 x ``embedding_dim`` and a final layer (tanh by default), then L2-normalised, so a
score is a cosine similarity. With ``combine: mlp`` the concatenation goes through the
MLP and a linear layer straight to ``embedding_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TowerSpec:
    """The inputs of one tower, read from the prepared manifest."""

    num_numeric: int
    cat_sizes: tuple[int, ...]
    sequences: tuple[tuple[str, int], ...]  # (column name, max_len)
    num_ids: int  # entities of this side (for an own-id table)

    @staticmethod
    def from_manifest(manifest: dict, side: str) -> TowerSpec:
        table = "queries" if side == "query" else "items"
        features = manifest["features"][table]
        return TowerSpec(
            num_numeric=len(features["numeric"]),
            cat_sizes=tuple(c["vocab_size"] for c in features["categorical"]),
            sequences=tuple((s["column"], s["max_len"]) for s in features["sequences"]),
            num_ids=manifest["num_queries" if side == "query" else "num_items"],
        )


@dataclass(frozen=True)
class TowerShape:
    """Widths of one tower (the parts of the architecture that are configurable)."""

    feature_dim: int = 32
    hidden_dim: int = 64
    mlp_layers: int = 1
    embedding_dim: int = 32
    dropout: float = 0.1
    pooling: str = "mean"
    final_activation: str = "tanh"
    use_id: bool = False
    combine: str = "seed"
    sequence_projection: bool = True


def reads_item_table(spec: TowerSpec, shape: TowerShape, side: str) -> bool:
    """Whether a tower looks rows up in the shared item-id table (see
    :meth:`Tower.features`): for its sequence features, and the item tower also for its
    own id (a query's own id has a table of its own)."""
    return bool(spec.sequences) or (side == "item" and shape.use_id)


class SequencePool(nn.Module):
    """Linear + ReLU + dropout over item vectors, pooled over non-padding positions."""

    def __init__(self, dim: int, pooling: str, dropout: float, projection: bool = True):
        super().__init__()
        if pooling not in ("mean", "max", "attention"):
            raise ValueError(f"pooling {pooling!r} is not one of mean, max, attention")
        self.pooling = pooling
        self.proj = nn.Linear(dim, dim) if projection else None
        self.dropout = nn.Dropout(dropout)
        self.attn = nn.Linear(dim, 1) if pooling == "attention" else None

    def forward(self, vectors: Tensor, mask: Tensor) -> Tensor:
        """vectors (B, L, V), mask (B, L) True at real items -> (B, V)."""
        h = self.dropout(F.relu(self.proj(vectors))) if self.proj is not None else vectors
        m = mask.unsqueeze(-1)
        if self.pooling == "mean":
            return (h * m).sum(1) / m.sum(1).clamp(min=1)
        if self.pooling == "max":
            return (
                h.masked_fill(~m, float("-inf"))
                .amax(1)
                .masked_fill(~mask.any(1, keepdim=True), 0.0)
            )
        logits = self.attn(h).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)
        return (h * weights.unsqueeze(-1)).sum(1)


class Tower(nn.Module):
    """One tower. ``tables``: weights, by state name (``categorical.weight``,
    ``own_ids.weight``), that the tower's own embedding tables take as they are (not
    copied, not initialised): how a trained tower is rebuilt around memory-mapped tables."""

    def __init__(
        self,
        spec: TowerSpec,
        shape: TowerShape,
        item_table: nn.Embedding,
        side: str,
        tables: dict[str, Tensor] | None = None,
    ):
        super().__init__()
        tables = tables or {}
        self.spec, self.shape, self.side = spec, shape, side
        v = shape.feature_dim
        self.item_table = item_table  # shared with the other tower
        self.numeric = nn.Parameter(torch.randn(spec.num_numeric, v) * 0.1)
        offsets = torch.tensor([0, *spec.cat_sizes[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("cat_offsets", offsets[: len(spec.cat_sizes)], persistent=False)
        self.categorical = None
        if spec.cat_sizes:
            rows = max(1, sum(spec.cat_sizes))
            self.categorical = nn.Embedding(rows, v, _weight=tables.get("categorical.weight"))
        self.pools = nn.ModuleList(
            SequencePool(v, shape.pooling, shape.dropout, shape.sequence_projection)
            for _ in spec.sequences
        )
        self.own_ids = None
        if shape.use_id and side == "query":
            self.own_ids = nn.Embedding(spec.num_ids, v, _weight=tables.get("own_ids.weight"))
        num_features = (
            spec.num_numeric + len(spec.cat_sizes) + len(spec.sequences) + int(shape.use_id)
        )
        assert num_features > 0, f"the {side} tower has no input feature"
        layers: list[nn.Module] = []
        width = num_features * v
        for _ in range(shape.mlp_layers):
            layers += [nn.Linear(width, shape.hidden_dim), nn.ReLU(), nn.Dropout(shape.dropout)]
            width = shape.hidden_dim
        self.mlp = nn.Sequential(*layers)
        if shape.combine not in ("seed", "mlp"):
            raise ValueError(f"combine {shape.combine!r} is not one of seed, mlp")
        if shape.combine == "seed":
            self.mlp_out = nn.Linear(width, v)
            self.wide = nn.Linear(v + width + v, 4 * shape.embedding_dim)
            self.out = nn.Linear(4 * shape.embedding_dim, shape.embedding_dim)
            self.drop = nn.Dropout(shape.dropout)
        else:
            self.out = nn.Linear(width, shape.embedding_dim)

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """The (B, F, V) feature vectors of a batch."""
        parts = []
        if self.spec.num_numeric:
            parts.append(batch["num"].unsqueeze(-1) * self.numeric)
        if self.categorical is not None:
            parts.append(self.categorical(batch["cat"].long() + self.cat_offsets))
        for pool, (column, _) in zip(self.pools, self.spec.sequences, strict=True):
            seq = batch[column].long()
            parts.append(pool(self.item_table(seq), seq > 0).unsqueeze(1))
        if self.shape.use_id:
            ids = batch["idx"].long()
            own = self.item_table(ids + 1) if self.side == "item" else self.own_ids(ids)
            parts.append(own.unsqueeze(1))
        return torch.cat(parts, dim=1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        f = self.features(batch)
        hidden = self.mlp(f.flatten(1))
        if self.shape.combine == "seed":
            first_order = F.relu(f.sum(1))
            combined = torch.cat([first_order, hidden, self.mlp_out(hidden)], dim=1)
            x = self.out(self.drop(F.relu(self.wide(combined))))
        else:
            x = self.out(hidden)
        if self.shape.final_activation == "tanh":
            x = torch.tanh(x)
        return F.normalize(x, dim=-1)


class TwoTower(nn.Module):
    """A query tower and an item tower that share one item-id table (padding id 0).

    ``scale`` is a learned inverse temperature used by the softmax and logistic
    losses (the hinge loss works on raw cosines).
    """

    def __init__(
        self,
        query: TowerSpec,
        item: TowerSpec,
        query_shape: TowerShape,
        item_shape: TowerShape,
        num_items: int,
        init_scale: float = 20.0,
        learn_scale: bool = False,
    ):
        super().__init__()
        if query_shape.embedding_dim != item_shape.embedding_dim:
            raise ValueError(
                f"both towers need the same embedding_dim, got {query_shape.embedding_dim}"
                f" and {item_shape.embedding_dim}"
            )
        if query_shape.feature_dim != item_shape.feature_dim:
            raise ValueError("both towers need the same feature_dim: they share the item table")
        self.item_table = nn.Embedding(num_items + 1, query_shape.feature_dim, padding_idx=0)
        nn.init.normal_(self.item_table.weight, std=0.1)
        with torch.no_grad():
            self.item_table.weight[0].zero_()
        self.query_tower = Tower(query, query_shape, self.item_table, "query")
        self.item_tower = Tower(item, item_shape, self.item_table, "item")
        log_scale = torch.tensor(float(init_scale)).log()
        self.log_scale = nn.Parameter(log_scale, requires_grad=learn_scale)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def embed_queries(self, batch: dict[str, Tensor]) -> Tensor:
        return self.query_tower(batch)

    def embed_items(self, batch: dict[str, Tensor]) -> Tensor:
        return self.item_tower(batch)
