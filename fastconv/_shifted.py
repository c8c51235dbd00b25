"""Convolution as a GEMM whose patches are read straight from the zero-padded input: never packed.

Pad each input plane to ``Hp x Wp = (P + dh*(R-1)) x (Q + dw*(S-1))`` and number the output positions across
the padded width, ``j = p * Wp + q``. The patch matrix's row for tap ``(c, r, s)`` is then, for every ``j``,
plane ``c`` of the padded input read at ``j + r*dh*Wp + s*dw``: the flattened plane shifted by one offset, a
contiguous run. At a stride the same holds of the padded input's stride phases (``_pad_phases``): tap
``(r, s)`` reads phase ``(r*dh % sh, s*dw % sw)`` at row ``r*dh // sh`` and column ``s*dw // sw``
(``tap_offsets``). Two contractions use it::

    # Forward:         [Kg, Cg*R*S] [Cg*R*S, Hp*Wp] -> [Kg, Hp*Wp]     y~ = W @ shifted(x); y = y~[:, :P, :Q]
    # Weight gradient: [Cg*R*S, P*Q] [P*Q, Kg]      -> [Cg*R*S, Kg]    dWᵀ = shifted(x) @ dyᵀ (q < Q only)
    # Forward, outer:  [P*Q, Cg*R*S] [Cg*R*S, Kg]   -> [P*Q, Kg]       yᵀ = shifted(x)ᵀ @ Wᵀ (q < Q only)

The forward micro-kernel (``_gemm._micro_kernel``'s MR x NR register tile, A packed by ``_pack_a``) loads its
NR values of B for each tap from the padded input itself; the ``Wp - Q`` positions at the end of each output
row are computed and discarded (``Wp / Q`` times the work: 1.06 on 32x32 images with a 3x3 filter, 1.29 on
7x7), against a copy of every input value per tap when B is packed from patches (``_im2col.py``), which on
layers with few filters (a 32 x 288 A) cost more than the products. Each tile sums every tap in its registers,
so C is written once, bias added on the way. The weight gradient runs its vectors along the filters
instead, over the valid positions only: the output gradient copied pixel by pixel, its filters side by side
(``_pixel_major``), each position broadcasts one value of each of 12 (or 24) taps from the padded input and
multiplies it by 2 (or 1) vectors of filters, into 24 accumulators (``_simd._tap_filter_tile``). Against
vectors along the output row (6 taps by 4 filters, the last vector of each row masked, each sum's lanes added
at the end), in one process, alternating (float32, 2 threads, conv2d_weight, ms): 8x32x28x28 -> 32 3x3 0.55
-> 0.33, 32x32x32x32 -> 32 1.83 -> 1.40, 16x64x32x32 -> 32 s2 0.60 -> 0.45, 8x256x14x14 -> 64 s2 1.95 -> 1.03,
4x64x16x16 -> 64 5x5 1.27 -> 0.81, 4x8x16x16 -> 16 s2 0.049 -> 0.040; 8x16x56x56 -> 16, 4x32x64x64 -> 32 and
the 7x7 stem within 6 %; slower with 27 taps (32x3x32x32 -> 32: 36 computed, 0.23 -> 0.26) and 8 filters
(16x8x32x32 -> 8, a vector half empty: 0.10 -> 0.15).

The third, for strided layers whose rows are whole tiles of 14 or 8 pixels (``outer_pays``), is the weight
gradient's tile turned around: each tap broadcasts one value of each of 14 (8) output pixels of a row (one
pointer, the stride apart) into an outer product with two vectors of filters, the taps summed in registers
(``_outer_forward``): no stride phases, no packed patches (8x64x56x56 -> 128 3x3 s2: 3.05 -> 2.43 ms,
16x64x32x32 -> 32 s2 0.82 -> 0.48).

Footprint: the padded input of a block of images (``COLUMN_BUFFER_BYTES`` at most) and NR values past it,
which the last tile of the last plane reads for positions it discards; for the weight gradient also the
pixel-major output gradient and per-task partial sums, bounded alike (``weight_grad_layout``).
"""

