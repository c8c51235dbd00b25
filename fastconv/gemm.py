"""``gemm(a, b)``: the project's own blocked matrix product, without BLAS."""

import numpy as np

from . import _validate as v
from ._macro import _gemm
from ._parallel import run

__all__ = ["gemm"]


def gemm(a, b):
    """Matrix product ``a @ b`` computed by fastconv's blocked GEMM (BLIS design, Numba).

    Parameters
    ----------
    a : array_like, shape (m, k)
    b : array_like, shape (k, n)

    Returns
    -------
    numpy.ndarray, shape (m, n)
        In ``np.result_type(a, b, np.float32)``: float32 or float64.

    Raises
    ------
    ValueError
        If an operand is not 2-D or the inner dimensions differ.
    TypeError
        If an operand is not a real numeric array.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import gemm
    >>> gemm(np.arange(6).reshape(2, 3), np.ones((3, 2)))
    array([[ 3.,  3.],
           [12., 12.]])
    """
    a = v.as_array("a", a)
    b = v.as_array("b", b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"gemm expects 2-D operands, but got a of size {a.shape} and b of size {b.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"a and b shapes cannot be multiplied ({a.shape[0]}x{a.shape[1]} and {b.shape[0]}x{b.shape[1]}): "
            f"a has {a.shape[1]} columns but b has {b.shape[0]} rows"
        )
    dtype = v.result_dtype(a=a, b=b)
    c = np.empty((a.shape[0], b.shape[1]), dtype)
    if c.size:
        run(_gemm, v.kernel_ready(a, dtype), v.kernel_ready(b, dtype), c)
    return c
