"""Argument checking and normalisation for the public functions.

Everything here is plain Python and runs before any kernel: a bad argument raises ``ValueError`` (a wrong
value or shape) or ``TypeError`` (a wrong type), naming the argument and what was seen. Wording follows
PyTorch's where PyTorch has an equivalent check.
"""

import math
import numbers
import os
import time
from dataclasses import dataclass

import numpy as np

from .shapes import conv_output_size, same_padding, transpose_output_size

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_array(name, value):
    """``np.asarray(value)``, refusing anything that is not a real number array."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:  # ragged nested lists, for one
        raise TypeError(f"{name} must be an array of real numbers, but could not be read as one: {error}") from None
    if array.dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must hold real numbers (integer or floating point), but got an array of dtype {array.dtype}"
        )
    return array


def result_dtype(**arrays):
    """``np.result_type(*arrays, float32)``: float32 or float64, else ``TypeError``."""
    present = {name: a for name, a in arrays.items() if a is not None}
    dtype = np.result_type(*present.values(), np.float32)
    if dtype not in SUPPORTED_DTYPES:
        seen = ", ".join(f"{name}: {a.dtype}" for name, a in present.items())
        raise TypeError(f"computation would be in {dtype}, which is not supported (float32 or float64); got {seen}")
    return dtype


def kernel_ready(array, dtype):
    """A C-contiguous, writeable array of ``dtype`` with the values of ``array``, copying only when needed.

    Read-only arrays are copied too: Numba types them separately, so passing them would compile every kernel
    a second time. The copy never goes back to the caller, whose arrays are not modified.
    """
    ready = np.ascontiguousarray(array, dtype=dtype)
    return ready if ready.flags.writeable else ready.copy()


def _int(name, value):
    if type(value) is int:  # the common case, first: bool, a subclass of int, is refused below
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a pair of ints, but got {value!r} of type {type(value).__name__}")
    return int(value)


def int_pair(name, value):
    """``value`` as a pair of ints: an int ``v`` means ``(v, v)``. Floats and bools raise ``TypeError``."""
    if type(value) is int:
        return value, value
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else list(value)
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, but got {value!r} with {len(items)} elements")
        return _int(name, items[0]), _int(name, items[1])
    v = _int(name, value)
    return v, v


def positive_pair(name, value):
    pair = int_pair(name, value)
    if min(pair) <= 0:
        raise ValueError(f"non-positive {name} is not supported, but got {name}={value!r}")
    return pair


def nonnegative_pair(name, value):
    pair = int_pair(name, value)
    if min(pair) < 0:
        raise ValueError(f"negative {name} is not supported, but got {name}={value!r}")
    return pair


def check_groups(groups):
    if type(groups) is int and groups > 0:
        return groups
    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, but got {groups!r} of type {type(groups).__name__}")
    if groups <= 0:
        raise ValueError(f"non-positive groups is not supported, but got groups={groups}")
    return int(groups)


def batched_input(name, shape, function):
    """``shape`` as (N, C, H, W) and whether it had a batch axis; 3-D shapes are unbatched."""
    shape = tuple(shape)
    if len(shape) not in (3, 4):
        raise ValueError(
            f"Expected 3D (unbatched) or 4D (batched) {name} to {function}, but got {name} of size: {shape}"
        )
    return (shape if len(shape) == 4 else (1, *shape)), len(shape) == 4


def check_weight_ndim(name, shape, function):
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(
            f"Expected 4D {name} to {function} of shape (out, in / groups, kH, kW), but got {name} of size: {shape}"
        )
    return shape


def shape_tuple(name, value, ndim_allowed):
    """A size argument (``input_size``, ``weight_size``) as a tuple of non-negative ints."""
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, but got {value!r}") from None
    sizes = tuple(_int(name, v) for v in items)
    if len(sizes) not in ndim_allowed or min(sizes, default=0) < 0:
        raise ValueError(f"{name} must be {' or '.join(map(str, ndim_allowed))} non-negative ints, but got {value!r}")
    return sizes


def check_divisible_by_groups(weight_shape, groups):
    if weight_shape[0] % groups != 0:
        raise ValueError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {weight_shape} instead"
        )


def check_bias(bias, out_channels, weight_shape):
    if bias is None:
        return None
    bias = as_array("bias", bias)
    if bias.shape != (out_channels,):
        raise ValueError(
            f"Given weight of size {weight_shape}, expected bias to be 1-dimensional with {out_channels} elements, "
            f"but got bias of size {bias.shape} instead"
        )
    return bias


@dataclass(frozen=True)
class Conv2dGeometry:
    """Everything about a conv2d call but the data: shapes of input, weight and output, and the index rules."""

    input_shape: tuple  # (N, C, H, W)
    weight_shape: tuple  # (K, C // groups, R, S)
    output_shape: tuple  # (N, K, P, Q)
    stride: tuple
    padding: tuple  # ((top, bottom), (left, right))
    dilation: tuple
    groups: int

    @property
    def kernel_geometry(self):
        """``(sh, sw, pt, pl, dh, dw)``, the form the kernels take."""
        (pt, _), (pl, _) = self.padding
        return (self.stride[0], self.stride[1], pt, pl, self.dilation[0], self.dilation[1])

    @property
    def flops(self):
        """Floating-point operations of the convolution by direct sums: a multiply and an add per tap."""
        N, K, P, Q = self.output_shape
        _, Cg, R, S = self.weight_shape
        return 2 * N * K * P * Q * Cg * R * S


def conv_padding(padding, in_hw, kernel_rs, stride, dilation):
    """Normalise conv2d's ``padding`` to ``((top, bottom), (left, right))``."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            return tuple(same_padding(i, k, s, d) for i, k, s, d in zip(in_hw, kernel_rs, stride, dilation))
        raise ValueError(f"Invalid padding string: {padding!r}, expected 'same' or 'valid'")
    if isinstance(padding, (list, tuple)) and len(padding) == 2 and all(isinstance(p, (list, tuple)) for p in padding):
        pairs = tuple(nonnegative_pair("padding", p) for p in padding)
        return pairs
    ph, pw = nonnegative_pair("padding", padding)
    return (ph, ph), (pw, pw)


