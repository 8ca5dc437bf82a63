"""Dataset encoding, batching and logging helpers of the original, made safe for today's Python."""

import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm


def encode_dataset(*splits, encoder, workers=None):
    """Encode every field of every split that holds texts; other fields (labels) pass through.

    Called as the original: `encode_dataset(*[(trX1, trX2, trX3, trY), ...], encoder=text_encoder)`
    or with the splits in one tuple, `encode_dataset((train, valid, test), encoder=...)`.
    All texts go to the encoder in one call, so a large data set is spread over its worker
    processes at once; `workers` is passed on to `encoder.encode` when given.
    """
    if len(splits) == 1 and isinstance(splits[0], (list, tuple)) and splits[0] and isinstance(splits[0][0], tuple):
        splits = splits[0]
    texts = [text for split in splits for field in split if _holds_texts(field) for text in field]
    options = {} if workers is None else {"workers": workers}
    ids = iter(encoder.encode(texts, verbose=False, **options) if texts else [])
    return [[[next(ids) for _ in field] if _holds_texts(field) else field for field in split] for split in splits]


def _holds_texts(field):
    return len(field) > 0 and isinstance(field[0], str)


def stsb_label_encoding(labels, nclass=6):
    """Soft labels for a score in [0, nclass - 1] (Tai, Socher and Manning's Tree-LSTM encoding)."""
    Y = np.zeros((len(labels), nclass), dtype=np.float32)
    for j, y in enumerate(labels):
        low = int(np.floor(y))
        Y[j, low] = low - y + 1
        if low + 1 < nclass:
            Y[j, low + 1] = y - low
    return Y


def np_softmax(x, t=1):
    x = np.asarray(x) / t
    x = x - np.max(x, axis=-1, keepdims=True)
    ex = np.exp(x)
    return ex / np.sum(ex, axis=-1, keepdims=True)


def make_path(f):
    """Create the folder of file path `f` if needed; return `f`."""
    d = os.path.dirname(f)
    if d:
        os.makedirs(d, exist_ok=True)
    return f


def flatten(outer):
    return [el for inner in outer for el in inner]


def iter_data(*datas, n_batch=128, truncate=False, verbose=False, max_batches=float("inf")):
    """Batches of `n_batch` rows of each array (a tuple of slices when several are given).

    truncate=True drops the last partial batch. Ends with `return`, not `raise StopIteration`
    (an error inside generators since Python 3.7).
    """
    n = len(datas[0])
    if any(len(d) != n for d in datas):
        raise ValueError(f"iter_data: arrays of different lengths {[len(d) for d in datas]}")
    if truncate:
        n = (n // n_batch) * n_batch
    n = int(min(n, max_batches * n_batch))
    for n_done, i in enumerate(tqdm(range(0, n, n_batch), total=-(-n // n_batch), file=sys.stderr, ncols=80,
                                    leave=False, disable=not verbose)):
        if n_done >= max_batches:
            return
        if len(datas) == 1:
            yield datas[0][i:i + n_batch]
        else:
            yield tuple(d[i:i + n_batch] for d in datas)


class ResultLogger:
    """JSON-lines log: the first line holds the run's arguments, then one line per `log` call,
    flushed at once. `ResultLogger.reopen` continues an existing log (resumed runs)."""

    def __init__(self, path, *args, **kwargs):
        self.f_log = open(make_path(path), "w")
        kwargs.setdefault("time", time.time())
        self._write(kwargs)

    @classmethod
    def reopen(cls, path, keep_lines=None):
        """Append to the log at `path`, first dropping any line after the first `keep_lines`."""
        if keep_lines is not None:
            with open(path) as f:
                lines = f.readlines()[:keep_lines]
            with open(path, "w") as f:
                f.writelines(lines)
        logger = cls.__new__(cls)
        logger.f_log = open(path, "a")
        return logger

    def _write(self, record):
        self.f_log.write(json.dumps(record) + "\n")
        self.f_log.flush()

    def log(self, **kwargs):
        kwargs.setdefault("time", time.time())
        self._write(kwargs)

    def close(self):
        self.f_log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
