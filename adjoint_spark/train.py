"""The train stage: fit the two towers on the driver, evaluate, keep the best model.

Artifacts under ``<output>/model/`` (published whole): ``model.pt`` (a state dict that
loads with ``torch.load(weights_only=True)``), ``model.json`` (train config, feature
spec, vocabulary sizes, best metrics), ``history.json`` (loss and metrics per epoch) and
``training.png``. A checkpoint (:func:`checkpoint_path`: ``<output>/_checkpoint/train.pt``
for a local output) holds the last finished epoch so an interrupted run resumes where it
stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from adjoint_spark.config import Config, TrainConfig
from adjoint_spark.faults import maybe_kill_after_epoch
from adjoint_spark.feed import MemoryFeed, TrainBatch, load_features
from adjoint_spark.losses import (
    hinge_loss,
    in_batch_softmax_loss,
    logistic_loss,
    sampled_softmax_loss,
)
from adjoint_spark.metrics import evaluate_top_k
from adjoint_spark.model import TowerShape, TowerSpec, TwoTower
from adjoint_spark.sampling import NegativeSpec
from adjoint_spark.storage import Staging, Storage, join, local_path
from adjoint_spark.timing import Timer

logger = logging.getLogger(__name__)

CHECKPOINT = "_checkpoint/train.pt"
MODEL_FILES = ("model.pt", "model.json", "history.json", "training.png")


@dataclass
class TrainResult:
    path: str | None  # None when the run stopped before publishing
    best_epoch: int
    best_metrics: dict
    history: list[dict]


# ---------------------------------------------------------------------------- set-up


def choose_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def set_threads(threads: int) -> int:
    """Torch threads: the configured number, else half the cores this process may use.

    The other half is left to the Petastorm reader threads and the JVM. On 2 shared
    cores, 2 torch threads made a MovieLens step 20x slower than 1 (816 ms against
    41 ms), as OpenMP threads spin while waiting for a core.
    """
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
        threads = max(1, cores // 2)
    torch.set_num_threads(threads)
    return threads


def tower_shapes(cfg: TrainConfig) -> tuple[TowerShape, TowerShape]:
    def shape(tower) -> TowerShape:
        return TowerShape(
            feature_dim=cfg.feature_dim,
            hidden_dim=tower.hidden_dim,
            mlp_layers=tower.mlp_layers,
            embedding_dim=cfg.embedding_dim,
            dropout=cfg.dropout,
            pooling=cfg.pooling,
            final_activation=cfg.final_activation,
            use_id=tower.use_id,
            combine=cfg.combine,
            sequence_projection=cfg.sequence_projection,
        )

    return shape(cfg.query), shape(cfg.item)


def build_model(manifest: dict, cfg: TrainConfig) -> TwoTower:
    query_shape, item_shape = tower_shapes(cfg)
    return TwoTower(
        TowerSpec.from_manifest(manifest, "query"),
        TowerSpec.from_manifest(manifest, "item"),
        query_shape,
        item_shape,
        num_items=manifest["num_items"],
        init_scale=1.0 / cfg.temperature,
        learn_scale=cfg.learn_temperature,
    )


def build_optimizer(model: TwoTower, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    return opt, sched


def spec_fingerprint(manifest: dict, cfg: TrainConfig) -> str:
    """Identifies the feature spec and train config a checkpoint belongs to."""
    blob = json.dumps(
        [
            manifest["features"],
            manifest["num_items"],
            manifest["num_queries"],
            dataclasses.asdict(cfg),
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- steps


def compute_loss(
    model: TwoTower, batch: TrainBatch, cfg: TrainConfig, log_q: torch.Tensor
) -> torch.Tensor:
    """The configured loss of one batch (vectors of distinct items computed once)."""
    q = model.embed_queries(batch.query)
    items = model.embed_items(batch.items)
    pos_vec = items[batch.pos]
    pos = (q * pos_vec).sum(-1)
    neg = torch.einsum("bd,bnd->bn", q, items[batch.neg]) if batch.neg.numel() else None
    if cfg.loss == "hinge":
        return hinge_loss(pos, neg, batch.neg_valid, cfg.margin)
    if cfg.loss == "logistic":
        return logistic_loss(pos, neg, batch.neg_valid, model.scale)
    if cfg.loss == "sampled_softmax":
        return sampled_softmax_loss(pos, neg, batch.neg_valid, model.scale)
    item_idx = batch.items["idx"]
    pos_idx = item_idx[batch.pos]
    extra = {}
    if neg is not None:
        # Sampled negatives are drawn uniformly or by popularity; their logQ is that
        # of a uniform draw, which leaves their relative order unchanged.
        extra = {
            "neg": neg,
            "neg_valid": batch.neg_valid,
            "neg_log_q": torch.full_like(neg, -float(np.log(len(log_q)))),
        }
    return in_batch_softmax_loss(
        q, pos_vec, pos_idx, log_q[pos_idx], model.scale, own=batch.own, **extra
    )


@torch.no_grad()
def embed_table(embed, table, device: torch.device, batch_size: int = 8192) -> torch.Tensor:
    out = []
    for start in range(0, len(table), batch_size):
        index = torch.arange(start, min(start + batch_size, len(table)))
        batch = {k: v.to(device) for k, v in table.gather(index).items()}
        out.append(embed(batch).float())
    return torch.cat(out)


@dataclass
class EvalData:
    """Test queries with their held-out items and the train items to exclude."""

    query_idx: np.ndarray
    test_items: list[np.ndarray]
    train_items: list[np.ndarray]

    @staticmethod
    def from_pairs(
        train_q: np.ndarray, train_i: np.ndarray, test_q: np.ndarray, test_i: np.ndarray
    ) -> EvalData:
        queries = np.unique(test_q)
        test_sorted = np.argsort(test_q, kind="stable")
        test_groups = np.split(
            test_i[test_sorted], np.searchsorted(test_q[test_sorted], queries[1:])
        )
        train_order = np.argsort(train_q, kind="stable")
        tq, ti = train_q[train_order], train_i[train_order]
        lo, hi = np.searchsorted(tq, queries), np.searchsorted(tq, queries, side="right")
        train_groups = [ti[a:b] for a, b in zip(lo, hi, strict=True)]
        return EvalData(queries, test_groups, train_groups)


@torch.no_grad()
def evaluate(
    model: TwoTower,
    queries,
    items,
    data: EvalData,
    ks: tuple[int, ...],
    device: torch.device,
    exclude_train: bool = True,
) -> dict[str, float]:
    """Exact top-K over all items for every test query (train items excluded)."""
    model.eval()
    item_vecs = embed_table(model.embed_items, items, device)
    k_max = max(ks)
    tops = []
    for start in range(0, len(data.query_idx), 1024):
        idx = torch.from_numpy(data.query_idx[start : start + 1024])
        batch = {k: v.to(device) for k, v in queries.gather(idx).items()}
        scores = model.embed_queries(batch).float() @ item_vecs.T
        if exclude_train:
            for row, seen in enumerate(data.train_items[start : start + 1024]):
                scores[row, torch.from_numpy(seen).to(device)] = float("-inf")
        tops.append(scores.topk(min(k_max, scores.shape[1]), dim=1).indices.cpu().numpy())
    model.train()
    return evaluate_top_k(np.concatenate(tops), data.test_items, ks)


# ---------------------------------------------------------------------------- loop


class Progress:
    """A one-line progress bar on a terminal; periodic log lines otherwise."""

    def __init__(self, total: int, epoch: int, every: int):
        self.total, self.epoch, self.every = total, epoch, every
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, lr: float, ms: float, rate: float, loss: float) -> None:
        if self.tty:
            done = int(30 * step / max(1, self.total))
            left = (time.perf_counter() - self.start) / step * (self.total - step)
            sys.stderr.write(
                f"\repoch {self.epoch} [{'#' * done}{'.' * (30 - done)}] {step}/{self.total} "
                f"loss {loss:.4f} {rate:,.0f} ex/s {left:.0f} s left "
            )
            if step == self.total:
                sys.stderr.write("\n")
        if step % self.every == 0 or step == self.total:
            logger.info(
                "epoch %d step %d/%d lr %.3g %.1f ms/batch %.0f examples/s loss %.5f",
                self.epoch,
                step,
                self.total,
                lr,
                ms,
                rate,
                loss,
            )


def train_epoch(model, feed, opt, cfg: TrainConfig, epoch: int, device, log_q) -> dict:
    model.train()
    total_loss, total_examples, seconds = fit_epoch(
        lambda batch: compute_loss(model, batch, cfg, log_q),
        list(model.parameters()),
        feed,
        opt,
        cfg,
        epoch,
        device,
    )
    return epoch_record(total_loss, total_examples, seconds)


def fit_epoch(
    loss_of,
    params: list,
    feed,
    opt,
    cfg: TrainConfig,
    epoch: int,
    device,
    weights: np.ndarray | None = None,
    show: bool = True,
    where: str = "",
) -> tuple[float, int, float]:
    """The optimiser steps of one epoch: (sum of loss x examples, examples, seconds).

    ``loss_of(batch)`` is the batch's mean loss; ``weights[step]`` scales it before the
    backward pass (distributed training); ``show``: log and draw the progress bar.
    """
    total_loss, total_examples = 0.0, 0
    progress = Progress(feed.num_batches(), epoch, cfg.log_every)
    start = time.perf_counter()
    for step, batch in enumerate(feed.batches(epoch)):
        t0 = time.perf_counter()
        batch = batch.to(device)
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        (loss if weights is None else loss * float(weights[step])).backward()
        if cfg.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        opt.step()
        value = float(loss.detach())
        if not np.isfinite(value):
            raise FloatingPointError(
                f"loss became {value} at epoch {epoch} step {step}{where}: lower train.lr"
            )
        n = len(batch.pos)
        total_loss += value * n
        total_examples += n
        if show:
            ms = (time.perf_counter() - t0) * 1000
            rate = total_examples / (time.perf_counter() - start)
            progress.update(step + 1, opt.param_groups[0]["lr"], ms, rate, value)
    return total_loss, total_examples, time.perf_counter() - start


def epoch_record(total_loss: float, total_examples: int, seconds: float) -> dict:
    return {
        "loss": total_loss / max(1, total_examples),
        "examples": total_examples,
        "seconds": round(seconds, 3),
        "examples_per_second": round(total_examples / max(seconds, 1e-9), 1),
    }


def read_manifest(storage: Storage, prepared: str) -> dict:
    path = join(prepared, "manifest.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run the prepare stage first")
    return storage.read_json(path)


def make_feed(spark, cfg: TrainConfig, prepared: str, manifest: dict, output: str):
    spec = NegativeSpec(cfg.num_negatives, cfg.num_popular_negatives, seed=cfg.seed)
    if cfg.feed == "stream":
        from adjoint_spark.stream import StreamFeed

        return StreamFeed(
            spark,
            prepared,
            manifest,
            spec,
            cfg.batch_size,
            join(output, "_stream"),
            cfg.reader_workers,
            cfg.epochs,
            cfg.history_sample,
        )
    return MemoryFeed(
        prepared, manifest, spec, cfg.batch_size, cfg.reader_workers, cfg.history_sample
    )


def eval_data(spark, prepared: str, max_queries: int, seed: int) -> EvalData:
    """Test pairs and the train items of the evaluated queries, gathered with Spark.

    With ``max_queries`` > 0, a seeded sample of that many test queries is evaluated,
    so the driver holds their pairs only, whatever the size of the pair tables.
    """
    from pyspark.sql import functions as F

    test = spark.read.parquet(join(prepared, "test_pairs")).select("query_idx", "item_idx")
    train = spark.read.parquet(join(prepared, "train_pairs")).select("query_idx", "item_idx")
    queries = test.select("query_idx").distinct()
    if max_queries > 0:
        order = F.xxhash64(F.lit(seed), F.col("query_idx"))
        queries = queries.orderBy(order, "query_idx").limit(max_queries)
    test_rows = test.join(queries, "query_idx").toPandas()
    train_rows = train.join(queries, "query_idx").toPandas()
    return EvalData.from_pairs(
        train_rows["query_idx"].to_numpy(np.int64),
        train_rows["item_idx"].to_numpy(np.int64),
        test_rows["query_idx"].to_numpy(np.int64),
        test_rows["item_idx"].to_numpy(np.int64),
    )


def run_train(
    spark, config: Config, timer: Timer | None = None, stop_after_epochs: int | None = None
) -> TrainResult:
    """Train on ``<output>/prepared`` and publish ``<output>/model``.

    ``stop_after_epochs`` ends the run early, as an interruption would (for tests).
    """
    timer = timer or Timer()
    cfg = config.train
    storage = Storage(spark)
    prepared = join(config.output, "prepared")
    started = time.perf_counter()
    with timer.phase("train"):
        manifest = read_manifest(storage, prepared)
        if cfg.num_processes > 1:
            from adjoint_spark.distributed import train_distributed

            return train_distributed(spark, config, manifest, timer, stop_after_epochs, started)
        torch.manual_seed(cfg.seed)
        device = choose_device(cfg.device)
        threads = set_threads(cfg.threads)
        logger.info("training on %s with %d torch threads", device, threads)
        with timer.phase("load"):
            feed = make_feed(spark, cfg, prepared, manifest, config.output)
            # The memory feed already holds both tables; the stream feed reads them here.
            if isinstance(feed, MemoryFeed):
                queries, items = feed.queries, feed.items
            else:
                queries = load_features(prepared, manifest, "queries", cfg.reader_workers)
                items = load_features(prepared, manifest, "items", cfg.reader_workers)
            data = eval_data(spark, prepared, cfg.eval_queries, cfg.seed)
        model = build_model(manifest, cfg).to(device)
        opt, sched = build_optimizer(model, cfg)
        log_q = item_log_q(feed.item_cdf, device)

        fingerprint = spec_fingerprint(manifest, cfg)
        state = load_checkpoint(config.output, fingerprint, model, opt, sched)
        start_epoch, history, best = state
        interrupted = False
        with timer.phase("epochs"):
            for epoch in range(start_epoch, cfg.epochs):
                if asked_to_stop(epoch, stop_after_epochs):
                    interrupted = True
                    break
                record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"]}
                record.update(train_epoch(model, feed, opt, cfg, epoch, device, log_q))
                sched.step()
                best = evaluate_epoch(model, queries, items, data, cfg, record, best, device)
                history.append(record)
                save_checkpoint(
                    config.output, fingerprint, epoch + 1, model, opt, sched, history, best
                )
                maybe_kill_after_epoch(epoch + 1)
                if patience_ran_out(best, epoch + 1, cfg):
                    break
        if hasattr(feed, "close"):
            feed.close()
            storage.delete(join(config.output, "_stream"))
        if interrupted:
            return TrainResult(
                None, best["epoch"] if best else 0, best["metrics"] if best else {}, history
            )
        with timer.phase("write"):
            path = publish_model(storage, config, manifest, best, history, threads, device, started)
    return TrainResult(path, best["epoch"], best["metrics"], history)


def item_log_q(item_cdf: np.ndarray, device) -> torch.Tensor:
    """log of every item's share of the train pairs (counted as 1 when it has none): the
    logQ correction of in-batch softmax."""
    counts = np.diff(np.concatenate([[0], item_cdf])).astype(np.float64)
    return torch.from_numpy(np.log(np.maximum(counts, 1) / counts.sum())).float().to(device)


def asked_to_stop(epoch: int, stop_after_epochs: int | None) -> bool:
    if stop_after_epochs is not None and epoch >= stop_after_epochs:
        logger.warning("stopping after %d epochs as asked", epoch)
        return True
    return False


def evaluate_epoch(model, queries, items, data, cfg: TrainConfig, record: dict, best, device):
    """On evaluation epochs: metrics into ``record``, and the new best (else ``best``)."""
    epoch = record["epoch"]
    if epoch % cfg.eval_every and epoch != cfg.epochs:
        return best
    metrics = evaluate(model, queries, items, data, cfg.eval_ks, device)
    record["metrics"] = metrics
    logger.info("epoch %d: loss %.5f %s", epoch, record["loss"], _short(metrics))
    return keep_best(best, epoch, metrics, model, cfg.select_metric)


def keep_best(best: dict | None, epoch: int, metrics: dict, model, select_metric: str):
    """The new best (epoch, metrics, a CPU copy of the weights), or ``best`` unchanged."""
    if best is not None and metrics[select_metric] <= best["metrics"][select_metric]:
        return best
    return {"epoch": epoch, "metrics": metrics, "state": cpu_copy(model.state_dict())}


def cpu_copy(state: dict) -> dict:
    """A CPU copy of a state dict in which entries that share one tensor (the item-id
    table: the model's and both towers') share one copy, so ``model.pt`` stores it once."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()), tensor.device)  # fmt: skip
        if key not in copies:
            copies[key] = tensor.detach().cpu().clone()
        out[name] = copies[key]
    return out


