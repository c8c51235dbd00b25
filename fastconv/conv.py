"""The public convolution functions: validate, normalise, allocate, then call one compiled driver.

conv2d's input gradient is conv_transpose2d's forward, and conv2d's forward is conv_transpose2d's input
gradient; the functions below share the three private helpers ``_forward``, ``_input_grad`` and
``_weight_grad`` and say which role each array plays.
"""

import math

import numpy as np

from . import _validate as v
from ._conv_kernels import (
    _channel_sums,
    _conv2d_forward,
    _conv2d_input,
    _conv2d_weight,
    _conv2d_weight_shifted,
    patchify,
)
from ._direct import conv2d_direct, conv2d_direct_weight, direct_workspace
from ._im2col import _depth_to_space, _scatter_phase, _scatter_phase_pair, _space_to_depth
from ._parallel import run, sized
from ._scratch import empty_aligned
from ._shifted import shifted_weight_grad_pays, weight_grad_layout
from ._winograd import _conv2d_winograd, winograd_applies, winograd_pays, winograd_workspace
from ._winograd_grad import conv2d_weight_winograd, winograd_weight_grad_pays, winograd_weight_grad_workspace
from ._winograd_strided import (
    _conv2d_input_subpixel,
    _conv2d_strided,
    conv2d_weight_strided,
    input_grad_pays,
    input_grad_workspace,
    strided_winograd_applies,
    strided_winograd_pays,
    strided_workspace,
    weight_grad_pays,
    weight_grad_workspace,
)
from .config import (
    COLUMN_BUFFER_BYTES,
    DIRECT_MAX_OUT_PER_GROUP,
    KC,
    NC,
    PHASES_MAX_FILTERS,
    PHASES_MIN_CHANNELS,
    PHASES_MIN_PIXELS,
    PHASES_MIN_POSITIONS,
)

#: What ``conv2d``'s ``algorithm`` accepts.
ALGORITHMS = ("auto", "gemm", "winograd", "direct")

__all__ = [
    "conv2d",
    "conv2d_backward",
    "conv2d_input",
    "conv2d_weight",
    "conv_transpose2d",
    "conv_transpose2d_backward",
]


