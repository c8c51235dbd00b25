"""Convolution drivers: implicit im2col / col2im around the blocked GEMM, per group and block.

The forward and input-gradient drivers are Python loops over groups and GEMM blocks (a few kernel calls per
layer): a compiled driver would link and re-optimise every kernel it calls, seconds of compile time for no
speed. The weight gradient's driver is compiled: it runs a parallel loop of serial GEMMs.
Arrays are C-contiguous and of one dtype (float32 or float64); outputs are allocated and initialised by the
caller. ``geometry`` is ``(sh, sw, pt, pl, dh, dw)``. Every GEMM runs over the output pixels of the whole
batch (see ``_im2col.py``), so small images make one wide GEMM. The forward pass and the weight gradient pack
their patches straight from the input (no column buffer); the input gradient's column buffer holds
``rows_per_chunk`` output rows at a time.

With ``Kg = K / groups``, ``Cg = C / groups`` and ``col`` the ``(Cg*R*S) x (N*P*Q)`` patch matrix of one group,
and every image's ``(K, P*Q)`` output side by side as one ``K x N*P*Q`` matrix, the three contractions are::

    # Forward:         [Kg, Cg*R*S] [Cg*R*S, N*P*Q] -> [Kg, N*P*Q]        y  = W @ col
    # Input gradient:  [Cg*R*S, Kg] [Kg, N*P*Q]     -> [Cg*R*S, N*P*Q]    dx = col2im(W.T @ dy)
    # Weight gradient: [Kg, N*P*Q]  [N*P*Q, Cg*R*S] -> [Kg, Cg*R*S]       dW = dy @ col.T (col never built)
"""

import math

import numba
import numpy as np
from numba import njit, prange

from ._gemm import (
    FALSE,
    TRUE,
    ZERO,
    _b_micro_panel,
    _data,
    _macro_kernel_serial,
    _n_tiles,
    _pack_a,
    _pack_a_serial,
    _pack_b_panel_transposed,
    _packed_a_size,
    _packed_b_size,
    _panel_rows,
    _round_up,
    no_bias,
)
from ._im2col import (
    NO_PLANE_SUMS,
    _col2im,
    _col2im_plane,
    _pack_b_patches_transposed,
    _space_to_depth,
    _subsample,
    _tap_table,
    col2im_rows,
    col2im_taps,
    phase_shape,
    transposed_tap_table,
)
from ._macro import (
    GATHERED,
    PATCHES,
    _a_block,
    _gemm_a_per_task,
    _gemm_packed,
    _macro_kernel,
    _pack_b,
    _plain_b_tasks,
    a_tasks,
    packs_per_task,
    stream_output,
    task_scratch,
)
from ._parallel import PRANGE_ONLY
from ._scratch import per_thread, scratch
from ._shifted import (
    WIDE_TILE_PIXELS,
    _outer_forward,
    _pad_phases,
    _pixel_major,
    _shifted_gemm,
    _shifted_gemm_staged,
    _shifted_weight_grad,
    outer_pays,
    outer_tile,
    padded_shape,
    shifted_pays,
    staged_rows,
    tap_offsets,
    weight_grad_tile,
)
from ._simd import _store_fence, _transposed_block
from .config import (
    COLUMN_BUFFER_BYTES,
    GATHER_MAX_WIDTH,
    KC,
    MR,
    NC,
    NR,
    SWAPPED_MAX_PIXELS,
    SWAPPED_MIN_WEIGHT_BYTES,
    WEIGHT_GRAD_CHUNKS,
)

#: Weights of at most this many values are packed on the calling thread (``_pack_weights``).
SERIAL_PACK_VALUES = 2**14

#: Packed weights beyond this many bytes are packed a KC block at a time by the forward pass's per-task GEMM,
#: just before the block's products: packed whole first, they went to memory only to be read back. Measured in
#: one process, alternating (float32, 2 threads): 8x256x8x8 -> 512 4x4 s2 (conv_transpose2d_backward's input
#: gradient of the DCGAN layer, 8 MiB of weights) 1.85-2.02 -> 1.72-1.81 ms, 8x256x14x14 -> 512 3x3 s2
#: 3.15-3.34 -> 2.99-3.08, 8x512x7x7 3x3 by GEMM 5.56-5.71 -> 5.09-5.27; weights of 1.2-2.3 MiB unchanged.
A_BLOCK_BYTES = 2 * 2**20


def _pack_weights(weight, groups, transposed):
    """Pack each group's weight matrix ``[Kg, Cg*R*S]`` (or its transpose) as the GEMM's A, once per call."""
    K, Cg, R, S = weight.shape
    Kg = K // groups
    crs = Cg * R * S
    w_mat = weight.reshape(groups, Kg, crs)
    m, k = (crs, Kg) if transposed else (Kg, crs)
    ap = scratch("packed weights", (groups, _packed_a_size(m, k)), weight.dtype)
    # A few thousand values are packed sooner than a parallel loop's threads wake up (8 us a call).
    pack = _pack_a_serial if ap.size <= SERIAL_PACK_VALUES else _pack_a
    for g in range(groups):
        pack(w_mat[g : g + 1], ZERO, m, ZERO, k, np.bool_(transposed), ap[g])
    return ap


