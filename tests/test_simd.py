"""The vector intrinsics of ``_simd`` on their own, against NumPy: lengths around the vector width, and values
placed just past each run that must never be read."""

import numpy as np
import pytest
from numba import njit

from conftest import TOLERANCE
from fastconv._simd import _run_products


@njit(cache=True)
def _products(a, a_starts, b, b_starts, rows, a_stride, b_stride, length, out):
    a_tuple = (a_starts[0], a_starts[1], a_starts[2], a_starts[3])
    b_tuple = (b_starts[0], b_starts[1], b_starts[2], b_starts[3], b_starts[4], b_starts[5])
    _run_products(a, a_tuple, b, b_tuple, rows, a_stride, b_stride, length, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 7, 8, 15, 16, 17, 28, 33])
def test_run_products_sums_every_product_of_the_runs(rng, dtype, length):
    """4 runs of ``a`` by 6 of ``b`` over 3 rows; NaN between the rows and after the last: a masked last vector
    that read past its run would return NaN."""
    rows, a_stride, b_stride = 3, length + 5, length + 2
    a = np.full(4 * rows * a_stride + 64, np.nan, dtype)
    b = np.full(6 * rows * b_stride + 64, np.nan, dtype)
    a_starts = np.arange(4) * rows * a_stride + 1
    b_starts = np.arange(6) * rows * b_stride
    a_runs = np.empty((4, rows, length))
    b_runs = np.empty((6, rows, length))
    for runs, data, starts, stride in ((a_runs, a, a_starts, a_stride), (b_runs, b, b_starts, b_stride)):
        for i, start in enumerate(starts):
            for row in range(rows):
                values = rng.standard_normal(length).astype(dtype)
                data[start + row * stride : start + row * stride + length] = values
                runs[i, row] = values
    out = np.empty(24, dtype)
    _products(a, a_starts, b, b_starts, np.int64(rows), np.int64(a_stride), np.int64(b_stride), np.int64(length), out)
    expected = np.einsum("irq,jrq->ij", a_runs, b_runs).ravel()
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])
