import numpy as np
import pandas as pd

from adjoint_spark.synth import TableShape, write_seed_dataset


def test_generated_files_have_the_declared_shape(tmp_path):
    query_shape = TableShape(4, (3, 5), 0)
    item_shape = TableShape(6, (2, 2, 4), 1, 5)
    paths = write_seed_dataset(
        str(tmp_path), 50, 40, 3, query_shape, item_shape, num_clusters=4, test_pairs_per_query=1
    )
    items = pd.read_csv(paths["items"], sep="\t", header=None, dtype=str)
    assert items.shape == (40, 1 + 6 + 3 + 1)
    cats = items.iloc[:, 7:10].astype(int).to_numpy()
    assert (cats[:, 0] < 2).all() and ((cats[:, 1] >= 2) & (cats[:, 1] < 4)).all()
    assert ((cats[:, 2] >= 4) & (cats[:, 2] < 8)).all()
    # Sequences and labels name items of the row's own cluster.
    for index, seq in zip(items[0].astype(int), items[10], strict=True):
        members = np.array([int(x) for x in seq.split(",")])
        assert (members < 40).all() and (members % 4 == index % 4).all()
    labels = pd.read_csv(paths["labels"], sep="\t", header=None, names=["q", "i"])
    assert ((labels["q"] % 4) == (labels["i"] % 4)).all()
    assert not labels.duplicated().any()
    test = pd.read_csv(paths["test_labels"], sep="\t", header=None, names=["q", "i"])
    assert test.merge(labels).empty
