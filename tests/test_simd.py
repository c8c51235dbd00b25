"""The vector intrinsics of ``_simd`` on their own, against NumPy: lengths around the vector width, and values
placed just past each run that must never be read."""

import numpy as np
import pytest
from numba import njit

from conftest import TOLERANCE
from fastconv._shifted import NARROW_TILE_TAPS, _taps_by_one_vector

TAPS = 5  # the tile's other taps repeat the last


@njit(cache=True)
def _tile(x, offsets, d, d0, blocks, x_steps, d_steps, length, d_stride, out):
    shape, x_pair, d_pair = (blocks[0], blocks[1]), (x_steps[0], x_steps[1]), (d_steps[0], d_steps[1])
    _taps_by_one_vector(x, np.int64(1), offsets, np.int64(0), d, d0, shape, x_pair, d_pair, length, d_stride, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 7, 16, 17])
def test_tap_filter_tile_sums_each_taps_products_with_each_filter(rng, dtype, length):
    """5 taps by one vector of filters, over 2 blocks of 3 rows of ``length`` pixels. NaN wherever the tile must
    not read: between the rows and the blocks, after the last, and in the other vector of filters of each
    pixel. The tile's taps past the 5th repeat the 5th."""
    lanes = 64 // np.dtype(dtype).itemsize
    blocks, rows = 2, 3
    x_steps = np.array([rows * (length + 5) + 3, length + 5])
    d_stride = 2 * lanes  # two vectors of filters a pixel: the tile reads the second
    d_steps = np.array([(rows * (length + 1) + 1) * d_stride, (length + 1) * d_stride])
    offsets = np.arange(TAPS) * blocks * x_steps[0]
    x = np.full(1 + TAPS * blocks * x_steps[0] + 64, np.nan, dtype)
    d = np.full(blocks * d_steps[0] + 64, np.nan, dtype)
    taps = np.empty((TAPS, blocks, rows, length))
    filters = np.empty((lanes, blocks, rows, length))
    for block in range(blocks):
        for row in range(rows):
            for t in range(TAPS):
                first = 1 + offsets[t] + block * x_steps[0] + row * x_steps[1]
                x[first : first + length] = taps[t, block, row] = rng.standard_normal(length).astype(dtype)
            for q in range(length):
                first = lanes + block * d_steps[0] + row * d_steps[1] + q * d_stride
                d[first : first + lanes] = filters[:, block, row, q] = rng.standard_normal(lanes).astype(dtype)
    out = np.full(NARROW_TILE_TAPS * lanes, np.nan, dtype)
    _tile(x, offsets, d, np.int64(lanes), np.array([blocks, rows]), x_steps, d_steps, np.int64(length),
          np.int64(d_stride), out)  # fmt: skip
    expected = np.einsum("tbrq,fbrq->tf", taps, filters)
    expected = expected[np.minimum(np.arange(NARROW_TILE_TAPS), TAPS - 1)].ravel()
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])
