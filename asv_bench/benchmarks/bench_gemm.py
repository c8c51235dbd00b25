"""fastconv.gemm against numpy.matmul (the BLAS baseline)."""

import numpy as np

import fastconv

GEMM_SHAPES = ["512x512x512", "1024x1024x1024", "64x25088x576", "512x392x4608"]  # m x n x k


def _operands(shape, dtype):
    m, n, k = (int(v) for v in shape.split("x"))
    rng = np.random.default_rng(0)
    return rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)


class Gemm:
    params = [GEMM_SHAPES, ["float32", "float64"]]
    param_names = ["shape", "dtype"]

    def setup(self, shape, dtype):
        self.a, self.b = _operands(shape, dtype)
        fastconv.gemm(self.a, self.b)  # compile before timing

    def time_gemm(self, shape, dtype):
        fastconv.gemm(self.a, self.b)

    def track_gflops(self, shape, dtype):
        import time

        start = time.perf_counter()
        fastconv.gemm(self.a, self.b)
        elapsed = time.perf_counter() - start
        return 2 * self.a.shape[0] * self.a.shape[1] * self.b.shape[1] / elapsed / 1e9

    track_gflops.unit = "GFLOP/s"


class GemmTransposed:
    """Operands stored by columns (transposed views), packed as they are: ``a.T`` (TN), ``b.T`` (NT), both (TT)."""

    params = [["1024x1024x1024", "64x25088x576"], ["TN", "NT", "TT"]]
    param_names = ["shape", "layout"]

    def setup(self, shape, layout):
        a, b = _operands(shape, "float32")
        self.a = np.ascontiguousarray(a.T).T if layout[0] == "T" else a
        self.b = np.ascontiguousarray(b.T).T if layout[1] == "T" else b
        fastconv.gemm(self.a, self.b)  # compile before timing

    def time_gemm(self, shape, layout):
        fastconv.gemm(self.a, self.b)


class NumpyMatmul:
    params = Gemm.params
    param_names = Gemm.param_names

    def setup(self, shape, dtype):
        self.a, self.b = _operands(shape, dtype)

    def time_matmul(self, shape, dtype):
        np.matmul(self.a, self.b)