def patience_ran_out(best: dict | None, epoch: int, cfg: TrainConfig) -> bool:
    """True (and logged) when ``patience`` evaluations in a row found nothing better."""
    since_best = epoch - best["epoch"] if best else 0
    if cfg.patience and since_best >= cfg.patience * cfg.eval_every:
        logger.info("no better %s for %d epochs: stopping early", cfg.select_metric, since_best)
        return True
    return False


def _short(metrics: dict) -> str:
    keys = ("precision@10", "recall@10", "ndcg@10", "map@10", "recall@40", "micro_recall@40")
    return " ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


# ---------------------------------------------------------------------------- state


def save_checkpoint(
    output, fingerprint, epoch, model, opt, sched, history, best, torch_rng=None
) -> None:
    """Write the state after ``epoch`` finished epochs atomically (write, then rename).

    ``torch_rng`` defaults to this process's RNG state; the distributed path passes the
    states of all its processes, stacked (one row per rank).
    """
    path = checkpoint_path(output)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state() if torch_rng is None else torch_rng,
        "history": json.dumps(history),
        "best": None
        if best is None
        else {
            "epoch": best["epoch"],
            "metrics": json.dumps(best["metrics"]),
            "state": best["state"],
        },
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(output, fingerprint) -> dict | None:
    """The last checkpoint of the same spec and config (history and best decoded), or None."""
    path = checkpoint_path(output)
    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=True)
    if state["fingerprint"] != fingerprint:
        logger.warning("ignoring checkpoint %s: it belongs to another config or data", path)
        return None
    state["history"] = json.loads(state["history"])
    best = state["best"]
    if best is not None:
        state["best"] = {
            "epoch": best["epoch"],
            "metrics": json.loads(best["metrics"]),
            "state": best["state"],
        }
    return state


