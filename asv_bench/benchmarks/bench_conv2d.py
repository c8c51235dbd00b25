"""conv2d, its gradients and conv_transpose2d on real CNN layers, with an im2col + numpy.matmul baseline."""

import numpy as np

import fastconv
from fastconv.bench import im2col_numpy_conv2d

from .common import CONV_LAYERS, TRANSPOSE_LAYERS, conv_arrays, transpose_arrays


class Conv2d:
    params = [list(CONV_LAYERS), ["float32", "float64"]]
    param_names = ["layer", "dtype"]

    def setup(self, layer, dtype):
        self.x, self.w, self.params = conv_arrays(layer, dtype)
        fastconv.conv2d(self.x, self.w, **self.params)  # compile before timing

    def time_conv2d(self, layer, dtype):
        fastconv.conv2d(self.x, self.w, **self.params)

    def peakmem_conv2d(self, layer, dtype):
        fastconv.conv2d(self.x, self.w, **self.params)


class Conv2dBias:
    """With a bias, which the GEMM paths add as they store a large output: against ``Conv2d`` without, the bias
    should cost nothing there (1x1 layers, the padded-input stem) and a pass over the output elsewhere."""

    params = [["1x1_256to64_56px", "7x7_s2_224px", "3x3_64ch_56px"]]
    param_names = ["layer"]

    def setup(self, layer):
        self.x, self.w, self.params = conv_arrays(layer, "float32")
        self.bias = np.linspace(-1, 1, self.w.shape[0], dtype=np.float32)
        fastconv.conv2d(self.x, self.w, self.bias, **self.params)  # compile before timing

    def time_conv2d_bias(self, layer):
        fastconv.conv2d(self.x, self.w, self.bias, **self.params)


class Conv2dAlgorithms:
    """Each kernel a 3x3 stride-1 or 4x4 stride-2 layer can run on, whichever ``"auto"`` picks: a regression in
    either shows."""

    params = [["3x3_64ch_56px", "3x3_256ch_14px", "4x4_s2_64to128_32px"], ["gemm", "winograd"]]
    param_names = ["layer", "algorithm"]

    def setup(self, layer, algorithm):
        self.x, self.w, self.params = conv_arrays(layer, "float32")
        fastconv.conv2d(self.x, self.w, **self.params, algorithm=algorithm)  # compile before timing

    def time_conv2d(self, layer, algorithm):
        fastconv.conv2d(self.x, self.w, **self.params, algorithm=algorithm)


class Conv2dGradients:
    params = [list(CONV_LAYERS), ["float32"]]
    param_names = ["layer", "dtype"]

    def setup(self, layer, dtype):
        self.x, self.w, self.params = conv_arrays(layer, dtype)
        self.dy = np.ones_like(fastconv.conv2d(self.x, self.w, **self.params))
        fastconv.conv2d_backward(self.x, self.w, self.dy, **self.params)  # compile before timing

    def time_conv2d_input(self, layer, dtype):
        fastconv.conv2d_input(self.x.shape, self.w, self.dy, **self.params)

    def time_conv2d_weight(self, layer, dtype):
        fastconv.conv2d_weight(self.x, self.w.shape, self.dy, **self.params)

    def time_conv2d_backward(self, layer, dtype):
        fastconv.conv2d_backward(self.x, self.w, self.dy, **self.params)

    def peakmem_conv2d_backward(self, layer, dtype):
        fastconv.conv2d_backward(self.x, self.w, self.dy, **self.params)


class ConvTranspose2d:
    params = [list(TRANSPOSE_LAYERS), ["float32"]]
    param_names = ["layer", "dtype"]

    def setup(self, layer, dtype):
        self.x, self.w, self.params = transpose_arrays(layer, dtype)
        self.dy = np.ones_like(fastconv.conv_transpose2d(self.x, self.w, **self.params))
        fastconv.conv_transpose2d_backward(self.x, self.w, self.dy, **self.params)

    def time_conv_transpose2d(self, layer, dtype):
        fastconv.conv_transpose2d(self.x, self.w, **self.params)

    def peakmem_conv_transpose2d(self, layer, dtype):
        fastconv.conv_transpose2d(self.x, self.w, **self.params)

    def time_conv_transpose2d_backward(self, layer, dtype):
        fastconv.conv_transpose2d_backward(self.x, self.w, self.dy, **self.params)

    def peakmem_conv_transpose2d_backward(self, layer, dtype):
        fastconv.conv_transpose2d_backward(self.x, self.w, self.dy, **self.params)


class Im2colNumpy:
    """The baseline fastconv must beat: patches by stride tricks, then numpy.matmul."""

    params = Conv2d.params
    param_names = Conv2d.param_names

    def setup(self, layer, dtype):
        self.x, self.w, self.params = conv_arrays(layer, dtype)

    def time_conv2d(self, layer, dtype):
        im2col_numpy_conv2d(self.x, self.w, **self.params)


class LargeImageMemory:
    """One 512x512 image through a 7x7 layer: its full im2col would be 3.1 GiB; fastconv packs panels instead."""

    timeout = 300

    def setup(self):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((1, 64, 512, 512)).astype(np.float32)
        self.w = rng.standard_normal((64, 64, 7, 7)).astype(np.float32)
        self.dy = np.ones((1, 64, 512, 512), np.float32)
        fastconv.conv2d_backward(self.x[:, :, :16, :16], self.w, self.dy[:, :, :16, :16], padding=3)

    def peakmem_conv2d_7x7_512px(self):
        fastconv.conv2d(self.x, self.w, padding=3)

    def peakmem_conv2d_backward_7x7_512px(self):
        fastconv.conv2d_backward(self.x, self.w, self.dy, padding=3)


class FirstCall:
    """Import and first-call time of a new process (warm kernel cache)."""

    def timeraw_import_and_first_calls(self):
        return """
        import numpy as np
        import fastconv
        x, w = np.ones((1, 3, 8, 8), np.float32), np.ones((4, 3, 3, 3), np.float32)
        y = fastconv.conv2d(x, w)
        fastconv.conv2d_backward(x, w, y)
        fastconv.conv_transpose2d(y, w)
        """