def conv2d_geometry(function, input_shape, weight_shape, stride, padding, dilation, groups, input_name="input"):
    """Check a conv2d configuration and compute its output shape; ``input_shape`` is already 4-D."""
    stride = positive_pair("stride", stride)
    dilation = positive_pair("dilation", dilation)
    groups = check_groups(groups)
    N, C, H, W = input_shape
    K, Cg, R, S = weight_shape
    check_divisible_by_groups(weight_shape, groups)
    if C != Cg * groups:
        raise ValueError(
            f"Given groups={groups}, weight of size {weight_shape}, expected {input_name} {input_shape} to have "
            f"{Cg * groups} channels, but got {C} channels instead"
        )
    pads = conv_padding(padding, (H, W), (R, S), stride, dilation)
    padded = (H + sum(pads[0]), W + sum(pads[1]))
    span = (dilation[0] * (R - 1) + 1, dilation[1] * (S - 1) + 1)
    if padded[0] < span[0] or padded[1] < span[1] or min(padded) == 0:
        raise ValueError(
            f"Calculated padded {input_name} size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
            f"({span[0]} x {span[1]}) (dilation included). Kernel size can't be greater than actual input size"
        )
    P = conv_output_size(H, R, stride[0], *pads[0], dilation[0])
    Q = conv_output_size(W, S, stride[1], *pads[1], dilation[1])
    return Conv2dGeometry(tuple(input_shape), tuple(weight_shape), (N, K, P, Q), stride, pads, dilation, groups)


def transpose_geometry(function, input_shape, weight_shape, stride, padding, output_padding, groups, dilation):
    """Check a conv_transpose2d configuration; return the geometry of the conv2d whose input gradient it is.

    conv_transpose2d's input plays conv2d's output and its output conv2d's input; its weight
    ``(C_in, C_out // groups, R, S)`` is read as conv2d's ``(K, C // groups, R, S)``.
    """
    stride = positive_pair("stride", stride)
    dilation = positive_pair("dilation", dilation)
    groups = check_groups(groups)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair of ints for conv_transpose2d, but got {padding!r}")
    padding = nonnegative_pair("padding", padding)
    output_padding = nonnegative_pair("output_padding", output_padding)
    if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
        raise ValueError(
            f"output padding must be smaller than either stride or dilation, but got output_padding={output_padding}, "
            f"stride={stride}, dilation={dilation}"
        )
    N, C_in, H, W = input_shape
    K, C_out_g, R, S = weight_shape
    if C_in != K:
        raise ValueError(
            f"Given transposed=1, weight of size {weight_shape}, expected input {input_shape} to have {K} channels, "
            f"but got {C_in} channels instead"
        )
    check_divisible_by_groups(weight_shape, groups)
    out_hw = tuple(
        transpose_output_size(i, k, s, p, op, d)
        for i, k, s, p, op, d in zip((H, W), (R, S), stride, padding, output_padding, dilation)
    )
    if min(out_hw) <= 0:
        raise ValueError(
            f"Given input size per channel: ({H} x {W}), calculated output size per channel: ({out_hw[0]} x "
            f"{out_hw[1]}). Output size is too small"
        )
    pads = ((padding[0], padding[0]), (padding[1], padding[1]))
    conv_input = (N, C_out_g * groups, *out_hw)
    return Conv2dGeometry(conv_input, tuple(weight_shape), tuple(input_shape), stride, pads, dilation, groups)


