"""ragged: rows of ids of different lengths in one flat array, built, cut and joined with numpy."""

import numpy as np
import pytest

import ragged
from ragged import Ragged, join


def random_rows(rng, n, longest=12):
    return [rng.integers(0, 100, rng.integers(0, longest)).tolist() for _ in range(n)]


def test_rows_come_back_as_given_cut_and_taken():
    rows = [[5, 6, 7], [], [8], [9, 10]]
    r = Ragged.from_lists(rows)
    assert r.ids.dtype == np.int32 and r.tolist() == rows and len(r) == 4 and r.offsets().tolist() == [0, 3, 3, 4, 6]
    assert r.cut(np.array([2, 5, 0, 1])).tolist() == [[5, 6], [], [], [9]]  # never longer than the row
    assert r.cut(1).tolist() == [[5], [], [8], [9]]
    assert r.take(np.array([3, 0])).tolist() == [[9, 10], [5, 6, 7]]
    assert r.take(np.array([3, 0])).compact().ids.tolist() == [9, 10, 5, 6, 7]
    assert Ragged.fixed(np.arange(7), 3).tolist() == [[0, 1, 2], [3, 4, 5]]  # the partial last row dropped
    assert Ragged.from_offsets([1, 2, 3], [0, 1, 3]).tolist() == [[1], [2, 3]]


@pytest.mark.parametrize("block_rows", [ragged.BLOCK_ROWS, 7])
def test_join_lays_each_examples_sequences_end_to_end(monkeypatch, block_rows):
    """Sequences written out by Python list concatenation, example after example."""
    monkeypatch.setattr(ragged, "BLOCK_ROWS", block_rows)
    rng = np.random.default_rng(0)
    a, b = random_rows(rng, 50), random_rows(rng, 50)
    a_cut = Ragged.from_lists(a).cut(rng.integers(0, 12, 50))
    joined = join([[-1, a_cut, -2, Ragged.from_lists(b), -3], [-1, Ragged.from_lists(b), -3]])
    expected = []
    for x, y in zip(a_cut.tolist(), b):
        expected += [[-1, *x, -2, *y, -3], [-1, *y, -3]]
    assert joined.tolist() == expected
    assert np.array_equal(joined.starts, joined.offsets()[:-1])  # laid end to end, example-major
