"""Index stage speed and memory at 1x, 2x and 4x items; bare-loop limit; retrieval.

Generates items of the original system's shape (55 numeric, 6 categorical, 1 sequence
column) and queries with graded preferences (``adjoint_spark.synth``, 8 latent
dimensions: labels and sequences follow the cosine of latent vectors that the first
numeric columns carry), prepares them once with the prepare job and trains a model
briefly, so recall is measured on vectors of a model that learned something: the bench
reports how close its exact top 40 comes, in latent cosine, to the best possible 40.

The 2x and 4x catalogues repeat the prepared item rows with shifted item_idx/item_id
(their sequences keep pointing at the first copy) and use the trained model with the
item-id table repeated (plus noise), so every item costs the same to embed. Every stage
runs in a child process whose driver (the Python process) and JVM memory are sampled
with times, so peaks are reported per phase. The index stage runs twice in its child
process (:func:`child_index`): speed is reported for both runs, memory for the first.
The index is built with `index.merge=ondisk`; the 1x run also retrieves the top 40
items of every query. The
bare loop reads the same Parquet in one process (pyarrow), embeds with the same tower
and adds to a copy of the same trained index, with 1 and with 2 threads.

    .venv/bin/python bench/index.py [--items 1000000] [--queries 20000] [--scales 1,2,4]
    .venv/bin/python bench/index.py --items 20000 --queries 2000 --scales 1,2  # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adjoint_spark.timing import Timer
from bench.common import OUT, save

CORES = 2
LATENT_DIM = 8
TRAIN = [
    "train.loss=in_batch_softmax",
    "train.num_negatives=0",
    "train.num_popular_negatives=0",
    "train.temperature=0.05",
    "train.optimizer=adam",
    "train.lr=0.002",
    "train.batch_size=512",
    "train.eval_queries=500",
    "train.patience=0",
    "train.threads=1",
    "train.log_every=200",
]
INDEX = ["index.merge=ondisk"]
# Every Parquet file of the items is one Spark partition (files are never packed
# together), so 8, 16 and 32 partitions keep both cores busy at 1x, 2x and 4x.
SPARK_CONF = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.files.openCostInBytes": str(1 << 30),
}


# ---------------------------------------------------------------------------- children


class SpanTimer(Timer):
    """The job's Timer, also keeping the wall-clock span of every phase path."""

    def __init__(self):
        super().__init__()
        self.spans: dict[str, list[float]] = {}
        self._stack: list[str] = []

    @contextlib.contextmanager
    def phase(self, name):
        self._stack.append(name)
        path = "/".join(self._stack)
        self.spans[path] = [time.time(), 0.0]
        try:
            with super().phase(name):
                yield
        finally:
            self.spans[path][1] = time.time()
            self._stack.pop()


def session(driver_memory: str):
    from bench.common import local_session

    spark = local_session("bench-index", driver_memory=driver_memory)
    for key, value in SPARK_CONF.items():
        spark.conf.set(key, value)
    return spark


def child_prepare(config_path: str, driver_memory: str) -> dict:
    from adjoint_spark.config import load_config
    from adjoint_spark.prepare import run_prepare

    run_prepare(session(driver_memory), load_config(config_path))
    return {}


def child_train(config_path: str, driver_memory: str, epochs: str) -> dict:
    from adjoint_spark.config import load_config
    from adjoint_spark.train import run_train

    config = load_config(config_path, [*TRAIN, f"train.epochs={epochs}"])
    result = run_train(session(driver_memory), config)
    return {
        "best_epoch": result.best_epoch,
        "metrics": result.best_metrics,
        "history": result.history,
    }


def child_index(config_path: str, driver_memory: str, retrieve: str) -> dict:
    """The index stage (and retrieve); the trained index is kept for the bare loop.

    The stage runs twice in the same process: first as a job run alone meets it (a new
    JVM, Python workers that have imported torch and faiss but built no tower), then
    again as a pipeline or a larger catalogue meets it, with the JVM's code compiled and
    each worker's tower built: the second run's embed + add is the rate that scales."""
    import faiss

    import adjoint_spark.index as index_module
    from adjoint_spark.config import load_config
    from adjoint_spark.retrieve import run_retrieve

    spark = session(driver_memory)
    config = load_config(config_path, INDEX)
    trained_path = os.path.join(config.output, "bench-trained.faiss")
    train_index = index_module.train_index

    def keep_trained(vectors, plan):
        index = train_index(vectors, plan)
        faiss.write_index(index, trained_path)
        return index

    index_module.train_index = keep_trained
    warm_up = start_workers(spark)
    timer = SpanTimer()
    manifest = index_module.run_index(spark, config, timer).manifest
    again = SpanTimer()
    index_module.run_index(spark, config, again)
    metrics = run_retrieve(spark, config, timer).metrics if retrieve == "1" else None
    items = spark.read.parquet(os.path.join(config.output, "prepared", "items"))
    out = {
        "phases": timer.as_dict(),
        "spans": timer.spans,
        "again": {"phases": again.as_dict(), "spans": again.spans},
        "index": manifest,
        "retrieve": metrics,
        "item_partitions": items.rdd.getNumPartitions(),
        "worker_start_seconds": warm_up,
    }
    out["index"].pop("list_size_values", None)
    spark.stop()
    return out


