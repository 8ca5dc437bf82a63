"""task_data: a task's splits read, encoded (cached, following the data and the vocabulary), cut to
n_ctx and kept ragged; n_ctx is the longest sequence, at most the flag's; the batches hold what the
padded arrays of the whole split held."""

import random
import re
import shutil

import numpy as np
import pytest

import task_data
from conftest import padded_arrays, reference_sequences
from datasets import ROC_TEST, DataError
from synthetic import synthetic_story, write_synthetic
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
        assert first.splits[name].sequences.tolist() == again.splits[name].sequences.tolist()
    path = data / ROC_TEST
    path.write_text(path.read_text().replace("smiled", "grinned"))
    changed = load()
    assert calls == [1]  # the data changed: encoded again
    assert changed.splits["test"].sequences.tolist() != first.splits["test"].sequences.tolist()


def test_n_ctx_is_the_longest_sequence_up_to_the_flag(roc_files):
    task = get_task("rocstories").configured(n_valid=40)
    data = load_task_data(task, str(roc_files / "data"), encoder(roc_files), 512)
    longest = max(int(split.longest().max()) for split in data.splits.values())
    assert data.n_ctx == longest and data.specials.n_special == 3
    X, M, Y = data.splits["train"].batch(np.arange(80), mode="plain")
    assert X.shape == (80, 2, longest, 2) and Y.dtype == np.int64 and set(np.unique(Y)) <= {0, 1}
    assert (data.splits["test"].labels == data.read["test"].labels).all()  # the synthetic test file has labels
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
        assert fresh.splits[name].sequences.tolist() == again.splits[name].sequences.tolist()
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
@pytest.mark.parametrize("name", ["rocstories", "qqp", "race", "lm"])
def test_every_split_holds_the_padded_arrays_of_the_dense_path(roc_files, tmp_path, name):
    """Each split, laid out whole at n_ctx, equals the arrays the data path built before it kept
    sequences ragged: the encoded texts (the same encoder), Figure 1 example by example
    (conftest.reference_sequences) and the padded layout (conftest.padded_arrays); labels alike."""
    if name == "rocstories":
        task, folder = get_task("rocstories").configured(n_valid=40), str(roc_files / "data")
    elif name == "lm":
        rng = random.Random(0)
        (tmp_path / "a.txt").write_text("\n".join(" ".join(synthetic_story(rng)[0]) for _ in range(60)))
        task, folder = get_task("lm"), str(tmp_path)
    else:
        task, folder = get_task(name), write_synthetic(name, str(tmp_path), 40, 12, 12, seed=2)
    text_encoder = encoder(roc_files)
    data = load_task_data(task, folder, text_encoder, 64 if name != "lm" else 24)
    for key, split in task.read(folder).items():
        texts = [text_encoder.encode(field, verbose=False) for field in split.texts]
        if name == "lm":
            stream = [i for ids in texts[0] for i in ids]
            seqs = [[stream[k * 24:(k + 1) * 24]] for k in range(len(stream) // 24)]
        else:
            seqs, _ = reference_sequences(task, texts, data.specials, 64)
        X, M = padded_arrays(seqs, data.n_ctx, data.specials.n_vocab + data.specials.n_special)
        ours = data.splits[key]
        x, m, y = ours.batch(np.arange(len(ours)), mode="plain")
        np.testing.assert_array_equal(x, X)
        np.testing.assert_array_equal(m, M)
        labels = split.labels if split.labels is not None else np.zeros(len(seqs), np.int64)
        assert np.array_equal(y, labels) and y.dtype == labels.dtype
