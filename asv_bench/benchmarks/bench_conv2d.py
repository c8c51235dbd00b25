"""conv2d, its gradients and conv_transpose2d on real CNN layers, with an im2col + numpy.matmul baseline."""

import numpy as np

import fastconv
from fastconv.bench import im2col_numpy_conv2d

from .common import CONV_LAYERS, conv_arrays


class Conv2d:
    params = [list(CONV_LAYERS), ["float32", "float64"]]
    param_names = ["layer", "dtype"]

    def setup(self, layer, dtype):
        self.x, self.w, self.params = conv_arrays(layer, dtype)
        self.dy = np.ones_like(fastconv.conv2d(self.x, self.w, **self.params))  # also compiles

    def time_conv2d(self, layer, dtype):
        fastconv.conv2d(self.x, self.w, **self.params)

    def peakmem_conv2d(self, layer, dtype):
        fastconv.conv2d(self.x, self.w, **self.params)

    def time_conv2d_backward(self, layer, dtype):
        fastconv.conv2d_backward(self.x, self.w, self.dy, **self.params)

    def time_conv_transpose2d(self, layer, dtype):
        fastconv.conv_transpose2d(
            self.dy,
            self.w,
            None,
            stride=self.params["stride"],
            padding=self.params["padding"],
            groups=self.params["groups"],
        )


class Im2colNumpy:
    """The baseline fastconv must beat: patches by stride tricks, then numpy.matmul."""

    params = Conv2d.params
    param_names = Conv2d.param_names

    def setup(self, layer, dtype):
        self.x, self.w, self.params = conv_arrays(layer, dtype)

    def time_conv2d(self, layer, dtype):
        im2col_numpy_conv2d(self.x, self.w, **self.params)


class LargeImageMemory:
    """One 512x512 image through a 7x7 layer: its full im2col would be 3.1 GiB; the chunked one is bounded."""

    timeout = 300

    def setup(self):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((1, 64, 512, 512)).astype(np.float32)
        self.w = rng.standard_normal((64, 64, 7, 7)).astype(np.float32)
        fastconv.conv2d(self.x[:, :, :16, :16], self.w, padding=3)

    def peakmem_conv2d_7x7_512px(self):
        fastconv.conv2d(self.x, self.w, padding=3)


class FirstCall:
    """Import and first-call time of a new process (warm kernel cache)."""

    def timeraw_import_and_conv2d(self):
        return """
        import numpy as np
        import fastconv
        fastconv.conv2d(np.ones((1, 3, 8, 8), np.float32), np.ones((4, 3, 3, 3), np.float32))
        """
