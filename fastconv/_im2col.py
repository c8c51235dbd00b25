"""Patch extraction (im2col) and its adjoint, patch scatter-add (col2im), as Numba kernels.

The patch matrix is never built whole: ``_patch_panel`` (or, on small images, ``_gathered_patch_panel``) and
``_pack_b_patches_transposed`` extract the patches of one GEMM panel at a time, straight into the packed
layout the micro-kernel reads (implicit im2col). ``_col2im`` adds a column buffer of patch gradients back into
the image. They work on a range of output rows (or pixels) of the whole batch: output row ``t`` is row
``p = t % P`` of image ``n = t // P``, so a chunk may span several small images (one wide GEMM instead of many
narrow ones) or part of one large image (a bounded column buffer). ``geometry`` is ``(sh, sw, pt, pl, dh, dw)``:
strides, top and left padding, dilations. The column matrix of channels ``c0:c0+Cg`` has one row per
``(c, r, s)`` and one column per output pixel ``(t - t0, q)``::

    col[(c * R + r) * S + s, (t - t0) * Q + q] = x[n, c0 + c, p * sh - pt + r * dh, q * sw - pl + s * dw]

with zeros where the index falls in the padding.
"""

import functools

import numba
import numpy as np
from numba import njit, prange

from ._gemm import _data
from ._parallel import PRANGE_ONLY
from ._simd import _add_run, _copy_run, _gather_taps, _prefetch
from .config import COL2IM_MIN_TASKS, NR


