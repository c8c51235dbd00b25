"""fastconv: fast, correct 2-D convolution, its gradients and transposed convolution for NumPy on the CPU.

Numba kernels for patch extraction (im2col), patch scatter-add (col2im) and a blocked GEMM in the BLIS design,
with PyTorch's semantics. ``fastconv.reference`` holds the same functions as plain direct loops.
"""

from . import reference, shapes
from .conv import (
    conv2d,
    conv2d_backward,
    conv2d_input,
    conv2d_weight,
    conv_transpose2d,
    conv_transpose2d_backward,
)
from .gemm import gemm

__version__ = "0.1.0"

__all__ = [
    "conv2d",
    "conv2d_backward",
    "conv2d_input",
    "conv2d_weight",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "gemm",
    "reference",
    "shapes",
]
