"""The pure-Python shape rules, on their own."""

import pytest

from fastconv.shapes import conv_output_size, same_padding, transpose_output_size


@pytest.mark.parametrize(
    "in_size, kernel, stride, before, after, dilation, expected",
    [
        (5, 3, 1, 0, 0, 1, 3),
        (5, 3, 1, 1, 1, 1, 5),
        (5, 5, 1, 0, 0, 1, 1),  # kernel == input
        (5, 3, 2, 0, 0, 1, 2),
        (5, 1, 3, 0, 0, 1, 2),  # stride > kernel
        (7, 3, 1, 0, 0, 3, 1),  # dilated span 7
        (224, 7, 2, 3, 3, 1, 112),
        (4, 3, 1, 0, 2, 1, 4),  # asymmetric padding
        (2, 3, 1, 0, 0, 1, 0),  # does not fit
    ],
)
def test_conv_output_size(in_size, kernel, stride, before, after, dilation, expected):
    assert conv_output_size(in_size, kernel, stride, before, after, dilation) == expected


@pytest.mark.parametrize("in_size", range(1, 13))
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_same_padding_gives_ceil_output(in_size, kernel, stride, dilation):
    before, after = same_padding(in_size, kernel, stride, dilation)
    assert 0 <= before <= after <= before + 1
    assert conv_output_size(in_size, kernel, stride, before, after, dilation) == -(-in_size // stride)


def test_same_padding_matches_pytorch_rule_at_stride_1():
    # PyTorch pads total = dilation * (kernel - 1), left = total // 2.
    for kernel in range(1, 8):
        for dilation in (1, 2, 3):
            total = dilation * (kernel - 1)
            assert same_padding(10, kernel, 1, dilation) == (total // 2, total - total // 2)


@pytest.mark.parametrize(
    "in_size, kernel, stride, padding, output_padding, dilation, expected",
    [
        (3, 3, 1, 0, 0, 1, 5),
        (4, 4, 2, 1, 0, 1, 8),  # DCGAN
        (28, 2, 2, 0, 0, 1, 56),  # U-Net up-convolution
        (3, 3, 2, 1, 1, 1, 6),
        (3, 3, 1, 0, 1, 2, 8),  # output_padding < dilation
    ],
)
def test_transpose_output_size(in_size, kernel, stride, padding, output_padding, dilation, expected):
    assert transpose_output_size(in_size, kernel, stride, padding, output_padding, dilation) == expected


@pytest.mark.parametrize("in_size", [1, 4, 7])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", [0, 1])
def test_transpose_inverts_conv_size(in_size, kernel, stride, padding):
    # conv_transpose2d's output, fed to conv2d with the same parameters, gives back its input size.
    out = transpose_output_size(in_size, kernel, stride, padding, 0, 1)
    if out > 0:
        assert conv_output_size(out, kernel, stride, padding, padding, 1) == in_size
