"""The report stage: one Markdown page with plots summarising a run's outputs.

It reads what the other stages published (``prepared/manifest.json`` and the rejects,
``model/``, ``index/manifest.json``, ``metrics.json``) and writes ``report/index.md``
with ``stages.png``, ``training.png``, ``lists.png`` and ``nprobe.png`` beside it. A
stage whose output is missing is reported as not run.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile

from adjoint_spark.storage import Staging, Storage, join, local_path
from adjoint_spark.timing import Timer

logger = logging.getLogger(__name__)

METRIC_KEYS = ("precision", "recall", "ndcg", "map", "micro_recall")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_optional(storage: Storage, uri: str) -> dict | list | None:
    return storage.read_json(uri) if storage.exists(uri) else None


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def stage_seconds(timer_seconds: dict, index: dict | None, metrics: dict | None,
                  model: dict | None) -> dict:  # fmt: skip
    """Seconds per stage: measured in this run when it ran the stage, else as recorded
    by the stage's own output."""
    recorded = {
        "train": (model or {}).get("seconds"),
        "index": (index or {}).get("seconds"),
        "retrieve": (metrics or {}).get("seconds"),
    }
    out = {}
    for stage in ("prepare", "train", "index", "retrieve"):
        value = timer_seconds.get(stage, recorded.get(stage))
        if value is not None:
            out[stage] = float(value)
    return out


