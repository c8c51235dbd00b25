"""Blocked GEMM in the BLIS / Goto design, written in Numba: the micro-kernel and the packing of its operands.

``C[m, n] (+)= A[m, k] @ B[k, n]``, computed by the five BLIS loops around a micro-kernel (the parallel loop and
the drivers are in ``_macro.py``)::

    for jc in range(0, n, NC):            # a KC x NC panel of B is packed, shared by all threads
        for pc in range(0, k, KC):
            for ic in range(0, m, MC):    # } one parallel loop over (ic, jr) tiles:
                for jr in range(0, nc, NR):  # } threads never write the same element of C
                    for ir in range(0, mc, MR):
                        micro-kernel: C[ir:ir+MR, jr:jr+NR] += A~[ir, pc] @ B~[pc, jr]

A is packed once, for every ``pc`` block, into MR-row micro-panels (``_pack_a``); B is packed per ``(jc, pc)``
into NR-column micro-panels (``_macro._pack_b``). Packing zero-pads the edges, so one micro-kernel serves every tile
and writes back only the part of its tile that lies inside C. The accumulators live in a stack-allocated
MR x NR tile that LLVM keeps in vector registers. A last micro-panel of B with at most NARROW valid columns
goes to a narrow micro-kernel instead (2*MR x NARROW, written as LLVM vector code), which does not compute the
padding.

``_macro.py`` can also pack B per task, one micro-panel at a time, instead of per ``(jc, pc)``.

Each element of C is summed by one thread, in an order fixed by the block sizes alone: results do not depend
on the number of threads.
"""

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._parallel import PRANGE_ONLY
from ._simd import NARROW, _narrow_tile, _prefetch, _stream_row, _transposed_block
from .config import KC, MC, MR, NC, NR

#: B micro-panels with at most this many times NARROW valid columns go to the narrow micro-kernel, a pass per
#: NARROW columns (``_panel_rows``).
NARROW_PASSES = 2

#: Bytes of accumulators the micro-kernel's register tile may hold: half of AVX-512's 32 vector registers, the
#: rest for B's vectors and A's values. A float64 MR x NR tile would take all 32, and LLVM spills: float64 goes
#: to the narrow tile (16 registers) for every micro-panel of B instead, a pass per NARROW columns.
TILE_REGISTER_BYTES = 16 * 64

# Arguments typed as plain int64 and bool, not as Numba literals: a literal argument (a bare 0 or True) would
# compile the callee once more, for that one value.
ZERO = np.int64(0)
PACKED = np.int64(NR)  # the row stride of a packed micro-panel of B
TRUE = np.bool_(True)
FALSE = np.bool_(False)

# Only contraction of multiply-add pairs into FMAs: no reassociation is needed to vectorise along NR, and the
# flags that assume finite values would let LLVM drop the NaN and Inf that must propagate.
_FASTMATH = {"contract"}


@intrinsic
def _stack_tile(typingctx, dtype):
    """Pointer to an uninitialised MR * NR buffer of ``dtype`` on the caller's stack.

    A heap array would be opaque to LLVM; a stack buffer indexed with constants is promoted to registers.
    """
    element = dtype.dtype

    def codegen(context, builder, signature, args):
        tile = cgutils.alloca_once(builder, context.get_data_type(element), size=MR * NR)
        # Aligned to a cache line: the float64 tile fills all 32 vector registers, so LLVM keeps part of it
        # here through the loop, and at the stack's default 16 bytes every other access split a cache line
        # (float64 GEMM ran at half speed in processes whose thread stacks happened to be misaligned).
        tile.align = 64
        return tile

    return types.CPointer(element)(dtype), codegen


@intrinsic
def _data(typingctx, array):
    """Pointer to the first element of a C-contiguous ``array``: indexed with no wraparound test and no slice
    to build, for copies too short to pay for those. Callers index it flat, so any other layout is refused
    when the kernel is compiled."""
    if array.layout != "C":
        raise numba.core.errors.TypingError(f"_data needs a C-contiguous array, got {array}")

    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data

    return types.CPointer(array.dtype)(array), codegen


