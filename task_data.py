"""A task's data ready for training: its splits read, encoded (cached on disk), transformed into
token sequences (the paper's Figure 1, cut to n_ctx) and kept ragged, one EncodedSplit per split,
whose batches are laid out as the arrays X and M when they are drawn (batches.py)."""

import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass

import numpy as np

import text_utils
from batches import EncodedSplit
from datasets import DataError
from ragged import Ragged
from tasks import Specials, Task, add_specials
from utils import atomic_write, encode_dataset


@dataclass
class TaskData:
    """A task's encoded splits: name -> EncodedSplit (token sequences, labels: zeros where a split has
    none), in the order the task reads them, each split as read (titles, labels, submission names), and
    the fingerprint of the data as read (checkpoints record it)."""

    task: Task
    splits: dict
    specials: Specials
    n_ctx: int
    read: dict
    fingerprint: str = ""


def load_task_data(task, data_dir, text_encoder, max_ctx, cache_dir=None, note=print):
    """Read, encode (cached), transform (cut to max_ctx) every split of `task`. n_ctx becomes the
    longest sequence of any split, at most max_ctx (as the original does). What the readers skipped
    and how many examples were cut goes to `note`."""
    read = task.read(data_dir)
    for split in read.values():
        for line in split.notes:
            note(line)
    fingerprint = data_fingerprint(read)
    encoded = encode_cached([split.texts for split in read.values()], text_encoder, cache_dir, fingerprint)
    specials = add_specials(text_encoder, task.special_tokens)
    sequences, n_cut = {}, 0
    for name, texts in zip(read, encoded):
        try:
            sequences[name], cut = task.sequences(texts, specials, max_ctx)
        except ValueError as err:
            raise DataError(f"--n_ctx {max_ctx}: {err}") from None
        n_cut += cut
    del encoded  # the sequences hold their own copy of the tokens
    if n_cut:
        note(f"{n_cut} examples were cut to fit --n_ctx {max_ctx} ({task.cut_rule})")
    n_ctx = min(max(int(seqs.lengths.max(initial=0)) for seqs in sequences.values()), max_ctx)
    splits = {}
    for name, split in read.items():
        n_examples = len(sequences[name]) // task.n_sequences
        labels = split.labels if split.labels is not None else np.zeros(n_examples, np.int64)
        splits[name] = EncodedSplit(sequences[name], labels, task.n_sequences, n_ctx,
                                    specials.n_vocab + specials.n_special)
    return TaskData(task, splits, specials, n_ctx, read, fingerprint)


def data_fingerprint(read):
    """sha256 of every split as read (its name, texts, labels and index): --resume refuses data that
    changed under a checkpoint, and the encoding cache is keyed by it."""
    digest = hashlib.sha256()
    for name, split in read.items():
        digest.update(f"\0{name}/{len(split.texts)}\0".encode())
        for values in split.texts:
            digest.update(f"\0{len(values)}\0".encode())
            digest.update("\0".join(values).encode("utf-8", "surrogatepass"))
        if split.labels is not None:
            labels = np.ascontiguousarray(split.labels)
            digest.update(f"\0{labels.dtype}{labels.shape}\0".encode() + labels.tobytes())
        if split.index is not None:
            digest.update(repr([str(i) for i in split.index]).encode())
    return "sha256:" + digest.hexdigest()


def encode_cached(splits, text_encoder, cache_dir, fingerprint):
    """`encode_dataset` of the splits, each text field a Ragged of its texts' ids, cached on disk under
    a key made of the data's fingerprint and the vocabulary: a change to either encodes again. Stored
    as flat int arrays (no pickle), read as stored; a damaged cache file is a warning, encoded again
    and rewritten."""
    key = hashlib.sha256(f"{fingerprint}\n{vocabulary_key(text_encoder)}".encode()).hexdigest()
    text_fields = [(s, k) for s, split in enumerate(splits) for k, values in enumerate(split)
                   if len(values) and isinstance(values[0], str)]
    path = os.path.join(cache_dir, f"{key[:32]}.npz") if cache_dir else None
    if path and os.path.exists(path):
        try:
            return _read_cache(path, splits, text_fields)
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            cause = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"warning: the encoding cache {path} is damaged ({cause}); encoding again", file=sys.stderr)
    encoded = [list(split) for split in splits]
    fresh = encode_dataset(*splits, encoder=text_encoder)
    for s, k in text_fields:
        encoded[s][k], fresh[s][k] = Ragged.from_lists(fresh[s][k]), None  # each field's lists freed once copied
    if path:
        arrays = {}
        for s, k in text_fields:
            arrays[f"{s}_{k}_offsets"], arrays[f"{s}_{k}_ids"] = encoded[s][k].offsets(), encoded[s][k].ids
        try:
            atomic_write(path, lambda tmp: _save_npz(arrays, tmp))
        except OSError as err:  # the cache only saves time: the run goes on without it
            print(f"warning: could not write the encoding cache {path} ({getattr(err, 'cause', err)}); "
                  "encoding again next run", file=sys.stderr)
    return encoded


def _read_cache(path, splits, text_fields):
    """The encoded splits stored at `path`, each text field a Ragged of the stored arrays (zip's CRC-32
    checks every byte); ValueError where its arrays do not fit the texts."""
    encoded = [list(split) for split in splits]
    with np.load(path, allow_pickle=False) as stored:
        for s, k in text_fields:
            ids, offsets = stored[f"{s}_{k}_ids"], stored[f"{s}_{k}_offsets"]
            if len(offsets) != len(splits[s][k]) + 1 or offsets[0] != 0 or offsets[-1] != len(ids) or \
                    (np.diff(offsets) < 0).any():
                raise ValueError(f"the arrays of field {s}/{k} do not fit its {len(splits[s][k])} texts")
            encoded[s][k] = Ragged.from_offsets(ids, offsets)
    return encoded


def vocabulary_key(text_encoder):
    """What the ids depend on besides the texts: the vocabulary, the merges and the tokenizer code."""
    with open(text_utils.__file__, "rb") as f:
        code = hashlib.sha256(f.read()).hexdigest()
    return f"{text_encoder.fingerprint()}\n{code}"


def _save_npz(arrays, path):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
