"""``gemm(a, b)``: the project's own blocked matrix product, without BLAS."""

from . import _validate as v
from ._macro import _gemm
from ._parallel import run, sized
from ._scratch import empty_aligned

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
        In ``np.result_type(a, b, np.float32)``: float32 or float64. In C order, except when both operands are
        stored by columns (transposed views, Fortran order): ``a @ b`` is then ``(b.T @ a.T).T``, computed
        from the operands as they are, and returned in Fortran order.

    Notes
    -----
    An operand stored by columns is read as it is, not copied: ``gemm(x, w.T)`` packs ``w``'s rows as the
    columns of B, square blocks transposed in registers.

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
    >>> gemm(np.arange(6).reshape(2, 3), np.ones((2, 3)).T)  # a transposed view: not copied
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
    a_transposed, b_transposed = _stored_by_columns(a), _stored_by_columns(b)
    if a_transposed and b_transposed:
        return gemm(b.T, a.T).T  # two operands stored by rows: no copy of either, a view of the product
    c = empty_aligned((a.shape[0], b.shape[1]), dtype)
    flops = 2 * c.size * a.shape[1]
    if c.size:
        # An operand stored by columns (a transposed view, Fortran order) is packed from its transpose.
        a = v.kernel_ready(a.T, dtype) if a_transposed else v.kernel_ready(a, dtype)
        b = v.kernel_ready(b.T, dtype) if b_transposed else v.kernel_ready(b, dtype)
        with sized(flops):
            run(_gemm, a, b, c, a_transposed, b_transposed)
    return c


def _stored_by_columns(x):
    """Whether 2-D ``x`` is stored column by column (Fortran order, as the transpose of a C array is) and
    not row by row."""
    return x.flags.f_contiguous and not x.flags.c_contiguous
