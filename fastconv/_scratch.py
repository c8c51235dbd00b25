"""Scratch arrays for the drivers, kept from one call to the next.

A driver's scratch (packed weights, packed panels, column buffers, stride phases, partial sums) is the same
size on every call of a training or inference loop. Allocated afresh, each buffer above glibc's mmap threshold is
mapped, first touched page by page and unmapped again on every call, and unmapping memory that another thread
touched interrupts that thread to flush its TLB. Measured (float32, 2 threads, a process whose malloc had not
raised its threshold yet): ``gemm`` 512^3 1.14-1.24 ms with fresh buffers, 0.63 ms with the same buffers;
conv_transpose2d 8x128x28x28 -> 64 2x2 s2 8.5-10.4 ms against 1.8-2.5 ms.

So each thread keeps its scratch by name, up to ``config.SCRATCH_CACHE_BYTES`` in all; a request beyond that is
allocated for the one call. Names are per call site: no two buffers that are live at once share one.
"""

import math
import threading

import numba
import numpy as np

from .config import SCRATCH_CACHE_BYTES

_ALIGNMENT = 64  # bytes: a cache line, and an AVX-512 vector
_local = threading.local()


def scratch(name, shape, dtype, zeros=False):
    """An array of ``shape`` and ``dtype`` for one call's scratch, uninitialised unless ``zeros``.

    The memory is this thread's buffer ``name``, reused by the next call that asks for it: the array must not
    outlive the call (it is never returned to a user).
    """
    pool = _local.__dict__.setdefault("pool", {})
    entry = pool.get(name)  # [buffer, {(shape, dtype): a view of it made before}]
    # The view a call of the same shape made last time: three NumPy calls fewer, a microsecond of a small call.
    array = entry[1].get((shape, dtype)) if entry is not None else None
    if array is None:
        array = _new_view(pool, name, shape, dtype)
    if zeros:
        array.fill(0)
    return array


#: Views of one buffer kept for reuse: a network's layers of a few shapes share a name.
_VIEWS_PER_BUFFER = 16


def _new_view(pool, name, shape, dtype):
    """A view of ``pool[name]``'s buffer as ``shape`` and ``dtype``, the buffer replaced first when too small (and
    kept only while the pool's buffers fit ``SCRATCH_CACHE_BYTES``)."""
    key = (shape, dtype)
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else shape
    nbytes = math.prod(shape) * dtype.itemsize
    entry = pool.get(name)
    if entry is None or entry[0].size < nbytes:
        pool.pop(name, None)
        entry = [_aligned_bytes(nbytes), {}]  # kept aligned: finding the offset costs more than the rest
        if nbytes + sum(kept.size for kept, _ in pool.values()) <= SCRATCH_CACHE_BYTES:
            pool[name] = entry
    array = entry[0][:nbytes].view(dtype).reshape(shape)
    views = entry[1]
    if len(views) >= _VIEWS_PER_BUFFER:
        views.clear()
    views[key] = array
    return array


#: Arrays of fewer bytes than this are not aligned by :func:`empty_aligned`: the four NumPy calls it makes cost
#: 2.5 us, against 0.3 for ``np.empty``, a tenth of a small convolution's call.
_ALIGNED_MIN_BYTES = 4096


def empty_aligned(shape, dtype):
    """``np.empty(shape, dtype)`` starting on a cache line (64 bytes) from _ALIGNED_MIN_BYTES: NumPy's own may
    start anywhere 16 bytes apart, and a vector store into such an array splits a line; the non-temporal
    stores of a GEMM's output (``config.STREAM_OUTPUT_BYTES``) need the alignment."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _ALIGNED_MIN_BYTES:
        return np.empty(shape, dtype)
    return _aligned_bytes(nbytes).view(dtype).reshape(shape)


def _aligned_bytes(nbytes):
    """``nbytes`` uninitialised bytes starting on a cache line (``_ALIGNMENT``)."""
    buffer = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = -buffer.ctypes.data % _ALIGNMENT
    return buffer[offset : offset + nbytes]


def per_thread_length(length, dtype):
    """The values :func:`per_thread` gives a one-dimensional row of ``length``: up to a pair of cache lines."""
    line_pair = 2 * _ALIGNMENT // np.dtype(dtype).itemsize
    return -(-length // line_pair) * line_pair


def per_thread(shape, dtype, zeros=False, name=None):
    """Scratch with one row of ``shape`` per Numba thread, indexed in a kernel by ``numba.get_thread_id()``;
    kept between calls as :func:`scratch` ``name`` when a name is given.

    Sized here, when called, for this process's threads: a count read inside a kernel would be frozen into the
    cached machine code, and a process started with more threads would write past the end.

    Rows fill whole cache lines: two threads writing into one line take it from each other on every store
    (false sharing), and Zen 4 prefetches lines in pairs. A one-dimensional row is lengthened to the next pair
    of lines here; a longer shape must fill whole lines itself. Measured, depthwise 8x256x28x28 3x3 (rows of
    930 and 840 float32, 2 threads): 0.92 ms with the rows end to end, 0.53 ms a line apart, 0.43 ms two apart.
    """
    dtype = np.dtype(dtype)
    if len(shape) == 1:
        shape = (per_thread_length(shape[0], dtype),)
    elif math.prod(shape) * dtype.itemsize % _ALIGNMENT:
        raise ValueError(f"a per-thread row of shape {shape} and dtype {dtype} does not fill whole cache lines")
    shape = (numba.config.NUMBA_NUM_THREADS, *shape)
    if name is not None:
        return scratch(name, shape, dtype, zeros)
    return np.zeros(shape, dtype) if zeros else np.empty(shape, dtype)


def release_scratch():
    """Free the scratch the calling thread keeps between calls (``config.SCRATCH_CACHE_BYTES`` at most).

    The next call that needs scratch allocates it again. For a long-lived thread done with convolutions.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> y = fastconv.conv2d(np.ones((1, 2, 8, 8)), np.ones((3, 2, 3, 3)))
    >>> fastconv.release_scratch()
    """
    _local.__dict__.pop("pool", None)
