"""fastconv.dask against the in-memory functions, on the threaded scheduler and on a real LocalCluster."""

import numpy as np
import pytest

from conftest import assert_close

da = pytest.importorskip("dask.array")
import fastconv  # noqa: E402
import fastconv.dask as fcd  # noqa: E402

# (input shape, input chunks, weight shape, kwargs)
CASES = [
    ((6, 3, 10, 10), (2, 3, 10, 10), (4, 3, 3, 3), dict(padding=1)),  # batch chunks: map_blocks, no halo
    ((1, 2, 37, 41), (1, 2, 10, 12), (3, 2, 3, 3), dict(padding=1)),
    ((1, 2, 37, 41), (1, 1, 9, 16), (4, 2, 5, 3), dict(stride=2, padding=((2, 1), (0, 3)))),  # asymmetric
    ((2, 4, 30, 29), (1, 4, 7, 11), (4, 2, 3, 3), dict(stride=(3, 2), dilation=(2, 3), groups=2, padding="same")),
    ((1, 1, 25, 25), (1, 1, 6, 6), (2, 1, 1, 1), dict(stride=3)),  # stride > kernel: no halo at all
    ((1, 2, 20, 20), (1, 2, 5, 20), (2, 2, 7, 7), dict(padding="valid", dilation=2)),  # halo wider than a chunk
]


def _case(case, seed=0):
    shape, chunks, w_shape, kwargs = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    return x, da.from_array(x, chunks=chunks), w, b, kwargs


@pytest.mark.parametrize("case", CASES)
def test_conv2d_threaded_scheduler(case):
    x, dx, w, b, kwargs = _case(case)
    result = fcd.conv2d(dx, w, b, **kwargs)
    expected = fastconv.conv2d(x, w, b, **kwargs)
    assert result.shape == expected.shape
    assert_close(result.compute(scheduler="threads"), expected)


def test_backward_on_batch_chunks_threaded_scheduler(rng):
    x = rng.standard_normal((6, 3, 9, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    dy = rng.standard_normal((6, 4, 9, 8))
    got = fcd.conv2d_backward(
        da.from_array(x, chunks=(2, 3, 9, 8)), w, da.from_array(dy, chunks=(3, 4, 9, 8)), padding=1
    )
    for a, e in zip(dask_compute(got, "threads"), fastconv.conv2d_backward(x, w, dy, padding=1)):
        assert_close(a, e)


def dask_compute(arrays, scheduler):
    import dask

    return dask.compute(*arrays, scheduler=scheduler)


def test_on_a_local_cluster_of_two_processes():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        for case in (CASES[1], CASES[3]):
            x, dx, w, b, kwargs = _case(case)
            assert_close(client.compute(fcd.conv2d(dx, w, b, **kwargs)).result(), fastconv.conv2d(x, w, b, **kwargs))
        x, dx, w, b, kwargs = _case(CASES[0])
        dy = np.ones(fastconv.conv2d(x, w, **kwargs).shape, np.float32)
        got = client.compute(list(fcd.conv2d_backward(dx, w, dy, **kwargs)), sync=True)
        for a, e in zip(got, fastconv.conv2d_backward(x, w, dy, **kwargs)):
            assert_close(a, e)


def test_dask_errors():
    with pytest.raises(TypeError, match="dask array"):
        fcd.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)))
    with pytest.raises(ValueError, match="4-D"):
        fcd.conv2d(da.ones((1, 4, 4)), np.ones((1, 1, 3, 3)))
    with pytest.raises(ValueError, match="batch axis only"):
        fcd.conv2d_backward(da.ones((1, 1, 8, 8), chunks=(1, 1, 4, 8)), np.ones((1, 1, 3, 3)), np.ones((1, 1, 6, 6)))
    with pytest.raises(ValueError, match="channels"):
        fcd.conv2d(da.ones((1, 2, 8, 8)), np.ones((1, 3, 3, 3)))
