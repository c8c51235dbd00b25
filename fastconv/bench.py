"""``python -m fastconv bench``: time conv2d against its peers on real CNN layers and print a table.

Peers: an im2col + ``numpy.matmul`` baseline (NumPy's BLAS), PyTorch's CPU convolution where torch is
installed, and ``fastconv.reference`` (direct loops) on layers small enough for it. Each peer runs alone (the
others' thread pools idle), sides alternate within each repeat, and the median time is reported, so ratios
are measured side by side on a shared, noisy machine.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numba
import numpy as np

from . import conv2d, reference


@dataclass(frozen=True)
class Layer:
    """A conv2d layer: input (N, C, H, W), K filters of R x S, stride, symmetric padding, groups."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @classmethod
    def parse(cls, text):
        """From ``"N,C,H,W,K,R,S[,stride[,padding[,groups]]]"``."""
        values = [int(v) for v in text.split(",")]
        if not 7 <= len(values) <= 10:
            raise argparse.ArgumentTypeError(f"a layer is N,C,H,W,K,R,S[,stride[,padding[,groups]]], got {text!r}")
        return cls(*values)

    def __str__(self):
        extra = f" s{self.stride} p{self.padding}" + (f" g{self.groups}" if self.groups > 1 else "")
        return f"{self.N}x{self.C}x{self.H}x{self.W} -> {self.K} {self.R}x{self.S}{extra}"

    @property
    def output_hw(self):
        return tuple((n + 2 * self.padding - k) // self.stride + 1 for n, k in ((self.H, self.R), (self.W, self.S)))

    @property
    def flops(self):
        P, Q = self.output_hw
        return 2 * self.N * self.K * P * Q * (self.C // self.groups) * self.R * self.S


# The ResNet / VGG-style layers the performance targets are set on, then two small layers the reference can run.
DEFAULT_LAYERS = [
    Layer(8, 64, 56, 56, 64, 3, 3, 1, 1),
    Layer(8, 128, 28, 28, 128, 3, 3, 1, 1),
    Layer(8, 256, 14, 14, 256, 3, 3, 1, 1),
    Layer(8, 512, 7, 7, 512, 3, 3, 1, 1),
    Layer(8, 256, 56, 56, 64, 1, 1),
    Layer(8, 64, 56, 56, 256, 1, 1),
    Layer(8, 3, 224, 224, 64, 7, 7, 2, 3),
    Layer(8, 256, 28, 28, 256, 3, 3, 1, 1, 256),
    Layer(1, 16, 32, 32, 16, 3, 3, 1, 1),
    Layer(4, 8, 16, 16, 16, 3, 3, 2, 1),
]

#: Layers above this many flops are not run through the direct-loop reference (it would take minutes).
REFERENCE_MAX_FLOPS = 2e8


def im2col_numpy_conv2d(x, weight, stride, padding, groups):
    """The textbook baseline: pad, extract every patch with stride tricks, one ``numpy.matmul`` per group."""
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    P = (H + 2 * padding - R) // stride + 1
    Q = (W + 2 * padding - S) // stride + 1
    sN, sC, sH, sW = xp.strides
    patches = np.lib.stride_tricks.as_strided(
        xp, (N, C, P, Q, R, S), (sN, sC, sH * stride, sW * stride, sH, sW), writeable=False
    )
    Kg = K // groups
    out = np.empty((K, N, P, Q), dtype=x.dtype)
    for g in range(groups):
        col = patches[:, g * Cg : (g + 1) * Cg].transpose(1, 4, 5, 0, 2, 3).reshape(Cg * R * S, N * P * Q)
        out[g * Kg : (g + 1) * Kg] = (weight[g * Kg : (g + 1) * Kg].reshape(Kg, -1) @ col).reshape(Kg, N, P, Q)
    return out.transpose(1, 0, 2, 3)


def _median_ms(function, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _settle():
    # Worker threads spin after a parallel region before they sleep (OpenBLAS's for about 2**28 cycles, some
    # 70 ms here); let them go idle so the next side does not share the cores with them.
    time.sleep(0.2)


def _peers(layer, x, w, threads):
    """The functions to time on this layer, by column name."""
    params = dict(stride=layer.stride, padding=layer.padding, groups=layer.groups)
    peers = {
        "fastconv": lambda: conv2d(x, w, **params),
        "im2col+numpy": lambda: im2col_numpy_conv2d(x, w, **params),
    }
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        peers["torch"] = lambda: torch.nn.functional.conv2d(tx, tw, **params)
    if layer.flops <= REFERENCE_MAX_FLOPS:
        peers["reference"] = lambda: reference.conv2d(x, w, **params)
    return peers


def run(layers, dtype, threads, repeat, progress=sys.stderr):
    """Time every peer on every layer; return one row of results per layer."""
    numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for i, layer in enumerate(layers, 1):
        if progress:
            bar = "#" * (20 * i // len(layers))
            print(f"\r[{bar:<20}] {i}/{len(layers)} {layer}", end="", file=progress, flush=True)
        x = rng.standard_normal((layer.N, layer.C, layer.H, layer.W)).astype(dtype)
        w = rng.standard_normal((layer.K, layer.C // layer.groups, layer.R, layer.S)).astype(dtype)
        peers = _peers(layer, x, w, threads)
        expected = peers["fastconv"]()  # also compiles
        got = peers["im2col+numpy"]()
        if "torch" in peers:
            peers["torch"]()  # oneDNN builds its kernel on the first call of a shape
        tol = 1e-3 if dtype == np.float32 else 1e-9
        if not np.allclose(expected, got, rtol=tol, atol=tol * float(np.abs(got).max(initial=1.0))):
            raise AssertionError(f"fastconv and the im2col + numpy baseline disagree on {layer}")
        samples = {name: [] for name in peers}
        for _ in range(repeat):
            for name, function in peers.items():
                _settle()
                samples[name].append(_median_ms(function, 1 if name == "reference" else 3))
        row = {"layer": str(layer), **asdict(layer), "gflop": layer.flops / 1e9}
        for name, values in samples.items():
            row[f"{name}_ms"] = statistics.median(values)
        rows.append(row)
    if progress:
        print(file=progress)
    return rows


def format_table(rows):
    """A plain-text table: ms and GFLOP/s of fastconv, and each peer's time and fastconv's speed-up over it."""
    peers = [p for p in ("im2col+numpy", "torch", "reference") if any(f"{p}_ms" in r for r in rows)]
    header = f"{'layer':<34} {'GFLOP':>7} {'fastconv ms':>11} {'GFLOP/s':>8}"
    for p in peers:
        header += f" {p + ' ms':>17} {'speed-up':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ms = r["fastconv_ms"]
        line = f"{r['layer']:<34} {r['gflop']:>7.3f} {ms:>11.2f} {r['gflop'] / ms * 1e3:>8.1f}"
        for p in peers:
            if f"{p}_ms" in r:
                line += f" {r[f'{p}_ms']:>17.2f} {r[f'{p}_ms'] / ms:>7.2f}x"
            else:
                line += f" {'skipped':>17} {'':>8}"
        lines.append(line)
    for p in peers:
        ratios = [r[f"{p}_ms"] / r["fastconv_ms"] for r in rows if f"{p}_ms" in r]
        lines.append(
            f"geometric-mean speed-up over {p}: {statistics.geometric_mean(ratios):.2f}x on {len(ratios)} layers"
        )
    if any("reference_ms" not in r for r in rows):
        lines.append(
            f"reference skipped on layers above {REFERENCE_MAX_FLOPS / 1e9:.1f} GFLOP (direct loops take minutes)"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastconv bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layer",
        dest="layers",
        action="append",
        type=Layer.parse,
        metavar="N,C,H,W,K,R,S[,stride[,padding[,groups]]]",
        help="a layer to time (repeatable); default: ten built-in layers",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS, help="threads for every peer")
    parser.add_argument("--repeat", type=int, default=5, help="alternating rounds; the median is reported")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    args = parser.parse_args(argv)
    rows = run(args.layers or DEFAULT_LAYERS, np.dtype(args.dtype), args.threads, args.repeat)
    print(f"conv2d forward, {args.dtype}, {args.threads} threads, median of {args.repeat} alternating rounds")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
