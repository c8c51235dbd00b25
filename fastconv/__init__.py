"""fastconv: fast, correct 2-D convolution, its gradients and transposed convolution for NumPy on the CPU.

Numba kernels for patch extraction (im2col), patch scatter-add (col2im) and a blocked GEMM in the BLIS design,
with PyTorch's semantics. ``fastconv.reference`` holds the same functions as plain direct loops.
"""

from . import _cache

_cache.install()  # before any module that defines a kernel is imported

from . import reference, shapes  # noqa: E402
from ._parallel import get_num_threads, set_num_threads, threading_layer  # noqa: E402
from ._scratch import release_scratch  # noqa: E402
from ._warmup import precompile  # noqa: E402
from .conv import (  # noqa: E402
    conv2d,
    conv2d_backward,
    conv2d_input,
    conv2d_weight,
    conv_transpose2d,
    conv_transpose2d_backward,
)
from .gemm import gemm  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "conv2d",
    "conv2d_backward",
    "conv2d_input",
    "conv2d_weight",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "gemm",
    "get_num_threads",
    "precompile",
    "release_scratch",
    "set_num_threads",
    "threading_layer",
    "reference",
    "shapes",
]