def start_workers(spark) -> float:
    """Start the Python workers (torch and faiss imported) before the stage is timed, as
    the bare loop's imports are outside its time; in the pipeline job the stages before
    the index stage have started them. Returns the seconds it took."""

    def imports(frames):
        import faiss  # noqa: F401
        import torch  # noqa: F401

        for frame in frames:
            yield frame.head(0)

    start = time.perf_counter()
    spark.range(4 * CORES, numPartitions=4 * CORES).mapInPandas(imports, "id long").collect()
    return round(time.perf_counter() - start, 3)


def child_spark_io(config_path: str, driver_memory: str) -> dict:
    """Where the Spark embed and add phases spend their time: the same reads with work
    left out (rows only moved to pandas; embedded without writing)."""
    import numpy as np
    import pandas as pd

    from adjoint_spark.config import load_config
    from adjoint_spark.embed import ModelArtifact, embed_rows, frame_to_batch
    from adjoint_spark.storage import Storage

    spark = session(driver_memory)
    config = load_config(config_path)
    items = spark.read.parquet(os.path.join(config.output, "prepared", "items"))
    vectors = spark.read.parquet(os.path.join(config.output, "vectors", "items"))
    model = ModelArtifact.read(Storage(spark), config.output)
    payload = model.ship_tower(spark, "item")

    def count(frames):
        yield pd.DataFrame({"n": [sum(len(f) for f in frames)]})

    def stacked(frames):
        n = 0
        for frame in frames:
            n += len(frame_to_batch(frame, ["num", "cat", "seq_seq0"], "item_idx")["idx"])
        yield pd.DataFrame({"n": [n]})

    def vectors_stacked(frames):
        n = 0
        for frame in frames:
            n += len(np.stack(frame["embedding"].to_numpy()))
        yield pd.DataFrame({"n": [n]})

    embedded = embed_rows(items, payload, "item", model.embedding_dim, config.index.batch_size)
    jobs = {
        "items to pandas": items.mapInPandas(count, "n long"),
        "items to pandas + tensors (frame_to_batch)": items.mapInPandas(stacked, "n long"),
        "items embedded, not written": embedded.mapInPandas(count, "n long"),
        "vectors to pandas": vectors.mapInPandas(count, "n long"),
        "vectors to pandas + np.stack": vectors.mapInPandas(vectors_stacked, "n long"),
    }
    items.limit(10).mapInPandas(count, "n long").collect()  # start the Python workers
    out = {}
    for name, frame in jobs.items():
        start = time.perf_counter()
        rows = sum(r["n"] for r in frame.collect())
        out[name] = {"seconds": round(time.perf_counter() - start, 3), "rows": rows}
    spark.stop()
    return out


