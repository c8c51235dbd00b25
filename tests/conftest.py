"""Shared test helpers: the one tolerance table, random data, and the optional PyTorch oracle."""

import zlib

import numpy as np
import pytest

# One tolerance table, keyed by the result dtype. The error of a sum of k products grows like sqrt(k) * eps
# times the magnitude of the terms; the shapes in the tests keep k below a few hundred.
TOLERANCE = {
    np.dtype(np.float32): dict(rtol=1e-4, atol=1e-4),
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-10),
}


def assert_close(actual, expected, dtype=None):
    """``actual`` has ``expected``'s shape and dtype and matches it within the tolerance of that dtype."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = np.dtype(dtype or expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def random_array(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True)
def parallel_kernels(monkeypatch):
    # The tests' arrays are small, and calls below config.SERIAL_MAX_FLOPS run on one thread: run them on all,
    # so that the kernels' partitions between threads are what the tests check. (Serial calls are the same
    # kernels on one thread: test_results_do_not_depend_on_the_thread_count.)
    from fastconv import _parallel

    monkeypatch.setattr(_parallel, "SERIAL_MAX_FLOPS", 0)


@pytest.fixture
def rng(request):
    # A fixed seed per test: failures reproduce, and different tests see different data. crc32, not hash():
    # Python salts str hashes per process, which gave every run different data.
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


try:  # PyTorch is an optional, independent oracle.
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None

requires_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
