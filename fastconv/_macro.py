"""The parallel macro-kernel and the GEMM drivers around it: B shared by all threads, packed per task, or read in
place.

One parallel loop over the (ic, jr) tiles of C computes ``C (+)= A[:, pc:pc+kc] @ B[pc:pc+kc, :]`` for one KC
block (see ``_gemm.py`` for the packed layouts and the micro-kernel). Where B's micro-panels come from is the
``source`` of the call:

``SHARED``
    The BLIS way: ``_pack_b`` first packs a KC x NC panel of B into a buffer every thread reads; the tiles
    then use its micro-panels. A plain B with more than MC rows of A takes it: each micro-panel is packed once
    and used by every MC block of rows.
``PATCHES`` / ``GATHERED``
    Each task packs the one KC x NR micro-panel it needs into its thread's scratch, straight from image patches
    (implicit im2col: copied in runs of output pixels, or on small images gathered value by value), and
    multiplies it while it is still in L1/L2: one launch per KC block instead of two per (jc, pc), no 4 MiB
    buffer written to and read back from L3. A micro-panel is packed once per MC block of rows, which pays for
    patches (a gather either way).
``PACK_SHARED``
    Packs the shared panel for ``SHARED`` (``_pack_b``), one task per micro-panel, and multiplies nothing.

A plain B (a matrix, a 1x1 layer's images) with at most MC rows of A (``packs_per_task``), and a patchify layer's
stride phases whatever its filters, is not packed at all: ``_plain_b_tasks`` has the micro-kernel read each
micro-panel's rows where they lie in B, and each task runs over all of the shared dimension, its tile of C kept in
cache between KC blocks. Measured (float32, 2 threads, one process, alternating), against a micro-panel packed per
task and a launch per KC block: gemm 64x25088x576 12.41 -> 10.62 ms, 64x25088x256 5.15 -> 4.55, 128x6272x1152 10.55
-> 9.93; conv2d 1x1 8x256x56x56 -> 64 5.05 -> 4.66, 8x512x28x28 -> 128 4.28 -> 3.99, 8x64x56x56 -> 256 4.46 -> 4.29.
With more rows of A, tasks over blocks of them would each read B again: on 7x7 images, whose micro-panels cross
images and are packed, 8x512x7x7 -> 2048 4.14 -> 4.71 ms; a shared panel stays their way.

Where each value of A is used for few columns (the input gradient's Wᵀ), ``_a_block_tasks`` turns this
around: one task per block of rows of A, which it packs into its thread's cache and multiplies by every
micro-panel of a shared panel of B.

Measured (float32, 2 threads), packing per task against a shared panel: 7x7 stride-2 conv 9.8 -> 8.0 ms, 3x3
convs by GEMM 6-19 % faster, small layers 1.5-1.8x (fewer launches), gemm 64x25088x256 5 % faster; a 1x1 conv
with 1024 filters 20 % slower, hence the rule.

Every task owns its tile of C: no element is written twice and the order of every sum is fixed, whatever the
number of threads. The drivers are Python loops over compiled kernels, a few calls per block: compiled, they
would link and re-optimise the kernels they call, seconds of compile time for no speed.
"""

import numba
import numpy as np
from numba import njit, prange

from ._gemm import (
    FALSE,
    GROUP,
    PACKED,
    ZERO,
    _b_micro_panel,
    _macro_kernel_serial,
    _n_a_panels,
    _n_tiles,
    _pack_a,
    _pack_a_panel,
    _pack_a_serial,
    _pack_b_panel,
    _pack_b_panel_transposed,
    _packed_a_size,
    _packed_b_size,
    _panel_rows,
    _round_up,
    _zero_columns,
    no_bias,
)
from ._im2col import _gathered_patch_panel, _patch_panel
from ._parallel import PRANGE_ONLY
from ._scratch import per_thread, scratch
from ._simd import _store_fence
from .config import KC, MC, MR, NC, NR, STREAM_OUTPUT_BYTES

#: Where the macro-kernel's micro-panels of B come from (module docstring). Numpy scalars, not Python ints:
#: a literal argument would compile the kernel once more.
SHARED, PATCHES, GATHERED, PACK_SHARED = np.int64(0), np.int64(1), np.int64(2), np.int64(3)


