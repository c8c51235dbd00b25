"""Convolution as a GEMM whose patches are read straight from the zero-padded input: never packed.

Pad each input plane to ``Hp x Wp = (P + dh*(R-1)) x (Q + dw*(S-1))`` and number the output positions across
the padded width, ``j = p * Wp + q``. The patch matrix's row for tap ``(c, r, s)`` is then, for every ``j``,
plane ``c`` of the padded input read at ``j + r*dh*Wp + s*dw``: the flattened plane shifted by one offset, a
contiguous run. At a stride the same holds of the padded input's stride phases (``_pad_phases``): tap
``(r, s)`` reads phase ``(r*dh % sh, s*dw % sw)`` at row ``r*dh // sh`` and column ``s*dw // sw``
(``tap_offsets``). Two contractions use it::

    # Forward:         [Kg, Cg*R*S] [Cg*R*S, Hp*Wp] -> [Kg, Hp*Wp]     y~ = W @ shifted(x); y = y~[:, :P, :Q]
    # Weight gradient: [Cg*R*S, P*Q] [P*Q, Kg]      -> [Cg*R*S, Kg]    dWᵀ = shifted(x) @ dyᵀ (q < Q only)

The forward micro-kernel (``_gemm._micro_kernel``'s MR x NR register tile, A packed by ``_pack_a``) loads its
NR values of B for each tap from the padded input itself; the ``Wp - Q`` positions at the end of each output
row are computed and discarded (``Wp / Q`` times the work: 1.06 on 32x32 images with a 3x3 filter, 1.29 on
7x7), against a copy of every input value per tap when B is packed from patches (``_im2col.py``), which on
layers with few filters (a 32 x 288 A) cost more than the products. Each tile sums every tap in its registers,
so C is written once, bias added on the way. The weight gradient runs its vectors along the output row
instead: each of 6 taps reads a run of the padded input, each of 4 filters a run of the output gradient as it
is (no transposed copy), 24 sums of products over the valid positions only (the last vector of a row masked),
so a layer of 16 filters is not rounded up to a register tile 32 wide.

Footprint: the padded input of a block of images (``COLUMN_BUFFER_BYTES`` at most) and NR values past it,
which the last tile of the last plane reads for positions it discards; for the weight gradient also per-task
partial sums, bounded alike (``weight_grad_layout``).
"""

import functools

import numba
import numpy as np
from numba import njit, prange

from ._gemm import _FASTMATH, _data, _round_up, _stack_tile
from ._parallel import PRANGE_ONLY
from ._simd import _copy_run, _deinterleave_run, _run_products
from .config import (
    COLUMN_BUFFER_BYTES,
    KC,
    MC,
    MR,
    NR,
    SHIFTED_MAX_A_TRAFFIC,
    SHIFTED_MAX_OUT_PER_GROUP,
    SHIFTED_MAX_STRIDED_TAPS,
    SHIFTED_WASTE_BUDGET,
)


def padded_shape(P, Q, R, S, geometry):
    """``(Hp, Wp)``: the padded stride phase a ``P x Q`` output of an ``R x S`` filter reads (``_pad_phases``)."""
    sh, sw, _, _, dh, dw = geometry
    return P + dh * (R - 1) // sh, Q + dw * (S - 1) // sw


