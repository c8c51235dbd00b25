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
vectorise well, with no zero multiplied and no bounds test inside.

Kernels here: the forward pass and the weight gradient. The input gradient is a forward pass of the
flipped filters over grad_output (``conv._input_grad_as_conv2d``).
"""

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from ._parallel import PRANGE_ONLY
from ._scratch import per_thread

_FASTMATH = {"contract"}


@njit(cache=True)
def _split_phases(image, sh, sw, pt, pl, Hq, Wq, phase_size, phases):
    """Write ``image`` (H x W), padded by ``pt`` rows and ``pl`` columns, into the flat stride ``phases``.

    Only the input's own pixels are written: the padding was zeroed once and stays zero, since every channel
    puts its pixels in the same places. Input pixels that no output reads are skipped.
    """
    H, W = image.shape
    if sh == 1 and sw == 1:  # one phase, the padded image: no division per row (they cost more than the copy)
        count = min(W, Wq - pl)
        for h in range(min(H, Hq - pt)):
            dst = phases[(h + pt) * Wq + pl : (h + pt) * Wq + pl + count]
            src = image[h]
            for j in range(count):
                dst[j] = src[j]
        return
    for h in range(H):
        a, i = (h + pt) % sh, (h + pt) // sh
        if i >= Hq:
            break
        src = image[h]
        for b in range(sw):
            # Input columns w with (w + pl) % sw == b, from the first one on.
            w0 = (b - pl) % sw
            j0 = (w0 + pl) // sw
            count = min(-(-(W - w0) // sw), Wq - j0)
            start = (a * sw + b) * phase_size + i * Wq + j0
            dst = phases[start : start + max(count, 0)]
            row = src[w0:]  # sliced first: indices from 0, and at sw == 1 a copy LLVM vectorises
            if sw == 1:
                for j in range(count):
                    dst[j] = row[j]
            else:
                for j in range(count):
                    dst[j] = row[j * sw]


class _PhaseLayout(NamedTuple):
    """Sizes of the stride phases and where each tap ``t = r * S + s`` reads in them, with each thread's scratch.

    A phase holds ``Hq`` rows of ``Wq`` values (plus a spare row: the wide plane's last taps read past ``Hq``
    rows), and tap ``t`` reads the wide plane's value ``o`` at ``tap_start[t] + o``. ``phases`` (threads, sh *
    sw * phase_size) and ``wide`` (threads, P * Wq) are zeros, one row per thread (``_parallel.per_thread``).
    """

    Hq: int
    Wq: int
    phase_size: int
    tap_start: np.ndarray
    phases: np.ndarray
    wide: np.ndarray


def _phase_layout(R, S, P, Q, geometry, dtype):
    sh, sw, _, _, dh, dw = geometry
    Hq = P + (R - 1) * dh // sh
    Wq = Q + (S - 1) * dw // sw
    phase_size = (Hq + 1) * Wq
    r, s = np.divmod(np.arange(R * S), S)
    tap_start = ((r * dh % sh) * sw + s * dw % sw) * phase_size + (r * dh // sh) * Wq + s * dw // sw
    phases = per_thread((sh * sw * phase_size,), dtype, zeros=True, name="direct phases")
    wide = per_thread((P * Wq,), dtype, zeros=True, name="direct rows")
    return _PhaseLayout(Hq, Wq, phase_size, tap_start.astype(np.int64), phases, wide)


def conv2d_direct(x, weight, bias, geometry, groups, y):
    """``y = conv2d(x, weight) + bias`` by ``_conv2d_direct``, with its scratch."""
    layout = _phase_layout(*weight.shape[2:], *y.shape[2:], geometry, y.dtype)
    _conv2d_direct(x, weight, bias, geometry, groups, *layout, y)


def conv2d_direct_weight(x, grad_output, geometry, groups, grad_weight):
    """``grad_weight = conv2d_weight(x, grad_output)`` by ``_conv2d_direct_weight``, with its scratch."""
    layout = _phase_layout(*grad_weight.shape[2:], *grad_output.shape[2:], geometry, grad_weight.dtype)
    _conv2d_direct_weight(x, grad_output, geometry, groups, *layout, grad_weight)


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
def _conv2d_direct_weight(x, grad_output, geometry, groups, Hq, Wq, phase_size, tap_start, phases, wide, grad_weight):
    """``grad_weight = conv2d_weight(x, grad_output)`` by direct loops, in parallel over output channels.

    Each thread owns the filters of whole output channels ``k`` and sums over the images in order: results do
    not depend on the thread count. Every tap is one dot product of the wide output-gradient plane with the
    stride phase it reads (``reassoc`` lets LLVM vectorise those sums). Footprint per thread: the phases of
    one input channel and one wide plane.
    """
    N, K, P, Q = grad_output.shape
    _, Cg, R, S = grad_weight.shape
    sh, sw, pt, pl, dh, dw = geometry
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
                _split_phases(x[n, c0 + c], sh, sw, pt, pl, Hq, Wq, phase_size, src)
                for t in range(R * S):
                    row = src[tap_start[t] : tap_start[t] + size]
                    total = zero
                    for o in range(size):
                        total += dy[o] * row[o]
                    taps[c, t // S, t % S] += total


@njit(parallel=PRANGE_ONLY, fastmath=_FASTMATH, cache=True)
def _conv2d_direct(x, weight, bias, geometry, groups, Hq, Wq, phase_size, tap_start, phases, wide, y):
    """``y = conv2d(x, weight) + bias`` by direct loops, in parallel over output planes ``(n, k)``.

    ``y`` is written, never read: one pass over the output, the least memory traffic a memory-bound layer
    allows. Each thread owns whole planes of ``y``, so no element is written by two threads, and each is
    summed in the order ``(c, r, s)`` whatever the thread count. Footprint per thread: the stride phases of one
    input channel and one wide output plane, ``O(H * W)`` values.
    """
    N = x.shape[0]
    K, Cg, R, S = weight.shape
    P, Q = y.shape[2], y.shape[3]
    sh, sw, pt, pl, dh, dw = geometry
    Kg = K // groups
    size = P * Wq
    for plane in prange(N * K):
        thread = numba.get_thread_id()
        n = plane // K
        k = plane % K
        c0 = k // Kg * Cg
        src = phases[thread]
        acc = wide[thread]
        for o in range(size):
            acc[o] = 0
        taps = weight[k]
        for c in range(Cg):
            _split_phases(x[n, c0 + c], sh, sw, pt, pl, Hq, Wq, phase_size, src)
            # Three taps per pass over the plane: a third of the loads and stores of acc.
            for t in range(0, R * S - 2, 3):
                w0, w1, w2 = (
                    taps[c, t // S, t % S],
                    taps[c, (t + 1) // S, (t + 1) % S],
                    taps[c, (t + 2) // S, (t + 2) % S],
                )
                row0 = src[tap_start[t] : tap_start[t] + size]
                row1 = src[tap_start[t + 1] : tap_start[t + 1] + size]
                row2 = src[tap_start[t + 2] : tap_start[t + 2] + size]
                for o in range(size):
                    acc[o] += w0 * row0[o] + w1 * row1[o] + w2 * row2[o]
            for t in range(R * S - R * S % 3, R * S):
                w0 = taps[c, t // S, t % S]
                row0 = src[tap_start[t] : tap_start[t] + size]
                for o in range(size):
                    acc[o] += w0 * row0[o]
        out = y[n, k]
        b = bias[k]
        for p in range(P):
            dst = out[p]
            row = acc[p * Wq : p * Wq + Q]
            for q in range(Q):
                dst[q] = b + row[q]
