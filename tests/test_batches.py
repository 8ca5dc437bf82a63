"""batches: the arrays X and M, the host-made BatchPlan (which rows are real, which the LM scores,
where each `_classify_` is), the batch modes, and the checks made once per data set."""

import numpy as np
import pytest
import torch

from batches import BatchError, BatchPlan, PaddingLayout, check_split, make_batch, resolve_device, to_arrays
from tasks import Specials, get_task

SPECIALS = Specials(n_vocab=20, start=20, delimiter=21, clf_token=22)
CLF = SPECIALS.clf_token


def test_to_arrays_pads_and_numbers_positions():
    seqs, _ = get_task("stsb").sequences(([[1, 2], [3]], [[4], [5, 6, 7]]), SPECIALS, 512)
    X, M = to_arrays(seqs, 9, SPECIALS.n_vocab + SPECIALS.n_special)
    assert X.shape == (2, 2, 9, 2) and X.dtype == np.int64 and M.shape == (2, 2, 9) and M.dtype == np.float32
    for i, example in enumerate(seqs):
        for j, seq in enumerate(example):
            assert X[i, j, :len(seq), 0].tolist() == seq and not X[i, j, len(seq):, 0].any()
            assert M[i, j].tolist() == [1.0] * len(seq) + [0.0] * (9 - len(seq))
    np.testing.assert_array_equal(X[..., 1], np.broadcast_to(np.arange(23, 32), (2, 2, 9)))
    with pytest.raises(ValueError, match="example 1, sequence 0: 7 tokens do not fit n_ctx=6"):
        to_arrays(seqs, 6, 23)


def batch(lengths, T=8, seed=0):
    """X [n, 1, T, 2] whose sequences end in `_classify_` at their lengths, and M."""
    rng = np.random.default_rng(seed)
    seqs = [[[*rng.integers(0, 20, n - 1).tolist(), CLF]] for n in lengths]
    return to_arrays(seqs, T, 23)


def test_a_trimmed_plan_names_the_real_tokens_and_the_scored_rows():
    X, M = batch([3, 8, 5])
    plan = BatchPlan.build(X, M, CLF)
    keep = M.reshape(3, 8) > 0
    assert plan.layout.index.tolist() == np.flatnonzero(keep).tolist()
    scored = [(s, t) for s in range(3) for t in range(7) if keep[s, t + 1]]  # the next token is real
    assert plan.lm_rows.tolist() == [s * 8 + t for s, t in scored]
    assert plan.lm_targets.tolist() == [int(X[s, 0, t + 1, 0]) for s, t in scored]
    assert plan.lm_seq.tolist() == [s for s, _ in scored] and plan.lm_weights is None
    assert plan.lm_count.tolist() == [2.0, 7.0, 4.0]
    assert plan.clf_rows.tolist() == [2, 8 + 7, 16 + 4]  # each sequence's FIRST `_classify_`


def test_a_dense_plan_scores_every_row_with_its_weight():
    """The TF code's computation: every position but the last, each weighted by M[t + 1]."""
    X, M = batch([3, 8, 5])
    plan = BatchPlan.build(X, M, CLF, skip_padding=False)
    assert plan.layout is None
    assert plan.lm_rows.tolist() == [s * 8 + t for s in range(3) for t in range(7)]
    assert plan.lm_weights.tolist() == M.reshape(3, 8)[:, 1:].reshape(-1).tolist()
    assert plan.lm_count.tolist() == [2.0, 7.0, 4.0]
    no_lm = BatchPlan.build(X, M, None, lm=False)
    assert no_lm.lm_rows is None and no_lm.clf_rows is None


def test_batch_modes_cut_the_shared_padding_as_declared():
    X, M = batch([3, 9, 5], T=20)
    Y = np.array([0, 1, 0])
    assert make_batch(X, M, Y, CLF, "cpu").X.shape[-2] == 9  # trimmed: the longest sequence
    static = make_batch(X, M, Y, CLF, "cpu", mode="static")
    assert static.X.shape[-2] == 16 and static.plan.layout is None  # bucketed to a multiple of 8, every position
    plain = make_batch(X, M, Y, CLF, "cpu", mode="plain")
    assert plain.X.shape[-2] == 20 and plain.plan.lm_weights is not None and plain.Y.dtype == torch.long
    assert make_batch(X[:1], M[:1], None, CLF, "cpu").plan.layout is None  # nothing to skip: no layout


def test_a_layout_from_the_mask_on_the_device_agrees_with_the_hosts():
    _, M = batch([3, 8, 5])
    keep = M.reshape(3, 8) > 0
    host = PaddingLayout.from_host_mask(keep, "cpu")
    device = PaddingLayout.from_mask(torch.from_numpy(M), 3, 8)
    assert host.index.tolist() == device.index.tolist()
    x = torch.randn(3, 8, 4)
    packed = host.pack(x)
    assert packed.shape == (int(keep.sum()), 4)
    unpacked = host.unpack(packed)
    torch.testing.assert_close(unpacked[torch.from_numpy(keep)], x[torch.from_numpy(keep)], rtol=0, atol=0)
    assert (unpacked[~torch.from_numpy(keep)] == 0).all()


@pytest.mark.parametrize("change, match", [
    (lambda X, M: X.__setitem__((0, 0, 0, 0), 99), r"train: ids range over 0 \.\.\. 99 but the embedding has 40 rows"),
    (lambda X, M: X.__setitem__((1, 0, 7, 0), 3), r"train: 1 of 3 sequences have no classify token \(id 22\)"),
    (lambda X, M: M.__setitem__((2, 0, 1), 0), r"train: a mask has padding before real tokens"),
])
def test_a_split_the_model_cannot_take_is_one_line(change, match):
    X, M = batch([3, 8, 5])
    check_split("train", X, M, 40, CLF)  # as built: fine
    change(X, M)
    with pytest.raises(BatchError, match=match):
        check_split("train", X, M, 40, CLF)


def test_a_device_this_machine_lacks_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0").type == "cuda" and resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match=r"^--device cuda:1: this machine has 1 CUDA device\(s\)$"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"^--device 'gpu' is not a device name"):
        resolve_device("gpu")