def shifted_pays(geometry, input_shape, weight_shape, groups, P, Q, dtype):
    """Whether the forward pass of this layer by GEMM (not a 1x1 one) should read B from the padded input.

    Yes if few filters per group with few positions computed past the output (row ends, the last tile of each
    image) for the filters there are (``config.SHIFTED_WASTE_BUDGET``), or for any number of filters if A,
    read once per tile of NR positions, makes little traffic in all (``config.SHIFTED_MAX_A_TRAFFIC``); at a
    stride only for few taps per group; and one image's padded input within the column buffer. Float32 only:
    the float64 tile fills all 32 vector registers, and with B loaded from the input besides it measured 5-10 %
    slower than packed patches (32x32x32x32 3x3 4.5-4.7 -> 4.8-4.9 ms, the 7x7 stride-2 stem 14.2-15.3 -> 16.5-16.9,
    1x512x7x7 2.7-2.8 -> 3.0-3.1).
    """
    sh, sw = geometry[:2]
    K, Cg, R, S = weight_shape
    Kg, itemsize = K // groups, np.dtype(dtype).itemsize
    if itemsize > 4 or R * S == 1 or (sh * sw > 1 and Cg * R * S > SHIFTED_MAX_STRIDED_TAPS):
        return False
    Hp, Wp = padded_shape(P, Q, R, S, geometry)
    if Cg * groups * sh * sw * Hp * Wp * itemsize > COLUMN_BUFFER_BYTES:
        return False
    tiles = -(-((P - 1) * Wp + Q) // NR)  # per image
    few_filters = Kg <= SHIFTED_MAX_OUT_PER_GROUP and (tiles * NR - P * Q) * Kg <= SHIFTED_WASTE_BUDGET * P * Q
    return few_filters or input_shape[0] * tiles * K * Cg * R * S * itemsize <= SHIFTED_MAX_A_TRAFFIC


@functools.lru_cache(maxsize=32)
def tap_offsets(Cg, R, S, Hp, Wp, geometry):
    """Where each tap ``(c, r, s)`` of a group, in the order of the weight's columns, starts reading the
    group's planes in ``_pad_phases``'s layout: in stride phase ``(r*dh % sh, s*dw % sw)`` of channel ``c``, at
    row ``r*dh // sh`` and column ``s*dw // sw``. Cached and never written to."""
    sh, sw, _, _, dh, dw = geometry
    c, r, s = np.meshgrid(np.arange(Cg), np.arange(R), np.arange(S), indexing="ij")
    phase = (c * sh + r * dh % sh) * sw + s * dw % sw
    return (phase * Hp * Wp + r * dh // sh * Wp + s * dw // sw).astype(np.int64).ravel()


@njit(parallel=PRANGE_ONLY, cache=True)
def _pad_phases(x, pt, pl, sh, sw, Hp, Wp, xp):
    """The stride phases of ``x`` zero-padded by ``pt`` rows and ``pl`` columns, in parallel over input planes:
    plane ``((n*C + c)*sh + a)*sw + b`` of ``xp``, ``Hp x Wp`` values from ``xp[plane * Hp * Wp]``, holds at
    ``(i, j)`` the padded input's ``(i*sh + a, j*sw + b)``: ``x[n, c, i*sh + a - pt, j*sw + b - pl]``, 0 outside
    ``x``. At stride 1, the padded planes themselves. The values past the last plane are zeroed, so that what
    the kernel reads there is finite."""
    N, C, H, W = x.shape
    plane = Hp * Wp
    # One parallel loop per way, each compiled on its own: branches to the fast ways inside the general loop
    # made LLVM compile that loop worse (the 4x4 stride-4 ConvNeXt stem's padding 0.86-1.0 -> 1.0-1.3 ms).
    if sh == 1 and sw == 1:
        for t in prange(N * C):
            _pad_plane(x, t, pt, pl, Hp, Wp, xp)
    elif sh == 2 and sw == 2 and pt >= 0 and pl >= 0:
        for t in prange(N * C):
            _pad_plane_pairs(x, t, pt, pl, Hp, Wp, xp)
    else:
        _pad_phases_general(x, pt, pl, sh, sw, Hp, Wp, xp)
    for j in range(N * C * sh * sw * plane, xp.size):
        xp[j] = 0


@njit(parallel=PRANGE_ONLY, cache=True)
def _pad_phases_general(x, pt, pl, sh, sw, Hp, Wp, xp):
    """``_pad_phases`` at any stride and padding, a row of each phase at a time."""
    N, C, H, W = x.shape
    plane = Hp * Wp
    for t in prange(N * C):
        n, c = t // C, t % C
        for a in range(sh):
            rows = xp[(t * sh + a) * sw * plane : (t * sh + a + 1) * sw * plane]  # the sw phases of row phase a
            for i in range(Hp):
                h = i * sh + a - pt
                if h < 0 or h >= H:
                    for b in range(sw):
                        rows[b * plane + i * Wp : b * plane + (i + 1) * Wp] = 0
                    continue
                src = x[n, c, h]
                # The columns j of phase b that read x, 0 <= j*sw + b - pl < W, for every b: the rest by
                # _padded_value, one at a time.
                first = min(Wp, max(0, -(-pl // sw)))
                last = max(first, min(Wp, (W - sw + pl) // sw + 1))
                for b in range(sw):
                    row = rows[b * plane + i * Wp : b * plane + (i + 1) * Wp]
                    for j in range(first):
                        row[j] = _padded_value(src, j * sw + b - pl)
                    for j in range(last, Wp):
                        row[j] = _padded_value(src, j * sw + b - pl)
                # Sliced first, indexed from 0: an index that may be negative costs a wraparound test per
                # value, and LLVM vectorises none of these loops then (2-4x slower).
                inside = src[first * sw - pl :]
                n_inside = last - first
                if sw == 1:  # a contiguous copy
                    row = rows[i * Wp + first : (i + 1) * Wp]
                    for j in range(n_inside):
                        row[j] = inside[j]
                elif sw == 2:  # deinterleave pairs: LLVM vectorises this with shuffles
                    even = rows[i * Wp + first : (i + 1) * Wp]
                    odd = rows[plane + i * Wp + first : plane + (i + 1) * Wp]
                    for j in range(n_inside):
                        even[j], odd[j] = inside[2 * j], inside[2 * j + 1]
                else:
                    for b in range(sw):
                        row = rows[b * plane + i * Wp + first : b * plane + (i + 1) * Wp]
                        for j in range(n_inside):
                            row[j] = inside[j * sw + b]


@njit(cache=True)
def _pad_plane(x, t, pt, pl, Hp, Wp, xp):
    """Plane ``t`` of ``_pad_phases`` at stride 1: zeroed whole, then the rows of ``x`` copied in by
    ``_copy_run`` (whole vectors and a masked one). Short rows cost their slices and bounds more than their
    copy in the general loop. Measured (float32, 2 threads): 8x256x8x8 into 10x10 planes 0.12 -> 0.035 ms;
    forward passes from the padded input, 32x64x16x16 -> 16 3x3 0.65-0.66 -> 0.48-0.50 ms, 32x32x32x32 -> 32
    1.66-1.79 -> 1.52-1.71, 8x32x28x28 -> 28 0.34 -> 0.31."""
    _, _, H, W = x.shape
    plane = Hp * Wp
    out = xp[t * plane : (t + 1) * plane]
    for j in range(plane):
        out[j] = 0
    first, last = max(0, -pl), min(W, Wp - pl)  # the columns of x inside a padded row
    if last > first:
        dst, src = _data(xp), _data(x)
        for h in range(max(0, -pt), min(H, Hp - pt)):
            _copy_run(dst, t * plane + (h + pt) * Wp + first + pl, src, (t * H + h) * W + first, last - first)


@njit(cache=True)
def _pad_plane_pairs(x, t, pt, pl, Hp, Wp, xp):
    """Plane ``t``'s four stride phases of ``_pad_phases`` at stride 2 (padding not negative): zeroed whole, then
    each row of ``x`` split into its even and odd columns by ``_deinterleave_run``, into the row ``(h + pt) //
    2`` of the phases ``((h + pt) % 2, b)``. Row by row in the general loop, short rows cost their slices and
    bounds more than their copy: measured, 8x128x16x16 into 9x9 phases 0.20 -> 0.04 ms (2 threads)."""
    _, _, H, W = x.shape
    plane = Hp * Wp
    out = xp[t * 4 * plane : (t + 1) * 4 * plane]
    for j in range(4 * plane):
        out[j] = 0
    # Columns w and w + 1 of x (w even) go to column w // 2 + j0 of phase b0 and w // 2 + j1 of phase 1 - b0.
    b0, j0, j1 = pl % 2, pl // 2, (pl + 1) // 2
    pairs = max(0, min(W // 2, Wp - j1))  # those whose both columns fit the phases' Wp
    dst, src = _data(xp), _data(x)
    for h in range(H):
        i = (h + pt) // 2
        if i >= Hp:
            break
        row = (t * 4 + (h + pt) % 2 * 2) * plane + i * Wp  # of phase (a, 0)
        first, second = row + b0 * plane + j0, row + (1 - b0) * plane + j1
        _deinterleave_run(dst, first, dst, second, src, (t * H + h) * W, pairs)
        for w in range(2 * pairs, W):  # what is left: an odd last column, or columns cropped
            j = (w + pl) // 2
            if j < Wp:
                xp[row + (w + pl) % 2 * plane + j] = src[(t * H + h) * W + w]


@njit(cache=True, inline="always")
def _padded_value(src, w):
    """``src[w]``, or 0 past either end of ``src``."""
    return src[w] if 0 <= w < src.size else 0


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
    the planes ``channel0:`` of every image in ``xp`` (``_pad_phases``: ``C`` planes of ``plane = Hp * Wp``
    values per image, a plane per channel and stride phase).

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


#: The weight gradient's tile: TILE_TAPS taps (runs of the padded input) by TILE_FILTERS filters (runs of the
#: output gradient), one vector accumulator per pair (``_simd._run_products``): 24, with the filters' 4
#: vectors and one tap's at a time in AVX-512's 32 registers. 4 x 4 did 16 products per step and ran at 240
#: GFLOP/s (32x32x32x32: 2.4-2.5 -> 2.0-2.1 ms with 4 x 6). 6 x 4 rounds the filters up to a multiple of 4, not
#: 6 (32 filters computed as 32, not 36), for two more loads of taps split across cache lines per step.
#: Measured against 4 x 6 (float32, 2 threads, conv2d_weight, alternating processes, ms): 8x32x28x28 -> 32 3x3
#: 0.55 -> 0.48, 8x16x56x56 -> 16 0.48-0.50 -> 0.41-0.43, 32x32x32x32 -> 32 2.4-2.6 -> 2.1-2.2, 1x32x112x112
#: -> 32 0.86-0.90 -> 0.66-0.70, 8x64x28x28 -> 20 0.72 -> 0.61, 16x8x32x32 -> 8 0.13-0.15 -> 0.11; the same
#: on 32x3x32x32 -> 32 (27 taps: 30 computed, not 28) and 4x32x64x64 -> 32.
TILE_TAPS, TILE_FILTERS = 6, 4

#: Filters per group up to which the weight gradient is best read from the padded input (wider layers take
#: a GEMM, whose tile reuses each loaded value more). Measured with 6 x 4 tiles (float32, 2 threads,
#: conv2d_weight, in one process, alternating, ms, GEMM -> padded input): 8x32x32x32 -> 64 3x3 1.74 -> 1.04,
#: 32x32x32x32 -> 64 5.46 -> 3.91, 4x32x64x64 -> 64 2.71 -> 1.83, 8x64x56x56 -> 48 7.85 -> 5.08, the 7x7
#: stride-2 stem 8x3x224x224 -> 64 10.0 -> 6.6 (float64 18.5 -> 12.0), 16x64x32x32 -> 64 3x3 s2 1.48 -> 1.33;
#: even at 96 (8x32x56x56: 5.37 -> 5.31); slower at 128 (8x48x28x28: 2.45 -> 2.81; ResNet's 8x64x56x56 ->
#: 128 3x3 s2 3.9 -> 6.6).
SHIFTED_WEIGHT_GRAD_MAX_FILTERS = 64


def weight_grad_layout(geometry, itemsize):
    """How ``_shifted_weight_grad`` works through this layer: ``(Hp, Wp, rows, blocks, images, image_bytes)``:
    the padded stride phases; ``rows`` output rows per task (about 2048 positions, and at least 8 tasks where
    the batch has the rows for them: a shape's alone, not the thread count's), ``blocks`` tasks per image, or,
    where a task takes whole images, ``images`` of them (small images: each task ends by summing its vectors'
    lanes, which on one 16x16 image is a fifth of its work); and the bytes per image of the larger of its two
    buffers (padded input, partial sums), which the column buffer bounds."""
    N, C, _, _ = geometry.input_shape
    K, Cg, R, S = geometry.weight_shape
    _, _, P, Q = geometry.output_shape
    sh, sw = geometry.stride
    Hp, Wp = padded_shape(P, Q, R, S, geometry.kernel_geometry)
    rows = max(1, min(2048 // max(1, Q), -(-N * P // 8)))  # an empty output (P or Q = 0) does no work
    images = max(1, min(2048 // max(1, P * Q), -(-N // 8))) if rows >= P else 1
    blocks = -(-P // rows)
    taps, width = _round_up(Cg * R * S, TILE_TAPS), _round_up(K // geometry.groups, TILE_FILTERS)
    image_bytes = max(C * sh * sw * Hp * Wp, blocks * geometry.groups * taps * width) * itemsize
    return Hp, Wp, min(rows, P), blocks, images, image_bytes


def shifted_weight_grad_pays(geometry, dtype):
    """Whether the weight gradient should read the patches from the padded input (``_shifted_weight_grad``):
    at most SHIFTED_WEIGHT_GRAD_MAX_FILTERS filters per group, a filter larger than 1x1, and one image's
    buffers within the column buffer."""
    K, _, R, S = geometry.weight_shape
    if K // geometry.groups > SHIFTED_WEIGHT_GRAD_MAX_FILTERS or R * S == 1:
        return False
    return weight_grad_layout(geometry, np.dtype(dtype).itemsize)[-1] <= COLUMN_BUFFER_BYTES


@njit(parallel=PRANGE_ONLY, cache=True)
def _shifted_weight_grad(xp, image_size, group_size, offsets, dy, Wp, P, Q, rows_per_task, images, partial):
    """``partial[task, g]`` = group g's ``dW`` summed over the output rows of one task, by tiles of TILE_TAPS x
    TILE_FILTERS: ``partial[task, g, i, j, t * TILE_FILTERS + f]`` is tap ``i * TILE_TAPS + t`` of filter
    ``j * TILE_FILTERS + f``.

    Tasks are (``images`` images, block of ``rows_per_task`` output rows). Tap ``(c, r, s)`` of group g's output pixel
    ``(p, q)`` is ``xp`` at ``n * image_size + g * group_size + offsets[tap] + p * Wp + q``, so over a row each
    tap reads a run of the padded input and each filter a run of ``dy`` (N, K, P*Q), both contiguous:
    ``_simd._run_products`` sums their products, with no copy of either. Taps and filters past the last are
    the last again (their sums are dropped). The caller adds the tasks in order: a task owns its partial sums,
    and their order is fixed by the shape alone, whatever the number of threads.
    """
    N, K, _ = dy.shape
    groups = partial.shape[1]
    Kg, taps = K // groups, offsets.size
    row_blocks = -(-P // rows_per_task)
    tap_tiles, filter_tiles = partial.shape[2], partial.shape[3]
    last_tap, last_filter = taps - 1, Kg - 1
    x_steps, y_steps = (image_size, Wp), (K * P * Q, Q)  # to the next image, to the next row
    for task in prange(-(-N // images) * row_blocks):
        n, p0 = task // row_blocks * images, task % row_blocks * rows_per_task
        blocks = (min(images, N - n), min(P, p0 + rows_per_task) - p0)  # images, rows of each
        for g in range(groups):
            x0 = n * image_size + g * group_size + p0 * Wp
            y0 = (n * K + g * Kg) * P * Q + p0 * Q
            for i in range(tap_tiles):
                t = i * TILE_TAPS
                x_starts = (
                    x0 + offsets[min(t, last_tap)],
                    x0 + offsets[min(t + 1, last_tap)],
                    x0 + offsets[min(t + 2, last_tap)],
                    x0 + offsets[min(t + 3, last_tap)],
                    x0 + offsets[min(t + 4, last_tap)],
                    x0 + offsets[min(t + 5, last_tap)],
                )
                for j in range(filter_tiles):
                    f = j * TILE_FILTERS
                    y_starts = (
                        y0 + min(f, last_filter) * P * Q,
                        y0 + min(f + 1, last_filter) * P * Q,
                        y0 + min(f + 2, last_filter) * P * Q,
                        y0 + min(f + 3, last_filter) * P * Q,
                    )
                    _run_products(xp, x_starts, dy, y_starts, blocks, x_steps, y_steps, Q, partial[task, g, i, j])
