"""Winograd F(2x2, 3x3): 3x3 stride-1 convolutions in 2.25 times fewer multiplications than the direct sum.

Each 2x2 tile of output pixels is computed from the 4x4 tile of input pixels under it (Lavin & Gray, 2016)::

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A        g: a 3x3 filter, d: a 4x4 input tile, Y: a 2x2 output tile

    Bᵀ = [[1, 0, -1, 0],   G = [[1,    0,   0],    Aᵀ = [[1, 1,  1,  0],
          [0, 1,  1, 0],        [1/2, 1/2, 1/2],         [0, 1, -1, -1]]
          [0, -1, 1, 0],        [1/2, -1/2, 1/2],
          [0, 1,  0, -1]]       [0,    0,   1]]

Summed over input channels, the 16 element-wise products become 16 GEMMs, one per position ``xi`` of the 4x4
transformed tile, each over the channels::

    # [Kg, Cg] [Cg, tiles] -> [Kg, tiles]     M[xi] = U[xi] @ V[xi]      (U = G g Gᵀ, V = Bᵀ d B)

That is 16 multiplications per 2x2 tile, 4 per output pixel and channel pair, where the direct sum takes 9.
The transforms only add and halve, so the rounding error stays within about three times the direct sum's
(measured: 8e-7 of the largest output for 512 channels in float32, against 2.5e-7 direct); F(4x4, 3x3) would
save more but is 60 times less accurate.

The filters are transformed once per call, in parallel over blocks of MR output channels, in vectors of
input channels. The tiles of the whole batch are processed in chunks of NR (the GEMM micro-kernel's width),
each by one thread (or, with as few chunks as threads, all of them by each thread, for a share of the output
channels): it transforms the chunk's input tiles straight into packed B panels (``V``, in cache),
multiplies them by the packed transformed filters with the GEMM's micro-kernel into ``M``, and transforms
``M`` into output pixels. On small images (WINOGRAD_PAD_MAX_SIZE) the input is first copied with its
padding, so that every tile is read whole, as vectors; otherwise nothing the size of the image is allocated.
Every output is written by one thread and summed in a fixed order, so results do not depend on the thread
count.
"""

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._gemm import FALSE, PACKED, _data, _panel_rows, _round_up, no_bias
from ._parallel import PRANGE_ONLY
from ._scratch import per_thread, scratch
from ._shifted import _pad_phases
from ._simd import (
    Vector,
    _gather,
    _lane_mask,
    _masked_load,
    _masked_store,
    _prefetch,
    _splat,
    _store_fence,
    deinterleaved_columns,
    interleaved,
    store,
    store_streaming,
    vector_type,
)
from .config import (
    KC,
    MR,
    NR,
    WINOGRAD_MIN_CHANNELS,
    WINOGRAD_MIN_TILES,
    WINOGRAD_PAD_MAX_SIZE,
    WINOGRAD_STREAM_FILTERS_BYTES,
)

_FASTMATH = {"contract"}

#: The input transform prefetches the rows of the channel this many ahead of the one it transforms, in
#: images at least PREFETCH_MIN_WIDTH wide. A chunk's tiles read a few rows of each of many channels: more
#: streams than the hardware prefetcher follows. Measured (float32, 2 threads, alternating processes), conv2d by
#: Winograd: 8x64x56x56 -> 64 4.1-4.4 -> 3.6-3.9 ms, 8x128x28x28 3.6-3.7 -> 3.1-3.3 (with the vector output
#: transform); on 7x7 images, whose planes are a few lines, the prefetches cost more than they saved
#: (8x512x7x7 4.7-4.9 -> 5.0-5.1).
PREFETCH_CHANNELS = 2
PREFETCH_MIN_WIDTH = 16

#: Input channels of a block of the filter transform (``_filter_block_vector``).
FILTER_LANES = 16

#: Positions of the transformed 4x4 tile: one GEMM each.
XI = 16

#: NR as a plain int64, not a Numba literal, so that the micro-kernel is not compiled once more for it.
WHOLE_PANEL = np.int64(NR)
#: The step between tiles in a packed B panel of the forward pass, likewise: ``_input_tiles`` is compiled once
#: for it and the weight gradient's step of NR.
ONE = np.int64(1)


def winograd_applies(geometry):
    """Whether Winograd F(2x2, 3x3) computes this convolution: 3x3 filters, stride 1, dilation 1."""
    return geometry.weight_shape[2:] == (3, 3) and geometry.stride == (1, 1) and geometry.dilation == (1, 1)