def load_checkpoint(output, fingerprint, model, opt, sched, rank: int = 0):
    """Resume from the last checkpoint of the same spec and config, if there is one.

    ``rank`` picks this process's RNG state from a checkpoint of the distributed path.
    """
    state = read_checkpoint(output, fingerprint)
    if state is None:
        return 0, [], None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng = state["torch_rng"]
    torch.set_rng_state(rng if rng.dim() == 1 else rng[rank])
    logger.info("resuming after epoch %d from %s", state["epoch"], checkpoint_path(output))
    return state["epoch"], state["history"], state["best"]


def checkpoint_path(output: str) -> str:
    """Where the training checkpoint of ``output`` lives: ``<output>/_checkpoint/train.pt``
    on a local or ``file:`` output; for any other URI (``hdfs://``, ``s3a://``) a folder
    on the driver's disk named after the URI, since ``torch.save`` needs a local path
    and the processes of distributed training have no Spark session to copy through.
    """
    local = local_path(output)
    if local is not None:
        return os.path.join(local, CHECKPOINT)
    digest = hashlib.sha256(output.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "adjoint-spark-checkpoints", digest, "train.pt")


def publish_model(
    storage: Storage,
    config: Config,
    manifest: dict,
    best: dict,
    history: list[dict],
    threads: int,
    device,
    started: float,
) -> str:
    cfg = config.train
    with Staging(storage, config.output, "model") as stage, tempfile.TemporaryDirectory() as tmp:
        # Written on the driver's disk, then copied: the output may be hdfs:// or s3a://.
        local = local_path(stage.path) or tmp
        torch.save(best["state"], os.path.join(local, "model.pt"))
        query_shape, item_shape = tower_shapes(cfg)
        info = {
            "train": dataclasses.asdict(cfg),
            "query_tower": dataclasses.asdict(query_shape),
            "item_tower": dataclasses.asdict(item_shape),
            "features": manifest["features"],
            "num_queries": manifest["num_queries"],
            "num_items": manifest["num_items"],
            "item_vocab_size": manifest["item_vocab_size"],
            "best_epoch": best["epoch"],
            "metrics": best["metrics"],
            "fingerprint": spec_fingerprint(manifest, cfg),
            "device": str(device),
            "threads": threads,
            "seconds": round(time.perf_counter() - started, 3),
        }
        with open(os.path.join(local, "model.json"), "w") as fh:
            json.dump(info, fh, indent=2)
        with open(os.path.join(local, "history.json"), "w") as fh:
            json.dump(history, fh, indent=2)
        plot_history(history, os.path.join(local, "training.png"))
        if local == tmp:
            for name in MODEL_FILES:
                storage.copy_from_local(os.path.join(tmp, name), join(stage.path, name))
        path = stage.publish()
    shutil.rmtree(os.path.dirname(checkpoint_path(config.output)), ignore_errors=True)
    return path


def plot_history(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="loss")
    evals = [h for h in history if "metrics" in h]
    for key in ("recall@40", "ndcg@10", "recall@10"):
        ax2.plot(
            [h["epoch"] for h in evals], [h["metrics"][key] for h in evals], marker="o", label=key
        )
    ax2.set(xlabel="epoch", title="test metrics (exact search)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
