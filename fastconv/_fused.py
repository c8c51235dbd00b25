"""GEMM whose B is packed by the thread that uses it, one micro-panel at a time.

The classic driver (``_gemm._gemm_packed``) packs a KC x NC panel of B into a buffer every thread shares, then
runs the macro-kernel over it: two parallel launches per panel, and a 4 MiB buffer written to and read back
from the L3 cache. Here each task of one parallel loop packs a single KC x NR micro-panel of B into its
thread's scratch, where it stays in L1/L2, and runs the micro-kernel over it for one MC-row block of A::

    for pc in range(0, k, KC):                    # one launch per KC block
        for (ic, jr) in prange(tiles):            # each task:
            pack B[pc:pc+kc, jr:jr+NR] -> scratch     # a plain matrix, or image patches (implicit im2col)
            for ir in range(ic, ic + MC, MR):
                micro-kernel: C[ir:ir+MR, jr:jr+NR] (+)= A~[ir, pc] @ scratch

A micro-panel is packed once per MC-row block of C; with more than MC rows that repeats the packing, which
pays for image patches (an expensive gather either way) but not for a plain matrix (a copy): ``fused_pays``.
Measured (float32, 2 threads): 7x7 stride-2 conv 9.8 -> 8.0 ms, 3x3 convs by GEMM 6-19 % faster, small layers
1.5-1.8x (fewer launches), gemm 64x25088x256 5 % faster; gemm with 1024 rows 20 % slower, hence the rule.
"""

import numba
import numpy as np
from numba import njit, prange

from ._gemm import FALSE, ZERO, _micro_kernel, _pack_a, _pack_b_panel, _packed_a_size, _round_up
from ._im2col import _patch_panel
from ._parallel import PRANGE_ONLY, per_thread
from .config import KC, MC, MR, NR


def fused_pays(m, patches):
    """Whether the fused GEMM beats the classic one for an A of ``m`` rows (B of image patches or not)."""
    return patches or m <= MC


def fused_scratch(dtype):
    """Per-thread scratch of :func:`_fused_macro_kernel`: one KC x NR micro-panel of B per thread."""
    return per_thread((KC * NR,), dtype)


@njit(parallel=PRANGE_ONLY, cache=True)
def _fused_macro_kernel(
    ap, m, pc, kc, b, b_row0, x, taps, sh, sw, P, Q, patches, ncols, c, c_row0, accumulate, scratch
):
    """``C (+)= A[:, pc:pc+kc] @ B[pc:pc+kc, :]`` for one KC block, B packed per task into ``scratch``.

    ``ap`` is A packed by ``_gemm._pack_a``; ``C`` is ``c[:, c_row0 : c_row0 + m, :ncols]`` (blocked). With
    ``patches``, B is the patch matrix of ``x`` for strides ``sh, sw`` and a ``P x Q`` output (``_im2col``;
    ``taps`` is ``_tap_table`` of this block, made by the caller), else the blocked matrix ``b[:, b_row0:]``.
    Each task owns its tile of C: no element is written twice and the order of every sum is fixed, whatever
    the number of threads.
    """
    m_pad = _round_up(m, MR)
    n_jr = -(-ncols // NR)
    for task in prange(-(-m // MC) * n_jr):
        panel = scratch[numba.get_thread_id()]
        ic = task // n_jr * MC
        jr = task % n_jr * NR
        n_valid = min(NR, ncols - jr)
        if patches:
            _patch_panel(x, taps, sh, sw, P, Q, kc, jr, n_valid, panel, 0)
        else:
            _pack_b_panel(b, b_row0, 0, pc, kc, jr, n_valid, panel)
        for ir in range(ic, min(ic + MC, m), MR):
            start = pc * m_pad + ir * kc
            a_panel = ap[start : start + kc * MR]
            _micro_kernel(kc, a_panel, panel, c, c_row0 + ir, jr, min(MR, m - ir), n_valid, accumulate)


def no_patches(dtype):
    """The ``x`` and ``taps`` arguments of :func:`_fused_macro_kernel` when B is a plain matrix."""
    empty = np.empty(0, np.int64)
    return np.empty((0, 0, 0, 0), dtype), (empty, empty, empty, np.empty((0, 2), np.int64))


def _gemm_fused(a, b, c):
    """``c = a @ b`` for C-contiguous 2-D arrays of one dtype, by the fused GEMM."""
    m, k = a.shape
    n = b.shape[1]
    if k == 0:
        c[...] = 0
        return
    ap = np.empty(_packed_a_size(m, k), dtype=c.dtype)
    _pack_a(a.reshape(1, m, k), ZERO, m, ZERO, k, FALSE, ap)
    scratch = fused_scratch(c.dtype)
    no_x, no_taps = no_patches(c.dtype)
    b_blocks, c_blocks = b.reshape(1, k, n), c.reshape(1, m, n)  # blocked matrices of one block each
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        _fused_macro_kernel(
            ap,
            m,
            pc,
            kc,
            b_blocks,
            ZERO,
            no_x,
            no_taps,
            1,
            1,
            1,
            1,
            FALSE,
            n,
            c_blocks,
            ZERO,
            np.bool_(pc > 0),
            scratch,
        )
