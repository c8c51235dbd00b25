"""Stride-1 convolution as a GEMM whose B is read straight from the zero-padded input: B is never packed.

Pad each input plane to ``Hp x Wp = (P + dh*(R-1)) x (Q + dw*(S-1))`` and number the output positions across
the padded width, ``j = p * Wp + q``. The patch matrix's row for tap ``(c, r, s)`` is then, for every ``j``,
plane ``c`` of the padded input read at ``j + r*dh*Wp + s*dw``: the flattened plane shifted by one offset, a
contiguous run. So the micro-kernel (``_gemm._micro_kernel``'s MR x NR register tile, A packed by
``_pack_a``) loads its NR values of B for each tap from the padded input itself, at ``offsets[tap]``::

    # Forward:  [Kg, Cg*R*S] [Cg*R*S, Hp*Wp] -> [Kg, Hp*Wp]     y~ = W @ shifted(x_padded); y = y~[:, :P, :Q]

The ``Wp - Q`` positions at the end of each output row are computed and discarded: ``Wp / Q`` times the
work (1.06 on 32x32 images with a 3x3 filter, 1.29 on 7x7), against a copy of every input value per tap when B
is packed from patches (``_im2col.py``), which on layers with few output channels (a 32 x 288 A) cost more
than the products. Each tile sums every tap in its registers, so C is written once, bias added on the way.

Footprint: the padded input of a block of images (``COLUMN_BUFFER_BYTES`` at most) and NR values past it,
which the last tile of the last plane reads for positions it discards.
"""

import functools

import numba
import numpy as np
from numba import njit, prange

from ._gemm import _FASTMATH, _round_up, _stack_tile
from ._parallel import PRANGE_ONLY
from .config import COLUMN_BUFFER_BYTES, KC, MC, MR, NR, SHIFTED_MAX_OUT_PER_GROUP, SHIFTED_WASTE_BUDGET


def padded_shape(P, Q, R, S, dh, dw):
    """``(Hp, Wp)``: the padded plane a stride-1 ``P x Q`` output of an ``R x S`` filter reads."""
    return P + dh * (R - 1), Q + dw * (S - 1)


def shifted_pays(geometry, input_shape, Kg, R, S, P, Q, dtype):
    """Whether the forward pass of this layer by GEMM (not a pointwise one) should read B from the padded
    input: stride 1, few output channels per group, little work past the end of each output row
    (``config.SHIFTED_WASTE_BUDGET``), and one image's padded input within the column buffer."""
    sh, sw, _, _, dh, dw = geometry
    if (sh, sw) != (1, 1) or R * S == 1 or Kg > SHIFTED_MAX_OUT_PER_GROUP:
        return False
    Hp, Wp = padded_shape(P, Q, R, S, dh, dw)
    fits = input_shape[1] * Hp * Wp * np.dtype(dtype).itemsize <= COLUMN_BUFFER_BYTES
    return fits and (Wp - Q) * Kg <= SHIFTED_WASTE_BUDGET * Q


@functools.lru_cache(maxsize=32)
def tap_offsets(Cg, R, S, Hp, Wp, dh, dw):
    """Where each tap ``(c, r, s)`` of a group, in the order of the weight's columns, starts reading the
    flattened padded planes of the group: ``c * Hp * Wp + r * dh * Wp + s * dw``. Cached and never written to."""
    c, r, s = np.meshgrid(np.arange(Cg), np.arange(R), np.arange(S), indexing="ij")
    return (c * Hp * Wp + r * dh * Wp + s * dw).astype(np.int64).ravel()


@njit(parallel=PRANGE_ONLY, cache=True)
def _pad_planes(x, pt, pl, Hp, Wp, xp):
    """``xp[(n*C + c)*Hp*Wp :][:Hp*Wp]`` = plane ``(n, c)`` of ``x`` at row ``pt`` and column ``pl`` of an
    ``Hp x Wp`` plane of zeros (cropped to it), in parallel over planes; the values past the last plane are
    zeroed too, so that what the kernel reads there is finite."""
    N, C, H, W = x.shape
    plane = Hp * Wp
    rows = max(0, min(H, Hp - pt))
    cols = max(0, min(W, Wp - pl))
    for t in prange(N * C):
        n, c = t // C, t % C
        out = xp[t * plane : (t + 1) * plane]
        for i in range(Hp):
            row = out[i * Wp : (i + 1) * Wp]
            h = i - pt
            if h < 0 or h >= rows:
                for j in range(Wp):
                    row[j] = 0
                continue
            src = x[n, c, h]
            for j in range(pl):
                row[j] = 0
            for j in range(cols):
                row[pl + j] = src[j]
            for j in range(pl + cols, Wp):
                row[j] = 0
    for j in range(N * C * plane, xp.size):
        xp[j] = 0


