"""Convolution drivers: im2col / col2im around the blocked GEMM, per group and chunk of output rows.

Each driver is one compiled function, so a call costs one dispatch whatever the batch size and group count.
Arrays are C-contiguous and of one dtype (float32 or float64); outputs are allocated and initialised by the
caller. ``geometry`` is ``(sh, sw, pt, pl, dh, dw)``; ``rows_per_chunk`` bounds the column buffer at
``Cg * R * S * rows_per_chunk * Q`` values. A chunk is a range of output rows of the whole batch (see
``_im2col``), so small images are batched into one wide GEMM.

With ``Kg = K / groups``, ``Cg = C / groups`` and ``col`` the ``(Cg*R*S) x (N*P*Q)`` patch matrix of one group,
and every image's ``(K, P*Q)`` output side by side as one ``K x N*P*Q`` matrix, the three contractions are::

    # Forward:         [Kg, Cg*R*S] [Cg*R*S, N*P*Q] -> [Kg, N*P*Q]        y  = W @ col
    # Input gradient:  [Cg*R*S, Kg] [Kg, N*P*Q]     -> [Cg*R*S, N*P*Q]    dx = col2im(W.T @ dy)
    # Weight gradient: [Kg, N*P*Q]  [N*P*Q, Cg*R*S] -> [Kg, Cg*R*S]       dW = dy @ col.T
"""

import numpy as np
from numba import njit

from ._gemm import FALSE, TRUE, ZERO, _gemm_packed, _macro_kernel, _pack_a, _pack_b, _packed_a_size, _packed_b_size
from ._im2col import _col2im, _im2col, _pack_b_patches
from .config import KC, NC


@njit(cache=True)
def _pack_weights(weight, groups, transpose):
    """Pack each group's weight matrix ``[Kg, Cg*R*S]`` (or its transpose) as the GEMM's A, once per call."""
    K, Cg, R, S = weight.shape
    Kg = K // groups
    crs = Cg * R * S
    w_mat = weight.reshape(groups, Kg, crs)
    m, k = (crs, Kg) if transpose else (Kg, crs)
    ap = np.empty((groups, _packed_a_size(m, k)), dtype=weight.dtype)
    for g in range(groups):
        if transpose:
            _pack_a(w_mat[g : g + 1].transpose(0, 2, 1), ZERO, m, ZERO, k, ap[g])
        else:
            _pack_a(w_mat[g : g + 1], ZERO, m, ZERO, k, ap[g])
    return ap


@njit(cache=True)
def _column_buffer(crs, rows_per_chunk, n_rows, Q, dtype):
    """The column buffer of a chunk, as a blocked matrix of one block, and the rows per chunk it allows."""
    rows = min(rows_per_chunk, n_rows)
    return np.empty((1, crs, rows * Q), dtype=dtype), rows


@njit(cache=True)
def _conv2d_forward(x, weight, geometry, groups, y):
    """``y += conv2d(x, weight)``: x (N, C, H, W), weight (K, Cg, R, S), y (N, K, P, Q) holding the bias.

    Implicit im2col: each KC x NC panel of the patch matrix is packed straight from ``x``, so the only scratch
    is one packed panel, whatever the image size.
    """
    N = x.shape[0]
    K, Cg, R, S = weight.shape
    _, _, P, Q = y.shape
    Kg = K // groups
    crs = Cg * R * S
    ap = _pack_weights(weight, groups, FALSE)
    bp = np.empty(_packed_b_size(N * P * Q), dtype=y.dtype)
    y_blocks = y.reshape(N, K, P * Q)
    # A 1x1, stride-1, unpadded convolution's patch matrix is the input itself: pack it as a plain matrix.
    # (conv_transpose2d's input gradient can ask for fewer output rows than the input has: not then.)
    pointwise = R == 1 and S == 1 and geometry[:4] == (1, 1, 0, 0) and (P, Q) == x.shape[2:]
    x_blocks = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    for g in range(groups):
        for jc in range(0, N * P * Q, NC):
            nc = min(NC, N * P * Q - jc)
            for pc in range(0, crs, KC):
                kc = min(KC, crs - pc)
                if pointwise:
                    _pack_b(x_blocks, g * Cg, ZERO, pc, kc, jc, nc, bp)
                else:
                    _pack_b_patches(x, g * Cg, R, S, geometry, P, Q, pc, kc, jc, nc, bp)
                _macro_kernel(ap[g], Kg, pc, kc, bp, nc, y_blocks, g * Kg, jc, TRUE)


@njit(cache=True)
def _conv2d_input(grad_output, weight, geometry, groups, rows_per_chunk, grad_input):
    """``grad_input += conv2d_input(grad_output, weight)``; grad_input (N, C, H, W) holds zeros on entry."""
    N, K, P, Q = grad_output.shape
    _, Cg, R, S = weight.shape
    Kg = K // groups
    crs = Cg * R * S
    ap = _pack_weights(weight, groups, TRUE)
    col, rows = _column_buffer(crs, rows_per_chunk, N * P, Q, grad_input.dtype)
    bp = np.empty(_packed_b_size(rows * Q), dtype=grad_input.dtype)
    dy_blocks = grad_output.reshape(N, K, P * Q)
    for g in range(groups):
        for t0 in range(0, N * P, rows):
            t1 = min(N * P, t0 + rows)
            n = (t1 - t0) * Q
            _gemm_packed(ap[g], crs, Kg, dy_blocks, g * Kg, t0 * Q, n, col, ZERO, ZERO, FALSE, bp)
            _col2im(col[0], R, S, geometry, t0, t1, P, Q, grad_input, g * Cg)


@njit(cache=True)
def _conv2d_weight(x, grad_output, geometry, groups, rows_per_chunk, grad_weight):
    """``grad_weight += conv2d_weight(x, grad_output)``; grad_weight (K, Cg, R, S) holds zeros on entry.

    Chunks are added in a fixed order, so the sum does not depend on the number of threads.
    """
    N, K, P, Q = grad_output.shape
    _, Cg, R, S = grad_weight.shape
    Kg = K // groups
    crs = Cg * R * S
    col, rows = _column_buffer(crs, rows_per_chunk, N * P, Q, grad_weight.dtype)
    ap = np.empty(_packed_a_size(Kg, rows * Q), dtype=grad_weight.dtype)
    bp = np.empty(_packed_b_size(crs), dtype=grad_weight.dtype)
    dy_blocks = grad_output.reshape(N, K, P * Q)
    dw_blocks = grad_weight.reshape(groups, Kg, crs)
    for g in range(groups):
        for t0 in range(0, N * P, rows):
            t1 = min(N * P, t0 + rows)
            n = (t1 - t0) * Q
            _im2col(x, g * Cg, R, S, geometry, t0, t1, P, Q, col[0])
            _pack_a(dy_blocks, g * Kg, Kg, t0 * Q, n, ap)
            _gemm_packed(ap, Kg, n, col.transpose(0, 2, 1), ZERO, ZERO, crs, dw_blocks, ZERO, g * crs, TRUE, bp)
