"""Threads, fork, the kernel cache, compiled specialisations, memory and the thread count.

Thread and fork checks run in subprocesses with timeouts, so a crash or a hang fails the test instead of CI.
"""

import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest

import fastconv
from fastconv import _cache, _conv_kernels, _direct, _gemm, _macro

WORKLOAD = """
import numpy as np, threading, fastconv
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
y = fastconv.conv2d(x, w, padding=1)
expected = [y, *fastconv.conv2d_backward(x, w, y, padding=1), fastconv.conv_transpose2d(y, w, padding=1)]
def results():
    return [fastconv.conv2d(x, w, padding=1), *fastconv.conv2d_backward(x, w, y, padding=1),
            fastconv.conv_transpose2d(y, w, padding=1)]
def same(got):
    return all(np.array_equal(a, b) for a, b in zip(got, expected))
"""


def run_python(code, env=None, timeout=300):
    """Run ``code`` in a new interpreter; return its completed process (stdout and stderr as text)."""
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.mark.parametrize("layer", ["default", "tbb", "omp", "workqueue"])
def test_eight_threads_at_once_get_correct_results(layer):
    code = (
        WORKLOAD
        + """
failures = []
def worker():
    for _ in range(10):
        if not same(results()):
            failures.append(1)
threads = [threading.Thread(target=worker) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print("layer", fastconv.threading_layer(), "failures", len(failures))
"""
    )
    env = {} if layer == "default" else {"NUMBA_THREADING_LAYER": layer}
    done = run_python(code, env)
    assert done.returncode == 0, done.stderr[-2000:]
    if layer == "default":
        assert "layer tbb" in done.stdout  # the tbb dependency makes Numba pick its thread- and fork-safe layer
    assert "failures 0" in done.stdout, done.stdout