def _pointwise(R, S, geometry, P, Q, x):
    """Whether a convolution is 1x1, stride 1 and unpadded onto a same-sized output: its patch matrix is ``x``
    itself. (conv_transpose2d's input gradient can ask for fewer output rows than the input has: not then.)"""
    return R == S == 1 and geometry[:4] == (1, 1, 0, 0) and (P, Q) == x.shape[2:]


def patchify(R, S, geometry, P, Q, H, W):
    """Whether a convolution is a "patchify" layer (ViT's 16x16 s16, ConvNeXt's 4x4 s4, a 2x2 s2 down-sampling):
    a filter the size of the stride, unpadded, undilated, over a whole number of strides, so that each input
    pixel is read once and the patch matrix is the input's stride phases (space-to-depth)."""
    return (R, S) == tuple(geometry[:2]) != (1, 1) and tuple(geometry[2:]) == (0, 0, 1, 1) and (P * R, Q * S) == (H, W)


def subsampled_1x1(R, S, geometry, P, Q, H, W):
    """Whether a 1x1 layer's outputs read pixels of x alone, every sh-th row and sw-th column from the first: no
    padding before x, and none of the padding after it (asymmetric padding) read, so that those pixels, copied
    together (``_subsample``), are its patch matrix."""
    sh, sw, pt, pl = geometry[:4]
    return R == S == 1 and (pt, pl) == (0, 0) and (P - 1) * sh < H and (Q - 1) * sw < W


def _column_buffer(crs, rows_per_chunk, n_rows, Q, dtype):
    """The column buffer of a chunk, as a blocked matrix of one block, and the rows per chunk it allows."""
    rows = min(rows_per_chunk, n_rows)
    return scratch("column buffer", (1, crs, rows * Q), dtype), rows


