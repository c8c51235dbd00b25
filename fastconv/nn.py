"""Convolution layers for NumPy networks: parameters, forward, backward, with PyTorch's arguments and defaults.

A layer keeps what its backward pass needs from the last forward call, computes gradients with fastconv's
kernels and accumulates them into ``grad_weight`` / ``grad_bias`` (as PyTorch accumulates ``.grad``) until
``zero_grad()``.

Examples
--------
>>> import numpy as np
>>> from fastconv.nn import Conv2d
>>> layer = Conv2d(3, 8, kernel_size=3, padding=1, rng=np.random.default_rng(0))
>>> x = np.ones((2, 3, 16, 16), np.float32)
>>> y = layer.forward(x)
>>> y.shape
(2, 8, 16, 16)
>>> grad_x = layer.backward(np.ones_like(y))
>>> grad_x.shape, layer.grad_weight.shape
((2, 3, 16, 16), (8, 3, 3, 3))
"""

import math

import numpy as np

from . import _validate as v
from .conv import conv2d, conv2d_backward, conv_transpose2d, conv_transpose2d_backward
from .shapes import same_padding

__all__ = ["Conv2d", "ConvTranspose2d"]

#: PyTorch's padding modes and the ``np.pad`` mode that fills the same values.
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _uniform(rng, bound, shape, dtype):
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _check_layer(in_channels, out_channels, kernel_size, groups):
    """The kernel size as a pair and groups as an int, checked against the channel counts."""
    kernel = v.positive_pair("kernel_size", kernel_size)
    groups = v.check_groups(groups)
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"in_channels and out_channels must be divisible by groups, but got in_channels={in_channels}, "
            f"out_channels={out_channels}, groups={groups}"
        )
    return kernel, groups


