"""PyTorch bridge: fastconv's kernels as ``torch.autograd.Function``s, for CPU tensors.

``fastconv.torch.conv2d`` and ``fastconv.torch.conv_transpose2d`` take and return CPU tensors with the
arguments of ``torch.nn.functional``'s, so a model can swap them in. torch is imported only here: fastconv
itself never needs it.

Three functions carry all the derivatives, each one's backward made of the others with roles swapped, so
autograd can differentiate them again (double backward)::

    Conv2d(x, w)        = conv2d(x, w)               d/dx: Conv2dInput(dy, w)   d/dw: Conv2dWeight(x, dy)
    Conv2dInput(dy, w)  = conv2d_input(size, w, dy)  d/ddy: Conv2d(g, w)        d/dw: Conv2dWeight(g, dy)
    Conv2dWeight(x, dy) = conv2d_weight(x, size, dy) d/dx: Conv2dInput(dy, g)   d/ddy: Conv2d(x, g)

and conv_transpose2d is Conv2dInput with its input as ``dy``.

Examples
--------
>>> import torch
>>> import fastconv.torch as fct
>>> x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
>>> w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
>>> y = fct.conv2d(x, w, padding=1)
>>> torch.allclose(y, torch.nn.functional.conv2d(x, w, padding=1))
True
>>> y.sum().backward()
>>> x.grad.shape
torch.Size([2, 3, 8, 8])
"""

import numpy as np
import torch

from . import _validate as v
from . import conv as _conv

__all__ = ["conv2d", "conv_transpose2d"]


def _numpy(tensor):
    return tensor.detach().numpy()


def _tensor(array):
    return torch.from_numpy(np.ascontiguousarray(array))


def _run(helper, *args, geometry):
    """A conv.py helper on 4-D tensors' arrays, in ``geometry`` (whose shapes are the truth: the same geometry
    serves a conv_transpose2d whose output_padding conv2d's own size rule could not express)."""
    arrays = [_numpy(t) for t in args]
    return _tensor(helper(*arrays, geometry=geometry, dtype=arrays[0].dtype))


class Conv2d(torch.autograd.Function):
    """``conv2d(x, w)`` (no bias: it is added by torch, which differentiates it)."""

    @staticmethod
    def forward(ctx, x, weight, geometry):
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        return _run(lambda x, w, **kw: _conv._forward(x, w, None, **kw), x, weight, geometry=geometry)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = Conv2dInput.apply(grad, weight, ctx.geometry) if ctx.needs_input_grad[0] else None
        grad_w = Conv2dWeight.apply(x, grad, ctx.geometry) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


class Conv2dInput(torch.autograd.Function):
    """conv2d's input gradient from ``dy``, and conv_transpose2d's forward."""

    @staticmethod
    def forward(ctx, dy, weight, geometry):
        ctx.save_for_backward(dy, weight)
        ctx.geometry = geometry
        return _run(lambda dy, w, **kw: _conv._input_grad(dy, w, None, **kw), dy, weight, geometry=geometry)

    @staticmethod
    def backward(ctx, grad):
        dy, weight = ctx.saved_tensors
        grad_dy = Conv2d.apply(grad, weight, ctx.geometry) if ctx.needs_input_grad[0] else None
        grad_w = Conv2dWeight.apply(grad, dy, ctx.geometry) if ctx.needs_input_grad[1] else None
        return grad_dy, grad_w, None


class Conv2dWeight(torch.autograd.Function):
    """conv2d's weight gradient from ``x`` and ``dy``."""

    @staticmethod
    def forward(ctx, x, dy, geometry):
        ctx.save_for_backward(x, dy)
        ctx.geometry = geometry
        return _run(_conv._weight_grad, x, dy, geometry=geometry)

    @staticmethod
    def backward(ctx, grad):
        x, dy = ctx.saved_tensors
        grad_x = Conv2dInput.apply(dy, grad, ctx.geometry) if ctx.needs_input_grad[0] else None
        grad_dy = Conv2d.apply(x, grad, ctx.geometry) if ctx.needs_input_grad[1] else None
        return grad_x, grad_dy, None


def _check_tensors(function, **tensors):
    """CPU floating tensors of one dtype, or a TypeError naming the culprit."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{function}: {name} must be a torch.Tensor, but got {type(t).__name__}")
        if t.device.type != "cpu":
            raise TypeError(f"{function}: {name} must be on the CPU, but is on {t.device}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{function}: {name} must be float32 or float64, but is {t.dtype}")
    if len({t.dtype for t in present.values()}) > 1:
        seen = ", ".join(f"{name}: {t.dtype}" for name, t in present.items())
        raise TypeError(f"{function}: input, weight and bias must have one dtype, but got {seen}")


def _finish(y, bias, batched):
    y = y if bias is None else y + bias.reshape(-1, 1, 1)
    return y if batched else y[0]


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``torch.nn.functional.conv2d`` computed by fastconv, differentiable twice.

    Parameters are those of :func:`fastconv.conv2d` (so ``padding`` also takes ``((top, bottom), (left,
    right))``, and ``'same'`` works at any stride). Tensors must be on the CPU, float32 or float64, of one dtype.

    Examples
    --------
    >>> import torch
    >>> import fastconv.torch as fct
    >>> fct.conv2d(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3), padding="same")[0, 0, 0]
    tensor([4., 6., 6., 4.])
    """
    _check_tensors("conv2d", input=input, weight=weight, bias=bias)
    # Every check runs here, on shapes, before autograd records anything.
    _, geometry, batched = v.parse_conv2d(
        "conv2d", tuple(input.shape), np.empty(tuple(weight.shape), np.float32), stride, padding, dilation, groups
    )
    x = input if batched else input.unsqueeze(0)
    return _finish(Conv2d.apply(x, weight, geometry), bias, batched)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """``torch.nn.functional.conv_transpose2d`` computed by fastconv, differentiable twice.

    Examples
    --------
    >>> import torch
    >>> import fastconv.torch as fct
    >>> fct.conv_transpose2d(torch.ones(1, 2, 3, 3), torch.ones(2, 1, 4, 4), stride=2, padding=1).shape
    torch.Size([1, 1, 6, 6])
    """
    _check_tensors("conv_transpose2d", input=input, weight=weight, bias=bias)
    _, _, geometry, batched = v.parse_transpose(
        "conv_transpose2d",
        np.empty(tuple(input.shape), np.float32),
        np.empty(tuple(weight.shape), np.float32),
        stride,
        padding,
        output_padding,
        groups,
        dilation,
    )
    x = input if batched else input.unsqueeze(0)
    return _finish(Conv2dInput.apply(x, weight, geometry), bias, batched)
