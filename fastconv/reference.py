"""Naive reference: every convolution function of fastconv as plain direct loops.

Same names, signatures, checks and results as the fast functions, computed straight from the definitions
with no im2col, no GEMM and nothing shared with the fast kernels. Loops accumulate in float64 whatever the
result dtype. Slow by design (compiled by Numba, serial): use it to check, not to compute.

Examples
--------
>>> import numpy as np
>>> import fastconv
>>> x, w = np.random.rand(2, 3, 9, 9), np.random.rand(4, 3, 3, 3)
>>> np.allclose(fastconv.conv2d(x, w, padding=1), fastconv.reference.conv2d(x, w, padding=1))
True
"""

import numpy as np
from numba import njit

from . import _validate as v

__all__ = [
    "conv2d",
    "conv2d_backward",
    "conv2d_input",
    "conv2d_weight",
    "conv_transpose2d",
    "conv_transpose2d_backward",
]


@njit(cache=True)
def _conv2d_loops(x, w, geometry, groups, y):
    """y[n, k, p, q] += sum over c, r, s of x[n, g*Cg + c, p*sh - pt + r*dh, q*sw - pl + s*dw] * w[k, c, r, s]."""
    N, _, H, W = x.shape
    K, Cg, R, S = w.shape
    P, Q = y.shape[2], y.shape[3]
    sh, sw, pt, pl, dh, dw = geometry
    Kg = K // groups
    for n in range(N):
        for k in range(K):
            g = k // Kg
            for p in range(P):
                for q in range(Q):
                    total = 0.0
                    for c in range(Cg):
                        for r in range(R):
                            for s in range(S):
                                h = p * sh - pt + r * dh
                                wi = q * sw - pl + s * dw
                                if 0 <= h < H and 0 <= wi < W:
                                    total += x[n, g * Cg + c, h, wi] * w[k, c, r, s]
                    y[n, k, p, q] += total


@njit(cache=True)
def _conv2d_grad_loops(x, w, dy, geometry, groups, dx, dw):
    """Scatter each output gradient to every input and weight element that produced it."""
    N, _, H, W = x.shape
    K, Cg, R, S = w.shape
    P, Q = dy.shape[2], dy.shape[3]
    sh, sw, pt, pl, dh, ddw = geometry
    Kg = K // groups
    for n in range(N):
        for k in range(K):
            g = k // Kg
            for p in range(P):
                for q in range(Q):
                    for c in range(Cg):
                        for r in range(R):
                            for s in range(S):
                                h = p * sh - pt + r * dh
                                wi = q * sw - pl + s * ddw
                                if 0 <= h < H and 0 <= wi < W:
                                    dx[n, g * Cg + c, h, wi] += dy[n, k, p, q] * w[k, c, r, s]
                                    dw[k, c, r, s] += dy[n, k, p, q] * x[n, g * Cg + c, h, wi]


@njit(cache=True)
def _transpose_loops(x, w, stride, padding, dilation, groups, y):
    """y[n, g*Cog + o, i*sh - ph + r*dh, j*sw - pw + s*dw] += x[n, ci, i, j] * w[ci, o, r, s]."""
    N, C_in, H, W = x.shape
    _, Cog, R, S = w.shape
    OH, OW = y.shape[2], y.shape[3]
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    Cig = C_in // groups
    for n in range(N):
        for ci in range(C_in):
            g = ci // Cig
            for i in range(H):
                for j in range(W):
                    for o in range(Cog):
                        for r in range(R):
                            for s in range(S):
                                oh = i * sh - ph + r * dh
                                ow = j * sw - pw + s * dw
                                if 0 <= oh < OH and 0 <= ow < OW:
                                    y[n, g * Cog + o, oh, ow] += x[n, ci, i, j] * w[ci, o, r, s]


@njit(cache=True)
def _transpose_grad_loops(x, w, dy, stride, padding, dilation, groups, dx, dw):
    """Gather, for each input and weight element of conv_transpose2d, the output gradients it reaches."""
    N, C_in, H, W = x.shape
    _, Cog, R, S = w.shape
    OH, OW = dy.shape[2], dy.shape[3]
    sh, sw = stride
    ph, pw = padding
    dh, ddw = dilation
    Cig = C_in // groups
    for n in range(N):
        for ci in range(C_in):
            g = ci // Cig
            for i in range(H):
                for j in range(W):
                    for o in range(Cog):
                        for r in range(R):
                            for s in range(S):
                                oh = i * sh - ph + r * dh
                                ow = j * sw - pw + s * ddw
                                if 0 <= oh < OH and 0 <= ow < OW:
                                    dx[n, ci, i, j] += dy[n, g * Cog + o, oh, ow] * w[ci, o, r, s]
                                    dw[ci, o, r, s] += dy[n, g * Cog + o, oh, ow] * x[n, ci, i, j]


def _f64(array):
    return np.ascontiguousarray(array, dtype=np.float64)