def _rows_per_chunk(geometry, dtype):
    """Output rows per im2col chunk, so that one column buffer stays within COLUMN_BUFFER_BYTES."""
    _, Cg, R, S = geometry.weight_shape
    Q = geometry.output_shape[3]
    bytes_per_row = dtype.itemsize * max(1, Cg * R * S * Q)
    return max(1, COLUMN_BUFFER_BYTES // bytes_per_row)


def _initial(shape, dtype, bias):
    """An output array holding the bias along axis 1, or zeros."""
    if bias is None:
        return np.zeros(shape, dtype)
    out = empty_aligned(shape, dtype)
    out[...] = bias.astype(dtype).reshape(1, -1, 1, 1)
    return out


def _workspace_bytes(geometry, dtype, direct=False):
    """An upper bound on a driver's scratch memory: column buffer, packed panels and packed weights or, for the
    direct kernel, what its layout of stride phases takes (``_direct.direct_workspace``)."""
    if direct:
        return direct_workspace(geometry, dtype)
    weights = 2 * math.prod(geometry.weight_shape) + KC * NC
    subsampled = math.prod(geometry.output_shape[2:]) * math.prod(geometry.input_shape[:2])  # strided 1x1 input
    return 2 * COLUMN_BUFFER_BYTES + dtype.itemsize * (weights + subsampled)


def _choose_algorithm(algorithm, geometry):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, but got algorithm={algorithm!r}")
    if algorithm == "winograd" and not (winograd_applies(geometry) or strided_winograd_applies(geometry)):
        raise ValueError(
            "algorithm='winograd' needs 3x3 filters at stride 1 or 4x4 filters at stride 2, and dilation 1, but got "
            f"filters of size {geometry.weight_shape[2:]}, stride={geometry.stride} and dilation={geometry.dilation}"
        )
    if algorithm == "auto":
        out_per_group = geometry.weight_shape[0] // geometry.groups
        if geometry.groups > 1 and out_per_group <= DIRECT_MAX_OUT_PER_GROUP:
            return "direct"
        if winograd_applies(geometry):
            return "winograd" if winograd_pays(geometry) else "gemm"
        return "winograd" if strided_winograd_applies(geometry) and strided_winograd_pays(geometry) else "gemm"
    return algorithm


def _run_direct(kernel, data, weight, bias, geometry, shape, dtype):
    """Run a direct kernel (``_direct.py``), which writes its whole output, bias included, in one pass."""
    out = np.empty(shape, dtype)
    bias = np.zeros(shape[1], dtype) if bias is None else v.kernel_ready(bias, dtype)
    if out.size:
        run(
            kernel,
            v.kernel_ready(data, dtype),
            v.kernel_ready(weight, dtype),
            bias,
            geometry.kernel_geometry,
            geometry.groups,
            out,
        )
    return out


def _forward(x, weight, bias, geometry, dtype, algorithm="auto", purpose="conv2d", swapped=False):
    """conv2d of 4-D ``x``: (N, C, H, W) -> (N, K, P, Q) as given by ``geometry``; ``purpose`` names it in errors.

    With ``swapped``, ``weight`` holds the filters of the convolution whose input gradient this is, for
    Winograd (the only algorithm that takes them so) to read rotated and with channels in and out swapped.
    """
    algorithm = _choose_algorithm(algorithm, geometry)
    direct = algorithm == "direct"
    strided = algorithm == "winograd" and not winograd_applies(geometry)  # 4x4 stride 2: by its stride phases
    if strided:
        workspace = strided_workspace(geometry, dtype)
    elif algorithm == "winograd":
        workspace = winograd_workspace(geometry, dtype)
    else:
        workspace = _workspace_bytes(geometry, dtype, direct)
    v.check_memory(purpose, geometry.output_shape, dtype, (x, weight), workspace)
    if direct:
        return _run_direct(conv2d_direct, x, weight, bias, geometry, geometry.output_shape, dtype)
    # Without a bias the first block overwrites the output: no pass to zero it first. The GEMM path takes the
    # bias itself, added by its stores where it streams the output.
    gemm = not (strided or algorithm == "winograd")
    overwrite = (bias is None or gemm) and x.size and weight.size
    y = empty_aligned(geometry.output_shape, dtype) if overwrite else _initial(geometry.output_shape, dtype, bias)
    if y.size and x.size:
        args = (v.kernel_ready(x, dtype), v.kernel_ready(weight, dtype), geometry.kernel_geometry, geometry.groups)
        if strided:
            run(_conv2d_strided, *args, np.bool_(not overwrite), y)
        elif algorithm == "winograd":
            run(_conv2d_winograd, *args, np.bool_(not overwrite), y, swapped)
        else:
            fused_bias = v.kernel_ready(bias, dtype) if overwrite and bias is not None else None
            run(_conv2d_forward, *args, np.bool_(not overwrite), y, fused_bias)
    return y


def _input_grad_as_conv2d(grad_output, geometry, dtype):
    """The input gradient as a stride-1 conv2d: ``(grad_output', geometry')``, or ``(None, None)`` when nothing
    of grad_output reaches the input.

    The input gradient is a full correlation of grad_output, with ``stride - 1`` zeros between its pixels, and
    the flipped filters, channels in and out swapped: a forward convolution, padded by ``dilation * (R - 1) -
    pad_top`` before and what makes the output H x W after, which runs on the forward kernels (implicit
    im2col, Winograd or direct; no column buffer, no col2im). Negative padding (padding wider than the dilated
    kernel) crops grad_output instead. At stride 1 grad_output is used as it is; at larger strides the zeros
    are multiplied too, which only the direct kernel's memory-bound layers can afford.
    """
    N, C, H, W = geometry.input_shape
    K, Cg, R, S = geometry.weight_shape
    sh, sw = geometry.stride
    (pt, _), (pl, _) = geometry.padding
    dh, dw = geometry.dilation
    if min(grad_output.shape[2:]) == 0:
        return None, None
    if (sh, sw) != (1, 1):
        P, Q = grad_output.shape[2:]
        shape = (N, K, (P - 1) * sh + 1, (Q - 1) * sw + 1)
        v.check_memory(
            "the input gradient", geometry.input_shape, dtype, (grad_output,), dtype.itemsize * math.prod(shape)
        )
        spread = np.zeros(shape, dtype)
        spread[:, :, ::sh, ::sw] = grad_output
        grad_output = spread
    P, Q = grad_output.shape[2:]
    before = (dh * (R - 1) - pt, dw * (S - 1) - pl)
    after = (H - P + pt, W - Q + pl)
    grad_output = grad_output[
        :, :, max(0, -before[0]) : P + min(0, after[0]), max(0, -before[1]) : Q + min(0, after[1])
    ]
    if grad_output.shape[2] < 1 or grad_output.shape[3] < 1:
        return None, None
    padding = ((max(0, before[0]), max(0, after[0])), (max(0, before[1]), max(0, after[1])))
    geometry = v.Conv2dGeometry(
        grad_output.shape, (C, K // geometry.groups, R, S), (N, C, H, W), (1, 1), padding, (dh, dw), geometry.groups
    )
    return grad_output, geometry


def _flip_for_input_grad(weight, groups):
    """``(K, C/g, R, S)`` filters as the ``(C, K/g, R, S)`` filters of the input-gradient convolution."""
    K, Cg, R, S = weight.shape
    per_group = weight.reshape(groups, K // groups, Cg, R, S).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
    return np.ascontiguousarray(per_group.reshape(groups * Cg, K // groups, R, S))


def _input_grad(grad_output, weight, bias, geometry, dtype):
    """conv2d's input gradient: (N, K, P, Q) -> (N, C, H, W), plus ``bias`` when given (conv_transpose2d)."""
    direct = _choose_algorithm("auto", geometry) == "direct"
    if geometry.stride == (1, 1) or direct:
        cropped, as_conv2d = _input_grad_as_conv2d(grad_output, geometry, dtype)
        if as_conv2d is None:
            return _initial(geometry.input_shape, dtype, bias)
        # Winograd's filter transform reads the filters rotated and swapped itself: no flipped copy (1-2 ms at
        # 512x512 filters).
        swapped = _choose_algorithm("auto", as_conv2d) == "winograd"
        if direct or swapped or not _columns_pay(geometry, dtype):
            filters = weight if swapped else _flip_for_input_grad(weight, geometry.groups)
            # Without swapped filters "auto" chooses the GEMM path or direct loops: it would ask Winograd for more.
            args = (cropped, filters, bias, as_conv2d, dtype, "winograd" if swapped else "auto")
            return _forward(*args, purpose="the input gradient", swapped=swapped)
        return _input_grad_by_columns(grad_output, weight, bias, geometry, dtype)
    _, _, R, S = geometry.weight_shape
    if patchify(R, S, geometry.kernel_geometry, *grad_output.shape[2:], *geometry.input_shape[2:]):
        return _input_grad_of_patchify(grad_output, weight, bias, geometry, dtype)
    if strided_winograd_applies(geometry) and input_grad_pays(geometry):
        return _input_grad_subpixel(grad_output, weight, bias, geometry, dtype)
    if _phases_pay(geometry):
        return _input_grad_by_phases(grad_output, weight, bias, geometry, dtype)
    return _input_grad_by_columns(grad_output, weight, bias, geometry, dtype)


def _columns_pay(geometry, dtype):
    """Whether a stride-1 input gradient that Winograd does not take should be a column matrix added back into
    the image (``_input_grad_by_columns``, its col2im in the GEMM's tasks), not conv2d of grad_output by the
    filters flipped: when there are at least twice as many filters per group as output pixels in the batch, in
    one column buffer of at most NC pixels. There the flipped copy of the filters costs more than the col2im.
    Measured (float32, 2 threads, ms, conv2d_input, flipped -> columns): 1x512x7x7 <- 512 3x3 4.79 -> 1.12,
    4x512x7x7 3.82 -> 2.86 (2.6 filters a pixel), 1x1024x7x7 13.7 -> 5.4, 1x512x7x7 5x5 8.8 -> 4.2, 1x64x4x4
    0.086 -> 0.047; about even at 1.3 filters a pixel (1x256x14x14 0.73 / 0.75, 4x256x7x7 0.92 / 0.95); slower
    below (2x256x14x14 1.27 -> 1.38, 1x128x28x28 0.57 -> 0.72, 8x32x16x16 0.16 -> 0.28)."""
    N, K, P, Q = geometry.output_shape
    pixels = N * P * Q
    one_chunk = _rows_per_chunk(geometry, dtype) >= N * P
    return one_chunk and pixels <= NC and 2 * pixels <= K // geometry.groups


def _input_grad_by_columns(grad_output, weight, bias, geometry, dtype):
    """conv2d's input gradient as the column matrix ``W.T @ grad_output`` added back into the image (col2im), a
    chunk of output rows at a time (``_conv_kernels._conv2d_input``)."""
    workspace = _workspace_bytes(geometry, dtype)
    v.check_memory("the input gradient", geometry.input_shape, dtype, (grad_output, weight), workspace)
    dx = _initial(geometry.input_shape, dtype, bias)
    if dx.size and grad_output.size:
        run(
            _conv2d_input,
            v.kernel_ready(grad_output, dtype),
            v.kernel_ready(weight, dtype),
            geometry.kernel_geometry,
            geometry.groups,
            _rows_per_chunk(geometry, dtype),
            dx,
        )
    return dx


def _phase_axis(a, s, pad, R, P, H):
    """Phase ``a`` of the input gradient along one axis (stride ``s``, padding ``pad`` before, filter size ``R``,
    ``P`` outputs, ``H`` inputs): ``(first tap, taps, before, after, size)``.

    Input index ``s * i + a`` is reached by taps ``r = first + s * m``, ``m < taps``, from output ``i + d - m``
    (``d = (a + pad - first) // s``): a stride-1 correlation of grad_output with those taps reversed, padded
    by ``before`` and ``after`` (negative: cropped) so that it has ``size`` outputs.
    """
    size = max(0, -(-(H - a) // s))
    first = (a + pad) % s
    taps = max(0, -(-(R - first) // s))
    before = taps - 1 - (a + pad - first) // s
    after = size + taps - 1 - before - P
    return first, taps, before, after, size


def _phases_pay(geometry):
    """Whether a strided layer's input gradient should be computed by stride phases (``config.py`` gives the rule
    and the measurements): dilation 1, a shallow column-matrix GEMM, enough channels, and enough pixels per
    image and over the batch."""
    N, C, H, W = geometry.input_shape
    K, Cg = geometry.weight_shape[:2]
    sh, sw = geometry.stride
    phase_pixels = -(-H // sh) * -(-W // sw)
    return (
        geometry.dilation == (1, 1)
        and K // geometry.groups <= PHASES_MAX_FILTERS
        and Cg >= PHASES_MIN_CHANNELS
        and phase_pixels >= PHASES_MIN_PIXELS
        and N * phase_pixels >= PHASES_MIN_POSITIONS
    )


def _input_grad_of_patchify(grad_output, weight, bias, geometry, dtype):
    """conv2d's input gradient of a patchify layer (``_conv_kernels.patchify``; conv_transpose2d of one, as in
    U-Net's 2x2 stride-2 up-convolution): each pixel of grad_output reaches one input pixel per tap, no two the
    same. So the gradient's stride phases, channel ``(c * R + r) * S + s`` for tap ``(c, r, s)``, are one 1x1
    convolution of grad_output (a GEMM of all the taps at once), put into place by depth-to-space. Measured
    (float32, 2 threads), conv_transpose2d 8x128x28x28 -> 64 2x2 s2: 1.69-1.80 ms by the four phases one at a
    time (each a GEMM of 64 rows), 1.30 this way.
    """
    C = geometry.input_shape[1]
    K, Cg, R, S = geometry.weight_shape
    groups = geometry.groups
    # filters[(g * Cg + c) * R * S + r * S + s, k] = weight[g * Kg + k, c, r, s]
    filters = weight.reshape(groups, K // groups, Cg * R * S).transpose(0, 2, 1).reshape(C * R * S, K // groups, 1, 1)
    phase_bias = None if bias is None else np.repeat(np.asarray(bias, dtype), R * S)
    pointwise = v.conv2d_geometry("the input gradient", grad_output.shape, filters.shape, 1, 0, 1, groups)
    phase_bytes = math.prod(pointwise.output_shape) * dtype.itemsize
    v.check_memory("the input gradient", geometry.input_shape, dtype, (grad_output, weight), phase_bytes)
    phases = _forward(grad_output, filters, phase_bias, pointwise, dtype, purpose="the input gradient")
    dx = np.empty(geometry.input_shape, dtype)
    if dx.size:
        run(_depth_to_space, phases, np.int64(R), np.int64(S), dx)
    return dx


def _input_grad_by_phases(grad_output, weight, bias, geometry, dtype):
    """conv2d's input gradient at a stride, one stride phase of the input at a time.

    Each phase ``(a, b)`` of the input, ``dx[:, :, a::sh, b::sw]``, is a stride-1 convolution of grad_output
    with the taps that reach it (``_phase_axis``; for 3x3 at stride 2: 2x2, 2x1, 1x2 and 1x1 filters), run on
    the forward kernels and scattered into place: no zeros multiplied, no column matrix, no col2im.
    """
    N, C, H, W = geometry.input_shape
    K, Cg, R, S = geometry.weight_shape
    P, Q = grad_output.shape[2:]
    sh, sw = geometry.stride
    (pt, _), (pl, _) = geometry.padding
    rows = [_phase_axis(a, sh, pt, R, P, H) for a in range(sh)]
    columns = [_phase_axis(b, sw, pl, S, Q, W) for b in range(sw)]

    def phase(row, column):
        """grad_output cropped and the geometry of its convolution, or None where no tap reaches the phase."""
        (_, taps_r, top, bottom, size_h), (_, taps_s, left, right, size_w) = row, column
        dy = grad_output[:, :, max(0, -top) : P + min(0, bottom), max(0, -left) : Q + min(0, right)]
        if not (taps_r and taps_s and size_h and size_w) or min(dy.shape[2:]) < 1:
            return None
        padding = ((max(0, top), max(0, bottom)), (max(0, left), max(0, right)))
        shape = (C, K // geometry.groups, taps_r, taps_s)
        return dy, v.Conv2dGeometry(dy.shape, shape, (N, C, size_h, size_w), (1, 1), padding, (1, 1), geometry.groups)

    phases = {(a, b): phase(row, column) for a, row in enumerate(rows) for b, column in enumerate(columns)}
    # dx, then the outputs of a row of phases beside it (each phase's own convolution checks its workspace)
    largest = max((math.prod(found[1].output_shape) for found in phases.values() if found is not None), default=0)
    v.check_memory(
        "the input gradient", geometry.input_shape, dtype, (grad_output, weight), sw * largest * dtype.itemsize
    )
    every = all(p is not None for p in phases.values())
    dx = np.empty(geometry.input_shape, dtype) if every else _initial(geometry.input_shape, dtype, bias)
    for a in range(sh):
        outputs = {}
        for b in range(sw):
            if phases[a, b] is not None:
                dy, phase_geometry = phases[a, b]
                taps = weight[:, :, rows[a][0] :: sh, columns[b][0] :: sw]
                filters = _flip_for_input_grad(taps, geometry.groups)
                outputs[b] = _forward(dy, filters, bias, phase_geometry, dtype, purpose="the input gradient")
        if sw == 2 and len(outputs) == 2:
            # Each row of dx written once, whole. Measured (float32, 2 threads), conv2d_input 8x64x56x56 <- 128
            # 3x3 s2: scattered a phase at a time 0.39-0.42 ms, a row of phases 0.26-0.29; in one process,
            # alternating, the whole of it 3.64 -> 3.35 ms, conv_transpose2d 4x64x64x64 -> 32 3x3 s2 2.79 ->
            # 2.42, 8x64x32x32 -> 32 5x5 s2 2.65 -> 2.50.
            run(_scatter_phase_pair, outputs[0], outputs[1], np.int64(a), np.int64(sh), dx)
            continue
        for b, y in outputs.items():
            run(_scatter_phase, y, np.int64(a), np.int64(b), np.int64(sh), np.int64(sw), dx)
    return dx


def _input_grad_subpixel(grad_output, weight, bias, geometry, dtype):
    """conv2d's input gradient of a 4x4 stride-2 layer, by Winograd on its four stride phases."""
    workspace = input_grad_workspace(geometry, grad_output.shape, dtype)
    v.check_memory("the input gradient", geometry.input_shape, dtype, (grad_output, weight), workspace)
    # Every pixel of dx is written once: without a bias, nothing to zero first.
    overwrite = bias is None and grad_output.size
    dx = np.empty(geometry.input_shape, dtype) if overwrite else _initial(geometry.input_shape, dtype, bias)
    if dx.size and grad_output.size:
        args = (v.kernel_ready(grad_output, dtype), v.kernel_ready(weight, dtype), geometry, geometry.groups)
        run(_conv2d_input_subpixel, *args, np.bool_(not overwrite), dx)
    return dx


def _weight_grad(x, grad_output, geometry, dtype):
    """conv2d's weight gradient: sum over the batch of grad_output · patches(x)ᵀ -> (K, C // groups, R, S)."""
    direct = _choose_algorithm("auto", geometry) == "direct"
    winograd = not direct and winograd_applies(geometry) and winograd_weight_grad_pays(geometry)
    strided = not direct and strided_winograd_applies(geometry) and weight_grad_pays(geometry)
    shifted = not (direct or winograd or strided) and shifted_weight_grad_pays(geometry, dtype)
    if winograd:
        workspace = winograd_weight_grad_workspace(geometry, dtype)
    elif strided:
        workspace = weight_grad_workspace(geometry, dtype)
    elif shifted:  # padded input, partial sums: a column buffer each at most
        workspace = 2 * COLUMN_BUFFER_BYTES
    else:
        workspace = _workspace_bytes(geometry, dtype, direct)
    v.check_memory("the weight gradient", geometry.weight_shape, dtype, (x, grad_output), workspace)
    # The stride-phase Winograd writes every value, the GEMM path zeroes what it adds into; the others add into
    # zeros.
    gemm = not (direct or shifted or strided or winograd)
    overwritten = strided or gemm
    dw = empty_aligned(geometry.weight_shape, dtype) if overwritten else np.zeros(geometry.weight_shape, dtype)
    if dw.size and grad_output.size:
        layout = ()
        if direct:
            kernel = conv2d_direct_weight
        elif shifted:
            kernel, layout = _conv2d_weight_shifted, (weight_grad_layout(geometry, np.dtype(dtype).itemsize),)
        elif strided:
            kernel = conv2d_weight_strided
        else:
            kernel = conv2d_weight_winograd if winograd else _conv2d_weight
        run(
            kernel,
            v.kernel_ready(x, dtype),
            v.kernel_ready(grad_output, dtype),
            geometry.kernel_geometry,
            geometry.groups,
            dw,
            *layout,
        )
    elif overwritten:
        dw[...] = 0
    return dw


def _bias_grad(grad_output, dtype):
    """The bias gradient from a C-contiguous ``grad_output`` of ``dtype``."""
    grad_bias = np.zeros(grad_output.shape[1], dtype)
    if grad_output.size:
        run(_channel_sums, grad_output, grad_bias)
    return grad_bias


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto"):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``.

    ``y[n, k, p, q] = bias[k] + sum over c, r, s of
    input[n, g * C/groups + c, p * sh - pad_top + r * dh, q * sw - pad_left + s * dw] * weight[k, c, r, s]``
    with ``g = k // (K / groups)`` and zeros outside the input.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W) or (C, H, W)
        The images. An unbatched input gives an unbatched output.
    weight : array_like, shape (K, C // groups, R, S)
        The filters.
    bias : array_like, shape (K,), optional
        Added to every output pixel of each channel.
    stride : int or (int, int), default 1
    padding : int, (int, int), ((int, int), (int, int)), 'valid' or 'same', default 0
        Zeros added around the input: the same on all sides, per axis, or ``((top, bottom), (left, right))``.
        ``'same'`` gives an output of ``ceil(in / stride)`` (TensorFlow's rule, at any stride).
    dilation : int or (int, int), default 1
        Spacing between kernel taps.
    groups : int, default 1
        Input and output channels split into this many independent convolutions.
    algorithm : {'auto', 'gemm', 'winograd', 'direct'}, keyword-only
        How to compute it; every choice gives the same result up to float rounding. ``'gemm'``: implicit
        im2col and the blocked GEMM, the fast path for dense layers. ``'winograd'``: for 3x3 filters at stride
        1, Winograd F(2x2, 3x3), 2.25 times fewer multiplications; for 4x4 filters at stride 2, Winograd
        F(2x2, 2x2) over the input's four stride phases, 1.78 times fewer; dilation 1 only (else
        ``ValueError``). Its transforms only add, subtract and halve, so its error stays within about three
        times the direct sum's (float32: under 1e-6 of the largest output for 512 input channels); as they
        subtract, an infinite input gives NaN, not inf, in the outputs of the 2x2 tiles that read it.
        ``'direct'``: direct loops per output plane, the fast path for depthwise and other convolutions with a
        few output channels per group. ``'auto'`` (default) picks by shape: direct for many small groups,
        Winograd for 3x3 stride-1 and 4x4 stride-2 layers with enough channels and pixels, else gemm.

    Returns
    -------
    numpy.ndarray, shape (N, K, P, Q) or (K, P, Q)
        In ``np.result_type(input, weight, bias, np.float32)``: float32 or float64.

    Raises
    ------
    ValueError
        For shapes or parameter values that do not fit together.
    TypeError
        For non-numeric or complex arrays, or a float or bool where an int is expected.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import conv2d
    >>> x = np.array([[3, 3, 2, 1, 0], [0, 0, 1, 3, 1], [3, 1, 2, 2, 3], [2, 0, 0, 2, 2], [2, 0, 0, 0, 1]])
    >>> w = np.array([[0, 1, 2], [2, 2, 0], [0, 1, 2]])
    >>> conv2d(x[None, None], w[None, None])[0, 0]
    array([[12., 12., 17.],
           [10., 17., 19.],
           [ 9.,  6., 14.]])
    >>> conv2d(np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3)), stride=2, padding="same").shape
    (2, 4, 4, 4)
    """
    x = v.as_array("input", input)
    weight, geometry, batched = v.parse_conv2d("conv2d", x.shape, weight, stride, padding, dilation, groups)
    bias = v.check_bias(bias, weight.shape[0], weight.shape)
    dtype = v.result_dtype(input=x, weight=weight, bias=bias)
    with sized(geometry.flops):
        y = _forward(x.reshape(geometry.input_shape), weight, bias, geometry, dtype, algorithm)
    return v.unbatch(y, batched)


def conv2d_input(input_size, weight, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """Gradient of conv2d with respect to its input, as ``torch.nn.grad.conv2d_input``.

    Parameters
    ----------
    input_size : sequence of int
        Shape of the forward input, (N, C, H, W) or (C, H, W).
    weight : array_like, shape (K, C // groups, R, S)
    grad_output : array_like, shape (N, K, P, Q) or (K, P, Q)
        Gradient of the loss with respect to conv2d's output.
    stride, padding, dilation, groups
        As in :func:`conv2d`.

    Returns
    -------
    numpy.ndarray, shape ``input_size``

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import conv2d_input
    >>> w = np.array([[[[0, 1, 2], [2, 2, 0], [0, 1, 2]]]])
    >>> conv2d_input((1, 1, 5, 5), w, np.ones((1, 1, 3, 3)))[0, 0]
    array([[ 0.,  1.,  3.,  3.,  2.],
           [ 2.,  5.,  7.,  5.,  2.],
           [ 2.,  6., 10.,  8.,  4.],
           [ 2.,  5.,  7.,  5.,  2.],
           [ 0.,  1.,  3.,  3.,  2.]])
    """
    size = v.shape_tuple("input_size", input_size, (3, 4))
    weight, geometry, batched = v.parse_conv2d(
        "conv2d_input", size, weight, stride, padding, dilation, groups, "input_size"
    )
    dy = v.batched_grad_output(grad_output, geometry.output_shape, batched, "conv2d_input")
    dtype = v.result_dtype(weight=weight, grad_output=dy)
    with sized(geometry.flops):
        grad_input = _input_grad(dy, weight, None, geometry, dtype)
    return v.unbatch(grad_input, batched)


def conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """Gradient of conv2d with respect to its weight, as ``torch.nn.grad.conv2d_weight``.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W) or (C, H, W)
        The forward input.
    weight_size : sequence of int
        Shape of the weight, (K, C // groups, R, S).
    grad_output : array_like, shape (N, K, P, Q) or (K, P, Q)
    stride, padding, dilation, groups
        As in :func:`conv2d`.

    Returns
    -------
    numpy.ndarray, shape ``weight_size``

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import conv2d_weight
    >>> x = np.array([[3, 3, 2, 1, 0], [0, 0, 1, 3, 1], [3, 1, 2, 2, 3], [2, 0, 0, 2, 2], [2, 0, 0, 0, 1]])
    >>> conv2d_weight(x[None, None], (1, 1, 3, 3), np.ones((1, 1, 3, 3)))[0, 0]
    array([[15., 15., 15.],
           [ 9., 11., 16.],
           [10.,  7., 12.]])
    """
    x = v.as_array("input", input)
    size = v.shape_tuple("weight_size", weight_size, (4,))
    shape4, batched = v.batched_input("input", x.shape, "conv2d_weight")
    geometry = v.conv2d_geometry("conv2d_weight", shape4, size, stride, padding, dilation, groups)
    dy = v.batched_grad_output(grad_output, geometry.output_shape, batched, "conv2d_weight")
    dtype = v.result_dtype(input=x, grad_output=dy)
    with sized(geometry.flops):
        return _weight_grad(x.reshape(shape4), dy, geometry, dtype)


def conv2d_backward(input, weight, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """All three gradients of conv2d: ``(grad_input, grad_weight, grad_bias)``.

    Arguments are checked once and converted once for the three gradients.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W) or (C, H, W)
    weight : array_like, shape (K, C // groups, R, S)
    grad_output : array_like, shape (N, K, P, Q) or (K, P, Q)
    stride, padding, dilation, groups
        As in :func:`conv2d`.

    Returns
    -------
    grad_input : numpy.ndarray, shape of ``input``
    grad_weight : numpy.ndarray, shape of ``weight``
    grad_bias : numpy.ndarray, shape (K,)

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import conv2d_backward
    >>> dx, dw, db = conv2d_backward(np.ones((2, 3, 6, 6)), np.ones((4, 3, 3, 3)), np.ones((2, 4, 4, 4)))
    >>> dx.shape, dw.shape, db
    ((2, 3, 6, 6), (4, 3, 3, 3), array([32., 32., 32., 32.]))
    """
    x = v.as_array("input", input)
    weight, geometry, batched = v.parse_conv2d("conv2d_backward", x.shape, weight, stride, padding, dilation, groups)
    dy = v.batched_grad_output(grad_output, geometry.output_shape, batched, "conv2d_backward")
    dtype = v.result_dtype(input=x, weight=weight, grad_output=dy)
    x, weight, dy = (v.kernel_ready(a, dtype) for a in (x.reshape(geometry.input_shape), weight, dy))
    with sized(geometry.flops):  # the flops of each gradient
        grad_input = _input_grad(dy, weight, None, geometry, dtype)
        grad_weight = _weight_grad(x, dy, geometry, dtype)
        grad_bias = _bias_grad(dy, dtype)
    return v.unbatch(grad_input, batched), grad_weight, grad_bias


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """2-D transposed convolution, as ``torch.nn.functional.conv_transpose2d``.

    It is the gradient of :func:`conv2d` with respect to its input, with this function's input in the role of
    conv2d's grad_output, and is computed that way. With 4x4 filters at stride 2 (no dilation), at least 16
    output channels per group and enough pixels, each of the four stride phases of the output is a stride-1
    convolution by 2x2 filters, computed by Winograd F(2x2, 2x2): its float32 error is a few times the direct
    sum's (still well under 1e-5 of the largest output), and as its transforms subtract, an infinite input
    gives NaN rather than inf in the outputs near it.

    Parameters
    ----------
    input : array_like, shape (N, C_in, H, W) or (C_in, H, W)
    weight : array_like, shape (C_in, C_out // groups, R, S)
    bias : array_like, shape (C_out,), optional
    stride : int or (int, int), default 1
    padding : int or (int, int), default 0
        ``dilation * (kernel - 1) - padding`` zeros are added to each side of the input.
    output_padding : int or (int, int), default 0
        Extra size added to one side of the output; smaller than either stride or dilation.
    groups : int, default 1
    dilation : int or (int, int), default 1

    Returns
    -------
    numpy.ndarray, shape (N, C_out, H_out, W_out) or unbatched
        ``H_out = (H - 1) * stride - 2 * padding + dilation * (R - 1) + output_padding + 1``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import conv_transpose2d
    >>> y = np.array([[12, 12, 17], [10, 17, 19], [9, 6, 14]])
    >>> w = np.array([[0, 1, 2], [2, 2, 0], [0, 1, 2]])
    >>> conv_transpose2d(y[None, None], w[None, None])[0, 0]
    array([[  0.,  12.,  36.,  41.,  34.],
           [ 24.,  58.,  95.,  87.,  38.],
           [ 20.,  75., 132., 105.,  62.],
           [ 18.,  40.,  77.,  81.,  38.],
           [  0.,   9.,  24.,  26.,  28.]])
    """
    x, weight, geometry, batched = v.parse_transpose(
        "conv_transpose2d", input, weight, stride, padding, output_padding, groups, dilation
    )
    bias = v.check_bias(bias, geometry.input_shape[1], weight.shape)
    dtype = v.result_dtype(input=x, weight=weight, bias=bias)
    # conv_transpose2d's input is conv2d's grad_output.
    with sized(geometry.flops):
        y = _input_grad(x, weight, bias, geometry, dtype)
    return v.unbatch(y, batched)


def conv_transpose2d_backward(input, weight, grad_output, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """All three gradients of conv_transpose2d: ``(grad_input, grad_weight, grad_bias)``.

    The input gradient is conv2d of ``grad_output``; the weight gradient is conv2d's weight gradient with
    ``grad_output`` as the images and ``input`` as their output gradient.

    Parameters
    ----------
    input : array_like, shape (N, C_in, H, W) or (C_in, H, W)
    weight : array_like, shape (C_in, C_out // groups, R, S)
    grad_output : array_like, shape of conv_transpose2d's output
    stride, padding, output_padding, groups, dilation
        As in :func:`conv_transpose2d`.

    Returns
    -------
    grad_input : numpy.ndarray, shape of ``input``
    grad_weight : numpy.ndarray, shape of ``weight``
    grad_bias : numpy.ndarray, shape (C_out,)

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import conv_transpose2d_backward
    >>> y = np.array([[12, 12, 17], [10, 17, 19], [9, 6, 14]])
    >>> w = np.array([[0, 1, 2], [2, 2, 0], [0, 1, 2]])
    >>> dx, dw, db = conv_transpose2d_backward(y[None, None], w[None, None], np.ones((1, 1, 5, 5)))
    >>> dx[0, 0], dw[0, 0], db
    (array([[10., 10., 10.],
           [10., 10., 10.],
           [10., 10., 10.]]), array([[116., 116., 116.],
           [116., 116., 116.],
           [116., 116., 116.]]), array([25.]))
    """
    x, weight, geometry, batched = v.parse_transpose(
        "conv_transpose2d_backward", input, weight, stride, padding, output_padding, groups, dilation
    )
    dy = v.batched_grad_output(grad_output, geometry.input_shape, batched, "conv_transpose2d_backward")
    dtype = v.result_dtype(input=x, weight=weight, grad_output=dy)
    x, weight, dy = (v.kernel_ready(a, dtype) for a in (x, weight, dy))
    with sized(geometry.flops):  # the flops of each gradient
        grad_input, grad_weight, grad_bias = _transpose_gradients(x, weight, dy, geometry, dtype)
    return v.unbatch(grad_input, batched), grad_weight, grad_bias


def _transpose_gradients(x, weight, dy, geometry, dtype):
    """conv_transpose2d's input, weight and bias gradients."""
    # Roles swapped: conv_transpose2d's grad_output is conv2d's input, its input is conv2d's grad_output.
    split = _patchify_phases(dy, geometry)
    if split is None:
        grad_input, grad_weight = _forward(dy, weight, None, geometry, dtype), _weight_grad(dy, x, geometry, dtype)
        return grad_input, grad_weight, _bias_grad(dy, dtype)
    # Both gradients are 1x1 problems on grad_output's stride phases, split once; the bias gradient is summed
    # as they are.
    phases, plane_sums = split
    K, Cg, R, S = weight.shape
    pointwise = v.conv2d_geometry(
        "conv_transpose2d_backward", phases.shape, (K, Cg * R * S, 1, 1), 1, 0, 1, geometry.groups
    )
    grad_input = _forward(phases, weight.reshape(pointwise.weight_shape), None, pointwise, dtype)
    grad_weight = _weight_grad(phases, x, pointwise, dtype).reshape(weight.shape)
    return grad_input, grad_weight, plane_sums.sum(axis=0).astype(dtype)


def _patchify_phases(x, geometry):
    """For a patchify layer (filter the size of the stride, no padding, no dilation, a whole number of strides),
    ``(phases, plane_sums)``: ``x``'s stride phases (space-to-depth), whose channel ``(c * R + r) * S + s`` is
    tap ``(c, r, s)`` (the layer is then a 1x1 convolution of them, and its weight gradient too), and the sum of
    each plane of ``x``, (N, C) in float64. ``None`` for other layers, or where the copy would pass the column
    buffer."""
    N, C, H, W = geometry.input_shape
    _, _, R, S = geometry.weight_shape
    _, _, P, Q = geometry.output_shape
    if not patchify(R, S, geometry.kernel_geometry, P, Q, H, W) or x.nbytes > COLUMN_BUFFER_BYTES:
        return None
    phases = np.empty((N, C * R * S, P, Q), x.dtype)
    plane_sums = np.empty((N, C), np.float64)
    run(_space_to_depth, x, np.int64(R), np.int64(S), phases, plane_sums)
    return phases, plane_sums
