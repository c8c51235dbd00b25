"""The weight gradient of a 3x3 stride-1 convolution by Winograd F(2x2, 3x3): 2.25 times fewer multiplications.

The forward pass (``_winograd.py``) computes ``M = U ⊙ V`` summed over input channels, ``Y = Aᵀ M A``, with
``U = G g Gᵀ`` and ``V = Bᵀ d B``. Its gradient with respect to the filters follows the same steps backwards::

    dM = A dY Aᵀ                  the 2x2 output gradient of a tile, spread to 4x4 (additions only)
    dU[xi] = Σ_tiles dM[xi] Vᵀ[xi]  16 GEMMs: [Kg, tiles] [tiles, Cg] -> [Kg, Cg], summed over the batch
    dg = Gᵀ dU G                  per filter, 4x4 back to 3x3 (in float64, rounded once)

16 multiplications per 2x2 tile and channel pair where the GEMM path's weight gradient takes 36, as in the
forward pass; the transforms only add and halve, with the same accuracy (tested against the direct sum).

The tiles of the batch are split into a fixed number of ranges, one task each (several per thread, for
balance). A task takes its range CHUNK tiles at a time: it transforms their ``dM`` and ``V`` straight into the
micro-kernel's packed layouts in its thread's scratch (tiles are the GEMM's shared dimension), while they are
in cache, and runs the 16 GEMMs into the range's own partial ``dU``. The partial sums are then added in a fixed
order and transformed back to 3x3 filters, in parallel over filters: results do not depend on the number of
threads.
"""

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._gemm import FALSE, PACKED, _micro_kernel, _round_up, no_bias
from ._parallel import PRANGE_ONLY
from ._scratch import per_thread, scratch
from ._simd import Vector, _lane_mask, _masked_load, _masked_store, even_odd, interleaved, vector_type
from ._winograd import (
    WHOLE_PANEL,
    XI,
    _border_tiles,
    _input_tiles,
    _inside_tiles,
    _store_column,
    _tile_rows,
    _transform_channels_vector,
)
from .config import MR, NR, WINOGRAD_MIN_CHANNELS, WINOGRAD_WEIGHT_GRAD_MIN_TILES

#: Tiles a task transforms and multiplies at a time: the depth of its GEMMs.
CHUNK = 256

#: Most tile ranges the weight gradient is split into, and the bytes all of their partial sums may take: each
#: range sums into a ``16 x K x C/groups`` copy of the transformed gradient.
MAX_RANGES = 8
MIN_RANGES = 4
PARTIAL_BYTES = 32 * 2**20


