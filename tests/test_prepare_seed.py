"""The prepare job on the seed text format: bad rows, counts, encoding, fatal errors."""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest

from adjoint_spark.config import load_config
from adjoint_spark.prepare import run_prepare
from adjoint_spark.readers import PrepareError

QUERIES = [
    "0\t1.0\t2.0\t0\t2",  # 1 valid
    "1\x1b0.5\x1b-1\x1b1\x1b4",  # 2 valid, ESC-separated
    "2\t1.0\t2.0\t0",  # 3
    "3\tabc\t2.0\t0\t2",  # 4
    "4\tNaN\t2.0\t0\t2",  # 5
    "5\t1\t-Infinity\t0\t2",  # 6
    "6\t1\t2\t5\t2",  # 7
    "7\t1\t2\t0\t1",  # 8
    "",  # 9
    "0\t9\t9\t1\t3",  # 10
    "8\t1\t2\tx\t2",  # 11
    "-3\t1\t2\t0\t2",  # 12
    "9\t3\t3\t1\t3",  # 13 valid
    "10\t\t3\t1\t3",  # 14
]
QUERY_REJECTS = {
    3: "expected 5 fields, found 4",
    4: "numeric column num_0: 'abc' is not a number",
    5: "numeric column num_0: 'NaN' is NaN or infinite",
    6: "numeric column num_1: '-Infinity' is NaN or infinite",
    7: "categorical column cat_0: 5 is outside its range [0, 2)",
    8: "categorical column cat_1: 1 is outside its range [2, 5)",
    9: "blank line",
    10: "duplicate index 0 (first at row 1)",
    11: "categorical column cat_0: 'x' is not an integer",
    12: "index '-3' is negative",
    14: "numeric column num_0 is empty",
}
ITEMS = [
    "0\t0.1\t0\t1,2",  # 1 valid
    "1\t0.2\t1\t0",  # 2 valid
    "2\t0.3\t2\t0,1,2,99",  # 3 valid; 99 is no item
    "3\t0.4\t0\t",  # 4
    "4\t0.5\t0\t1,a",  # 5
    "5\t1e400\t0\t1",  # 6
    "6\t0.1\t0\t1\textra",  # 7
    "7\t0.7\t2\t0,1,2,0,1",  # 8 valid, longer than max_len
]
ITEM_REJECTS = {
    4: "sequence column rel is empty",
    5: "sequence column rel: '1,a' holds a non-integer or negative item",
    6: "numeric column num_0: '1e400' is NaN or infinite",
    7: "expected 4 fields, found 5",
}
LABELS = [
    "0\t0",
    "0\t1",
    "1\t0",
    "1\t2",
    "9\t7",
    "9\t1",
    "0\t0",
    "2\t0",
    "1\t42",
    "x\t1",
    "1",
    "",
    "9\t0",
]
LABEL_REJECTS = {
    7: "duplicate pair 0, 0 (first at row 1)",
    8: "unknown query 2",
    9: "unknown item 42",
    10: "query index 'x' is not an integer",
    11: "expected 2 fields, found 1",
    12: "blank line",
}
TEST_LABELS = ["0\t2", "1\t1", "0\t0", "9\t2", "13\t1"]
TEST_LABEL_REJECTS = {3: "pair is also a train label", 5: "unknown query 13"}


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def seed_files(folder, queries=QUERIES, items=ITEMS, labels=LABELS, test_labels=TEST_LABELS):
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, lines in [
        ("queries", queries),
        ("items", items),
        ("labels", labels),
        ("test_labels", test_labels),
    ]:
        paths[name] = os.path.join(folder, f"{name}.txt")
        write_lines(paths[name], lines)
    return paths


