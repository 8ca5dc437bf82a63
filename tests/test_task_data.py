"""task_data: a task's splits read, encoded (cached, following the data and the vocabulary), cut to
n_ctx and laid out; n_ctx is the longest sequence, at most the flag's."""

import re
import shutil

import numpy as np
import pytest

import task_data
from datasets import ROC_TEST, DataError
from task_data import load_task_data
from tasks import get_task
from text_utils import TextEncoder


def encoder(roc_files):
    return TextEncoder(str(roc_files / "model" / "encoder.json"), str(roc_files / "model" / "vocab.bpe"))


def test_encoding_is_cached_and_follows_the_data(roc_files, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(roc_files / "data", data)
    task = get_task("rocstories").configured(n_valid=40)
    load = lambda: load_task_data(task, str(data), encoder(roc_files), 512, str(tmp_path / "cache"))
    first = load()
    calls = []
    real = task_data.encode_dataset
    monkeypatch.setattr(task_data, "encode_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = load()
    assert calls == []  # read from the cache
    for name in first.splits:
        np.testing.assert_array_equal(first.splits[name][0], again.splits[name][0])
    path = data / ROC_TEST
    path.write_text(path.read_text().replace("smiled", "grinned"))
    changed = load()
    assert calls == [1]  # the data changed: encoded again
    assert not np.array_equal(changed.splits["test"][0], first.splits["test"][0])


def test_n_ctx_is_the_longest_sequence_up_to_the_flag(roc_files):
    task = get_task("rocstories").configured(n_valid=40)
    data = load_task_data(task, str(roc_files / "data"), encoder(roc_files), 512)
    longest = max(int(M.sum(-1).max()) for _, M, _ in data.splits.values())
    assert data.n_ctx == longest and data.specials.n_special == 3
    X, M, Y = data.splits["train"]
    assert X.shape == (80, 2, longest, 2) and Y.dtype == np.int64 and set(np.unique(Y)) <= {0, 1}
    assert (data.splits["test"][2] == data.read["test"].labels).all()  # the synthetic test file has labels
    notes = []
    cut = load_task_data(task, str(roc_files / "data"), encoder(roc_files), 40, note=notes.append)
    assert cut.n_ctx <= 40 and notes and "were cut to fit --n_ctx 40 (the story and each ending" in notes[-1]
    with pytest.raises(DataError, match=r"^--n_ctx 5: n_ctx=5 is too small for a story and an ending"):
        load_task_data(task, str(roc_files / "data"), encoder(roc_files), 5)


def cache_file(folder):
    files = list(folder.glob("*.npz"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("damage", ["cut", "one byte", "empty", "other arrays"])
def test_a_damaged_cache_is_a_warning_and_is_encoded_again(roc_files, tmp_path, monkeypatch, capsys, damage):
    """A cut file or a changed byte was a zipfile.BadZipFile traceback on every later run, until the file was
    deleted by hand: now a warning, the same arrays as a fresh encoding, and the cache rewritten."""
    task = get_task("rocstories").configured(n_valid=40)
    cache = tmp_path / "cache"
    load = lambda: load_task_data(task, str(roc_files / "data"), encoder(roc_files), 512, str(cache))
    fresh = load()
    path = cache_file(cache)
    data = bytearray(path.read_bytes())
    if damage == "cut":
        data = data[:len(data) // 2]
    elif damage == "one byte":
        data[len(data) // 3] ^= 0x10
    elif damage == "empty":
        data = b""
    else:  # a valid archive whose arrays do not fit the texts
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **{name: np.zeros(3, np.int64) for name in np.load(path).files})
        data = buffer.getvalue()
    path.write_bytes(bytes(data))
    capsys.readouterr()
    again = load()
    err = capsys.readouterr().err
    assert re.fullmatch(rf"warning: the encoding cache {re.escape(str(path))} is damaged \(.+\); encoding again\n", err)
    for name in fresh.splits:
        np.testing.assert_array_equal(fresh.splits[name][0], again.splits[name][0])
    calls = []
    real = task_data.encode_dataset
    monkeypatch.setattr(task_data, "encode_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    load()
    assert calls == [] and capsys.readouterr().err == ""  # rewritten: read from the cache again


def test_the_fingerprint_follows_texts_labels_and_index(roc_files, tmp_path):
    task = get_task("rocstories").configured(n_valid=40)
    read = task.read(str(roc_files / "data"))
    base = task_data.data_fingerprint(read)
    assert base == task_data.data_fingerprint(task.read(str(roc_files / "data"))) and base.startswith("sha256:")
    read["valid"].labels[0] = 1 - read["valid"].labels[0]
    assert task_data.data_fingerprint(read) != base