def child_bare(run: str, threads: str) -> dict:
    """Read, embed, add in one process: the limit of this machine for the same work."""
    import faiss
    import numpy as np
    import pyarrow.parquet as pq

    from adjoint_spark.config import IndexConfig
    from adjoint_spark.embed import ModelArtifact, build_tower, embed_frame, set_threads

    set_threads(int(threads))
    with open(os.path.join(run, "model", "model.json")) as fh:
        info = json.load(fh)
    model = ModelArtifact.read_file("model", info, os.path.join(run, "model", "model.pt"))
    tower = build_tower(model.tower_payload("item"), model.tower_tables("item"))
    index = faiss.read_index(os.path.join(run, "bench-trained.faiss"))
    batch_size, rows = IndexConfig().batch_size, 10_000  # Spark's Arrow batches: 10,000
    seconds = {"read": 0.0, "embed": 0.0, "add": 0.0}
    start = time.perf_counter()
    for path in sorted(glob.glob(os.path.join(run, "prepared", "items", "*.parquet"))):
        batches = pq.ParquetFile(path).iter_batches(batch_size=rows)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            frame = batch.to_pandas()
            t1 = time.perf_counter()
            vectors = embed_frame(tower, frame, batch_size)
            t2 = time.perf_counter()
            index.add_with_ids(vectors, frame["item_idx"].to_numpy(np.int64))
            t3 = time.perf_counter()
            for key, a, b in (("read", t0, t1), ("embed", t1, t2), ("add", t2, t3)):
                seconds[key] += b - a
    total = time.perf_counter() - start
    return {
        "threads": int(threads),
        "items": int(index.ntotal),
        "seconds": round(total, 3),
        "items_per_second": round(index.ntotal / total, 1),
        "phase_seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def child_recall(run: str, nprobes: str) -> dict:
    """Where recall@40 is lost: the built index's IVF-SQ8 codes, IVF-Flat on the same
    centroids, and SQ8 without IVF, against exact search on 1,000 query vectors."""
    import faiss
    import numpy as np

    from adjoint_spark.embed import set_threads
    from adjoint_spark.index import index_recall

    set_threads(1)
    item_ids, ids, x = read_vectors(os.path.join(run, "vectors", "items"), with_ids=True)
    query_ids, _, q = read_vectors(os.path.join(run, "vectors", "queries"), with_ids=True)
    sample = np.random.default_rng(7).choice(len(q), min(1000, len(q)), replace=False)
    q, query_ids = q[sample], query_ids[sample]
    exact_ids, exact_scores = exact_top(q, x, ids, 41)
    truth = list(exact_ids[:, :40])
    ip = faiss.METRIC_INNER_PRODUCT
    built = faiss.read_index(os.path.join(run, "bench-trained.faiss"))
    ivf = faiss.extract_index_ivf(built)
    flat = faiss.IndexIVFFlat(faiss.clone_index(ivf.quantizer), x.shape[1], ivf.nlist, ip)
    sq8 = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_8bit, ip)
    sq8.train(x)
    spread = {
        "s1_minus_s40": float(np.median(exact_scores[:, 0] - exact_scores[:, 39])),
        "s40_minus_s41": float(np.median(exact_scores[:, 39] - exact_scores[:, 40])),
    }
    out = {
        "queries": len(q),
        "exact_score_gaps_median": spread,
        "latent_cosine_top40": learned(query_ids, item_ids, ids, exact_ids[:, :40]),
    }
    variants = {"IVF-SQ8 (built)": built, "IVF-Flat, same centroids": flat,
                "SQ8 without IVF": faiss.IndexIDMap(sq8)}  # fmt: skip
    for name, index in variants.items():
        index.add_with_ids(x, ids)
        points = {}
        for nprobe in [int(n) for n in nprobes.split(",")] if "IVF-" in name else [0]:
            if nprobe:
                faiss.extract_index_ivf(index).nprobe = nprobe
            _, found = index.search(q, 40)
            points[nprobe or "all"] = round(index_recall(found, truth, 40), 4)
        out[name] = points
    return out


def learned(query_ids, item_ids, idx, top) -> dict:
    """How much of the planted preferences the model learned: the mean latent cosine
    (query, item) of its exact top 40, of the best possible 40 and of random items."""
    import numpy as np

    from adjoint_spark.synth import LATENT_SEEDS, latents

    num_items = int(item_ids.max()) + 1
    item_latent = latents(num_items, LATENT_DIM, LATENT_SEEDS["items"])
    query_latent = latents(int(query_ids.max()) + 1, LATENT_DIM, LATENT_SEEDS["queries"])
    lq = query_latent[query_ids]
    by_idx = np.zeros((int(idx.max()) + 1, LATENT_DIM), np.float32)
    by_idx[idx] = item_latent[item_ids]
    model = float(np.einsum("qd,qkd->qk", lq, by_idx[top]).mean())
    _, best = exact_top(lq, item_latent, np.arange(num_items), top.shape[1])
    rng = np.random.default_rng(11)
    random = float((lq @ item_latent[rng.choice(num_items, 1000, replace=False)].T).mean())
    return {"model_exact_top40": round(model, 4), "best_possible_top40": round(float(
        best.mean()), 4), "random_items": round(random, 4)}  # fmt: skip


