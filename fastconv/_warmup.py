"""``precompile``: pay the kernels' compile time up front instead of on first use."""

import sys
import time

import numpy as np

_SUPPORTED = ("float32", "float64")


def _calls(dtype):
    """One small call per compiled path (driver, algorithm, packing variant) of the public API: dense (from
    the padded input, and from packed patches), 1x1, strided (from padded stride phases, and patches packed
    from the stride phases), Winograd (3x3, and 4x4 stride 2) and depthwise forward; weight gradients from the
    padded input, from packed patches, by direct loops and by Winograd (3x3, and 4x4 stride 2); strided input
    gradient (col2im in the GEMM's tasks, or after the GEMM past NC pixels, and Winograd on the stride phases)."""
    from .conv import conv2d, conv2d_backward, conv2d_weight, conv_transpose2d, conv_transpose2d_backward
    from .gemm import gemm

    x = np.ones((1, 2, 5, 5), dtype)
    w = np.ones((2, 2, 3, 3), dtype)
    dy = np.ones((1, 2, 3, 3), dtype)
    dy_strided = np.ones((1, 2, 2, 2), dtype)
    # Enough output pixels for the weight gradient to split them into ranges (see _weight_grad_split).
    x_wide = np.ones((1, 2, 34, 34), dtype)
    x_wider = np.ones((1, 2, 46, 46), dtype)  # more than NC pixels: conv_transpose2d's col2im after the GEMM
    dy_wide = np.ones((1, 2, 32, 32), dtype)
    x_deep = np.ones((1, 64, 40, 40), dtype)  # enough channels and tiles for Winograd's weight gradient
    # Patches packed rather than read from the padded input (_shifted.shifted_pays): over 128 filters and 20
    # MiB of A read in all; at a stride, over 160 taps, with output rows too wide to gather.
    x_many, w_many = np.ones((72, 64, 3, 3), dtype), np.ones((129, 64, 3, 3), dtype)
    x_taps, w_taps = np.ones((1, 20, 5, 52), dtype), np.ones((2, 20, 3, 3), dtype)
    dy_many = np.ones((1, 65, 32, 32), dtype)  # more filters than the padded input's weight gradient takes
    # 4x4 stride 2 with 16 channels out and 64 tiles per stride phase: Winograd on the phases
    # (_winograd_strided.py), for conv_transpose2d; conv2d's forward pass takes it when asked.
    x_decoder, w_decoder = np.ones((1, 2, 16, 16), dtype), np.ones((2, 16, 4, 4), dtype)
    x_phases, dy_phases = np.ones((2, 16, 32, 32), dtype), np.ones((2, 33, 16, 16), dtype)  # and its weight gradient
    return [
        ("conv2d", lambda: conv2d(x, w)),
        ("conv2d packed patches", lambda: conv2d(x_many, w_many, padding=1, algorithm="gemm")),
        ("conv2d 1x1", lambda: conv2d(x, w[:, :, :1, :1])),
        ("conv2d strided", lambda: conv2d(x_wide, w, stride=2)),
        ("conv2d strided packed", lambda: conv2d(x_taps, w_taps, stride=2)),
        ("conv2d winograd", lambda: conv2d(x, w, algorithm="winograd")),
        ("conv2d 4x4 s2 winograd", lambda: conv2d(x_decoder, w_decoder[:, :2], stride=2, algorithm="winograd")),
        ("conv2d depthwise", lambda: conv2d(x, w[:, :1], groups=2)),
        ("conv2d_backward", lambda: conv2d_backward(x_wide, w, dy_wide)),
        ("conv2d_backward strided", lambda: conv2d_backward(x, w, dy_strided, stride=2)),
        ("conv2d_weight packed patches", lambda: conv2d_weight(x_wide, (65, 2, 3, 3), dy_many)),
        ("conv2d_weight winograd", lambda: conv2d_weight(x_deep, (64, 64, 3, 3), x_deep, padding=1)),
        ("conv2d_weight 4x4 s2", lambda: conv2d_weight(x_phases, (33, 16, 4, 4), dy_phases, stride=2, padding=1)),
        ("conv2d_backward depthwise", lambda: conv2d_backward(x, w[:, :1], dy_strided, stride=2, groups=2)),
        ("conv_transpose2d", lambda: conv_transpose2d(dy, w)),
        ("conv_transpose2d_backward", lambda: conv_transpose2d_backward(dy, w, x)),
        ("conv_transpose2d 4x4 s2", lambda: conv_transpose2d(x_decoder, w_decoder, stride=2, padding=1)),
        ("conv_transpose2d wide", lambda: conv_transpose2d(x_wider, w, stride=2)),
        ("gemm", lambda: gemm(x[0, 0], x[0, 0])),
        ("gemm split K", lambda: gemm(np.ones((1, 2048), dtype), np.ones((2048, 1), dtype))),
        ("gemm by columns", lambda: gemm(x[0, 0], x[0, 0].T)),
    ]


def precompile(dtypes=_SUPPORTED, progress=True):
    """Compile (or load from the cache) every kernel of the public API for ``dtypes``.

    The first call of each function otherwise compiles its kernels, a few seconds each on an empty cache.
    Kernels are cached on disk, so this is needed once per installation, not once per process.

    Parameters
    ----------
    dtypes : sequence of {'float32', 'float64'}, default both
    progress : bool, default True
        Draw a progress bar on standard error.

    Returns
    -------
    float
        Seconds taken.

    Examples
    --------
    >>> import fastconv
    >>> seconds = fastconv.precompile(dtypes=["float32"], progress=False)
    """
    names = [np.dtype(d).name for d in ([dtypes] if isinstance(dtypes, str) else dtypes)]
    for name in names:
        if name not in _SUPPORTED:
            raise ValueError(f"dtypes must be among {_SUPPORTED}, but got {name!r}")
    steps = [(name, label, call) for name in names for label, call in _calls(name)]
    start = time.perf_counter()
    for done, (name, label, call) in enumerate(steps):
        if progress:
            bar = "#" * (30 * done // len(steps))
            print(
                f"\rfastconv: compiling [{bar:<30}] {done}/{len(steps)} {label} ({name})".ljust(100),
                end="",
                file=sys.stderr,
                flush=True,
            )
        call()
    seconds = time.perf_counter() - start
    if progress:
        print(
            f"\rfastconv: compiled [{'#' * 30}] {len(steps)}/{len(steps)} in {seconds:.1f} s".ljust(100),
            file=sys.stderr,
        )
    return seconds
