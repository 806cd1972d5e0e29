import os

import pytest

from adjoint_spark.config import ConfigError, load_config

from .conftest import MOVIELENS, ROOT


def test_bundled_configs_load():
    ml = load_config(os.path.join(ROOT, "conf", "movielens-100k.yaml"))
    assert ml.dataset.format == "movielens"
    assert ml.dataset.path == MOVIELENS
    assert ml.prepare.split.seed == 42 and ml.prepare.split.test_fraction == 0.25
    seed = load_config(os.path.join(ROOT, "conf", "seed-example.yaml"))
    assert seed.dataset.items.categorical_sizes == (4, 2, 3)
    assert seed.dataset.items.sequences[0].name == "related"
    assert seed.dataset.queries.path == os.path.join(ROOT, "data", "seed-example", "queries.txt")


def _ml(**prepare):
    return {
        "dataset": {"name": "m", "format": "movielens", "path": MOVIELENS},
        "output": "/tmp/x",
        "prepare": prepare,
    }


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        ({"num_partitions": 0}, "prepare.num_partitions': 0"),
        ({"num_partitions": "four"}, "'four' is not allowed; expected an integer"),
        ({"numeric_scaling": "zscore"}, "prepare.numeric_scaling': 'zscore'"),
        ({"split": {"test_fraction": 1.5}}, "prepare.split.test_fraction': 1.5"),
        ({"split": {"seeds": 1}}, "prepare.split.seeds'"),
        ({"label_counts": "yes"}, "label_counts': 'yes' is not allowed; expected true"),
    ],
)
def test_bad_values_name_the_key(prepare, message):
    with pytest.raises(ConfigError) as err:
        load_config(data=_ml(**prepare))
    assert message in str(err.value)


def test_overrides_apply_and_are_validated():
    config = load_config(data=_ml(), overrides=["prepare.num_partitions=7", "output=/tmp/y"])
    assert config.prepare.num_partitions == 7
    assert config.output == "/tmp/y"
    with pytest.raises(ConfigError, match="prepare.num_partitions"):
        load_config(data=_ml(), overrides=["prepare.num_partitions=-1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(data=_ml(), overrides=["prepare.num_partitions"])


def test_seed_format_needs_tables_and_text():
    with pytest.raises(ConfigError, match="dataset.queries"):
        load_config(data={"dataset": {"name": "s", "format": "seed"}, "output": "/tmp/x"})
    table = {"path": "/x", "file_format": "parquet"}
    data = {
        "dataset": {
            "name": "s",
            "format": "seed",
            "queries": table,
            "items": table,
            "labels": {"path": "/y"},
        },
        "output": "/tmp/x",
    }
    with pytest.raises(ConfigError, match="'text' for the seed format"):
        load_config(data=data)


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_config("/tmp/does-not-exist.yaml")