def read_vectors(path: str, with_ids: bool = False):
    """(idx, (N, D) float32 vectors) of a vectors/ Parquet folder; with the entity ids
    (the row numbers of the generated text files) first when ``with_ids``."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "idx", "embedding"])
    column = table["embedding"].combine_chunks()
    x = column.flatten().to_numpy().astype(np.float32).reshape(len(table), -1)
    idx = table["idx"].to_numpy().astype(np.int64)
    if with_ids:
        return table["id"].to_numpy().astype(np.int64), idx, np.ascontiguousarray(x)
    return idx, np.ascontiguousarray(x)


def exact_top(q, x, ids, k: int, chunk: int = 50_000):
    """Exact top-k ids and scores (inner product), best first."""
    import numpy as np

    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(x), chunk):
        part = ids[start : start + chunk]
        s = np.concatenate([best_s, q @ x[start : start + chunk].T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(part, (len(q), len(part)))], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1)


CHILDREN = {
    "prepare": child_prepare,
    "train": child_train,
    "index": child_index,
    "bare": child_bare,
    "recall": child_recall,
    "spark_io": child_spark_io,
}


def child(mode: str, result_path: str, args: list[str]) -> None:
    from adjoint_spark.session import setup_logging

    setup_logging("INFO")
    result = CHILDREN[mode](*args)
    with open(result_path, "w") as fh:
        json.dump(result, fh, indent=1)


# ---------------------------------------------------------------------------- measuring


class Timeline:
    """RSS of a process (the driver), its largest Python child and its JVM, with times;
    also the driver's anonymous RSS (without memory-mapped files such as index shards)."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, ...]] = []
        self._cpu: dict[int, float] = {}  # CPU seconds of every process of the tree seen
        self._busy = system_busy()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[float, ...]:
        import psutil

        now, root = time.time(), self.root.memory_info().rss
        with open(f"/proc/{self.root.pid}/status") as fh:
            anon = next((int(ln.split()[1]) << 10 for ln in fh if ln.startswith("RssAnon:")), 0)
        python = jvm = total = 0
        self._cpu[self.root.pid] = sum(self.root.cpu_times()[:2])
        for proc in self.root.children(recursive=True):
            try:
                rss, name = proc.memory_info().rss, proc.name()
                self._cpu[proc.pid] = sum(proc.cpu_times()[:2])
            except psutil.NoSuchProcess:
                continue
            total += rss
            if name.startswith("java"):
                jvm = max(jvm, rss)
            elif name.startswith("python"):
                python = max(python, rss)
        return now, root, python, jvm, total + root, anon

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                return
            time.sleep(self.interval)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.time() - self.samples[0][0] if self.samples else 0.0
        self.others_cpu = system_busy() - self._busy - sum(self._cpu.values())

    def cpu(self) -> dict[str, float]:
        """CPU seconds of the process tree, and cores used by other processes meanwhile."""
        return {
            "tree_cpu_seconds": round(sum(self._cpu.values()), 1),
            "other_processes_cores": round(max(0.0, self.others_cpu) / self.seconds, 2),
        }

    def peaks(self, start: float = 0.0, end: float = float("inf")) -> dict[str, float]:
        inside = [s for s in self.samples if start <= s[0] <= end] or [(0,) * 6]
        mib = 1 << 20
        names = ("driver_mib", "python_worker_mib", "jvm_mib", "total_mib", "driver_anon_mib")
        return {n: round(max(s[i + 1] for s in inside) / mib, 1) for i, n in enumerate(names)}


