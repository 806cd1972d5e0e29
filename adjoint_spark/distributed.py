"""Data-parallel training over several processes (``train.num_processes`` > 1).

The driver gathers the evaluation data with Spark, then pyspark's ``TorchDistributor``
(``local_mode=True``) starts ``num_processes`` processes on the driver's machine with
``torch.distributed.run`` and calls :func:`train_worker` in each. Every process
(a rank):

- reads its shard of ``prepared/train_pairs`` through Petastorm (row groups
  ``k % world_size == rank``) and the whole query and item tables;
- exchanges its pairs with the other ranks, so negatives still exclude a query's own
  positives from every shard and popular negatives follow the global item counts;
- trains the same :class:`~adjoint_spark.model.TwoTower` under
  ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU), with as many steps per epoch
  as single-process training: each rank splits its shard, in the epoch's order, into
  that many batches of about ``batch_size / world_size`` pairs;
- weights its batch loss by its share of the step's examples, so the averaged gradient
  is that of the mean loss over all ranks' examples.

Order, negatives and history samples are drawn from counters
(:mod:`adjoint_spark.sampling`) keyed by the pair and the epoch, not by the rank, so a
pair gets the same negatives as in single-process training and runs are reproducible.
Rank 0 evaluates with the same :func:`~adjoint_spark.train.evaluate`, keeps the best
weights, decides early stopping (broadcast to all ranks) and writes the checkpoint
(with every rank's RNG state); the driver then publishes the checkpoint's best weights
with :func:`~adjoint_spark.train.publish_model`, so the artifacts are those of a
single-process run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

from adjoint_spark.config import Config, TrainConfig
from adjoint_spark.faults import maybe_kill_after_epoch
from adjoint_spark.feed import (
    FeatureTable,
    MemoryFeed,
    TrainBatch,
    load_features,
    read_parquet_columns,
    sorted_pairs,
)
from adjoint_spark.sampling import NegativeSpec, epoch_order
from adjoint_spark.storage import Storage, join, to_uri
from adjoint_spark.timing import Timer
from adjoint_spark.train import (
    TrainResult,
    asked_to_stop,
    build_model,
    build_optimizer,
    choose_device,
    compute_loss,
    epoch_record,
    eval_data,
    evaluate_epoch,
    fit_epoch,
    item_log_q,
    load_checkpoint,
    patience_ran_out,
    publish_model,
    read_checkpoint,
    save_checkpoint,
    spec_fingerprint,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- driver


def train_distributed(
    spark,
    config: Config,
    manifest: dict,
    timer: Timer,
    stop_after_epochs: int | None,
    started: float,
):
    """Train with ``train.num_processes`` processes and publish ``<output>/model``.

    Called by :func:`~adjoint_spark.train.run_train` inside its ``train`` phase; returns
    the same :class:`~adjoint_spark.train.TrainResult`.
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    cfg = config.train
    prepared = join(config.output, "prepared")
    use_gpu = choose_device(cfg.device).type == "cuda"
    with timer.phase("load"):
        check_shardable(join(prepared, "train_pairs"), cfg.num_processes)
        data = eval_data(spark, prepared, cfg.eval_queries, cfg.seed)
    if use_gpu:
        check_driver_gpus(spark)
    distributor = TorchDistributor(
        num_processes=cfg.num_processes, local_mode=True, use_gpu=use_gpu
    )
    logger.info(
        "training with %d processes (%s)", distributor.num_processes, "nccl" if use_gpu else "gloo"
    )
    level = logging.getLogger("adjoint_spark").getEffectiveLevel()
    with timer.phase("epochs"), package_on_pythonpath():
        summary = distributor.run(train_worker, config, manifest, data, stop_after_epochs, level)

    # Rank 0 left the history and the best weights in the checkpoint.
    state = read_checkpoint(config.output, spec_fingerprint(manifest, cfg))
    history = state["history"] if state else []
    best = state["best"] if state else None
    if summary["interrupted"]:
        return TrainResult(
            None, best["epoch"] if best else 0, best["metrics"] if best else {}, history
        )
    with timer.phase("write"):
        path = publish_model(
            Storage(spark),
            config,
            manifest,
            best,
            history,
            summary["threads"],
            summary["device"],
            started,
        )
    return TrainResult(path, best["epoch"], best["metrics"], history)


def count_row_groups(path: str) -> int:
    """Parquet row groups under ``path``: the units Petastorm deals out to shards."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(to_uri(path), format="parquet")
    return sum(fragment.metadata.num_row_groups for fragment in dataset.get_fragments())


def check_shardable(path: str, num_processes: int) -> None:
    num_row_groups = count_row_groups(path)
    if num_row_groups < num_processes:
        raise ValueError(
            f"train.num_processes={num_processes} needs at least {num_processes} Parquet "
            f"row groups in {path}, which has {num_row_groups}: prepare again with "
            f"prepare.num_partitions >= {num_processes}"
        )


def check_driver_gpus(spark) -> None:
    """TorchDistributor picks GPUs from the driver's Spark resources, not from CUDA."""
    if "gpu" not in spark.sparkContext.resources:
        raise RuntimeError(
            "train.device resolves to cuda and train.num_processes > 1, but Spark knows no "
            "driver GPUs: set spark.driver.resource.gpu.amount and "
            "spark.driver.resource.gpu.discoveryScript, or set train.device=cpu"
        )


