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


def test_graded_preferences_follow_the_latent_vectors(tmp_path):
    from adjoint_spark.synth import LATENT_SEEDS, latents

    query_shape = TableShape(4, (3,), 0)
    item_shape = TableShape(6, (2,), 1, 5)
    paths = write_seed_dataset(
        str(tmp_path), 300, 2000, 4, query_shape, item_shape, test_pairs_per_query=2,
        seed=3, latent_dim=3,
    )  # fmt: skip
    q_latent = latents(300, 3, 3 + LATENT_SEEDS["queries"])
    i_latent = latents(2000, 3, 3 + LATENT_SEEDS["items"])
    assert np.allclose(np.linalg.norm(i_latent, axis=1), 1.0, atol=1e-5)
    items = pd.read_csv(paths["items"], sep="\t", header=None, dtype=str)
    queries = pd.read_csv(paths["queries"], sep="\t", header=None, dtype=str)
    assert items.shape == (2000, 1 + 6 + 1 + 1) and queries.shape == (300, 1 + 4 + 1)

    # The first numeric columns carry the latent vector (signal std 2 against noise 1).
    for frame, latent in ((items, i_latent), (queries, q_latent)):
        numeric = frame.iloc[:, 1:4].astype(float).to_numpy()
        for d in range(3):
            assert np.corrcoef(numeric[:, d], latent[:, d])[0, 1] > 0.7
        assert abs(np.corrcoef(frame.iloc[:, 4].astype(float), latent[:, 0])[0, 1]) < 0.2

    # Labels and sequences prefer items whose latent vector is close: their mean cosine is
    # far above that of random items (about 0), yet they are not one fixed set of items.
    labels = pd.read_csv(paths["labels"], sep="\t", header=None, names=["q", "i"])
    assert not labels.duplicated().any() and labels["q"].nunique() == 300
    cosine = np.einsum("rd,rd->r", q_latent[labels["q"]], i_latent[labels["i"]])
    assert cosine.mean() > 0.8 and labels["i"].nunique() > 500
    seq = [np.array([int(x) for x in s.split(",")]) for s in items[8]]
    assert all(((s >= 0) & (s < 2000)).all() and 1 <= len(s) <= 5 for s in seq)
    seq_cos = [i_latent[s] @ i_latent[i] for i, s in enumerate(seq)]
    assert np.mean(np.concatenate(seq_cos)) > 0.8
    test = pd.read_csv(paths["test_labels"], sep="\t", header=None, names=["q", "i"])
    assert test.merge(labels).empty and len(test) > 0
