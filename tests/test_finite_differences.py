"""Every gradient against central finite differences of the forward function, in float64."""

import numpy as np
import pytest

import fastconv

EPS = 1e-6


def numerical_gradient(f, array, upstream):
    """d <f(array), upstream> / d array, by central differences, one element at a time."""
    grad = np.zeros_like(array)
    flat, flat_grad = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + EPS
        plus = np.vdot(f(array), upstream)
        flat[i] = saved - EPS
        minus = np.vdot(f(array), upstream)
        flat[i] = saved
        flat_grad[i] = (plus - minus) / (2 * EPS)
    return grad


CONFIGS = [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=(2, 1), padding=((1, 0), (2, 1)), dilation=1, groups=2),
    dict(stride=1, padding="same", dilation=(2, 1), groups=1),
    dict(stride=2, padding=1, dilation=1, groups=4),
]


@pytest.mark.parametrize("params", CONFIGS)
def test_conv2d_gradients(rng, params):
    x = rng.standard_normal((2, 4, 6, 5))
    w = rng.standard_normal((4, 4 // params["groups"], 3, 2))
    b = rng.standard_normal(4)
    dy = rng.standard_normal(fastconv.conv2d(x, w, b, **params).shape)
    dx, dw, db = fastconv.conv2d_backward(x, w, dy, **params)
    np.testing.assert_allclose(dx, numerical_gradient(lambda a: fastconv.conv2d(a, w, b, **params), x, dy), atol=1e-6)
    np.testing.assert_allclose(dw, numerical_gradient(lambda a: fastconv.conv2d(x, a, b, **params), w, dy), atol=1e-6)
    np.testing.assert_allclose(db, numerical_gradient(lambda a: fastconv.conv2d(x, w, a, **params), b, dy), atol=1e-6)


TRANSPOSE_CONFIGS = [
    dict(stride=1, padding=0, output_padding=0, groups=1, dilation=1),
    dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1),
    dict(stride=(1, 3), padding=(0, 1), output_padding=(1, 2), groups=1, dilation=(2, 1)),
]


@pytest.mark.parametrize("params", TRANSPOSE_CONFIGS)
def test_conv_transpose2d_gradients(rng, params):
    x = rng.standard_normal((2, 4, 4, 3))
    w = rng.standard_normal((4, 6 // params["groups"], 3, 2))
    b = rng.standard_normal(6)
    dy = rng.standard_normal(fastconv.conv_transpose2d(x, w, b, **params).shape)
    dx, dw, db = fastconv.conv_transpose2d_backward(x, w, dy, **params)
    f = fastconv.conv_transpose2d
    np.testing.assert_allclose(dx, numerical_gradient(lambda a: f(a, w, b, **params), x, dy), atol=1e-6)
    np.testing.assert_allclose(dw, numerical_gradient(lambda a: f(x, a, b, **params), w, dy), atol=1e-6)
    np.testing.assert_allclose(db, numerical_gradient(lambda a: f(x, w, a, **params), b, dy), atol=1e-6)
