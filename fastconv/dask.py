"""Dask bridge: conv2d on dask arrays, for batches or images larger than one machine's memory.

Chunks along the batch axis only need no communication: each chunk is convolved on its own (``map_blocks``).
Chunks along H and W (one huge image) need a halo: the input is padded once, globally, and rechunked so that
the chunk of output rows ``a:b`` starts at padded row ``a * stride`` (boundaries on multiples of the stride);
``map_overlap`` then lends each chunk the ``span - stride`` rows after it that its last windows reach (``span``
the dilated kernel size), exactly the halo needed, and each block is convolved with no padding. Channels are
always one chunk (a convolution mixes all of a group's channels).

How many threads: fastconv's kernels use every core Numba has, so give a worker process as many threads of
its own as cores it should use and run one task per worker at a time (``threads_per_worker=1``); on one
machine, the threaded scheduler runs tasks one after another on all cores.

Examples
--------
>>> import dask.array as da
>>> import numpy as np
>>> import fastconv
>>> import fastconv.dask as fcd
>>> x = da.random.default_rng(0).standard_normal((1, 3, 64, 64), chunks=(1, 3, 20, 24)).astype(np.float32)
>>> w = np.ones((4, 3, 3, 3), np.float32)
>>> y = fcd.conv2d(x, w, stride=2, padding=1)
>>> y.shape, y.chunks[2]
((1, 4, 32, 32), (10, 10, 10, 2))
>>> bool(np.allclose(y.compute(scheduler="threads"), fastconv.conv2d(x.compute(), w, stride=2, padding=1), atol=1e-4))
True
"""

import functools

import dask
import dask.array as da
import numpy as np

from . import _validate as v
from .conv import conv2d as _conv2d
from .conv import conv2d_backward as _conv2d_backward

__all__ = ["conv2d", "conv2d_backward"]


def _small(name, array):
    """Weights and biases are small: bring a dask one into memory."""
    if array is None:
        return None
    return v.as_array(name, array.compute() if isinstance(array, da.Array) else array)


def _check_input(function, x):
    if not isinstance(x, da.Array):
        raise TypeError(f"{function}: input must be a dask array, but got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{function}: expected a 4-D (batched) dask array, but got input of size {x.shape}")
    return x.rechunk({1: -1}) if len(x.chunks[1]) > 1 else x


def _output_chunks(input_chunks, in_size, out_size, minimum):
    """Output chunk sizes proportional to the input's, none empty and none below ``minimum`` rows."""
    edges = np.cumsum((0, *input_chunks))
    cuts = sorted({round(out_size * e / in_size) for e in edges} | {0, out_size})
    sizes = [b - a for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    merged = []
    for size in sizes:  # a chunk smaller than its neighbour's halo cannot lend it that halo: merge it
        if merged and (merged[-1] < minimum or size < minimum):
            merged[-1] += size
        else:
            merged.append(size)
    return tuple(merged)


def _spatial_chunks(input_chunks, in_size, padded_size, out_size, span, stride):
    """``(output chunks, padded-input chunks, halo)`` along one spatial axis.

    Output rows ``a:b`` read padded rows ``a * stride`` to ``(b - 1) * stride + span``: the input chunk of an
    output chunk starts at ``a * stride`` (boundaries on multiples of the stride) and borrows ``span - stride``
    rows from the next chunk.
    """
    halo = max(span - stride, 0)
    out = _output_chunks(input_chunks, in_size, out_size, -(-halo // stride))
    inputs = tuple(size * stride for size in out[:-1])
    return out, (*inputs, padded_size - sum(inputs)), halo


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """:func:`fastconv.conv2d` of a dask array ``x`` (N, C, H, W), chunked along any axis but channels.

    Returns a lazy dask array equal to ``fastconv.conv2d(x.compute(), ...)`` to float rounding.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> import fastconv.dask as fcd
    >>> x = da.ones((8, 3, 16, 16), chunks=(2, 3, 16, 16))
    >>> fcd.conv2d(x, np.ones((4, 3, 3, 3)), padding="same").chunks[0]
    (2, 2, 2, 2)
    """
    x = _check_input("conv2d", x)
    weight = _small("weight", weight)
    bias = _small("bias", bias)
    _, geometry, _ = v.parse_conv2d("conv2d", x.shape, weight, stride, padding, dilation, groups)
    bias = v.check_bias(bias, weight.shape[0], weight.shape)
    dtype = v.result_dtype(input=np.empty(0, x.dtype), weight=weight, bias=bias)
    N, K, P, Q = geometry.output_shape
    if len(x.chunks[2]) == 1 and len(x.chunks[3]) == 1:
        return x.map_blocks(
            _conv2d,
            weight,
            bias,
            stride,
            padding,
            dilation,
            groups,
            chunks=(x.chunks[0], (K,), (P,), (Q,)),
            dtype=dtype,
        )
    (pt, pb), (pl, pr) = geometry.padding
    padded = da.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))) if pt + pb + pl + pr else x
    spans = [d * (k - 1) + 1 for d, k in zip(geometry.dilation, weight.shape[2:])]
    rows, row_inputs, halo_h = _spatial_chunks(
        x.chunks[2], x.shape[2], padded.shape[2], P, spans[0], geometry.stride[0]
    )
    cols, col_inputs, halo_w = _spatial_chunks(
        x.chunks[3], x.shape[3], padded.shape[3], Q, spans[1], geometry.stride[1]
    )
    padded = padded.rechunk({2: row_inputs, 3: col_inputs})
    convolve = functools.partial(
        _conv2d,
        weight=weight,
        bias=bias,
        stride=geometry.stride,
        padding=0,
        dilation=geometry.dilation,
        groups=geometry.groups,
    )
    return padded.map_overlap(
        convolve,
        depth={0: 0, 1: 0, 2: (0, halo_h), 3: (0, halo_w)},
        boundary="none",
        trim=False,
        chunks=(x.chunks[0], (K,), rows, cols),
        dtype=dtype,
    )


