"""The index and retrieve stages end to end on small generated data, their outputs
checked against exact references, and the artifacts they refuse."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from adjoint_spark.embed import (
    TABLES,
    ModelArtifact,
    build_tower,
    embed_rows,
)
from adjoint_spark.feed import load_features
from adjoint_spark.index import run_index
from adjoint_spark.metrics import evaluate_top_k
from adjoint_spark.report import run_report
from adjoint_spark.retrieve import run_retrieve, spark_ranking_metrics, top_k_unseen
from adjoint_spark.storage import ArtifactError, Storage
from adjoint_spark.train import build_model

from .pipeline_data import config_for


def read(spark, config, name: str) -> pd.DataFrame:
    return spark.read.parquet(os.path.join(config.output, name)).toPandas()


def test_every_output_is_published(spark, pipeline_run):
    _, config = pipeline_run
    out = config.output
    for name in ("vectors/items", "vectors/queries", "recommendations", "index", "report"):
        assert os.path.isdir(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, "_staging")) == []
    with open(os.path.join(out, "index", "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["ntotal"] == 900 and manifest["factory"] == "IVF23,SQ8"
    assert "nlist lowered to 23" in manifest["nlist_rule"]
    assert manifest["metric"] == "inner_product" and manifest["dim"] == 16
    assert manifest["nprobe"] in [p["nprobe"] for p in manifest["sweep"]]
    assert manifest["nprobe_recall"] >= 0.95, manifest["sweep"]
    assert manifest["model_fingerprint"] == ModelArtifact.read(Storage(spark), out).fingerprint
    page = open(os.path.join(out, "report", "index.md")).read()
    for heading in ("## Time per stage", "## Inputs", "## Training", "## Metrics", "## Index"):
        assert heading in page
    assert "| `IVF23,SQ8` | 16 | 900 | 23 |" in page
    for png in ("stages.png", "training.png", "nprobe.png", "lists.png"):
        assert os.path.getsize(os.path.join(out, "report", png)) > 1000, png


def test_vectors_match_the_towers_on_the_driver(spark, pipeline_run):
    _, config = pipeline_run
    prepared = os.path.join(config.output, "prepared")
    manifest = json.load(open(os.path.join(prepared, "manifest.json")))
    model = build_model(manifest, config.train)
    model.load_state_dict(torch.load(os.path.join(config.output, "model", "model.pt"),
                                     weights_only=True))  # fmt: skip
    model.eval()
    for side, table, name in (("item", "items", "vectors/items"),
                              ("query", "queries", "vectors/queries")):  # fmt: skip
        features = load_features(prepared, manifest, table, workers=1)
        with torch.no_grad():
            tower = model.embed_items if side == "item" else model.embed_queries
            expected = tower(features.gather(torch.arange(len(features)))).numpy()
        vectors = read(spark, config, name).sort_values("idx")
        assert list(vectors["idx"]) == list(range(len(features)))
        got = np.stack(vectors["embedding"].to_numpy())
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_vectors_are_written_without_dictionary_pages(pipeline_run):
    import pyarrow.parquet as pq

    def dictionary_chunks(name: str) -> int:
        folder = os.path.join(config.output, name)
        files = [f for f in os.listdir(folder) if f.endswith(".parquet")]
        assert files, name
        count = 0
        for file in files:
            meta = pq.ParquetFile(os.path.join(folder, file)).metadata
            for group in range(meta.num_row_groups):
                for column in range(meta.num_columns):
                    chunk = meta.row_group(group).column(column)
                    count += chunk.has_dictionary_page or any("DICT" in e for e in chunk.encodings)
        return count

    _, config = pipeline_run
    assert dictionary_chunks("vectors/items") == dictionary_chunks("vectors/queries") == 0
    # The same count sees the dictionaries of a table written with Spark's defaults.
    assert dictionary_chunks("recommendations") > 0


def test_embedding_function_runs_on_an_executor(spark, pipeline_run):
    _, config = pipeline_run
    model = ModelArtifact.read(Storage(spark), config.output)
    items = spark.read.parquet(os.path.join(config.output, "prepared", "items"))
    payload = spark.sparkContext.broadcast(model.tower_payload("item"))
    out = embed_rows(items, payload, "item", model.embedding_dim, 64).toPandas()
    published = read(spark, config, "vectors/items")
    merged = out.merge(published, on="idx", suffixes=("", "_published"))
    assert len(merged) == 900 and (merged["id"] == merged["id_published"]).all()
    for a, b in zip(merged["embedding"], merged["embedding_published"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_model_is_read_once_and_payloads_carry_what_each_tower_reads(
    spark, pipeline_run, monkeypatch
):
    _, config = pipeline_run
    model = ModelArtifact.read(Storage(spark), config.output)
    with open(os.path.join(config.output, "model", "model.pt"), "rb") as fh:
        assert model.fingerprint == hashlib.sha256(fh.read()).hexdigest()

    # Payloads carry the layers only; the tables each tower reads come from model.pt
    # (the query tower has no sequence feature and no own id: no item-id table).
    for side, tables in (
        ("query", {"categorical.weight"}),
        ("item", {"categorical.weight", "item_table.weight"}),
    ):
        payload = model.tower_payload(side)
        state = torch.load(io.BytesIO(payload["state"]), weights_only=True)
        assert state and not set(state) & set(TABLES), side
        assert set(payload["tables"]) == tables, side
        assert payload["file"] == f"model-{model.fingerprint[:16]}.pt"
        assert len(pickle.dumps(payload)) < 100_000, side  # the tables are not in it

    # An output off the local file system is read from a local copy, to the same state.
    monkeypatch.setattr("adjoint_spark.embed.local_path", lambda uri: None)
    copied = ModelArtifact.read(Storage(spark), config.output)
    assert copied.fingerprint == model.fingerprint and copied.state.keys() == model.state.keys()
    for key, value in model.state.items():
        assert torch.equal(copied.state[key], value), key


def mapped_from(file: str, tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s data lies in a memory mapping of ``file`` (Linux)."""
    ptr, real = tensor.data_ptr(), os.path.realpath(file)
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


