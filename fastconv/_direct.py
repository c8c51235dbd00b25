"""Direct convolution for many small groups (depthwise and the like), where a GEMM per group would be tiny.

With ``Kg = K / groups`` and ``Cg = C / groups`` of a handful each, one group's GEMM is a few rows by a few
dozen columns of shared dimension: the micro-kernel's MR x NR tile would be mostly padding. Direct loops do
the same arithmetic with no packing.

Each thread computes whole output planes ``(n, k)``. It splits each input channel of the plane's group into
``sh * sw`` zero-padded stride phases (space-to-depth), ``phase[a, b][i, j] = padded[i * sh + a, j * sw + b]``,
so that every tap ``(r, s)`` reads one phase at stride 1::

    out[p, q] += w[r, s] * phase[r*dh % sh, s*dw % sw][p + r*dh // sh, q + s*dw // sw]

and accumulates into a scratch plane as wide as a phase row (``Wq`` columns; those past Q are computed and
dropped), so a tap is one multiply-add over the whole flattened plane: a loop long enough for LLVM to
vectorise well, with no zero multiplied and no bounds test inside. The forward pass sums all taps of a block
of ``BLOCK`` values of that plane in registers before storing it.

Kernels here: the forward pass and the weight gradient. The input gradient is a forward pass of the
flipped filters over grad_output (``conv._input_grad_as_conv2d``).
"""

import functools
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from ._gemm import _data, _stack_tile
from ._parallel import PRANGE_ONLY
from ._scratch import per_thread, per_thread_length
from ._simd import _copy_run

_FASTMATH = {"contract"}

#: Values of the wide plane whose taps the forward pass sums in registers at a time: 8 AVX-512 registers of
#: float32, 16 of float64 (at most MR * NR, the stack tile's size). Measured, depthwise 3x3 (float32, 2
#: threads), against three taps per pass over the whole plane: 8x256x28x28 0.45 -> 0.38 ms, 8x512x14x14 0.33
#: -> 0.29, 8x1024x7x7 0.43 -> 0.33; 64 and 256 values per block were no better.
BLOCK = 128

#: Output rows of at most this many bytes are written by ``_simd._copy_run`` (whole vectors and a masked one),
#: longer ones by LLVM's loop. Measured, depthwise 3x3 forward (2 threads), both against LLVM's loop, float32:
#: 8x1024x7x7 0.36-0.38 -> 0.28-0.30 ms, 8x512x14x14 0.32-0.35 -> 0.21-0.27, 8x256x28x28 0.38-0.40 ->
#: 0.29-0.31, but 8x256x56x56 1.71-2.00 -> 2.03-2.26 ms (rows of 56: the stores into y, past the caches, are
#: slower as whole unaligned vectors); float64: 7x7 0.42-0.43 -> 0.36-0.37, 14x14 0.37-0.38 -> 0.34-0.35, but
#: 28x28 0.54-0.57 -> 0.56-0.63 ms.
SHORT_ROW_BYTES = 128


@njit(cache=True)
def _split_phases(image, sw, rows, cols, phases):
    """Write ``image`` (H x W) into the flat stride ``phases``, input row ``h`` from ``phases[rows[h]]`` on.

    ``rows[h]`` is -1 for a row no output reads; ``cols[b]`` holds, for the input columns of phase column
    ``b``, the first column, how many there are and where they start relative to the row. Tables, not
    divisions per row: those cost more than the copy. Only the input's own pixels are written: the padding was
    zeroed once and stays zero, since every channel puts its pixels in the same places.
    """
    H, W = image.shape
    src = _data(image)
    dst = _data(phases)
    for h in range(H):
        start = rows[h]
        if start < 0:
            continue
        if sw == 1:  # a plain copy
            _copy_run(dst, start + cols[0, 2], src, h * W, cols[0, 1])
            continue
        for b in range(sw):
            first, count, to = h * W + cols[b, 0], cols[b, 1], start + cols[b, 2]
            for j in range(count):
                dst[to + j] = src[first + j * sw]


