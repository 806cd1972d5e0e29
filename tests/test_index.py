"""Per-partition faiss shards, the merge step and its checks, against exact references."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pandas as pd
import pytest

from adjoint_spark.config import IndexConfig
from adjoint_spark.index import (
    IndexCheckError,
    add_partitions,
    check_ids,
    check_shards,
    choose_merge,
    choose_nprobe,
    exact_top_k_partitions,
    index_recall,
    list_ids,
    merge_exact,
    merge_shards,
    nprobe_candidates,
    parse_nlist,
    plan_index,
    shard_name,
    top_k_per_query,
    train_index,
)

DIM = 16


def test_nlist_rule_lowers_nlist_for_small_catalogues():
    cfg = IndexConfig()
    big = plan_index("IVF4096,SQ8", 2_000_000, cfg)
    assert (big.factory, big.nlist, big.num_train, big.rule) == (
        "IVF4096,SQ8",
        4096,
        4096 * 256,
        "",
    )
    small = plan_index("IVF4096,SQ8", 1682, cfg)
    assert small.factory == "IVF43,SQ8" and small.nlist == 43 == 1682 // 39
    assert small.num_train == 1682 and "nlist lowered to 43" in small.rule
    assert plan_index("IVF4096,SQ8", 10, cfg).factory == "IVF1,SQ8"
    assert plan_index("OPQ8,IVF256_HNSW32,PQ8", 5000, cfg).factory == "OPQ8,IVF128_HNSW32,PQ8"
    with pytest.raises(NotImplementedError, match="HNSW32.*no IVF index"):
        parse_nlist("HNSW32")


def test_nprobe_choice_and_merge_choice():
    assert nprobe_candidates(43) == [1, 2, 4, 8, 16, 32, 43]
    assert nprobe_candidates(1) == [1]
    sweep = [{"nprobe": 1, "recall": 0.5}, {"nprobe": 4, "recall": 0.96},
             {"nprobe": 8, "recall": 0.99}]  # fmt: skip
    assert choose_nprobe(sweep, 0.95)["nprobe"] == 4
    assert choose_nprobe(sweep, 0.995)["nprobe"] == 8  # unreachable: the best one
    assert choose_merge("auto", 3 << 30, 2048) == "ondisk"
    assert choose_merge("auto", 1 << 30, 2048) == "memory"
    assert choose_merge("memory", 3 << 30, 2048) == "memory"


def test_shard_and_id_checks_fail_loudly():
    rows = [{"partition": 0, "ntotal": 5}, {"partition": 1, "ntotal": 5}]
    check_shards(rows, 2, 10)
    with pytest.raises(IndexCheckError, match="one shard for each of 3 partitions"):
        check_shards(rows, 3, 10)
    with pytest.raises(IndexCheckError, match="hold 10 vectors, the items 11"):
        check_shards(rows, 2, 11)
    check_ids(np.array([2, 0, 1]), 3)
    with pytest.raises(IndexCheckError, match="occur more than once"):
        check_ids(np.array([0, 1, 1]), 3)
    with pytest.raises(IndexCheckError, match="holds 2 ids for 3 items"):
        check_ids(np.array([0, 1]), 3)
    with pytest.raises(IndexCheckError, match="span 1..3"):
        check_ids(np.array([1, 2, 3]), 3)


def clustered_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, DIM))
    x = centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors(spark):
    """3,000 unit vectors in 6 Spark partitions, ids 0..2999 in shuffled order."""
    x = clustered_vectors(3000, seed=1)
    ids = np.random.default_rng(2).permutation(3000)
    frame = pd.DataFrame({"idx": ids, "embedding": list(x[ids])})
    df = spark.createDataFrame(frame, "idx long, embedding array<float>").repartition(6)
    return x, df


def build_shards(spark, df, trained, folder: str) -> list[dict]:
    os.makedirs(folder)
    shipped = spark.sparkContext.broadcast(faiss.serialize_index(trained).tobytes())
    rows = df.mapInPandas(add_partitions(shipped, folder), "partition int, ntotal long, "
                          "min_id long, max_id long, bytes long").collect()  # fmt: skip
    return [r.asDict() for r in rows]


@pytest.mark.parametrize("mode", ["memory", "ondisk"])
def test_merged_shards_match_one_index_and_a_flat_index(spark, vectors, tmp_path, mode):
    x, df = vectors
    plan = plan_index("IVF16,SQ8", len(x), IndexConfig())
    trained = train_index(x[np.random.default_rng(3).permutation(len(x))[: plan.num_train]], plan)

    # The shards are written by the executors, one per partition.
    shards = build_shards(spark, df, trained, str(tmp_path / "shards"))
    check_shards(shards, df.rdd.getNumPartitions(), len(x))
    files = [str(tmp_path / "shards" / shard_name(p)) for p in range(len(shards))]
    merged = merge_shards(trained, files, mode, str(tmp_path / "merged.ivfdata"))
    ids, sizes = list_ids(merged)
    check_ids(ids, len(x))
    assert merged.ntotal == len(x) and sizes.sum() == len(x)

    # Merged shards answer exactly like one index that got every vector at once.
    whole = faiss.clone_index(trained)
    whole.add_with_ids(x, np.arange(len(x)))
    queries = clustered_vectors(200, seed=4)
    for index in (merged, whole):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 16)
    d_merged, i_merged = merged.search(queries, 10)
    d_whole, i_whole = whole.search(queries, 10)
    np.testing.assert_allclose(d_merged, d_whole, rtol=0, atol=1e-6)
    assert all(set(a) == set(b) for a, b in zip(i_merged, i_whole, strict=True))

    # Against exact search: SQ8 scores within 0.02 of the true inner products, and
    # nearly the same neighbours (all lists probed, so only quantisation differs).
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    _, i_flat = flat.search(queries, 10)
    true_scores = np.einsum("qd,qkd->qk", queries, x[i_merged])
    np.testing.assert_allclose(d_merged, true_scores, atol=0.02)
    assert (i_merged[:, 0] == i_flat[:, 0]).mean() >= 0.95
    assert index_recall(i_merged, list(i_flat), 10) >= 0.95


def test_exact_top_k_in_spark_matches_numpy(spark, vectors):
    x, df = vectors
    queries = clustered_vectors(30, seed=5)
    shipped = spark.sparkContext.broadcast(queries)
    rows = df.mapInPandas(
        exact_top_k_partitions(shipped, 7), "query long, idx long, score float"
    ).toPandas()
    exact = merge_exact(rows, len(queries), 7)
    expected = np.argsort(-(queries @ x.T), axis=1)[:, :7]
    for q in range(len(queries)):
        assert list(exact[q]) == list(expected[q])


def test_top_k_per_query_merges_partitions_in_spark(spark, vectors):
    x, df = vectors
    queries = clustered_vectors(30, seed=5)
    shipped = spark.sparkContext.broadcast(queries)
    rows = df.mapInPandas(exact_top_k_partitions(shipped, 7), "query long, idx long, score float")
    merged = top_k_per_query(rows, 7).toPandas()

    # The driver gets (queries x k) rows, the exact top 7 of each query in NumPy.
    assert len(merged) == 30 * 7 and (merged.groupby("query").size() == 7).all()
    exact = merge_exact(merged, len(queries), 7)
    expected = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :7]
    for q in range(len(queries)):
        assert list(exact[q]) == list(expected[q])
    ranked = merged.sort_values(["query", "score", "idx"], ascending=[True, False, True])
    true_scores = np.einsum("qd,qkd->qk", queries, x[expected]).ravel()
    np.testing.assert_allclose(ranked["score"], true_scores, rtol=0, atol=1e-5)


def test_top_k_per_query_breaks_ties_by_lower_idx(spark):
    # Scores on a coarse grid, so many tie: the k best by (score desc, idx asc).
    rng = np.random.default_rng(9)
    num_queries, num_items, k = 12, 200, 5
    scores = (rng.integers(0, 8, (num_queries, num_items)) / 8).astype(np.float32)
    q, i = np.nonzero(np.ones_like(scores, dtype=bool))
    frame = pd.DataFrame({"query": q, "idx": i, "score": scores[q, i]})
    df = spark.createDataFrame(frame, "query long, idx long, score float").repartition(4)
    merged = top_k_per_query(df, k).toPandas()
    assert len(merged) == num_queries * k
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    for query, ids in enumerate(merge_exact(merged, num_queries, k)):
        assert list(ids) == list(expected[query])


@pytest.mark.parametrize("nprobe", [1, 10])
def test_search_fills_k_for_long_histories_on_an_executor(spark, tmp_path, nprobe):
    from adjoint_spark.retrieve import search_partitions

    x = clustered_vectors(300, seed=6)
    plan = plan_index("IVF10,Flat", len(x), IndexConfig())
    index = train_index(x, plan)
    index.add_with_ids(x, np.arange(len(x)))
    name = f"items-search-test-{nprobe}.faiss"
    faiss.write_index(index, str(tmp_path / name))
    spark.sparkContext.addFile(str(tmp_path / name))

    # Queries that have seen 250 of the 300 items: one probed list (~30 items) cannot
    # hold 20 unseen ones, so at nprobe 1 the search must widen until it finds them.
    rng = np.random.default_rng(7)
    queries = clustered_vectors(8, seed=8)
    seen = [rng.choice(300, 250, replace=False).tolist() for _ in range(8)]
    frame = pd.DataFrame({"id": np.arange(8), "idx": np.arange(8), "embedding": list(queries),
                          "seen": seen})  # fmt: skip
    df = spark.createDataFrame(frame, "id long, idx long, embedding array<float>, "
                               "seen array<long>").repartition(2)  # fmt: skip
    found = df.mapInPandas(
        search_partitions(name, False, nprobe, 20, 4),
        "query_id long, query_idx long, rank int, item_idx long, score float",
    ).toPandas()
    for q in range(8):
        got = found[found["query_idx"] == q].sort_values("rank")
        unseen = np.setdiff1d(np.arange(300), seen[q])
        assert got["rank"].tolist() == list(range(1, 21))
        assert not set(got["item_idx"]) & set(seen[q])
        got_scores = x[got["item_idx"].to_numpy()] @ queries[q]
        np.testing.assert_allclose(got["score"], got_scores, atol=1e-5)
        assert np.all(np.diff(got["score"].to_numpy()) <= 1e-6)
        if nprobe == index.nlist:
            # Every list probed: the exact top 20 of the unseen items (compared by
            # score, since ties may swap).
            best = np.sort(x[unseen] @ queries[q])[::-1][:20]
            np.testing.assert_allclose(got_scores, best, atol=1e-5)


def test_broadcasts_are_destroyed_when_the_block_ends_or_fails(spark):
    from adjoint_spark.embed import Broadcasts

    rdd = spark.sparkContext.parallelize([1, 2], 2)
    with pytest.raises(RuntimeError, match="stage failed"):
        with Broadcasts(spark) as broadcasts:
            kept = broadcasts.add("kept", 10)
            early = broadcasts.add("early", 20)
            assert rdd.map(lambda x: x + kept.value + early.value).collect() == [31, 32]
            broadcasts.destroy("early")
            assert list(broadcasts.live) == ["kept"]
            raise RuntimeError("stage failed")
    assert broadcasts.live == {}
    # Both are gone: a job that reads either is refused.
    for gone in (kept, early):
        with pytest.raises(Exception, match="destroyed"):
            rdd.map(lambda x, b=gone: x + b.value).collect()