def _valid_q_range(w_offset, Q, W, sw):
    """The output columns ``q_lo:q_hi`` whose input column ``q * sw + w_offset`` lies inside ``0:W``, for an
    array of tap offsets ``w_offset`` (NumPy: called once per call, outside the kernels)."""
    q_lo = np.maximum(0, -(w_offset // sw))
    q_hi = np.minimum(Q, -((w_offset - W) // sw))
    return q_lo, np.maximum(q_lo, q_hi)


@functools.lru_cache(maxsize=32)
def col2im_taps(S, Q, W, sw, pl, dw):
    """``_col2im``'s table of tap columns: per ``s``, ``(q_lo, q_hi, phase, start)``: the output columns
    ``q_lo:q_hi`` that reach the input, and where the first lands, input column ``start * sw + phase``.
    NumPy, once per shape: two divisions per row and tap in the kernel would cost as much as a short row's adds.
    """
    first = np.arange(S, dtype=np.int64) * dw - pl
    q_lo, q_hi = _valid_q_range(first, Q, W, sw)
    first += q_lo * sw
    return np.stack([q_lo, q_hi, first % sw, first // sw], axis=1)


@functools.lru_cache(maxsize=32)
def col2im_rows(R, H, P, sh, pt, dh):
    """``_col2im``'s table of tap rows: ``(counts, pairs)``, where input row ``h`` receives the taps ``(r, p) =
    pairs[h, :counts[h]]``, in order of ``r``: tap row ``r`` of output row ``p`` (``h == p * sh - pt + r * dh``).
    NumPy, once per shape: a division per row and tap in the kernel costs as much as a short row's adds."""
    r = np.arange(R)
    hp = np.arange(H)[:, None] + pt - r * dh  # p * sh when tap r of some output row p lands on row h
    valid = (hp >= 0) & (hp % sh == 0) & (hp < P * sh)
    order = np.argsort(~valid, axis=1, kind="stable")  # the valid taps first, in order of r
    pairs = np.stack([np.broadcast_to(r, hp.shape), hp // sh], axis=2)
    return valid.sum(axis=1), np.take_along_axis(pairs, order[:, :, None], axis=1)


@njit(parallel=PRANGE_ONLY, cache=True)
def _col2im(col, R, S, geometry, t0, t1, P, Q, x, c0, row_counts, row_pairs, taps, phase_rows):
    """Add the patches in ``col`` (output rows ``t0:t1``) back into ``x[:, c0:c0+Cg]``: the adjoint of im2col.

    Race-free by construction: each task owns whole input rows ``(c, h)`` of one image and gathers into them
    every ``(r, s)`` contribution, in a fixed order, so results do not depend on the number of threads. A task
    is a block of rows of one plane: one parallel loop for the whole chunk, with at least COL2IM_MIN_TASKS
    tasks where there are rows enough (a single-channel image still uses every thread). ``row_counts`` and
    ``row_pairs`` are ``col2im_rows``, ``taps`` is ``col2im_taps``. At a column stride ``sw > 1`` a tap adds to
    every ``sw``-th value of a row, which no vector instruction does: the row is summed split into its ``sw``
    phases, in the calling thread's ``phase_rows`` (scratch, ``(threads, sw, >= ceil(W / sw))``), where every
    tap adds a contiguous run, then interleaved back once. Footprint: none beyond ``x`` and ``phase_rows``.
    """
    Cg = col.shape[0] // (R * S)
    H = x.shape[2]
    n0 = t0 // P
    planes = ((t1 - 1) // P + 1 - n0) * Cg
    blocks = min(H, -(-COL2IM_MIN_TASKS // planes))  # row blocks per plane
    for task in prange(planes * blocks):
        plane, block = task // blocks, task % blocks
        rows = phase_rows[numba.get_thread_id()]
        _col2im_plane(col, R, S, geometry, t0, t1, P, Q, x, c0, n0 + plane // Cg, plane % Cg, block, blocks,
                      row_counts, row_pairs, taps, rows)  # fmt: skip


@njit(cache=True)
def _col2im_plane(col, R, S, geometry, t0, t1, P, Q, x, c0, n, c, block, blocks, row_counts, row_pairs, taps, rows):
    """``_col2im`` of image ``n``, channel ``c`` (of the group), its rows in block ``block`` of ``blocks``, on the
    calling thread, with its phase rows ``rows``."""
    _, C, H, W = x.shape
    sh, sw, pt, pl, dh, dw = geometry
    row_length = rows.shape[1]
    x_data, col_data, rows = _data(x), _data(col), _data(rows)
    p0, p1 = max(t0 - n * P, 0), min(t1 - n * P, P)
    # Only the input rows under the patches of output rows p0:p1 receive anything.
    h_lo = max(0, p0 * sh - pt)
    h_hi = min(H, (p1 - 1) * sh - pt + (R - 1) * dh + 1)
    for h in range(h_lo + block * (h_hi - h_lo) // blocks, h_lo + (block + 1) * (h_hi - h_lo) // blocks):
        start = ((n * C + c0 + c) * H + h) * W
        # Taps add into the row itself at sw == 1, else into the phase rows.
        target, row_start = (x_data, start) if sw == 1 else (rows, 0)
        if sw > 1:
            for j in range(sw * row_length):
                rows[j] = 0
        for k in range(row_counts[h]):
            r, p = row_pairs[h, k, 0], row_pairs[h, k, 1]
            if p < p0 or p >= p1:
                continue
            column = (n * P + p - t0) * Q
            for s in range(S):
                q_lo, q_hi, phase, first = taps[s, 0], taps[s, 1], taps[s, 2], taps[s, 3]
                out = row_start + first if sw == 1 else phase * row_length + first
                _add_run(target, out, col_data, ((c * R + r) * S + s) * col.shape[1] + column + q_lo, q_hi - q_lo)
        if sw == 2:  # interleave the two phases: LLVM vectorises this with shuffles
            for j in range(W // 2):
                x_data[start + 2 * j] += rows[j]
                x_data[start + 2 * j + 1] += rows[row_length + j]
            if W % 2:
                x_data[start + W - 1] += rows[W // 2]
        elif sw > 2:
            for b in range(sw):
                for j in range((W - b + sw - 1) // sw):
                    x_data[start + j * sw + b] += rows[b * row_length + j]


@functools.lru_cache(maxsize=32)
def _tap_table(c0, R, S, geometry, Q, W, pc, kc, phases=False):
    """Taps ``pc:pc+kc`` decoded once (integer division costs more than the copy it indexes):
    ``(channel, h_offset, w_offset, q_valid)`` per tap.

    With ``phases``, the taps of the same convolution read the input split into stride phases by
    ``_space_to_depth`` (``W`` is then a phase's width): as a stride-1 convolution, each tap in one phase.

    NumPy, not a kernel (half a second less to compile), and cached: a training loop asks for the same tables
    on every call. The arrays are shared between calls and never written to.
    """
    sh, sw, pt, pl, dh, dw = geometry
    tap = np.arange(pc, pc + kc, dtype=np.int64)
    channel, h_offset, w_offset = c0 + tap // (R * S), tap // S % R * dh - pt, tap % S * dw - pl
    if phases:  # input row h_offset + p * sh is row h_offset // sh + p of phase h_offset % sh; columns alike
        channel = (channel * sh + h_offset % sh) * sw + w_offset % sw
        h_offset, w_offset, sw = h_offset // sh, w_offset // sw, 1
    q_lo, q_hi = _valid_q_range(w_offset, Q, W, sw)
    return channel, h_offset, w_offset, np.stack([q_lo, q_hi], axis=1)


@njit(parallel=PRANGE_ONLY, cache=True)
def _subsample(x, sh, sw, out):
    """``out[n, c] = x[n, c, ::sh, ::sw]``, cropped to ``out``'s shape: the pixels a strided, unpadded 1x1
    convolution reads, in parallel over planes. Measured, 8x256x56x56 at stride 2 (float32, 2 threads): 0.36 ms,
    against 0.71-0.86 ms for ``numpy.ascontiguousarray`` of the strided view (one thread)."""
    N, C, P, Q = out.shape
    for plane in prange(N * C):
        n, c = plane // C, plane % C
        for p in range(P):
            src, dst = x[n, c, p * sh], out[n, c, p]
            for q in range(Q):
                dst[q] = src[q * sw]


@njit(parallel=PRANGE_ONLY, cache=True)
def _scatter_phase(phase, a, b, sh, sw, x):
    """``x[n, c, a + i * sh, b + j * sw] = phase[n, c, i, j]``: one stride phase written into its place in ``x``
    (one phase of ``_space_to_depth`` undone), in parallel over planes."""
    N, C, Ha, Wb = phase.shape
    for plane in prange(N * C):
        n, c = plane // C, plane % C
        for i in range(Ha):
            source, target = phase[n, c, i], x[n, c, a + i * sh]
            for j in range(Wb):
                target[b + j * sw] = source[j]


@njit(parallel=PRANGE_ONLY, cache=True)
def _scatter_phase_pair(even, odd, a, sh, x):
    """``_scatter_phase`` of the two column phases of row phase ``a`` at a column stride of 2, at once: each row of
    ``x`` they make is written once, whole, interleaving a row of each (a loop LLVM vectorises with shuffles),
    not a value at a time and twice over. ``even`` has ``ceil(W / 2)`` columns, ``odd`` ``W // 2``."""
    N, C, Ha, _ = even.shape
    W = x.shape[3]
    for plane in prange(N * C):
        n, c = plane // C, plane % C
        for i in range(Ha):
            source_even, source_odd, target = even[n, c, i], odd[n, c, i], x[n, c, a + i * sh]
            for j in range(W // 2):
                target[2 * j] = source_even[j]
                target[2 * j + 1] = source_odd[j]
            if W % 2:
                target[W - 1] = source_even[W // 2]


@njit(parallel=PRANGE_ONLY, cache=True)
def _depth_to_space(phases, sh, sw, x):
    """``x[n, c, i * sh + a, j * sw + b] = phases[n, (c * sh + a) * sw + b, i, j]``: ``_space_to_depth`` undone,
    for an ``x`` a whole number of strides in size, in parallel over its planes. A stride-2 row interleaves two
    phase rows, a loop LLVM vectorises with shuffles."""
    N, C, _, _ = x.shape
    _, _, H2, W2 = phases.shape
    for task in prange(N * C):
        n, c = task // C, task % C
        for i in range(H2):
            for a in range(sh):
                target, first = x[n, c, i * sh + a], (c * sh + a) * sw
                if sw == 2:
                    even, odd = phases[n, first, i], phases[n, first + 1, i]
                    for j in range(W2):
                        target[2 * j] = even[j]
                        target[2 * j + 1] = odd[j]
                else:
                    for b in range(sw):
                        source = phases[n, first + b, i]
                        for j in range(W2):
                            target[j * sw + b] = source[j]


def phase_shape(shape, sh, sw):
    """Shape of ``_space_to_depth``'s output for an input of ``shape`` (N, C, H, W)."""
    N, C, H, W = shape
    return N, C * sh * sw, -(-H // sh), -(-W // sw)


#: ``_space_to_depth``'s ``plane_sums`` when no sums are wanted.
NO_PLANE_SUMS = np.empty((0, 0), np.float64)


@njit(parallel=PRANGE_ONLY, fastmath={"contract", "reassoc"}, cache=True)
def _space_to_depth(x, sh, sw, phases, plane_sums):
    """Split ``x`` (N, C, H, W) into its ``sh * sw`` stride phases (space-to-depth), zero-padded to one size:
    ``phases[n, (c * sh + a) * sw + b, i, j] = x[n, c, i * sh + a, j * sw + b]``, 0 past the edge. Where
    ``plane_sums`` (float64, (N, C); else empty) is given, ``plane_sums[n, c]`` is set to the sum of plane
    ``x[n, c]``, a bias gradient read in the same pass rather than in one more over x: each row summed in x's
    dtype (``reassoc`` lets LLVM vectorise it), the rows in float64, in an order fixed by the shape.

    A convolution of stride ``(sh, sw)`` reads every tap from one phase at stride 1 (``_tap_table`` with
    ``phases``): its patches are then copied in contiguous runs, not gathered at a stride, and each input value
    is read once here rather than once per tap. (``_direct._split_phases`` splits one plane at a time, padded,
    for the direct kernel's loops; here the padding stays implicit, in the tap table's valid ranges.)
    """
    N, C, H, W = x.shape
    _, _, H2, W2 = phases.shape
    zero = x.dtype.type(0)
    for task in prange(N * C):
        n, c = task // C, task % C
        total = 0.0
        for a in range(sh):
            plane = (c * sh + a) * sw
            inside_rows = (H - a + sh - 1) // sh  # rows of phase a read from x, the rest zero: no test per row
            for i in range(inside_rows):
                src = x[n, c, i * sh + a]
                row = zero
                if sw == 2:  # deinterleave pairs: LLVM vectorises this with shuffles
                    even, odd = phases[n, plane, i], phases[n, plane + 1, i]
                    for j in range(W // 2):
                        even[j], odd[j] = src[2 * j], src[2 * j + 1]
                        row += src[2 * j] + src[2 * j + 1]
                else:
                    for b in range(sw):
                        dst = phases[n, plane + b, i]
                        inside = (W - b + sw - 1) // sw
                        for j in range(inside):
                            dst[j] = src[j * sw + b]
                            row += src[j * sw + b]
                        for j in range(inside, W2):
                            dst[j] = 0
                total += row
            if sw == 2 and W % 2:
                # An odd width's last column, in a loop of its own: in the loop above, it made that loop 1.5x
                # slower (8x64x56x56 float32, 2 threads, 0.14 -> 0.22 ms).
                for i in range(inside_rows):
                    last = x[n, c, i * sh + a, W - 1]
                    phases[n, plane, i, W2 - 1], phases[n, plane + 1, i, W2 - 1] = last, 0
                    total += last
            for i in range(inside_rows, H2):
                for b in range(sw):
                    phases[n, plane + b, i, :] = 0
        if plane_sums.size:
            plane_sums[n, c] = total


@njit(cache=True)
def _patch_panel(x, taps, sh, sw, P, Q, kc, jc, nc, bp, panel_index):
    """Micro-panel ``panel_index`` of a KC x NC panel of the patch matrix of ``x[:, c0:c0+Cg]``, packed as
    ``_macro._pack_b`` packs B: implicit im2col.

    Rows ``pc:pc+kc`` (taps ``(c, r, s)``) and columns ``jc+jr : jc+jr+NR`` (``jr = panel_index * NR``; output
    pixels of the whole batch, ``(n * P + p) * Q + q``) of the column matrix above, written at
    ``bp[jr * kc :]``, columns past ``nc`` zero. ``taps`` is ``_tap_table(c0, R, S, geometry, Q, W, pc, kc)``,
    made by the caller: a kernel allocates nothing.
    """
    channel, h_offset, w_offset, q_valid = taps
    _, C, H, W = x.shape
    x_data, bp_data = _data(x), _data(bp)
    jr = panel_index * NR
    n_valid = min(NR, nc - jr)
    t = (jc + jr) // Q
    q0 = (jc + jr) % Q
    j = 0
    while j < n_valid:  # one run of columns per output row (n, p) the panel covers
        run = min(n_valid - j, Q - q0)
        n = t // P
        h_base = t % P * sh
        for row in range(kc):
            base = jr * kc + row * NR + j - q0  # bp[base + q] holds output column q of this run
            h = h_base + h_offset[row]
            lo, hi = q0, q0
            if 0 <= h < H:
                lo = min(max(q_valid[row, 0], q0), q0 + run)
                hi = max(min(q_valid[row, 1], q0 + run), lo)
            for q in range(q0, lo):
                bp[base + q] = 0
            if hi > lo:
                offset = w_offset[row]
                # Element loops, not slice assignments: those compile a shape check and its error message.
                if sw == 1:  # contiguous: whole vectors and a masked one, through pointers, as runs are short
                    first = ((n * C + channel[row]) * H + h) * W + offset
                    _copy_run(bp_data, base + lo, x_data, first + lo, hi - lo)
                    # The next micro-panel reads the NR pixels after these, in this same row: each tap reads
                    # its own row, more streams than the hardware prefetcher follows. Measured, float32, 2
                    # threads, eight alternating rounds: 8x3x224x224 7x7 s2 7.6-8.2 -> 6.8-7.7 ms (a slow
                    # period of the machine), 8x64x56x56 -> 128 3x3 s2 3.1-3.8 -> 3.2-3.5 ms.
                    for line in range(0, NR, 16):
                        _prefetch(x_data, first + hi + line)
                elif sw == 2:  # a constant stride LLVM can vectorise with shuffles, not gathers
                    src = x[n, channel[row], h]
                    dst, run_src = bp[base + lo : base + hi], src[2 * lo + offset : 2 * hi + offset]
                    for q in range(hi - lo):
                        dst[q] = run_src[2 * q]
                else:
                    src = x[n, channel[row], h]
                    for q in range(lo, hi):
                        bp[base + q] = src[q * sw + offset]
            for q in range(hi, q0 + run):
                bp[base + q] = 0
        j += run
        t += 1
        q0 = 0
    for row in range(kc):
        for j in range(n_valid, NR):
            bp[jr * kc + row * NR + j] = 0


@njit(cache=True)
def _gathered_patch_panel(x, taps, sh, sw, P, Q, kc, jc, nc, panel, pixel_table):
    """``_patch_panel`` of one panel (output pixels ``jc : jc + nc``, at most NR, written from ``panel[0]``),
    gathered value by value: for small images (``config.GATHER_MAX_WIDTH``).

    ``_patch_panel`` copies one run of pixels per output row and tap, and a short run costs more in bounds than in
    copying: at 7 pixels per row, packing alone takes 4.6 times as long as this (one thread). Here each pixel's
    flat offset in ``x`` (of ``x[n, 0, p * sh, q * sw]``), row and column are decoded once per panel into
    ``pixel_table`` (3 x NR, scratch), and every tap is one row of masked gathers over the panel's NR pixels
    (``_simd._gather_taps``; it was a loop LLVM vectorised into gathers itself, 15-35 % slower end to end).
    """
    channel, h_offset, w_offset, _ = taps
    _, C, H, W = x.shape
    t, q = jc // Q, jc % Q
    n, p = t // P, t % P
    for j in range(NR):
        if j < nc:  # the flat index of x[n, 0, p * sh, q * sw], and that row and column
            pixel_table[0, j], pixel_table[1, j], pixel_table[2, j] = (n * C * H + p * sh) * W + q * sw, p * sh, q * sw
            q += 1
            if q == Q:
                q, p = 0, p + 1
                if p == P:
                    p, n = 0, n + 1
        else:  # past the last pixel: a row no tap reaches, so zeros
            pixel_table[0, j], pixel_table[1, j], pixel_table[2, j] = 0, -(1 << 40), 0
    pixels, tops, lefts = _data(pixel_table[0]), _data(pixel_table[1]), _data(pixel_table[2])
    x_data, panel_data = _data(x), _data(panel)
    for row in range(kc):
        dh, dw = h_offset[row], w_offset[row]
        # The same gather as the transposed packer's, the roles of pixels and taps swapped.
        _gather_taps(panel_data, row * NR, x_data, (channel[row] * H + dh) * W + dw, pixels, tops, lefts, 0, dh, dw,
                     H, W)  # fmt: skip


@functools.lru_cache(maxsize=32)
def transposed_tap_table(Cg, R, S, geometry, H, W):
    """``_pack_b_patches_transposed``'s table: ``(offset, h_offset, w_offset)`` per tap ``(c, r, s)``, as rows of
    one int64 array. Tap ``(c, r, s)`` of output pixel ``(n, p, q)`` reads ``x`` at flat index ``pixel +
    offset``, with ``pixel`` the flat index of ``x[n, c0, p * sh, q * sw]``, when its input pixel ``(p * sh +
    h_offset, q * sw + w_offset)`` lies inside the image. Padded to whole micro-panels with taps no pixel
    reaches (zeros in the panel). NumPy, once per shape; never written to.
    """
    sh, sw, pt, pl, dh, dw = geometry
    tap = np.arange(Cg * R * S, dtype=np.int64)
    channel, h_offset, w_offset = tap // (R * S), tap // S % R * dh - pt, tap % S * dw - pl
    table = np.zeros((3, -(-len(tap) // NR) * NR), np.int64)
    table[1] = -(1 << 40)  # no pixel reaches these rows
    table[:, : len(tap)] = channel * H * W + h_offset * W + w_offset, h_offset, w_offset
    return table


@njit(cache=True)
def _pack_b_patches_transposed(x, c0, taps, sh, sw, P, Q, pc, kc, jc, nc, bp):
    """Pack the transposed patch matrix of ``x[:, c0:c0+Cg]`` into NR-column micro-panels: the weight
    gradient's B.

    Rows ``pc:pc+kc`` are output pixels of the whole batch, ``(n * P + p) * Q + q``; columns ``jc:jc+nc`` are
    taps ``(c, r, s)``: ``B[pixel, tap]`` is ``col[tap, pixel]`` of the column matrix above, read straight
    from ``x``. A panel row holds NR taps of one pixel, which lie anywhere in ``x``: each row is gathered
    (``_simd._gather_taps``, masked where a tap falls in the padding). ``taps`` is ``transposed_tap_table``,
    made by the caller. Columns past ``nc`` hold other taps or zeros (the write-back drops them). Footprint:
    ``kc * round_up(nc, NR)`` values. Serial: the weight gradient runs one per task, inside its own parallel
    loop.
    """
    _, C, H, W = x.shape
    x_data, panels = _data(x), _data(bp)
    offsets, h_offsets, w_offsets = _data(taps[0]), _data(taps[1]), _data(taps[2])
    t = pc // Q
    n, p, q = t // P, t % P, pc % Q  # counted on below, not divided again
    for row in range(kc):
        pixel = ((n * C + c0) * H + p * sh) * W + q * sw
        for jr in range(0, nc, NR):
            _gather_taps(panels, jr * kc + row * NR, x_data, pixel, offsets, h_offsets, w_offsets, jc + jr, p * sh,
                         q * sw, H, W)  # fmt: skip
        q += 1
        if q == Q:
            q, p = 0, p + 1
            if p == P:
                p, n = 0, n + 1
