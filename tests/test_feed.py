import torch

from adjoint_spark.feed import HistoryRule, history_mask, own_items_mask


def _query():
    # Rows: query 0 owns items 0..5 (stored +1), query 1 owns items 2, 7.
    seq = torch.tensor([[1, 2, 3, 4, 5, 6], [3, 8, 0, 0, 0, 0]])
    return {"idx": torch.tensor([0, 1]), "seq_history": seq}


def test_positive_is_left_out_and_sample_is_a_seeded_subset():
    rule = HistoryRule(("seq_history",), sample=3, seed=1)
    pos = torch.tensor([2, 7])
    q = _query()
    history_mask(rule, q, pos, epoch=0)
    row0 = q["seq_history"][0]
    assert row0.shape == (3,) and 3 not in row0.tolist()  # item 2 (+1) was the positive
    assert set(row0.tolist()) <= {1, 2, 4, 5, 6} and (row0 > 0).all()
    assert sorted(q["seq_history"][1].tolist()) == [0, 0, 3]  # item 7 removed, 2 kept, padding
    again = _query()
    history_mask(rule, again, pos, epoch=0)
    assert torch.equal(again["seq_history"], q["seq_history"])
    draws = set()
    for epoch in range(8):
        other = _query()
        history_mask(rule, other, pos, epoch=epoch)
        draws.add(tuple(other["seq_history"][0].tolist()))
    assert len(draws) > 1  # redrawn every epoch


def test_whole_history_without_sampling():
    q = _query()
    history_mask(HistoryRule(("seq_history",)), q, torch.tensor([0, 2]), epoch=0)
    assert q["seq_history"].tolist() == [[0, 2, 3, 4, 5, 6], [0, 8, 0, 0, 0, 0]]


def test_own_items_mask_marks_other_positives_of_the_row():
    q = _query()
    pos = torch.tensor([2, 7])
    own = own_items_mask(q, ("seq_history",), pos)
    # Row 0 owns item 2 (its own positive: diagonal, not marked) but not item 7;
    # row 1 owns item 2 (row 0's positive) and 7 (its own).
    assert own.tolist() == [[False, False], [True, False]]
