"""batches: a split's examples kept ragged and laid out per batch as the padded arrays gave them, the
host-made BatchPlan (which rows are real, which the LM scores, where each `_classify_` is), the batch
modes, and the checks made once per data set."""

import numpy as np
import pytest
import torch

from batches import BatchError, BatchPlan, EncodedSplit, PaddingLayout, check_split, make_batch, resolve_device
from conftest import padded_arrays, sequences_of
from ragged import Ragged
from tasks import Specials, get_task

SPECIALS = Specials(n_vocab=20, start=20, delimiter=21, clf_token=22)
CLF = SPECIALS.clf_token


def encoded(seqs, labels, n_ctx, n_token_rows=23):
    """An EncodedSplit of per-example, per-sequence id lists."""
    rows = [seq for example in seqs for seq in example]
    return EncodedSplit(Ragged.from_lists(rows), np.asarray(labels), len(seqs[0]), n_ctx, n_token_rows)


def test_a_batch_is_laid_out_padded_with_its_positions():
    seqs, _ = sequences_of(get_task("stsb"), ([[1, 2], [3], [4, 5, 6, 7, 8]], [[4], [5, 6, 7], [9]]), SPECIALS, 512)
    split = encoded(seqs, [0.5, 2.0, 4.0], 12)
    X, M, Y = split.batch([1, 0])
    assert X.shape == (2, 2, 7, 2) and X.dtype == np.int64 and M.shape == (2, 2, 7) and M.dtype == np.float32
    for i, example in enumerate([seqs[1], seqs[0]]):  # the examples asked for, in that order
        for j, seq in enumerate(example):
            assert X[i, j, :len(seq), 0].tolist() == seq and not X[i, j, len(seq):, 0].any()
            assert M[i, j].tolist() == [1.0] * len(seq) + [0.0] * (7 - len(seq))
    np.testing.assert_array_equal(X[..., 1], np.broadcast_to(np.arange(23, 30), (2, 2, 7)))
    assert Y.tolist() == [2.0, 0.5] and len(split) == 3 and split.longest().tolist() == [6, 7, 9]
    assert split.batch([2], mode="static")[0].shape == (1, 2, 12, 2)  # 9 bucketed to 16, at most n_ctx
    assert split.batch([0], mode="plain")[0].shape == (1, 2, 12, 2)
    head = split.head(2)
    assert len(head) == 2 and np.array_equal(head.batch([1])[0], split.batch([1])[0])


@pytest.mark.parametrize("mode", ["trimmed", "static", "plain"])
def test_every_batch_holds_the_numbers_of_the_padded_arrays(mode):
    """Any examples, in any order: the arrays the whole split's padded arrays gave for them, less the
    columns make_batch then cut (padding in every sequence), so the same Batch and plan."""
    rng = np.random.default_rng(3)
    seqs = [[[*rng.integers(0, 20, rng.integers(1, 30)).tolist(), CLF] for _ in range(2)] for _ in range(40)]
    labels = rng.integers(0, 2, 40)
    X, M = padded_arrays(seqs, 40, 23)
    split = encoded(seqs, labels, 40)
    for _ in range(10):
        idx = rng.permutation(40)[:rng.integers(1, 12)]
        x, m, y = split.batch(idx, mode)
        width = x.shape[-2]
        np.testing.assert_array_equal(x, X[idx][..., :width, :])
        np.testing.assert_array_equal(m, M[idx][..., :width])
        assert not M[idx][..., width:].any() and np.array_equal(y, labels[idx])
        ours, dense = make_batch(x, m, y, CLF, "cpu", mode), make_batch(X[idx], M[idx], labels[idx], CLF, "cpu", mode)
        for name in ("X", "M", "Y"):
            assert torch.equal(getattr(ours, name), getattr(dense, name))
        for name in ("clf_rows", "lm_rows", "lm_targets", "lm_weights", "lm_seq", "lm_count"):
            a, b = getattr(ours.plan, name), getattr(dense.plan, name)
            assert (a is None and b is None) or torch.equal(a, b), name


def test_a_split_from_padded_arrays_gives_them_back():
    rng = np.random.default_rng(1)
    seqs = [[[*rng.integers(0, 20, rng.integers(1, 9)).tolist(), CLF]] for _ in range(6)]
    X, M = padded_arrays(seqs, 10, 23)
    split = EncodedSplit.from_padded(X, M, np.arange(6))
    x, m, y = split.batch(np.arange(6), mode="plain")
    assert np.array_equal(x, X) and np.array_equal(m, M) and y.tolist() == list(range(6))


def batch(lengths, T=8, seed=0):
    """X [n, 1, T, 2] whose sequences end in `_classify_` at their lengths, and M."""
    rng = np.random.default_rng(seed)
    seqs = [[[*rng.integers(0, 20, n - 1).tolist(), CLF]] for n in lengths]
    return padded_arrays(seqs, T, 23)


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
    (lambda ids: ids.__setitem__(1, 99), r"^train: ids range over 0 \.\.\. 99 but the embedding has 40 rows$"),
    (lambda ids: ids.__setitem__(3 + 7, 3), r"^train: 1 of 3 sequences have no classify token \(id 22\); first ones "
                                            r"\(flattened index\): \[1\]"),
])
def test_a_split_the_model_cannot_take_is_one_line(change, match):
    rng = np.random.default_rng(0)
    seqs = [[[*rng.integers(1, 20, n - 1).tolist(), CLF]] for n in (3, 8, 5)]
    split = encoded(seqs, [0, 1, 0], 8)
    split.sequences.ids[0] = 0
    check_split("train", split, 40, CLF)  # as built: fine
    change(split.sequences.ids)
    with pytest.raises(BatchError, match=match):
        check_split("train", split, 40, CLF)


def test_a_device_this_machine_lacks_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0").type == "cuda" and resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match=r"^--device cuda:1: this machine has 1 CUDA device\(s\)$"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"^--device 'gpu' is not a device name"):
        resolve_device("gpu")
