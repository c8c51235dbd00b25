"""Bad input: the right exception, naming the argument and the values seen, from fastconv and the reference."""

import numpy as np
import pytest

import fastconv
from fastconv import reference

X = np.ones((2, 4, 8, 8))
W = np.ones((6, 4, 3, 3))
WT = np.ones((4, 6, 3, 3))  # conv_transpose2d weight: (C_in, C_out // groups, R, S)
DY = np.ones((2, 6, 6, 6))


@pytest.fixture(params=[fastconv, reference], ids=["fastconv", "reference"])
def lib(request):
    return request.param


CONV2D_ERRORS = [
    # (kwargs overriding conv2d(X, W), exception, words the message must contain)
    (dict(input=np.ones((8, 8))), ValueError, ["input", "(8, 8)", "3D (unbatched) or 4D"]),
    (dict(input=np.ones((1, 2, 4, 8, 8))), ValueError, ["input", "(1, 2, 4, 8, 8)"]),
    (dict(weight=np.ones((6, 4, 3))), ValueError, ["weight", "(6, 4, 3)"]),
    (dict(input=np.ones((2, 3, 8, 8))), ValueError, ["input", "(2, 3, 8, 8)", "4 channels", "3 channels"]),
    (dict(weight=np.ones((6, 2, 3, 3)), groups=3), ValueError, ["groups=3", "(6, 2, 3, 3)", "6 channels"]),
    (dict(weight=np.ones((5, 2, 3, 3)), groups=2), ValueError, ["groups=2", "(5, 2, 3, 3)", "divisible"]),
    (dict(groups=0), ValueError, ["groups", "0"]),
    (dict(groups=-2), ValueError, ["groups", "-2"]),
    (dict(groups=1.0), TypeError, ["groups", "float"]),
    (dict(groups=True), TypeError, ["groups", "bool"]),
    (dict(stride=0), ValueError, ["non-positive stride", "stride=0"]),
    (dict(stride=(1, -1)), ValueError, ["stride", "(1, -1)"]),
    (dict(dilation=0), ValueError, ["non-positive dilation", "dilation=0"]),
    (dict(stride=1.5), TypeError, ["stride", "1.5"]),
    (dict(dilation=(1, True)), TypeError, ["dilation", "True"]),
    (dict(padding=-1), ValueError, ["negative padding", "padding=-1"]),
    (dict(padding=((0, 1), (-1, 0))), ValueError, ["negative padding"]),
    (dict(padding="full"), ValueError, ["padding", "'full'"]),
    (dict(padding=(1, 2, 3)), ValueError, ["padding", "(1, 2, 3)", "3 elements"]),
    (dict(padding=((1, 2, 3), (0, 0))), ValueError, ["padding", "(1, 2, 3)"]),
    (dict(padding=1.0), TypeError, ["padding", "1.0"]),
    (dict(weight=np.ones((6, 4, 9, 3))), ValueError, ["Kernel size can't be greater", "(8 x 8)", "(9 x 3)"]),
    (dict(dilation=4), ValueError, ["Kernel size can't be greater", "(9 x 9)"]),
    (dict(bias=np.ones(5)), ValueError, ["bias", "6 elements", "(5,)"]),
    (dict(bias=np.ones((6, 1))), ValueError, ["bias", "(6, 1)"]),
    (dict(input=X.astype(complex)), TypeError, ["input", "complex128"]),
    (dict(weight=W.astype(object)), TypeError, ["weight", "object"]),
    (dict(input=np.full((2, 4, 8, 8), "a")), TypeError, ["input", "<U1"]),
    (dict(input=X.astype(bool)), TypeError, ["input", "bool"]),
    (dict(input=X.astype(np.longdouble)), TypeError, ["float128", "input"]),
]


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="algorithm.*'fft'"):
        fastconv.conv2d(X, W, algorithm="fft")


@pytest.mark.parametrize("overrides, error, words", CONV2D_ERRORS)
def test_conv2d_errors(lib, overrides, error, words):
    if "longdouble" in str(overrides) and np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("long double is double on this platform")
    args = dict(input=X, weight=W, bias=None, stride=1, padding=0, dilation=1, groups=1) | overrides
    with pytest.raises(error) as info:
        lib.conv2d(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_backward_functions_check_like_conv2d(lib):
    with pytest.raises(ValueError, match="non-positive stride"):
        lib.conv2d_backward(X, W, DY, stride=0)
    with pytest.raises(ValueError, match="4 channels"):
        lib.conv2d_weight(np.ones((2, 3, 8, 8)), W.shape, DY)
    with pytest.raises(ValueError, match="input_size"):
        lib.conv2d_input((2, 4, 8), W[:, :, :, :], DY)  # unbatched size with a batched grad_output
    with pytest.raises(TypeError, match="input_size"):
        lib.conv2d_input((2, 4, 8.0, 8), W, DY)
    with pytest.raises(ValueError, match="weight_size"):
        lib.conv2d_weight(X, (6, 4, 3), DY)


@pytest.mark.parametrize(
    "function, args",
    [
        ("conv2d_backward", (X, W, np.ones((2, 6, 5, 6)))),
        ("conv2d_backward", (X, W, np.ones((2, 5, 6, 6)))),
        ("conv2d_input", (X.shape, W, np.ones((6, 6, 6)))),
        ("conv2d_weight", (X, W.shape, np.ones((3, 6, 6, 6)))),
        ("conv_transpose2d_backward", (np.ones((2, 4, 6, 6)), WT, np.ones((2, 5, 8, 8)))),
        ("conv_transpose2d_backward", (np.ones((2, 4, 6, 6)), WT, np.ones((2, 6, 8, 7)))),
    ],
)
def test_grad_output_must_match_the_forward_shapes(lib, function, args):
    with pytest.raises(ValueError) as info:
        getattr(lib, function)(*args)
    assert "grad_output" in str(info.value), str(info.value)


TRANSPOSE_ERRORS = [
    (dict(output_padding=2, stride=2), ValueError, ["output padding must be smaller", "(2, 2)"]),
    (dict(output_padding=1), ValueError, ["output padding must be smaller"]),
    (dict(output_padding=-1, stride=2), ValueError, ["negative output_padding"]),
    (dict(padding="same"), ValueError, ["padding", "'same'"]),
    (dict(input=np.ones((2, 5, 6, 6))), ValueError, ["input", "(2, 5, 6, 6)", "4 channels"]),
    (dict(weight=np.ones((4, 6, 3))), ValueError, ["weight", "(4, 6, 3)"]),
    (dict(groups=3), ValueError, ["groups=3", "divisible"]),
    (dict(bias=np.ones(4)), ValueError, ["bias", "6 elements"]),
    (dict(padding=5), ValueError, ["output size", "too small"]),
    (dict(input=np.ones((2, 4, 6, 6), complex)), TypeError, ["input", "complex"]),
    (dict(output_padding=(1.0, 0), stride=2), TypeError, ["output_padding"]),
]


@pytest.mark.parametrize("overrides, error, words", TRANSPOSE_ERRORS)
def test_conv_transpose2d_errors(lib, overrides, error, words):
    args = dict(input=np.ones((2, 4, 6, 6)), weight=WT, bias=None, stride=1, padding=0, output_padding=0) | overrides
    with pytest.raises(error) as info:
        lib.conv_transpose2d(**args)
    for word in words:
        assert word.lower() in str(info.value).lower(), (word, str(info.value))


def test_ragged_input_is_a_type_error(lib):
    with pytest.raises(TypeError, match="input"):
        lib.conv2d([[[1, 2], [3]]], W)
