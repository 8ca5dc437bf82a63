"""utils: batching, logging and the original's small helpers."""

import json

import numpy as np
import pytest

from utils import ResultLogger, encode_dataset, flatten, iter_data, make_path, np_softmax, stsb_label_encoding


def test_iter_data_batches_and_ends_cleanly():
    a, b = np.arange(10), np.arange(10) * 2
    batches = list(iter_data(a, b, n_batch=4))
    assert [x.tolist() for x, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [y.tolist() for _, y in batches][1] == [8, 10, 12, 14]
    assert [x.tolist() for x in iter_data(a, n_batch=4, truncate=True)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(list(iter_data(a, n_batch=2, max_batches=3))) == 3
    assert list(iter_data(a, n_batch=3, verbose=True))[-1].tolist() == [9]
    with pytest.raises(ValueError, match="different lengths"):
        list(iter_data(a, a[:3]))


def test_result_logger(tmp_path):
    path = tmp_path / "log" / "run.jsonl"
    with ResultLogger(str(path), lr=0.1, desc="x") as logger:
        logger.log(n_epochs=1, va_acc=50.0)
        assert len(path.read_text().splitlines()) == 2  # flushed at once
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["lr"] == 0.1 and "time" in lines[0] and lines[1]["va_acc"] == 50.0
    with ResultLogger.reopen(str(path), keep_lines=1) as logger:
        logger.log(n_epochs=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("n_epochs") for line in lines] == [None, 2]


class FakeEncoder:
    """Ids = word lengths; records each call's texts and options."""

    def __init__(self):
        self.calls = []

    def encode(self, texts, verbose=True, **options):
        self.calls.append((list(texts), options))
        return [[len(w) for w in t.split()] for t in texts]


def test_encode_dataset_encodes_texts_only():
    train = (["a bb", "ccc"], ["dd"] * 2, np.array([0, 1]))
    valid = (["e"], ["ff gg"], np.array([1]))
    (tr, va) = encode_dataset(*[train, valid], encoder=FakeEncoder())
    assert tr[0] == [[1, 2], [3]] and va[1] == [[2, 2]] and tr[2].tolist() == [0, 1]
    assert encode_dataset((train, valid), encoder=FakeEncoder())[1][1] == [[2, 2]]


def test_encode_dataset_sends_all_texts_in_one_call():
    train = (["a bb", "ccc"], ["dd"] * 2, np.array([0, 1]))
    test = (["e"], ["ff gg"])
    encoder = FakeEncoder()
    (tr, te) = encode_dataset(train, test, encoder=encoder, workers=3)
    assert encoder.calls == [(["a bb", "ccc", "dd", "dd", "e", "ff gg"], {"workers": 3})]
    assert (tr[0], tr[1], te[0], te[1]) == ([[1, 2], [3]], [[2], [2]], [[1]], [[2, 2]])
    encoder = FakeEncoder()
    encode_dataset(train, encoder=encoder)
    assert encoder.calls[0][1] == {}  # encoders without a `workers` option still work


def test_small_helpers(tmp_path):
    np.testing.assert_allclose(np_softmax(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]], rtol=1e-15)  # measured 0
    np.testing.assert_allclose(stsb_label_encoding([2.4, 5.0]), [[0, 0, 0.6, 0.4, 0, 0], [0, 0, 0, 0, 0, 1]],
                               atol=2e-7)  # measured 2.4e-08: 0.6 rounded to float32
    assert flatten([[1, 2], [], [3]]) == [1, 2, 3]
    target = tmp_path / "a" / "b" / "c.txt"
    assert make_path(str(target)) == str(target) and target.parent.is_dir()