def _conv2d_forward(x, weight, geometry, groups, accumulate, y, bias=None):
    """``y (+)= conv2d(x, weight)``: x (N, C, H, W), weight (K, Cg, R, S), y (N, K, P, Q).

    With ``accumulate`` the result is added to ``y`` (which holds the bias); without, ``y`` is overwritten and
    need not be initialised (it must have C * R * S > 0 then). Given ``bias`` (K values, not with
    ``accumulate``), ``y = bias + conv2d``: added by the stores of an output streamed past the caches, else
    stored first and added to, as with ``accumulate``.

    Implicit im2col: the patch matrix is packed straight from ``x``, one micro-panel per task (``_macro.py``),
    so the only scratch is one packed micro-panel per thread, whatever the image size, and, for a strided layer
    with output rows too wide to gather, its input split into stride phases, a block of images at a time.
    Measured (float32, 2 threads), phases against patches read at the stride: 8x3x224x224 7x7 s2 7.7 -> 6.6
    ms, 8x64x112x112 3x3 s2 9.7 -> 8.7 ms, 8x64x56x56 3x3 s2 3.2 -> 3.0 ms; 28-pixel inputs unchanged. (The
    weight gradient's transposed packer gained nothing from them: 3-8 % slower with the split.)
    """
    N = x.shape[0]
    K, Cg, R, S = weight.shape
    _, _, P, Q = y.shape
    if subsampled_1x1(R, S, geometry, P, Q, *x.shape[2:]) and geometry[:2] != (1, 1):
        # A strided, unpadded 1x1 convolution reads every sh-th row and sw-th column only: those pixels, copied
        # together (at most a quarter of x at stride 2), make it a stride-1 one, a plain GEMM with no gather.
        sh, sw = geometry[:2]
        subsampled = scratch("subsampled input", (N, x.shape[1], P, Q), y.dtype)
        _subsample(x, np.int64(sh), np.int64(sw), subsampled)
        x = subsampled
        geometry = (1, 1, 0, 0, 1, 1)  # a 1x1 kernel has no dilation to speak of
    Kg = K // groups
    crs = Cg * R * S
    y_blocks = y.reshape(N, K, P * Q)
    # Written in one KC block, or the next would read it back; not where it holds the bias already.
    stream = stream_output(y) and crs <= KC and not accumulate
    pointwise = _pointwise(R, S, geometry, P, Q, x)  # the patch matrix is x: packed as a plain matrix
    x_blocks = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    path = "plain GEMM" if pointwise and not packs_per_task(Kg, patches=False) else "GEMM"
    if path == "GEMM" and outer_pays(geometry, weight.shape, groups, Q, y.itemsize):
        path = "outer"
    elif path == "GEMM" and shifted_pays(geometry, x.shape, weight.shape, groups, P, Q, y.dtype):
        path = "shifted"
    staged = staged_rows(N, P, Q, Kg, y.itemsize) if path == "shifted" and stream_output(y) and not accumulate else 0
    # The bias is added by the stores of a streamed output (of a staged one, on the padded-input path).
    stores_add_bias = staged > 0 if path == "shifted" else stream and path != "outer"
    if bias is not None and not stores_add_bias:
        y[...] = bias.reshape(1, -1, 1, 1)  # stored first, then added to
        bias, accumulate, stream = None, True, False
    if path == "plain GEMM":
        ap = _pack_weights(weight, groups, False)
        bp = scratch("shared panel", _packed_b_size(N * P * Q), y.dtype)
        for g in range(groups):
            _gemm_packed(
                ap[g], Kg, crs, x_blocks, g * Cg, ZERO, N * P * Q, y_blocks, g * Kg, ZERO, accumulate, bp,
                stream=stream, bias=bias,
            )  # fmt: skip
        return
    if path == "outer":
        _conv2d_outer(x, weight, geometry, groups, accumulate, y)
        return
    if path == "shifted":
        ap = _pack_weights(weight, groups, False)
        _conv2d_shifted(x, ap, Kg, crs, geometry, R, S, groups, accumulate, y, staged, bias)
        return
    bias = y_blocks[0, 0, :0] if bias is None else bias
    panels, pixel_tables = task_scratch(y.dtype)
    patches = GATHERED if Q <= GATHER_MAX_WIDTH else PATCHES
    no_b = np.empty((0, 0, 0), y.dtype)  # the macro-kernel's B: its patches, not a plain matrix
    sh, sw = geometry[:2]
    # A patchify layer's patch matrix is its input's stride phases themselves: a plain GEMM like a 1x1 layer's.
    patchify_layer = patchify(R, S, geometry, P, Q, *x.shape[2:])
    # Other strided patches are read from the input's stride phases, at stride 1, a block of images at a time
    # that fits the column buffer; an image too large for it alone has its patches read at the stride.
    image_phases = math.prod(phase_shape((1, *x.shape[1:]), sh, sw)) * y.itemsize
    split = (patchify_layer or patches == PATCHES) and (sh, sw) != (1, 1) and image_phases <= COLUMN_BUFFER_BYTES
    plain = pointwise or (patchify_layer and split)
    images = min(N, COLUMN_BUFFER_BYTES // image_phases) if split else N
    stride = (1, 1) if split else (sh, sw)
    # Weights larger than a core's L2 are packed a KC block at a time, just before the block's products (as
    # gemm packs A): packed whole first, they went to memory only to be read back.
    by_blocks = not plain and _packed_a_size(Kg, crs) * groups * y.itemsize > A_BLOCK_BYTES
    if by_blocks:
        w_mat = weight.reshape(groups, Kg, crs)
        ap = scratch("packed weights block", (1, _packed_a_size(Kg, min(KC, crs))), y.dtype)
    else:
        ap = _pack_weights(weight, groups, False)
    for n0 in range(0, N, images):
        n1 = min(N, n0 + images)
        block_x = x[n0:n1]
        if split:
            block_x = scratch("stride phases", phase_shape(block_x.shape, sh, sw), y.dtype)
            _space_to_depth(x[n0:n1], np.int64(sh), np.int64(sw), block_x, NO_PLANE_SUMS)
        for g in range(groups):
            if plain:  # rows of the patch matrix are channels of block_x, group g's from g * Cg * R * S: in place
                b = block_x.reshape(n1 - n0, block_x.shape[1], block_x.shape[2] * block_x.shape[3])
                args = (ap[g], Kg, crs, b, g * crs, y_blocks[n0:n1], g * Kg, np.bool_(accumulate), stream, bias)
                _plain_b_tasks(*args, panels)
                continue
            for pc in range(0, crs, KC):
                kc = min(KC, crs - pc)
                taps = _tap_table(g * Cg, R, S, geometry, Q, block_x.shape[3], pc, kc, split)
                if by_blocks:  # only the patches' tap table and A's panels depend on pc then
                    _pack_a(w_mat[g : g + 1], ZERO, Kg, np.int64(pc), np.int64(kc), FALSE, ap[0])
                a, a_pc = (ap[0], ZERO) if by_blocks else (ap[g], pc)
                _macro_kernel(
                    a, Kg, a_pc, kc, patches, no_b, ZERO, block_x, taps, *stride, P, Q, ZERO, (n1 - n0) * P * Q,
                    y_blocks[n0:n1], g * Kg, ZERO, bool(accumulate or pc > 0), stream, bias, panels, pixel_tables,
                )  # fmt: skip


def _padded_blocks(x, geometry, Hp, Wp, image_bytes):
    """``(n0, n1, xp)`` for each block of images of ``x``, as many as the column buffer holds at
    ``image_bytes`` per image (one at least): ``xp`` their padded stride phases (``_shifted._pad_phases``),
    in scratch both drivers of ``_shifted.py`` share."""
    N, C, _, _ = x.shape
    sh, sw, pt, pl, _, _ = geometry
    images = max(1, min(N, COLUMN_BUFFER_BYTES // image_bytes))
    for n0 in range(0, N, images):
        n1 = min(N, n0 + images)
        xp = scratch("padded input", (n1 - n0) * C * sh * sw * Hp * Wp + NR, x.dtype)
        _pad_phases(x[n0:n1], *(np.int64(v) for v in (pt, pl, sh, sw, Hp, Wp)), xp)
        yield n0, n1, xp


def _conv2d_shifted(x, ap, Kg, crs, geometry, R, S, groups, accumulate, y, staged, bias):
    """The forward pass by ``_shifted.py``: the input's padded stride phases made a block of images at a time
    (as many as fill the column buffer), each block one parallel GEMM per group with B read from them. With
    ``staged`` rows (``_shifted.staged_rows``), a task per block of that many output rows of an image, staged
    and streamed out, ``bias`` (if not None) added on the way."""
    C = x.shape[1]
    _, _, P, Q = y.shape
    sh, sw = geometry[:2]
    Hp, Wp = padded_shape(P, Q, R, S, geometry)
    plane, planes = Hp * Wp, C * sh * sw  # planes per image
    offsets = tap_offsets(C // groups, R, S, Hp, Wp, geometry)
    if staged:
        staging = per_thread((Kg * staged * Q,), y.dtype, name="shifted staging")
        bias = staging[0, :0] if bias is None else bias
        for n0, n1, xp in _padded_blocks(x, geometry, Hp, Wp, planes * plane * y.itemsize):
            for g in range(groups):
                _shifted_gemm_staged(
                    ap[g], Kg, crs, xp, np.int64(planes), np.int64(plane), np.int64(g * planes // groups), offsets,
                    np.int64(Wp), y[n0:n1], np.int64(g * Kg), np.int64(staged), staging, bias,
                )  # fmt: skip
        return
    for n0, n1, xp in _padded_blocks(x, geometry, Hp, Wp, planes * plane * y.itemsize):
        for g in range(groups):
            _shifted_gemm(
                ap[g], Kg, crs, xp, np.int64(planes), np.int64(plane), np.int64(g * planes // groups), offsets,
                np.int64(Wp), y[n0:n1], np.int64(g * Kg), np.bool_(accumulate),
            )  # fmt: skip


def _conv2d_outer(x, weight, geometry, groups, accumulate, y):
    """The forward pass by outer products (``_shifted._outer_forward``), at a row stride of 2: the filters tap by
    tap, each tap's side by side (``_pixel_major``), and the input padded (not split into stride phases), a
    block of images at a time."""
    C = x.shape[1]
    K, Cg, R, S = weight.shape
    _, _, P, Q = y.shape
    sh, sw, pt, pl, dh, dw = geometry
    pixels = outer_tile(Q)
    if sw != 2 or Q < pixels:
        raise ValueError(f"outer products take a row stride of 2 and rows of {pixels} pixels at least, not {sw}, {Q}")
    crs, width = Cg * R * S, 2 * (64 // y.itemsize)
    wt = scratch("filters by tap", (1, crs, groups * _round_up(K // groups, width)), y.dtype)
    _pixel_major(weight.reshape(1, K, crs), groups, wt)
    Hp, Wp = (P - 1) * sh + dh * (R - 1) + 1, (Q - 1) * sw + dw * (S - 1) + 1
    padding = (1, 1, pt, pl, dh, dw)
    taps = tap_offsets(Cg, R, S, Hp, Wp, padding)
    tiles = per_thread((WIDE_TILE_PIXELS * width,), y.dtype, name="outer tiles")
    for n0, n1, xp in _padded_blocks(x, padding, Hp, Wp, C * Hp * Wp * y.itemsize):
        _outer_forward(
            xp, np.int64(C * Hp * Wp), np.int64(Cg * Hp * Wp), taps, wt[0], np.int64(Wp), np.int64(sh),
            np.int64(pixels), np.int64(groups), np.bool_(accumulate), tiles, y[n0:n1],
        )  # fmt: skip


def _conv2d_weight_shifted(x, grad_output, geometry, groups, grad_weight, layout):
    """``grad_weight = conv2d_weight(x, grad_output)`` by ``_shifted.py``: the patches read from the input's
    padded stride phases, the output gradient pixel by pixel (``_pixel_major``), a block of images at a time
    (each buffer bounded by the column buffer), as ``layout`` (of ``_shifted.weight_grad_layout``) says. Tasks
    of a fixed number of output rows, or of whole small images, sum into partial gradients of their own, added
    in order: the result depends on the shape alone.
    """
    N, C, _, _ = x.shape
    _, K, P, Q = grad_output.shape
    _, Cg, R, S = grad_weight.shape
    Kg, crs = K // groups, Cg * R * S
    sh, sw = geometry[:2]
    Hp, Wp, rows, blocks, images, filters, image_bytes = layout
    plane, planes = Hp * Wp, C * sh * sw
    offsets = tap_offsets(Cg, R, S, Hp, Wp, geometry)
    taps, width = weight_grad_tile(filters, x.itemsize)
    tiles = (-(-crs // taps), filters // width, taps * width)
    sums = scratch("weight gradient sums", (groups, *tiles), grad_weight.dtype, zeros=True)
    dy_blocks = grad_output.reshape(N, K, P * Q)
    for n0, n1, xp in _padded_blocks(x, geometry, Hp, Wp, image_bytes):
        dyt = scratch("pixel-major output gradient", (n1 - n0, P * Q, groups * filters), x.dtype)
        _pixel_major(dy_blocks[n0:n1], groups, dyt)
        partial = scratch("partial sums", (-(-(n1 - n0) // images) * blocks, groups, *tiles), x.dtype)
        _shifted_weight_grad(
            xp, np.int64(planes * plane), np.int64(planes // groups * plane), offsets, dyt, np.int64(Wp),
            np.int64(P), np.int64(Q), np.int64(rows), np.int64(images), partial,
        )  # fmt: skip
        with np.errstate(all="ignore"):  # inf - inf makes NaN here as in the kernels: no warning for it
            for task in range(partial.shape[0]):  # in order: the same sums whatever the thread count
                sums += partial[task]
    # (g, tap tile, filter tile, tap, filter) -> (g, filter, tap)
    by_filter = sums.reshape(groups, tiles[0], tiles[1], taps, width).transpose(0, 2, 4, 1, 3)
    by_filter = by_filter.reshape(groups, tiles[1] * width, tiles[0] * taps)
    grad_weight.reshape(groups, Kg, crs)[...] = by_filter[:, :Kg, :crs]


def _conv2d_input(grad_output, weight, geometry, groups, rows_per_chunk, grad_input):
    """``grad_input += conv2d_input(grad_output, weight)``; grad_input (N, C, H, W) holds zeros on entry."""
    N, K, P, Q = grad_output.shape
    _, Cg, R, S = weight.shape
    Kg = K // groups
    crs = Cg * R * S
    col, rows = _column_buffer(crs, rows_per_chunk, N * P, Q, grad_input.dtype)
    dy_blocks = grad_output.reshape(N, K, P * Q)
    w_mat = weight.reshape(groups, Kg, crs)
    # In one chunk, each value of W.T is used for one block of columns: packed by the tasks that use it, into
    # cache, rather than into memory first (``_macro._gemm_a_per_task``). Measured in one process, alternating
    # (float32, 2 threads, ms): conv_transpose2d 8x512x4x4 -> 256 4x4 s2 (8 MiB of weights) 2.29 -> 1.86, 8x256x7x7
    # -> 128 3x3 s2 0.89 -> 0.80; conv2d_input 8x128x28x28 <- 256 3x3 s2 2.87 -> 2.64, 4x8x16x16 <- 16 3x3 s2 0.072
    # -> 0.070. In chunks, A would be packed once per chunk: 1x64x256x256 <- 64 7x7 s2 d2 29.6 -> 30.8.
    # With at most NC pixels, a task owns whole channels and adds its rows of col back into them at once
    # (``_input_grad_tasks``): col is not written to memory and read back, often by the other thread. Against the
    # GEMM, then col2im: 8x512x4x4 -> 256 2.24 -> 1.89 ms, 8x256x7x7 -> 128 3x3 s2 1.25 -> 0.93, 8x512x7x7 -> 256
    # 3x3 s2 3.82 -> 2.95, 2x8x8x8 -> 4 3x3 s2 0.057 -> 0.053.
    one_chunk = rows >= N * P
    ap = None if one_chunk else _pack_weights(weight, groups, True)
    sh, sw, pt, pl, dh, dw = geometry
    W = grad_input.shape[3]
    taps = col2im_taps(S, Q, W, sw, pl, dw)
    row_counts, row_pairs = col2im_rows(R, grad_input.shape[2], P, sh, pt, dh)
    # Each phase row padded by a cache line at least: two threads never write into one line.
    phase_rows = per_thread((sw, _round_up(-(-W // sw), 16) + 16), grad_input.dtype, name="phase rows")
    # Few pixels, large W: W as B, read from its rows (_input_grad_swapped_tasks).
    if one_chunk and N * P * Q <= SWAPPED_MAX_PIXELS and weight.nbytes >= SWAPPED_MIN_WEIGHT_BYTES:
        task_rows = channel_task_rows(Cg, R * S)
        n = N * P * Q
        ap = scratch("pixels packed", _packed_a_size(n, Kg), grad_input.dtype)
        b_panels = per_thread((KC * NR,), grad_input.dtype, name="task B panel")
        tiles = per_thread((_round_up(n, MR) * NR,), grad_input.dtype, name="task tiles")
        for g in range(groups):
            dy_t = np.ascontiguousarray(dy_blocks[:, g * Kg : (g + 1) * Kg].transpose(1, 0, 2)).reshape(1, Kg, n)
            (_pack_a_serial if ap.size <= SERIAL_PACK_VALUES else _pack_a)(dy_t, ZERO, n, ZERO, Kg, TRUE, ap)
            args = (w_mat[g : g + 1], ap, n, col, np.int64(task_rows), b_panels, tiles, R, S, geometry, P, Q)
            _input_grad_swapped_tasks(*args, grad_input, np.int64(g * Cg), row_counts, row_pairs, taps, phase_rows)
        return
    if one_chunk and N * P * Q <= NC:
        task_rows = channel_task_rows(Cg, R * S)
        a_panels = per_thread((_packed_a_size(task_rows, KC),), grad_input.dtype, name="task A panels")
        n = N * P * Q
        panels = scratch("shared panels", (-(-Kg // KC), _packed_b_size(n)), grad_input.dtype)
        for g in range(groups):
            for pc in range(0, Kg, KC):
                _pack_b(dy_blocks, g * Kg, ZERO, pc, min(KC, Kg - pc), ZERO, n, panels[pc // KC])
            args = (w_mat[g : g + 1], panels, n, col, np.int64(task_rows), a_panels, R, S, geometry, P, Q, grad_input)
            _input_grad_tasks(*args, np.int64(g * Cg), row_counts, row_pairs, taps, phase_rows)
        return
    bp = scratch("shared panel", _packed_b_size(rows * Q), grad_input.dtype)
    for g in range(groups):
        for t0 in range(0, N * P, rows):
            t1 = min(N * P, t0 + rows)
            n = (t1 - t0) * Q
            if one_chunk:
                _gemm_a_per_task(w_mat[g : g + 1], True, crs, Kg, dy_blocks, g * Kg, t0 * Q, n, col, ZERO, ZERO, bp)
            else:
                _gemm_packed(ap[g], crs, Kg, dy_blocks, g * Kg, t0 * Q, n, col, ZERO, ZERO, FALSE, bp)
            _col2im(col[0], R, S, geometry, t0, t1, P, Q, grad_input, g * Cg, row_counts, row_pairs, taps, phase_rows)


def channel_task_rows(Cg, taps):
    """Rows of W.T (``taps`` per channel) per task of ``_input_grad_tasks``: whole channels, in about
    ``_macro.a_tasks`` tasks, a whole number of micro-panels where the channels allow."""
    channels = -(-Cg // a_tasks(Cg * taps))
    whole = MR // math.gcd(taps, MR)  # channels whose taps fill whole micro-panels
    if channels > whole:
        channels = -(-channels // whole) * whole
    return channels * taps


@njit(parallel=PRANGE_ONLY, cache=True)
def _input_grad_tasks(
    w_mat, panels, n, col, task_rows, a_panels, R, S, geometry, P, Q, grad_input, c0, row_counts, row_pairs, taps,
    phase_rows,
):  # fmt: skip
    """``grad_input[:, c0 : c0 + Cg] += col2im(W.T @ dy)`` for one group in one chunk (all ``n`` output pixels of
    the batch), one task per ``task_rows`` rows of W.T (whole channels, ``channel_task_rows``): the task packs
    its rows of W.T (``w_mat``, the group's ``(1, Kg, Cg*R*S)`` filters) into its thread's ``a_panels``, multiplies
    them by dy (``panels[i]``: KC block ``i`` of its rows, packed by ``_macro._pack_b``) into its rows of ``col``,
    then adds those back into its channels of ``grad_input`` (``_col2im_plane``) while they are in its cache.

    Each channel of ``grad_input`` is written by one task, every sum in ``_col2im``'s order: the same bits as the
    GEMM and col2im one after the other, whatever the number of threads.
    """
    crs, Kg = w_mat.shape[2], w_mat.shape[1]
    for task in prange(-(-crs // task_rows)):
        i0 = task * task_rows
        rows = min(task_rows, crs - i0)
        thread = numba.get_thread_id()
        for pc in range(0, Kg, KC):
            _a_block(w_mat, TRUE, i0, rows, pc, min(KC, Kg - pc), panels[pc // KC], n, col, ZERO, ZERO, pc > 0,
                     a_panels[thread])  # fmt: skip
        _add_back_channels(col, i0, rows, R, S, geometry, P, Q, grad_input, c0, row_counts, row_pairs, taps,
                           phase_rows[thread])  # fmt: skip


@njit(cache=True, inline="always")
def _add_back_channels(col, i0, rows, R, S, geometry, P, Q, grad_input, c0, row_counts, row_pairs, taps, phase_rows):
    """The rows ``i0 : i0 + rows`` of ``col`` (whole channels of R * S taps) added back into those channels of
    ``grad_input`` from ``c0``, image by image (``_col2im_plane``): the end of a task of the input gradient."""
    N = grad_input.shape[0]
    for c in range(i0 // (R * S), (i0 + rows) // (R * S)):
        for image in range(N):
            _col2im_plane(col[0], R, S, geometry, ZERO, N * P, P, Q, grad_input, c0, image, c, ZERO, np.int64(1),
                          row_counts, row_pairs, taps, phase_rows)  # fmt: skip


@njit(cache=True)
def _transpose_tile(tiles, start, n, n_valid, col, j0):
    """``col[0, j0 + j, i] = tiles.flat[start + i * NR + j]`` for ``i < n``, ``j < n_valid``: square blocks of
    ``lanes`` by ``_simd._transposed_block``, the rest value by value."""
    lanes = 64 // col.itemsize
    length = col.shape[2]
    source, target = _data(tiles), _data(col)
    whole_i, whole_j = n - n % lanes, n_valid - n_valid % lanes
    for j in range(0, whole_j, lanes):
        for i in range(0, whole_i, lanes):
            _transposed_block(target, (j0 + j) * length + i, length, source, start + i * NR + j, NR, lanes)
    for j in range(n_valid):
        first = whole_i if j < whole_j else 0
        for i in range(first, n):
            target[(j0 + j) * length + i] = source[start + i * NR + j]


@njit(parallel=PRANGE_ONLY, cache=True)
def _input_grad_swapped_tasks(
    w_mat, ap, n, col, task_rows, b_panels, tiles, R, S, geometry, P, Q, grad_input, c0, row_counts, row_pairs, taps,
    phase_rows,
):  # fmt: skip
    """``_input_grad_tasks`` with the roles of the GEMM's operands swapped, for few output pixels
    (``config.SWAPPED_MAX_PIXELS``): ``colᵀ = dyᵀ @ W``, dyᵀ (the ``n`` pixels by Kg, packed by ``_pack_a`` into
    ``ap``) as A, the task's columns of W as B, a micro-panel of NR taps at a time read from W's rows where they lie
    (float32; else, and a last one of fewer taps, packed into the thread's ``b_panels``: no transposed packing
    either way), multiplied into the thread's ``tiles`` (pixels by NR), then transposed into the task's rows of
    ``col`` (``_transpose_tile``) and added back into its channels. The same products summed in the same order as
    ``_input_grad_tasks``: the same bits."""
    crs, Kg = w_mat.shape[2], w_mat.shape[1]
    m_pad = _round_up(n, MR)
    for task in prange(-(-crs // task_rows)):
        i0 = task * task_rows
        rows = min(task_rows, crs - i0)
        thread = numba.get_thread_id()
        panel = b_panels[thread]
        tile = tiles[thread, : m_pad * NR].reshape((1, m_pad, NR))
        for j0 in range(i0, i0 + rows, NR):
            n_valid = min(NR, i0 + rows - j0)
            for pc in range(0, Kg, KC):
                kc = min(KC, Kg - pc)
                b_panel, b_stride = _b_micro_panel(w_mat, ZERO, pc, kc, j0, n_valid, panel, tile)
                _panel_rows(
                    ap, n, pc, kc, ZERO, n, b_panel, b_stride, tile, ZERO, ZERO, n_valid, pc > 0, FALSE, no_bias(tile)
                )
            _transpose_tile(tiles, thread * tiles.shape[1], n, n_valid, col, j0)
        _add_back_channels(col, i0, rows, R, S, geometry, P, Q, grad_input, c0, row_counts, row_pairs, taps,
                           phase_rows[thread])  # fmt: skip


def _weight_grad_split(Kg, crs, groups, pixels):
    """``(pixel_ranges, column_ranges)``: how the weight gradient's work is split into tasks.

    The gradient ``dW = dy @ col.T`` is ``Kg x Cg*R*S`` per group, summed over every output pixel. A wide one
    (Kg = 512 filters of Cg*R*S = 4608 taps) is split by its columns: each task owns a range of columns of
    dW, summed over all pixels. A narrow one (Kg = 64 filters of 576 taps) has too few columns to share, so
    the pixels are split into ranges of at least KC, each task summing its range into a partial gradient of
    its own, where there are pixels for 4 ranges at least; with fewer, by columns after all (3 ranges of
    pixels kept a thread of 2 idle a third of the time: 8x128x28x28 -> 256 3x3 s2 3.29 -> 2.34 ms; 1 range, the
    whole: 4x128x14x14 -> 128 1.29 -> 0.69 ms). Up to WEIGHT_GRAD_CHUNKS tasks either way; depends on the
    shape alone, so the result does not depend on the thread count.
    """
    if groups * _n_tiles(Kg, min(crs, NC)) >= 4 * WEIGHT_GRAD_CHUNKS or pixels < 4 * KC:
        return 1, min(WEIGHT_GRAD_CHUNKS, -(-crs // NR))
    return min(WEIGHT_GRAD_CHUNKS, pixels // KC), 1


def _conv2d_weight(x, grad_output, geometry, groups, grad_weight):
    """``grad_weight = conv2d_weight(x, grad_output)``; grad_weight (K, Cg, R, S) need not be initialised.

    Split into tasks by ``_weight_grad_split``, one serial GEMM each, in parallel (``_weight_grad_tasks``).
    Partial sums over pixel ranges are added in order at the end. No two threads add into one element and
    the order of every sum is fixed.
    """
    N, K, P, Q = grad_output.shape
    _, Cg, R, S = grad_weight.shape
    Kg = K // groups
    if _pointwise(R, S, geometry, P, Q, x) and Kg < Cg and N * P * Q >= 4 * KC:
        # A pointwise layer's gradient is dy @ x.T, x's channels and dy's in the same roles: computed as its
        # transpose, x @ dy.T, B holds the fewer channels (8x256x56x56 -> 64: 3.28 -> 2.99 ms, 8x512x28x28 ->
        # 128 2.42 -> 2.32). Not with too few pixels for 4 ranges of them, where the columns are split and A,
        # which every column task packs, would be the larger (8x1024x14x14 -> 256: 2.02 against 2.62 ms).
        transposed = np.empty((groups * Cg, Kg, 1, 1), grad_weight.dtype)
        _conv2d_weight(grad_output, x, geometry, groups, transposed)
        grad_weight[...] = transposed.reshape(groups, Cg, Kg).transpose(0, 2, 1).reshape(grad_weight.shape)
        return
    crs = Cg * R * S
    pixel_ranges, column_ranges = _weight_grad_split(Kg, crs, groups, N * P * Q)
    dw = grad_weight.reshape(1, groups, Kg, crs)
    # Each range's first KC block of pixels overwrites its sums: nothing to zero first. One range in one KC block
    # writes each value once, past the caches where large.
    stream = pixel_ranges == 1 and N * P * Q <= KC and stream_output(grad_weight)
    partial = dw if pixel_ranges == 1 else scratch("partial sums", (pixel_ranges, groups, Kg, crs), dw.dtype)
    dy_blocks = grad_output.reshape(N, K, P * Q)
    # Tasks that split the columns each use all of A (dy): packed once, shared, where it fits the column buffer,
    # rather than by every task. Otherwise each task packs its KC blocks of A into its thread's scratch.
    shared_a = pixel_ranges == 1 and column_ranges > 1
    shared_a = shared_a and groups * _packed_a_size(Kg, N * P * Q) * dw.itemsize <= COLUMN_BUFFER_BYTES
    if shared_a:
        ap = scratch("packed output gradient", (groups, _packed_a_size(Kg, N * P * Q)), dw.dtype)
        for g in range(groups):
            _pack_a(dy_blocks, np.int64(g * Kg), Kg, ZERO, N * P * Q, FALSE, ap[g])
    else:
        ap = per_thread((_packed_a_size(Kg, KC),), grad_weight.dtype, name="packed A")
    bp = per_thread((KC * NR,), grad_weight.dtype, name="packed B")
    columns = _plain_columns(x, R, S, geometry, P, Q)
    if columns is None:
        taps = transposed_tap_table(Cg, R, S, geometry, x.shape[2], x.shape[3])
        args = (x, dy_blocks, taps, geometry[0], geometry[1], P, Q, column_ranges, FALSE)
    else:
        args = (columns, dy_blocks, np.empty((3, 0), np.int64), 1, 1, P, Q, column_ranges, TRUE)
    _weight_grad_tasks(*args, np.bool_(shared_a), ap, bp, partial, np.bool_(stream))
    if pixel_ranges > 1:
        dw[0] = partial[0]
        with np.errstate(all="ignore"):  # inf - inf makes NaN here as in the kernels: no warning for it
            for i in range(1, pixel_ranges):
                dw[0] += partial[i]


def _plain_columns(x, R, S, geometry, P, Q):
    """The weight gradient's patch matrix as a plain array, channels by pixels, when it is one: ``x`` itself
    for a 1x1 stride-1 layer; its stride phases (space-to-depth, in scratch) for a patchify layer (filter the
    size of the stride, no padding, no dilation, a whole number of strides) or its subsampled pixels for an
    unpadded strided 1x1 layer, where they fit the column buffer. Else ``None`` (patches gathered)."""
    N, C, H, W = x.shape
    sh, sw = geometry[:2]
    if _pointwise(R, S, geometry, P, Q, x):
        return x
    patchify_layer = patchify(R, S, geometry, P, Q, H, W)
    subsample = subsampled_1x1(R, S, geometry, P, Q, H, W)
    if not (patchify_layer or subsample) or N * C * R * S * P * Q * x.itemsize > COLUMN_BUFFER_BYTES:
        return None
    columns = scratch("plain columns", (N, C * R * S, P, Q), x.dtype)
    if patchify_layer:
        _space_to_depth(x, np.int64(sh), np.int64(sw), columns, NO_PLANE_SUMS)
    else:
        _subsample(x, np.int64(sh), np.int64(sw), columns)
    return columns


@njit(parallel=PRANGE_ONLY, cache=True)
def _weight_grad_tasks(x, dy_blocks, taps, sh, sw, P, Q, column_ranges, plain, shared_a, ap, bp, partial, stream):
    """``partial[i][:, :, cols j] = dy · patches(x)ᵀ`` over pixel range ``i``, for every task ``(i, j)``: the range's
    first KC block of pixels stored, the others added (``partial`` need not be initialised); with ``stream`` (one
    range of at most KC pixels), stored past the caches.

    ``dy_blocks`` is grad_output as (N, K, P*Q); ``partial`` is (pixel_ranges, groups, Kg, Cg*R*S), each a
    blocked matrix whose column ``g * Cg*R*S + c`` is group g's column c; ``taps`` is ``transposed_tap_table`` of one
    group's taps; ``bp`` holds one packed micro-panel of B per thread, ``ap`` one packed KC block of A per
    thread or, with ``shared_a`` (one range of pixels), each group's A packed whole by ``_pack_a``, which every
    task reads. Column ranges start at multiples of NR, so B's micro-panels stay whole. With ``plain``, ``x``
    (N, groups * Cg*R*S, P, Q) is the patch matrix itself, channels by pixels (``_plain_columns``): B, its
    transpose, is packed in square blocks (``_pack_b_panel_transposed``), not gathered.
    """
    pixel_ranges, groups, Kg, crs = partial.shape
    Cg = x.shape[1] // groups
    pixels = dy_blocks.shape[0] * P * Q
    x_blocks = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    for task in prange(pixel_ranges * column_ranges):
        i, j = task // column_ranges, task % column_ranges
        thread = numba.get_thread_id()
        p0, p1 = i * pixels // pixel_ranges, (i + 1) * pixels // pixel_ranges
        c0 = min(crs, _round_up(j * crs // column_ranges, NR))
        c1 = min(crs, _round_up((j + 1) * crs // column_ranges, NR))
        for g in range(groups):
            for pc in range(p0, p1, KC):
                kc = min(KC, p1 - pc)
                if shared_a:  # all of A packed already (then p0 = 0: KC blocks as _pack_a packs them)
                    a, a_pc = ap[g], pc
                else:
                    _pack_a_serial(dy_blocks, g * Kg, Kg, pc, kc, FALSE, ap[thread])
                    a, a_pc = ap[thread], ZERO
                # One micro-panel of B at a time, multiplied by all of A while both are in the L2 cache.
                for jc in range(c0, c1, NR):
                    nc = min(NR, c1 - jc)
                    if plain:
                        _pack_b_panel_transposed(x_blocks, g * crs, pc, kc, jc, nc, bp[thread])
                    else:
                        _pack_b_patches_transposed(x, g * Cg, taps, sh, sw, P, Q, pc, kc, jc, nc, bp[thread])
                    _macro_kernel_serial(
                        a, Kg, a_pc, kc, bp[thread], nc, partial[i], ZERO, g * crs + jc, pc > p0, stream
                    )
        if stream:
            _store_fence()


@njit(parallel=PRANGE_ONLY, fastmath={"contract", "reassoc"}, cache=True)
def _channel_sums(grad_output, grad_bias):
    """``grad_bias[k] = grad_output[:, k].sum()``, in parallel over channels.

    Each plane is summed in the dtype of the result (``reassoc`` lets LLVM vectorise the sum), and the plane
    sums in float64, image by image: the same result whatever the thread count. Measured, 8x256x28x28
    float32: 0.23 ms with ``numpy.sum`` on one thread.
    """
    N, K, P, Q = grad_output.shape
    values = _data(grad_output)
    zero = grad_bias.dtype.type(0)
    for k in prange(K):
        total = 0.0
        for n in range(N):
            start = (n * K + k) * P * Q
            plane = zero
            for o in range(P * Q):
                plane += values[start + o]
            total += plane
        grad_bias[k] = total