@contextlib.contextmanager
def package_on_pythonpath() -> Iterator[None]:
    """Make this package importable by the processes TorchDistributor starts.

    They unpickle :func:`train_worker` by reference, from a script in a temporary
    folder; under spark-submit the package may only be on the driver's ``sys.path``
    (a ``--py-files`` zip), which child processes do not inherit.
    """
    import adjoint_spark

    root = os.path.dirname(os.path.dirname(os.path.abspath(adjoint_spark.__file__)))
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, before]))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


# ---------------------------------------------------------------------------- data


def read_train_shard(
    prepared: str, rank: int, world_size: int, workers: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's train pairs ``(query_idx, item_idx)``, sorted, read through Petastorm.

    The shards of ranks ``0 .. world_size - 1`` are disjoint and together hold every
    train pair once (Petastorm deals out whole row groups).
    """
    path = join(prepared, "train_pairs")
    data = read_parquet_columns(path, ["query_idx", "item_idx"], workers, (rank, world_size))
    if not data:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return sorted_pairs(data)


def step_sizes(num_pairs: int, num_steps: int) -> np.ndarray:
    """Pairs in each of ``num_steps`` batches of ``num_pairs`` (as ``np.array_split``)."""
    base, extra = divmod(num_pairs, num_steps)
    return base + (np.arange(num_steps) < extra).astype(np.int64)


class ShardFeed(MemoryFeed):
    """One rank's batches: its shard of the train pairs, in the epoch's order.

    Every rank makes ``ceil(all pairs / batch_size)`` batches per epoch, the number of
    single-process steps, from its own shard; ``weights[step]`` is the rank's share of
    the step's examples times ``world_size`` (1 when shards are even). Negatives and
    history samples come from :meth:`MemoryFeed.batch_for`, so a pair gets the same
    ones as in single-process training.
    """

    def __init__(
        self,
        queries: FeatureTable,
        items: FeatureTable,
        shards: list[tuple[np.ndarray, np.ndarray]],
        rank: int,
        manifest: dict,
        spec: NegativeSpec,
        batch_size: int,
        history_sample: int = 0,
    ):
        # MemoryFeed.__init__ reads every table itself; this one is given them.
        world_size = len(shards)
        self.manifest, self.spec, self.rank = manifest, spec, rank
        self.num_items = manifest["num_items"]
        self.queries, self.items = queries, items
        self.pair_query, self.pair_item = shards[rank]
        all_query = np.concatenate([q for q, _ in shards])
        self.learn_pairs(all_query, np.concatenate([i for _, i in shards]), history_sample)

        self.num_steps = -(-len(all_query) // batch_size)
        sizes = np.stack([step_sizes(len(q), self.num_steps) for q, _ in shards])
        if sizes.min() < 1:
            raise ValueError(
                f"shards of {[len(q) for q, _ in shards]} train pairs cannot each fill "
                f"{self.num_steps} steps: prepare with more, even partitions "
                f"(prepare.num_partitions a multiple of train.num_processes)"
            )
        self.batch_size = int(sizes[rank].max())
        self.weights = world_size * sizes[rank] / sizes.sum(axis=0)

    def num_batches(self) -> int:
        return self.num_steps

    def batches(self, epoch: int) -> Iterator[TrainBatch]:
        order = epoch_order(self.pair_query, self.pair_item, self.spec.seed, epoch)
        for sel in np.array_split(order, self.num_steps):
            yield self.batch_for(self.pair_query[sel], self.pair_item[sel], epoch)


def load_shard_feed(
    prepared: str, manifest: dict, cfg: TrainConfig, rank: int, world_size: int
) -> ShardFeed:
    """Read this rank's shard and features, and exchange the pairs with the other ranks.

    Collective: every rank calls it. The exchange costs 16 bytes per train pair on each
    rank, the pair memory of the ``memory`` feed.
    """
    import torch.distributed as dist

    shard = read_train_shard(prepared, rank, world_size, cfg.reader_workers)
    shards: list = [None] * world_size
    dist.all_gather_object(shards, shard)
    sizes = [len(q) for q, _ in shards]
    if max(sizes) > 1.5 * max(1, min(sizes)):
        logger.warning(
            "train pair shards are uneven (%s pairs): the largest sets the pace; prepare "
            "with prepare.num_partitions a multiple of train.num_processes",
            sizes,
        )
    spec = NegativeSpec(cfg.num_negatives, cfg.num_popular_negatives, seed=cfg.seed)
    queries = load_features(prepared, manifest, "queries", cfg.reader_workers)
    items = load_features(prepared, manifest, "items", cfg.reader_workers)
    feed = ShardFeed(
        queries, items, shards, rank, manifest, spec, cfg.batch_size, cfg.history_sample
    )
    logger.info(
        "rank %d: %d of %d train pairs, %d steps of about %d pairs",
        rank,
        feed.num_pairs,
        sum(sizes),
        feed.num_steps,
        feed.batch_size,
    )
    return feed


# ---------------------------------------------------------------------------- workers


class LossModule(torch.nn.Module):
    """The model and its loss in one ``forward``.

    DistributedDataParallel synchronises gradients only for work done inside its
    ``forward``, and the towers are called through ``embed_queries``/``embed_items``.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, log_q: torch.Tensor):
        super().__init__()
        self.model, self.cfg, self.log_q = model, cfg, log_q

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        return compute_loss(self.model, batch, self.cfg, self.log_q)


