"""Patch extraction (im2col) and its adjoint, patch scatter-add (col2im), as Numba kernels.

Both work on one image and a chunk of output rows ``p0:p1``, so a caller can bound the column buffer whatever
the image size. ``geometry`` is ``(sh, sw, pt, pl, dh, dw)``: strides, top and left padding, dilations.
The column matrix of channels ``c0:c0+Cg`` has one row per ``(c, r, s)`` and one column per output pixel
``(p - p0, q)``::

    col[(c * R + r) * S + s, (p - p0) * Q + q] = image[c0 + c, p * sh - pt + r * dh, q * sw - pl + s * dw]

with zeros where the index falls in the padding.
"""

from numba import njit, prange


@njit(cache=True)
def _valid_q_range(s, Q, W, sw, pl, dw):
    """The output columns ``q_lo:q_hi`` whose input column ``q * sw - pl + s * dw`` lies inside ``0:W``."""
    offset = s * dw - pl
    q_lo = max(0, -(offset // sw))
    q_hi = min(Q, -((offset - W) // sw))
    return q_lo, max(q_lo, q_hi)


@njit(parallel=True, cache=True)
def _im2col(image, c0, R, S, geometry, p0, p1, Q, col):
    """Fill ``col`` (Cg*R*S x (p1-p0)*Q) with the patches of ``image[c0:c0+Cg]`` (C x H x W).

    Parallel over rows of ``col``: each thread writes whole rows. Footprint: ``col`` only.
    """
    _, H, W = image.shape
    sh, sw, pt, pl, dh, dw = geometry
    for row in prange(col.shape[0]):
        c = row // (R * S)
        r = row // S % R
        s = row % S
        q_lo, q_hi = _valid_q_range(s, Q, W, sw, pl, dw)
        for p in range(p0, p1):
            dst = col[row, (p - p0) * Q : (p - p0 + 1) * Q]
            h = p * sh - pt + r * dh
            if h < 0 or h >= H:
                dst[:] = 0
                continue
            src = image[c0 + c, h]
            dst[:q_lo] = 0
            for q in range(q_lo, q_hi):
                dst[q] = src[q * sw - pl + s * dw]
            dst[q_hi:] = 0


@njit(parallel=True, cache=True)
def _col2im(col, R, S, geometry, p0, p1, Q, image, c0):
    """Add the patches in ``col`` back into ``image[c0:c0+Cg]``: the adjoint of ``_im2col``.

    Race-free by construction: each thread owns whole input rows ``(c, h)`` and gathers into them every
    ``(r, s)`` contribution of the output rows ``p0:p1``, in a fixed order, so results do not depend on the
    number of threads. Footprint: none beyond ``image``.
    """
    Cg = col.shape[0] // (R * S)
    _, H, W = image.shape
    sh, sw, pt, pl, dh, dw = geometry
    # Only the input rows under the patches of output rows p0:p1 receive anything.
    h_lo = max(0, p0 * sh - pt)
    h_hi = min(H, (p1 - 1) * sh - pt + (R - 1) * dh + 1)
    n_rows = h_hi - h_lo
    if n_rows <= 0:
        return
    for t in prange(Cg * n_rows):
        c = t // n_rows
        h = h_lo + t % n_rows
        dst = image[c0 + c, h]
        for r in range(R):
            hp = h + pt - r * dh  # = p * sh for the output row p this tap comes from
            if hp < 0 or hp % sh != 0:
                continue
            p = hp // sh
            if p < p0 or p >= p1:
                continue
            for s in range(S):
                q_lo, q_hi = _valid_q_range(s, Q, W, sw, pl, dw)
                src = col[(c * R + r) * S + s, (p - p0) * Q : (p - p0 + 1) * Q]
                for q in range(q_lo, q_hi):
                    dst[q * sw - pl + s * dw] += src[q]
