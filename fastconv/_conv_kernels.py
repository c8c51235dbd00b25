"""Convolution drivers: implicit im2col / col2im around the blocked GEMM, per group and block.

The forward and input-gradient drivers are Python loops over groups and GEMM blocks (a few kernel calls per
layer): a compiled driver would link and re-optimise every kernel it calls, seconds of compile time for no
speed. The weight gradient's driver is compiled: it runs a parallel loop of serial GEMMs.
Arrays are C-contiguous and of one dtype (float32 or float64); outputs are allocated and initialised by the
caller. ``geometry`` is ``(sh, sw, pt, pl, dh, dw)``. Every GEMM runs over the output pixels of the whole
batch (see ``_im2col.py``), so small images make one wide GEMM. The forward pass and the weight gradient pack
their patches straight from the input (no column buffer); the input gradient's column buffer holds
``rows_per_chunk`` output rows at a time.

With ``Kg = K / groups``, ``Cg = C / groups`` and ``col`` the ``(Cg*R*S) x (N*P*Q)`` patch matrix of one group,
and every image's ``(K, P*Q)`` output side by side as one ``K x N*P*Q`` matrix, the three contractions are::

    # Forward:         [Kg, Cg*R*S] [Cg*R*S, N*P*Q] -> [Kg, N*P*Q]        y  = W @ col
    # Input gradient:  [Cg*R*S, Kg] [Kg, N*P*Q]     -> [Cg*R*S, N*P*Q]    dx = col2im(W.T @ dy)
    # Weight gradient: [Kg, N*P*Q]  [N*P*Q, Cg*R*S] -> [Kg, Cg*R*S]       dW = dy @ col.T (col never built)
"""

import numpy as np
from numba import njit, prange

from ._gemm import (
    FALSE,
    TRUE,
    ZERO,
    _gemm_packed,
    _macro_kernel,
    _macro_kernel_serial,
    _n_tiles,
    _pack_a_serial,
    _pack_b,
    _packed_a_size,
    _packed_b_size,
)
from ._im2col import _col2im, _pack_b_patches, _pack_b_patches_transposed, _pack_b_patches_transposed_serial
from .config import KC, NC, WEIGHT_GRAD_CHUNKS


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
        # Serial: weights are small next to the GEMM, and a parallel loop here costs seconds of compile time.
        if transpose:
            _pack_a_serial(w_mat[g : g + 1].transpose(0, 2, 1), ZERO, m, ZERO, k, ap[g])
        else:
            _pack_a_serial(w_mat[g : g + 1], ZERO, m, ZERO, k, ap[g])
    return ap


@njit(cache=True)
def _column_buffer(crs, rows_per_chunk, n_rows, Q, dtype):
    """The column buffer of a chunk, as a blocked matrix of one block, and the rows per chunk it allows."""
    rows = min(rows_per_chunk, n_rows)
    return np.empty((1, crs, rows * Q), dtype=dtype), rows


def _conv2d_forward(x, weight, geometry, groups, accumulate, y):
    """``y (+)= conv2d(x, weight)``: x (N, C, H, W), weight (K, Cg, R, S), y (N, K, P, Q).

    With ``accumulate`` the result is added to ``y`` (which holds the bias); without, ``y`` is overwritten and
    need not be initialised (it must have C * R * S > 0 then).

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
                _macro_kernel(ap[g], Kg, pc, kc, bp, nc, y_blocks, g * Kg, jc, bool(accumulate or pc > 0))


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
def _weight_grad_chunks(Kg, crs, groups, pixels):
    """How many pixel ranges the weight gradient is split into (1: parallel over its tiles instead).

    A gradient with many (ic, jr) tiles keeps both cores busy in every GEMM; one with few (Kg = 64 filters of
    Cg*R*S = 576 taps make 9) is split over the pixels instead, up to WEIGHT_GRAD_CHUNKS ranges of at least KC
    pixels. Depends on the shape alone, so the result does not depend on the thread count.
    """
    if groups * _n_tiles(Kg, min(crs, NC)) >= 4 * WEIGHT_GRAD_CHUNKS:
        return 1
    return max(1, min(WEIGHT_GRAD_CHUNKS, pixels // KC))


@njit(parallel=True, cache=True)
def _conv2d_weight(x, grad_output, geometry, groups, grad_weight):
    """``grad_weight = conv2d_weight(x, grad_output)``: grad_weight (K, Cg, R, S) is overwritten.

    B, the transposed patch matrix, is packed straight from ``x``. With many tiles, each GEMM is parallel over
    them. With few, the sum over output pixels is split into fixed, contiguous ranges, each one thread's
    serial GEMM into a partial sum of its own, and the partial sums are added in order. Either way no two
    threads add into one element and the order of every sum is fixed. Footprint: one partial weight gradient
    and one packed panel of A and of B per range.
    """
    N, K, P, Q = grad_output.shape
    _, Cg, R, S = grad_weight.shape
    Kg = K // groups
    crs = Cg * R * S
    pixels = N * P * Q
    chunks = _weight_grad_chunks(Kg, crs, groups, pixels)
    partial = np.zeros((chunks, groups, Kg, crs), dtype=grad_weight.dtype)
    ap = np.empty((chunks, _packed_a_size(Kg, KC)), dtype=grad_weight.dtype)
    bp = np.empty((chunks, _packed_b_size(crs)), dtype=grad_weight.dtype)
    dy_blocks = grad_output.reshape(N, K, P * Q)
    if chunks == 1:
        for g in range(groups):
            for pc in range(0, pixels, KC):
                kc = min(KC, pixels - pc)
                _pack_a_serial(dy_blocks, g * Kg, Kg, pc, kc, ap[0])  # Kg x KC: small next to the GEMM
                for jc in range(0, crs, NC):
                    nc = min(NC, crs - jc)
                    _pack_b_patches_transposed(x, g * Cg, R, S, geometry, P, Q, pc, kc, jc, nc, bp[0])
                    _macro_kernel(ap[0], Kg, ZERO, kc, bp[0], nc, partial[0], ZERO, g * crs + jc, TRUE)
    else:
        for i in prange(chunks):
            for g in range(groups):
                for pc in range(i * pixels // chunks, (i + 1) * pixels // chunks, KC):
                    kc = min(KC, (i + 1) * pixels // chunks - pc)
                    _pack_a_serial(dy_blocks, g * Kg, Kg, pc, kc, ap[i])
                    for jc in range(0, crs, NC):
                        nc = min(NC, crs - jc)
                        _pack_b_patches_transposed_serial(x, g * Cg, R, S, geometry, P, Q, pc, kc, jc, nc, bp[i])
                        _macro_kernel_serial(ap[i], Kg, ZERO, kc, bp[i], nc, partial[i], ZERO, g * crs + jc, TRUE)
    dw = grad_weight.reshape(groups, Kg, crs)
    dw[:] = partial[0]
    for i in range(1, chunks):
        dw += partial[i]