def worker_threads(threads: int, world_size: int) -> int:
    """Torch threads per process: the configured number, else half the cores shared out."""
    if threads > 0:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    return max(1, cores // 2 // world_size)


def setup_worker_logging(rank: int, level: int) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("petastorm").setLevel(logging.WARNING)


def train_worker(
    config: Config,
    manifest: dict,
    data,
    stop_after_epochs: int | None = None,
    log_level: int = logging.INFO,
) -> dict:
    """What TorchDistributor runs in each process; the same small summary on every rank.

    Every rank returns the same value because TorchDistributor's local mode has every
    process write its return value to one file and keeps whichever came last.
    """
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    setup_worker_logging(rank, log_level)
    device = choose_device(config.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        summary = _train_rank(config, manifest, data, stop_after_epochs, rank, world_size, device)
        shared = [summary]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]
    finally:
        dist.destroy_process_group()


def _train_rank(config, manifest, data, stop_after_epochs, rank, world_size, device) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cfg = config.train
    threads = worker_threads(cfg.threads, world_size)
    torch.set_num_threads(threads)
    prepared = join(config.output, "prepared")
    feed = load_shard_feed(prepared, manifest, cfg, rank, world_size)

    # The same initial weights on every rank (DDP also broadcasts rank 0's); dropout
    # masks differ per rank.
    torch.manual_seed(cfg.seed)
    model = build_model(manifest, cfg).to(device)
    torch.manual_seed(cfg.seed + rank)
    opt, sched = build_optimizer(model, cfg)
    log_q = item_log_q(feed.item_cdf, device)
    fingerprint = spec_fingerprint(manifest, cfg)
    start_epoch, history, best = load_checkpoint(
        config.output, fingerprint, model, opt, sched, rank=rank
    )
    # The hinge loss leaves a learned temperature unused, which DDP must be told of.
    net = DistributedDataParallel(
        LossModule(model, cfg, log_q),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=cfg.learn_temperature and cfg.loss == "hinge",
    )
    logger.info("rank %d of %d on %s with %d torch threads", rank, world_size, device, threads)

    interrupted = False
    for epoch in range(start_epoch, cfg.epochs):
        if asked_to_stop(epoch, stop_after_epochs):
            interrupted = True
            break
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"]}
        record.update(train_epoch_ddp(net, feed, opt, cfg, epoch, device))
        sched.step()
        rng_states: list = [None] * world_size
        dist.all_gather_object(rng_states, torch.get_rng_state())
        stop = False
        if rank == 0:
            best = evaluate_epoch(model, feed.queries, feed.items, data, cfg, record, best, device)
            history.append(record)
            save_checkpoint(
                config.output,
                fingerprint,
                epoch + 1,
                model,
                opt,
                sched,
                history,
                best,
                torch_rng=torch.stack(rng_states),
            )
            maybe_kill_after_epoch(epoch + 1)
            stop = patience_ran_out(best, epoch + 1, cfg)
        decision = [stop]
        dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            break
    return {"interrupted": interrupted, "threads": threads, "device": device.type}


def train_epoch_ddp(net, feed: ShardFeed, opt, cfg: TrainConfig, epoch: int, device) -> dict:
    """One epoch on this rank's shard; loss and examples summed over all ranks."""
    import torch.distributed as dist

    net.train()
    # DDP averages gradients over ranks; weighting each rank's mean loss by its share of
    # the step's examples makes that the gradient of the mean over all examples.
    total_loss, total_examples, seconds = fit_epoch(
        net,
        list(net.parameters()),
        feed,
        opt,
        cfg,
        epoch,
        device,
        weights=feed.weights,
        show=feed.rank == 0,
        where=f" on rank {feed.rank}",
    )
    totals = torch.tensor([total_loss, float(total_examples)], dtype=torch.float64)
    if device.type == "cuda":
        totals = totals.to(device)
    dist.all_reduce(totals)
    return epoch_record(float(totals[0]), int(totals[1]), seconds)