@njit(cache=True)
def _round_up(value, multiple):
    return -(-value // multiple) * multiple


@njit(cache=True)
def _packed_a_size(m, k):
    """Length of the buffer ``_pack_a`` fills for an ``m x k`` A."""
    return _round_up(m, MR) * k


@njit(cache=True)
def _packed_b_size(n):
    """Length of the scratch ``_macro._gemm_packed`` needs for a B with ``n`` columns (any number of rows)."""
    return KC * _round_up(min(n, NC), NR)


@njit(cache=True)
def _segment(ncols, j):
    """Where logical column ``j`` of a blocked matrix with ``ncols`` columns per block lives:
    ``(block, column in it, columns left in it)``."""
    return j // ncols, j % ncols, ncols - j % ncols


@njit(cache=True)
def _pack_a_panel(a, row0, m, col0, k, transposed, ap, t):
    """Micro-panel ``t`` of ``_pack_a``: rows ``ir:ir+MR`` of the KC-column block ``pc`` (zero-padded)."""
    m_pad = _round_up(m, MR)
    n_panels = m_pad // MR
    pc = (t // n_panels) * KC
    ir = (t % n_panels) * MR
    kc = min(KC, k - pc)
    m_valid = min(MR, m - ir)
    start = pc * m_pad + ir * kc
    panel = ap[start : start + kc * MR]
    # Read along the contiguous axis of ``a``: its rows, or the columns of A when A is ``a`` transposed (the
    # input gradient's W.T), so neither is packed with strided loads.
    ncols = a.shape[1] if transposed else a.shape[2]
    lead = ir - ir % (GROUP * MR)
    if transposed and lead + GROUP * MR <= m:
        # A transposed A is read a column at a time, MR values from each of kc rows of ``a`` far apart: the
        # first panel of each GROUP packs the whole group, reading a cache line from each row, not 16 bytes.
        if ir == lead:
            _pack_a_transposed_group(a, row0 + ir, col0 + pc, kc, ap[start : start + GROUP * kc * MR])
        return
    p = 0
    while p < kc:
        block, col, left = _segment(ncols, col0 + pc + p)
        run = min(kc - p, left)
        if transposed and m_valid == MR:
            # MR contiguous values per column of A: one short vector each (a loop over the columns with a
            # runtime row count would be vectorised with gathers).
            for q in range(run):
                src = a[block, col + q, row0 + ir : row0 + ir + MR]
                dst = panel[(p + q) * MR : (p + q + 1) * MR]
                for i in range(MR):
                    dst[i] = src[i]
        elif transposed:
            for q in range(run):
                src = a[block, col + q, row0 + ir : row0 + ir + m_valid]
                for i in range(m_valid):
                    panel[(p + q) * MR + i] = src[i]
        elif m_valid == MR == 4:
            # The four rows as four 1-D slices, so that LLVM interleaves contiguous loads into contiguous
            # stores (from a 2-D slice, whose strides it does not know, it gathers).
            s0, s1 = a[block, row0 + ir, col : col + run], a[block, row0 + ir + 1, col : col + run]
            s2, s3 = a[block, row0 + ir + 2, col : col + run], a[block, row0 + ir + 3, col : col + run]
            dst = panel[p * MR : (p + run) * MR]
            for q in range(run):
                dst[4 * q], dst[4 * q + 1], dst[4 * q + 2], dst[4 * q + 3] = s0[q], s1[q], s2[q], s3[q]
        elif m_valid == MR:
            # All MR rows at once, so each store of the panel is contiguous: LLVM interleaves MR row loads.
            src = a[block, row0 + ir : row0 + ir + MR, col : col + run]
            dst = panel[p * MR : (p + run) * MR]
            for q in range(run):
                for i in range(MR):
                    dst[q * MR + i] = src[i, q]
        else:
            for i in range(m_valid):
                src = a[block, row0 + ir + i, col : col + run]
                for q in range(run):
                    panel[(p + q) * MR + i] = src[q]
        p += run
    for p in range(kc):
        for i in range(m_valid, MR):
            panel[p * MR + i] = 0


#: Micro-panels of a transposed A packed together: GROUP * MR values of a row of ``a`` fill a cache line.
GROUP = 4

#: ``_pack_a_transposed_group`` prefetches the line of the row of ``a`` this many rows ahead. It reads one line
#: from each row, rows a whole row of ``a`` apart (16 KiB for the input gradient's Wᵀ of 4096 taps): a stride
#: the hardware prefetchers do not follow across pages. Measured in one process, alternating (float32, 2 threads,
#: a machine whose numpy.matmul reaches 200 GFLOP/s): conv_transpose2d 8x512x4x4 -> 256 4x4 s2 (8 MiB of Wᵀ)
#: 4.36 -> 3.89 ms (24 rounds; 32 and 64 rows ahead within noise of 16); 8x256x7x7 -> 128 3x3 s2 unchanged.
TRANSPOSED_AHEAD = 16


@njit(cache=True)
def _pack_a_transposed_group(a, row0, col0, kc, panels):
    """GROUP consecutive micro-panels of a transposed A: rows ``row0 : row0 + GROUP * MR`` of A (columns of
    ``a``), A's columns ``col0 : col0 + kc`` (rows of ``a``, across its blocks), into ``panels``."""
    ncols, row_length = a.shape[1], a.shape[2]
    data = _data(a)
    p = 0
    while p < kc:
        block, col, left = _segment(ncols, col0 + p)
        run = min(kc - p, left)
        for q in range(run):
            ahead = min(col + q + TRANSPOSED_AHEAD, ncols - 1)
            _prefetch(data, (block * ncols + ahead) * row_length + row0)
            src = a[block, col + q, row0 : row0 + GROUP * MR]
            for g in range(GROUP):
                dst = panels[g * kc * MR + (p + q) * MR : g * kc * MR + (p + q + 1) * MR]
                for i in range(MR):
                    dst[i] = src[g * MR + i]
        p += run


@njit(cache=True)
def _n_a_panels(m, k):
    return (_round_up(m, MR) // MR) * -(-k // KC)


@njit(parallel=PRANGE_ONLY, cache=True)
def _pack_a(a, row0, m, col0, k, transposed, ap):
    """Pack the blocked matrix ``A = a[:, row0 : row0 + m, col0 : col0 + k]`` into MR-row micro-panels.

    Every GEMM operand is blocked: a 3-D array ``(blocks, rows, cols)`` standing for the matrix
    ``np.concatenate(list(a), axis=1)``, so a batch of images ``(N, K, P*Q)`` is one ``K x N*P*Q`` matrix.
    Operands are passed whole with row and column offsets rather than sliced, so Numba knows their last axis is
    contiguous and vectorises the copies.

    The KC-column block starting at ``pc`` occupies ``ap[pc * m_pad :]``; in it, the micro-panel of rows
    ``ir:ir+MR`` starts at offset ``ir * kc`` and holds ``kc`` columns of MR values each, so the micro-kernel
    reads MR consecutive values per step. Rows past ``m`` are zeros. Footprint: ``m_pad * k`` values.

    With ``transposed``, A is the transpose of ``a``'s blocks instead: ``A = a[:, col0 : col0 + k, row0 : row0
    + m]`` transposed, its blocks side by side.
    """
    for t in prange(_n_a_panels(m, k)):
        _pack_a_panel(a, row0, m, col0, k, transposed, ap, t)


@njit(cache=True)
def _pack_a_serial(a, row0, m, col0, k, transposed, ap):
    """``_pack_a`` on the calling thread, for use inside another parallel loop."""
    for t in range(_n_a_panels(m, k)):
        _pack_a_panel(a, row0, m, col0, k, transposed, ap, t)


@njit(cache=True)
def _pack_b_panel(b, row0, col0, pc, kc, j0, n_valid, panel):
    """Rows ``pc:pc+kc`` and columns ``j0 : j0 + n_valid`` (at most NR) of the blocked matrix ``B = b[:, row0:,
    col0:]`` into one NR-column micro-panel: ``kc`` rows of NR values, columns past ``n_valid`` zero."""
    rows, cols = b.shape[1], b.shape[2]
    b_data, panel_data = _data(b), _data(panel)  # rows of NR values or fewer: no slices built for each
    j = 0
    while j < n_valid:
        block, col, left = _segment(cols, col0 + j0 + j)
        run = min(n_valid - j, left)
        for p in range(kc):
            src = (block * rows + row0 + pc + p) * cols + col
            dst = p * NR + j
            for q in range(run):
                panel_data[dst + q] = b_data[src + q]
        j += run
    for p in range(kc):
        for q in range(n_valid, NR):
            panel[p * NR + q] = 0


@njit(cache=True)
def _pack_b_panel_transposed(bt, row0, pc, kc, j0, n_valid, panel):
    """``_pack_b_panel`` for a B stored transposed: ``B`` is the transpose of the blocked matrix ``bt[:, row0:]``
    (see ``_pack_a``), so each column of B is contiguous: ``B[k, j] = bt[k // cols, row0 + j, k % cols]``.
    ``gemm(a, w.T)`` gives one block; a weight gradient's images, channels by pixels, one block an image.

    Square blocks of 16 float32 (8 float64) are read from 16 rows of ``bt`` and written transposed
    (``_simd._transposed_block``); rows of the panel whose block would cross into the next block of ``bt``, and
    the last ``kc % 16``, value by value. Columns past ``n_valid`` are zeros.
    """
    rows, cols = bt.shape[1], bt.shape[2]
    lanes = 64 // bt.itemsize
    source, target = _data(bt), _data(panel)
    p = 0
    while p < kc:
        block, col, left = _segment(cols, pc + p)
        if min(left, kc - p) >= lanes:
            start = (block * rows + row0 + j0) * cols + col
            for j in range(0, NR, lanes):
                count = max(0, min(lanes, n_valid - j))
                _transposed_block(target, p * NR + j, NR, source, start + j * cols, cols, count)
            p += lanes
        else:
            for j in range(NR):
                panel[p * NR + j] = bt[block, row0 + j0 + j, col] if j < n_valid else 0
            p += 1


@njit(fastmath=_FASTMATH, cache=True)
def _micro_kernel(kc, a_panel, b_panel, b_stride, c, i0, j0, m_valid, n_valid, accumulate, stream, bias):
    """``C[i0:i0+m_valid, j0:j0+n_valid] (+)= A~ @ B~`` for one MR x NR tile of the blocked matrix ``c``.

    ``a_panel`` is kc x MR, packed; ``b_panel`` kc rows of NR values, ``b_stride`` apart: packed (``PACKED``), or
    a plain B's own rows, read in place. The loops over MR and NR have constant trip counts, so LLVM unrolls them
    and keeps the whole tile in registers. With ``stream`` (and not ``accumulate``), a whole tile is stored past
    the caches (``_simd._stream_row``): the caller fences; and ``bias[row]`` of C's row is added to the tile,
    where ``bias`` is not empty (:func:`no_bias`): C's one store, which would otherwise have added the tile to the
    bias stored before.
    """
    registers = _stack_tile(c.dtype)
    tile = numba.carray(registers, (MR, NR))
    for i in range(MR):
        for j in range(NR):
            tile[i, j] = 0
    for p in range(kc):
        # Slice first: indexing the slices with loop counters gives LLVM contiguous, gather-free loads.
        a = a_panel[p * MR : (p + 1) * MR]
        b = b_panel[p * b_stride : p * b_stride + NR]
        for i in range(MR):
            a_i = a[i]
            for j in range(NR):
                tile[i, j] += a_i * b[j]
    if stream and bias.size:
        for i in range(m_valid):
            b = bias[i0 + i]
            for j in range(NR):
                tile[i, j] += b
    block, col, left = _segment(c.shape[2], j0)
    if stream and not accumulate and m_valid == MR and n_valid == NR and left >= NR:
        for i in range(MR):
            _stream_row(_data(c), (block * c.shape[1] + i0 + i) * c.shape[2] + col, registers, i)
        return
    if m_valid == MR and n_valid == NR and left >= NR:
        # A whole tile in one block of c, the common case: constant trip counts, so the tile is stored
        # straight from the registers.
        for i in range(MR):
            dst = c[block, i0 + i, col : col + NR]
            if accumulate:
                for q in range(NR):
                    dst[q] += tile[i, q]
            else:
                for q in range(NR):
                    dst[q] = tile[i, q]
        return
    _write_back(tile, c, i0, j0, m_valid, n_valid, accumulate)


@njit(cache=True, inline="always")
def _wide_tile(c):
    """Whether the micro-kernel's MR x NR tile of C's dtype fits the registers (float32); else (float64) every
    micro-panel of B goes to the narrow tile, a pass per NARROW columns (``_panel_rows``)."""
    return c.itemsize * MR * NR <= TILE_REGISTER_BYTES


@njit(cache=True, inline="always")
def _b_micro_panel(b, b_row0, pc, kc, j0, n_valid, panel, c):
    """``(micro-panel, row stride)`` for rows ``pc:pc+kc`` and columns ``j0 : j0 + n_valid`` of the plain blocked
    matrix ``B = b[:, b_row0:]`` (C-contiguous), as the micro-kernel of a C like ``c`` reads it.

    A whole micro-panel (NR columns) in one block of ``b`` is read where it lies, its rows ``b``'s own, when the
    tile is the wide one: nothing copied. Otherwise it is packed into ``panel`` (``_pack_b_panel``, stride
    PACKED): the last micro-panel of fewer columns, one across two blocks (images), and float64, whose narrow
    tile would fetch a few bytes from every row of B on each of its passes (gemm 64x25088x256 float64 10.5 ->
    12.4 ms in place)."""
    rows, cols = b.shape[1], b.shape[2]
    block, col, left = _segment(cols, j0)
    if n_valid == NR and left >= NR and _wide_tile(c):
        start = (block * rows + b_row0 + pc) * cols + col
        return b.reshape(-1)[start : start + (kc - 1) * cols + NR], cols
    _pack_b_panel(b, b_row0, 0, pc, kc, j0, n_valid, panel)
    return panel, PACKED


@njit(cache=True, inline="always")
def no_bias(c):
    """The ``bias`` argument of the micro-kernel for a C that takes none: an empty view, of C's dtype."""
    return c.reshape(-1)[:0]


@njit(cache=True, inline="always")
def _write_back(tile, c, i0, j0, m_valid, n_valid, accumulate):
    """``C[i0:i0+m_valid, j0:j0+n_valid] (+)= tile[:m_valid, :n_valid]`` on the blocked matrix ``c``.

    Inlined where Numba compiles the caller: a call taking the stack tile's address would keep LLVM from
    holding the tile in registers (float64 GEMM 8 % slower, measured)."""
    j = 0
    while j < n_valid:  # the tile's columns may span two blocks of c (two images)
        block, col, left = _segment(c.shape[2], j0 + j)
        run = min(n_valid - j, left)
        for i in range(m_valid):
            dst = c[block, i0 + i, col : col + run]
            src = tile[i, j : j + run]  # sliced first: contiguous loads, not gathers
            if accumulate:
                for q in range(run):
                    dst[q] += src[q]
            else:
                for q in range(run):
                    dst[q] = src[q]
        j += run


@njit(cache=True)
def _panel_rows(ap, m, pc, kc, first, last, b_panel, b_stride, c, i0, j0, n_valid, accumulate, stream, bias):
    """``C[i0 + first : i0 + last, j0 : j0 + n_valid] (+)= A~ @ B~`` for rows ``first:last`` (multiples of MR) of A
    packed by ``_pack_a`` and one micro-panel of B, its rows ``b_stride`` apart (``_micro_kernel``): by the
    micro-kernel (``stream`` and ``bias`` as there: the narrow one adds the bias too, but stores through the
    caches), or by the narrow one, two A micro-panels at a time, a pass per NARROW columns, when B's micro-panel has
    at most NARROW_PASSES * NARROW valid columns (the last of a B whose width is not a multiple of NR). Measured,
    float32, 2 threads, against the micro-kernel alone: gemm 512x392x4608 (its last micro-panel of B 8 columns wide)
    4.85-5.11 -> 4.44 ms, 512x200x512 0.32 -> 0.27 ms; conv2d by GEMM 8x256x14x14 -> 512 3x3 s2 3.02-3.04 -> 2.88
    ms, 8x512x7x7 -> 512 3x3 6.15-6.17 -> 5.72-5.83 ms. Two passes for 17-32 columns, against the micro-kernel: gemm
    512x32x4096 0.81-0.90 -> 0.62-0.87 ms, 512x96x2048 0.67-0.75 -> 0.57-0.66, 256x25x8192 1.43-1.70 -> 1.00-1.33,
    1024x160x1024 0.91-0.95 -> 0.81-0.94; conv_transpose2d 2x256x8x8 -> 128 4x4 s2 by phases (32 tiles a phase)
    0.55-0.60 -> 0.42-0.49.
    """
    m_pad = _round_up(m, MR)
    if n_valid <= NARROW_PASSES * NARROW or not _wide_tile(c):
        tile = numba.carray(_stack_tile(c.dtype), (2 * MR, NARROW))
        for ir in range(first, last, 2 * MR):
            start = pc * m_pad + ir * kc
            a_panel = ap[start : start + kc * MR]
            # Past the last micro-panel of A, the last one again: its products are not written back.
            a_next = ap[start + kc * MR : start + 2 * kc * MR] if ir + MR < m_pad else a_panel
            rows = min(2 * MR, min(last, m) - ir)  # rows past last belong to another task: not written
            for jj in range(0, n_valid, NARROW):  # NARROW columns of B a pass
                _narrow_tile(kc, a_panel, a_next, b_panel[jj:], b_stride, _data(tile))
                if stream and bias.size:
                    for i in range(rows):
                        b = bias[i0 + ir + i]
                        for j in range(NARROW):
                            tile[i, j] += b
                _write_back(tile, c, i0 + ir, j0 + jj, rows, min(NARROW, n_valid - jj), accumulate)
        return
    for ir in range(first, last, MR):
        start = pc * m_pad + ir * kc
        a_panel = ap[start : start + kc * MR]
        _micro_kernel(
            kc, a_panel, b_panel, b_stride, c, i0 + ir, j0, min(MR, m - ir), n_valid, accumulate, stream, bias
        )


@njit(cache=True)
def _n_tiles(m, nc):
    return -(-m // MC) * -(-nc // NR)


@njit(cache=True)
def _tile(ap, m, pc, kc, bp, nc, c, c_row0, c_col0, accumulate, stream, t):
    """Tile ``t`` of the (ic, jr) grid: rows ``ic:ic+MC`` of C against B's micro-panel ``jr``."""
    n_jr = -(-nc // NR)
    ic = (t // n_jr) * MC
    jr = (t % n_jr) * NR
    b_panel = bp[jr * kc : jr * kc + kc * NR]
    _panel_rows(
        ap, m, pc, kc, ic, min(ic + MC, m), b_panel, PACKED, c, c_row0, c_col0 + jr, min(NR, nc - jr),
        accumulate, stream, no_bias(c),
    )  # fmt: skip


@njit(cache=True)
def _macro_kernel_serial(ap, m, pc, kc, bp, nc, c, c_row0, c_col0, accumulate, stream):
    """``C[:, jc:jc+nc] (+)= A[:, pc:pc+kc] @ B~`` for one packed KC x NC panel ``bp`` of B, on the calling
    thread: ``_macro._macro_kernel`` for use inside another parallel loop (``stream`` as there: the caller fences).

    ``ap`` is all of A packed by ``_pack_a``; ``C`` is ``c[:, c_row0 : c_row0 + m, c_col0 : c_col0 + nc]``.
    """
    for t in range(_n_tiles(m, nc)):
        _tile(ap, m, pc, kc, bp, nc, c, c_row0, c_col0, accumulate, stream, t)


@njit(cache=True)
def _zero_columns(c, c_row0, m, c_col0, n):
    """``C = 0`` on a blocked matrix: what ``C = A @ B`` is when the shared dimension is empty."""
    for j in range(n):
        block, col, _ = _segment(c.shape[2], c_col0 + j)
        c[block, c_row0 : c_row0 + m, col] = 0
