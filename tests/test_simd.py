"""The vector intrinsics of ``_simd`` on their own, against NumPy: lengths around the vector width, and values
placed just past each run that must never be read."""

import numpy as np
import pytest
from numba import njit

from conftest import TOLERANCE
from fastconv._simd import _run_products


@njit(cache=True)
def _products(a, a_starts, b, b_starts, blocks, rows, a_steps, b_steps, length, out):
    a_tuple = (a_starts[0], a_starts[1], a_starts[2], a_starts[3])
    b_tuple = (b_starts[0], b_starts[1], b_starts[2], b_starts[3], b_starts[4], b_starts[5])
    shape, a_pair, b_pair = (blocks, rows), (a_steps[0], a_steps[1]), (b_steps[0], b_steps[1])
    _run_products(a, a_tuple, b, b_tuple, shape, a_pair, b_pair, length, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 7, 8, 15, 16, 17, 28, 33])
def test_run_products_sums_every_product_of_the_runs(rng, dtype, length):
    """4 runs of ``a`` by 6 of ``b``, each over 2 blocks of 3 rows; NaN between the rows and the blocks and after
    the last: a masked last vector that read past its run would return NaN."""
    blocks, rows = 2, 3
    a_steps, b_steps = np.array([rows * (length + 5) + 3, length + 5]), np.array([rows * (length + 2) + 1, length + 2])
    a = np.full(4 * blocks * a_steps[0] + 64, np.nan, dtype)
    b = np.full(6 * blocks * b_steps[0] + 64, np.nan, dtype)
    a_starts = np.arange(4) * blocks * a_steps[0] + 1
    b_starts = np.arange(6) * blocks * b_steps[0]
    a_runs = np.empty((4, blocks, rows, length))
    b_runs = np.empty((6, blocks, rows, length))
    for runs, data, starts, steps in ((a_runs, a, a_starts, a_steps), (b_runs, b, b_starts, b_steps)):
        for i, start in enumerate(starts):
            for block in range(blocks):
                for row in range(rows):
                    first = start + block * steps[0] + row * steps[1]
                    values = rng.standard_normal(length).astype(dtype)
                    data[first : first + length] = values
                    runs[i, block, row] = values
    out = np.empty(24, dtype)
    _products(a, a_starts, b, b_starts, np.int64(blocks), np.int64(rows), a_steps, b_steps, np.int64(length), out)
    expected = np.einsum("ikrq,jkrq->ij", a_runs, b_runs).ravel()
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])
