"""Convolution drivers: im2col / col2im around the blocked GEMM, per image, group and chunk of output rows.

Each driver is one compiled function, so a call costs one dispatch whatever the batch size and group count.
Arrays are C-contiguous and of one dtype (float32 or float64); outputs are allocated and initialised by the
caller. ``geometry`` is ``(sh, sw, pt, pl, dh, dw)``; ``rows_per_chunk`` bounds the column buffer at
``Cg * R * S * rows_per_chunk * Q`` values.

With ``Kg = K / groups``, ``Cg = C / groups`` and ``col`` the ``(Cg*R*S) x (P*Q)`` patch matrix of one image and
group, the three contractions are::

    # Forward:         [Kg, Cg*R*S] [Cg*R*S, P*Q] -> [Kg, P*Q]        y  = W @ col
    # Input gradient:  [Cg*R*S, Kg] [Kg, P*Q]     -> [Cg*R*S, P*Q]    dx = col2im(W.T @ dy)
    # Weight gradient: [Kg, P*Q]    [P*Q, Cg*R*S] -> [Kg, Cg*R*S]     dW = sum over images of dy @ col.T
"""

import numpy as np
from numba import njit

from ._gemm import _gemm_packed, _pack_a, _packed_a_size, _packed_b_size
from ._im2col import _col2im, _im2col


@njit(cache=True)
def _pack_weights(w_mat, transpose):
    """Pack each group's weight matrix (or its transpose) as the GEMM's A, once per call."""
    groups, Kg, crs = w_mat.shape
    m, k = (crs, Kg) if transpose else (Kg, crs)
    ap = np.empty((groups, _packed_a_size(m, k)), dtype=w_mat.dtype)
    for g in range(groups):
        if transpose:
            _pack_a(w_mat[g].T, ap[g])
        else:
            _pack_a(w_mat[g], ap[g])
    return ap


@njit(cache=True)
def _conv2d_forward(x, weight, geometry, groups, rows_per_chunk, y):
    """``y += conv2d(x, weight)``: x (N, C, H, W), weight (K, Cg, R, S), y (N, K, P, Q) holding the bias."""
    N = x.shape[0]
    K, Cg, R, S = weight.shape
    _, _, P, Q = y.shape
    Kg = K // groups
    crs = Cg * R * S
    ap = _pack_weights(weight.reshape(groups, Kg, crs), False)
    rows = min(rows_per_chunk, P)
    col = np.empty(crs * rows * Q, dtype=y.dtype)
    bp = np.empty(_packed_b_size(rows * Q), dtype=y.dtype)
    y_mat = y.reshape(N, K, P * Q)
    for n in range(N):
        for g in range(groups):
            for p0 in range(0, P, rows):
                p1 = min(P, p0 + rows)
                cols = col[: crs * (p1 - p0) * Q].reshape(crs, (p1 - p0) * Q)
                _im2col(x[n], g * Cg, R, S, geometry, p0, p1, Q, cols)
                _gemm_packed(ap[g], Kg, cols, 0, cols.shape[1], y_mat[n, g * Kg : (g + 1) * Kg], p0 * Q, True, bp)


@njit(cache=True)
def _conv2d_input(grad_output, weight, geometry, groups, rows_per_chunk, grad_input):
    """``grad_input += conv2d_input(grad_output, weight)``; grad_input (N, C, H, W) holds zeros on entry."""
    N, K, P, Q = grad_output.shape
    _, Cg, R, S = weight.shape
    Kg = K // groups
    crs = Cg * R * S
    ap = _pack_weights(weight.reshape(groups, Kg, crs), True)
    rows = min(rows_per_chunk, P)
    col = np.empty(crs * rows * Q, dtype=grad_input.dtype)
    bp = np.empty(_packed_b_size(rows * Q), dtype=grad_input.dtype)
    dy_mat = grad_output.reshape(N, K, P * Q)
    for n in range(N):
        for g in range(groups):
            for p0 in range(0, P, rows):
                p1 = min(P, p0 + rows)
                cols = col[: crs * (p1 - p0) * Q].reshape(crs, (p1 - p0) * Q)
                _gemm_packed(ap[g], crs, dy_mat[n, g * Kg : (g + 1) * Kg], p0 * Q, cols.shape[1], cols, 0, False, bp)
                _col2im(cols, R, S, geometry, p0, p1, Q, grad_input[n], g * Cg)


@njit(cache=True)
def _conv2d_weight(x, grad_output, geometry, groups, rows_per_chunk, grad_weight):
    """``grad_weight += conv2d_weight(x, grad_output)``; grad_weight (K, Cg, R, S) holds zeros on entry.

    Images and chunks are added in a fixed order, so the sum does not depend on the number of threads.
    """
    N, K, P, Q = grad_output.shape
    _, Cg, R, S = grad_weight.shape
    Kg = K // groups
    crs = Cg * R * S
    rows = min(rows_per_chunk, P)
    col = np.empty(crs * rows * Q, dtype=grad_weight.dtype)
    ap = np.empty(_packed_a_size(Kg, rows * Q), dtype=grad_weight.dtype)
    bp = np.empty(_packed_b_size(crs), dtype=grad_weight.dtype)
    dy_mat = grad_output.reshape(N, K, P * Q)
    dw_mat = grad_weight.reshape(groups, Kg, crs)
    for n in range(N):
        for g in range(groups):
            for p0 in range(0, P, rows):
                p1 = min(P, p0 + rows)
                cols = col[: crs * (p1 - p0) * Q].reshape(crs, (p1 - p0) * Q)
                _im2col(x[n], g * Cg, R, S, geometry, p0, p1, Q, cols)
                _pack_a(dy_mat[n, g * Kg : (g + 1) * Kg, p0 * Q : p1 * Q], ap)
                _gemm_packed(ap, Kg, cols.T, 0, crs, dw_mat[g], 0, True, bp)