def seed_config(paths, output, query_numeric=2, **prepare):
    data = {
        "dataset": {
            "name": "bad-rows",
            "format": "seed",
            "queries": {
                "path": paths["queries"],
                "num_numeric": query_numeric,
                "categorical_sizes": [2, 3],
            },
            "items": {
                "path": paths["items"],
                "num_numeric": 1,
                "categorical_sizes": [3],
                "sequences": [{"name": "rel", "max_len": 3}],
            },
            "labels": {"path": paths["labels"]},
            "test_labels": {"path": paths["test_labels"]},
        },
        "output": output,
        "prepare": {"num_partitions": 2, **prepare},
    }
    return load_config(data=data)


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory):
    folder = tmp_path_factory.mktemp("seed")
    paths = seed_files(str(folder / "in"))
    config = seed_config(paths, str(folder / "out"))
    result = run_prepare(spark, config)
    return result, paths


def read(result, name):
    return pd.read_parquet(os.path.join(result.path, name))


def test_counts_add_up_exactly(prepared):
    result, _ = prepared
    tables = result.manifest["tables"]
    assert tables["queries"] == {"read": 14, "accepted": 3, "rejected": 11}
    assert tables["items"] == {"read": 8, "accepted": 4, "rejected": 4}
    assert tables["labels"] == {"read": 13, "accepted": 7, "rejected": 6}
    assert tables["test_labels"] == {"read": 5, "accepted": 3, "rejected": 2}
    assert result.manifest["split"]["num_train"] == 7
    assert result.manifest["split"]["num_test"] == 3
    assert len(read(result, "rejects")) == 11 + 4 + 6 + 2
    with open(os.path.join(result.path, "manifest.json")) as fh:
        assert json.load(fh)["tables"] == tables


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("queries", QUERY_REJECTS),
        ("items", ITEM_REJECTS),
        ("labels", LABEL_REJECTS),
        ("test_labels", TEST_LABEL_REJECTS),
    ],
)
def test_every_reject_has_its_row_and_reason(prepared, table, expected):
    result, paths = prepared
    rejects = read(result, "rejects")
    got = rejects[rejects["table"] == table]
    assert dict(zip(got["row"], got["reason"], strict=True)) == expected
    source_lines = open(paths[table], encoding="utf-8").read().split("\n")
    for row, raw, source in zip(got["row"], got["raw"], got["source"], strict=True):
        assert raw == source_lines[row - 1]
        assert source.endswith(f"{table}.txt")


def test_encoding_of_accepted_rows(prepared):
    result, _ = prepared
    queries = read(result, "queries").sort_values("query_id")
    assert queries["query_id"].tolist() == [0, 1, 9]
    assert queries["query_idx"].tolist() == [0, 1, 2]
    # num_0 is 1.0, 0.5, 3.0: standard scaling with the population std.
    mean, std = 1.5, math.sqrt(((1.0 - 1.5) ** 2 + (0.5 - 1.5) ** 2 + (3.0 - 1.5) ** 2) / 3)
    got = [row[0] for row in queries["num"]]
    assert got == pytest.approx([(v - mean) / std for v in (1.0, 0.5, 3.0)], abs=1e-6)
    # cat_0 values 0, 1, 1: the most frequent value gets id 1; 0 is kept for unseen.
    assert [row[0] for row in queries["cat"]] == [2, 1, 1]

    items = read(result, "items").sort_values("item_id")
    assert items["item_id"].tolist() == [0, 1, 2, 7]
    # Sequences hold item_idx + 1 of the last max_len known items, 0 pads.
    assert [list(s) for s in items["seq_rel"]] == [[2, 3, 0], [1, 0, 0], [1, 2, 3], [3, 1, 2]]
    spec = result.manifest["features"]["items"]["sequences"][0]
    assert spec["unknown_items"] == 1 and spec["max_len"] == 3

    train = read(result, "train_pairs")
    assert sorted(zip(train["query_id"], train["item_id"], strict=True)) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 2),
        (9, 0),
        (9, 1),
        (9, 7),
    ]
    test = read(result, "test_pairs")
    assert sorted(zip(test["query_id"], test["item_id"], strict=True)) == [(0, 2), (1, 1), (9, 2)]
    assert set(test["item_idx"]) == {1, 2}


