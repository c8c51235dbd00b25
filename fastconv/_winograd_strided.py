"""Winograd F(2x2, 2x2) for 4x4 stride-2 layers (DCGAN's and PatchGAN's convolutions, most decoders'
transposed convolutions): the forward pass, the input gradient and the weight gradient each split into
stride-1 2x2 convolutions over stride phases, with 1.78 times fewer multiplications than the GEMM.

**Input gradient (conv_transpose2d's forward pass).** conv2d's input gradient at stride 2 adds each pixel of
``dy`` times the 4x4 filter into ``dx`` at steps of 2: of the 16 taps, the 4 with ``r ≡ h + pt`` and ``s ≡ w +
pl`` (mod 2) reach the pixel ``(h, w)`` of ``dx``. So each stride phase ``(a, b)`` of ``dx`` (the pixels ``(2i
+ a, 2j + b)``) is a stride-1 correlation of ``dy`` with a 2x2 filter, its own taps of the 4x4 one (Shi et al.,
2016, "sub-pixel convolution")::

    dx[2i + a, 2j + b] = sum over d, e in {0, 1} of  dy[i + oa + d, j + ob + e] * f_ab[d, e]
    f_ab[d, e] = w[ea + 2 - 2d, eb + 2 - 2e],    ea = (a + pt) % 2,  oa = (a + pt) // 2 - 1   (likewise b)

with ``dy`` zero outside its ``P x Q``.

**Forward pass.** Each tap ``(2d + α, 2e + β)`` of a stride-2 convolution reads the padded input's stride
phase ``(α, β)`` at ``(p + d, q + e)``: the four phases of every channel (space-to-depth, ``_pad_phases``) are
the 4C channels of one stride-1 convolution by 2x2 filters ``f[d, e] = w[2d + α, 2e + β]``.

Either way, each 2x2 tile of output comes from a 3x3 tile of the phases (Lavin & Gray, 2016, with the
interpolation points 0, 1 and infinity)::

    Y = Aᵀ [ (G f Gᵀ) ⊙ (Bᵀ d B) ] A      Bᵀ = [[1, -1, 0],   G = [[1, 0],   Aᵀ = [[1, 1, 0],
                                               [0,  1, 0],        [1, 1],          [0, 1, 1]]
                                               [0, -1, 1]]        [0, 1]]

9 multiplications per 2x2 tile where the direct sum takes 16; the transforms only add and subtract (float32
error 2.5 times the GEMM path's). As in ``_winograd.py``: the filters are transformed once per call; tasks
(phase, chunk of NR tiles, block of output channels) transform their tiles into packed B panels a vector
register of tiles at a time, multiply them by the transformed filters with the GEMM's micro-kernel (one GEMM
per position of the 3x3 transformed tile) and transform the products into the output. The planes the tiles
are read from are padded first (a block of images at a time), so no tile needs a bounds test. Every output
pixel belongs to one phase and one tile: written by one thread, summed in a fixed order.
"""

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._conv_kernels import _padded_blocks
from ._gemm import FALSE, PACKED, TRANSPOSED_AHEAD, ZERO, _data, _micro_kernel, _panel_rows, _round_up, no_bias
from ._parallel import PRANGE_ONLY
from ._scratch import per_thread, scratch
from ._simd import Vector, _prefetch, deinterleaved_columns, interleaved, load, store, vector_type
from ._winograd import _positions, chunk_runs, task_share
from .config import (
    COLUMN_BUFFER_BYTES,
    KC,
    MR,
    NR,
    STRIDED_WINOGRAD_MIN_CHANNELS,
    STRIDED_WINOGRAD_MIN_TILES,
    SUBPIXEL_MIN_OUT_CHANNELS,
    SUBPIXEL_MIN_TILES,
)

#: Positions of the transformed 3x3 tile: one GEMM each.
XI = 9
#: NR as a plain int64, not a Numba literal (one compiled micro-kernel); the phases' steps likewise.
WHOLE_PANEL = np.int64(NR)
ONE, TWO = np.int64(1), np.int64(2)


def strided_winograd_applies(geometry):
    """Whether this layer's forward pass and input gradient split into 2x2 stride-1 convolutions over stride
    phases: 4x4 filters, stride 2, no dilation."""
    return geometry.weight_shape[2:] == (4, 4) and geometry.stride == (2, 2) and geometry.dilation == (1, 1)


