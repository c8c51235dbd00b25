"""The input gradient of a 4x4, stride-2 convolution (conv_transpose2d's 4x4, stride-2 forward pass) as four
stride-1 2x2 convolutions, each by Winograd F(2x2, 2x2): 1.78 times fewer multiplications than the GEMM.

conv2d's input gradient at stride 2 adds each pixel of ``dy`` times the 4x4 filter into ``dx`` at steps of 2:
of the 16 taps, the 4 with ``r ≡ h + pt`` and ``s ≡ w + pl`` (mod 2) reach the pixel ``(h, w)`` of ``dx``. So
each stride phase ``(a, b)`` of ``dx`` (the pixels ``(2i + a, 2j + b)``) is a stride-1 correlation of ``dy``
with a 2x2 filter, its own taps of the 4x4 one (Shi et al., 2016, "sub-pixel convolution")::

    dx[2i + a, 2j + b] = sum over d, e in {0, 1} of  dy[i + oa + d, j + ob + e] * f_ab[d, e]
    f_ab[d, e] = w[ea + 2 - 2d, eb + 2 - 2e],    ea = (a + pt) % 2,  oa = (a + pt) // 2 - 1   (likewise b)

with ``dy`` zero outside its ``P x Q``. Each phase's 2x2 tiles of output come from 3x3 tiles of ``dy``
(Lavin & Gray, 2016, with the interpolation points 0, 1 and infinity)::

    Y = Aᵀ [ (G f Gᵀ) ⊙ (Bᵀ d B) ] A      Bᵀ = [[1, -1, 0],   G = [[1, 0],   Aᵀ = [[1, 1, 0],
                                               [0,  1, 0],        [1, 1],          [0, 1, 1]]
                                               [0, -1, 1]]        [0, 1]]

9 multiplications per 2x2 tile where the direct sum takes 16; the transforms only add and subtract, so the
rounding error stays close to the direct sum's. As in ``_winograd.py``: the filters are transformed once per
call; tasks (phase, chunk of NR tiles of the phase, block of output channels) transform their tiles of ``dy``
into packed B panels, multiply them by the transformed filters with the GEMM's micro-kernel (one GEMM per
position of the 3x3 transformed tile) and transform the products into ``dx``. Every pixel of ``dx`` belongs
to one phase and one tile: written by one thread, summed in a fixed order.
"""

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._conv_kernels import _padded_blocks
from ._gemm import _panel_rows, _round_up
from ._parallel import PRANGE_ONLY
from ._scratch import per_thread, scratch
from ._simd import Vector, load, store, vector_type
from ._winograd import chunk_runs, task_share
from .config import COLUMN_BUFFER_BYTES, KC, MR, NR, SUBPIXEL_MIN_OUT_CHANNELS, SUBPIXEL_MIN_TILES

#: Positions of the transformed 3x3 tile: one GEMM each.
XI = 9
#: NR as a plain int64, not a Numba literal (one compiled micro-kernel).
WHOLE_PANEL = np.int64(NR)


def subpixel_applies(geometry):
    """Whether this conv2d's input gradient splits into 2x2 stride-1 phases: 4x4 filters, stride 2, no
    dilation."""
    return geometry.weight_shape[2:] == (4, 4) and geometry.stride == (2, 2) and geometry.dilation == (1, 1)


