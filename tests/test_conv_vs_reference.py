"""Every fast function against fastconv.reference, over a stacked parametrised space of configurations."""

import numpy as np
import pytest

import fastconv
from conftest import assert_close, random_array
from fastconv import _conv_kernels, _im2col, _validate, reference
from fastconv import conv as conv_module
from fastconv.config import DIRECT_MAX_OUT_PER_GROUP, GATHER_MAX_WIDTH, KC, MC, NR
from fastconv.conv import ALGORITHMS
from fastconv.shapes import conv_output_size, same_padding, transpose_output_size

CHANNELS = [  # (C, K, groups)
    (1, 1, 1),
    (3, 5, 1),
    (4, 6, 2),
    (6, 3, 3),
    (4, 4, 4),  # depthwise
    (2, 6, 2),  # depthwise with multiplier 3
]
SIZES = [  # ((H, W), (R, S))
    ((1, 1), (1, 1)),
    ((5, 5), (3, 3)),
    ((4, 6), (4, 6)),  # kernel == input
    ((7, 12), (2, 5)),
    ((12, 7), (5, 1)),
    ((2, 3), (1, 2)),
]
STRIDE_DILATION = [(1, 1), (2, 1), ((3, 1), 1), (1, (2, 3)), (3, 2)]  # stride 3 > kernel 1 or 2 in some sizes
PADDING = [0, 1, (2, 0), ((0, 2), (1, 0)), "valid", "same"]
DTYPES = ["float32", "float64"]


def _padded_fits(hw, rs, stride, padding, dilation):
    stride = (stride, stride) if isinstance(stride, int) else stride
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    for axis in range(2):
        if padding == "same":
            pads = same_padding(hw[axis], rs[axis], stride[axis], dilation[axis])
        elif padding == "valid":
            pads = (0, 0)
        elif isinstance(padding, int):
            pads = (padding, padding)
        elif isinstance(padding[0], tuple):
            pads = padding[axis]
        else:
            pads = (padding[axis], padding[axis])
        if conv_output_size(hw[axis], rs[axis], stride[axis], *pads, dilation[axis]) < 1:
            return False
    return True


