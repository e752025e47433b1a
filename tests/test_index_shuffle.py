"""`data.index_shuffle.permutation` gives grain's shuffle order, every position at once."""

import grain
import numpy as np
import pytest

from xmodal_jax.data import index_shuffle


def grains(n: int, seed: int) -> np.ndarray:
    shuffle = grain.experimental.index_shuffle
    return np.array([shuffle(i, n - 1, seed, 4) for i in range(n)], np.int64)


@pytest.mark.parametrize("n", [2, 3, 17, 256, 1000, 5000])
@pytest.mark.parametrize("seed", [0, 7, 2**31, 2**32 - 1])
def test_permutation_is_grains(n, seed):
    got = index_shuffle.permutation(n, seed)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, grains(n, seed))
    np.testing.assert_array_equal(np.sort(got), np.arange(n))


@pytest.mark.parametrize("n", [65537, 70001])  # blocks of 18 bits (past the 16-bit minimum)
def test_permutation_is_grains_on_wider_blocks(n):
    np.testing.assert_array_equal(index_shuffle.permutation(n, 12345), grains(n, 12345))


def test_one_row_and_no_rows():
    np.testing.assert_array_equal(index_shuffle.permutation(1, 3), [0])
    assert index_shuffle.permutation(0, 3).shape == (0,)


def test_grains_own_shuffle_reads_rows_in_this_order():
    """What `MapDataset.shuffle(seed)` yields in epoch e is row `permutation(n, seed + e)[i]`."""
    n, seed = 300, 11
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    for epoch in range(3):
        got = [ds[epoch * n + i] for i in range(n)]
        np.testing.assert_array_equal(got, index_shuffle.permutation(n, seed + epoch))