class _PhaseLayout(NamedTuple):
    """Where the stride phases of one input plane go, where each tap ``t = r * S + s`` reads in them, and each
    thread's scratch.

    A phase holds ``Hq`` rows of ``Wq`` values; tap ``t`` reads the wide plane's value ``o`` at ``tap_start[t]
    + o``; ``rows`` and ``cols`` are :func:`_split_phases`'s tables. ``phases`` (threads, at least sh * sw * Hq
    * Wq) and ``wide`` (threads, P * Wq rounded up to a whole ``BLOCK``) are zeros, one row per thread
    (``_scratch.per_thread``), long enough for the last block's taps to read past the last phase.
    """

    Wq: int
    tap_start: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    phases: np.ndarray
    wide: np.ndarray


def _phase_layout(H, W, R, S, P, Q, geometry, dtype):
    Wq, tap_start, rows, cols, length, wide_size = _phase_tables(H, W, R, S, P, Q, geometry)
    phases = per_thread((length,), dtype, zeros=True, name="direct phases")
    wide = per_thread((wide_size,), dtype, zeros=True, name="direct rows")
    return _PhaseLayout(Wq, tap_start, rows, cols, phases, wide)


@functools.lru_cache(maxsize=64)
def _phase_tables(H, W, R, S, P, Q, geometry):
    """The index tables of :class:`_PhaseLayout` and the lengths of its scratch rows, kept for the next call
    of the same shape: computing them takes longer than the rest of a small layer's call."""
    sh, sw, pt, pl, dh, dw = geometry
    Hq = P + (R - 1) * dh // sh
    Wq = Q + (S - 1) * dw // sw
    phase_size = Hq * Wq
    r, s = np.divmod(np.arange(R * S), S)
    tap_start = ((r * dh % sh) * sw + s * dw % sw) * phase_size + (r * dh // sh) * Wq + s * dw // sw
    i, a = np.divmod(np.arange(H) + pt, sh)  # input row h is row i of the phases a * sw + b
    rows = np.where(i < Hq, a * sw * phase_size + i * Wq, -1)
    cols = np.zeros((sw, 3), np.int64)
    for b in range(sw):
        first = (b - pl) % sw  # input columns w with (w + pl) % sw == b, from the first one on
        j0 = (first + pl) // sw
        cols[b] = first, max(min(-(-(W - first) // sw), Wq - j0), 0), b * phase_size + j0
    wide_size = -(-P * Wq // BLOCK) * BLOCK
    length = max(sh * sw * phase_size, int(tap_start.max()) + wide_size)
    return Wq, tap_start.astype(np.int64), rows.astype(np.int64), cols, length, wide_size


def direct_workspace(geometry, dtype):
    """Bytes of scratch the direct kernels allocate: each thread's stride phases and wide plane."""
    _, _, H, W = geometry.input_shape
    _, _, P, Q = geometry.output_shape
    R, S = geometry.weight_shape[2:]
    _, _, _, _, length, wide_size = _phase_tables(H, W, R, S, P, Q, geometry.kernel_geometry)
    per_thread = per_thread_length(length, dtype) + per_thread_length(wide_size, dtype)
    return dtype.itemsize * numba.config.NUMBA_NUM_THREADS * per_thread


def conv2d_direct(x, weight, bias, geometry, groups, y):
    """``y = conv2d(x, weight) + bias`` by ``_conv2d_direct``, with its scratch."""
    layout = _phase_layout(*x.shape[2:], *weight.shape[2:], *y.shape[2:], geometry, y.dtype)
    _conv2d_direct(x, weight, bias, groups, *layout, y)


def conv2d_direct_weight(x, grad_output, geometry, groups, grad_weight):
    """``grad_weight = conv2d_weight(x, grad_output)`` by ``_conv2d_direct_weight``, with its scratch."""
    layout = _phase_layout(*x.shape[2:], *grad_weight.shape[2:], *grad_output.shape[2:], geometry, grad_weight.dtype)
    inside = _inside(*grad_output.shape[2:], layout.Wq)
    _conv2d_direct_weight(x, grad_output, groups, inside, *layout, grad_weight)


@functools.lru_cache(maxsize=64)
def _inside(P, Q, Wq):
    """Which values of the P x Wq wide plane are output pixels (column < Q)."""
    return np.tile(np.arange(Wq) < Q, P)


@njit(cache=True)
def _widen(plane, Wq, wide):
    """Copy a P x Q plane into the first Q columns of each Wq-wide row of ``wide`` (the rest stay zero)."""
    P, Q = plane.shape
    for p in range(P):
        dst = wide[p * Wq : p * Wq + Q]
        src = plane[p]
        for q in range(Q):
            dst[q] = src[q]


@njit(parallel=PRANGE_ONLY, fastmath={"contract", "reassoc"}, cache=True)
def _conv2d_direct_weight(x, grad_output, groups, inside, Wq, tap_start, rows, cols, phases, wide, grad_weight):
    """``grad_weight = conv2d_weight(x, grad_output)`` by direct loops, in parallel over output channels.

    Each thread owns the filters of whole output channels ``k`` and sums over the images in order: results do
    not depend on the thread count. Every tap is one dot product of the wide output-gradient plane with the
    stride phase it reads (``reassoc`` lets LLVM vectorise those sums). Footprint per thread: the phases of
    one input channel and one wide plane.
    """
    N, K, P, Q = grad_output.shape
    _, Cg, R, S = grad_weight.shape
    sw = cols.shape[0]
    Kg = K // groups
    size = P * Wq
    zero = grad_weight.dtype.type(0)  # sums in the dtype of the result, as LLVM vectorises them
    for k in prange(K):
        thread = numba.get_thread_id()
        c0 = k // Kg * Cg
        src = phases[thread]
        dy = wide[thread]
        taps = grad_weight[k]  # zeros on entry
        for n in range(N):
            _widen(grad_output[n, k], Wq, dy)
            for c in range(Cg):
                _split_phases(x[n, c0 + c], sw, rows, cols, src)
                for t in range(R * S):
                    row = src[tap_start[t] : tap_start[t] + size]
                    total = zero
                    for o in range(size):
                        # The wide plane's columns past Q hold zeros of dy, but read pixels no output of this
                        # tap reads: 0 * inf would make a NaN. A select, not a branch: LLVM vectorises it.
                        total += dy[o] * row[o] if inside[o] else zero
                    taps[c, t // S, t % S] += total


@njit(parallel=PRANGE_ONLY, fastmath=_FASTMATH, cache=True)
def _conv2d_direct(x, weight, bias, groups, Wq, tap_start, rows, cols, phases, wide, y):
    """``y = conv2d(x, weight) + bias`` by direct loops, in parallel over output planes ``(n, k)``.

    ``y`` is written, never read: one pass over the output, the least memory traffic a memory-bound layer
    allows. Each thread owns whole planes of ``y``, so no element is written by two threads, and each is
    summed in the order bias, ``(c, r, s)`` whatever the thread count. Footprint per thread: the stride phases
    of one input channel and one wide output plane, ``O(H * W)`` values.
    """
    N = x.shape[0]
    K, Cg, R, S = weight.shape
    P, Q = y.shape[2], y.shape[3]
    sw = cols.shape[0]
    Kg = K // groups
    for plane in prange(N * K):
        thread = numba.get_thread_id()
        n = plane // K
        k = plane % K
        c0 = k // Kg * Cg
        src = phases[thread]
        phase_values = _data(src)
        acc = wide[thread]
        tile = numba.carray(_stack_tile(y.dtype), (BLOCK,))
        b = bias[k]
        for c in range(Cg):
            _split_phases(x[n, c0 + c], sw, rows, cols, src)
            taps = weight[k, c].ravel()
            for o in range(0, P * Wq, BLOCK):
                block = acc[o : o + BLOCK]
                for j in range(BLOCK):
                    tile[j] = block[j] if c else b  # the bias first, as the GEMM path adds it
                for t in range(R * S):
                    w_t = taps[t]
                    start = tap_start[t] + o  # indexed through the pointer: no slice to build per tap
                    for j in range(BLOCK):
                        tile[j] += w_t * phase_values[start + j]
                for j in range(BLOCK):
                    block[j] = tile[j]
        out = y[n, k]
        for p in range(P):
            if Q * y.itemsize <= SHORT_ROW_BYTES:
                _copy_run(_data(out), p * Q, _data(acc), p * Wq, Q)
            else:
                dst, row = out[p], acc[p * Wq : p * Wq + Q]
                for q in range(Q):
                    dst[q] = row[q]