def test_model_file_is_shipped_once_and_towers_rebuilt_from_it_on_executors(spark, pipeline_run):
    _, config = pipeline_run
    model = ModelArtifact.read(Storage(spark), config.output)
    payload = model.ship_tower(spark, "item")
    model.ship(spark)  # again: a no-op (Spark never replaces a file of the same name)

    # On an executor: the shipped file is model.pt byte for byte, and the tower built
    # from it (tables mapped, not copied) equals the one built from the driver's state.
    def check(frames, payload=payload):
        from pyspark import SparkFiles

        from adjoint_spark.storage import sha256_file

        tower = build_tower(payload)
        file = SparkFiles.get(payload["file"])
        tables = [tower.item_table.weight, tower.categorical.weight]
        mapped = all(mapped_from(file, t) for t in tables)
        for frame in frames:
            yield pd.DataFrame({"sha": [sha256_file(file)], "mapped": [mapped],
                                "rows": [len(frame)],
                                "sum": [float(sum(p.double().sum() for p in
                                                  tower.state_dict().values()))]})  # fmt: skip

    got = (
        spark.range(2, numPartitions=2)
        .mapInPandas(check, "sha string, mapped boolean, rows long, sum double")
        .toPandas()
    )
    driver = build_tower(model.tower_payload("item"), model.tower_tables("item"))
    expected = float(sum(p.double().sum() for p in driver.state_dict().values()))
    assert (got["sha"] == model.fingerprint).all() and got["mapped"].all()
    np.testing.assert_allclose(got["sum"], expected, rtol=1e-12)

    # A payload that names a file of another size is refused with a clear error.
    wrong = {**payload, "file_bytes": payload["file_bytes"] + 1}
    with pytest.raises(Exception, match="ship it with ModelArtifact.ship_tower"):
        spark.range(1).mapInPandas(
            lambda frames: (pd.DataFrame({"n": [len(build_tower(wrong).state_dict())]})
                            for _ in frames), "n long",
        ).collect()  # fmt: skip