def _conv_case(rng, N, channels, sizes, dtype, bias=True):
    (C, K, groups), ((H, W), (R, S)) = channels, sizes
    x = random_array(rng, (N, C, H, W), dtype)
    w = random_array(rng, (K, C // groups, R, S), dtype)
    b = random_array(rng, (K,), dtype) if bias else None
    return x, w, b


def _winograd_applies(w, stride=1, dilation=1, **_):
    """3x3 filters at stride 1 (F(2x2, 3x3)) or 4x4 filters at stride 2 (F(2x2, 2x2) on the stride phases)."""
    if dilation not in (1, (1, 1)):
        return False
    return (w.shape[2:] == (3, 3) and stride in (1, (1, 1))) or (w.shape[2:] == (4, 4) and stride in (2, (2, 2)))


def _check_conv2d_family(x, w, b, **params):
    """conv2d and all its gradients against the reference, on one configuration."""
    y = fastconv.conv2d(x, w, b, **params)
    expected_y = reference.conv2d(x, w, b, **params)
    assert_close(y, expected_y)
    for algorithm in ALGORITHMS:
        if algorithm == "winograd" and not _winograd_applies(w, **params):
            with pytest.raises(
                ValueError, match="algorithm='winograd' needs 3x3 filters at stride 1 or 4x4 filters at stride 2"
            ):
                fastconv.conv2d(x, w, b, **params, algorithm=algorithm)
        else:
            assert_close(fastconv.conv2d(x, w, b, **params, algorithm=algorithm), expected_y)
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(y.dtype)
    expected = reference.conv2d_backward(x, w, dy, **params)
    for actual, want in zip(fastconv.conv2d_backward(x, w, dy, **params), expected):
        assert_close(actual, want)
    assert_close(fastconv.conv2d_input(x.shape, w, dy, **params), expected[0])
    assert_close(fastconv.conv2d_weight(x, w.shape, dy, **params), expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", PADDING)
@pytest.mark.parametrize("stride, dilation", STRIDE_DILATION)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_conv2d_and_gradients(rng, channels, sizes, stride, dilation, padding, dtype):
    x, w, b = _conv_case(rng, 2, channels, sizes, dtype)
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=channels[2])
    if _padded_fits(*sizes, stride, padding, dilation):
        _check_conv2d_family(x, w, b, **params)
    else:  # the dilated kernel does not fit in the padded input: both refuse, with the same words
        for lib in (fastconv, reference):
            with pytest.raises(ValueError, match="Kernel size can't be greater than actual input size"):
                lib.conv2d(x, w, b, **params)


BLOCKING = [  # (N, C, H, W, K, R, S, stride, padding): layers that cross the GEMM's block edges and its packers
    (1, KC + 3, 48, 48, MC + 5, 1, 1, 1, 0),  # 1x1, more than MC filters: B packed once and shared (classic)
    (1, KC + 3, 48, 48, 9, 1, 1, 1, 0),  # 1x1, few filters: B packed per task, more than NC pixels
    (2, 60, 6, 7, MC + 5, 3, 3, 1, 1),  # patches gathered (short rows): two MC blocks, two KC blocks of taps
    (1, 3, 5, NR + 9, 6, 3, 3, 1, 1),  # patches copied in runs (rows longer than a panel)
    (2, 2, 7, 2 * NR + 11, 5, 3, 2, 2, 1),  # the same at stride 2
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, H, W, K, R, S, stride, padding", BLOCKING)
def test_conv2d_across_gemm_block_edges(rng, N, C, H, W, K, R, S, stride, padding, dtype):
    x, w, b = _conv_case(rng, N, (C, K, 1), ((H, W), (R, S)), dtype)
    params = dict(stride=stride, padding=padding)
    assert_close(fastconv.conv2d(x, w, b, **params, algorithm="gemm"), reference.conv2d(x, w, b, **params))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", PADDING)
@pytest.mark.parametrize("stride, dilation", STRIDE_DILATION)
@pytest.mark.parametrize("channels", [(4, 6, 1), (4, 6, 2)])
def test_wide_images_pack_patches_in_runs(rng, channels, stride, dilation, padding, dtype):
    """Output rows wider than GATHER_MAX_WIDTH: the forward pass copies its patches in runs, not gathered."""
    x, w, b = _conv_case(rng, 2, channels, ((5, 3 * GATHER_MAX_WIDTH + 7), (3, 3)), dtype)
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=channels[2])
    y = fastconv.conv2d(x, w, b, **params, algorithm="gemm")
    assert y.shape[3] > GATHER_MAX_WIDTH
    assert_close(y, reference.conv2d(x, w, b, **params))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride, dilation", [(2, 1), ((2, 1), 1), (3, (1, 2))])
def test_strided_input_gradient_adds_long_runs_in_row_blocks(rng, stride, dilation, dtype):
    """col2im on rows of 20 to 75 values (whole vectors and a masked rest, in float32 and float64), one image
    of one channel split into blocks of rows, one task each."""
    x, w, _ = _conv_case(rng, 1, (1, 3, 1), ((9, 75), (3, 4)), dtype)
    params = dict(stride=stride, padding=1, dilation=dilation)
    dy = random_array(rng, fastconv.conv2d(x, w, **params).shape, dtype)
    assert_close(fastconv.conv2d_input(x.shape, w, dy, **params), reference.conv2d_input(x.shape, w, dy, **params))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(
    "kernel, H, W", [((2, 2), 8, 6), ((4, 4), 8, 12), ((2, 3), 6, 9), ((2, 2), 7, 6), ((3, 3), 9, 9)]
)
def test_patchify_layers_are_plain_gemms_of_the_stride_phases(rng, kernel, H, W, groups, dtype):
    """Filters the size of the stride (ViT, ConvNeXt stems; a 2x2 s2 down-sampling): over a whole number of
    strides the stride phases are the patch matrix itself; otherwise (7 rows at stride 2) the usual path."""
    x, w, b = _conv_case(rng, 3, (4, 6, groups), ((H, W), kernel), dtype)
    params = dict(stride=kernel, groups=groups)
    _check_conv2d_family(x, w, b, **params)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "channels, sizes, params",
    [
        ((72, 10, 1), ((9, 30), (3, 3)), dict(stride=2, padding=1)),  # patches from stride phases, 2 KC blocks
        ((128, 12, 2), ((7, 7), (3, 3)), dict(padding=1, groups=2)),  # gathered patches, groups
        ((130, 6, 1), ((5, 6), (2, 2)), dict(stride=1)),  # 520 taps: a last block of 8
    ],
)
def test_weights_packed_a_block_at_a_time_give_the_same_bits(rng, monkeypatch, channels, sizes, params, dtype):
    """Weights beyond A_BLOCK_BYTES are packed a KC block at a time, just before the block's products: the
    same sums in the same order as with the weights packed whole."""
    monkeypatch.setattr(_conv_kernels, "shifted_pays", lambda *args: False)
    x, w, b = _conv_case(rng, 2, channels, sizes, dtype)
    assert w[0].size > KC
    whole = fastconv.conv2d(x, w, b, **params, algorithm="gemm")
    monkeypatch.setattr(_conv_kernels, "A_BLOCK_BYTES", 0)
    by_blocks = fastconv.conv2d(x, w, b, **params, algorithm="gemm")
    np.testing.assert_array_equal(by_blocks, whole)
    assert_close(by_blocks, reference.conv2d(x, w, b, **params))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("images_per_block", [0, 1, 2])
def test_strided_patches_read_from_stride_phases_in_blocks_of_images(rng, monkeypatch, images_per_block, dtype):
    """A strided layer's patches come from the input's stride phases, split for as many images as the column
    buffer holds: here 2, 1 or none (too large: patches read at the stride instead) of 3."""
    monkeypatch.setattr(_conv_kernels, "shifted_pays", lambda *args: False)
    x, w, b = _conv_case(rng, 3, (4, 6, 1), ((9, 2 * GATHER_MAX_WIDTH + 9), (3, 3)), dtype)
    image_bytes = np.prod(_im2col.phase_shape((1, *x.shape[1:]), 2, 2)) * x.itemsize
    monkeypatch.setattr(_conv_kernels, "COLUMN_BUFFER_BYTES", max(1, images_per_block * image_bytes))
    splits = []
    split = _conv_kernels._space_to_depth
    monkeypatch.setattr(_conv_kernels, "_space_to_depth", lambda x, *args: splits.append(len(x)) or split(x, *args))
    params = dict(stride=2, padding=1)
    assert_close(fastconv.conv2d(x, w, b, **params, algorithm="gemm"), reference.conv2d(x, w, b, **params))
    assert splits == {0: [], 1: [1, 1, 1], 2: [2, 1]}[images_per_block]


STRIDE_ONE = [  # (N, C, H, W, K, R, S, padding, dilation, groups): stride-1 layers for both ways of reading B
    (2, 3, 9, 11, 5, 3, 3, 1, 1, 1),
    (3, 6, 7, 20, 9, 3, 5, ((2, 0), (1, 3)), (1, 2), 3),  # asymmetric padding, dilation, groups
    (1, 4, 6, 6, 4, 2, 2, "same", 1, 1),  # an even filter: 'same' pads one side more
    (2, 2, 5, NR + 9, 3, 2, 3, 0, 2, 1),  # rows wider than a tile of NR positions
    (2, KC // 8 + 3, 5, 6, MC + 5, 3, 3, 1, 1, 1),  # taps across two KC blocks, filters across two MC blocks
    (1, 2, 1, 1, 3, 3, 3, 1, 1, 1),  # one pixel, all its taps but one in the padding
]
STRIDED = [  # (stride, padding, dilation): the same layers read from padded stride phases
    (2, 1, 1),
    ((3, 2), ((1, 2), (0, 3)), (2, 1)),
    ((1, 3), 2, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("N, C, H, W, K, R, S, padding, dilation, groups", STRIDE_ONE)
def test_stride_one_patches_packed_or_read_from_the_padded_input(
    rng, monkeypatch, N, C, H, W, K, R, S, padding, dilation, groups, shifted, dtype
):
    """The forward pass by GEMM of a stride-1 layer reads B from packed patches or straight from the padded
    input (``_shifted.py``), by the rule of ``shifted_pays``, and its weight gradient likewise: here each way
    forced, on every shape."""
    monkeypatch.setattr(_conv_kernels, "shifted_pays", lambda *args: shifted)
    monkeypatch.setattr(conv_module, "shifted_weight_grad_pays", lambda *args: shifted)
    x, w, b = _conv_case(rng, N, (C, K, groups), ((H, W), (R, S)), dtype)
    params = dict(padding=padding, dilation=dilation, groups=groups)
    _check_gemm_paths(rng, x, w, b, params)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("stride, padding, dilation", STRIDED)
@pytest.mark.parametrize("N, C, H, W, K, R, S", [case[:7] for case in STRIDE_ONE[:4]])
def test_strided_patches_packed_or_read_from_padded_stride_phases(
    rng, monkeypatch, N, C, H, W, K, R, S, stride, padding, dilation, shifted, dtype
):
    """The same at a stride: patches packed from the stride phases, or B read from the padded stride phases
    (deinterleaved in pairs at stride 2, with an even or odd left padding; one value at a time at stride 3)."""
    monkeypatch.setattr(_conv_kernels, "shifted_pays", lambda *args: shifted)
    monkeypatch.setattr(conv_module, "shifted_weight_grad_pays", lambda *args: shifted)
    x, w, b = _conv_case(rng, N, (C, K, 1), ((H + 4, W + 3), (R, S)), dtype)
    _check_gemm_paths(rng, x, w, b, dict(stride=stride, padding=padding, dilation=dilation))


def _check_gemm_paths(rng, x, w, b, params):
    """conv2d by GEMM (with and without a bias), its input gradient and its weight gradient, on one layer."""
    expected = reference.conv2d(x, w, b, **params)
    assert_close(fastconv.conv2d(x, w, b, **params, algorithm="gemm"), expected)
    assert_close(fastconv.conv2d(x, w, None, **params, algorithm="gemm"), reference.conv2d(x, w, None, **params))
    dy = random_array(rng, expected.shape, x.dtype)
    assert_close(fastconv.conv2d_input(x.shape, w, dy, **params), reference.conv2d_input(x.shape, w, dy, **params))
    assert_close(fastconv.conv2d_weight(x, w.shape, dy, **params), reference.conv2d_weight(x, w.shape, dy, **params))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("images_per_block", [0, 1, 2])
def test_padded_input_in_blocks_of_images(rng, monkeypatch, images_per_block, dtype):
    """The padded input is made for as many images as the column buffer holds (at least one): 2, 1 or 1 of 3."""
    x, w, b = _conv_case(rng, 3, (4, 6, 1), ((9, 10), (3, 3)), dtype)
    monkeypatch.setattr(_conv_kernels, "shifted_pays", lambda *args: True)  # float64 too
    monkeypatch.setattr(_conv_kernels, "COLUMN_BUFFER_BYTES", max(1, images_per_block * 4 * 11 * 12 * x.itemsize))
    blocks = []
    pad = _conv_kernels._pad_phases
    monkeypatch.setattr(_conv_kernels, "_pad_phases", lambda x, *args: blocks.append(len(x)) or pad(x, *args))
    assert_close(fastconv.conv2d(x, w, b, padding=1), reference.conv2d(x, w, b, padding=1))
    assert blocks == {0: [1, 1, 1], 1: [1, 1, 1], 2: [2, 1]}[images_per_block]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("images_per_block", [0, 1, 2])
def test_weight_gradient_from_the_padded_input_in_blocks_of_images(rng, monkeypatch, images_per_block, dtype):
    """The weight gradient by ``_shifted.py`` works on as many images as the column buffer holds (at least one)
    and sums the blocks' partial gradients in order; 27 taps and 41 filters (48 with the padding to whole
    vectors) end in partial tiles of taps and filters."""
    x, w, _ = _conv_case(rng, 3, (3, 41, 1), ((9, 10), (3, 3)), dtype)
    monkeypatch.setattr(conv_module, "shifted_weight_grad_pays", lambda *args: True)
    # Per image, the largest buffer is the partial sums: 3 tasks of 3 output rows x 48 taps x 48 filters.
    monkeypatch.setattr(_conv_kernels, "COLUMN_BUFFER_BYTES", max(1, images_per_block * 3 * 48 * 48 * x.itemsize))
    blocks = []
    pad = _conv_kernels._pad_phases
    monkeypatch.setattr(_conv_kernels, "_pad_phases", lambda x, *args: blocks.append(len(x)) or pad(x, *args))
    dy = random_array(rng, (3, 41, 7, 5), dtype)
    params = dict(stride=(1, 2), padding=(0, 1))
    expected = reference.conv2d_weight(x, w.shape, dy, **params)
    assert_close(fastconv.conv2d_weight(x, w.shape, dy, **params), expected)
    assert blocks == {0: [1, 1, 1], 1: [1, 1, 1], 2: [2, 1]}[images_per_block]


PHASE_CASES = [  # (N, C, H, W, K, R, S, stride, padding, groups) of conv2d
    (2, 3, 9, 8, 4, 3, 3, (2, 2), (1, 1), 1),  # ResNet's downsampling: 2x2, 2x1, 1x2 and 1x1 taps
    (1, 4, 11, 10, 2, 5, 3, (2, 3), (2, 0), 1),  # unequal strides, odd sizes
    (2, 2, 7, 9, 3, 1, 1, (2, 2), (0, 0), 1),  # 1x1: three phases no tap reaches (zeros)
    (1, 2, 10, 11, 3, 2, 2, (3, 3), (0, 1), 1),  # filter smaller than the stride: empty phases
    (2, 2, 6, 7, 2, 3, 3, (2, 2), (4, 3), 1),  # padding wider than the filter: phases cropped
    (1, 3, 1, 1, 2, 1, 1, (2, 2), (3, 3), 1),  # every output reads padding: no phase reached, zeros
    (2, 6, 9, 9, 2 * (DIRECT_MAX_OUT_PER_GROUP + 1), 3, 3, (2, 2), (1, 1), 2),  # groups (not direct)
]


@pytest.mark.parametrize("case", PHASE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_input_gradient_by_stride_phases(rng, monkeypatch, case, dtype):
    """The input gradient one stride phase of the input at a time (``conv._input_grad_by_phases``), taken for
    every layer here, against the reference: conv2d_input, and conv_transpose2d with bias and every
    output_padding (an input one row or column longer: phases of unequal sizes)."""
    N, C, H, W, K, R, S, stride, padding, groups = case
    monkeypatch.setattr(conv_module, "_phases_pay", lambda geometry: True)
    w = random_array(rng, (K, C // groups, R, S), dtype)
    P, Q = (conv_output_size(n, k, s, p, p, 1) for n, k, s, p in zip((H, W), (R, S), stride, padding))
    dy = random_array(rng, (N, K, P, Q), dtype)
    params = dict(stride=stride, padding=padding, groups=groups)
    expected = reference.conv2d_input((N, C, H, W), w, dy, **params)
    assert_close(fastconv.conv2d_input((N, C, H, W), w, dy, **params), expected)
    bias = random_array(rng, (C,), dtype)
    for output_padding in [(0, 0), (stride[0] - 1, stride[1] - 1)]:
        expected = reference.conv_transpose2d(dy, w, bias, output_padding=output_padding, **params)
        assert_close(fastconv.conv_transpose2d(dy, w, bias, output_padding=output_padding, **params), expected)


COLUMN_CASES = [  # (N, C, H, W, K, R, S, padding, dilation, groups) of conv2d at stride 1: K / groups >= 2 N P Q
    (1, 8, 4, 4, 40, 3, 3, (1, 1), (1, 1), 1),  # the small-batch layer at the end of a ResNet, scaled down
    (2, 6, 3, 2, 48, 3, 2, ((2, 0), (1, 1)), (1, 2), 2),  # asymmetric padding, dilation, groups
    (1, 4, 5, 5, 56, 5, 5, (0, 0), (1, 1), 1),  # 5x5, unpadded: one output pixel
]


@pytest.mark.parametrize("case", COLUMN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stride_1_input_gradient_of_many_filters_by_columns(rng, monkeypatch, case, dtype):
    """At stride 1, an input gradient with twice as many filters per group as output pixels is the column
    matrix added back (``conv._input_grad_by_columns``), not conv2d of the flipped filters: against the
    reference, conv2d_input and conv_transpose2d with a bias."""
    N, C, H, W, K, R, S, padding, dilation, groups = case
    taken = []
    path = conv_module._input_grad_by_columns
    monkeypatch.setattr(conv_module, "_input_grad_by_columns", lambda *args: taken.append(1) or path(*args))
    w = random_array(rng, (K, C // groups, R, S), dtype)
    params = dict(padding=padding, dilation=dilation, groups=groups)
    dy = random_array(rng, fastconv.conv2d(np.zeros((N, C, H, W), dtype), w, **params).shape, dtype)
    assert 2 * dy[:, 0].size <= K // groups
    expected = reference.conv2d_input((N, C, H, W), w, dy, **params)
    assert_close(fastconv.conv2d_input((N, C, H, W), w, dy, **params), expected)
    bias = random_array(rng, (C,), dtype)
    if padding == (0, 0) or isinstance(padding[0], int):  # conv_transpose2d pads symmetrically
        expected = reference.conv_transpose2d(dy, w, bias, **params)
        assert_close(fastconv.conv_transpose2d(dy, w, bias, **params), expected)
    assert len(taken) == (2 if padding == (0, 0) or isinstance(padding[0], int) else 1)


@pytest.mark.parametrize("case", [(2, 6, 3, 4, 4, 2, 2, 1), (1, 12, 2, 3, 6, 3, 2, 2), (2, 40, 4, 4, 36, 4, 4, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_patchify_input_gradient_is_one_gemm_put_in_place(rng, monkeypatch, case, dtype):
    """conv_transpose2d of a patchify layer (U-Net's 2x2 s2 up-convolution), conv2d_input of one: a 1x1
    convolution onto all the stride phases at once, then depth-to-space; the bias added on the way."""
    N, C_in, H, W, C_out, R, S, groups = case
    taken = []
    path = conv_module._input_grad_of_patchify
    monkeypatch.setattr(conv_module, "_input_grad_of_patchify", lambda *args: taken.append(1) or path(*args))
    x = random_array(rng, (N, C_in, H, W), dtype)
    w = random_array(rng, (C_in, C_out // groups, R, S), dtype)
    bias = random_array(rng, (C_out,), dtype)
    params = dict(stride=(R, S), groups=groups)
    assert_close(fastconv.conv_transpose2d(x, w, bias, **params), reference.conv_transpose2d(x, w, bias, **params))
    shape = (N, C_out, H * R, W * S)
    assert_close(fastconv.conv2d_input(shape, w, x, **params), reference.conv2d_input(shape, w, x, **params))
    assert len(taken) == 2
    # One more output row than whole strides (output_padding) is not patchify: the usual path, same answer.
    expected = reference.conv_transpose2d(x, w, bias, output_padding=(1, 0), **params)
    assert_close(fastconv.conv_transpose2d(x, w, bias, output_padding=(1, 0), **params), expected)
    assert len(taken) == 2


@pytest.mark.parametrize("case", [(2, 6, 3, 4, 4, 2, 2, 1), (1, 4, 2, 3, 6, 3, 2, 2), (2, 40, 4, 4, 36, 4, 4, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_patchify_transposed_backward_on_shared_stride_phases(rng, monkeypatch, case, dtype):
    """conv_transpose2d_backward of a patchify layer (filter = stride, no padding) splits grad_output into its
    stride phases once; both gradients are then 1x1 problems on them."""
    N, C_in, H, W, C_out, R, S, groups = case
    split = []
    phases = conv_module._patchify_phases
    monkeypatch.setattr(conv_module, "_patchify_phases", lambda *args: split.append(phases(*args)) or split[-1])
    x = random_array(rng, (N, C_in, H, W), dtype)
    w = random_array(rng, (C_in, C_out // groups, R, S), dtype)
    dy = random_array(rng, (N, C_out, H * R, W * S), dtype)
    params = dict(stride=(R, S), groups=groups)
    expected = reference.conv_transpose2d_backward(x, w, dy, **params)
    for got, want in zip(fastconv.conv_transpose2d_backward(x, w, dy, **params), expected):
        assert_close(got, want)
    assert len(split) == 1 and split[0] is not None


@pytest.mark.parametrize("stride", [(2, 2), (3, 2), (2, 3), (1, 3)])
@pytest.mark.parametrize("size", [(6, 8), (7, 9), (1, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_space_to_depth_splits_phases_and_sums_planes(rng, stride, size, dtype):
    """Each stride phase, zero past the edge, against NumPy's strided slices; the plane sums against NumPy's,
    and the same phases without them."""
    sh, sw = stride
    x = random_array(rng, (2, 3, *size), dtype)
    shape = _im2col.phase_shape(x.shape, sh, sw)
    phases, plain = np.full(shape, np.nan, dtype), np.full(shape, np.nan, dtype)
    plane_sums = np.full(x.shape[:2], np.nan)
    _im2col._space_to_depth(x, np.int64(sh), np.int64(sw), phases, plane_sums)
    _im2col._space_to_depth(x, np.int64(sh), np.int64(sw), plain, _im2col.NO_PLANE_SUMS)
    expected = np.zeros(shape, dtype)
    for a in range(sh):
        for b in range(sw):
            phase = x[:, :, a::sh, b::sw]
            expected[:, a * sw + b :: sh * sw, : phase.shape[2], : phase.shape[3]] = phase
    np.testing.assert_array_equal(phases, expected)
    np.testing.assert_array_equal(plain, expected)
    # Rows summed in x's dtype: within a few of its epsilons of the sum of magnitudes.
    bound = 8 * np.finfo(dtype).eps * np.abs(x).sum(axis=(2, 3), dtype=np.float64)
    assert (np.abs(plane_sums - x.sum(axis=(2, 3), dtype=np.float64)) <= bound).all()


def test_stride_phases_pay_for_a_shallow_column_matrix():
    def pays(N, C, H, K, R=3, stride=2, dilation=1):
        geometry = _validate.conv2d_geometry("conv2d", (N, C, H, H), (K, C, R, R), stride, R // 2, dilation, 1)
        return conv_module._phases_pay(geometry)

    assert pays(8, 64, 56, 128) and pays(32, 32, 32, 64) and pays(8, 64, 32, 32, R=5)
    assert not pays(8, 128, 28, 256)  # a deep GEMM: the column matrix pays
    assert not pays(8, 3, 224, 64, R=7)  # RGB: too few outputs for the phases' convolutions
    assert not pays(8, 128, 28, 128)  # 14x14 phases
    assert not pays(1, 64, 56, 128) and not pays(1, 128, 56, 128)  # 784 positions in all: too few
    assert pays(16, 64, 32, 32) and pays(1, 32, 112, 64)  # 4096 and 3136 positions, little work
    assert not pays(8, 64, 56, 128, dilation=2)


@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_stride_phases_match_numpy_padding(rng, stride, dtype):
    """``_pad_phases``' planes against NumPy's padding and slicing: at stride 1 and 2 (each a fast path: planes
    zeroed whole, rows copied or split into even and odd columns by vector intrinsics) and 3 (the general
    loop); padding from 0 to 3, phases that crop the input or reach past it; odd sizes, rows longer than a
    vector; the values past the last plane zeroed."""
    from fastconv._shifted import _pad_phases

    sh, sw = stride
    for N, C, H, W in [(2, 3, 7, 9), (1, 1, 1, 1), (1, 2, 5, 70)]:
        x = random_array(rng, (N, C, H, W), dtype)
        for pt, pl in [(0, 0), (1, 1), (2, 3), (3, 0)]:
            full = (-(-(H + 2 * pt) // sh), -(-(W + 2 * pl) // sw))
            for Hp, Wp in [full, (1, 2), (H + 5, 2)]:
                xp = np.full(N * C * sh * sw * Hp * Wp + 40, np.nan, dtype)
                _pad_phases(x, pt, pl, sh, sw, Hp, Wp, xp)
                padded = np.zeros((N, C, max(sh * Hp, H + pt), max(sw * Wp, W + pl)), dtype)
                padded[:, :, pt : pt + H, pl : pl + W] = x
                phases = [padded[:, :, a::sh, b::sw][:, :, :Hp, :Wp] for a in range(sh) for b in range(sw)]
                want = np.stack(phases, 2).ravel()
                np.testing.assert_array_equal(xp[: want.size], want)
                np.testing.assert_array_equal(xp[want.size :], 0)


def test_padded_input_is_read_for_few_filters_per_group_and_little_waste():
    """``shifted_pays``: at most SHIFTED_MAX_OUT_PER_GROUP filters per group, few positions computed past the
    output for the filters there are (SHIFTED_WASTE_BUDGET), or any filters if A is read little in all (small
    batches); few taps per group at a stride."""
    from fastconv._shifted import shifted_pays

    def pays(N, C, H, K, R=3, stride=1, groups=1):
        g = _validate.conv2d_geometry("conv2d", (N, C, H, H), (K, C // groups, R, R), stride, R // 2, 1, groups)
        return shifted_pays(g.kernel_geometry, g.input_shape, g.weight_shape, groups, *g.output_shape[2:], np.float32)

    assert pays(32, 32, 32, 32) and pays(32, 3, 32, 32) and pays(8, 128, 28, 128) and pays(8, 64, 16, 64)
    assert pays(8, 32, 14, 32) and pays(8, 256, 28, 256, groups=2)
    assert pays(8, 3, 224, 64, R=7, stride=2)  # a stem: 147 taps
    assert not pays(16, 128, 14, 128)  # 60 wasted positions in 256, times 128 filters (and 36 MiB of A read)
    assert not pays(8, 64, 8, 64, stride=2)  # 4 x 4 outputs in a tile of NR
    assert not pays(8, 256, 28, 256) and not pays(8, 512, 56, 512)  # many filters: packed patches
    assert pays(1, 512, 7, 512) and pays(2, 512, 7, 512) and not pays(4, 512, 7, 512)  # unless A is read little
    assert not pays(8, 64, 56, 128, stride=2) and not pays(8, 64, 56, 64, R=1)  # 576 taps at a stride; 1x1
    assert not pays(1, 4096, 64, 32)  # one image's padded input larger than the column buffer
    g = _validate.conv2d_geometry("conv2d", (32, 32, 32, 32), (32, 32, 3, 3), 1, 1, 1, 1)
    assert not shifted_pays(g.kernel_geometry, g.input_shape, g.weight_shape, 1, 32, 32, np.float64)


OUTER_CASES = [  # (N, C, H, W, K, R, S, stride, padding, dilation, groups) of conv2d, forced by outer products
    (2, 8, 20, 35, 40, 3, 3, (2, 2), (1, 2), 1, 1),  # 19 pixels a row, tiles of 8: the last overlaps the second
    (2, 8, 20, 56, 40, 3, 3, (1, 2), 1, (2, 1), 2),  # tiles of 14, dilation, groups; 40 filters: a tile part empty
    (1, 6, 17, 33, 20, 5, 3, (3, 2), (2, 0), 1, 2),  # row stride 3, 16 pixels a row: two tiles of 8
    (3, 4, 9, 22, 33, 2, 2, (1, 2), 0, 1, 1),  # 11 pixels a row
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", OUTER_CASES)
def test_forward_by_outer_products(rng, monkeypatch, case, bias, dtype):
    """``_shifted._outer_forward``, taken by any layer here: tiles of 14 or 8 pixels of a row by two vectors of
    filters, the bias added to (``accumulate``) or the output overwritten; with a bias, one image padded at a
    time (the column buffer holds no more)."""
    N, C, H, W, K, R, S, stride, padding, dilation, groups = case
    x, w, b = _conv_case(rng, N, (C, K, groups), ((H, W), (R, S)), dtype, bias)
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    monkeypatch.setattr(_conv_kernels, "outer_pays", lambda *args: True)
    if bias:
        monkeypatch.setattr(_conv_kernels, "COLUMN_BUFFER_BYTES", 1)
    outer = _conv_kernels._outer_forward
    calls = []
    monkeypatch.setattr(_conv_kernels, "_outer_forward", lambda *args: calls.append(1) or outer(*args))
    assert_close(fastconv.conv2d(x, w, b, algorithm="gemm", **params), reference.conv2d(x, w, b, **params))
    assert calls


def test_forward_by_outer_products_for_strided_layers_of_whole_tiles():
    """``outer_pays``: stride 2, rows a multiple of 14 or 8 pixels, 256 to 1152 taps per group, two vectors of
    filters at least."""
    from fastconv._shifted import outer_pays

    def pays(C, H, K, R=3, stride=2, groups=1, dtype=np.float32):
        g = _validate.conv2d_geometry("conv2d", (8, C, H, H), (K, C // groups, R, R), stride, R // 2, 1, groups)
        return outer_pays(g.kernel_geometry, g.weight_shape, groups, g.output_shape[3], np.dtype(dtype).itemsize)

    assert pays(64, 56, 128) and pays(128, 28, 256) and pays(32, 56, 64) and pays(16, 56, 32, R=5)
    assert pays(64, 56, 16, dtype=np.float64) and not pays(64, 56, 16)  # two vectors: 16 float64, 32 float32
    assert pays(64, 32, 128) and pays(64, 64, 32)  # rows of 16 and 32 pixels: tiles of 8
    assert not pays(64, 56, 128, stride=1) and not pays(64, 24, 128)  # stride 1; 12 pixels a row
    assert not pays(256, 28, 256) and not pays(3, 224, 64, R=7)  # 2304 taps; the stem's 147


def test_weight_gradient_reads_the_padded_input_for_few_filters():
    from fastconv._shifted import SHIFTED_WEIGHT_GRAD_WIDE_FILTERS as MOST
    from fastconv._shifted import shifted_weight_grad_pays

    def pays(C, K, R=3, stride=1, groups=1, H=32, N=8):
        geometry = _validate.conv2d_geometry("conv2d", (N, C, H, H), (K, C // groups, R, R), stride, 1, 1, groups)
        return shifted_weight_grad_pays(geometry, np.float32)

    assert pays(32, MOST) and pays(3, 16) and pays(64, 64, groups=2) and pays(32, 32, R=5, stride=2)
    assert not pays(32, MOST + 1) and not pays(32, 32, R=1) and not pays(4096, 32, H=64)
    # Beyond 64 filters, only with few taps (at most 1152) and many pixels a task (196 here, 98 at N=4)
    assert pays(64, 128, stride=2, H=56) and pays(128, 128, stride=2, H=28)
    assert not pays(256, 128, stride=2, H=28) and not pays(128, 128, stride=2, H=28, N=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C, K, groups", [(12, 5, 1), (24, 10, 2), (8, 8, 1), (5, 12, 1)])
@pytest.mark.parametrize("H, W", [(9, 7), (33, 21)])
def test_pointwise_weight_gradient_in_either_orientation(rng, C, K, groups, H, W, dtype):
    """A 1x1 layer with fewer output than input channels computes its weight gradient transposed where there
    are pixels for 4 ranges of KC (3 x 33 x 21 of them), as it is otherwise."""
    x, w, _ = _conv_case(rng, 3, (C, K, groups), ((H, W), (1, 1)), dtype)
    dy = random_array(rng, (3, K, H, W), dtype)
    expected = reference.conv2d_weight(x, w.shape, dy, groups=groups)
    assert_close(fastconv.conv2d_weight(x, w.shape, dy, groups=groups), expected)


@pytest.mark.parametrize("N", [0, 1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_batch_sizes_and_bias(rng, N, bias, dtype):
    x, w, b = _conv_case(rng, N, (4, 6, 2), ((6, 5), (3, 2)), dtype, bias)
    _check_conv2d_family(x, w, b, stride=(2, 1), padding=1, groups=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_input_gives_unbatched_output(rng, dtype):
    x, w, b = _conv_case(rng, 1, (3, 4, 1), ((6, 6), (3, 3)), dtype)
    y = fastconv.conv2d(x[0], w, b, padding=1)
    assert y.shape == (4, 6, 6)
    assert_close(y, fastconv.conv2d(x, w, b, padding=1)[0])
    dy = random_array(rng, y.shape, dtype)
    dx, dw, db = fastconv.conv2d_backward(x[0], w, dy, padding=1)
    assert dx.shape == x.shape[1:]
    assert_close(dx, fastconv.conv2d_input(x.shape[1:], w, dy, padding=1))
    assert_close(dw, fastconv.conv2d_weight(x[0], w.shape, dy, padding=1))
    yt = fastconv.conv_transpose2d(y, w.transpose(0, 1, 2, 3), None, padding=1)
    assert yt.shape == (3, 6, 6)


TRANSPOSE_CHANNELS = [(1, 1, 1), (3, 4, 1), (4, 6, 2), (3, 3, 3)]  # (C_in, C_out, groups)
TRANSPOSE_SIZES = [((1, 1), (1, 1)), ((4, 4), (4, 4)), ((3, 5), (3, 2)), ((5, 2), (2, 3))]
TRANSPOSE_STRIDE_DILATION = [(1, 1), (2, 1), ((3, 2), 1), (1, 2), (2, (1, 3))]
OUTPUT_PADDING = [0, 1, (1, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output_padding", OUTPUT_PADDING)
@pytest.mark.parametrize("padding", [0, 1, (0, 2)])
@pytest.mark.parametrize("stride, dilation", TRANSPOSE_STRIDE_DILATION)
@pytest.mark.parametrize("sizes", TRANSPOSE_SIZES)
@pytest.mark.parametrize("channels", TRANSPOSE_CHANNELS)
def test_conv_transpose2d_and_gradients(rng, channels, sizes, stride, dilation, padding, output_padding, dtype):
    pair = lambda value: (value, value) if isinstance(value, int) else value  # noqa: E731
    (C_in, C_out, groups), ((H, W), (R, S)) = channels, sizes
    s, d, p, op = pair(stride), pair(dilation), pair(padding), pair(output_padding)
    x = random_array(rng, (2, C_in, H, W), dtype)
    w = random_array(rng, (C_in, C_out // groups, R, S), dtype)
    b = random_array(rng, (C_out,), dtype)
    params = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
    out = [transpose_output_size(n, k, s[i], p[i], op[i], d[i]) for i, (n, k) in enumerate([(H, R), (W, S)])]
    if any(op[i] >= max(s[i], d[i]) for i in range(2)):
        refusal = "output padding must be smaller than either stride or dilation"
    elif min(out) < 1:
        refusal = "Output size is too small"
    else:
        refusal = None
    if refusal:
        for lib in (fastconv, reference):
            with pytest.raises(ValueError, match=refusal):
                lib.conv_transpose2d(x, w, b, **params)
        return
    y = fastconv.conv_transpose2d(x, w, b, **params)
    assert_close(y, reference.conv_transpose2d(x, w, b, **params))
    dy = random_array(rng, y.shape, dtype)
    expected = reference.conv_transpose2d_backward(x, w, dy, **params)
    for actual, want in zip(fastconv.conv_transpose2d_backward(x, w, dy, **params), expected):
        assert_close(actual, want)


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), ((2, 3), (1, 0), (1, 2))])
def test_conv_transpose2d_is_the_input_gradient_of_conv2d(rng, stride, padding, dilation):
    """conv_transpose2d(y, w) == conv2d_input(x.shape, w, y): each fast one against the other's reference."""
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=2)
    x = random_array(rng, (2, 4, 9, 8), "float64")
    w = random_array(rng, (6, 2, 3, 3), "float64")
    y = random_array(rng, fastconv.conv2d(x, w, **params).shape, "float64")
    # output_padding makes up the input rows and columns that conv2d's floor division left out.
    output_padding = tuple(
        x.shape[2 + i]
        - transpose_output_size(
            y.shape[2 + i], w.shape[2 + i], _pair(stride)[i], _pair(padding)[i], 0, _pair(dilation)[i]
        )
        for i in range(2)
    )
    actual = fastconv.conv_transpose2d(y, w, None, output_padding=output_padding, **params)
    assert_close(actual, reference.conv2d_input(x.shape, w, y, **params))
    # And the other way round: conv2d is conv_transpose2d's input gradient.
    dx, _, _ = reference.conv_transpose2d_backward(y, w, x, output_padding=output_padding, **params)
    assert_close(fastconv.conv2d(x, w, **params), dx)