def _backward_block(x, weight, grad_output, params):
    return _conv2d_backward(x, weight, grad_output, **params)


def conv2d_backward(x, weight, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """:func:`fastconv.conv2d_backward` for dask arrays chunked along the batch axis only.

    Each batch chunk computes its three gradients in one task; the weight and bias gradients of the chunks
    are then summed. Returns ``(grad_input, grad_weight, grad_bias)`` as lazy dask arrays.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> import fastconv.dask as fcd
    >>> x = da.ones((4, 2, 6, 6), chunks=(2, 2, 6, 6))
    >>> dx, dw, db = fcd.conv2d_backward(x, np.ones((3, 2, 3, 3)), da.ones((4, 3, 4, 4), chunks=(2, 3, 4, 4)))
    >>> db.compute()
    array([64., 64., 64.])
    """
    x = _check_input("conv2d_backward", x)
    weight = _small("weight", weight)
    if len(x.chunks[2]) > 1 or len(x.chunks[3]) > 1:
        raise ValueError(
            f"conv2d_backward: chunk the input along the batch axis only, but got chunks {x.chunks}; "
            "rechunk with x.rechunk({2: -1, 3: -1})"
        )
    _, geometry, _ = v.parse_conv2d("conv2d_backward", x.shape, weight, stride, padding, dilation, groups)
    if not isinstance(grad_output, da.Array):
        grad_output = da.from_array(v.as_array("grad_output", grad_output))
    v.check_grad_output(grad_output.shape, geometry.output_shape, "conv2d_backward")
    grad_output = grad_output.rechunk((x.chunks[0], -1, -1, -1))
    dtype = v.result_dtype(input=np.empty(0, x.dtype), weight=weight, grad_output=np.empty(0, grad_output.dtype))
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    inputs, weights, biases = [], [], []
    for xb, dyb, n in zip(x.to_delayed().ravel(), grad_output.to_delayed().ravel(), x.chunks[0]):
        dxb, dwb, dbb = dask.delayed(_backward_block, nout=3)(xb, weight, dyb, params)
        inputs.append(da.from_delayed(dxb, (n, *x.shape[1:]), dtype=dtype))
        weights.append(da.from_delayed(dwb, weight.shape, dtype=dtype))
        biases.append(da.from_delayed(dbb, (weight.shape[0],), dtype=dtype))
    return da.concatenate(inputs, axis=0), da.stack(weights).sum(axis=0), da.stack(biases).sum(axis=0)
