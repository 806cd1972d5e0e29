"""The prepare job on Parquet and CSV tables whose columns the config names."""

from __future__ import annotations

import os

import pandas as pd

from adjoint_spark.config import load_config
from adjoint_spark.prepare import run_prepare


def _config(folder, fmt, out):
    ext = "parquet" if fmt == "parquet" else "csv"
    return load_config(
        data={
            "dataset": {
                "name": f"tables-{fmt}",
                "format": "table",
                "queries": {
                    "path": f"{folder}/users.{ext}",
                    "file_format": fmt,
                    "key": "user",
                    "numeric": ["age"],
                    "categorical": ["city"],
                },
                "items": {
                    "path": f"{folder}/products.{ext}",
                    "file_format": fmt,
                    "key": "sku",
                    "numeric": ["price"],
                    "categorical": ["brand"],
                    "sequences": [{"name": "bought_with", "column": "bw", "max_len": 2}],
                },
                "labels": {
                    "path": f"{folder}/orders.{ext}",
                    "file_format": fmt,
                    "query_key": "user",
                    "item_key": "sku",
                    "timestamp": "t",
                },
            },
            "output": out,
            "prepare": {"num_partitions": 1, "split": {"test_fraction": 0.5, "seed": 1}},
        }
    )


def _write(folder, fmt):
    os.makedirs(folder, exist_ok=True)
    users = pd.DataFrame(
        {"user": [10, 11, 12, 13], "age": [30.0, None, 50.0, 20.0], "city": ["a", "b", "a", None]}
    )
    bw = [[101], [100, 102], [], [100, 101, 102]]
    products = pd.DataFrame(
        {
            "sku": [100, 101, 102, 103],
            "price": [1.0, 2.0, 3.0, 4.0],
            "brand": ["x", "y", "x", "z"],
            "bw": bw,
        }
    )
    orders = pd.DataFrame(
        {
            "user": [10, 10, 11, 11, 12, 12, 99],
            "sku": [100, 101, 101, 102, 100, 103, 100],
            "t": [1, 2, 3, 4, 5, 6, 7],
        }
    )
    if fmt == "parquet":
        users.to_parquet(f"{folder}/users.parquet")
        products.to_parquet(f"{folder}/products.parquet")
        orders.to_parquet(f"{folder}/orders.parquet")
    else:
        users.to_csv(f"{folder}/users.csv", index=False)
        products["bw"] = [",".join(map(str, b)) for b in bw]
        products.to_csv(f"{folder}/products.csv", index=False)
        orders.to_csv(f"{folder}/orders.csv", index=False)


def _check(result):
    tables = result.manifest["tables"]
    # user 11 has no age (empty numeric: rejected by default), product 102 an empty
    # sequence (rejected), so its orders and the sequences naming it see an unknown item.
    assert tables["queries"] == {"read": 4, "accepted": 3, "rejected": 1}
    assert tables["items"] == {"read": 4, "accepted": 3, "rejected": 1}
    assert tables["labels"] == {"read": 7, "accepted": 4, "rejected": 3}
    rejects = pd.read_parquet(os.path.join(result.path, "rejects"))
    reasons = dict(
        zip(zip(rejects["table"], rejects["row"], strict=True), rejects["reason"], strict=True)
    )
    assert reasons[("queries", 2)] == "numeric column age is empty"
    assert reasons[("items", 3)] == "sequence column bought_with is empty"
    assert reasons[("labels", 3)] == "unknown query 11"
    assert reasons[("labels", 7)] == "unknown query 99"
    assert reasons[("labels", 4)] == "unknown query 11"
    items = pd.read_parquet(os.path.join(result.path, "items")).sort_values("item_id")
    # 100 -> idx 0, 101 -> 1, 103 -> 2; sequences keep the last 2 known items, + 1.
    assert [list(s) for s in items["seq_bought_with"]] == [[2, 0], [1, 0], [1, 2]]
    assert result.manifest["features"]["items"]["sequences"][0]["unknown_items"] == 2
    queries = pd.read_parquet(os.path.join(result.path, "queries")).sort_values("query_id")
    assert queries["query_id"].tolist() == [10, 12, 13]
    assert [c[0] for c in queries["cat"]] == [1, 1, 0]  # city a twice; a null is unseen


def test_parquet_tables(spark, tmp_path):
    _write(str(tmp_path / "in"), "parquet")
    _check(run_prepare(spark, _config(str(tmp_path / "in"), "parquet", str(tmp_path / "out"))))


def test_csv_tables(spark, tmp_path):
    _write(str(tmp_path / "in"), "csv")
    _check(run_prepare(spark, _config(str(tmp_path / "in"), "csv", str(tmp_path / "out"))))
