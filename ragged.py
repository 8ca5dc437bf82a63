"""Rows of token ids of different lengths kept in one flat int32 array, without padding: the form of
encoded texts, of a task's token sequences and of a split's examples until a batch is laid out
(batches.py). Built and cut with numpy, never a Python loop per token."""

from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 1 << 16  # rows copied at once by `join`: bounds its temporary index arrays


@dataclass(frozen=True)
class Ragged:
    """Row i is ids[starts[i]:starts[i] + lengths[i]]. Rows may share ids or leave some unused (a cut
    keeps its rows' starts and shortens their lengths)."""

    ids: np.ndarray      # int32
    starts: np.ndarray   # int64 [n]
    lengths: np.ndarray  # int64 [n]

    @staticmethod
    def from_offsets(ids, offsets):
        """Rows laid end to end: row i is ids[offsets[i]:offsets[i + 1]]."""
        offsets = np.asarray(offsets, dtype=np.int64)
        return Ragged(np.asarray(ids, dtype=np.int32), offsets[:-1], np.diff(offsets))

    @staticmethod
    def from_lists(rows):
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        ids = np.fromiter((i for row in rows for i in row), dtype=np.int32, count=int(lengths.sum()))
        return Ragged.from_offsets(ids, np.concatenate([[0], np.cumsum(lengths)]))

    @staticmethod
    def fixed(ids, length):
        """Consecutive rows of `length` ids each (the last, partial one dropped)."""
        n = len(ids) // length
        return Ragged(np.asarray(ids[:n * length], dtype=np.int32), np.arange(n, dtype=np.int64) * length,
                      np.full(n, length, dtype=np.int64))

    def __len__(self):
        return len(self.lengths)

    def row(self, i):
        return self.ids[self.starts[i]:self.starts[i] + self.lengths[i]]

    def tolist(self):
        return [self.row(i).tolist() for i in range(len(self))]

    def cut(self, lengths):
        """Each row's first lengths[i] ids (lengths[i] at most the row's length)."""
        return Ragged(self.ids, self.starts, np.minimum(self.lengths, lengths))

    def take(self, rows):
        """The rows `rows` (an index array), sharing the ids."""
        return Ragged(self.ids, self.starts[rows], self.lengths[rows])

    def compact(self):
        """The same rows laid end to end in an ids array of their own (what a file stores)."""
        return join([[self]])

    def offsets(self):
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)


def join(sequences):
    """Per example, each of `sequences` made of its parts laid end to end: a part is a Ragged of one
    row per example (that row) or an int (that token). One Ragged of n x len(sequences) rows,
    example-major (example 0's sequences first), in an ids array of its own."""
    n = next(len(part) for parts in sequences for part in parts if isinstance(part, Ragged))
    per_sequence = [sum(part.lengths if isinstance(part, Ragged) else 1 for part in parts) for parts in sequences]
    lengths = np.stack([np.broadcast_to(np.asarray(x, dtype=np.int64), (n,)) for x in per_sequence], axis=1)
    offsets = np.concatenate([[0], np.cumsum(lengths.reshape(-1))]).astype(np.int64)
    ids = np.empty(offsets[-1], dtype=np.int32)
    starts = offsets[:-1].reshape(n, len(sequences))
    for j, parts in enumerate(sequences):
        at = starts[:, j].copy()  # where each example's next part goes
        for part in parts:
            if isinstance(part, Ragged):
                _copy_rows(ids, at, part)
                at += part.lengths
            else:
                ids[at] = part
                at += 1
    return Ragged(ids, offsets[:-1], lengths.reshape(-1))


def _copy_rows(out, at, part):
    """out[at[i]:at[i] + part.lengths[i]] = part.row(i) for every row, in blocks of rows."""
    for block in range(0, len(part), BLOCK_ROWS):
        rows = slice(block, block + BLOCK_ROWS)
        lengths = part.lengths[rows]
        total = int(lengths.sum())
        if total == 0:
            continue
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[np.repeat(at[rows], lengths) + within] = part.ids[np.repeat(part.starts[rows], lengths) + within]