def check_grad_output(grad_output_shape, expected, function):
    if tuple(grad_output_shape) != tuple(expected):
        raise ValueError(
            f"{function}: expected grad_output of size {tuple(expected)} for the given shapes and parameters, "
            f"but got grad_output of size {tuple(grad_output_shape)}"
        )


def batched_grad_output(grad_output, expected_shape, batched, function):
    """Check ``grad_output`` against the shape the forward call would produce; return it 4-D."""
    grad_output = as_array("grad_output", grad_output)
    check_grad_output(grad_output.shape, expected_shape if batched else expected_shape[1:], function)
    return grad_output.reshape(expected_shape)


def parse_conv2d(function, input_shape, weight, stride, padding, dilation, groups, input_name="input"):
    """Check a conv2d call's weight and parameters: ``(weight array, Conv2dGeometry, input was batched)``."""
    weight = as_array("weight", weight)
    check_weight_ndim("weight", weight.shape, function)
    shape4, batched = batched_input(input_name, input_shape, function)
    geometry = conv2d_geometry(function, shape4, weight.shape, stride, padding, dilation, groups, input_name)
    return weight, geometry, batched


def parse_transpose(function, input, weight, stride, padding, output_padding, groups, dilation):
    """Check a conv_transpose2d call: ``(4-D input, weight, Conv2dGeometry of the adjoint conv2d, batched)``."""
    x = as_array("input", input)
    weight = as_array("weight", weight)
    check_weight_ndim("weight", weight.shape, function)
    shape4, batched = batched_input("input", x.shape, function)
    geometry = transpose_geometry(function, shape4, weight.shape, stride, padding, output_padding, groups, dilation)
    return x.reshape(shape4), weight, geometry, batched


def unbatch(array, batched):
    """Drop the batch axis added to an unbatched input."""
    return array if batched else array[0]


def available_memory():
    """Bytes of memory the system can still give this process (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


_last_reading = [-1e9, None]  # (time.monotonic(), bytes) of the last read of available_memory()


def _recent_available_memory(needed):
    """``available_memory()``, read at most once a second unless ``needed`` comes near the last reading.

    Reading /proc/meminfo costs some 25 µs, a quarter of a small convolution's call: a request under a quarter of
    what was available a moment ago is not worth a fresh reading.
    """
    when, available = _last_reading
    now = time.monotonic()
    if now - when > 1.0 or available is None or needed > available // 4:
        available = available_memory()
        _last_reading[:] = [now, available]
    return available


def _size(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024


def check_memory(function, output_shape, dtype, inputs, workspace):
    """Raise ``MemoryError`` naming the sizes when the output, the input copies and the workspace cannot fit.

    Checked before anything is allocated: an allocation far beyond memory may otherwise succeed lazily and
    end with the process killed when the kernel touches it.
    """
    output = math.prod(int(n) for n in output_shape) * dtype.itemsize
    copies = sum(
        a.size * dtype.itemsize
        for a in inputs
        if a is not None and not (a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable)
    )
    needed = output + copies + workspace
    available = _recent_available_memory(needed)
    if available is not None and needed > available:
        raise MemoryError(
            f"{function} needs {_size(needed)}: {_size(output)} for an output of shape {tuple(output_shape)} "
            f"{dtype}, {_size(copies)} for contiguous {dtype} copies of the inputs and {_size(workspace)} of "
            f"workspace, but only {_size(available)} of memory is available"
        )