@njit(cache=True, inline="always")
def _store_tile(tile, y, n, row0, m_valid, j0, j_end, Wp, Q, accumulate):
    """``y[n, row0 + i, p, q] (+)= tile[i, j - j0]`` for ``j = p * Wp + q`` in ``j0:j_end``, ``q < Q``.

    Inlined where Numba compiles the caller: the tile is the caller's stack buffer, kept in registers only if
    its address is not passed to a call (``_gemm._write_back``)."""
    j = j0
    while j < j_end:
        p = j // Wp
        q = j - p * Wp
        if q >= Q:  # a discarded position at the end of a row: on to the next row
            j = (p + 1) * Wp
            continue
        run = min(Q - q, j_end - j)
        for i in range(m_valid):
            dst = y[n, row0 + i, p, q : q + run]
            src = tile[i, j - j0 : j - j0 + run]  # sliced first: contiguous loads, not gathers
            if accumulate:
                for t in range(run):
                    dst[t] += src[t]
            else:
                for t in range(run):
                    dst[t] = src[t]
        j += run


@njit(fastmath=_FASTMATH, cache=True)
def _shifted_tile(ap, m, k, ir, xp, base, offsets, y, n, row0, j0, j_end, Wp, Q, accumulate):
    """``y[n, row0 + ir : row0 + ir + MR]`` (+)= one MR x NR tile of A~ @ shifted(xp), over all ``k`` taps.

    The rows ``ir:ir+MR`` of A are read from ``ap`` (``_pack_a``: one micro-panel per KC block), the NR values of
    tap ``t`` from ``xp[base + offsets[t]:]``. The tile stays in registers from the first tap to the last."""
    tile = numba.carray(_stack_tile(y.dtype), (MR, NR))
    for i in range(MR):
        for j in range(NR):
            tile[i, j] = 0
    m_pad = _round_up(m, MR)
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        a_panel = ap[pc * m_pad + ir * kc : pc * m_pad + (ir + MR) * kc]
        for p in range(kc):
            a = a_panel[p * MR : (p + 1) * MR]
            start = base + offsets[pc + p]
            b = xp[start : start + NR]
            for i in range(MR):
                a_i = a[i]
                for j in range(NR):
                    tile[i, j] += a_i * b[j]
    _store_tile(tile, y, n, row0 + ir, min(MR, m - ir), j0, j_end, Wp, Q, accumulate)


@njit(parallel=PRANGE_ONLY, cache=True)
def _shifted_gemm(ap, m, k, xp, C, plane, channel0, offsets, Wp, y, row0, accumulate):
    """``y[:, row0 : row0 + m] (+)= conv2d`` of one group: A (m x k, packed by ``_pack_a``) times the taps of
    the padded planes ``channel0:`` of every image in ``xp`` (``_pad_planes``: ``C`` planes of ``plane = Hp *
    Wp`` values per image).

    One task per NR output positions of an image and MC rows of A: no two tasks write one element of ``y``,
    and every element is summed in the order of the taps, whatever the number of threads."""
    N, _, P, Q = y.shape
    span = (P - 1) * Wp + Q  # positions up to the last output, the last row's discarded ones excluded
    n_tiles = -(-span // NR)
    n_blocks = -(-m // MC)
    for task in prange(N * n_tiles * n_blocks):
        ic = task % n_blocks * MC
        n = task // n_blocks // n_tiles
        j0 = task // n_blocks % n_tiles * NR
        base = (n * C + channel0) * plane + j0
        j_end = min(j0 + NR, span)
        for ir in range(ic, min(ic + MC, m), MR):
            _shifted_tile(ap, m, k, ir, xp, base, offsets, y, n, row0, j0, j_end, Wp, Q, accumulate)
