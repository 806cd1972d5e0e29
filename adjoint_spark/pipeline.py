"""Runs the stages of the pipeline in order in one Spark session, and prints a summary."""

from __future__ import annotations

import logging

from adjoint_spark.config import Config
from adjoint_spark.index import run_index
from adjoint_spark.prepare import run_prepare
from adjoint_spark.report import run_report
from adjoint_spark.retrieve import run_retrieve
from adjoint_spark.session import get_spark
from adjoint_spark.timing import Timer
from adjoint_spark.train import run_train

logger = logging.getLogger(__name__)

STAGES = ("prepare", "train", "index", "retrieve", "report")


def summarize_prepare(manifest: dict, path: str) -> str:
    lines = [f"prepared: {path}"]
    for name, t in manifest["tables"].items():
        lines.append(
            f"  {name:<12} read {t['read']:>10,}  accepted {t['accepted']:>10,}"
            f"  rejected {t['rejected']:>8,}"
        )
    split = manifest["split"]
    lines.append(
        f"  queries {manifest['num_queries']:,}, items {manifest['num_items']:,}, "
        f"train pairs {split['num_train']:,}, test pairs {split['num_test']:,}"
    )
    return "\n".join(lines)


def summarize_train(result) -> str:
    m = result.best_metrics
    keys = ("precision@10", "recall@10", "ndcg@10", "map@10", "recall@40", "micro_recall@40")
    metrics = "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)
    return f"model: {result.path} (best epoch {result.best_epoch})\n  {metrics}"


def summarize_index(manifest: dict, path: str) -> str:
    sizes = manifest["list_sizes"]
    return (
        f"index: {path}\n  {manifest['factory']}, {manifest['ntotal']:,} vectors of dim "
        f"{manifest['dim']}, {manifest['num_shards']} shards merged {manifest['merge']}, nprobe "
        f"{manifest['nprobe']} (recall@{manifest['recall_k']} {manifest['nprobe_recall']:.4f}), "
        f"list sizes {sizes['min']}..{sizes['max']}"
    )


def summarize_retrieve(metrics: dict, path: str) -> str:
    m = metrics["index"]
    keys = ("precision@10", "recall@10", "ndcg@10", "map@10", "recall@40", "micro_recall@40")
    shown = "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)
    return (
        f"recommendations: {path} ({metrics['recommendation_rows']:,} rows, "
        f"{metrics['queries_with_recommendations']:,} queries)\n  through the index: {shown}"
    )


def run_stages(config: Config, stages: list[str]) -> int:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    spark = get_spark(config.spark)
    timer = Timer()
    summary = []
    if "prepare" in stages:
        result = run_prepare(spark, config, timer)
        summary.append(summarize_prepare(result.manifest, result.path))
    if "train" in stages:
        trained = run_train(spark, config, timer)
        summary.append(summarize_train(trained))
    if "index" in stages:
        built = run_index(spark, config, timer)
        summary.append(summarize_index(built.manifest, built.path))
    if "retrieve" in stages:
        retrieved = run_retrieve(spark, config, timer)
        summary.append(summarize_retrieve(retrieved.metrics, retrieved.path))
    if "report" in stages:
        summary.append(f"report: {run_report(spark, config, timer, timer_seconds(timer))}")
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in timer_seconds(timer).items())
    summary.append(f"time: {seconds}")
    print("\n".join(summary), flush=True)
    return 0


def timer_seconds(timer: Timer) -> dict[str, float]:
    """Seconds of the top-level phases (the stages) measured so far."""
    return {k: v for k, v in timer.as_dict().items() if "/" not in k}