def plot_stages(seconds: dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(seconds)))
    names = list(seconds)[::-1]
    ax.barh(names, [seconds[n] for n in names], color="#4c72b0")
    ax.set(xlabel="seconds", title="time per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_lists(sizes: list[int], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(sizes, bins=min(50, max(5, len(sizes) // 4)), color="#55a868")
    ax.set(xlabel="vectors in the list", ylabel="inverted lists", title="inverted list sizes")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_sweep(sweep: list[dict], chosen: int, k: int, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    nprobe = [p["nprobe"] for p in sweep]
    ax.plot(nprobe, [p["recall"] for p in sweep], marker="o", label=f"recall@{k}")
    ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen nprobe {chosen}")
    ax.set(xscale="log", xlabel="nprobe", ylabel=f"recall@{k} against exact search",
           title="index recall by nprobe")  # fmt: skip
    ax2 = ax.twinx()
    ax2.plot(nprobe, [p["queries_per_second"] for p in sweep], marker="s", color="#c44e52")
    ax2.set(ylabel="queries/s (driver)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def rejects_by_reason(spark, prepared: str) -> list[list]:
    from pyspark.sql import functions as F

    rejects = spark.read.parquet(join(prepared, "rejects"))
    rows = rejects.groupBy("table", "reason").agg(F.count("*").alias("n"))
    return [[r["table"], r["reason"], f"{r['n']:,}"] for r in rows.orderBy(F.desc("n")).collect()]


def metric_rows(metrics: dict, ks: tuple[int, ...]) -> list[list]:
    rows = []
    for name, values in (("exact search (train stage)", metrics.get("exact", {})),
                         ("through the index", metrics.get("index", {}))):  # fmt: skip
        cells = [name]
        for k in ks:
            for key in ("precision", "recall", "ndcg", "map"):
                value = values.get(f"{key}@{k}")
                cells.append("" if value is None else f"{value:.4f}")
        value = values.get(f"micro_recall@{max(ks)}")
        cells.append("" if value is None else f"{value:.4f}")
        rows.append(cells)
    return rows


def build_page(spark, output: str, storage: Storage, seconds: dict, out_dir: str) -> str:
    """Write the plots into ``out_dir`` and return the Markdown page."""
    prepared = join(output, "prepared")
    manifest = read_optional(storage, join(prepared, "manifest.json"))
    model = read_optional(storage, join(output, "model", "model.json"))
    index = read_optional(storage, join(output, "index", "manifest.json"))
    metrics = read_optional(storage, join(output, "metrics.json"))
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    lines = [f"# adjoint-spark run report: `{output}`", "", f"Written {now}.", ""]

    lines += ["## Time per stage", ""]
    times = stage_seconds(seconds, index, metrics, model)
    lines += table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in times.items()])
    if times:
        plot_stages(times, os.path.join(out_dir, "stages.png"))
        lines += ["![time per stage](stages.png)", ""]

    lines += ["## Inputs", ""]
    if manifest is None:
        lines += ["The prepare stage has not run.", ""]
    else:
        rows = [[n, f"{t['read']:,}", f"{t['accepted']:,}", f"{t['rejected']:,}"]
                for n, t in manifest["tables"].items()]  # fmt: skip
        lines += table(["table", "read", "accepted", "rejected"], rows)
        split = manifest["split"]
        lines += [
            f"{manifest['num_queries']:,} queries, {manifest['num_items']:,} items; "
            f"{split['num_train']:,} train and {split['num_test']:,} test pairs.",
            "",
        ]
        reasons = rejects_by_reason(spark, prepared)
        if reasons:
            lines += ["Rejected rows by reason:", ""] + table(["table", "reason", "rows"], reasons)

    lines += ["## Training", ""]
    if model is None:
        lines += ["The train stage has not run.", ""]
    else:
        train = model["train"]
        lines += [
            f"Loss `{train['loss']}`, optimiser `{train['optimizer']}` (lr {train['lr']}), "
            f"embedding dim {train['embedding_dim']}, best epoch {model['best_epoch']} "
            f"on `{model.get('device', '?')}`.",
            "",
        ]
        png = join(output, "model", "training.png")
        if storage.exists(png):
            storage.copy_to_local(png, os.path.join(out_dir, "training.png"))
            lines += ["![loss and test metrics per epoch](training.png)", ""]

    lines += ["## Metrics (protocol P1: train items excluded)", ""]
    if metrics is None:
        lines += ["The retrieve stage has not run.", ""]
    else:
        ks = tuple(sorted({int(k.split("@")[1]) for k in metrics["index"] if "@" in k}))
        header = ["ranking"] + [f"{m}@{k}" for k in ks for m in ("P", "R", "NDCG", "MAP")]
        header.append(f"micro R@{max(ks)}")
        lines += table(header, metric_rows(metrics, ks))
        lines += [
            f"{metrics['recommendation_rows']:,} recommendations for "
            f"{metrics['queries_with_recommendations']:,} of {metrics['num_queries']:,} "
            f"queries (top {metrics['top_k']}, nprobe {metrics['nprobe']}).",
            "",
        ]

    lines += ["## Index", ""]
    if index is None:
        lines += ["The index stage has not run.", ""]
    else:
        lines += index_section(index, out_dir)
    return "\n".join(lines)


def index_section(index: dict, out_dir: str) -> list[str]:
    sizes = index["list_sizes"]
    lines = table(
        [
            "factory",
            "dim",
            "ntotal",
            "nlist",
            "nprobe",
            f"recall@{index['recall_k']}",
            "bytes/vector",
            "shards",
            "merge",
        ],  # fmt: skip
        [
            [
                f"`{index['factory']}`",
                index["dim"],
                f"{index['ntotal']:,}",
                index["nlist"],
                index["nprobe"],
                f"{index['nprobe_recall']:.4f}",
                index["bytes_per_vector"],
                index["num_shards"],
                index["merge"],
            ]
        ],
    )
    if index.get("nlist_rule"):
        lines += [f"Requested `{index['requested_factory']}`: {index['nlist_rule']}.", ""]
    lines += [
        f"Inverted list sizes: min {sizes['min']}, median {sizes['median']:.0f}, max "
        f"{sizes['max']} (max/mean {sizes['max_over_mean']:.2f}), std {sizes['std']:.1f}, "
        f"{sizes['empty']} empty. Trained on {index['num_train']:,} vectors; nprobe chosen "
        f"as the smallest reaching recall {index['target_recall']} on "
        f"{index['sweep_queries']:,} sampled queries.",
        "",
    ]
    lines += table(
        ["nprobe", f"recall@{index['recall_k']}", "queries/s (driver)"],
        [
            [p["nprobe"], f"{p['recall']:.4f}", f"{p['queries_per_second']:,.0f}"]
            for p in index["sweep"]
        ],  # fmt: skip
    )
    plot_sweep(index["sweep"], index["nprobe"], index["recall_k"],
               os.path.join(out_dir, "nprobe.png"))  # fmt: skip
    lines += ["![recall and speed by nprobe](nprobe.png)", ""]
    if index.get("list_size_values"):
        plot_lists(index["list_size_values"], os.path.join(out_dir, "lists.png"))
        lines += ["![inverted list sizes](lists.png)", ""]
    return lines


def run_report(spark, config, timer: Timer | None = None, seconds: dict | None = None) -> str:
    """Write and publish ``<output>/report/``; returns the page's path."""
    timer = timer or Timer()
    storage = Storage(spark)
    with timer.phase("report"), Staging(storage, config.output, "report") as stage:
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = local_path(stage.path) or tmp
            page = build_page(spark, config.output, storage, dict(seconds or {}), out_dir)
            with open(os.path.join(out_dir, "index.md"), "w", encoding="utf-8") as fh:
                fh.write(page)
            if out_dir == tmp:
                for name in os.listdir(tmp):
                    storage.copy_from_local(os.path.join(tmp, name), join(stage.path, name))
        path = stage.publish()
    return join(path, "index.md")
