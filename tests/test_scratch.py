"""Scratch kept between calls: reused by name, aligned, bounded, per thread, never seen by a user."""

import threading

import numpy as np
import pytest

import fastconv
from conftest import assert_close
from fastconv import _direct, _scratch, _validate, reference
from fastconv import conv as conv_module


def test_scratch_is_reused_by_name_and_aligned():
    fastconv.release_scratch()
    first = _scratch.scratch("test buffer", (3, 5), np.float32)
    again = _scratch.scratch("test buffer", (2, 3), np.float64)  # 48 bytes of 60: the same memory
    other = _scratch.scratch("another buffer", (3, 5), np.float32)
    assert first.shape == (3, 5) and first.dtype == np.float32 and first.flags.c_contiguous
    assert again.shape == (2, 3) and again.dtype == np.float64
    assert again.ctypes.data == first.ctypes.data
    assert other.ctypes.data != first.ctypes.data
    assert first.ctypes.data % 64 == 0 and other.ctypes.data % 64 == 0
    fastconv.release_scratch()


def test_scratch_zeros_a_reused_buffer_when_asked():
    _scratch.scratch("test buffer", (100,), np.float64).fill(7)
    assert not _scratch.scratch("test buffer", (100,), np.float64, zeros=True).any()
    fastconv.release_scratch()


def test_scratch_beyond_the_bound_is_not_kept(monkeypatch):
    monkeypatch.setattr(_scratch, "SCRATCH_CACHE_BYTES", 1000)
    fastconv.release_scratch()
    kept = _scratch.scratch("small", (100,), np.float32)  # 400 bytes (+ alignment): kept
    large = _scratch.scratch("large", (1000,), np.float32)  # 4000 bytes: for this call only
    assert _scratch.scratch("small", (100,), np.float32).ctypes.data == kept.ctypes.data
    assert _scratch.scratch("large", (1000,), np.float32).ctypes.data != large.ctypes.data  # large is alive
    assert "large" not in _scratch._local.pool
    fastconv.release_scratch()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_thread_rows_do_not_share_cache_lines(dtype):
    """Two threads writing into one cache line would take it from each other on every store."""
    rows = _scratch.per_thread((930,), dtype, name="test rows")
    assert rows.shape[1] >= 930 and rows.strides[0] % 128 == 0 and rows.ctypes.data % 64 == 0
    with pytest.raises(ValueError, match="whole cache lines"):
        _scratch.per_thread((3, 5), dtype)
    fastconv.release_scratch()


def test_each_thread_has_its_own_scratch():
    addresses = []
    both_alive = threading.Barrier(2)

    def take():
        addresses.append(_scratch.scratch("test buffer", (16,), np.float32).ctypes.data)
        both_alive.wait()  # neither thread's scratch is freed before both have theirs

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(addresses)) == 2


def test_results_do_not_share_memory_with_the_next_call(rng):
    """Kept scratch is never returned: a result survives later calls of every shape, and stays right."""
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    first = fastconv.conv_transpose2d(x[:, :, :5, :5], w.transpose(1, 0, 2, 3).copy(), stride=2)
    expected = first.copy()
    for stride in (1, 2):
        for _ in range(2):
            dy = rng.standard_normal(fastconv.conv2d(x, w, stride=stride).shape).astype(np.float32)
            grads = fastconv.conv2d_backward(x, w, dy, stride=stride)
            for got, want in zip(grads, reference.conv2d_backward(x, w, dy, stride=stride)):
                assert_close(got, want)
    np.testing.assert_array_equal(first, expected)


@pytest.mark.parametrize(
    "H, R, stride, padding, dilation", [(7, 3, 1, 1, 1), (28, 3, 2, 1, 1), (14, 5, 3, 2, 2), (1, 1, 1, 0, 1)]
)
def test_direct_workspace_is_what_the_direct_kernel_takes(H, R, stride, padding, dilation):
    """The memory check counts the direct kernel's scratch from its own layout: never less than it allocates."""
    _, geometry, _ = _validate.parse_conv2d("conv2d", (1, 4, H, H), np.ones((4, 1, R, R)), stride, padding, dilation, 4)
    P, Q = geometry.output_shape[2:]
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        layout = _direct._phase_layout(H, H, R, R, P, Q, geometry.kernel_geometry, dtype)
        assert layout.phases.nbytes + layout.wide.nbytes <= conv_module._workspace_bytes(geometry, dtype, direct=True)
    fastconv.release_scratch()