import functools

import numba
import numpy as np
from numba import njit, prange

from ._gemm import _FASTMATH, FALSE, ZERO, _data, _round_up, _stack_tile
from ._parallel import PRANGE_ONLY
from ._simd import (
    _copy_run,
    _deinterleave_run,
    _pixel_filter_tile,
    _store_fence,
    _stream_vectors,
    _tap_filter_tile,
    _transposed_block,
)
from .config import (
    COLUMN_BUFFER_BYTES,
    KC,
    MC,
    MR,
    NR,
    SHIFTED_MAX_A_TRAFFIC,
    SHIFTED_MAX_OUT_PER_GROUP,
    SHIFTED_MAX_STRIDED_TAPS,
    SHIFTED_STAGED_MIN_TASKS,
    SHIFTED_STAGING_BYTES,
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


def staged_rows(N, P, Q, m, itemsize):
    """Output rows per task of :func:`_shifted_gemm_staged` for ``m`` filters of ``P x Q`` outputs of ``N``
    images: as many as fill ``config.SHIFTED_STAGING_BYTES`` of staging, or 0 where that leaves fewer than
    ``config.SHIFTED_STAGED_MIN_TASKS`` tasks (a thread idle a good part of the call)."""
    rows = max(1, min(P, SHIFTED_STAGING_BYTES // (m * Q * itemsize)))
    return rows if N * -(-P // rows) >= SHIFTED_STAGED_MIN_TASKS else 0


@njit(parallel=PRANGE_ONLY, cache=True)
def _shifted_gemm_staged(ap, m, k, xp, C, plane, channel0, offsets, Wp, y, row0, rows, staging, bias):
    """``y[:, row0 : row0 + m] = conv2d`` of one group, as :func:`_shifted_gemm`, but a task per ``rows`` output
    rows of an image: its tiles are stored in the thread's row of ``staging`` (``m * rows * Q`` values, in the
    cache), then each filter's rows, contiguous in ``y``, are copied out past the caches
    (``_simd._stream_vectors``), ``bias[row0 + i]`` added to filter ``i``'s first where ``bias`` is not empty. The
    same sums, so the same bits; no line of ``y`` is read before it is written.
    The tiles start anew on each task's first row: up to NR - 1 positions more computed per task."""
    N, _, P, Q = y.shape
    blocks = -(-P // rows)
    lanes = 64 // y.itemsize
    target = _data(y)
    for task in prange(N * blocks):
        n, p0 = task // blocks, task % blocks * rows
        count = (min(P, p0 + rows) - p0) * Q  # values per filter
        stage = staging[numba.get_thread_id()]
        stage_y = stage[: m * rows * Q].reshape((1, m, rows, Q))
        span = (count // Q - 1) * Wp + Q
        for j0 in range(0, span, NR):
            base = (n * C + channel0) * plane + p0 * Wp + j0
            for ir in range(0, m, MR):
                _shifted_tile(
                    ap, m, k, ir, xp, base, offsets, stage_y, ZERO, ZERO, j0, min(j0 + NR, span), Wp, Q, FALSE
                )
        for i in range(m):
            start = ((n * y.shape[1] + row0 + i) * P + p0) * Q
            head = min(count, -start % lanes)  # values before the first whole cache line
            vectors = (count - head) // lanes
            source = stage[i * rows * Q : i * rows * Q + count]
            if bias.size:
                b = bias[row0 + i]
                for t in range(count):
                    source[t] += b
            for t in range(head):
                target[start + t] = source[t]
            _stream_vectors(target, start + head, _data(stage), i * rows * Q + head, vectors)
            for t in range(head + vectors * lanes, count):
                target[start + t] = source[t]
        _store_fence()


#: The weight gradient's tiles (``_simd._tap_filter_tile``): taps by vector registers of filters, 24
#: accumulators either way. Two vectors of filters (32 float32) where a group's filters, rounded up to a vector,
#: fill them; else one, for 24 taps.
WIDE_TILE_TAPS, NARROW_TILE_TAPS = 12, 24
_taps_by_two_vectors = _tap_filter_tile(WIDE_TILE_TAPS, 2)
_taps_by_one_vector = _tap_filter_tile(NARROW_TILE_TAPS, 1)


#: Filters per group up to which the weight gradient is best read from the padded input (wider layers take
#: a GEMM, whose tile reuses each loaded value more). Measured with 6 x 4 tiles of vectors along the output row
#: (float32, 2 threads, conv2d_weight, in one process, alternating, ms, GEMM -> padded input): 8x32x32x32 ->
#: 64 3x3 1.74 -> 1.04, 32x32x32x32 -> 64 5.46 -> 3.91, 4x32x64x64 -> 64 2.71 -> 1.83, 8x64x56x56 -> 48 7.85 ->
#: 5.08, the 7x7 stride-2 stem 8x3x224x224 -> 64 10.0 -> 6.6 (float64 18.5 -> 12.0), 16x64x32x32 -> 64 3x3 s2
#: 1.48 -> 1.33. Beyond, up to SHIFTED_WEIGHT_GRAD_WIDE_FILTERS, since the tiles run along the filters
#: (GEMM -> padded input): 8x64x56x56 -> 128 3x3 s2 2.90 -> 2.48 and 3.15 -> 2.45, 8x48x28x28 -> 128 2.18 ->
#: 1.60, 8x32x56x56 -> 96 4.95 -> 3.58, 8x64x28x28 -> 128 s2 0.77 -> 0.66, 16x32x32x32 -> 128 3.93 -> 3.21,
#: 8x96x56x56 -> 128 s2 4.24 -> 3.48, 8x128x56x56 -> 128 s2 5.62 -> 4.74; but where a task has few pixels for
#: its many partial sums, slower: 4x128x28x28 -> 128 s2 (98 pixels a task) 0.78 -> 0.94, 8x256x28x28 -> 128 s2
#: (2304 taps) 2.79 -> 3.31, 8x512x14x14 -> 128 s2 1.33 -> 3.92, and 8x128x28x28 -> 256 s2 2.37 -> 2.90: hence
#: SHIFTED_WEIGHT_GRAD_WIDE_MAX_TAPS and SHIFTED_WEIGHT_GRAD_WIDE_MIN_PIXELS.
SHIFTED_WEIGHT_GRAD_MAX_FILTERS = 64
SHIFTED_WEIGHT_GRAD_WIDE_FILTERS = 128
SHIFTED_WEIGHT_GRAD_WIDE_MAX_TAPS = 1152
SHIFTED_WEIGHT_GRAD_WIDE_MIN_PIXELS = 192


def weight_grad_layout(geometry, itemsize):
    """How ``_shifted_weight_grad`` works through this layer: ``(Hp, Wp, rows, blocks, images, filters,
    image_bytes)``: the padded stride phases; ``rows`` output rows per task (about 2048 positions, and at least
    8 tasks where the batch has the rows for them: a shape's alone, not the thread count's), ``blocks`` tasks
    per image, or, where a task takes whole images, ``images`` of them; each group's filters rounded up to a
    vector register (the pixel-major output gradient's columns per group, ``_pixel_major``); and the bytes per
    image of the largest of its three buffers (padded input, pixel-major output gradient, partial sums), which
    the column buffer bounds."""
    N, C, _, _ = geometry.input_shape
    K, Cg, R, S = geometry.weight_shape
    _, _, P, Q = geometry.output_shape
    sh, sw = geometry.stride
    Hp, Wp = padded_shape(P, Q, R, S, geometry.kernel_geometry)
    rows = max(1, min(2048 // max(1, Q), -(-N * P // 8)))  # an empty output (P or Q = 0) does no work
    images = max(1, min(2048 // max(1, P * Q), -(-N // 8))) if rows >= P else 1
    blocks = -(-P // rows)
    filters = _round_up(K // geometry.groups, 64 // itemsize)
    taps = _round_up(Cg * R * S, weight_grad_tile(filters, itemsize)[0])
    buffers = (C * sh * sw * Hp * Wp, P * Q * geometry.groups * filters, blocks * geometry.groups * taps * filters)
    return Hp, Wp, min(rows, P), blocks, images, filters, max(buffers) * itemsize


def weight_grad_tile(filters, itemsize):
    """``(taps, filters)`` of the weight gradient's tile for ``filters`` (rounded up) filters per group."""
    lanes = 64 // itemsize
    return (WIDE_TILE_TAPS, 2 * lanes) if filters % (2 * lanes) == 0 else (NARROW_TILE_TAPS, lanes)


def shifted_weight_grad_pays(geometry, dtype):
    """Whether the weight gradient should read the patches from the padded input (``_shifted_weight_grad``):
    a filter larger than 1x1, one image's buffers within the column buffer, and at most
    SHIFTED_WEIGHT_GRAD_MAX_FILTERS filters per group, or up to SHIFTED_WEIGHT_GRAD_WIDE_FILTERS with at most
    SHIFTED_WEIGHT_GRAD_WIDE_MAX_TAPS taps per group and SHIFTED_WEIGHT_GRAD_WIDE_MIN_PIXELS output pixels per
    task."""
    K, Cg, R, S = geometry.weight_shape
    Kg, Q = K // geometry.groups, geometry.output_shape[3]
    if Kg > SHIFTED_WEIGHT_GRAD_WIDE_FILTERS or R * S == 1:
        return False
    _, _, rows, _, images, _, image_bytes = weight_grad_layout(geometry, np.dtype(dtype).itemsize)
    if Kg > SHIFTED_WEIGHT_GRAD_MAX_FILTERS:
        if Cg * R * S > SHIFTED_WEIGHT_GRAD_WIDE_MAX_TAPS or rows * Q * images < SHIFTED_WEIGHT_GRAD_WIDE_MIN_PIXELS:
            return False
    return image_bytes <= COLUMN_BUFFER_BYTES


@njit(parallel=PRANGE_ONLY, cache=True)
def _pixel_major(dy, groups, dyt):
    """``dyt[n, pixel, g * filters + f] = dy[n, g * Kg + f, pixel]``, 0 for ``Kg <= f < filters``: the output
    gradient (N, K, P*Q) with each pixel's filters side by side, a group's rounded up to ``filters`` (a
    multiple of a vector register's values). Square blocks of a vector register's pixels by as many filters,
    transposed in registers (``_simd._transposed_block``); the last pixels of an image, value by value. In
    parallel over blocks of 64 pixels."""
    N, K, pixels = dy.shape
    Kg, filters, d_stride = K // groups, dyt.shape[2] // groups, dyt.shape[2]
    lanes = 64 // dy.itemsize
    source, target = _data(dy), _data(dyt)
    blocks = -(-pixels // 64)
    for task in prange(N * blocks):
        n, p0 = task // blocks, task % blocks * 64
        p1 = min(pixels, p0 + 64)
        whole = p0 + (p1 - p0) // lanes * lanes
        for g in range(groups):
            for f0 in range(0, filters, lanes):
                valid, k0, column = min(lanes, Kg - f0), g * Kg + f0, g * filters + f0
                for p in range(p0, whole, lanes):
                    start = (n * pixels + p) * d_stride + column
                    _transposed_block(target, start, d_stride, source, (n * K + k0) * pixels + p, pixels, valid)
                for p in range(whole, p1):
                    for f in range(lanes):
                        dyt[n, p, column + f] = dy[n, k0 + f, p] if f < valid else 0


@njit(parallel=PRANGE_ONLY, cache=True)
def _shifted_weight_grad(xp, image_size, group_size, offsets, dyt, Wp, P, Q, rows_per_task, images, partial):
    """``partial[task, g]`` = group g's ``dWᵀ`` summed over the output rows of one task, by tiles of taps by
    filters (``weight_grad_tile``'s ``(taps, width)``): ``partial[task, g, i, j, t * width + f]`` is tap ``i *
    taps + t`` of filter ``j * width + f``.

    Tasks are (``images`` images, block of ``rows_per_task`` output rows). Tap ``(c, r, s)`` of group g's output
    pixel ``(p, q)`` of image n is ``xp`` at ``n * image_size + g * group_size + offsets[tap] + p * Wp + q``, its
    filters ``dyt[n, p * Q + q]`` (``_pixel_major``): ``_simd._tap_filter_tile`` sums their outer products
    along each row, the taps read from the padded input with no copy. The caller adds the tasks in order: a
    task owns its partial sums, and their order is fixed by the shape alone, whatever the number of threads.
    """
    N, _, d_stride = dyt.shape
    groups, tap_tiles, filter_tiles = partial.shape[1], partial.shape[2], partial.shape[3]
    filters = d_stride // groups
    width = filters // filter_tiles
    wide = width == 2 * (64 // dyt.itemsize)
    taps = WIDE_TILE_TAPS if wide else NARROW_TILE_TAPS
    d = dyt.reshape(-1)
    row_blocks = -(-P // rows_per_task)
    x_steps, d_steps = (image_size, Wp), (P * Q * d_stride, Q * d_stride)  # to the next image, to the next row
    for task in prange(-(-N // images) * row_blocks):
        n, p0 = task // row_blocks * images, task % row_blocks * rows_per_task
        blocks = (min(images, N - n), min(P, p0 + rows_per_task) - p0)  # images, rows of each
        for g in range(groups):
            x0 = n * image_size + g * group_size + p0 * Wp
            for i in range(tap_tiles):
                for j in range(filter_tiles):
                    d0 = (n * P + p0) * Q * d_stride + g * filters + j * width
                    out = partial[task, g, i, j]
                    if wide:
                        _taps_by_two_vectors(
                            xp, x0, offsets, i * taps, d, d0, blocks, x_steps, d_steps, Q, d_stride, out
                        )
                    else:
                        _taps_by_one_vector(
                            xp, x0, offsets, i * taps, d, d0, blocks, x_steps, d_steps, Q, d_stride, out
                        )


#: Output pixels of a row per tile of the forward pass by outer products (``_outer_forward``), by two vector
#: registers of filters: 14 make 28 accumulators, with the two vectors of filters and a broadcast in AVX-512's
#: 32 registers, and one pointer for the pixels, each the stride after the last (12 pixels, one pointer each,
#: ran out of general registers: 0.55x). Rows that are not a multiple of 14 pixels take tiles of 8 (CIFAR's 16
#: and 32: 16 accumulators; tiles of 14 computed 28 pixels of a 16-pixel row: 8x64x32x32 -> 128 3x3 s2 0.89 ->
#: 1.16 ms, in tiles of 8 1.05 -> 0.81).
WIDE_TILE_PIXELS, NARROW_TILE_PIXELS = 14, 8
_fourteen_pixels = _pixel_filter_tile(WIDE_TILE_PIXELS, 2, 2)
_eight_pixels = _pixel_filter_tile(NARROW_TILE_PIXELS, 2, 2)

#: The forward pass of a stride-2 layer by outer products where its rows are whole tiles and it has this many
#: taps per group: with fewer, each tile's output is written for too few products (the 7x7 stem, 147 taps:
#: 4.75 -> 5.5 ms); with more, a tile of filters' taps no longer fits in L2 beside the input (8x256x14x14 ->
#: 512 3x3 s2, 2304 taps: 2.45 -> 4.0 ms). Measured (float32, 2 threads, ms, GEMM of the stride phases'
#: patches -> outer products): 8x64x56x56 -> 128 3x3 s2 2.92-3.02 -> 2.10-2.14, 8x128x28x28 -> 256 3x3 s2
#: 2.41-2.72 -> 2.18-2.19, 8x64x32x32 -> 128 1.05 -> 0.81, 16x64x32x32 -> 32 0.75-0.97 -> 0.34; 8x128x16x16 ->
#: 256 (8-pixel rows, 1152 taps) 0.78-0.88 -> 0.83.
OUTER_MIN_TAPS, OUTER_MAX_TAPS = 256, 1152


def outer_tile(Q):
    """Output pixels per tile of ``_outer_forward`` for rows of ``Q`` pixels (at least NARROW_TILE_PIXELS)."""
    return WIDE_TILE_PIXELS if Q % WIDE_TILE_PIXELS == 0 else NARROW_TILE_PIXELS


def outer_pays(geometry, weight_shape, groups, Q, itemsize):
    """Whether the forward pass (by GEMM, not 1x1) of a layer with this kernel geometry should be
    ``_outer_forward``: stride 2, output rows of whole tiles (``outer_tile``), OUTER_MIN_TAPS to OUTER_MAX_TAPS
    taps per group, and at least two vectors of filters per group."""
    K, Cg, R, S = weight_shape
    taps = Cg * R * S
    wide = K // groups >= 2 * (64 // itemsize)
    whole = Q > 0 and Q % outer_tile(Q) == 0
    return tuple(geometry[:2]) == (2, 2) and whole and OUTER_MIN_TAPS <= taps <= OUTER_MAX_TAPS and wide


@njit(parallel=PRANGE_ONLY, cache=True)
def _outer_forward(xp, image_size, group_size, taps, wt, Wp, sh, pixels, groups, accumulate, tiles, y):
    """``y (+)= conv2d`` of the images padded in ``xp`` (``image_size`` values each, a group's channels
    ``group_size`` apart), at a row stride of 2, by tiles of ``pixels`` output pixels of a row (``outer_tile``)
    by two vector registers of filters (``_simd._pixel_filter_tile``): tap ``t`` of output pixel ``(p, q)`` is
    ``xp`` at ``p * sh * Wp + 2 * q + taps[t]`` from its image's group's first plane, its filters ``wt[t, g *
    filters : (g + 1) * filters]`` (``_pixel_major`` of the weights: each group's filters rounded up to whole
    tiles, zeros past them).

    One task per output row, group and tile of filters; a row's last tile, where the row is not a whole number of
    tiles, ends at its last pixel and writes only the pixels the others did not: each element of ``y`` written
    once, its taps summed in order, whatever the number of threads. With ``accumulate`` added to ``y`` (which
    holds the bias), else ``y`` is overwritten. Rows of at least ``pixels`` pixels."""
    N, K, P, Q = y.shape
    w_stride = wt.shape[1]
    filters, Kg = w_stride // groups, K // groups
    width = 2 * (64 // wt.itemsize)
    filter_tiles = filters // width
    w = wt.reshape(-1)
    for task in prange(N * P * groups * filter_tiles):
        j, g = task % filter_tiles, task // filter_tiles % groups
        p, n = task // (filter_tiles * groups) % P, task // (filter_tiles * groups * P)
        out = tiles[numba.get_thread_id()]
        row = n * image_size + g * group_size + p * sh * Wp
        w0, k0 = g * filters + j * width, g * Kg + j * width
        done = 0
        while done < Q:
            q0 = min(done, Q - pixels)
            if pixels == WIDE_TILE_PIXELS:
                _fourteen_pixels(xp, row + 2 * q0, taps, w, w0, w_stride, out)
            else:
                _eight_pixels(xp, row + 2 * q0, taps, w, w0, w_stride, out)
            for f in range(min(width, Kg - j * width)):
                target = y[n, k0 + f, p]
                for i in range(done - q0, pixels):
                    value = out[i * width + f]
                    target[q0 + i] = target[q0 + i] + value if accumulate else value
            done = q0 + pixels