def _with_bias(y, bias):
    if bias is not None:
        y += _f64(bias).reshape(1, -1, 1, 1)
    return y


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Direct-loop :func:`fastconv.conv2d`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), padding=1)[0, 0, 0]
    array([4., 6., 6., 4.])
    """
    x = v.as_array("input", input)
    weight, geometry, batched = v.parse_conv2d("conv2d", x.shape, weight, stride, padding, dilation, groups)
    bias = v.check_bias(bias, weight.shape[0], weight.shape)
    dtype = v.result_dtype(input=x, weight=weight, bias=bias)
    y = np.zeros(geometry.output_shape)
    _conv2d_loops(_f64(x.reshape(geometry.input_shape)), _f64(weight), geometry.kernel_geometry, geometry.groups, y)
    return v.unbatch(_with_bias(y, bias).astype(dtype), batched)


def _conv2d_grads(x, weight, dy, geometry):
    dx = np.zeros(geometry.input_shape)
    dw = np.zeros(geometry.weight_shape)
    _conv2d_grad_loops(_f64(x), _f64(weight), _f64(dy), geometry.kernel_geometry, geometry.groups, dx, dw)
    return dx, dw


def conv2d_input(input_size, weight, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """Direct-loop :func:`fastconv.conv2d_input`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.conv2d_input((1, 1, 3, 3), np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)))[0, 0]
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    """
    size = v.shape_tuple("input_size", input_size, (3, 4))
    weight, geometry, batched = v.parse_conv2d(
        "conv2d_input", size, weight, stride, padding, dilation, groups, "input_size"
    )
    dy = v.batched_grad_output(grad_output, geometry.output_shape, batched, "conv2d_input")
    dtype = v.result_dtype(weight=weight, grad_output=dy)
    dx, _ = _conv2d_grads(np.zeros(geometry.input_shape), weight, dy, geometry)
    return v.unbatch(dx.astype(dtype), batched)


def conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """Direct-loop :func:`fastconv.conv2d_weight`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.conv2d_weight(np.ones((1, 1, 3, 3)), (1, 1, 2, 2), np.ones((1, 1, 2, 2)))[0, 0]
    array([[4., 4.],
           [4., 4.]])
    """
    x = v.as_array("input", input)
    size = v.shape_tuple("weight_size", weight_size, (4,))
    shape4, batched = v.batched_input("input", x.shape, "conv2d_weight")
    geometry = v.conv2d_geometry("conv2d_weight", shape4, size, stride, padding, dilation, groups)
    dy = v.batched_grad_output(grad_output, geometry.output_shape, batched, "conv2d_weight")
    dtype = v.result_dtype(input=x, grad_output=dy)
    _, dw = _conv2d_grads(x.reshape(shape4), np.zeros(size), dy, geometry)
    return dw.astype(dtype)


def conv2d_backward(input, weight, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """Direct-loop :func:`fastconv.conv2d_backward`: ``(grad_input, grad_weight, grad_bias)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> dx, dw, db = reference.conv2d_backward(np.ones((1, 2, 3, 3)), np.ones((1, 2, 3, 3)), np.ones((1, 1, 1, 1)))
    >>> db
    array([1.])
    """
    x = v.as_array("input", input)
    weight, geometry, batched = v.parse_conv2d("conv2d_backward", x.shape, weight, stride, padding, dilation, groups)
    dy = v.batched_grad_output(grad_output, geometry.output_shape, batched, "conv2d_backward")
    dtype = v.result_dtype(input=x, weight=weight, grad_output=dy)
    dx, dw = _conv2d_grads(x.reshape(geometry.input_shape), weight, dy, geometry)
    db = _f64(dy).sum(axis=(0, 2, 3))
    return v.unbatch(dx.astype(dtype), batched), dw.astype(dtype), db.astype(dtype)


def _transpose_parameters(geometry):
    (ph, _), (pw, _) = geometry.padding
    return geometry.stride, (ph, pw), geometry.dilation, geometry.groups


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Direct-loop :func:`fastconv.conv_transpose2d`, written from its own definition.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.conv_transpose2d(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)))[0, 0]
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    """
    x, weight, geometry, batched = v.parse_transpose(
        "conv_transpose2d", input, weight, stride, padding, output_padding, groups, dilation
    )
    bias = v.check_bias(bias, geometry.input_shape[1], weight.shape)
    dtype = v.result_dtype(input=x, weight=weight, bias=bias)
    y = np.zeros(geometry.input_shape)
    _transpose_loops(_f64(x), _f64(weight), *_transpose_parameters(geometry), y)
    return v.unbatch(_with_bias(y, bias).astype(dtype), batched)


def conv_transpose2d_backward(input, weight, grad_output, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Direct-loop :func:`fastconv.conv_transpose2d_backward`: ``(grad_input, grad_weight, grad_bias)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> x, w, dy = np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 3))
    >>> dx, dw, db = reference.conv_transpose2d_backward(x, w, dy)
    >>> dx[0, 0], db
    (array([[4., 4.],
           [4., 4.]]), array([9.]))
    """
    x, weight, geometry, batched = v.parse_transpose(
        "conv_transpose2d_backward", input, weight, stride, padding, output_padding, groups, dilation
    )
    dy = v.batched_grad_output(grad_output, geometry.input_shape, batched, "conv_transpose2d_backward")
    dtype = v.result_dtype(input=x, weight=weight, grad_output=dy)
    dx = np.zeros(x.shape)
    dw = np.zeros(weight.shape)
    _transpose_grad_loops(_f64(x), _f64(weight), _f64(dy), *_transpose_parameters(geometry), dx, dw)
    db = _f64(dy).sum(axis=(0, 2, 3))
    return v.unbatch(dx.astype(dtype), batched), dw.astype(dtype), db.astype(dtype)