def _phase_tiles(geometry):
    """2x2 tiles of output per phase over the batch: the most any phase has."""
    N, _, H, W = geometry.input_shape
    return N * -(-((H + 1) // 2) // 2) * -(-((W + 1) // 2) // 2)


def subpixel_pays(geometry):
    """Whether ``_conv2d_input_subpixel`` should compute this (applicable) input gradient: at least
    ``config.SUBPIXEL_MIN_OUT_CHANNELS`` channels of dx per group (fewer leave the micro-kernel's MR rows and
    the output transform little to share), and ``config.SUBPIXEL_MIN_TILES`` 2x2 tiles per phase in the batch
    (fewer leave the NR columns of the products half empty)."""
    Cg = geometry.weight_shape[1]
    return Cg >= SUBPIXEL_MIN_OUT_CHANNELS and _phase_tiles(geometry) >= SUBPIXEL_MIN_TILES


def subpixel_workspace(geometry, dy_shape, dtype):
    """Bytes of scratch ``_conv2d_input_subpixel`` allocates: the padded output gradient, the transformed
    filters and each thread's buffers."""
    K, Cg = geometry.weight_shape[:2]
    groups = geometry.groups
    Kg = K // groups
    Hp, Wp, _, _ = padded_layout(geometry, *dy_shape[2:])
    padded = min(dy_shape[0] * K * Hp * Wp, max(K * Hp * Wp, COLUMN_BUFFER_BYTES // dtype.itemsize)) + NR
    filters = 4 * groups * XI * (_round_up(Cg, MR) * Kg + 16)
    per_thread_values = XI * (min(KC, Kg) * NR + 16) + XI * (_round_up(Cg, MR) + 1) * NR
    return dtype.itemsize * (padded + filters + numba.config.NUMBA_NUM_THREADS * per_thread_values)


@njit(cache=True, inline="always")
def _g_times(h0, h1):
    """``G @ (h0, h1)``: the filter transform along one axis."""
    return h0, h0 + h1, h1


@njit(cache=True)
def _transform_filters(weight, task, Kg, Cg, pt, pl, up):
    """Rows ``ir:ir + MR`` of ``up[phase, g, xi]`` for task ``(g, ir)``, all four phases: the packed A
    (``_gemm._pack_a``'s layout, KC-column blocks of MR-row micro-panels) of the group's ``[Cg, Kg]`` matrix
    ``(G f Gᵀ)[xi]``, whose element ``(c, k)`` comes from the phase's 2x2 filter ``f`` of ``weight[g * Kg + k,
    c]`` (see the module's docstring). One micro-panel per task: each of the 36 rows of ``up`` written
    in one contiguous run."""
    m_pad = _round_up(Cg, MR)
    panels = m_pad // MR
    g, ir = task // panels, task % panels * MR
    rows = min(MR, Cg - ir)
    for pc in range(0, Kg, KC):
        kc = min(KC, Kg - pc)
        for kk in range(kc):
            offset = pc * m_pad + ir * kc + kk * MR
            filters = weight[g * Kg + pc + kk]
            if rows == MR:
                _transform_panel_column(filters[ir:], pt % 2, pl % 2, up[:, g], offset)
                continue
            for phase in range(4):
                ea, eb = (phase // 2 + pt) % 2, (phase % 2 + pl) % 2
                for i in range(rows):
                    _transform_filter(filters[ir + i], ea, eb, up[phase, g], offset + i)


@intrinsic
def _transform_panel_column(typingctx, filters, pa, pb, u, offset):
    """``_transform_filter`` of the MR 4x4 filters ``filters[:MR]`` (contiguous) into ``u[phase, xi, offset :
    offset + MR]`` for each phase ``(a, b) = (ea ^ pa, eb ^ pb)``, ``pa = pt % 2`` and ``pb = pl % 2``, whose
    filters are the taps ``(ea + 2 - 2d, eb + 2 - 2e)``: the MR filters loaded as one vector and
    each tap's MR values shuffled out, transformed in float64 MR at a time and stored as one short vector
    each. The scalar loop stores one value at a time, and its stores bound it (filters of 256 x 128
    channels: 0.15 -> 0.066 ms, 2 threads)."""
    dtype = filters.dtype

    def codegen(context, builder, signature, args):
        element = context.get_data_type(dtype)
        size = context.get_abi_sizeof(element)
        index, int32 = llvm_ir.IntType(64), llvm_ir.IntType(32)
        wide, short = llvm_ir.VectorType(element, 16 * MR), llvm_ir.VectorType(element, MR)
        double = llvm_ir.VectorType(llvm_ir.DoubleType(), MR)
        f_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        _, pa, pb, _, offset = args
        u_array = context.make_array(signature.args[3])(context, builder, args[3])
        phase_stride, xi_stride = (
            builder.sdiv(stride, index(size)) for stride in cgutils.unpack_tuple(builder, u_array.strides)[:2]
        )
        every = load(builder, wide, f_data, 0, size)

        def tap(r, s):
            lanes = llvm_ir.Constant(llvm_ir.VectorType(int32, MR), [16 * i + 4 * r + s for i in range(MR)])
            value = builder.shuffle_vector(every, every, lanes)
            return Vector(builder, value if element == llvm_ir.DoubleType() else builder.fpext(value, double))

        for ea in range(2):
            for eb in range(2):
                f00, f01, f10, f11 = tap(ea + 2, eb + 2), tap(ea + 2, eb), tap(ea, eb + 2), tap(ea, eb)
                col0, col1 = (f00, f00 + f10, f10), (f01, f01 + f11, f11)  # G f, column by column
                phase = builder.add(builder.mul(builder.xor(pa, index(ea)), index(2)), builder.xor(pb, index(eb)))
                row0 = builder.add(builder.mul(phase, phase_stride), offset)
                for row in range(3):  # (G f) Gᵀ, row by row
                    for col, value in enumerate((col0[row], col0[row] + col1[row], col1[row])):
                        value = value.value if element == llvm_ir.DoubleType() else builder.fptrunc(value.value, short)
                        start = builder.add(row0, builder.mul(index(3 * row + col), xi_stride))
                        store(builder, value, u_array.data, start, size)
        return context.get_dummy_value()

    return types.none(filters, pa, pb, u, offset), codegen


@njit(cache=True, inline="always")
def _transform_filter(f, ea, eb, u, offset):
    """``u[xi, offset] = (G f' Gᵀ)[xi]`` for the 2x2 filter ``f'`` of taps ``(ea + 2 - 2d, eb + 2 - 2e)`` of
    the 4x4 filter ``f``, in float64, rounded once when stored."""
    f00, f01 = np.float64(f[ea + 2, eb + 2]), np.float64(f[ea + 2, eb])
    f10, f11 = np.float64(f[ea, eb + 2]), np.float64(f[ea, eb])
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


@intrinsic
def _transform_run(typingctx, xp, start, Wp, count, v, v0):
    """``v[xi, v0 + u] = (Bᵀ d_u B)[xi]`` for ``u < count``, the 3x3 tiles ``d_u`` of the padded plane in ``xp``
    at flat index ``start + 2u`` (rows ``Wp`` apart): a vector register of tiles at a time, each of the three
    rows read as two double-width vectors, at ``2u`` and ``2u + 2``, split into even and odd columns (the
    tiles' three columns, one tile per lane). Whole vectors: reads up to 2 * lanes + 2 values past a row's
    last tile and writes up to lanes - 1 columns of ``v`` past ``v0 + count`` (the caller's slack)."""
    dtype = xp.dtype

    def codegen(context, builder, signature, args):
        _, start, Wp, count, _, v0 = args
        vector, lanes, size = vector_type(context, dtype)
        double = llvm_ir.VectorType(vector.element, 2 * lanes)
        columns = llvm_ir.VectorType(llvm_ir.IntType(32), lanes)
        even, odd = (llvm_ir.Constant(columns, list(range(k, 2 * lanes, 2))) for k in (0, 1))
        index = llvm_ir.IntType(64)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        rows = context.make_array(signature.args[4])(context, builder, args[4])
        row_stride = builder.sdiv(cgutils.unpack_tuple(builder, rows.strides)[0], index(size))
        blocks = builder.sdiv(builder.add(count, index(lanes - 1)), index(lanes))
        with cgutils.for_range(builder, blocks) as loop:
            u = builder.mul(loop.index, index(lanes))
            first = builder.add(start, builder.mul(u, index(2)))
            d = []
            for i in range(3):
                row = builder.gep(data, [builder.add(first, builder.mul(index(i), Wp))])
                left, right = load(builder, double, row, 0, size), load(builder, double, row, 2, size)
                d += [builder.shuffle_vector(left, left, even), builder.shuffle_vector(left, left, odd)]
                d += [builder.shuffle_vector(right, right, even)]
            t = _bt_d_b.py_func(tuple(Vector(builder, value) for value in d))
            column = builder.add(v0, u)
            for xi in range(XI):
                store(builder, t[xi].value, rows.data, builder.add(builder.mul(index(xi), row_stride), column), size)
        return context.get_dummy_value()

    return types.none(xp, start, Wp, count, v, v0), codegen


@njit(cache=True)
def _output_tiles(m, dx, n, c, i0, j0, a, b, run, accumulate):
    """Write (or add) ``Aᵀ M_u A``, ``M_u = m[:, u]``, into ``dx[n, c]`` at the phase's pixels ``(2(i0 + i) + a,
    2(j0 + 2u + j) + b)``, ``i, j < 2``, for ``u < run``; tiles overhanging the phase lose their last row or
    column."""
    _, _, H, W = dx.shape
    Pa, Qb = (H - a + 1) // 2, (W - b + 1) // 2
    two_rows = i0 + 1 < Pa
    top = dx[n, c, 2 * i0 + a]
    bottom = dx[n, c, 2 * i0 + 2 + a if two_rows else 2 * i0 + a]
    for u in range(run):
        s0, s1, s2 = m[0, u] + m[3, u], m[1, u] + m[4, u], m[2, u] + m[5, u]
        d0, d1, d2 = m[3, u] + m[6, u], m[4, u] + m[7, u], m[5, u] + m[8, u]
        y00, y01, y10, y11 = s0 + s1, s1 + s2, d0 + d1, d1 + d2
        q = j0 + 2 * u
        w0, w1 = 2 * q + b, 2 * q + 2 + b
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
def _phase_task(xp, layout, K, pt, pl, groups, c_block, accumulate, up, v, m, runs, dx, task, tasks_per_phase):
    """Task ``(phase, group, chunk of NR tiles, block of c_block channels of dx)`` of ``_subpixel_tasks``."""
    N, C, H, W = dx.shape
    Kg, Cg = K // groups, C // groups
    Hp, Wp, top, left = layout
    phase = task // tasks_per_phase
    a, b = phase // 2, phase % 2
    oa, ob = (a + pt) // 2 - 1 + top, (b + pl) // 2 - 1 + left  # where tile (0, 0) starts in the padded plane
    Pa, Qb = (H - a + 1) // 2, (W - b + 1) // 2  # the phase's size
    g, first, last, c0, c1 = task_share(task % tasks_per_phase, N * -(-Pa // 2) * -(-Qb // 2), Cg, c_block)
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
                start = ((n * K + plane) * Hp + 2 * th + oa) * Wp + 2 * tw + ob
                _transform_run(xp, start, Wp, run, v, base)
                base += run
            for u in range(base, (p + 1) * NR):  # tiles past the last: zeros (after the runs' slack)
                for xi in range(XI):
                    v[xi, u] = 0
        for xi in range(XI):
            _panel_rows(up[phase, g, xi], Cg, pc, kc, c0, c1, v[xi, : kc * NR], m, -c0, xi * NR, WHOLE_PANEL, pc > 0)
    for c in range(c0, c1):
        offset = 0
        for i in range(n_runs):
            n, th, tw, run = runs[i, 0], runs[i, 1], runs[i, 2], runs[i, 3]
            _output_tiles(m[:, c - c0, offset:], dx, n, g * Cg + c, 2 * th, 2 * tw, a, b, run, accumulate)
            offset += run


@njit(parallel=PRANGE_ONLY, cache=True)
def _subpixel_filters(weight, pt, pl, groups, Cg, up):
    """The filters transformed into ``up`` (``_transform_filters``), in parallel over micro-panels of rows."""
    Kg = weight.shape[0] // groups
    for task in prange(groups * -(-Cg // MR)):
        _transform_filters(weight, task, Kg, Cg, pt, pl, up)


@njit(parallel=PRANGE_ONLY, cache=True)
def _subpixel_tasks(xp, layout, K, pt, pl, groups, c_block, accumulate, up, v, m, runs, dx):
    """``dx (+)= conv2d_input(dy, weight)`` for 4x4 filters at stride 2, ``dy`` (K channels) zero-padded in
    ``xp`` as ``layout`` (``padded_layout``) and the filters transformed in ``up``: the tasks
    ``_phase_task`` in parallel, each thread with its own scratch rows of ``v`` (9, min(KC, Kg) * NR + pad),
    ``m`` (9, c_block + 1, NR) and ``runs`` (NR, 4)."""
    N, C, H, W = dx.shape
    tiles = N * -(-((H + 1) // 2) // 2) * -(-((W + 1) // 2) // 2)  # the most any phase has
    tasks_per_phase = groups * -(-tiles // NR) * -(-(C // groups) // c_block)
    for task in prange(4 * tasks_per_phase):
        t = numba.get_thread_id()
        _phase_task(
            xp, layout, K, pt, pl, groups, c_block, accumulate, up, v[t], m[t], runs[t], dx, task, tasks_per_phase
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
    return np.array((top + rows, left + cols, top, left), np.int64)


def _channel_block(Cg, chunks, threads):
    """Channels of dx per task: all of a group's, or fewer (at least 4 * MR) so that every thread gets two
    tasks at least when the phases' chunks of tiles are too few."""
    c_block = _round_up(Cg, MR)
    while c_block > 4 * MR and chunks * -(-Cg // c_block) < 2 * threads:
        c_block = _round_up(c_block // 2, MR)
    return c_block


def _conv2d_input_subpixel(grad_output, weight, geometry, groups, accumulate, grad_input):
    """``grad_input (+)= conv2d_input(grad_output, weight)`` for 4x4 filters, stride 2, no dilation: with
    ``accumulate`` added to ``grad_input`` (which holds the bias), without it overwritten. ``grad_output``
    padded a block of images at a time (``_conv_kernels._padded_blocks``: as many as the column buffer
    holds)."""
    N, K, P, Q = grad_output.shape
    Cg = grad_input.shape[1] // groups
    Kg = K // groups
    dtype = grad_input.dtype
    _, _, pt, pl, _, _ = geometry.kernel_geometry
    up = scratch("subpixel filters", (4, groups, XI, _round_up(Cg, MR) * Kg + 16), dtype, zeros=Cg % MR != 0)
    _subpixel_filters(weight, pt, pl, groups, np.int64(Cg), up)
    chunks = 4 * groups * -(-_phase_tiles(geometry) // NR)
    c_block = _channel_block(Cg, chunks, numba.config.NUMBA_NUM_THREADS)
    v = per_thread((XI, min(KC, Kg) * NR + 16), dtype, name="subpixel inputs")
    m = per_thread((XI, c_block + 1, NR), dtype, name="subpixel products")
    runs = per_thread((NR, 4), np.int64, name="subpixel runs")
    layout = padded_layout(geometry, P, Q)
    Hp, Wp, top, left = (int(value) for value in layout)
    padding = (1, 1, top, left, 1, 1)  # _pad_phases at stride 1
    for n0, n1, xp in _padded_blocks(grad_output, padding, Hp, Wp, K * Hp * Wp * dtype.itemsize):
        _subpixel_tasks(xp, layout, K, pt, pl, groups, c_block, accumulate, up, v, m, runs, grad_input[n0:n1])
