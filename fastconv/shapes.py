"""Shape rules of 2-D convolution, as small pure functions.

Every size the public functions compute comes from here, so the rules can be read and tested on their own.
Sizes are per spatial axis: each function takes and returns plain ints.
"""

__all__ = [
    "conv_output_size",
    "same_padding",
    "transpose_output_size",
]


def conv_output_size(in_size, kernel, stride, pad_before, pad_after, dilation):
    """Output length of a convolution along one axis.

    ``floor((in + pad_before + pad_after - dilation * (kernel - 1) - 1) / stride) + 1``, as in PyTorch.
    Returns 0 or less when the dilated kernel does not fit in the padded input.

    Examples
    --------
    >>> conv_output_size(5, 3, stride=1, pad_before=0, pad_after=0, dilation=1)
    3
    >>> conv_output_size(224, 7, stride=2, pad_before=3, pad_after=3, dilation=1)
    112
    """
    span = dilation * (kernel - 1) + 1
    return (in_size + pad_before + pad_after - span) // stride + 1


def same_padding(in_size, kernel, stride, dilation):
    """Padding ``(before, after)`` that makes the output length ``ceil(in / stride)``.

    TensorFlow's rule, at every stride: total padding ``max((out - 1) * stride + span - in, 0)`` with
    ``span = dilation * (kernel - 1) + 1``, the smaller half before. At stride 1 it is PyTorch's ``'same'``.

    Examples
    --------
    >>> same_padding(5, 3, stride=1, dilation=1)
    (1, 1)
    >>> same_padding(5, 4, stride=1, dilation=1)
    (1, 2)
    >>> same_padding(7, 3, stride=2, dilation=1)
    (1, 1)
    """
    out = -(-in_size // stride)
    span = dilation * (kernel - 1) + 1
    total = max((out - 1) * stride + span - in_size, 0)
    return total // 2, total - total // 2


def transpose_output_size(in_size, kernel, stride, padding, output_padding, dilation):
    """Output length of a transposed convolution along one axis.

    ``(in - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1``, as in PyTorch.

    Examples
    --------
    >>> transpose_output_size(4, 4, stride=2, padding=1, output_padding=0, dilation=1)
    8
    >>> transpose_output_size(3, 3, stride=1, padding=0, output_padding=0, dilation=1)
    5
    """
    return (in_size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
