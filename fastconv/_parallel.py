"""How fastconv's parallel kernels share the process with other threads and with fork().

Numba runs ``prange`` loops on one of three threading layers. fastconv depends on ``tbb`` (where wheels exist)
so Numba picks TBB, which is both thread-safe and fork-safe, and whose workers do not spin after a parallel
region. The others: ``workqueue`` aborts the whole process when two threads enter a parallel region at once,
so fastconv serialises its kernels there; GNU OpenMP (``omp``) is thread-safe, but a child forked after the
parent ran a parallel region is killed by OpenMP itself, which no library can prevent.

The thread count is a process-wide setting here (Numba's own ``set_num_threads`` is per calling thread), applied
to every kernel whatever thread calls it.
"""

import os
import threading

import numba

from .config import SERIAL_MAX_FLOPS

_THREAD_SAFE_LAYERS = ("tbb", "omp")

#: The ``parallel=`` option of every parallel kernel: only explicit ``prange`` loops run in parallel. Numba
#: would otherwise also turn array expressions and ``np.zeros`` in a kernel's own body into parallel loops of
#: their own, each compiled as one more function: compile time for no speed, since the kernels parallelise
#: their outer loop already.
PRANGE_ONLY = dict(
    prange=True,
    comprehension=False,
    reduction=False,
    inplace_binop=False,
    setitem=False,
    numpy=False,
    stencil=False,
    fusion=False,
)

_lock = threading.Lock()
_num_threads = None
_call = threading.local()  # what the calling thread's current fastconv call asked for: see `sized`


def _reset_after_fork():
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_reset_after_fork)


def threading_layer():
    """The threading layer Numba uses, or ``None`` before the first parallel region has run.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> _ = fastconv.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)))
    >>> fastconv.threading_layer() in ("tbb", "omp", "workqueue")
    True
    """
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def set_num_threads(n):
    """Use ``n`` threads in every fastconv kernel, whichever thread calls it.

    Parameters
    ----------
    n : int
        From 1 to ``numba.config.NUMBA_NUM_THREADS`` (the cores Numba started with).

    Examples
    --------
    >>> import fastconv
    >>> fastconv.set_num_threads(1)
    >>> fastconv.get_num_threads()
    1
    >>> fastconv.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"the number of threads must be an int, but got {n!r}")
    if not 1 <= n <= limit:
        raise ValueError(f"the number of threads must be between 1 and {limit}, but got {n}")
    global _num_threads
    _num_threads = n


def get_num_threads():
    """The number of threads fastconv's kernels use (by default all of Numba's).

    Examples
    --------
    >>> import fastconv
    >>> fastconv.get_num_threads() >= 1
    True
    """
    return _num_threads or numba.config.NUMBA_NUM_THREADS


class sized:
    """Run the kernels of a call of ``flops`` floating-point operations on the calling thread alone if that is
    fewer than ``config.SERIAL_MAX_FLOPS``, else on :func:`get_num_threads` threads. Per calling thread; a context
    manager.

    The results are the same bits either way: the kernels split their work by shape, never by thread count.
    (A class, not a generator: entered on every call, it costs a third as much.)
    """

    __slots__ = ("serial", "outer")

    def __init__(self, flops):
        self.serial = flops < SERIAL_MAX_FLOPS

    def __enter__(self):
        self.outer = getattr(_call, "serial", False)
        _call.serial = self.serial

    def __exit__(self, *exc_info):
        _call.serial = self.outer


def _thread_safe():
    """Whether Numba's threading layer lets two threads run parallel kernels at once. Known for good once the
    first parallel kernel has run."""
    global _layer_is_thread_safe
    if _layer_is_thread_safe is None:
        layer = threading_layer()
        if layer is None:
            return False  # not chosen yet: the first launch chooses it
        _layer_is_thread_safe = layer in _THREAD_SAFE_LAYERS
    return _layer_is_thread_safe


_layer_is_thread_safe = None


def _set_thread_count():
    """Give Numba the thread count of the calling thread's current call (:func:`sized`), unless it has it:
    reading it costs less than setting it."""
    wanted = 1 if getattr(_call, "serial", False) else get_num_threads()
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)


def run(kernel, *args):
    """``kernel(*args)`` with the thread count of the current call (:func:`sized`), serialised where the
    threading layer needs it."""
    _set_thread_count()
    if _thread_safe():
        kernel(*args)
    else:  # workqueue, or not chosen yet: one kernel at a time
        with _lock:
            kernel(*args)