def test_a_shipped_file_outlives_its_source_and_names_are_shipped_once(spark, tmp_path):
    from pyspark import SparkFiles

    from adjoint_spark.storage import ship_file

    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"first content")
    second.write_bytes(b"other content")
    name = f"ship-test-{os.getpid()}.bin"
    shipped = ship_file(spark, str(first), name)
    assert ship_file(spark, str(second), name) == shipped  # the first stays the one shipped
    first.unlink()

    def read(frames):
        for _ in frames:
            yield pd.DataFrame({"data": [open(SparkFiles.get(name), "rb").read()]})

    got = spark.range(1).mapInPandas(read, "data binary").first()["data"]
    assert bytes(got) == b"first content"


def test_recommendations_are_complete_ranked_and_unseen(spark, pipeline_run):
    _, config = pipeline_run
    recs = read(spark, config, "recommendations")
    train = read(spark, config, "prepared/train_pairs")
    items = read(spark, config, "prepared/items")
    assert set(recs.columns) >= {"query_id", "rank", "item_id", "score"}
    per_query = recs.groupby("query_idx")["rank"].agg(list)
    assert len(per_query) == 240
    assert all(sorted(r) == list(range(1, 21)) for r in per_query)
    assert not recs.duplicated(["query_idx", "item_idx"]).any()
    ordered = recs.sort_values(["query_idx", "rank"])
    assert (ordered.groupby("query_idx")["score"].diff().dropna() <= 1e-6).all()
    seen = set(zip(train["query_idx"], train["item_idx"], strict=True))
    assert not any(p in seen for p in zip(recs["query_idx"], recs["item_idx"], strict=True))
    ids = dict(zip(items["item_idx"], items["item_id"], strict=True))
    assert (recs["item_idx"].map(ids) == recs["item_id"]).all()


def test_metrics_in_spark_match_numpy_and_exact_search(spark, pipeline_run):
    _, config = pipeline_run
    recs = read(spark, config, "recommendations").sort_values(["query_idx", "rank"])
    test = read(spark, config, "prepared/test_pairs")
    queries = np.sort(test["query_idx"].unique())
    top = np.full((len(queries), 20), -1)
    for row, q in enumerate(queries):
        ranked = recs.loc[recs["query_idx"] == q, "item_idx"].to_numpy()
        top[row, : len(ranked)] = ranked
    truth = [test.loc[test["query_idx"] == q, "item_idx"].to_numpy() for q in queries]
    expected = evaluate_top_k(top, truth, (10, 20))
    with open(os.path.join(config.output, "metrics.json")) as fh:
        metrics = json.load(fh)
    for key, value in expected.items():
        assert metrics["index"][key] == pytest.approx(value, abs=1e-9), key
    # Through an index with recall >= 0.95 the ranking loses little against exact search.
    assert abs(metrics["index"]["ndcg@10"] - metrics["exact"]["ndcg@10"]) < 0.05, metrics
    assert metrics["recommendation_rows"] == 240 * 20


def test_spark_metrics_match_numpy_on_random_lists(spark):
    rng = np.random.default_rng(0)
    top = np.stack([rng.choice(50, 12, replace=False) for _ in range(30)])
    top[3, 5:] = -1  # a short list
    truth = [rng.choice(50, rng.integers(1, 15), replace=False) for _ in range(30)]
    truth[7] = np.array([], dtype=np.int64)  # no test items: left out of the averages
    q, r = np.nonzero(top >= 0)
    recs = pd.DataFrame({"query_idx": q, "rank": r + 1, "item_idx": top[q, r]})
    test = pd.DataFrame(
        [(i, int(t)) for i, items in enumerate(truth) for t in items],
        columns=["query_idx", "item_idx"],
    )
    got = spark_ranking_metrics(spark.createDataFrame(recs), spark.createDataFrame(test), (5, 12))
    expected = evaluate_top_k(top, truth, (5, 12))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_top_k_unseen_drops_seen_and_empty_results():
    ids = np.array([[5, 3, 9, 1, -1], [2, 4, 6, 8, 10]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1]], np.float32)
    s, i = top_k_unseen(scores, ids, [np.array([3]), np.array([], np.int64)], 4)
    assert i.tolist() == [[5, 9, 1, -1], [2, 4, 6, 8]]
    assert s[0, :3].tolist() == pytest.approx([0.9, 0.7, 0.6])


