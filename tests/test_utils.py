"""utils: batching, logging and the original's small helpers."""

import json
import os
import re
import time

import numpy as np
import pytest

from utils import (
    ResultLogger,
    atomic_write,
    atomic_write_text,
    computed_ahead,
    encode_dataset,
    iter_data,
    json_lines,
    make_path,
    read_json,
    read_text_file,
    text_lines,
)


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


def test_make_path(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    assert make_path(str(target)) == str(target) and target.parent.is_dir()


def test_json_reads_name_the_file_line_and_column(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": [1, 2]}')  # a byte-order mark is dropped
    assert read_json(path) == {"a": [1, 2]}
    path.write_bytes(b'{"a":\n [1, 2}')
    with pytest.raises(KeyError, match=r"x.json, line 2, column 7: not valid JSON \(Expecting"):
        read_json(path, KeyError)
    path.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"x.json, line 1, column 11: not UTF-8 text \(byte 0xe9"):
        read_json(path)
    with pytest.raises(ValueError, match=r"^vocabulary file '.*none.json' not found$"):
        read_json(tmp_path / "none.json", what="vocabulary file")
    assert json_lines('{"a": 1}\n\n[2]\n', "x.jsonl") == [(1, {"a": 1}), (3, [2])]
    with pytest.raises(ValueError, match=r"^x.jsonl, line 2: not valid JSON"):
        json_lines('{"a": 1}\n{"b":\n', "x.jsonl")


def test_an_atomic_write_that_fails_leaves_neither_a_file_nor_its_temporary(tmp_path):
    target = tmp_path / "out" / "file.txt"
    atomic_write_text(str(target), "first")
    assert target.read_text() == "first"

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(str(target), fail)
    assert target.read_text() == "first" and os.listdir(target.parent) == ["file.txt"]


def test_reopening_a_log_rewrites_it_atomically_and_checks_its_length(tmp_path, monkeypatch):
    """A kill inside the rewrite left an empty log: now the old log stays whole until the rename."""
    from utils import ResultLogger

    path = tmp_path / "run.jsonl"
    original = '{"a": 1}\n{"b": 2}\n{"c": 3}\n'
    path.write_text(original)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ResultLogger.reopen(str(path), 2)
    assert path.read_text() == original and os.listdir(tmp_path) == ["run.jsonl"]
    monkeypatch.undo()
    logger = ResultLogger.reopen(str(path), 2)
    logger.log(d=4, time=0)
    logger.close()
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n{"d": 4, "time": 0}\n'
    with pytest.raises(ValueError, match=r"holds 3 lines but the checkpoint counted 5: it was cut or damaged"):
        ResultLogger.reopen(str(path), 5)
def test_text_lines_are_the_files_lines_read_one_at_a_time(tmp_path):
    """The lines `read_text_file` holds, split at every line end csv counts (\\n, \\r\\n, \\r), the
    byte-order mark dropped; the same one-line errors."""
    path = tmp_path / "x.tsv"
    path.write_bytes(b"\xef\xbb\xbfa\tb\r\nc\rd\n\n" + "é\t€".encode() + b"\nlast")
    assert list(text_lines(path)) == [(1, "a\tb"), (2, "c"), (3, "d"), (4, ""), (5, "é\t€"), (6, "last")]
    assert [line for _, line in text_lines(path)] == re.split(r"\r\n|\r|\n", read_text_file(path))
    lines = text_lines(path)
    assert next(lines) == (1, "a\tb")  # a generator: nothing read beyond what is used
    path.write_bytes(b"ok\nfine\r\nbad \xff here\n")
    with pytest.raises(LookupError, match=r"x.tsv, line 3, column 5: not UTF-8 text \(byte 0xff"):
        list(text_lines(path, LookupError))
    with pytest.raises(LookupError, match=r"^data file '.*none.tsv' not found$"):
        list(text_lines(tmp_path / "none.tsv", LookupError, what="data file"))


def test_computed_ahead_runs_ahead_in_order_and_raises_where_asked():
    calls = []
    results = computed_ahead(lambda x: calls.append(x) or x * x, range(10), ahead=2)
    assert next(results) == 0
    deadline = time.time() + 10
    while len(calls) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert calls == [0, 1, 2]  # while the caller holds the first result, the next two are computed, no more
    assert list(results) == [x * x for x in range(1, 10)]

    def fails_at_three(x):
        if x == 3:
            raise KeyError("three")
        return x

    results = computed_ahead(fails_at_three, range(10))
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="three"):
        next(results)
    assert list(computed_ahead(str, [])) == []