def packs_per_task(m, patches):
    """Whether tasks are best given B's micro-panels one each, packed from image patches or read in place from a
    plain matrix (:func:`_plain_b_tasks`), rather than a shared panel, for an A of ``m`` rows."""
    return patches or m <= MC


def task_scratch(dtype):
    """The ``panels`` and ``pixel_tables`` arguments of :func:`_macro_kernel` for ``PATCHES`` and ``GATHERED``
    (``panels`` also of :func:`_plain_b_tasks`): one KC x NR micro-panel and one 3 x NR pixel table per thread."""
    return per_thread((KC * NR,), dtype, name="task panels"), per_thread((3, NR), np.int64, name="pixel tables")


def no_patches(dtype):
    """The ``x`` and ``taps`` arguments of :func:`_macro_kernel` when B is not made of patches."""
    empty = np.empty(0, np.int64)
    return np.empty((0, 0, 0, 0), dtype), (empty, empty, empty, np.empty((0, 2), np.int64))


@njit(cache=True)
def _block_rows(m):
    """Rows of C per task of :func:`_macro_kernel`: ``m`` split into the fewest blocks of at most MC rows, all of
    one size (a multiple of MR) but the last, so that 384 rows are two tasks of 192, not 256 and 128."""
    blocks = -(-m // MC)
    return _round_up(-(-m // blocks), MR)


@njit(parallel=PRANGE_ONLY, cache=True)
def _macro_kernel(
    ap, m, pc, kc, source, b, b_row0, x, taps, sh, sw, P, Q, jc, nc, c, c_row0, c_col0, accumulate, stream, bias,
    panels, pixel_tables,
):  # fmt: skip
    """``C[:, jc:jc+nc] (+)= A[:, pc:pc+kc] @ B[pc:pc+kc, jc:jc+nc]`` for one KC block.

    ``ap`` is all of A packed by ``_pack_a``; ``C`` is ``c[:, c_row0 : c_row0 + m, c_col0:]``, blocked. B is, by
    ``source``: ``SHARED``, already packed by ``_pack_b`` into ``panels[0]``; ``PATCHES``, the patch matrix of
    ``x`` for strides ``sh, sw`` and a ``P x Q`` output (``_im2col``; ``taps`` is ``_tap_table`` of this block,
    made by the caller: a kernel allocates nothing); ``GATHERED``, the same patches, gathered value by value
    (``_gathered_patch_panel``: small images). The last two are packed by each task into its thread's row of
    ``panels`` (:func:`task_scratch`). ``PACK_SHARED`` only packs the shared panel of B (``_pack_b``), the blocked
    matrix ``b[:, b_row0:]``: one kernel for both steps, so one parallel kernel less to compile. With ``stream``,
    C's whole tiles are stored past the caches (``_gemm._micro_kernel``), each task's stores fenced at its end, and
    ``bias`` (empty: none) added to every value of C, which holds none on entry.
    """
    n_jr = -(-nc // NR)
    mc = _block_rows(m)
    for task in prange(-(-m // mc) * n_jr):
        ic = task // n_jr * mc
        jr = task % n_jr * NR
        n_valid = min(NR, nc - jr)
        if source == SHARED or source == PACK_SHARED:
            panel = panels[0, jr * kc : jr * kc + kc * NR]
            if source == PACK_SHARED:
                _pack_b_panel(b, b_row0, 0, pc, kc, jc + jr, n_valid, panel)
                continue
        else:
            thread = numba.get_thread_id()
            panel = panels[thread]
            if source == PATCHES:
                _patch_panel(x, taps, sh, sw, P, Q, kc, jc + jr, n_valid, panel, 0)
            else:
                _gathered_patch_panel(x, taps, sh, sw, P, Q, kc, jc + jr, n_valid, panel, pixel_tables[thread])
        _panel_rows(
            ap, m, pc, kc, ic, min(ic + mc, m), panel, PACKED, c, c_row0, c_col0 + jc + jr, n_valid, accumulate,
            stream, bias,
        )  # fmt: skip
        if stream:
            _store_fence()


@njit(parallel=PRANGE_ONLY, cache=True)
def _plain_b_tasks(ap, m, k, b, b_row0, c, c_row0, accumulate, stream, bias, panels):
    """``C (+)= A @ B`` for a plain B, the blocked matrix ``b[:, b_row0 : b_row0 + k, :]``, read in place: one task
    per block of rows of C (``_block_rows``) and NR columns, over all of the shared dimension.

    ``ap`` is all of A (m x k) packed by ``_pack_a``; ``C`` is ``c[:, c_row0 : c_row0 + m, :]``, as many columns as
    B (``b`` C-contiguous). A micro-panel of B that lies whole in one block of ``b`` is not packed: the micro-kernel
    reads its rows where they are (``_gemm._b_micro_panel``). The others (the last, one across two blocks, all of
    float64) are packed into the thread's row of ``panels``. The task's tile of C stays in the core's caches from
    one KC block to the next. With ``stream`` (one KC block, C overwritten), its whole tiles are stored past the
    caches with ``bias`` added (empty: none), as in :func:`_macro_kernel`.
    """
    n = b.shape[0] * b.shape[2]
    n_jr = -(-n // NR)
    mc = _block_rows(m)
    row_blocks = -(-m // mc)
    for task in prange(n_jr * row_blocks):
        # The row blocks of one micro-panel of B next to each other: one thread reads it from its own cache.
        jr = task // row_blocks * NR
        ic = task % row_blocks * mc
        n_valid = min(NR, n - jr)
        panel = panels[numba.get_thread_id()]
        for pc in range(0, k, KC):
            kc = min(KC, k - pc)
            b_panel, b_stride = _b_micro_panel(b, b_row0, pc, kc, jr, n_valid, panel, c)
            _panel_rows(
                ap, m, pc, kc, ic, min(ic + mc, m), b_panel, b_stride, c, c_row0, jr, n_valid, accumulate or pc > 0,
                stream, bias,
            )  # fmt: skip
        if stream:
            _store_fence()


def _pack_b(b, b_row0, b_col0, pc, kc, jc, nc, bp):
    """Pack rows ``pc:pc+kc`` of the blocked matrix ``B = b[:, b_row0:, b_col0 + jc : b_col0 + jc + nc]`` into
    NR-column micro-panels, in parallel: the shared panel ``bp`` of ``SHARED``.

    The micro-panel of columns ``jr:jr+NR`` starts at ``bp[jr * kc]`` and holds ``kc`` rows of NR values;
    columns past ``nc`` are zeros. Footprint: ``kc * round_up(nc, NR)`` values.
    """
    no_x, no_taps = no_patches(bp.dtype)
    one_row = np.empty((1, 1, 1), bp.dtype)  # C, untouched: one task per micro-panel of B
    _macro_kernel(
        bp, np.int64(1), pc, kc, PACK_SHARED, b, b_row0, no_x, no_taps, 1, 1, 1, 1, b_col0 + jc, nc, one_row,
        ZERO, ZERO, FALSE, FALSE, bp[:0], bp.reshape(1, -1), np.empty((1, 3, NR), np.int64),
    )  # fmt: skip


@njit(parallel=PRANGE_ONLY, cache=True)
def _pack_b_transposed(bt, pc, kc, jc, nc, bp):
    """``_pack_b`` for a B stored transposed (``B = bt.T``, ``bt`` n x k and C-contiguous): one task per
    micro-panel (``_gemm._pack_b_panel_transposed``)."""
    bt_blocks = bt.reshape(1, bt.shape[0], bt.shape[1])
    for jr in prange(-(-nc // NR)):
        j = jr * NR
        _pack_b_panel_transposed(bt_blocks, ZERO, pc, kc, jc + j, min(NR, nc - j), bp[j * kc : j * kc + kc * NR])


def _gemm_packed(
    ap, m, k, b, b_row0, b_col0, n, c, c_row0, c_col0, accumulate, bp, bt=None, a=None, stream=False, bias=None
):
    """``C (+)= A @ B`` on blocked matrices (see ``_pack_a``), with A (m x k) already packed by ``_pack_a``,
    through a shared panel of B.

    ``B`` is ``b[:, b_row0 : b_row0 + k, b_col0 : b_col0 + n]``, or, given ``bt`` (n x k, C-contiguous; then
    ``b`` is any 3-D array of the dtype and the offsets are 0), ``bt.T``. ``C`` is ``c[:, c_row0 : c_row0 + m,
    c_col0 : c_col0 + n]``. ``bp`` is scratch of ``_packed_b_size(n)`` values. With ``accumulate`` false ``C``
    is overwritten (BLAS beta = 0, applied on the first ``pc`` block only), otherwise added to (beta = 1).

    Given ``a``, a pair ``(blocked matrix, transposed)`` for ``_pack_a``, A is not packed yet: each KC block of
    it is packed into ``ap`` (``_packed_a_size(m, KC)`` values) just before its products. Each block is used
    once per NC columns, so packing a large A whole would write it to memory only to read it back.

    With ``stream``, a C overwritten in one KC block is stored past the caches (:func:`stream_output`), ``bias``
    (per row of C) added where given.
    """
    if bias is not None and not (stream and k <= KC):  # the drivers' own error, not the caller's
        raise ValueError("a bias is added to C by the stores of one streamed KC block only")
    bias = bp[:0] if bias is None else bias
    if k == 0 and not accumulate:
        _zero_columns(c, c_row0, m, c_col0, n)
    no_x, no_taps = no_patches(c.dtype)
    panels, no_pixels = bp.reshape(1, -1), np.empty((1, 3, NR), np.int64)
    for jc in range(0, n, NC):
        nc = min(NC, n - jc)
        for pc in range(0, k, KC):
            kc = min(KC, k - pc)
            if a is not None:
                _pack_a(a[0], ZERO, m, np.int64(pc), np.int64(kc), np.bool_(a[1]), ap)
            if bt is None:
                _pack_b(b, b_row0, b_col0, pc, kc, jc, nc, bp)
            else:
                _pack_b_transposed(bt, pc, kc, jc, nc, bp)
            _macro_kernel(
                ap, m, ZERO if a is not None else pc, kc, SHARED, b, b_row0, no_x, no_taps, 1, 1, 1, 1, ZERO, nc,
                c, c_row0, c_col0 + jc, np.bool_(accumulate or pc > 0), np.bool_(stream and k <= KC), bias, panels,
                no_pixels,
            )  # fmt: skip


#: A GEMM whose A is packed per task is split into a multiple of this many tasks, as equal as can be.
A_TASKS = 8


def a_tasks(m):
    """How many tasks ``m`` rows of an A packed per task make: the fewest multiple of A_TASKS with at most MC rows
    each (2304 rows as 16 tasks of 144, not 9 of 256, which kept a thread of 2 idle for a ninth of the time). By
    shape alone: the results do not depend on the thread count."""
    return -(-m // MC // A_TASKS) * A_TASKS if m > MC else A_TASKS


def a_task_rows(m):
    """Rows of A per task of :func:`_gemm_a_per_task`: ``m`` in :func:`a_tasks` tasks, in whole groups of
    micro-panels (``_gemm.GROUP``: a transposed A is packed a cache line per row of ``a``)."""
    group = GROUP * MR
    return max(group, -(-m // (a_tasks(m) * group)) * group)


@njit(cache=True)
def _a_block(a, transposed, i0, rows, pc, kc, bp, nc, c, c_row0, c_col0, accumulate, ap):
    """``C[i0 : i0 + rows, :nc] (+)= A[i0 : i0 + rows, pc:pc+kc] @ B~`` on the calling thread: rows ``i0 : i0 +
    rows`` of A (``a`` for ``_pack_a``, one KC block) packed into ``ap``, then multiplied by every micro-panel of
    the packed panel ``bp`` of B. ``C`` is ``c[:, c_row0:, c_col0:]``."""
    for t in range(_n_a_panels(rows, kc)):
        _pack_a_panel(a, i0, rows, pc, kc, transposed, ap, t)
    for jr in range(0, nc, NR):
        b_panel = bp[jr * kc : jr * kc + kc * NR]
        _panel_rows(
            ap, rows, ZERO, kc, ZERO, rows, b_panel, PACKED, c, c_row0 + i0, c_col0 + jr, min(NR, nc - jr),
            accumulate, FALSE, no_bias(c),
        )  # fmt: skip


@njit(parallel=PRANGE_ONLY, cache=True)
def _a_block_tasks(a, transposed, m, pc, kc, task_rows, bp, nc, c, c_row0, c_col0, accumulate, a_panels):
    """``C[:, :nc] (+)= A[:, pc:pc+kc] @ B~``, one task per ``task_rows`` rows of A (:func:`_a_block`), each
    packing its rows into its thread's row of ``a_panels``. ``C`` is ``c[:, c_row0 : c_row0 + m, c_col0 :
    c_col0 + nc]``."""
    for task in prange(-(-m // task_rows)):
        i0 = task * task_rows
        rows = min(task_rows, m - i0)
        _a_block(
            a, transposed, i0, rows, pc, kc, bp, nc, c, c_row0, c_col0, accumulate, a_panels[numba.get_thread_id()]
        )


def _gemm_a_per_task(a, transposed, m, k, b, b_row0, b_col0, n, c, c_row0, c_col0, bp):
    """``C = A @ B`` as :func:`_gemm_packed` with ``a`` given, but with A packed by the tasks that use it, a
    block of rows each (:func:`_a_block_tasks`), into cache, rather than by all threads into memory first.

    For an A used once per block of NC columns (the input gradient's Wᵀ in one chunk of more than NC pixels):
    packed whole, it would go to memory and come back.
    """
    if k == 0:
        _zero_columns(c, c_row0, m, c_col0, n)
    task_rows = a_task_rows(m)
    a_panels = per_thread((_packed_a_size(task_rows, KC),), c.dtype, name="task A panels")
    for jc in range(0, n, NC):
        nc = min(NC, n - jc)
        for pc in range(0, k, KC):
            kc = min(KC, k - pc)
            _pack_b(b, b_row0, b_col0, pc, kc, jc, nc, bp)
            args = (a, np.bool_(transposed), m, np.int64(pc), np.int64(kc), np.int64(task_rows), bp, nc, c)
            _a_block_tasks(*args, c_row0, c_col0 + jc, np.bool_(pc > 0), a_panels)


def stream_output(c):
    """Whether the GEMM writing ``c`` should store it past the caches (``config.STREAM_OUTPUT_BYTES``): ``c``
    64-byte aligned (:func:`_scratch.empty_aligned`), as non-temporal stores need, and too large for the
    cores' L2 caches."""
    return c.nbytes >= STREAM_OUTPUT_BYTES and c.ctypes.data % 64 == 0


def _gemm_per_task(ap, m, k, b, b_row0, n, c, c_row0, accumulate, stream=False):
    """``_gemm_packed`` with B read in place (:func:`_plain_b_tasks`), for B and C starting at column 0."""
    if k == 0 and not accumulate:
        _zero_columns(c, c_row0, m, ZERO, n)
        return
    panels, _ = task_scratch(c.dtype)
    bias = ap[:0]
    _plain_b_tasks(ap, m, k, b, b_row0, c, c_row0, np.bool_(accumulate), np.bool_(stream and k <= KC), bias, panels)


#: Most ranges of the shared dimension ``gemm`` splits a product with few tiles of C into (``_k_ranges``).
MAX_K_RANGES = 8


def _k_ranges(m, n, k):
    """Ranges of the shared dimension for ``C = A @ B``: one, unless C has fewer than 4 tiles of MC x NR (one
    task each: a thread or more idle) and K is long, then up to MAX_K_RANGES of 2 KC at least, one task each,
    summed into partial products added in order. By shape alone, so results do not depend on the thread
    count. Measured (float32, 2 threads; numpy.matmul in brackets): 64x64x50000 3.10-3.11 -> 1.42-1.44 ms
    (1.48-1.53), 256x64x8192 1.44-1.50 -> 0.70 (0.69-0.70), 128x128x20000 2.22-2.29 -> 1.88-1.91 (1.91),
    512x32x4096 0.60-0.66 -> 0.48 (0.38), 64x128x4096 0.22 -> 0.19 (0.19-0.20)."""
    if _n_tiles(m, n) >= 4:
        return 1
    return max(1, min(MAX_K_RANGES, k // (2 * KC)))


@njit(parallel=PRANGE_ONLY, cache=True)
def _split_k_tasks(a, b, a_transposed, b_transposed, ap, bp, partial):
    """``partial[i] = A[:, ks_i] @ B[ks_i, :]`` for the ranges ``ks_i`` of the shared dimension, one task each,
    A and B packed by the task into its thread's ``ap`` and ``bp``. ``A`` is ``a``, or ``a.T`` when
    ``a_transposed``; ``B`` likewise."""
    ranges, m, n = partial.shape
    k = a.shape[0] if a_transposed else a.shape[1]
    a_blocks = a.reshape(1, a.shape[0], a.shape[1])
    b_blocks = b.reshape(1, b.shape[0], b.shape[1])
    for i in prange(ranges):
        t = numba.get_thread_id()
        k0, k1 = i * k // ranges, (i + 1) * k // ranges
        c = partial[i : i + 1]
        for pc in range(k0, k1, KC):
            kc = min(KC, k1 - pc)
            _pack_a_serial(a_blocks, ZERO, m, pc, kc, a_transposed, ap[t])
            for jc in range(0, n, NC):
                nc = min(NC, n - jc)
                for jr in range(0, nc, NR):
                    panel = bp[t, jr * kc : jr * kc + kc * NR]
                    if b_transposed:
                        _pack_b_panel_transposed(b_blocks, ZERO, pc, kc, jc + jr, min(NR, nc - jr), panel)
                    else:
                        _pack_b_panel(b_blocks, ZERO, ZERO, pc, kc, jc + jr, min(NR, nc - jr), panel)
                _macro_kernel_serial(ap[t], m, ZERO, kc, bp[t], nc, c, ZERO, jc, pc > k0, FALSE)


def _gemm(a, b, c, a_transposed=False, b_transposed=False):
    """``c = A @ B`` for C-contiguous 2-D arrays of one dtype, ``A`` being ``a`` or, when ``a_transposed``, ``a.T``
    (its rows packed as A's columns: no copy), and ``B`` likewise ``b`` or ``b.T``."""
    m, n = c.shape
    k = a.shape[0] if a_transposed else a.shape[1]
    if k == 0:
        c[...] = 0
        return
    ranges = _k_ranges(m, n, k)
    if ranges > 1:
        partial = scratch("partial products", (ranges, m, n), c.dtype)
        ap = per_thread((_packed_a_size(m, KC),), c.dtype, name="packed A")
        bp = per_thread((_packed_b_size(min(n, NC)),), c.dtype, name="packed B")
        _split_k_tasks(a, b, np.bool_(a_transposed), np.bool_(b_transposed), ap, bp, partial)
        c[...] = partial[0]
        with np.errstate(all="ignore"):  # inf - inf makes NaN here as in the kernels: no warning for it
            for i in range(1, ranges):
                c += partial[i]
        return
    stream = stream_output(c)
    # Blocked matrices of one block each.
    a_blocks, b_blocks, c_blocks = a.reshape(1, *a.shape), b.reshape(1, *b.shape), c.reshape(1, m, n)
    bt = b if b_transposed else None  # then packed into the shared panel by rows of b, in square blocks
    if m > MC:  # A packed a KC block at a time. Measured in one process (float32, 2 threads), against A
        # packed whole first: 512x392x4608 4.6-4.8 -> 4.5-4.6 ms, 1024^3 5.3-5.5 -> 5.1-5.3.
        ap = scratch("packed A block", _packed_a_size(m, KC), c.dtype)
        bp = scratch("shared panel", _packed_b_size(min(n, NC)), c.dtype)
        _gemm_packed(
            ap, m, k, b_blocks, ZERO, ZERO, n, c_blocks, ZERO, ZERO, FALSE, bp, bt, (a_blocks, a_transposed), stream
        )
        return
    ap = scratch("packed A", _packed_a_size(m, k), c.dtype)  # at most MC rows: packed whole, in one launch
    _pack_a(a_blocks, ZERO, m, ZERO, k, np.bool_(a_transposed), ap)
    if b_transposed:
        bp = scratch("shared panel", _packed_b_size(min(n, NC)), c.dtype)
        _gemm_packed(ap, m, k, b_blocks, ZERO, ZERO, n, c_blocks, ZERO, ZERO, FALSE, bp, bt, stream=stream)
    else:
        _gemm_per_task(ap, m, k, b_blocks, ZERO, n, c_blocks, ZERO, FALSE, stream)