def system_busy() -> float:
    """CPU seconds all cores spent outside idle and I/O wait since boot."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - t.iowait - t.guest - t.guest_nice


def run_child(folder: str, name: str, mode: str, *args: str) -> tuple[dict, Timeline, float]:
    """Run one child with its log in ``folder``; its result, memory timeline, seconds."""
    result_path = os.path.join(folder, f"{name}.json")
    log_path = os.path.join(folder, f"{name}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, result_path, *args]
    print(f"{name}: {mode} {' '.join(args)} (log {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with Timeline(proc.pid) as timeline:
            code = proc.wait()
    seconds = time.perf_counter() - start
    if code:
        sys.exit(f"{name} failed (exit {code}): see {log_path}")
    with open(result_path) as fh:
        return json.load(fh), timeline, seconds


# ---------------------------------------------------------------------------- data


def write_config(folder: str, run: str, args) -> str:
    """Generate the seed data set (once) and a config whose output is ``run``."""
    import yaml

    from adjoint_spark.synth import (
        SEED_ITEM_SHAPE,
        SEED_QUERY_SHAPE,
        seed_config,
        write_seed_dataset,
    )

    data = os.path.join(folder, "in")
    names = ("queries", "items", "labels", "test_labels")
    paths = {n: os.path.join(data, f"{n}.txt") for n in names}
    if not os.path.exists(data):
        start = time.perf_counter()
        write_seed_dataset(
            data + ".tmp",
            args.queries,
            args.items,
            args.pairs_per_query,
            test_pairs_per_query=2,
            latent_dim=LATENT_DIM,
        )
        os.rename(data + ".tmp", data)
        print(f"generated {data} in {time.perf_counter() - start:.0f} s", flush=True)
    config = seed_config(paths, run, SEED_QUERY_SHAPE, SEED_ITEM_SHAPE, num_partitions=8)
    path = os.path.join(run, "config.yaml")
    os.makedirs(run, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(config, fh)
    return path


def scale_items(base: str, run: str, scale: int) -> None:
    """``run/prepared``: the base items ``scale`` times (shifted ids), the rest linked."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    src, dst = os.path.join(base, "prepared"), os.path.join(run, "prepared")
    with open(os.path.join(src, "manifest.json")) as fh:
        manifest = json.load(fh)
    n = manifest["num_items"]
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "items"))
    files = sorted(glob.glob(os.path.join(src, "items", "*.parquet")))
    for copy in range(scale):
        for i, path in enumerate(files):
            table = pq.read_table(path)
            for column in ("item_idx", "item_id"):
                values = table[column]
                shifted = pc.add(values, pa.scalar(copy * n, values.type))
                table = table.set_column(table.schema.get_field_index(column), column, shifted)
            name = f"part-{copy * len(files) + i:05d}.snappy.parquet"
            pq.write_table(table, os.path.join(tmp, "items", name), row_group_size=len(table))
    for name in ("queries", "train_pairs", "test_pairs"):
        os.symlink(os.path.join(src, name), os.path.join(tmp, name))
    manifest["num_items"], manifest["item_vocab_size"] = scale * n, scale * n + 1
    for key in ("read", "accepted"):
        manifest["tables"]["items"][key] *= scale
    with open(os.path.join(tmp, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    os.rename(tmp, dst)


def scale_model(base: str, run: str, scale: int) -> None:
    """``run/model``: the base model with its item-id table repeated ``scale`` times."""
    import torch

    with open(os.path.join(base, "model", "model.json")) as fh:
        info = json.load(fh)
    with open(os.path.join(run, "prepared", "manifest.json")) as fh:
        manifest = json.load(fh)
    state = torch.load(os.path.join(base, "model", "model.pt"), weights_only=True)
    table = state["item_table.weight"]
    generator = torch.Generator().manual_seed(scale)
    copies = [
        table[1:] + 0.01 * torch.randn(table[1:].shape, generator=generator)
        for _ in range(scale - 1)
    ]
    tiled = torch.cat([table, *copies])
    for key in [k for k in state if k.endswith("item_table.weight")]:
        state[key] = tiled
    info.update(
        num_items=manifest["num_items"],
        item_vocab_size=manifest["item_vocab_size"],
        metrics={},
        best_epoch=0,
    )
    tmp = os.path.join(run, "model.tmp")
    os.makedirs(tmp, exist_ok=True)
    torch.save(state, os.path.join(tmp, "model.pt"))
    with open(os.path.join(tmp, "model.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    os.rename(tmp, os.path.join(run, "model"))


def check_artifacts(run: str) -> None:
    """The scaled model loads into the model of the scaled manifest and matches it."""
    import torch

    from adjoint_spark.embed import ModelArtifact
    from adjoint_spark.model import TowerShape, TowerSpec, TwoTower

    with open(os.path.join(run, "model", "model.json")) as fh:
        info = json.load(fh)
    with open(os.path.join(run, "prepared", "manifest.json")) as fh:
        manifest = json.load(fh)
    ModelArtifact("model", info, {}, "", "", (0, 0, 0)).check_prepared(manifest, "manifest.json")
    model = TwoTower(
        TowerSpec.from_manifest(manifest, "query"),
        TowerSpec.from_manifest(manifest, "item"),
        TowerShape(**info["query_tower"]),
        TowerShape(**info["item_tower"]),
        num_items=manifest["num_items"],
    )
    model.load_state_dict(torch.load(os.path.join(run, "model", "model.pt"), weights_only=True))


# ---------------------------------------------------------------------------- report


def case(result: dict, timeline: Timeline, seconds: float, n: int) -> dict:
    """Seconds, items per second and memory peaks (whole stage and per phase)."""
    p, spans = result["phases"], result["spans"]
    merge_only = p["index/merge"] - p["index/merge/check"] - p["index/merge/sweep"]
    embed_add = p["index/embed"] + p["index/shards"]
    again = result["again"]["phases"]
    embed_add_again = again["index/embed"] + again["index/shards"]
    build = embed_add + p["index/train"] + merge_only
    peaks = {
        name: timeline.peaks(*spans[f"index/{name}"])
        for name in ("embed", "train", "shards", "merge")
    }
    peaks["setup"] = timeline.peaks(spans["index"][0], spans["index/embed"][0])
    return {
        "items": n,
        "item_partitions": result["item_partitions"],
        "worker_start_seconds": result["worker_start_seconds"],
        "shards": result["index"]["num_shards"],
        "seconds": {
            "embed": p["index/embed"],
            "train": p["index/train"],
            "shards": p["index/shards"],
            "merge": round(merge_only, 3),
            "check": p["index/merge/check"],
            "sweep": p["index/merge/sweep"],
            "index_stage": p["index"],
            "embed_add": round(embed_add, 3),
            "embed_again": again["index/embed"],
            "shards_again": again["index/shards"],
            "embed_add_again": round(embed_add_again, 3),
            "index_stage_again": again["index"],
            "build": round(build, 3),
            "child_process": round(seconds, 1),
        },
        "items_per_second_embed_add": round(n / embed_add, 1),
        "items_per_second_embed_add_per_core": round(n / embed_add / CORES, 1),
        "items_per_second_embed_add_again": round(n / embed_add_again, 1),
        "items_per_second_embed_add_again_per_core": round(n / embed_add_again / CORES, 1),
        "items_per_second_build": round(n / build, 1),
        "items_per_second_index_stage": round(n / p["index"], 1),
        "peak_index_stage": timeline.peaks(*spans["index"]),
        "cpu": timeline.cpu(),
        "peak_by_phase": peaks,
        "index": {
            k: result["index"][k]
            for k in (
                "factory",
                "nlist",
                "num_train",
                "nprobe",
                "nprobe_recall",
                "recall_k",
                "merge",
                "bytes_per_vector",
                "sweep",
                "list_sizes",
                "sweep_queries",
            )
        },
    }


def ratios(cases: dict) -> dict:
    """Per scale against 1x: seconds per item (1.0 = linear) and peak memory."""
    base = cases["1x"]
    out = {}
    previous = None
    keys = ("embed_add", "embed_add_again", "build", "index_stage")
    for name, c in cases.items():
        scale = c["items"] / base["items"]
        per_item = {k: round(c["seconds"][k] / (scale * base["seconds"][k]), 3) for k in keys}
        # The cost of each item added since the previous scale, against the 1x cost per
        # item: fixed costs (start-up, the 1M-vector quantizer training) drop out of it.
        marginal = {
            k: round(
                (c["seconds"][k] - previous["seconds"][k])
                / (c["items"] - previous["items"])
                / (base["seconds"][k] / base["items"]),
                3,
            )
            if previous
            else None
            for k in keys
        }
        previous = c

        def peak(get, c=c):
            return round(get(c) / get(base), 3)

        out[name] = {
            "seconds_per_item_vs_1x": per_item,
            "marginal_seconds_per_item_vs_1x": marginal,
            "peak_driver_vs_1x": peak(lambda x: x["peak_index_stage"]["driver_mib"]),
            "peak_driver_merge_vs_1x": peak(lambda x: x["peak_by_phase"]["merge"]["driver_mib"]),
            "peak_driver_anon_vs_1x": peak(lambda x: x["peak_index_stage"]["driver_anon_mib"]),
            "peak_jvm_vs_1x": peak(lambda x: x["peak_index_stage"]["jvm_mib"]),
        }
    return out


def retrieval(result: dict) -> dict:
    m, p, index = result["retrieve"], result["phases"], result["index"]
    chosen = next(s for s in index["sweep"] if s["nprobe"] == index["nprobe"])
    return {
        "queries": m["num_queries"],
        "search_seconds": p["retrieve/search"],
        "embed_seconds": p["retrieve/embed"],
        "queries_per_second": round(m["num_queries"] / p["retrieve/search"], 1),
        "queries_per_second_per_core": round(m["num_queries"] / p["retrieve/search"] / CORES, 1),
        "queries_per_second_embed_search": round(
            m["num_queries"] / (p["retrieve/search"] + p["retrieve/embed"]), 1
        ),
        "nprobe": index["nprobe"],
        f"index_recall@{index['recall_k']}": index["nprobe_recall"],
        "sweep_queries_per_second_at_nprobe": chosen["queries_per_second"],
        "metrics_through_index": m["index"],
        "metrics_exact_train_stage": m["exact"],
    }


def machine() -> dict:
    import platform

    import psutil

    with open("/proc/cpuinfo") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "spark_master": f"local[{CORES}]",
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "note": "2 shared cores (another developer runs tests): compare ratios measured "
        "inside one run, not absolute figures across runs",
    }


# Rows of the scale table: label, value from (case, its ratios to 1x).
SCALE_ROWS = [
    ("items", lambda c, r: f"{c['items']:,}"),
    ("item partitions / shards", lambda c, r: f"{c['item_partitions']} / {c['shards']}"),
    ("Python workers started before the stage, s", lambda c, r: c["worker_start_seconds"]),
    *[
        (f"{k} s", lambda c, r, k=k: c["seconds"][k])
        for k in ("embed", "train", "shards", "merge", "check", "sweep", "index_stage")
    ],
    ("**items/s embed + add**", lambda c, r: f"**{c['items_per_second_embed_add']:,.0f}**"),
    (
        "items/s embed + add per core",
        lambda c, r: f"{c['items_per_second_embed_add_per_core']:,.0f}",
    ),
    *[
        (f"{k} s, second run in the process", lambda c, r, k=k: c["seconds"][f"{k}_again"])
        for k in ("embed", "shards", "index_stage")
    ],
    (
        "**items/s embed + add, second run**",
        lambda c, r: f"**{c['items_per_second_embed_add_again']:,.0f}**",
    ),
    (
        "items/s embed + add per core, second run",
        lambda c, r: f"{c['items_per_second_embed_add_again_per_core']:,.0f}",
    ),
    ("items/s embed + train + add + merge", lambda c, r: f"{c['items_per_second_build']:,.0f}"),
    ("items/s whole index stage", lambda c, r: f"{c['items_per_second_index_stage']:,.0f}"),
    *[
        (f"s per item vs 1x: {k}", lambda c, r, k=k: r["seconds_per_item_vs_1x"][k])
        for k in ("embed_add", "embed_add_again", "build", "index_stage")
    ],
    *[
        (
            f"s per item added since the previous scale vs 1x: {k}",
            lambda c, r, k=k: r["marginal_seconds_per_item_vs_1x"][k] or "-",
        )
        for k in ("embed_add", "embed_add_again", "build", "index_stage")
    ],
    ("peak driver RSS MiB", lambda c, r: c["peak_index_stage"]["driver_mib"]),
    ("**peak driver RSS vs 1x**", lambda c, r: f"**{r['peak_driver_vs_1x']}**"),
    *[
        (f"peak driver RSS in {ph} MiB", lambda c, r, ph=ph: c["peak_by_phase"][ph]["driver_mib"])
        for ph in ("setup", "embed", "train", "shards", "merge")
    ],
    ("peak driver RSS in merge vs 1x", lambda c, r: r["peak_driver_merge_vs_1x"]),
    ("peak driver anonymous RSS MiB", lambda c, r: c["peak_index_stage"]["driver_anon_mib"]),
    ("peak driver anonymous RSS vs 1x", lambda c, r: r["peak_driver_anon_vs_1x"]),
    (
        "peak driver anonymous RSS in merge MiB",
        lambda c, r: c["peak_by_phase"]["merge"]["driver_anon_mib"],
    ),
    ("peak JVM RSS MiB", lambda c, r: c["peak_index_stage"]["jvm_mib"]),
    ("peak JVM RSS vs 1x", lambda c, r: r["peak_jvm_vs_1x"]),
    ("peak Python worker RSS MiB", lambda c, r: c["peak_index_stage"]["python_worker_mib"]),
    ("cores taken by other processes", lambda c, r: c["cpu"]["other_processes_cores"]),
    (
        "nprobe / recall@40 (sweep)",
        lambda c, r: f"{c['index']['nprobe']} / {c['index']['nprobe_recall']}",
    ),
]


def markdown(result: dict) -> str:
    cases, ratio, m = result["cases"], result["ratios"], result["machine"]
    lines = [
        f"# Index stage: {cases['1x']['index']['factory']}, local[{CORES}], merge on disk",
        "",
        f"Run of {result['wall_seconds']:.0f} s on {m['cpu']}, {m['cores']} cores, "
        f"{m['ram_gib']} GiB; {m['note']}.",
        "",
        "| | " + " | ".join(cases) + " |",
        "|---|" + "---|" * len(cases),
    ]
    for label, get in SCALE_ROWS:
        values = [str(get(cases[n], ratio[n])) for n in cases]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    lines += bare_lines(result) + retrieval_lines(result)
    lines += ["", f"Training of the 1x model: {result['train']}", ""]
    return "\n".join(lines)


def bare_lines(result: dict) -> list[str]:
    spark = result["cases"]["1x"]
    lines = [
        "",
        "## Against the bare loop (1x: read + embed + add in one process)",
        "",
        "| | items/s | per core | read s | embed s | add s | peak RSS MiB | other cores |",
        "|---|---|---|---|---|---|---|---|",
        f"| Spark local[{CORES}], embed + add | {spark['items_per_second_embed_add']:,.0f} | "
        f"{spark['items_per_second_embed_add_per_core']:,.0f} | | | | "
        f"{spark['peak_index_stage']['total_mib']} (process tree) | "
        f"{spark['cpu']['other_processes_cores']} |",
    ]
    for b in result["bare"].values():
        s, rate = b["phase_seconds"], b["items_per_second"]
        lines.append(
            f"| bare loop, {b['threads']} thread(s) | {rate:,.0f} | {rate / b['threads']:,.0f} | "
            f"{s['read']:.1f} | {s['embed']:.1f} | {s['add']:.1f} | {b['peak_mib']} | "
            f"{b['other_processes_cores']} |"
        )
    lines += [""] + [f"- {k}: **{v}**" for k, v in result["spark_over_bare"].items()]
    lines += ["", "Spark jobs over the same 1x rows with work left out (seconds, local[2]):", ""]
    return lines + [f"- {k}: {v['seconds']} s" for k, v in result["spark_io"].items()]


def retrieval_lines(result: dict) -> list[str]:
    ret = result["retrieval"]
    sweep = result["cases"]["1x"]["index"]["sweep"]
    points = ", ".join(
        f"{s['nprobe']}: {s['recall']} ({s['queries_per_second']:,.0f}/s)" for s in sweep
    )
    return [
        "",
        "## Retrieval (1x, trained model)",
        "",
        *[f"- {k}: {v}" for k, v in ret.items() if not k.startswith("metrics")],
        f"- sweep, nprobe: recall@40 (queries/s on the driver, 2 threads): {points}",
        f"- through the index: {_short(ret['metrics_through_index'])}",
        f"- exact (train stage): {_short(ret['metrics_exact_train_stage'])}",
        "",
        "## Where recall@40 is lost (1x, 1,000 query vectors, exact search as truth)",
        "",
        *[f"- {k}: {v}" for k, v in result["recall_loss"].items()],
    ]


def _short(metrics: dict) -> str:
    keys = ("recall@10", "ndcg@10", "recall@40")
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


# ---------------------------------------------------------------------------- main


def build_base(folder: str, base: str, args) -> dict:
    """Prepared data and a trained model at 1x (both kept between runs)."""
    config = write_config(folder, base, args)
    if not os.path.exists(os.path.join(base, "prepared", "manifest.json")):
        _, _, seconds = run_child(folder, "prepare", "prepare", config, args.driver_memory)
        print(f"prepared in {seconds:.0f} s", flush=True)
    if not os.path.exists(os.path.join(base, "model", "model.json")):
        out, _, seconds = run_child(
            folder, "train", "train", config, args.driver_memory, str(args.epochs)
        )
        with open(os.path.join(folder, "train-summary.json"), "w") as fh:
            json.dump(
                {
                    "seconds": round(seconds, 1),
                    "epochs": args.epochs,
                    "best_epoch": out["best_epoch"],
                    "examples_per_second": [h["examples_per_second"] for h in out["history"]],
                    "metrics": out["metrics"],
                },
                fh,
            )
    with open(os.path.join(folder, "train-summary.json")) as fh:
        summary = json.load(fh)
    summary["metrics"] = _short(summary["metrics"])
    return summary


def run_scale(folder: str, base: str, scale: int, args) -> tuple[dict, Timeline, float]:
    run = base if scale == 1 else os.path.join(folder, f"run-{scale}x")
    if scale > 1 and not os.path.exists(os.path.join(run, "model", "model.json")):
        start = time.perf_counter()
        os.makedirs(run, exist_ok=True)
        if not os.path.exists(os.path.join(run, "prepared")):
            scale_items(base, run, scale)
        scale_model(base, run, scale)
        check_artifacts(run)
        print(f"built the {scale}x catalogue in {time.perf_counter() - start:.0f} s", flush=True)
    config = write_config(folder, run, args)
    retrieve = "1" if scale == 1 else "0"
    return run_child(folder, f"index-{scale}x", "index", config, args.driver_memory, retrieve)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--pairs-per-query", type=int, default=5)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--scales", default="1,2,4")
    p.add_argument("--driver-memory", default="6g")
    p.add_argument("--child", nargs="+", metavar="ARG")
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2:])
        return

    start = time.perf_counter()
    folder = os.path.join(OUT, f"index-{args.items}-{args.queries}-g{LATENT_DIM}")
    base = os.path.join(folder, "run-1x")
    os.makedirs(folder, exist_ok=True)
    result = {"machine": machine(), "train": build_base(folder, base, args), "cases": {}}
    scales = [int(s) for s in args.scales.split(",")]
    assert scales[0] == 1, "the first scale must be 1 (the others are compared with it)"
    for scale in scales:
        out, timeline, seconds = run_scale(folder, base, scale, args)
        result["cases"][f"{scale}x"] = case(out, timeline, seconds, scale * args.items)
        if scale == 1:
            result["retrieval"] = retrieval(out)
        print(json.dumps(result["cases"][f"{scale}x"]["seconds"]), flush=True)
    result["bare"] = {}
    for threads in (1, CORES):
        out, timeline, _ = run_child(folder, f"bare-{threads}", "bare", base, str(threads))
        peak = timeline.peaks()["driver_mib"]
        result["bare"][f"{threads} thread(s)"] = {**out, "peak_mib": peak, **timeline.cpu()}
    spark = result["cases"]["1x"]["items_per_second_embed_add"]
    bare = {k: v["items_per_second"] for k, v in result["bare"].items()}
    best = max(bare, key=bare.get)
    again = result["cases"]["1x"]["items_per_second_embed_add_again"]
    result["spark_over_bare"] = {
        f"Spark embed + add / best bare loop in one process ({best}) (target >= 0.6)": round(
            spark / bare[best], 3
        ),
        f"Spark embed + add, second run in the process / best bare loop ({best})": round(
            again / bare[best], 3
        ),
        **{f"Spark embed + add / bare loop {k}": round(spark / v, 3) for k, v in bare.items()},
        f"Spark embed + add / ({CORES} x bare loop 1 thread)": round(
            spark / (CORES * bare["1 thread(s)"]), 3
        ),
    }
    result["ratios"] = ratios(result["cases"])
    names = list(result["cases"])
    if len(names) > 1:
        # Items added between the two largest scales over the seconds they added: the
        # rate without the stage's fixed costs (tasks' tower loading, scheduling).
        a, b = (result["cases"][n] for n in names[-2:])
        for key, run in (("embed_add", "first"), ("embed_add_again", "second")):
            added = (b["items"] - a["items"]) / (b["seconds"][key] - a["seconds"][key])
            result["spark_over_bare"][
                f"Spark embed + add ({run} run), items added {names[-2]} -> {names[-1]} over "
                f"the seconds added ({added:,.0f} items/s) / best bare loop"
            ] = round(added / bare[best], 3)
    index = result["cases"]["1x"]["index"]
    nprobes = sorted(
        {min(n, index["nlist"]) for n in (index["nprobe"], 4 * index["nprobe"], 10**9)}
    )
    nprobes = ",".join(map(str, nprobes))
    result["recall_loss"], _, _ = run_child(folder, "recall", "recall", base, nprobes)
    config = os.path.join(base, "config.yaml")
    result["spark_io"], _, _ = run_child(folder, "spark-io", "spark_io", config, args.driver_memory)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["machine"]["load_average_end"] = os.getloadavg()
    print(f"saved {save('index', result)}")
    path = os.path.join(OUT, "index.md")
    with open(path, "w") as fh:
        fh.write(markdown(result))
    print(open(path).read())


if __name__ == "__main__":
    main()