def test_on_disk_merge_gives_the_same_recommendations(spark, pipeline_run, tmp_path):
    data, config = pipeline_run
    out = str(tmp_path)
    for name in ("prepared", "model"):
        shutil.copytree(os.path.join(config.output, name), os.path.join(out, name))
    ondisk = config_for(data, out, index={"merge": "ondisk"})
    run_index(spark, ondisk)
    manifest = json.load(open(os.path.join(out, "index", "manifest.json")))
    assert manifest["merge"] == "ondisk" and manifest["ivfdata"].endswith(".ivfdata")
    assert os.path.exists(os.path.join(out, "index", manifest["ivfdata"]))
    run_retrieve(spark, ondisk)
    a = read(spark, config, "recommendations").sort_values(["query_idx", "rank"])
    b = spark.read.parquet(os.path.join(out, "recommendations")).toPandas()
    b = b.sort_values(["query_idx", "rank"])
    assert a["item_idx"].tolist() == b["item_idx"].tolist()
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-6)


def snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def test_damaged_or_foreign_index_is_refused_before_writing(spark, pipeline_run, tmp_path):
    data, config = pipeline_run
    out = str(tmp_path)
    for name in ("prepared", "model", "index", "recommendations"):
        shutil.copytree(os.path.join(config.output, name), os.path.join(out, name))
    cfg = config_for(data, out)
    before = snapshot(os.path.join(out, "recommendations"))
    index_file = os.path.join(out, "index", "items.faiss")
    original = open(index_file, "rb").read()

    with open(index_file, "wb") as fh:
        fh.write(original[: len(original) // 2])
    with pytest.raises(ArtifactError, match=r"items\.faiss has .* bytes.*truncated"):
        run_retrieve(spark, cfg)

    with open(index_file, "wb") as fh:
        fh.write(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ArtifactError, match=r"items\.faiss does not match the SHA-256"):
        run_retrieve(spark, cfg)

    with open(index_file, "wb") as fh:
        fh.write(original)
    manifest_path = os.path.join(out, "index", "manifest.json")
    manifest = json.load(open(manifest_path))
    json.dump({**manifest, "model_fingerprint": "0" * 64}, open(manifest_path, "w"))
    with pytest.raises(ArtifactError, match="built with another model"):
        run_retrieve(spark, cfg)
    assert snapshot(os.path.join(out, "recommendations")) == before
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_model_of_other_features_is_refused(spark, pipeline_run, tmp_path):
    data, config = pipeline_run
    out = str(tmp_path)
    for name in ("prepared", "model"):
        shutil.copytree(os.path.join(config.output, name), os.path.join(out, name))
    info_path = os.path.join(out, "model", "model.json")
    info = json.load(open(info_path))
    info["features"]["items"]["numeric"] = info["features"]["items"]["numeric"][:-1]
    json.dump(info, open(info_path, "w"))
    with pytest.raises(ArtifactError, match="disagree on 'features'"):
        run_index(spark, config_for(data, out))
    assert not os.path.exists(os.path.join(out, "index"))


def test_report_runs_alone_on_published_outputs(spark, pipeline_run, tmp_path):
    data, config = pipeline_run
    out = str(tmp_path)
    shutil.copytree(os.path.join(config.output, "prepared"), os.path.join(out, "prepared"))
    path = run_report(spark, config_for(data, out))
    page = open(path).read()
    assert "The train stage has not run." in page and "The index stage has not run." in page
    assert "| items | 900 | 900 | 0 |" in page