def test_manifest_describes_inputs_and_features(prepared):
    result, paths = prepared
    m = result.manifest
    assert m["num_queries"] == 3 and m["num_items"] == 4 and m["item_vocab_size"] == 5
    assert {os.path.basename(i["path"]) for i in m["inputs"]} == {
        "queries.txt",
        "items.txt",
        "labels.txt",
        "test_labels.txt",
    }
    assert all(len(i["sha256_head_tail"]) == 64 and i["bytes"] > 0 for i in m["inputs"])
    cats = m["features"]["queries"]["categorical"]
    assert [(c["name"], c["vocab_size"]) for c in cats] == [("cat_0", 3), ("cat_1", 4)]
    assert m["split"]["method"] == "given"


def test_missing_file_stops_before_publishing(spark, tmp_path):
    paths = seed_files(str(tmp_path / "in"))
    paths["labels"] = str(tmp_path / "in" / "nope.txt")
    config = seed_config(paths, str(tmp_path / "out"))
    with pytest.raises(PrepareError, match="labels: input .*nope.txt does not exist"):
        run_prepare(spark, config)
    assert not os.path.exists(tmp_path / "out" / "prepared")


def test_column_counts_that_fit_no_row_stop_the_job(spark, tmp_path):
    paths = seed_files(str(tmp_path / "in"))
    config = seed_config(paths, str(tmp_path / "out"), query_numeric=6)
    with pytest.raises(PrepareError) as err:
        run_prepare(spark, config)
    message = str(err.value)
    assert "queries: no row of" in message and "queries.txt" in message
    assert "expected 9 fields, found 5" in message


def test_label_times_without_timestamps_stop_the_job(spark, tmp_path):
    paths = seed_files(str(tmp_path / "in"))
    config = seed_config(paths, str(tmp_path / "out"), label_times=True)
    with pytest.raises(PrepareError, match="label_times needs timestamps on the labels"):
        run_prepare(spark, config)
    assert not os.path.exists(tmp_path / "out" / "prepared")


def test_empty_table_stops_the_job(spark, tmp_path):
    paths = seed_files(str(tmp_path / "in"), items=[])
    open(paths["items"], "w").close()
    with pytest.raises(PrepareError, match="items: .*items.txt has no rows"):
        run_prepare(spark, seed_config(paths, str(tmp_path / "out")))


def test_failed_run_leaves_previous_output_intact(spark, tmp_path):
    paths = seed_files(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    first = run_prepare(spark, seed_config(paths, out))
    before = {
        os.path.relpath(os.path.join(d, f), first.path): os.path.getmtime(os.path.join(d, f))
        for d, _, files in os.walk(first.path)
        for f in files
    }
    manifest = open(os.path.join(first.path, "manifest.json")).read()

    # Second run: a label file full of garbage fails after the entities were read.
    write_lines(paths["labels"], ["a\tb", "c"])
    with pytest.raises(PrepareError, match="labels: no row"):
        run_prepare(spark, seed_config(paths, out))

    after = {
        os.path.relpath(os.path.join(d, f), first.path): os.path.getmtime(os.path.join(d, f))
        for d, _, files in os.walk(first.path)
        for f in files
    }
    assert after == before
    assert open(os.path.join(first.path, "manifest.json")).read() == manifest
    assert os.listdir(os.path.join(out, "_staging")) == []


def test_row_numbers_survive_many_splits(spark, tmp_path):
    """Rows are numbered per file even when Spark reads a file in many splits."""
    lines = [f"{i}\t{i * 0.5}\t1.0\t0\t2" for i in range(3000)]
    lines[1233] = "1233\tbad\t1.0\t0\t2"
    lines[2998] = "2998\t1.0\t1.0\t9\t2"
    paths = seed_files(str(tmp_path / "in"), queries=lines)
    old = spark.conf.get("spark.sql.files.maxPartitionBytes")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "4096")
    try:
        result = run_prepare(spark, seed_config(paths, str(tmp_path / "out")))
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", old)
    rejects = read(result, "rejects")
    got = rejects[rejects["table"] == "queries"].sort_values("row")
    assert got["row"].tolist() == [1234, 2999]
    assert got["raw"].tolist() == [lines[1233], lines[2998]]
    assert result.manifest["tables"]["queries"]["accepted"] == 2998