def test_forked_child_can_use_fastconv():
    code = (
        WORKLOAD
        + """
import multiprocessing as mp
def child(queue):
    queue.put(same(results()))
if __name__ == "__main__":
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=child, args=(queue,))
    process.start()
    process.join(120)
    print("exitcode", process.exitcode, "correct", queue.get(timeout=5))
"""
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exitcode 0 correct True" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_warm_cache_start_compiles_nothing():
    code = (
        WORKLOAD
        + """
import time
start = time.perf_counter()
results()
from numba.core.registry import CPUDispatcher
from fastconv import _conv_kernels, _direct, _macro, _gemm, _im2col, _winograd
modules = (_conv_kernels, _direct, _macro, _gemm, _im2col, _winograd)
kernels = [k for m in modules for k in vars(m).values() if isinstance(k, CPUDispatcher)]
print("misses", sum(sum(k.stats.cache_misses.values()) for k in kernels))
print("hits", sum(sum(k.stats.cache_hits.values()) for k in kernels))
"""
    )
    run_python(code)  # fills the cache if this test runs first
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "misses 0" in done.stdout and "hits 0" not in done.stdout, done.stdout


def test_kernels_cached_by_a_process_with_fewer_threads_run_with_more(tmp_path):
    """Per-thread scratch is sized when called, never frozen into cached machine code.

    A kernel that read the thread count at compile time, cached by a 1-thread process, wrote past its
    per-thread buffers (a segfault) when loaded by a 2-thread one. A copy of the package gets a cache of its
    own, compiled here by the 1-thread process.
    """
    import shutil

    shutil.copytree(_cache.PACKAGE_DIR, tmp_path / "fastconv", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
import numpy as np, numba, fastconv
from fastconv import reference
assert fastconv.__file__.startswith({str(tmp_path)!r})
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 16, 20, 20))
w = rng.standard_normal((16, 1, 3, 3))
y = fastconv.conv2d(x, w, padding=1, groups=16)
dw = fastconv.conv2d_weight(x, w.shape, y, padding=1, groups=16)
ok = np.allclose(y, reference.conv2d(x, w, padding=1, groups=16))
ok &= np.allclose(dw, reference.conv2d_weight(x, w.shape, y, padding=1, groups=16))
print("threads", numba.config.NUMBA_NUM_THREADS, "correct", ok)
"""
    for threads in ("1", "4"):
        done = run_python(code, {"NUMBA_NUM_THREADS": threads})
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"threads {threads} correct True" in done.stdout, done.stdout


def test_cache_folder_falls_back_when_the_package_is_read_only(tmp_path, monkeypatch):
    read_only = tmp_path / "file"
    read_only.write_text("a file where a folder would be: mkdir under it fails, even as root")
    monkeypatch.setattr(_cache, "_candidate_roots", lambda: iter([read_only / "cache", tmp_path / "user"]))
    folder = _cache._choose_cache_dir()
    assert folder == tmp_path / "user" / f"kernels-{_cache.SOURCE_STAMP}"
    monkeypatch.setattr(_cache, "_candidate_roots", lambda: iter([read_only / "cache"]))
    assert _cache._choose_cache_dir().is_dir()  # nothing writable: a private temporary folder, not an error


def test_cache_key_changes_with_any_source_file_and_old_kernels_are_removed(tmp_path, monkeypatch):
    package = tmp_path / "fastconv"
    package.mkdir()
    for path in _cache.PACKAGE_DIR.glob("*.py"):
        (package / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(_cache, "PACKAGE_DIR", package)
    before = _cache._source_stamp()
    assert before == _cache.SOURCE_STAMP
    with open(package / "_im2col.py", "a") as f:  # a change in a callee's module, not the caller's
        f.write("\n# changed\n")
    after = _cache._source_stamp()
    assert after != before
    root = tmp_path / "cache"
    (root / f"kernels-{before}").mkdir(parents=True)
    monkeypatch.setattr(_cache, "SOURCE_STAMP", after)
    monkeypatch.setattr(_cache, "_candidate_roots", lambda: iter([root]))
    assert _cache._choose_cache_dir() == root / f"kernels-{after}"
    assert not (root / f"kernels-{before}").exists()


def _layouts(array):
    readonly = array.copy()
    readonly.flags.writeable = False
    return [array, np.asfortranarray(array), np.repeat(array, 2, axis=-1)[..., ::2], array[..., ::-1], readonly]


def test_layouts_compile_no_new_kernel_versions(rng):
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    dy = np.ones((1, 4, 4, 4), np.float32)

    def everything(xs, ws, dys):
        fastconv.conv2d(xs, ws)
        fastconv.conv2d(xs, ws[:, :1], groups=4)
        fastconv.conv2d_backward(xs, ws, dys)
        fastconv.conv_transpose2d(dys, ws)
        fastconv.gemm(xs[0, 0], xs[0, 0])

    everything(x, w, dy)
    kernels = [
        _macro._macro_kernel,
        _conv_kernels._weight_grad_tasks,
        _direct._conv2d_direct,
        _gemm._pack_a,
    ]
    counts = [len(k.signatures) for k in kernels]
    for xs, ws, dys in zip(_layouts(x), _layouts(w), _layouts(dy)):
        everything(xs, ws, dys)
    assert [len(k.signatures) for k in kernels] == counts


def test_a_call_that_cannot_fit_raises_memory_error_naming_the_sizes_and_nothing_breaks():
    import time

    huge = np.broadcast_to(np.float32(1), (64, 3, 20000, 20000))  # no memory behind it
    start = time.perf_counter()
    with pytest.raises(MemoryError, match=r"conv2d needs .*TiB.*output of shape \(64, 64, 19998, 19998\)"):
        fastconv.conv2d(huge, np.ones((64, 3, 3, 3), np.float32))
    with pytest.raises(MemoryError, match="input gradient"):
        fastconv.conv2d_input(huge.shape, np.ones((64, 3, 3, 3), np.float32), np.ones((64, 64, 2, 2)), dilation=9999)
    assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(fastconv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3))), [[[[9.0]]]])


def test_thread_count_is_process_wide_and_does_not_change_results(rng):
    x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    expected = fastconv.conv2d(x, w, padding=1)
    seen = {}
    saved = fastconv.get_num_threads()
    try:
        setter = threading.Thread(target=fastconv.set_num_threads, args=(1,))
        setter.start()
        setter.join()
        assert fastconv.get_num_threads() == 1  # set in another thread, seen here

        def worker():
            seen["result"] = fastconv.conv2d(x, w, padding=1)
            seen["numba threads"] = numba.get_num_threads()

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen["numba threads"] == 1
        np.testing.assert_array_equal(seen["result"], expected)
    finally:
        fastconv.set_num_threads(saved)
    with pytest.raises(ValueError, match="between 1 and"):
        fastconv.set_num_threads(0)
    with pytest.raises(TypeError, match="int"):
        fastconv.set_num_threads(1.0)


def test_small_calls_run_their_kernels_on_the_calling_thread_alone(monkeypatch):
    from fastconv import _parallel

    monkeypatch.setattr(_parallel, "SERIAL_MAX_FLOPS", 1e6)
    launched = []  # the thread count Numba has as each driver starts its kernels
    set_thread_count = _parallel._set_thread_count
    monkeypatch.setattr(
        _parallel, "_set_thread_count", lambda: (set_thread_count(), launched.append(numba.get_num_threads()))
    )
    small = np.ones((1, 8, 16, 16), np.float32), np.ones((8, 8, 3, 3), np.float32), 64  # 0.29 and 0.52 MFLOP
    large = np.ones((4, 16, 32, 32), np.float32), np.ones((16, 16, 3, 3), np.float32), 256  # 19 and 34 MFLOP
    for (x, w, n), threads in [(small, 1), (large, fastconv.get_num_threads())]:
        launched.clear()
        dy = fastconv.conv2d(x, w, padding=1)
        fastconv.conv2d_backward(x, w, dy, padding=1)
        fastconv.conv_transpose2d(dy, w, padding=1)
        fastconv.conv_transpose2d_backward(dy, w, x, padding=1)
        fastconv.gemm(np.ones((n, n), np.float32), np.ones((n, n), np.float32))
        assert launched and set(launched) == {threads}
    with pytest.raises(ZeroDivisionError), _parallel.sized(0):
        1 / 0
    launched.clear()
    _parallel.run(lambda: None)  # outside any call, and after one that raised: all threads
    assert launched == [fastconv.get_num_threads()]


def test_precompile_rejects_unknown_dtypes():
    with pytest.raises(ValueError, match="float16"):
        fastconv.precompile(dtypes=["float16"], progress=False)
