"""The worked example of ../shared/seed/, exactly: a 5x5 input and a 3x3 filter."""

import numpy as np
import pytest

import fastconv
from fastconv import reference

X = np.array([[3, 3, 2, 1, 0], [0, 0, 1, 3, 1], [3, 1, 2, 2, 3], [2, 0, 0, 2, 2], [2, 0, 0, 0, 1]])[None, None]
W = np.array([[0, 1, 2], [2, 2, 0], [0, 1, 2]])[None, None]
Y = np.array([[12, 12, 17], [10, 17, 19], [9, 6, 14]])[None, None]
ONES_3 = np.ones((1, 1, 3, 3))


@pytest.fixture(params=[fastconv, reference], ids=["fastconv", "reference"])
def lib(request):
    return request.param


def test_forward(lib):
    np.testing.assert_array_equal(lib.conv2d(X, W), Y)


def test_gradients_under_ones(lib):
    dx, dw, db = lib.conv2d_backward(X, W, ONES_3)
    np.testing.assert_array_equal(dw[0, 0], [[15, 15, 15], [9, 11, 16], [10, 7, 12]])
    np.testing.assert_array_equal(
        dx[0, 0], [[0, 1, 3, 3, 2], [2, 5, 7, 5, 2], [2, 6, 10, 8, 4], [2, 5, 7, 5, 2], [0, 1, 3, 3, 2]]
    )
    np.testing.assert_array_equal(db, [9])
    np.testing.assert_array_equal(lib.conv2d_input(X.shape, W, ONES_3), dx)
    np.testing.assert_array_equal(lib.conv2d_weight(X, W.shape, ONES_3), dw)


def test_transposed_convolution(lib):
    expected = [
        [0, 12, 36, 41, 34],
        [24, 58, 95, 87, 38],
        [20, 75, 132, 105, 62],
        [18, 40, 77, 81, 38],
        [0, 9, 24, 26, 28],
    ]
    np.testing.assert_array_equal(lib.conv_transpose2d(Y, W)[0, 0], expected)


def test_transposed_convolution_gradients_under_ones(lib):
    dx, dw, db = lib.conv_transpose2d_backward(Y, W, np.ones((1, 1, 5, 5)))
    np.testing.assert_array_equal(dw, np.full((1, 1, 3, 3), Y.sum()))  # 116 everywhere
    assert Y.sum() == 116
    np.testing.assert_array_equal(dx, np.full((1, 1, 3, 3), W.sum()))  # 10 everywhere
    np.testing.assert_array_equal(db, [25])