def _n_ranges(K, Cg, tiles, itemsize):
    """Tile ranges: as many as MAX_RANGES and PARTIAL_BYTES allow, of 32 tiles at least; by shape alone."""
    per_range = XI * (K + 1) * Cg * itemsize
    return max(1, min(MAX_RANGES, PARTIAL_BYTES // per_range, tiles // 32))


def winograd_weight_grad_pays(geometry):
    """Whether the weight gradient of this (Winograd-applicable) layer should take Winograd: at least
    WINOGRAD_MIN_CHANNELS input and output channels per group, WINOGRAD_WEIGHT_GRAD_MIN_TILES tiles (more
    beyond 128 channels, with the square root of their number), and MIN_RANGES ranges of them
    (``config.py``)."""
    N, C, _, _ = geometry.input_shape
    K, Cg = geometry.weight_shape[:2]
    _, _, P, Q = geometry.output_shape
    tiles = N * -(-P // 2) * -(-Q // 2)
    per_group = min(C, K) // geometry.groups
    return (
        per_group >= WINOGRAD_MIN_CHANNELS
        and tiles >= WINOGRAD_WEIGHT_GRAD_MIN_TILES * max(1.0, per_group / 128) ** 0.5
        # float32's ranges: float64 takes the same path, with as many or half as many ranges
        and _n_ranges(K, Cg, tiles, 4) >= MIN_RANGES
    )


def winograd_weight_grad_workspace(geometry, dtype):
    """Bytes of scratch ``conv2d_weight_winograd`` takes: each thread's panels, and the partial sums."""
    N, _, _, _ = geometry.input_shape
    K, Cg = geometry.weight_shape[:2]
    _, _, P, Q = geometry.output_shape
    Kg = K // geometry.groups
    tiles = N * -(-P // 2) * -(-Q // 2)
    panels = XI * (CHUNK * (_round_up(Cg, NR) + _round_up(Kg, MR)) + 32)
    partial = _n_ranges(K, Cg, tiles, dtype.itemsize) * XI * (K + 1) * Cg
    return dtype.itemsize * (numba.config.NUMBA_NUM_THREADS * panels + partial)


def conv2d_weight_winograd(x, grad_output, geometry, groups, grad_weight):
    """``grad_weight = conv2d_weight(x, grad_output)`` for 3x3 filters, stride 1, dilation 1, by Winograd.

    x (N, C, H, W), grad_output (N, K, P, Q), grad_weight (K, C // groups, 3, 3), overwritten.
    """
    K, Cg = grad_weight.shape[:2]
    Kg = K // groups
    N, _, P, Q = grad_output.shape
    dtype = grad_weight.dtype
    ranges = _n_ranges(K, Cg, N * -(-P // 2) * -(-Q // 2), dtype.itemsize)
    # The 16 rows of v, dm and the partial sums are written (read) together, one value each per tile (filter):
    # rows a multiple of 4 KiB apart would share one set of the L1 cache and evict each other (5x slower,
    # measured). A spare cache line, or a spare row of the partial sums, offsets them.
    v = per_thread((XI, _round_up(Cg, NR) * CHUNK + 16), dtype, name="winograd tiles")
    dm = per_thread((XI, _round_up(Kg, MR) * CHUNK + 16), dtype, name="winograd gradients")
    partial = scratch("partial sums", (ranges, 1, XI * (K + 1), Cg), dtype)
    _, _, pt, pl, _, _ = geometry
    _winograd_weight_tasks(x, grad_output, pt, pl, groups, v, dm, partial, grad_weight)


@njit(cache=True)
def _grad_output_tiles(dy, n, k, th, tw0, run, dm, m0, step):
    """``dm[xi, m0 + u * step]`` = ``(A dY_u Aᵀ)[xi]`` for the 2x2 output-gradient tiles ``(n, th, tw0 + u)``,
    ``u < run``, of channel ``k``; zeros past the edge of an odd-sized output."""
    _, _, P, Q = dy.shape
    p0, q0 = 2 * th, 2 * tw0
    two_rows = p0 + 1 < P
    top = dy[n, k, p0, q0:]
    bottom = dy[n, k, p0 + 1 if two_rows else p0, q0:]
    zero = dy.dtype.type(0)
    for u in range(run):
        both = q0 + 2 * u + 1 < Q
        y00 = top[2 * u]
        y01 = top[2 * u + 1] if both else zero
        y10 = bottom[2 * u] if two_rows else zero
        y11 = bottom[2 * u + 1] if two_rows and both else zero
        # A dY: the rows (1, 0), (1, 1), (1, -1), (0, -1) of A combine the two rows of dY; then each row so made
        # is spread to four columns the same way (dY Aᵀ).
        r0a, r0b = y00, y01
        r1a, r1b = y00 + y10, y01 + y11
        r2a, r2b = y00 - y10, y01 - y11
        r3a, r3b = -y10, -y11
        _store_column(
            dm,
            m0 + u * step,
            (
                r0a, r0a + r0b, r0a - r0b, -r0b,
                r1a, r1a + r1b, r1a - r1b, -r1b,
                r2a, r2a + r2b, r2a - r2b, -r2b,
                r3a, r3a + r3b, r3a - r3b, -r3b,
            ),
        )  # fmt: skip


assert MR == 4, "_grad_output_panel_vector interleaves the filters of a micro-panel of A four at a time"


@intrinsic
def _grad_output_panel_vector(typingctx, dy, base, plane, row, two_rows, cols, count, dm, m0):
    """``_grad_output_tiles`` for the MR filters of a micro-panel of A and a vector register of tiles at once:
    ``dm[xi, m0 + l * MR + f] = (A dY Aᵀ)[xi]`` of tile ``l < count`` of filter ``f``, whose two rows of
    ``dy`` start at flat index ``base + f * plane`` and ``row`` values further (the lower one zeros unless
    ``two_rows``), ``cols`` of their values valid (zeros past them, an odd-sized output's last column).

    Each row is read as one double-width vector split into even and odd columns, the scalar arithmetic done on
    vectors in its order (the same bits), and the MR filters' results interleaved, so that each position's
    values are written as whole vectors, not one scalar per filter and tile. Measured (float32, 2 threads,
    alternating processes), against ``_grad_output_tiles`` for every filter: conv2d_weight 8x64x56x56 -> 64
    6.1-6.6 -> 5.2-5.5 ms (conv2d_backward 10.8-11.4 -> 10.3-10.9), 8x128x28x28 -> 128 4.8-5.1 -> 4.3-4.8;
    32x64x14x14 and 64x64x8x8 (runs of 7 and 4 tiles) unchanged."""
    dtype = dy.dtype

    def codegen(context, builder, signature, args):
        _, base, plane, row, two_rows, cols, count, _, m0 = args
        vector, lanes, size = vector_type(context, dtype)
        double = llvm_ir.VectorType(vector.element, 2 * lanes)
        zero = llvm_ir.Constant(vector, [0.0] * lanes)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        valid = _lane_mask(builder, cols, 2 * lanes)
        results = []
        for f in range(MR):
            top = builder.add(base, builder.mul(plane, llvm_ir.IntType(64)(f)))
            # Without a second row, the top one is read again (never past the array) and its values dropped.
            bottom = builder.select(two_rows, builder.add(top, row), top)
            upper = _masked_load(builder, double, size, data, top, valid)
            lower = _masked_load(builder, double, size, data, bottom, valid)
            y00, y01 = (Vector(builder, column) for column in even_odd(builder, upper))
            y10, y11 = (Vector(builder, builder.select(two_rows, column, zero)) for column in even_odd(builder, lower))
            r0a, r0b = y00, y01
            r1a, r1b = y00 + y10, y01 + y11
            r2a, r2b = y00 - y10, y01 - y11
            r3a, r3b = (Vector(builder, builder.fneg(y.value)) for y in (y10, y11))
            values = []
            for a, b in ((r0a, r0b), (r1a, r1b), (r2a, r2b), (r3a, r3b)):
                values += [a.value, (a + b).value, (a - b).value, builder.fneg(b.value)]
            results.append(values)
        rows = context.make_array(signature.args[7])(context, builder, args[7])
        index = llvm_ir.IntType(64)
        row_stride = builder.sdiv(builder.extract_value(rows.strides, 0), index(size))
        stored = _lane_mask(builder, builder.mul(count, index(MR)), MR * lanes)
        for xi in range(XI):
            pairs = (interleaved(builder, results[f][xi], results[f + 1][xi]) for f in (0, 2))
            out = interleaved(builder, *pairs, width=2)  # tile by tile, its MR filters side by side
            offset = builder.add(builder.mul(index(xi), row_stride), m0)
            _masked_store(builder, out, size, rows.data, offset, stored)
        return context.get_dummy_value()

    signature = types.none(dy, base, plane, row, two_rows, cols, count, dm, m0)
    return signature, codegen


@njit(cache=True)
def _grad_output_panel(dy, n, k0, th, tw0, run, dm, m0):
    """``_grad_output_tiles`` of filters ``k0 : k0 + MR`` into their micro-panel of ``dm`` (filter ``k0`` at
    ``m0``), a vector register of tiles at a time (``_grad_output_panel_vector``)."""
    _, _, P, Q = dy.shape
    itemsize = dy.itemsize
    p0, q0 = 2 * th, 2 * tw0
    lanes = 64 // itemsize
    plane, row = dy.strides[1] // itemsize, dy.strides[2] // itemsize
    first = (n * dy.strides[0] + k0 * dy.strides[1] + p0 * dy.strides[2]) // itemsize + q0
    for u in range(0, run, lanes):
        count = min(lanes, run - u)
        cols = min(2 * count, Q - q0 - 2 * u)
        _grad_output_panel_vector(dy, first + 2 * u, plane, row, p0 + 1 < P, cols, count, dm, m0 + u * MR)


#: Most tiles of one row transformed together. The 16 values of a tile are NR apart in a packed B panel: one
#: channel at a time (the padding, channels past a whole vector register), a longer run would leave the L1
#: cache before every channel of the panel has written its value; a vector register of channels at a time
#: writes whole vectors. Measured with the vector path (float32, 2 threads), 16 against 8: 8x64x56x56
#: 4.06-4.59 -> 3.94-4.04 ms, 8x128x28x28 3.57-3.83 -> 3.33-3.60; 32 was slower on 8x256x28x28.
RUN = 16


@njit(cache=True)
def _pack_tiles(x, dy, groups, pt, pl, g, b0, nb, v, dm):
    """Tiles ``b0 : b0 + nb`` (at most CHUNK) of group ``g``, transformed: ``V`` into ``v``, the packed B of the
    GEMM (row ``t - b0`` of each micro-panel: NR channels), ``dM`` into ``dm``, its packed A (MR channels per
    tile). Rows past the group's channels pad the last micro-panels: zeros, not stale values.

    A tile wholly inside the image is transformed for a vector register of channels at once
    (``_winograd._transform_channels_vector``: gathered, stored as the panel holds them); the tiles over the
    padding, and the channels past the last whole register, one channel at a time. ``dM`` is transformed a
    vector register of tiles of a whole micro-panel's filters at a time (``_grad_output_panel_vector``), the
    filters past the last whole micro-panel one at a time.
    """
    C, H, W = x.shape[1:]
    Cg, Kg = C // groups, dy.shape[1] // groups
    _, _, P, Q = dy.shape
    lanes = 64 // x.itemsize
    t = b0
    while t < b0 + nb:
        n, th, tw, run = _tile_rows(P, Q, min(b0 + nb, t + RUN), t)
        u = t - b0
        h0, w0 = 2 * th - pt, 2 * tw - pl
        # The tiles wholly inside the image, a vector register of channels at a time (gathered): their values
        # are stored side by side, as the panel holds them.
        lo, hi = _inside_tiles(H, W, h0, w0, run)
        vector_channels = Cg - Cg % lanes if hi > lo else 0
        for c0 in range(0, vector_channels, lanes):
            first = c0 // NR * NR * nb + u * NR + c0 % NR
            for k in range(lo, hi):
                base = ((n * C + g * Cg + c0) * H + h0) * W + w0 + 2 * k
                _transform_channels_vector(x, base, H * W, W, v, first + k * NR)
            for c in range(c0, c0 + lanes):
                _border_tiles(x[n, g * Cg + c], h0, w0, lo, hi, run, v, first + c - c0, WHOLE_PANEL)
        for c in range(vector_channels, _round_up(Cg, NR)):
            v0 = c // NR * NR * nb + u * NR + c % NR
            if c < Cg:
                _input_tiles(x, n, g * Cg + c, th, tw, run, pt, pl, v, v0, WHOLE_PANEL)
            else:
                _zero_columns(v, v0, run, NR)
        whole = Kg - Kg % MR  # filters in whole micro-panels: in vectors
        for k in range(0, whole, MR):
            _grad_output_panel(dy, n, g * Kg + k, th, tw, run, dm, k * nb + u * MR)
        for k in range(whole, _round_up(Kg, MR)):
            m0 = k // MR * MR * nb + u * MR + k % MR
            if k < Kg:
                _grad_output_tiles(dy, n, g * Kg + k, th, tw, run, dm, m0, MR)
            else:
                _zero_columns(dm, m0, run, MR)
        t += run


@njit(parallel=PRANGE_ONLY, cache=True)
def _winograd_weight_tasks(x, dy, pt, pl, groups, v, dm, partial, dw):
    """``dw = conv2d_weight(x, dy)`` for a 3x3, stride-1, undilated convolution (module docstring).

    Tasks ``(group, range of tiles)``, each summing into ``partial[range]`` (1, 16 * (K + 1), Cg): the
    transformed filter gradients, row ``xi * (K + 1) + k``. Each thread's scratch: ``v`` (threads, 16,
    round_up(Cg, NR) * CHUNK + 16) and ``dm`` (threads, 16, round_up(Kg, MR) * CHUNK + 16), CHUNK tiles packed as the
    micro-kernel's B and A (and a spare cache line).
    """
    N, C, _, _ = x.shape
    _, K, P, Q = dy.shape
    Cg, Kg = C // groups, K // groups
    ranges = partial.shape[0]
    tiles = N * -(-P // 2) * -(-Q // 2)
    for task in prange(groups * ranges):
        g, i = task // ranges, task % ranges
        thread = numba.get_thread_id()
        v_t, dm_t, sums = v[thread], dm[thread], partial[i]
        t0, t1 = i * tiles // ranges, (i + 1) * tiles // ranges
        pieces = -(-(t1 - t0) // CHUNK)  # of equal size: no GEMM of a few tiles
        for piece in range(pieces):
            b0 = t0 + piece * (t1 - t0) // pieces
            nb = t0 + (piece + 1) * (t1 - t0) // pieces - b0
            _pack_tiles(x, dy, groups, pt, pl, g, b0, nb, v_t, dm_t)
            for xi in range(XI):
                for jr in range(0, Cg, NR):
                    b_panel = v_t[xi, jr * nb : (jr + NR) * nb]
                    for ir in range(0, Kg, MR):
                        a_panel = dm_t[xi, ir * nb : (ir + MR) * nb]
                        row = xi * (K + 1) + g * Kg + ir
                        _micro_kernel(
                            nb, a_panel, b_panel, PACKED, sums, row, jr, min(MR, Kg - ir), min(NR, Cg - jr),
                            b0 > t0, FALSE, no_bias(sums),
                        )  # fmt: skip
    for k in prange(K):
        for xi in range(XI):  # the ranges' sums added in order, along contiguous rows
            total = partial[0, 0, xi * (K + 1) + k]
            for i in range(1, ranges):
                part = partial[i, 0, xi * (K + 1) + k]
                for c in range(Cg):
                    total[c] += part[c]
        for c in range(Cg):
            _filter_gradient(partial[0, 0], K + 1, k, c, dw[k, c])


@njit(cache=True)
def _zero_columns(v, v0, run, step):
    """``v[:, v0 + u * step] = 0`` for ``u < run``."""
    for xi in range(XI):
        for u in range(run):
            v[xi, v0 + u * step] = 0


@njit(cache=True, inline="always")
def _g_transposed_times(a, b, e, f):
    """``Gᵀ @ (a, b, e, f)``: 4 transformed values back to 3, along one axis, in float64."""
    a, b, e, f = np.float64(a), np.float64(b), np.float64(e), np.float64(f)
    return a + 0.5 * (b + e), 0.5 * (b - e), 0.5 * (b + e) + f


@njit(cache=True)
def _filter_gradient(du, K, k, c, dg):
    """``dg = Gᵀ dU G`` (3x3) of filter ``(k, c)``, whose 16 transformed gradients are ``du[xi * K + k, c]``
    (``K``: the rows from one position xi to the next); in float64, rounded once when stored."""
    rows = du[:, c]
    d = (
        rows[k], rows[K + k], rows[2 * K + k], rows[3 * K + k],
        rows[4 * K + k], rows[5 * K + k], rows[6 * K + k], rows[7 * K + k],
        rows[8 * K + k], rows[9 * K + k], rows[10 * K + k], rows[11 * K + k],
        rows[12 * K + k], rows[13 * K + k], rows[14 * K + k], rows[15 * K + k],
    )  # fmt: skip
    # Gᵀ dU, column by column of dU, then (Gᵀ dU) G, row by row.
    col0 = _g_transposed_times(d[0], d[4], d[8], d[12])
    col1 = _g_transposed_times(d[1], d[5], d[9], d[13])
    col2 = _g_transposed_times(d[2], d[6], d[10], d[14])
    col3 = _g_transposed_times(d[3], d[7], d[11], d[15])
    for i in range(3):
        row = _g_transposed_times(col0[i], col1[i], col2[i], col3[i])
        dg[i, 0], dg[i, 1], dg[i, 2] = row[0], row[1], row[2]