def winograd_pays(geometry):
    """Whether ``algorithm="auto"`` should take Winograd over the GEMM path for this (applicable) layer.

    The transforms cost about as much per pixel and channel as the multiplications they save when a group has
    few channels, and the filters are transformed on every call: Winograd pays with at least
    WINOGRAD_MIN_CHANNELS input and output channels per group and WINOGRAD_MIN_TILES 2x2 tiles in the batch,
    as many again per 256 channels beyond 256 (measured on Zen 4, see ``config.py``).
    """
    N, C, _, _ = geometry.input_shape
    K = geometry.weight_shape[0]
    _, _, P, Q = geometry.output_shape
    tiles = N * -(-P // 2) * -(-Q // 2)
    per_group = min(C, K) // geometry.groups
    required = WINOGRAD_MIN_TILES * max(256, per_group) / 256
    return per_group >= WINOGRAD_MIN_CHANNELS and tiles >= required


def _padded_shape(P, Q):
    """``(Hp, Wp)``, the padded input the tiles of a ``P x Q`` output read, or None where it is not copied so
    (``config.WINOGRAD_PAD_MAX_SIZE``): the rows and columns of every 4x4 tile, in steps of 2."""
    if min(P, Q) > WINOGRAD_PAD_MAX_SIZE:
        return None
    return 2 * -(-P // 2) + 2, 2 * -(-Q // 2) + 2


def winograd_workspace(geometry, dtype):
    """Bytes of scratch ``_conv2d_winograd`` allocates: transformed filters, each thread's chunk buffers and,
    on small images, the padded input."""
    N, C = geometry.input_shape[:2]
    K, Cg = geometry.weight_shape[:2]
    groups = geometry.groups
    filters = groups * XI * (_round_up(K // groups, MR) * Cg + 16)
    per_thread = XI * (min(KC, Cg) * MAX_SPAN_CHUNKS * NR + 16) + XI * (MAX_K_BLOCK + 1) * NR
    padded = _padded_shape(*geometry.output_shape[2:])
    padded_input = 0 if padded is None else N * C * padded[0] * padded[1]
    return dtype.itemsize * (filters + numba.config.NUMBA_NUM_THREADS * per_thread + padded_input)


@intrinsic
def _filter_block_vector(typingctx, weight, first, row_step, c_step, rows, swapped, count, up, g, start, streaming):
    """Transform the filters of MR output channels (rows) and a vector register of input channels (lanes) into
    their place in ``up`` (``_transform_filter_rows``), as vector code.

    The filter of row ``i < rows`` and lane ``l < count`` starts at flat index ``first + i * row_step + l *
    c_step`` of ``weight``, its 9 taps row by row, read rotated by 180 degrees when ``swapped``: 9 gathers
    per row. ``G g Gᵀ`` is computed in float64, along each axis ``(a, (a + b + c) / 2, (a - b + c) / 2, c)``
    summed left to right, and rounded once when stored. The MR rows' values for position ``xi`` are
    interleaved, channel by channel, into ``up[g, xi, start : start + MR * count]``: MR values per channel, as
    ``_pack_a`` lays out A's micro-panels. Rows past ``rows`` are zeros. With ``streaming``, whole vectors are
    stored past the caches (``_simd.store_streaming``).
    """
    dtype = weight.dtype

    def codegen(context, builder, signature, args):
        weight, first, row_step, c_step, rows, swapped, count, up, g, start, streaming = args
        register, _, size = vector_type(context, dtype)
        lanes = FILTER_LANES  # whatever the dtype: a vector of float64 takes two registers
        vector = llvm_ir.VectorType(register.element, lanes)
        double = llvm_ir.VectorType(llvm_ir.DoubleType(), lanes)
        index = llvm_ir.IntType(64)
        data = context.make_array(signature.args[0])(context, builder, weight).data
        lane = llvm_ir.Constant(llvm_ir.VectorType(index, lanes), list(range(lanes)))
        lane_offsets = builder.mul(lane, _splat(builder, builder.mul(c_step, index(size)), lanes))
        channels = _lane_mask(builder, count, lanes)
        none = llvm_ir.Constant(channels.type, [0] * lanes)
        half = llvm_ir.Constant(double, [0.5] * lanes)

        def g_times(h0, h1, h2):
            """``G @ (h0, h1, h2)``: the transform along one axis."""
            plus = builder.fmul(half, builder.fadd(builder.fadd(h0, h1), h2))
            minus = builder.fmul(half, builder.fadd(builder.fsub(h0, h1), h2))
            return h0, plus, minus, h2

        per_row = []
        for i in range(MR):
            mask = builder.select(builder.icmp_signed("<", index(i), rows), channels, none)
            row = builder.add(first, builder.mul(index(i), row_step))
            base = builder.add(_splat(builder, builder.ptrtoint(builder.gep(data, [row]), index), lanes), lane_offsets)
            f = [[None] * 3 for _ in range(3)]
            for r in range(3):
                for c in range(3):
                    tap = builder.select(swapped, index((2 - r) * 3 + 2 - c), index(r * 3 + c))
                    address = builder.add(base, _splat(builder, builder.mul(tap, index(size)), lanes))
                    value = _gather(builder, vector, size, address, mask)
                    f[r][c] = value if size == 8 else builder.fpext(value, double)
            columns = [g_times(f[0][c], f[1][c], f[2][c]) for c in range(3)]  # G g, column by column
            values = []
            for a in range(4):  # (G g) Gᵀ, row by row
                values += list(g_times(columns[0][a], columns[1][a], columns[2][a]))
            per_row.append([v if size == 8 else builder.fptrunc(v, vector) for v in values])
        stored = _lane_mask(builder, builder.mul(count, index(MR)), 4 * lanes)
        array = context.make_array(signature.args[7])(context, builder, up)
        strides = cgutils.unpack_tuple(builder, array.strides)
        for xi in range(XI):
            low = interleaved(builder, per_row[0][xi], per_row[1][xi])
            high = interleaved(builder, per_row[2][xi], per_row[3][xi])
            out = interleaved(builder, low, high, 2)  # channel by channel, MR rows each
            offset = builder.add(builder.mul(g, strides[0]), builder.mul(index(xi), strides[1]))
            offset = builder.add(builder.sdiv(offset, index(size)), start)
            with builder.if_else(builder.icmp_signed("==", count, index(lanes))) as (whole, part):
                with whole, builder.if_else(streaming) as (past_caches, cached):
                    with past_caches:
                        store_streaming(builder, out, array.data, offset, size)
                    with cached:
                        store(builder, out, array.data, offset, size)
                with part:
                    _masked_store(builder, out, size, array.data, offset, stored)
        return context.get_dummy_value()

    signature = types.none(weight, first, row_step, c_step, rows, swapped, count, up, g, start, streaming)
    return signature, codegen


@njit(cache=True)
def _transform_filter_rows(weight, task, Kg, Cg, swapped, streaming, up):
    """Rows ``ir : ir + MR`` of ``up[g, xi]`` (task ``g * blocks + ir // MR``), the packed A of the group's ``[Kg,
    Cg]`` matrices ``(G g Gᵀ)[xi]``, 16 input channels at a time (``_filter_block_vector``).

    ``up`` (groups, 16, round_up(Kg, MR) * Cg + pad) is laid out as ``_gemm._pack_a`` lays out A: KC-column
    blocks of MR-row micro-panels; rows past Kg are zeros. The filter ``g`` of output channel ``k`` and input
    channel ``c`` of the group is ``weight[k, c]``, or with ``swapped``, ``weight[g * Cg + c, k % Kg]`` rotated
    by 180 degrees: the input gradient's filters, read from the forward pass's (``conv.py``). Measured (float32,
    2 threads), against the scalar loop this replaced (26 cycles a filter, the same bits): 128 x 128 filters
    0.06 -> 0.04 ms, 256 x 256 0.23 -> 0.15, 512 x 512 0.90 -> 0.84-0.99 (writing 16 MiB bounds it; without
    the prefetches 1.5-2.3); conv2d by Winograd 8x256x14x14 4.14-4.21 -> 3.99-4.14 ms, 8x512x7x7 5.57-5.81 ->
    5.21-5.60 (alternating processes, a slow period of the machine).
    """
    m_pad = _round_up(Kg, MR)
    blocks = m_pad // MR
    g, ir = task // blocks, task % blocks * MR
    rows = min(MR, Kg - ir)
    if swapped:  # weight (C, Kg, 3, 3)
        first, row_step, c_step = (g * Cg * Kg + ir) * 9, 9, Kg * 9
    else:  # weight (K, Cg, 3, 3)
        first, row_step, c_step = (g * Kg + ir) * Cg * 9, Cg * 9, 9
    for pc in range(0, Cg, KC):
        kc = min(KC, Cg - pc)
        for c0 in range(0, kc, FILTER_LANES):
            count = min(FILTER_LANES, kc - c0)
            at = pc * m_pad + ir * kc + c0 * MR
            # The block after next, prefetched line by line: gathers from memory wait for every line they read.
            ahead = first + (pc + c0 + 2 * FILTER_LANES) * c_step
            runs, run_step, length = (
                (rows, row_step, FILTER_LANES * c_step)
                if c_step < row_step
                else (FILTER_LANES, c_step, (rows - 1) * row_step + 9)
            )
            for run in range(runs):
                for offset in range(0, length + 15, 16):
                    _prefetch(_data(weight), min(ahead + run * run_step + offset, weight.size - 1))
            block = first + (pc + c0) * c_step
            _filter_block_vector(weight, block, row_step, c_step, rows, swapped, count, up, g, at, streaming)
    if streaming:
        _store_fence()


@njit(cache=True, inline="always")
def _bt_d_b(d):
    """``Bᵀ d B`` of one 4x4 tile ``d`` (a 16-tuple, row-major), as a 16-tuple; only additions."""
    # d B: each row of the tile combined along its columns.
    a0, a1, a2, a3 = d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]
    b0, b1, b2, b3 = d[4] - d[6], d[5] + d[6], d[6] - d[5], d[5] - d[7]
    c0, c1, c2, c3 = d[8] - d[10], d[9] + d[10], d[10] - d[9], d[9] - d[11]
    e0, e1, e2, e3 = d[12] - d[14], d[13] + d[14], d[14] - d[13], d[13] - d[15]
    # Bᵀ (d B): the rows combined.
    return (
        a0 - c0, a1 - c1, a2 - c2, a3 - c3,
        b0 + c0, b1 + c1, b2 + c2, b3 + c3,
        c0 - b0, c1 - b1, c2 - b2, c3 - b3,
        b0 - e0, b1 - e1, b2 - e2, b3 - e3,
    )  # fmt: skip


@njit(cache=True, inline="always")
def _store_column(v, u, t):
    """``v[xi, u] = t[xi]`` for the 16 positions of a transformed tile."""
    v[0, u], v[1, u], v[2, u], v[3, u] = t[0], t[1], t[2], t[3]
    v[4, u], v[5, u], v[6, u], v[7, u] = t[4], t[5], t[6], t[7]
    v[8, u], v[9, u], v[10, u], v[11, u] = t[8], t[9], t[10], t[11]
    v[12, u], v[13, u], v[14, u], v[15, u] = t[12], t[13], t[14], t[15]


def _positions(context, builder, array_type, array, start, size, positions=XI):
    """``(data, offsets)``: the pointer to ``array``'s values and the flat offset of ``array[xi, start]`` for each
    position ``xi`` of a transformed tile, 16 here, 9 for F(2x2, 2x2) (``array`` a 2-D array, rows of any
    stride)."""
    rows = context.make_array(array_type)(context, builder, array)
    index = llvm_ir.IntType(64)
    row_stride = builder.sdiv(cgutils.unpack_tuple(builder, rows.strides)[0], index(size))
    return rows.data, [builder.add(builder.mul(index(xi), row_stride), start) for xi in range(positions)]


def _store_positions(context, builder, array_type, array, t, start, size, valid=None):
    """``array[xi, start : start + lanes] = t[xi]`` for the 16 ``Vector`` positions ``t`` of transformed tiles
    (``array`` a 2-D array, rows of any stride): the stores of the vector transforms below. Given ``valid`` (an
    i64 value), only the first ``valid`` lanes are stored."""
    data, offsets = _positions(context, builder, array_type, array, start, size)
    mask = None if valid is None else _lane_mask(builder, valid, t[0].value.type.count)
    for value, offset in zip(t, offsets):
        if mask is None:
            store(builder, value.value, data, offset, size)
        else:
            _masked_store(builder, value.value, size, data, offset, mask)


def _tile_vector_codegen(dtype, masked):
    """Code for ``_transform_tile_vector`` (all lanes) or ``_transform_tiles_masked`` (the first ``count``)."""

    def codegen(context, builder, signature, args):
        _, _, size = vector_type(context, dtype)
        valid = args[7] if masked else None
        d = []
        for i in range(4):
            row = builder.gep(context.make_array(signature.args[i])(context, builder, args[i]).data, [args[4]])
            d += [Vector(builder, value) for value in deinterleaved_columns(context, builder, dtype, row, 4, valid)]
        t = _bt_d_b.py_func(tuple(d))
        _store_positions(context, builder, signature.args[5], args[5], t, args[6], size, valid)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _transform_tile_vector(typingctx, r0, r1, r2, r3, j, v, u):
    """``v[xi, u + l] = (Bᵀ d_l B)[xi]`` for a vector register of tiles ``l``, whose 4x4 tiles ``d_l`` are
    columns ``j + 2l`` to ``j + 2l + 3`` of the contiguous rows ``r0..r3``: ``_transform_tiles``'s loop, as
    vector code (``_simd.py``). Each row is read as two double-width vectors, at ``j`` and ``j + 2``, split
    into even and odd columns: the tiles' four columns, one tile per lane."""
    return types.none(r0, r1, r2, r3, j, v, u), _tile_vector_codegen(r0.dtype, masked=False)


@intrinsic
def _transform_tiles_masked(typingctx, r0, r1, r2, r3, j, v, u, count):
    """``_transform_tile_vector`` for the first ``count`` lanes only (fewer than a vector register's): the rows
    are read no further than those tiles, and ``v`` is written for them alone."""
    return types.none(r0, r1, r2, r3, j, v, u, count), _tile_vector_codegen(r0.dtype, masked=True)


@intrinsic
def _transform_channels_vector(typingctx, x, base, plane, W, v, v0):
    """``v[xi, v0 + l] = (Bᵀ d_l B)[xi]`` for a vector register of channels ``l``, whose 4x4 tiles ``d_l`` start
    at flat index ``base + l * plane`` of ``x`` (rows ``W`` apart): one tile of consecutive channels, read by
    16 gathers, for the weight gradient's packed B, whose rows hold the channels of one tile side by side."""
    dtype = x.dtype

    def codegen(context, builder, signature, args):
        _, base, plane, W, _, v0 = args
        vector, lanes, size = vector_type(context, dtype)
        index = llvm_ir.IntType(64)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        start = builder.ptrtoint(builder.gep(data, [base]), index)
        lane = llvm_ir.Constant(llvm_ir.VectorType(index, lanes), list(range(lanes)))
        step = _splat(builder, builder.mul(plane, index(size)), lanes)
        first = builder.add(_splat(builder, start, lanes), builder.mul(lane, step))  # each channel's tile
        every = llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(1), lanes), [1] * lanes)
        d = []
        for r in range(4):
            for c in range(4):
                offset = builder.mul(builder.add(builder.mul(index(r), W), index(c)), index(size))
                addresses = builder.add(first, _splat(builder, offset, lanes))
                d.append(Vector(builder, _gather(builder, vector, size, addresses, every)))
        _store_positions(context, builder, signature.args[4], args[4], _bt_d_b.py_func(tuple(d)), v0, size)
        return context.get_dummy_value()

    return types.none(x, base, plane, W, v, v0), codegen


@njit(cache=True)
def _transform_tiles(r0, r1, r2, r3, count, v, step):
    """``v[xi, u * step]`` = ``(Bᵀ d_u B)[xi]`` for ``u < count``, where the 4x4 tile ``d_u`` is columns ``2u``
    to ``2u + 3`` of the rows ``r0..r3``: one column of a packed B panel per tile (``step`` 1), or one row of
    the weight gradient's (``step`` NR).

    At step 1, a vector register of tiles at a time (``_transform_tile_vector``), the last tiles in one masked
    vector (``_transform_tiles_masked``); at other steps one tile at a time with all 16 values in registers.
    Every index of the scalar loop starts from 0 (callers slice first), so LLVM knows none is negative and adds
    no wraparound test. Measured, float32: 4.0 ns per tile one at a time, 0.8 ns in vectors (one core, long
    runs). The masked vector, against the scalar loop for the rest (float32, 2 threads, conv2d by Winograd):
    8x128x28x28 (runs of 12 tiles inside the padding) 3.8-4.1 -> 3.7-4.1 ms, 8x256x14x14 (5 tiles) 4.1 ->
    4.0; 8x64x56x56 (26 tiles) unchanged.
    """
    if step == 1:
        lanes = 64 // r0.itemsize
        whole = count - count % lanes
        for u in range(0, whole, lanes):
            _transform_tile_vector(r0, r1, r2, r3, 2 * u, v, u)
        if whole < count:
            _transform_tiles_masked(r0, r1, r2, r3, 2 * whole, v, whole, count - whole)
        return
    for u in range(count):
        j = 2 * u
        d = (
            r0[j], r0[j + 1], r0[j + 2], r0[j + 3],
            r1[j], r1[j + 1], r1[j + 2], r1[j + 3],
            r2[j], r2[j + 1], r2[j + 2], r2[j + 3],
            r3[j], r3[j + 1], r3[j + 2], r3[j + 3],
        )  # fmt: skip
        _store_column(v, u * step, _bt_d_b(d))


@njit(cache=True, inline="always")
def _pixel(plane, h, w):
    """``plane[h, w]``, or 0 in the padding around it."""
    H, W = plane.shape
    return plane[h, w] if 0 <= h < H and 0 <= w < W else plane.dtype.type(0)


@njit(cache=True)
def _border_tile(plane, h0, w0, v, u):
    """``v[:, u]`` = ``Bᵀ d B`` for the tile ``d`` at ``(h0, w0)``, which overlaps the padding."""
    p = plane
    h1, h2, h3, w1, w2, w3 = h0 + 1, h0 + 2, h0 + 3, w0 + 1, w0 + 2, w0 + 3
    d = (
        _pixel(p, h0, w0), _pixel(p, h0, w1), _pixel(p, h0, w2), _pixel(p, h0, w3),
        _pixel(p, h1, w0), _pixel(p, h1, w1), _pixel(p, h1, w2), _pixel(p, h1, w3),
        _pixel(p, h2, w0), _pixel(p, h2, w1), _pixel(p, h2, w2), _pixel(p, h2, w3),
        _pixel(p, h3, w0), _pixel(p, h3, w1), _pixel(p, h3, w2), _pixel(p, h3, w3),
    )  # fmt: skip
    _store_column(v, u, _bt_d_b(d))


@njit(cache=True, inline="always")
def _border_tiles(plane, h0, w0, u0, u1, run, v, v0, step):
    """``_border_tile`` for the tiles of a run outside ``u0:u1`` (``_inside_tiles``): into ``v[:, v0 + u *
    step]``."""
    for u in range(u0):
        _border_tile(plane, h0, w0 + 2 * u, v, v0 + u * step)
    for u in range(u1, run):
        _border_tile(plane, h0, w0 + 2 * u, v, v0 + u * step)


@njit(cache=True, inline="always")
def _inside_tiles(H, W, h0, w0, run):
    """``(u0, u1)``: the tiles ``u0:u1`` of a run whose 4x4 input tiles, from ``(h0, w0 + 2u)``, lie wholly inside
    the ``H x W`` image; ``u1 <= u0`` when none does."""
    u0, u1 = run, run
    if 0 <= h0 and h0 + 4 <= H and W - 4 - w0 >= 0:
        u0 = min(run, max(0, -(w0 // 2)))
        u1 = max(u0, min(run, (W - 4 - w0) // 2 + 1))
    return u0, u1


@njit(cache=True)
def _input_tiles(x, n, c, th, tw0, run, pt, pl, v, v0, step):
    """Transform the input tiles of tiles ``(n, th, tw0 + u)``, ``u < run``, of channel ``c`` into
    ``v[:, v0 + u * step]``.

    Tiles wholly inside the image are read straight from ``x``; the few overlapping the padding (the ends of
    a row of tiles, the first and last rows) one pixel at a time, with bounds tests.
    """
    _, _, H, W = x.shape
    plane = x[n, c]
    h0 = 2 * th - pt
    w0 = 2 * tw0 - pl
    u0, u1 = _inside_tiles(H, W, h0, w0, run)
    if u1 > u0:
        start = w0 + 2 * u0
        rows = plane[h0 : h0 + 4]
        tiles = v[:, v0 + u0 * step :]
        _transform_tiles(rows[0, start:], rows[1, start:], rows[2, start:], rows[3, start:], u1 - u0, tiles, step)
    _border_tiles(plane, h0, w0, u0, u1, run, v, v0, step)


@intrinsic
def _output_tiles_vector(typingctx, m, u, top, bottom, j, count, cols, accumulate):
    """``_output_tiles``'s loop for a vector register of tiles ``u + l``, ``l < count``, of two output rows:
    ``top[j : j + cols]`` and ``bottom[j : j + cols]`` (+)= the tiles' rows, the two values of each tile side
    by side. ``m`` is read in rows of lanes, with the scalar loop's arithmetic in its order; its lanes past
    ``count`` and the rows' values past ``cols`` are neither read nor written."""
    dtype = m.dtype

    def codegen(context, builder, signature, args):
        m, u, top, bottom, j, count, cols, accumulate = args
        vector, lanes, size = vector_type(context, dtype)
        data, offsets = _positions(context, builder, signature.args[0], m, u, size)
        tiles = _lane_mask(builder, count, lanes)
        t = [Vector(builder, _masked_load(builder, vector, size, data, offset, tiles)) for offset in offsets]
        s0, s1, s2, s3 = (t[i] + t[4 + i] + t[8 + i] for i in range(4))
        d0, d1, d2, d3 = (t[4 + i] - t[8 + i] - t[12 + i] for i in range(4))
        double = llvm_ir.VectorType(vector.element, 2 * lanes)
        values = _lane_mask(builder, cols, 2 * lanes)
        for a, first, second in ((2, s0 + s1 + s2, s1 - s2 - s3), (3, d0 + d1 + d2, d1 - d2 - d3)):
            row = context.make_array(signature.args[a])(context, builder, args[a]).data
            out = interleaved(builder, first.value, second.value)  # the two columns of each tile, in turn
            with builder.if_else(accumulate) as (add, assign):
                with add:
                    old = _masked_load(builder, double, size, row, j, values)
                    _masked_store(builder, builder.fadd(out, old), size, row, j, values)
                with assign:
                    _masked_store(builder, out, size, row, j, values)
        return context.get_dummy_value()

    return types.none(m, u, top, bottom, j, count, cols, accumulate), codegen


@njit(cache=True)
def _output_tiles(m, y, n, k, th, tw0, run, accumulate):
    """Write (or add) ``Aᵀ M_u A``, the 2x2 output tile of tile ``(n, th, tw0 + u)``, for ``u < run``, channel
    ``k``; ``m[xi, u]`` holds ``M_u``, the tile's GEMM results.

    A vector register of tiles at a time (``_output_tiles_vector``) where a run fills half of one at least,
    else one tile at a time with all 16 values in registers. Tiles overhanging an odd-sized output lose their
    last row or column. Measured (float32, 2 threads), vectors against tiles one at a time, with the input
    prefetched either way: 8x64x56x56 -> 64 3.97-4.40 -> 3.50-4.21 ms; equal on 28x28 images; slower on 7x7
    ones (runs of 4 tiles: 8x512x7x7 5.1-5.3 -> 5.4-5.5), hence the half.
    """
    _, _, P, Q = y.shape
    p0, q0 = 2 * th, 2 * tw0
    two_rows = p0 + 1 < P
    top = y[n, k, p0, q0:]
    bottom = y[n, k, p0 + 1 if two_rows else p0, q0:]
    lanes = 64 // m.itemsize
    if two_rows and 2 * run >= lanes:
        for u in range(0, run, lanes):
            count = min(lanes, run - u)
            _output_tiles_vector(m, u, top, bottom, 2 * u, count, min(2 * count, Q - q0 - 2 * u), accumulate)
        return
    for u in range(run):
        # Aᵀ M: the rows of M combined, then (Aᵀ M) A: the columns.
        s0 = m[0, u] + m[4, u] + m[8, u]
        s1 = m[1, u] + m[5, u] + m[9, u]
        s2 = m[2, u] + m[6, u] + m[10, u]
        s3 = m[3, u] + m[7, u] + m[11, u]
        d0 = m[4, u] - m[8, u] - m[12, u]
        d1 = m[5, u] - m[9, u] - m[13, u]
        d2 = m[6, u] - m[10, u] - m[14, u]
        d3 = m[7, u] - m[11, u] - m[15, u]
        y00, y01 = s0 + s1 + s2, s1 - s2 - s3
        y10, y11 = d0 + d1 + d2, d1 - d2 - d3
        both = q0 + 2 * u + 1 < Q
        if accumulate:
            y00 += top[2 * u]
            y01 += top[2 * u + 1] if both else 0
            y10 += bottom[2 * u] if two_rows else 0
            y11 += bottom[2 * u + 1] if two_rows and both else 0
        top[2 * u] = y00
        if both:
            top[2 * u + 1] = y01
        if two_rows:
            bottom[2 * u] = y10
            if both:
                bottom[2 * u + 1] = y11


@njit(cache=True)
def _tile_rows(P, Q, end, t):
    """The run of 2x2 tiles of a P x Q output from tile ``t`` along its row, up to tile ``end``: ``(n, th, tw,
    run)``."""
    TH, TW = -(-P // 2), -(-Q // 2)
    tw = t % TW
    return t // (TH * TW), t // TW % TH, tw, min(end - t, TW - tw)


@njit(cache=True, inline="always")
def task_share(task, tiles, channels, block):
    """``(g, first, last, c0, c1)``: task ``(group g, chunk of NR tiles first:last, block c0:c1 of the group's
    output channels)``, of ``tiles`` tiles and ``channels`` channels per group in blocks of ``block``."""
    chunks = -(-tiles // NR)
    blocks = -(-channels // block)
    chunk, c0 = task // blocks % chunks, task % blocks * block
    return task // (chunks * blocks), chunk * NR, min(tiles, chunk * NR + NR), c0, min(channels, c0 + block)


@njit(cache=True, inline="always")
def chunk_runs(P, Q, first, last, runs):
    """The runs of 2x2 tiles ``first:last`` of a batch of P x Q outputs, one per tile row ``(n, th)`` they
    cover: ``runs[i] = (n, th, tw, run)`` for ``i`` below the count returned. Decoded once per chunk: the
    same for every channel, and the divisions cost as much as transforming a short run."""
    n_runs = 0
    t = first
    while t < last:
        runs[n_runs, 0], runs[n_runs, 1], runs[n_runs, 2], runs[n_runs, 3] = _tile_rows(P, Q, last, t)
        t += runs[n_runs, 3]
        n_runs += 1
    return n_runs


@njit(cache=True, inline="always")
def _prefetch_tiles(x_data, shape, c, pt, pl, runs, n_runs):
    """Hint that the input rows under the runs of tiles ``runs[:n_runs]`` in channel ``c`` will be read soon: a
    chunk's tiles read a few rows of each of many channels, more streams than the hardware prefetcher follows."""
    N, C, H, W = shape
    for i in range(n_runs):
        h0, w0 = 2 * runs[i, 1] - pt, 2 * runs[i, 2] - pl
        h1, w1 = min(h0 + 4, H), min(W, w0 + 2 * runs[i, 3] + 2)
        h0, w0 = max(h0, 0), max(w0, 0)
        if h1 > h0 and w1 > w0:  # the lines from the run's first pixel to its last, rows between included
            plane = (runs[i, 0] * C + c) * H
            first, last = (plane + h0) * W + w0, (plane + h1 - 1) * W + w1
            for flat in range(first, last, 16):
                _prefetch(x_data, flat)
            _prefetch(x_data, last - 1)


@njit(cache=True, inline="always")
def _chunk_inputs(x, pt, pl, c0, first, last, j, kc, p0, p1, P, Q, v, runs):
    """Channels ``c0 + p0 : c0 + p1`` of a KC block of ``kc`` channels from ``c0``, for chunk ``j`` of the tiles
    ``first:last``: their input tiles transformed into packed B micro-panel ``j`` of ``v`` (tiles past the last
    zeros)."""
    chunk_first = first + j * NR
    chunk_last = min(last, chunk_first + NR)
    n_runs = chunk_runs(P, Q, chunk_first, chunk_last, runs)
    for p in range(p0, p1):
        c = c0 + p
        if p + PREFETCH_CHANNELS < p1 and x.shape[3] >= PREFETCH_MIN_WIDTH:
            _prefetch_tiles(_data(x), x.shape, c + PREFETCH_CHANNELS, pt, pl, runs, n_runs)
        base = (j * kc + p) * NR
        for t in range(chunk_last - chunk_first, NR):
            for xi in range(XI):
                v[xi, base + t] = 0
        for i in range(n_runs):
            _input_tiles(x, runs[i, 0], c, runs[i, 1], runs[i, 2], runs[i, 3], pt, pl, v, base, ONE)
            base += runs[i, 3]


@njit(cache=True, inline="always")
def _tile_task(x, pt, pl, groups, span, accumulate, shared, up, v, m, runs, y, task):
    """Task ``task = (g, first, last, k0, k1)`` of ``_winograd_tasks``: tiles ``first:last`` (at most ``span``) of
    group ``g``, its output channels ``k0:k1``.

    Transforms the tiles' input into ``v``, one KC block of channels at a time, a packed B micro-panel per
    chunk of NR tiles (unless ``shared``: then ``v`` holds them already), multiplies them by the transformed
    filters into ``m`` (one GEMM per position of the tile, with the GEMM's micro-kernel), and transforms ``m``
    into the output tiles of those channels.
    """
    _, C, _, _ = x.shape
    _, K, P, Q = y.shape
    Cg = C // groups
    Kg = K // groups
    g, first, last, k0, k1 = task[0], task[1], task[2], task[3], task[4]
    chunks = -(-(last - first) // NR)
    for pc in range(0, Cg, KC):
        kc = min(KC, Cg - pc)
        for j in range(chunks):
            if not shared:
                _chunk_inputs(x, pt, pl, g * Cg + pc, first, last, j, kc, 0, kc, P, Q, v, runs)
        for xi in range(XI):  # rows k0:k1 of the GEMM xi, into rows 0:k1-k0 of m
            for j in range(chunks):
                panel = v[xi, j * kc * NR : (j + 1) * kc * NR]
                _panel_rows(
                    up[g, xi], Kg, pc, kc, k0, k1, panel, PACKED, m, -k0, xi * span + j * NR, WHOLE_PANEL,
                    pc > 0, FALSE, no_bias(m),
                )  # fmt: skip
    for j in range(chunks):
        n_runs = chunk_runs(P, Q, first + j * NR, min(last, first + j * NR + NR), runs)
        for k in range(k0, k1):
            offset = j * NR
            for i in range(n_runs):
                n, th, tw, run = runs[i, 0], runs[i, 1], runs[i, 2], runs[i, 3]
                _output_tiles(m[:, k - k0, offset:], y, n, g * Kg + k, th, tw, run, accumulate)
                offset += run


@njit(parallel=PRANGE_ONLY, cache=True)
def _winograd_tasks(x, weight, swapped, streaming, pt, pl, groups, tasks, span, accumulate, up, v, m, runs, y):
    """``y (+)= conv2d(x, weight)`` for a 3x3, stride-1, undilated convolution.

    First the filters are transformed into ``up`` (its rows past Kg zeros), in parallel over output channels
    (``swapped``: see ``_transform_filter_rows``), past the caches with ``streaming`` (large layers: see
    ``config.WINOGRAD_STREAM_FILTERS_BYTES``), each task ending with a store fence. Then the rows of
    ``tasks``, ``(g, first tile, last tile, first output channel, last)`` (``_winograd_task_table``;
    ``_tile_task``), run in parallel, each thread with its own scratch, indexed by ``numba.get_thread_id()``:
    ``v`` (threads, 16, min(KC, Cg) * span + pad) the tiles' transformed input as packed B panels, ``m``
    (threads, 16, most channels of a task + 1, span) their GEMM results, ``runs`` (threads, NR, 4) the runs of
    tiles of one chunk of them. Where every task takes all the tiles (``shared_inputs``), their transformed
    input is made once, before the tasks, a share of the channels by each thread, into ``v[0]``, which all the
    tasks then read. The parallel loops only call serial functions.
    """
    Kg, Cg = y.shape[1] // groups, x.shape[1] // groups
    for task in prange(groups * _round_up(Kg, MR) // MR):
        _transform_filter_rows(weight, task, Kg, Cg, swapped, streaming, up)
    # Tasks that all take every tile of one block of channels (shared_inputs) share its transformed input: the
    # threads transform a share of its channels each into v[0], once, instead of all of them each.
    shared = shared_inputs(groups, Cg, tasks)
    if shared:
        P, Q = y.shape[2], y.shape[3]
        last = tasks[0, 2]
        chunks = -(-last // NR)
        parts = v.shape[0] * chunks
        for part in prange(parts):
            j, share = part % chunks, part // chunks
            p0, p1 = share * Cg // v.shape[0], (share + 1) * Cg // v.shape[0]
            _chunk_inputs(x, pt, pl, 0, 0, last, j, Cg, p0, p1, P, Q, v[0], runs[numba.get_thread_id()])
    for task in prange(tasks.shape[0]):
        t = numba.get_thread_id()
        own = v[0] if shared else v[t]
        _tile_task(x, pt, pl, groups, span, accumulate, shared, up, own, m[t], runs[t], y, tasks[task])


@njit(cache=True)
def shared_inputs(groups, Cg, tasks):
    """Whether the tasks of ``_winograd_tasks`` share one transformed input: one group of at most KC channels,
    and at least two tasks, each of every tile (they split the output channels)."""
    if groups != 1 or Cg > KC or tasks.shape[0] < 2:
        return False
    for i in range(tasks.shape[0]):
        if tasks[i, 1] != 0 or tasks[i, 2] != tasks[0, 2]:
            return False
    return True


#: Most output channels one task computes. Each task transforms its chunk's input tiles for all of the group's
#: input channels, so splitting the output channels between tasks repeats that transform; a task's GEMM results
#: take ``16 * NR * k_block`` values of scratch (2 MiB of float32 at 512).
MAX_K_BLOCK = 512


def _winograd_k_block(Kg, chunks, threads):
    """Output channels per task: as many as MAX_K_BLOCK allows, fewer only to give every thread a task.

    Measured (float32, 2 threads) against the previous rule (at most 128, and at least 4 tasks per thread):
    8x512x7x7 6.5 -> 5.1 ms, 4x512x7x7 4.7 -> 3.2 ms, 8x256x14x14 3.9 -> 3.8 ms, 8x256x14x14 -> 512 8.8 ->
    7.2 ms; layers with 128 channels or fewer unchanged. The input transform repeated per task cost more than
    the load imbalance of fewer tasks.
    """
    k_block = _round_up(min(Kg, MAX_K_BLOCK), MR)
    while k_block > 4 * MR and chunks * -(-Kg // k_block) < threads:
        k_block = _round_up(k_block // 2, MR)
    return k_block


#: Most chunks of NR tiles a task takes at once (``_winograd_span``).
MAX_SPAN_CHUNKS = 2


def _winograd_span(Kg, groups, chunks, threads):
    """``(span, k_block)``: tiles and output channels per task.

    A task of one chunk reads all of its block of transformed filters for one micro-panel of B; with a chunk
    per thread (8x512x7x7: two chunks), each thread reads all of them (16 MiB at 512 channels), once per chunk.
    With as few chunks as threads (and at most MAX_SPAN_CHUNKS), a task takes them all, each micro-panel of A
    used for all of them, and the threads split the output channels instead: the filters read once in all.
    Measured (float32, 2 threads, alternating processes): 8x512x7x7 -> 512 5.9-6.0 -> 5.4-5.7 ms (a slow
    period of the machine; 5.9-6.0 -> 5.4-5.7 again with PyTorch's calls in between, as the bench runs),
    2x256x14x14 1.55-1.63 -> 1.33-1.35, 8x256x7x7 1.62-1.66 -> 1.55-1.60, 2x512x14x14 unchanged within noise.
    Otherwise a chunk per task (``_winograd_k_block``).
    """
    if groups == 1 and 1 < chunks <= min(threads, MAX_SPAN_CHUNKS):
        return chunks * NR, _round_up(-(-Kg // threads), MR)
    return NR, _winograd_k_block(Kg, groups * chunks, threads)


def _winograd_task_table(groups, tiles, Kg, threads):
    """``(span, tasks)``: tiles per task at most, and the tasks, rows ``(g, first tile, last tile, first output
    channel, last)``, in the order the parallel loop deals them out: in equal runs of rows, one per thread.

    Chunks of NR tiles and blocks of output channels (``_winograd_span``). Where the chunks do not divide
    evenly between the threads (8x256x14x14: 7 chunks on 2 threads, 4 against 3), the last ones are split
    between all threads by output channels (their input transform made once per thread), and each thread's
    run of rows takes its share of the whole chunks and one piece of each of those: the same work for each.
    Measured in one process, alternating (float32, 2 threads, a slow period of the machine): 8x256x14x14 -> 256
    (7 chunks, the last of 8 tiles) 5.04-5.09 -> 4.74-4.90 ms, 8x128x28x28 (25 chunks) 4.17-4.48 -> 4.09-4.20.
    """
    chunks = -(-tiles // NR)
    span, k_block = _winograd_span(Kg, groups, chunks, threads)
    spans = -(-tiles // span)
    whole = [
        (g, s * span, min(tiles, s * span + span), k0, min(Kg, k0 + k_block))
        for g in range(groups)
        for s in range(spans)
        for k0 in range(0, Kg, k_block)
    ]
    left = len(whole) % threads
    piece = _round_up(-(-Kg // threads), MR)
    if span == NR and k_block >= Kg and left and len(whole) > threads and Kg >= threads * 4 * MR:
        shared, whole = whole[len(whole) - left :], whole[: len(whole) - left]
        rows = []
        for t in range(threads):
            rows += whole[t * len(whole) // threads : (t + 1) * len(whole) // threads]
            rows += [(g, first, last, t * piece, min(Kg, t * piece + piece)) for g, first, last, _, _ in shared]
        whole = rows
    return span, np.array(whole, np.int64).reshape(-1, 5)


def _conv2d_winograd(x, weight, geometry, groups, accumulate, y, swapped=False):
    """``y (+)= conv2d(x, weight)`` by Winograd F(2x2, 3x3); 3x3 filters, stride 1, dilation 1.

    Same contract as ``_conv_kernels._conv2d_forward``: with ``accumulate`` the result is added to ``y``
    (which holds the bias), without, ``y`` is overwritten. With ``swapped``, ``weight`` holds the filters of
    the convolution whose input gradient this is: ``(C, K/groups, 3, 3)``, read with channels in and out
    swapped and rotated by 180 degrees (``_transform_filter_rows``), so they need not be copied so.
    """
    K, Cg = y.shape[1], x.shape[1] // groups
    Kg = K // groups
    dtype = y.dtype
    tiles = x.shape[0] * -(-y.shape[2] // 2) * -(-y.shape[3] // 2)
    span, tasks = _winograd_task_table(groups, tiles, Kg, numba.config.NUMBA_NUM_THREADS)
    k_block = int((tasks[:, 4] - tasks[:, 3]).max(initial=0))
    # The 16 rows of up, v and m are written (read) together, one value each per tile: rows a multiple of 4 KiB
    # apart would share one set of the L1 cache and evict each other (8x slower, measured). One spare cache
    # line, or one spare row of m, offsets them.
    up = scratch("winograd filters", (groups, XI, _round_up(Kg, MR) * Cg + 16), dtype)
    v = per_thread((XI, min(KC, Cg) * span + 16), dtype, name="winograd inputs")
    m = per_thread((XI, k_block + 1, span), dtype, name="winograd products")
    runs = per_thread((NR, 4), np.int64, name="winograd runs")
    _, _, pt, pl, _, _ = geometry
    padded = _padded_shape(*y.shape[2:])
    if padded is not None:  # every tile inside the copy: read as vectors, none a pixel at a time
        N, C = x.shape[:2]
        xp = scratch("winograd padded input", (N * C * padded[0] * padded[1],), dtype)
        _pad_phases(x, pt, pl, np.int64(1), np.int64(1), np.int64(padded[0]), np.int64(padded[1]), xp)
        x, pt, pl = xp.reshape(N, C, *padded), np.int64(0), np.int64(0)
    args = (pt, pl, groups, tasks, np.int64(span), np.bool_(accumulate), up, v, m, runs, y)
    streaming = np.bool_(up.nbytes >= WINOGRAD_STREAM_FILTERS_BYTES)
    _winograd_tasks(x, weight, np.bool_(swapped), streaming, *args)