class _ConvLayer:
    """What both layers share: parameters, their gradients, PyTorch's initialisation."""

    def __init__(self, weight_shape, fan_in, out_channels, bias, dtype, rng):
        rng = np.random.default_rng(rng)
        dtype = np.dtype(dtype)
        if dtype not in v.SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, but got {dtype}")
        # PyTorch's default: kaiming_uniform_(a=sqrt(5)) for the weight, which is U(-1/sqrt(fan_in), ...),
        # and the same bound for the bias.
        bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
        self.weight = _uniform(rng, bound, weight_shape, dtype)
        self.bias = _uniform(rng, bound, (out_channels,), dtype) if bias else None
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else np.zeros_like(self.bias)
        self._saved_input = None

    def parameters(self):
        """The parameter arrays (weight, then bias if any); an optimiser updates them in place."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def gradients(self):
        """The gradient arrays, in the order of :meth:`parameters`."""
        return [self.grad_weight] if self.bias is None else [self.grad_weight, self.grad_bias]

    def zero_grad(self):
        """Reset the accumulated gradients to zero."""
        for grad in self.gradients():
            grad[...] = 0

    def __call__(self, x):
        return self.forward(x)

    def _saved(self):
        if self._saved_input is None:
            raise RuntimeError("backward() needs a forward() call first")
        return self._saved_input

    def _accumulate(self, grad_weight, grad_bias):
        self.grad_weight += grad_weight
        if self.bias is not None:
            self.grad_bias += grad_bias


class Conv2d(_ConvLayer):
    """2-D convolution layer, as ``torch.nn.Conv2d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (int, int)
    stride, padding, dilation, groups
        As in :func:`fastconv.conv2d` (padding: int, pair, ``'same'`` or ``'valid'``).
    bias : bool, default True
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}, default 'zeros'
        What the padding holds: zeros, the mirror image (edge excluded), the edge repeated, or the opposite
        side of the image.
    dtype : float32 or float64, default float32
    rng : numpy.random.Generator or seed, optional
        Source of the initial weights, for reproducible networks.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv.nn import Conv2d
    >>> layer = Conv2d(1, 2, 3, padding=1, padding_mode="circular", rng=0)
    >>> layer.forward(np.ones((1, 1, 5, 5), np.float32)).shape
    (1, 2, 5, 5)
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        dtype=np.float32,
        rng=None,
    ):
        kernel, groups = _check_layer(in_channels, out_channels, kernel_size, groups)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {tuple(PADDING_MODES)}, but got {padding_mode!r}")
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.padding, self.padding_mode = padding, padding_mode
        fan_in = in_channels // groups * kernel[0] * kernel[1]
        super().__init__((out_channels, in_channels // groups, *kernel), fan_in, out_channels, bias, dtype, rng)

    def _explicit_padding(self, hw):
        """``((top, bottom), (left, right))`` for an input of spatial size ``hw``."""
        stride, dilation = v.int_pair("stride", self.stride), v.int_pair("dilation", self.dilation)
        if self.padding == "same":
            return tuple(same_padding(n, k, s, d) for n, k, s, d in zip(hw, self.weight.shape[2:], stride, dilation))
        return v.conv_padding(self.padding, hw, self.weight.shape[2:], stride, dilation)

    def _padded(self, x):
        """``x`` with its non-zero padding applied (zeros padding is left to the kernels)."""
        if self.padding_mode == "zeros":
            return x, self.padding
        pads = self._explicit_padding(x.shape[-2:])
        widths = [(0, 0)] * (x.ndim - 2) + list(pads)
        return np.pad(x, widths, mode=PADDING_MODES[self.padding_mode]), 0

    def forward(self, x):
        """``conv2d(x, weight, bias)``; remembers ``x`` for :meth:`backward`."""
        x = v.as_array("input", x)
        self._saved_input = x
        padded, padding = self._padded(x)
        return conv2d(padded, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def backward(self, grad_output):
        """Gradient with respect to the last forward's input; accumulates ``grad_weight`` and ``grad_bias``."""
        x = self._saved()
        padded, padding = self._padded(x)
        grad_padded, grad_weight, grad_bias = conv2d_backward(
            padded, self.weight, grad_output, self.stride, padding, self.dilation, self.groups
        )
        self._accumulate(grad_weight, grad_bias)
        if self.padding_mode == "zeros":
            return grad_padded
        return _unpad_gradient(grad_padded, x.shape, self._explicit_padding(x.shape[-2:]), self.padding_mode)


def _unpad_gradient(grad_padded, shape, pads, mode):
    """The adjoint of ``np.pad(x, pads, mode)``: every padded pixel's gradient goes back to the pixel it copied."""
    rows = np.pad(np.arange(shape[-2]), pads[0], mode=PADDING_MODES[mode])
    cols = np.pad(np.arange(shape[-1]), pads[1], mode=PADDING_MODES[mode])
    grad = np.zeros(shape, grad_padded.dtype)
    np.add.at(grad, (..., rows[:, None], cols[None, :]), grad_padded)
    return grad


class ConvTranspose2d(_ConvLayer):
    """2-D transposed convolution layer, as ``torch.nn.ConvTranspose2d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (int, int)
    stride, padding, output_padding, groups, dilation
        As in :func:`fastconv.conv_transpose2d`.
    bias : bool, default True
    padding_mode : {'zeros'}
        The only mode PyTorch's ConvTranspose2d supports.
    dtype : float32 or float64, default float32
    rng : numpy.random.Generator or seed, optional

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv.nn import ConvTranspose2d
    >>> up = ConvTranspose2d(8, 4, kernel_size=4, stride=2, padding=1, rng=0)
    >>> up.forward(np.ones((1, 8, 7, 7), np.float32)).shape
    (1, 4, 14, 14)
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups=1,
        bias=True,
        dilation=1,
        padding_mode="zeros",
        dtype=np.float32,
        rng=None,
    ):
        kernel, groups = _check_layer(in_channels, out_channels, kernel_size, groups)
        if padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for ConvTranspose2d, got {padding_mode!r}")
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.groups, self.dilation = groups, dilation
        # PyTorch takes fan_in from the weight's second axis: out_channels // groups * kernel area.
        fan_in = out_channels // groups * kernel[0] * kernel[1]
        super().__init__((in_channels, out_channels // groups, *kernel), fan_in, out_channels, bias, dtype, rng)

    def _params(self):
        return dict(
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            groups=self.groups,
            dilation=self.dilation,
        )

    def forward(self, x):
        """``conv_transpose2d(x, weight, bias)``; remembers ``x`` for :meth:`backward`."""
        x = v.as_array("input", x)
        self._saved_input = x
        return conv_transpose2d(x, self.weight, self.bias, **self._params())

    def backward(self, grad_output):
        """Gradient with respect to the last forward's input; accumulates ``grad_weight`` and ``grad_bias``."""
        grad_input, grad_weight, grad_bias = conv_transpose2d_backward(
            self._saved(), self.weight, grad_output, **self._params()
        )
        self._accumulate(grad_weight, grad_bias)
        return grad_input