def _tiles(N, P, Q):
    return N * -(-P // 2) * -(-Q // 2)


def _image_fits(planes, Hp, Wp):
    """Whether one image's padded planes fit the column buffer (in float32; float64 takes twice that at most):
    blocks of images bound the scratch, but a block holds one image at least."""
    return planes * Hp * Wp * 4 <= COLUMN_BUFFER_BYTES


def strided_winograd_pays(geometry):
    """Whether ``algorithm="auto"`` should compute this (applicable) layer's forward pass by
    ``_conv2d_strided``: at least ``config.STRIDED_WINOGRAD_MIN_CHANNELS`` input and output channels per group
    and ``config.STRIDED_WINOGRAD_MIN_TILES`` 2x2 tiles of output in the batch, and one image's stride phases
    within the column buffer."""
    K, Cg = geometry.weight_shape[:2]
    N, C, _, _ = geometry.input_shape
    _, _, P, Q = geometry.output_shape
    channels = min(K // geometry.groups, Cg)
    enough = channels >= STRIDED_WINOGRAD_MIN_CHANNELS and _tiles(N, P, Q) >= STRIDED_WINOGRAD_MIN_TILES
    return enough and _image_fits(4 * C, *_strided_layout(P, Q))


def _phase_tiles(geometry):
    """2x2 tiles of the input gradient per phase over the batch: the most any phase has."""
    N, _, H, W = geometry.input_shape
    return _tiles(N, (H + 1) // 2, (W + 1) // 2)


def input_grad_pays(geometry):
    """Whether ``_conv2d_input_subpixel`` should compute this (applicable) layer's input gradient: at least
    ``config.SUBPIXEL_MIN_OUT_CHANNELS`` channels of dx per group (fewer leave the micro-kernel's MR rows and
    the output transform little to share), and ``config.SUBPIXEL_MIN_TILES`` 2x2 tiles per phase in the batch
    (fewer leave the NR columns of the products half empty), and one image's padded output gradient within the
    column buffer."""
    K, Cg = geometry.weight_shape[:2]
    _, _, P, Q = geometry.output_shape
    enough = Cg >= SUBPIXEL_MIN_OUT_CHANNELS and _phase_tiles(geometry) >= SUBPIXEL_MIN_TILES
    return enough and _image_fits(K, *padded_layout(geometry, P, Q)[:2])


def _workspace(dtype, padded, phases, groups, rows, planes_per_group):
    """Bytes of scratch of ``_run_phases``: padded planes, transformed filters, each thread's buffers."""
    filters = phases * groups * XI * (_round_up(rows, MR) * planes_per_group + 16)
    per_thread_values = XI * (min(KC, planes_per_group) * NR + 16) + XI * (_round_up(rows, MR) + 1) * NR
    return dtype.itemsize * (padded + filters + numba.config.NUMBA_NUM_THREADS * per_thread_values)


#: The weight gradient takes Winograd on the stride phases from this many filters per group; with fewer, the
#: padded-input weight gradient (``_shifted.py``) is as fast. Measured (float32, 2 threads, conv2d_weight, ms,
#: padded input -> phases): 8x64x32x32 -> 33 4x4 s2 0.62 -> 0.60, 8x32x64x64 -> 40 1.31 -> 1.34, 8x64x32x32 ->
#: 48 0.81 -> 0.62, 8x64x32x32 -> 64 1.08 -> 0.65, 8x256x8x8 -> 64 2.44 -> 0.37.
WEIGHT_GRAD_MIN_FILTERS = 33


def weight_grad_pays(geometry):
    """Whether this (applicable) layer's weight gradient should take ``conv2d_weight_strided``: at least
    WEIGHT_GRAD_MIN_FILTERS filters per group,
    at least ``config.STRIDED_WINOGRAD_MIN_CHANNELS`` input channels per group and
    ``config.STRIDED_WINOGRAD_MIN_TILES`` 2x2 tiles of output (the GEMMs' depth), and one image's stride phases
    within the column buffer."""
    K, Cg = geometry.weight_shape[:2]
    N, C, _, _ = geometry.input_shape
    _, _, P, Q = geometry.output_shape
    enough = Cg >= STRIDED_WINOGRAD_MIN_CHANNELS and _tiles(N, P, Q) >= STRIDED_WINOGRAD_MIN_TILES
    wide = K // geometry.groups >= WEIGHT_GRAD_MIN_FILTERS
    return enough and wide and _image_fits(4 * C, *_strided_layout(P, Q))


def weight_grad_workspace(geometry, dtype):
    """Bytes of scratch ``conv2d_weight_strided`` allocates."""
    N, C, _, _ = geometry.input_shape
    K = geometry.weight_shape[0]
    Kg = K // geometry.groups
    Hp, Wp = _strided_layout(*geometry.output_shape[2:])
    chunk = min(TILE_CHUNK, _tiles(N, *geometry.output_shape[2:]))
    padded = _bounded(4 * C * Hp * Wp, N, dtype)
    values = XI * 4 * C * Kg + geometry.groups * XI * (_round_up(Kg, NR) * chunk + 16)
    per_thread_values = XI * (PLANE_BLOCK * chunk + 4 * NR)
    return dtype.itemsize * (padded + values + numba.config.NUMBA_NUM_THREADS * per_thread_values)


def _bounded(per_image, images, dtype):
    """Values of padded planes for ``images`` images of ``per_image`` values each, a block of images at a time
    (``_conv_kernels._padded_blocks``)."""
    return min(images * per_image, max(per_image, COLUMN_BUFFER_BYTES // dtype.itemsize)) + NR


def input_grad_workspace(geometry, dy_shape, dtype):
    """Bytes of scratch ``_conv2d_input_subpixel`` allocates."""
    K, Cg = geometry.weight_shape[:2]
    Hp, Wp, _, _ = padded_layout(geometry, *dy_shape[2:])
    padded = _bounded(K * Hp * Wp, dy_shape[0], dtype)
    return _workspace(dtype, padded, 4, geometry.groups, Cg, K // geometry.groups)


def strided_workspace(geometry, dtype):
    """Bytes of scratch ``_conv2d_strided`` allocates."""
    N, C, _, _ = geometry.input_shape
    K, Cg = geometry.weight_shape[:2]
    Hp, Wp = _strided_layout(*geometry.output_shape[2:])
    padded = _bounded(4 * C * Hp * Wp, N, dtype)
    return _workspace(dtype, padded, 1, geometry.groups, K // geometry.groups, 4 * Cg)


@njit(cache=True, inline="always")
def _g_times(h0, h1):
    """``G @ (h0, h1)``: the filter transform along one axis."""
    return h0, h0 + h1, h1


@njit(cache=True)
def _transform_filters(weight, task, Kg, Cg, pt, pl, up):
    """Rows ``ir:ir + MR`` of ``up[phase, g, xi]`` for task ``(g, ir)``, all four phases: the packed A
    (``_gemm._pack_a``'s layout, KC-column blocks of MR-row micro-panels) of the group's ``[Cg, Kg]`` matrix
    ``(G f Gᵀ)[xi]``, whose element ``(c, k)`` comes from the phase's 2x2 filter ``f`` of ``weight[g * Kg + k,
    c]``: the taps ``(ea + 2 - 2d, eb + 2 - 2e)`` reach phase ``(ea ^ pt % 2, eb ^ pl % 2)`` (see the module's
    docstring). One micro-panel per task: each of the 36 rows of ``up`` written in one contiguous run."""
    m_pad = _round_up(Cg, MR)
    panels = m_pad // MR
    g, ir = task // panels, task % panels * MR
    u = up[:, g]
    phase_stride = u.strides[0] // u.itemsize
    pa, pb = pt % 2, pl % 2
    phases = ((pa * 2 + pb, pa * 2 + 1 - pb), ((1 - pa) * 2 + pb, (1 - pa) * 2 + 1 - pb))  # [ea][eb]
    for pc in range(0, Kg, KC):
        kc = min(KC, Kg - pc)
        for kk in range(kc):
            offset = pc * m_pad + ir * kc + kk * MR
            # MR 4x4 filters from each row (a cache line each in float32), rows far apart: prefetched, as
            # _gemm's transposed A is.
            ahead = (min(g * Kg + pc + kk + TRANSPOSED_AHEAD, weight.shape[0] - 1) * Cg + ir) * 16
            for line in range(0, min(MR, Cg - ir) * 16, 16):
                _prefetch(_data(weight), ahead + line)
            filters = weight[g * Kg + pc + kk, ir:]
            if ir + MR <= Cg:
                destinations = (
                    offset + phases[0][0] * phase_stride, offset + phases[0][1] * phase_stride,
                    offset + phases[1][0] * phase_stride, offset + phases[1][1] * phase_stride,
                )  # fmt: skip
                _transform_phase_column(filters, u, destinations)
                continue
            for i in range(Cg - ir):
                for ea in range(2):
                    for eb in range(2):
                        _transform_filter(filters[i], ea + 2, eb + 2, -2, u[phases[ea][eb]], offset + i)


@njit(cache=True)
def _transform_strided_filters(weight, task, Kg, Cg, up):
    """Rows ``ir:ir + MR`` of ``up[0, g, xi]`` for task ``(g, ir)``: the packed A of the group's ``[Kg, 4 Cg]``
    matrix ``(G f Gᵀ)[xi]`` of the stride-2 forward pass, whose element ``(k, 4c + 2α + β)`` comes from the 2x2
    filter ``f[d, e] = weight[g * Kg + k, c, 2d + α, 2e + β]``: the taps that read stride phase ``(α, β)``."""
    m_pad = _round_up(Kg, MR)
    panels = m_pad // MR
    g, ir = task // panels, task % panels * MR
    u = up[0, g]
    columns = 4 * Cg
    for pc in range(0, columns, KC):  # KC is a multiple of 4: a channel's four columns in one block
        kc = min(KC, columns - pc)
        for kk in range(0, kc, 4):
            offset = pc * m_pad + ir * kc + kk * MR
            c = (pc + kk) // 4
            if ir + MR <= Kg:
                destinations = (offset, offset + MR, offset + 2 * MR, offset + 3 * MR)
                _transform_strided_column(weight[g * Kg + ir : g * Kg + ir + MR, c], up[:, g], destinations)
                continue
            for i in range(Kg - ir):
                for alpha in range(2):
                    for beta in range(2):
                        f = weight[g * Kg + ir + i, c]
                        _transform_filter(f, alpha, beta, 2, u, offset + (2 * alpha + beta) * MR + i)


def _column_transform(flip):
    """An intrinsic ``(filters, u, destinations)``: ``_transform_filter`` of the MR 4x4 filters ``filters[:MR]``
    (any stride between them) for the four tap parities ``(ea, eb)``, into ``u``'s values ``destinations[2 ea +
    eb] + xi * u.strides[1] + i``. With ``flip``, parity ``(ea, eb)``'s 2x2 filter is the taps ``(ea + 2 - 2d,
    eb + 2 - 2e)`` (the input gradient's phases), else ``(ea + 2d, eb + 2e)`` (the forward pass's).

    The MR filters are loaded as one vector, each tap's MR values shuffled out, transformed in float64 MR at a
    time and stored as one short vector each: the scalar loop stores one value at a time, and its stores bound
    it (the input gradient's filters of 256 x 128 channels: 0.15 -> 0.066 ms, 2 threads)."""

    def typer(typingctx, filters, u, destinations):
        dtype = filters.dtype

        def codegen(context, builder, signature, args):
            element = context.get_data_type(dtype)
            size = context.get_abi_sizeof(element)
            index, int32 = llvm_ir.IntType(64), llvm_ir.IntType(32)
            one, short = llvm_ir.VectorType(element, 16), llvm_ir.VectorType(element, MR)
            double = llvm_ir.VectorType(llvm_ir.DoubleType(), MR)
            f_array = context.make_array(signature.args[0])(context, builder, args[0])
            f_stride = builder.sdiv(cgutils.unpack_tuple(builder, f_array.strides)[0], index(size))
            u_array = context.make_array(signature.args[1])(context, builder, args[1])
            xi_stride = builder.sdiv(cgutils.unpack_tuple(builder, u_array.strides)[1], index(size))
            targets = cgutils.unpack_tuple(builder, args[2])
            loaded = [load(builder, one, f_array.data, builder.mul(f_stride, index(i)), size) for i in range(MR)]
            while len(loaded) > 1:  # one vector of MR * 16 values, filter by filter
                width = 2 * loaded[0].type.count
                both = llvm_ir.Constant(llvm_ir.VectorType(int32, width), list(range(width)))
                loaded = [builder.shuffle_vector(a, b, both) for a, b in zip(loaded[::2], loaded[1::2])]
            every = loaded[0]

            def tap(r, s):
                lanes = llvm_ir.Constant(llvm_ir.VectorType(int32, MR), [16 * i + 4 * r + s for i in range(MR)])
                value = builder.shuffle_vector(every, every, lanes)
                return Vector(builder, value if element == llvm_ir.DoubleType() else builder.fpext(value, double))

            for ea in range(2):
                for eb in range(2):
                    if flip:
                        f00, f01, f10, f11 = tap(ea + 2, eb + 2), tap(ea + 2, eb), tap(ea, eb + 2), tap(ea, eb)
                    else:
                        f00, f01, f10, f11 = tap(ea, eb), tap(ea, eb + 2), tap(ea + 2, eb), tap(ea + 2, eb + 2)
                    col0, col1 = (f00, f00 + f10, f10), (f01, f01 + f11, f11)  # G f, column by column
                    for row in range(3):  # (G f) Gᵀ, row by row
                        for col, value in enumerate((col0[row], col0[row] + col1[row], col1[row])):
                            value = value.value
                            if element != llvm_ir.DoubleType():
                                value = builder.fptrunc(value, short)
                            start = builder.add(targets[2 * ea + eb], builder.mul(index(3 * row + col), xi_stride))
                            store(builder, value, u_array.data, start, size)
            return context.get_dummy_value()

        return types.none(filters, u, destinations), codegen

    return intrinsic(typer)


_transform_phase_column = _column_transform(flip=True)
_transform_strided_column = _column_transform(flip=False)


@njit(cache=True, inline="always")
def _transform_filter(f, r0, s0, step, u, offset):
    """``u[xi, offset] = (G f' Gᵀ)[xi]`` for the 2x2 filter ``f'[d, e] = f[r0 + step d, s0 + step e]`` of the 4x4
    filter ``f``, in float64, rounded once when stored."""
    f00, f01 = np.float64(f[r0, s0]), np.float64(f[r0, s0 + step])
    f10, f11 = np.float64(f[r0 + step, s0]), np.float64(f[r0 + step, s0 + step])
    col0 = _g_times(f00, f10)  # G f, column by column
    col1 = _g_times(f01, f11)
    for row in range(3):  # (G f) Gᵀ, row by row
        v = _g_times(col0[row], col1[row])
        for col in range(3):
            u[3 * row + col, offset] = v[col]


@njit(cache=True, inline="always")
def _bt_d_b(d):
    """``Bᵀ d B`` of one 3x3 tile ``d`` (a 9-tuple, row-major), as a 9-tuple."""
    a0, a1, a2 = d[0] - d[1], d[1], d[2] - d[1]
    b0, b1, b2 = d[3] - d[4], d[4], d[5] - d[4]
    c0, c1, c2 = d[6] - d[7], d[7], d[8] - d[7]
    return a0 - b0, a1 - b1, a2 - b2, b0, b1, b2, c0 - b0, c1 - b1, c2 - b2


def _transformed_tiles(context, builder, dtype, data, first, Wp):
    """LLVM code for ``Bᵀ d B`` of a vector register of 3x3 tiles, tile ``l`` at flat index ``first + 2l`` of
    ``data`` (rows ``Wp`` apart), its three columns read from each row by ``_simd.deinterleaved_columns``: the
    9 ``Vector`` positions."""
    d = []
    for r in range(3):
        row = builder.gep(data, [builder.add(first, builder.mul(llvm_ir.IntType(64)(r), Wp))])
        d += deinterleaved_columns(context, builder, dtype, row, 3)
    return _bt_d_b.py_func(tuple(Vector(builder, value) for value in d))


def _run_transform(planes):
    """An intrinsic ``(xp, start, plane, Wp, count, out, out0)``: ``out[xi, out0 + u * planes + i] = (Bᵀ d B)[xi]``
    for ``u < count`` and ``i < planes``, ``d`` the 3x3 tile at flat index ``start + i * plane + 2u`` of ``xp``
    (rows ``Wp`` apart), a vector register of tiles at a time (``_transformed_tiles``). One plane: a packed B
    micro-panel's row of tiles (``_transform_run``); MR planes: their values interleaved as a packed A
    micro-panel holds them, tiles its columns and planes its rows (``_transform_run_panel``, two rounds of
    zips: planes (0, 1) and (2, 3) pairwise, then the pairs). Whole vectors: reads up to 2 * lanes + 2 values
    past a row's last tile and writes up to (lanes - 1) * planes values past the run (the caller's slack)."""
    if planes not in (1, 4):  # the zips interleave 4 planes: MR must be 4
        raise ValueError(f"_run_transform interleaves 1 or 4 planes, not {planes}")

    def typer(typingctx, xp, start, plane, Wp, count, out, out0):
        dtype = xp.dtype

        def codegen(context, builder, signature, args):
            _, start, plane, Wp, count, _, out0 = args
            _, lanes, size = vector_type(context, dtype)
            index = llvm_ir.IntType(64)
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            blocks = builder.sdiv(builder.add(count, index(lanes - 1)), index(lanes))
            with cgutils.for_range(builder, blocks) as loop:
                u = builder.mul(loop.index, index(lanes))
                transformed = []
                for i in range(planes):
                    first = builder.add(builder.add(start, builder.mul(index(i), plane)), builder.mul(u, index(2)))
                    transformed.append(_transformed_tiles(context, builder, dtype, data, first, Wp))
                column = builder.add(out0, builder.mul(u, index(planes)))
                rows, offsets = _positions(context, builder, signature.args[5], args[5], column, size, XI)
                for xi, offset in enumerate(offsets):
                    t = [transformed[i][xi].value for i in range(planes)]
                    if planes > 1:  # the four planes' values side by side, two lanes of each in turn
                        pairs = interleaved(builder, t[0], t[1]), interleaved(builder, t[2], t[3])
                        t = [interleaved(builder, *pairs, 2)]
                    store(builder, t[0], rows, offset, size)
            return context.get_dummy_value()

        return types.none(xp, start, plane, Wp, count, out, out0), codegen

    return intrinsic(typer)


_transform_run = _run_transform(1)
_transform_run_panel = _run_transform(MR)


@njit(cache=True)
def _output_tiles(m, y, n, c, i0, j0, phase, step, run, accumulate):
    """Write (or add) ``Aᵀ M_u A``, ``M_u = m[:, u]``, into ``y[n, c]`` at the pixels ``(step (i0 + i) + a, step (j0
    + 2u + j) + b)``, ``i, j < 2``, of the phase ``(a, b, Pa, Qb) = phase[:4]`` (its pixels ``Pa x Qb``), for
    ``u < run``; tiles overhanging the phase lose their last row or column."""
    a, b, Pa, Qb = phase[0], phase[1], phase[2], phase[3]
    two_rows = i0 + 1 < Pa
    top = y[n, c, step * i0 + a]
    bottom = y[n, c, step * (i0 + 1) + a if two_rows else step * i0 + a]
    for u in range(run):
        s0, s1, s2 = m[0, u] + m[3, u], m[1, u] + m[4, u], m[2, u] + m[5, u]
        d0, d1, d2 = m[3, u] + m[6, u], m[4, u] + m[7, u], m[5, u] + m[8, u]
        y00, y01, y10, y11 = s0 + s1, s1 + s2, d0 + d1, d1 + d2
        q = j0 + 2 * u
        w0, w1 = step * q + b, step * (q + 1) + b
        both = q + 1 < Qb
        if accumulate:
            y00 += top[w0]
            y01 += top[w1] if both else 0
            y10 += bottom[w0] if two_rows else 0
            y11 += bottom[w1] if two_rows and both else 0
        top[w0] = y00
        if both:
            top[w1] = y01
        if two_rows:
            bottom[w0] = y10
            if both:
                bottom[w1] = y11


@njit(cache=True, inline="always")
def _phase_task(xp, layout, planes, phases, step, groups, c_block, accumulate, up, v, m, runs, y, task):
    """Task ``(group, chunk of NR tiles, block of c_block output channels, phase)`` of ``_phase_tasks``, the phase
    varying fastest."""
    N, C = y.shape[:2]
    Kg, Cg = planes // groups, C // groups
    Hp, Wp = layout[0], layout[1]
    # The phases of a chunk of tiles are neighbouring tasks, so each thread's share (Numba gives each thread one
    # contiguous range of tasks) covers whole images of y. With the phases in turn, the two threads wrote
    # alternate rows of every image; in this machine's slow periods, when the two threads of one process slow
    # each other (two single-threaded processes side by side do not), conv_transpose2d 8x128x16x16 -> 64 4x4 s2
    # took 1.9-2.0 ms instead of 1.15, and by images 1.25-1.3 (same bits).
    index = task % phases.shape[0]
    phase = phases[index]
    Pa, Qb, row0, col0 = phase[2], phase[3], phase[4], phase[5]
    g, first, last, c0, c1 = task_share(task // phases.shape[0], N * -(-Pa // 2) * -(-Qb // 2), Cg, c_block)
    if g >= groups:  # past this phase's tiles (it has fewer than the largest)
        return
    n_runs = chunk_runs(Pa, Qb, first, last, runs)
    for pc in range(0, Kg, KC):
        kc = min(KC, Kg - pc)
        for p in range(kc):
            plane = g * Kg + pc + p
            base = p * NR
            for i in range(n_runs):
                n, th, tw, run = runs[i, 0], runs[i, 1], runs[i, 2], runs[i, 3]
                start = ((n * planes + plane) * Hp + 2 * th + row0) * Wp + 2 * tw + col0
                _transform_run(xp, start, ZERO, Wp, run, v, base)
                base += run
            for u in range(base, (p + 1) * NR):  # tiles past the last: zeros (after the runs' slack)
                for xi in range(XI):
                    v[xi, u] = 0
        for xi in range(XI):
            _panel_rows(
                up[index, g, xi], Cg, pc, kc, c0, c1, v[xi, : kc * NR], PACKED, m, -c0, xi * NR, last - first,
                pc > 0, FALSE, no_bias(m),
            )  # fmt: skip
    for c in range(c0, c1):
        offset = 0
        for i in range(n_runs):
            n, th, tw, run = runs[i, 0], runs[i, 1], runs[i, 2], runs[i, 3]
            _output_tiles(m[:, c - c0, offset:], y, n, g * Cg + c, 2 * th, 2 * tw, phase, step, run, accumulate)
            offset += run


@njit(parallel=PRANGE_ONLY, cache=True)
def _phase_tasks(xp, layout, planes, phases, step, groups, c_block, per_phase, accumulate, up, v, m, runs, y):
    """``y (+)=`` the stride-1 2x2 convolutions of the padded planes in ``xp`` (``planes`` per image, laid out as
    ``layout = (Hp, Wp)``) by the filters transformed in ``up[phase]``, for each phase of the table ``phases``
    (rows ``(a, b, Pa, Qb, row0, col0)``: the phase writes ``y``'s pixels ``(step i + a, step j + b)``, ``i <
    Pa``, ``j < Qb``, its tile ``(0, 0)`` reading the planes from ``(row0, col0)``). The tasks
    ``_phase_task``, ``per_phase`` of each phase (as many as the largest phase needs), the phases of one chunk
    of tiles side by side, in parallel, each thread with its own scratch rows of ``v`` (9, min(KC,
    planes/groups) * NR + pad), ``m`` (9, c_block + 1, NR) and ``runs`` (NR, 4)."""
    for task in prange(phases.shape[0] * per_phase):
        t = numba.get_thread_id()
        _phase_task(xp, layout, planes, phases, step, groups, c_block, accumulate, up, v[t], m[t], runs[t], y, task)


@njit(parallel=PRANGE_ONLY, cache=True)
def _subpixel_filters(weight, pt, pl, groups, Cg, up):
    """The input gradient's filters transformed into ``up`` (``_transform_filters``), in parallel over
    micro-panels of rows."""
    Kg = weight.shape[0] // groups
    for task in prange(groups * -(-Cg // MR)):
        _transform_filters(weight, task, Kg, Cg, pt, pl, up)


@njit(parallel=PRANGE_ONLY, cache=True)
def _strided_filters(weight, groups, up):
    """The stride-2 forward pass's filters transformed into ``up`` (``_transform_strided_filters``), in
    parallel over micro-panels of rows."""
    K, Cg = weight.shape[:2]
    Kg = K // groups
    for task in prange(groups * -(-Kg // MR)):
        _transform_strided_filters(weight, task, Kg, Cg, up)


def _channel_block(Cg, chunks, threads):
    """Channels of the output per task: all of a group's, or fewer (at least 4 * MR) so that every thread gets
    two tasks at least when the phases' chunks of tiles are too few."""
    c_block = _round_up(Cg, MR)
    while c_block > 4 * MR and chunks * -(-Cg // c_block) < 2 * threads:
        c_block = _round_up(c_block // 2, MR)
    return c_block


def _run_phases(x, padding, layout, planes, phases, step, groups, up, accumulate, y):
    """``_phase_tasks`` over ``x`` padded (``_pad_phases`` with ``padding = (sh, sw, pt, pl, 1, 1)``, ``planes``
    planes per image) a block of images at a time, as many as the column buffer holds."""
    C, dtype = y.shape[1], y.dtype
    Cg, Kg = C // groups, planes // groups
    chunks = groups * -(-max(_tiles(y.shape[0], Pa, Qb) for Pa, Qb in phases[:, 2:4]) // NR)  # per phase
    c_block = _channel_block(Cg, len(phases) * chunks, numba.config.NUMBA_NUM_THREADS)
    per_phase = np.int64(chunks * -(-Cg // c_block))
    v = per_thread((XI, min(KC, Kg) * NR + 16), dtype, name="subpixel inputs")
    m = per_thread((XI, c_block + 1, NR), dtype, name="subpixel products")
    runs = per_thread((NR, 4), np.int64, name="subpixel runs")
    Hp, Wp = (int(value) for value in layout)
    for n0, n1, xp in _padded_blocks(x, padding, Hp, Wp, planes * Hp * Wp * dtype.itemsize):
        block = y[n0:n1]
        _phase_tasks(
            xp, layout, planes, phases, step, groups, c_block, per_phase, np.bool_(accumulate), up, v, m, runs, block
        )


def padded_layout(geometry, P, Q):
    """``(Hp, Wp, top, left)``: ``dy`` (``P x Q`` planes) zero-padded by ``top`` rows and ``left`` columns into
    ``Hp x Wp`` planes, enough for every phase's tiles to read without bounds tests."""
    _, _, H, W = geometry.input_shape
    _, _, pt, pl, _, _ = geometry.kernel_geometry
    extents = []
    for size, pad in ((H, pt), (W, pl)):
        starts = [(a + pad) // 2 - 1 for a in (0, 1)]  # first row (column) of dy each phase's tiles read
        ends = [2 * -(-((size - a + 1) // 2) // 2) + starts[a] + 1 for a in (0, 1)]
        extents.append((max(0, -min(starts)), max(ends)))
    (top, rows), (left, cols) = extents
    return top + rows, left + cols, top, left


def _conv2d_input_subpixel(grad_output, weight, geometry, groups, accumulate, grad_input):
    """``grad_input (+)= conv2d_input(grad_output, weight)`` for 4x4 filters, stride 2, no dilation: with
    ``accumulate`` added to ``grad_input`` (which holds the bias), without it overwritten."""
    N, K, P, Q = grad_output.shape
    _, C, H, W = grad_input.shape
    Cg = C // groups
    _, _, pt, pl, _, _ = geometry.kernel_geometry
    up = scratch("subpixel filters", (4, groups, XI, _round_up(Cg, MR) * (K // groups) + 16), grad_input.dtype)
    if Cg % MR:
        up[...] = 0  # the rows past Cg in the last micro-panel
    _subpixel_filters(weight, pt, pl, groups, np.int64(Cg), up)
    Hp, Wp, top, left = padded_layout(geometry, P, Q)
    phases = np.array(
        [
            (a, b, (H - a + 1) // 2, (W - b + 1) // 2, (a + pt) // 2 - 1 + top, (b + pl) // 2 - 1 + left)
            for a in (0, 1)
            for b in (0, 1)
        ],
        np.int64,
    )
    layout = np.array((Hp, Wp), np.int64)
    _run_phases(grad_output, (1, 1, top, left, 1, 1), layout, K, phases, TWO, groups, up, accumulate, grad_input)


def _strided_layout(P, Q):
    """``(Hp, Wp)``: the padded stride phases ``_conv2d_strided`` reads for a ``P x Q`` output, every tile
    inside."""
    return 2 * -(-P // 2) + 1, 2 * -(-Q // 2) + 1


def _conv2d_strided(x, weight, geometry, groups, accumulate, y):
    """``y (+)= conv2d(x, weight)`` for 4x4 filters, stride 2, no dilation: the input's four padded stride
    phases as 4C channels of one stride-1 2x2 convolution (space-to-depth), by Winograd F(2x2, 2x2). With
    ``accumulate`` added to ``y`` (which holds the bias), without it overwritten."""
    C = x.shape[1]
    K, Cg = weight.shape[:2]
    Kg = K // groups
    _, _, P, Q = y.shape
    up = scratch("subpixel filters", (1, groups, XI, _round_up(Kg, MR) * 4 * Cg + 16), y.dtype)
    if Kg % MR:
        up[...] = 0  # the rows past Kg in the last micro-panel
    _strided_filters(weight, groups, up)
    layout = np.array(_strided_layout(P, Q), np.int64)
    phases = np.array([(0, 0, P, Q, 0, 0)], np.int64)
    _, _, pt, pl, _, _ = geometry
    _run_phases(x, (2, 2, pt, pl, 1, 1), layout, 4 * C, phases, ONE, groups, up, accumulate, y)


# The weight gradient of a 4x4 stride-2 layer, by the same phases: with dM = A dY Aᵀ (a 2x2 tile of the output
# gradient spread to 3x3, additions only) and V = Bᵀ d B (a 3x3 tile of a phase plane),
#
#     dUᵀ[xi] = Σ_tiles V[xi] dM[xi]ᵀ      9 GEMMs: [4 Cg, tiles] [tiles, Kg] -> [4 Cg, Kg]
#     df = Gᵀ dU G                        per plane and filter, 3x3 back to 2x2: weight[k, c, 2d + α, 2e + β]
#
# Tasks own blocks of rows (planes) of dUᵀ and sum over every tile themselves, so no partial sums: the output
# gradient's transforms are packed once per chunk of tiles, as the GEMMs' B, and shared.

#: Tiles per chunk: the depth of the GEMMs, and of the packed transforms of the output gradient (9 x Kg x this).
TILE_CHUNK = 512
#: Planes (rows of dUᵀ) per task.
PLANE_BLOCK = 32


#: Tiles per task of ``_pack_grad_output``.
PACK_TILES = 32


@njit(cache=True)
def _pack_grad_output_panel(dy, k0, width, t0, t1, first, bp, offset):
    """``dM = A dY Aᵀ`` of tiles ``t0:t1`` (2x2 tiles of ``dy``, in batch order; zeros past the edge of an
    odd-sized output) of channels ``k0:k0 + width`` into micro-panel ``offset`` of ``bp`` (9, ...), from row
    ``t0 - first``: the packed B of the GEMMs, tiles its rows, NR filters its columns (zeros past ``width``).
    A tile's filters at a time, so each row is written in order."""
    _, _, P, Q = dy.shape
    TH, TW = -(-P // 2), -(-Q // 2)
    zero = dy.dtype.type(0)
    for t in range(t0, t1):
        n, th, tw = t // (TH * TW), t // TW % TH, t % TW
        p, q = 2 * th, 2 * tw
        at = offset + (t - first) * NR
        for kk in range(width):
            k = k0 + kk
            y00 = dy[n, k, p, q]
            y01 = dy[n, k, p, q + 1] if q + 1 < Q else zero
            y10 = dy[n, k, p + 1, q] if p + 1 < P else zero
            y11 = dy[n, k, p + 1, q + 1] if p + 1 < P and q + 1 < Q else zero
            r1a, r1b = y00 + y10, y01 + y11
            bp[0, at + kk], bp[1, at + kk], bp[2, at + kk] = y00, y00 + y01, y01
            bp[3, at + kk], bp[4, at + kk], bp[5, at + kk] = r1a, r1a + r1b, r1b
            bp[6, at + kk], bp[7, at + kk], bp[8, at + kk] = y10, y10 + y11, y11
        for kk in range(width, NR):
            for xi in range(XI):
                bp[xi, at + kk] = zero


@njit(parallel=PRANGE_ONLY, cache=True)
def _pack_grad_output(dy, groups, first, last, bp):
    """The output gradient's transformed tiles ``first:last`` of every group into ``bp`` (groups, 9,
    round_up(Kg, NR) * tiles + pad), in parallel over micro-panels of NR filters and runs of PACK_TILES tiles.

    Each row of a micro-panel written in order, its filters read from their planes. Measured (float32, 2
    threads), against a filter at a time down its column (a store per cache line), the same bits: the packing
    alone 0.26-0.33 -> 0.09-0.11 ms for 8x128x16x16 output gradients, 0.13-0.16 -> 0.04-0.07 for 8x256x8x8;
    conv2d_weight of conv_transpose2d 8x128x16x16 -> 64 4x4 s2 1.28-1.41 -> 1.08-1.19 ms, 8x64x32x32 -> 32
    1.75 -> 1.41 (in one process, alternating). Tiles a task at a time, filter by filter, was slower (1.34 ->
    1.64 ms)."""
    K = dy.shape[1]
    Kg = K // groups
    panels = -(-Kg // NR)
    blocks = -(-(last - first) // PACK_TILES)
    for task in prange(groups * panels * blocks):
        g, jr, b = task // (panels * blocks), task // blocks % panels * NR, task % blocks
        t0 = first + b * PACK_TILES
        t1 = min(last, t0 + PACK_TILES)
        _pack_grad_output_panel(dy, g * Kg + jr, min(NR, Kg - jr), t0, t1, first, bp[g], jr * (last - first))


@njit(parallel=PRANGE_ONLY, cache=True)
def _weight_grad_tasks(xp, layout, planes, TH, TW, first, last, groups, accumulate, bp, a, du):
    """``duᵀ (+)=`` the 9 GEMMs of tiles ``first:last`` (of the block of images padded in ``xp``, ``planes``
    phase planes per image as ``layout``, TH x TW tiles each): tasks ``(group, block of PLANE_BLOCK planes)``,
    each transforming its planes' tiles into its thread's packed A panels ``a`` (threads, 9, PLANE_BLOCK *
    tiles + pad) and multiplying them by the shared ``bp`` into its rows of ``du`` (1, 9 * planes, Kg): row
    ``xi * planes + plane``. Every element of ``du`` is summed by one task, over the tiles in order."""
    Hp, Wp = layout[0], layout[1]
    Pg = planes // groups
    Kg = du.shape[2]
    nb = last - first
    blocks = -(-Pg // PLANE_BLOCK)
    for task in prange(groups * blocks):
        g, j0 = task // blocks, task % blocks * PLANE_BLOCK
        j1 = min(Pg, j0 + PLANE_BLOCK)
        panel = a[numba.get_thread_id()]
        # Micro-panel by micro-panel, each run of tiles along a tile row in order: what a run's whole vectors
        # write past its end, the next run (or micro-panel) overwrites.
        for ir in range(j0, j1, MR):
            t = first
            while t < last:
                n, th, tw = t // (TH * TW), t // TW % TH, t % TW
                run = min(last - t, TW - tw)
                start = ((n * planes + g * Pg + ir) * Hp + 2 * th) * Wp + 2 * tw
                _transform_run_panel(xp, start, Hp * Wp, Wp, run, panel, (ir - j0) * nb + (t - first) * MR)
                t += run
        for xi in range(XI):
            for ir in range(j0, j1, MR):
                a_panel = panel[xi, (ir - j0) * nb : (ir - j0 + MR) * nb]
                for jr in range(0, Kg, NR):
                    b_panel = bp[g, xi, jr * nb : (jr + NR) * nb]
                    row = xi * planes + g * Pg + ir
                    _micro_kernel(
                        nb, a_panel, b_panel, PACKED, du, row, jr, MR, min(NR, Kg - jr), accumulate, FALSE, no_bias(du)
                    )


@njit(parallel=PRANGE_ONLY, cache=True)
def _weight_from_du(du, planes, groups, dw):
    """``dw[k, c, 2d + α, 2e + β] = (Gᵀ dU G)[d, e]`` of plane ``4c + 2α + β`` and filter ``k``, whose 9
    transformed gradients are ``du[0, xi * planes + plane, k % Kg]``; in float64, rounded once. In parallel
    over input channels, each reading its 36 rows of ``du`` along the filters and writing each filter's 16
    values (a cache line of float32) together."""
    K, Cg = dw.shape[:2]
    Kg = K // groups
    for task in prange(groups * Cg):
        g, c = task // Cg, task % Cg
        for k in range(Kg):
            for alpha in range(2):
                for beta in range(2):
                    u = du[0, g * 4 * Cg + 4 * c + 2 * alpha + beta :: planes, k]  # its 9 values, xi by xi
                    m0, m1, m2 = np.float64(u[0]), np.float64(u[1]), np.float64(u[2])
                    m3, m4, m5 = np.float64(u[3]), np.float64(u[4]), np.float64(u[5])
                    m6, m7, m8 = np.float64(u[6]), np.float64(u[7]), np.float64(u[8])
                    s0 = (m0 + m3, m1 + m4, m2 + m5)  # Gᵀ dU: rows combined
                    s1 = (m3 + m6, m4 + m7, m5 + m8)
                    f = dw[g * Kg + k, c]
                    f[alpha, beta], f[alpha, beta + 2] = s0[0] + s0[1], s0[1] + s0[2]
                    f[alpha + 2, beta], f[alpha + 2, beta + 2] = s1[0] + s1[1], s1[1] + s1[2]


def conv2d_weight_strided(x, grad_output, geometry, groups, grad_weight):
    """``grad_weight = conv2d_weight(x, grad_output)`` for 4x4 filters, stride 2, no dilation, by Winograd
    F(2x2, 2x2) over the input's stride phases. ``grad_weight`` is overwritten."""
    N, C, _, _ = x.shape
    K = grad_output.shape[1]
    _, _, P, Q = grad_output.shape
    Kg, planes = K // groups, 4 * C
    dtype = grad_weight.dtype
    Hp, Wp = _strided_layout(P, Q)
    layout = np.array((Hp, Wp), np.int64)
    TH, TW = -(-P // 2), -(-Q // 2)
    du = scratch("strided winograd gradients", (1, XI * planes, Kg), dtype)
    chunk = min(TILE_CHUNK, N * TH * TW)
    bp = scratch("strided winograd output gradient", (groups, XI, _round_up(Kg, NR) * chunk + 16), dtype)
    a = per_thread((XI, PLANE_BLOCK * chunk + 4 * NR), dtype, name="strided winograd planes")
    _, _, pt, pl, _, _ = geometry
    first_sum = True
    for n0, n1, xp in _padded_blocks(x, (2, 2, pt, pl, 1, 1), Hp, Wp, planes * Hp * Wp * dtype.itemsize):
        tiles = (n1 - n0) * TH * TW
        dy = grad_output[n0:n1]
        for t0 in range(0, tiles, chunk):
            t1 = min(tiles, t0 + chunk)
            _pack_grad_output(dy, groups, np.int64(t0), np.int64(t1), bp)
            _weight_grad_tasks(
                xp, layout, planes, np.int64(TH), np.int64(TW), np.int64(t0), np.int64(t1), groups,
                np.bool_(not first_sum), bp, a, du,
            )  # fmt: skip
            first_sum = False
    _weight_from_du(du, planes, groups, grad_weight)
