"""``python -m fastconv bench``: time fastconv against its peers on real layers and print a table.

Peers: PyTorch's CPU convolution where torch is installed, a NumPy baseline (im2col + ``numpy.matmul`` for the
forward pass, ``numpy.matmul`` for ``--op gemm``), and ``fastconv.reference`` (direct loops) on layers small
enough for it. Each peer runs alone (the others' thread pools idle), sides alternate within each round, and the
median is reported, so ratios are measured side by side on a shared, noisy machine.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import _parallel, conv2d, conv2d_backward, conv_transpose2d, conv_transpose2d_backward, gemm, reference

#: Layers above this many flops are not run through the direct-loop reference (it would take minutes).
REFERENCE_MAX_FLOPS = 2e8

#: glibc's malloc maps every block above a threshold afresh and unmaps it when freed; the threshold rises only
#: when a larger mapped block is freed. So whether a peer's output (25 MiB for the 1x1 layers) is faulted in
#: page by page on every call depended on what the process had freed before: PyTorch's 1x1 64 -> 256 layer took
#: 3.1 or 16.9 ms by the order of the rows. The bench keeps such blocks on malloc's heap for every peer alike,
#: the steady state of a long-running process.
MMAP_THRESHOLD_BYTES = 256 * 2**20


def _steady_allocator():
    """Raise glibc's mmap and trim thresholds for this process (the bench's own), where glibc is the libc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)
    )


def _layer_ints(text, form):
    """The 7 to 10 comma-separated ints of a ``--layer`` argument, or an argparse error showing ``form``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not 7 <= len(values) <= 10:
        raise argparse.ArgumentTypeError(f"a layer is {form}, got {text!r}")
    return values


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
        return cls(*_layer_ints(text, "N,C,H,W,K,R,S[,stride[,padding[,groups]]]"))

    def __str__(self):
        extra = f" s{self.stride} p{self.padding}" + (f" g{self.groups}" if self.groups > 1 else "")
        return f"{self.N}x{self.C}x{self.H}x{self.W} -> {self.K} {self.R}x{self.S}{extra}"

    @property
    def params(self):
        return dict(stride=self.stride, padding=self.padding, groups=self.groups)

    @property
    def output_hw(self):
        return tuple((n + 2 * self.padding - k) // self.stride + 1 for n, k in ((self.H, self.R), (self.W, self.S)))

    @property
    def flops(self):
        P, Q = self.output_hw
        return 2 * self.N * self.K * P * Q * (self.C // self.groups) * self.R * self.S


@dataclass(frozen=True)
class TransposeLayer:
    """A conv_transpose2d layer: input (N, C, H, W) to K channels, R x S kernel, stride, padding, output_padding."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0

    @classmethod
    def parse(cls, text):
        """From ``"N,C,H,W,K,R,S[,stride[,padding[,output_padding]]]"``."""
        return cls(*_layer_ints(text, "N,C,H,W,K,R,S[,stride[,padding[,output_padding]]]"))

    def __str__(self):
        return f"{self.N}x{self.C}x{self.H}x{self.W} -> {self.K} {self.R}x{self.S} s{self.stride} p{self.padding}"

    @property
    def params(self):
        return dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding)

    @property
    def flops(self):
        return 2 * self.N * self.C * self.H * self.W * self.K * self.R * self.S


@dataclass(frozen=True)
class GemmShape:
    """``m x k`` times ``k x n``."""

    m: int
    n: int
    k: int

    @classmethod
    def parse(cls, text):
        """From ``"MxNxK"``."""
        try:
            return cls(*(int(v) for v in text.lower().split("x")))
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"a GEMM shape is MxNxK, got {text!r}") from None

    def __str__(self):
        return f"{self.m}x{self.n}x{self.k}"

    @property
    def flops(self):
        return 2 * self.m * self.n * self.k


# The ResNet / VGG-style layers the performance targets are set on, then two small layers the reference can run.
CONV_LAYERS = [
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
# Decoder layers: DCGAN's generator and U-Net's up-convolution.
TRANSPOSE_LAYERS = [
    TransposeLayer(8, 512, 4, 4, 256, 4, 4, 2, 1),
    TransposeLayer(8, 256, 8, 8, 128, 4, 4, 2, 1),
    TransposeLayer(8, 128, 16, 16, 64, 4, 4, 2, 1),
    TransposeLayer(8, 128, 28, 28, 64, 2, 2, 2, 0),
    TransposeLayer(2, 8, 8, 8, 4, 3, 3, 2, 1, 1),
]
GEMM_SHAPES = [
    GemmShape(512, 512, 512),
    GemmShape(1024, 1024, 1024),
    GemmShape(2048, 2048, 2048),
    GemmShape(64, 25088, 576),
    GemmShape(128, 6272, 1152),
    GemmShape(512, 392, 4608),
    GemmShape(64, 25088, 256),
]


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


def _torch(threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def _forward_peers(layer, dtype, rng, torch):
    x = rng.standard_normal((layer.N, layer.C, layer.H, layer.W)).astype(dtype)
    w = rng.standard_normal((layer.K, layer.C // layer.groups, layer.R, layer.S)).astype(dtype)
    peers = {
        "fastconv": lambda: conv2d(x, w, **layer.params),
        "im2col+numpy": lambda: im2col_numpy_conv2d(x, w, **layer.params),
    }
    if torch is not None:
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        peers["torch"] = lambda: torch.nn.functional.conv2d(tx, tw, **layer.params)
    if layer.flops <= REFERENCE_MAX_FLOPS:
        peers["reference"] = lambda: reference.conv2d(x, w, **layer.params)
    return peers


def _backward_peers(layer, dtype, rng, torch):
    x = rng.standard_normal((layer.N, layer.C, layer.H, layer.W)).astype(dtype)
    w = rng.standard_normal((layer.K, layer.C // layer.groups, layer.R, layer.S)).astype(dtype)
    dy = rng.standard_normal((layer.N, layer.K, *layer.output_hw)).astype(dtype)
    peers = {"fastconv": lambda: conv2d_backward(x, w, dy, **layer.params)}
    if torch is not None:
        tx, tw, tdy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)
        s, p, g = layer.stride, layer.padding, layer.groups
        peers["torch"] = lambda: torch.ops.aten.convolution_backward(
            tdy, tx, tw, [layer.K], [s, s], [p, p], [1, 1], False, [0, 0], g, [True, True, True]
        )
    if 2 * layer.flops <= REFERENCE_MAX_FLOPS:
        peers["reference"] = lambda: reference.conv2d_backward(x, w, dy, **layer.params)
    return peers


def _transpose_peers(layer, dtype, rng, torch, backward):
    x = rng.standard_normal((layer.N, layer.C, layer.H, layer.W)).astype(dtype)
    w = rng.standard_normal((layer.C, layer.K, layer.R, layer.S)).astype(dtype)
    y = conv_transpose2d(x, w, **layer.params)
    dy = rng.standard_normal(y.shape).astype(dtype)
    if backward:
        peers = {"fastconv": lambda: conv_transpose2d_backward(x, w, dy, **layer.params)}
    else:
        peers = {"fastconv": lambda: conv_transpose2d(x, w, **layer.params)}
    if torch is not None:
        tx, tw, tdy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)
        s, p, op = layer.stride, layer.padding, layer.output_padding
        if backward:
            peers["torch"] = lambda: torch.ops.aten.convolution_backward(
                tdy, tx, tw, [layer.K], [s, s], [p, p], [1, 1], True, [op, op], 1, [True, True, True]
            )
        else:
            peers["torch"] = lambda: torch.nn.functional.conv_transpose2d(tx, tw, **layer.params)
    if (2 if backward else 1) * layer.flops <= REFERENCE_MAX_FLOPS:
        function = reference.conv_transpose2d_backward if backward else reference.conv_transpose2d
        peers["reference"] = (
            (lambda: function(x, w, dy, **layer.params)) if backward else (lambda: function(x, w, **layer.params))
        )
    return peers


def _gemm_peers(shape, dtype, rng, torch):
    a = rng.standard_normal((shape.m, shape.k)).astype(dtype)
    b = rng.standard_normal((shape.k, shape.n)).astype(dtype)
    return {"fastconv": lambda: gemm(a, b), "numpy": lambda: np.matmul(a, b)}


#: --op name: (default cases, case parser, peers factory, work per case relative to its flops)
OPS = {
    "forward": (CONV_LAYERS, Layer.parse, _forward_peers, 1),
    "backward": (CONV_LAYERS[:8], Layer.parse, _backward_peers, 2),
    "transpose": (TRANSPOSE_LAYERS, TransposeLayer.parse, lambda *a: _transpose_peers(*a, backward=False), 1),
    "transpose-backward": (
        TRANSPOSE_LAYERS,
        TransposeLayer.parse,
        lambda *a: _transpose_peers(*a, backward=True),
        2,
    ),
    "gemm": (GEMM_SHAPES, GemmShape.parse, _gemm_peers, 1),
}


def _settle():
    # Worker threads spin after a parallel region before they sleep (OpenBLAS's for about 2**28 cycles, some
    # 70 ms here); let them go idle so the next side does not share the cores with them.
    time.sleep(0.2)


#: Seconds of back-to-back untimed calls before each side is timed (at least one call).
WARM_UP_SECONDS = 0.05


def _warm_up(function):
    # Time the steady state of a training loop, where calls follow each other. After the settle a peer's worker
    # threads are asleep, and this machine's scheduler packs a thread that has been mostly asleep onto the
    # vCPU of the thread that wakes it (kernel option sched_vcpu_pack): measured here, a 512^3 gemm right after
    # 0.2 s idle took 1.2 ms (both threads on one vCPU) in about a third of the rounds, 0.62 ms otherwise; after
    # 50 ms of calls, 0.62 ms in every round.
    start = time.perf_counter()
    function()
    while time.perf_counter() - start < WARM_UP_SECONDS:
        function()


def _time_ms(function):
    start = time.perf_counter()
    function()
    return 1e3 * (time.perf_counter() - start)


def run(op, cases, dtype, threads, repeat, progress=sys.stderr):
    """Time every peer on every case of ``op``; return one row of results per case."""
    _, _, make_peers, work = OPS[op]
    _parallel.set_num_threads(threads)
    torch = _torch(threads)
    rng = np.random.default_rng(0)
    rows = []
    for i, case in enumerate(cases, 1):
        if progress:
            bar = "#" * (20 * i // len(cases))
            print(f"\r[{bar:<20}] {i}/{len(cases)} {case}".ljust(80), end="", file=progress, flush=True)
        peers = make_peers(case, dtype, rng, torch)
        for function in peers.values():
            function()  # compile, and let oneDNN build its kernel for this shape
        samples = {name: [] for name in peers}
        for _ in range(repeat):
            for name, function in peers.items():
                _settle()
                calls = 1 if name == "reference" else 3
                if calls > 1:
                    _warm_up(function)
                samples[name].append(statistics.median(_time_ms(function) for _ in range(calls)))
        row = {"case": str(case), **asdict(case), "gflop": work * case.flops / 1e9}
        row.update({f"{name}_ms": statistics.median(values) for name, values in samples.items()})
        rows.append(row)
    if progress:
        print(file=progress)
    return rows


def format_table(rows):
    """A plain-text table: fastconv's ms and GFLOP/s, each peer's ms and fastconv's speed-up over it."""
    peers = [p for p in ("torch", "numpy", "im2col+numpy", "reference") if any(f"{p}_ms" in r for r in rows)]
    header = f"{'case':<34} {'GFLOP':>7} {'fastconv ms':>11} {'GFLOP/s':>8}"
    for p in peers:
        header += f" {p + ' ms':>15} {'GFLOP/s':>8} {'speed-up':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ms = r["fastconv_ms"]
        line = f"{r['case']:<34} {r['gflop']:>7.3f} {ms:>11.2f} {r['gflop'] / ms * 1e3:>8.1f}"
        for p in peers:
            if f"{p}_ms" in r:
                theirs = r[f"{p}_ms"]
                line += f" {theirs:>15.2f} {r['gflop'] / theirs * 1e3:>8.1f} {theirs / ms:>7.2f}x"
            else:
                line += f" {'skipped':>15} {'':>8} {'':>8}"
        lines.append(line)
    for p in peers:
        ratios = [r[f"{p}_ms"] / r["fastconv_ms"] for r in rows if f"{p}_ms" in r]
        lines.append(
            f"speed-up over {p}: geometric mean {statistics.geometric_mean(ratios):.2f}x, lowest {min(ratios):.2f}x"
            f" ({len(ratios)} cases)"
        )
    if any("reference_ms" not in r for r in rows) and "reference" in peers:
        lines.append(
            f"reference skipped above {REFERENCE_MAX_FLOPS / 1e9:.1f} GFLOP of work (direct loops take minutes)"
        )
    return "\n".join(lines)


def plot(rows, path):
    """A bar chart of fastconv's speed-up over each peer, per case (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    peers = [p for p in ("torch", "numpy", "im2col+numpy") if any(f"{p}_ms" in r for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    height = 0.8 / max(1, len(peers))
    for i, p in enumerate(peers):
        values = [r.get(f"{p}_ms", np.nan) / r["fastconv_ms"] for r in rows]
        ax.barh([j + i * height for j in range(len(rows))], values, height, label=f"vs {p}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], [r["case"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("fastconv speed-up (x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    import numba

    parser = argparse.ArgumentParser(prog="python -m fastconv bench", description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=list(OPS), default="forward", help="what to time (default: conv2d forward)")
    parser.add_argument(
        "--layer",
        dest="cases",
        action="append",
        metavar="SHAPE",
        help="a case to time (repeatable): N,C,H,W,K,R,S[,stride[,padding[,groups or output_padding]]], or MxNxK "
        "for --op gemm; default: the built-in set",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS, help="threads for every peer")
    parser.add_argument("--repeat", type=int, default=5, help="alternating rounds; the median is reported")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the speed-ups (needs matplotlib)")
    args = parser.parse_args(argv)
    defaults, parse, _, _ = OPS[args.op]
    try:
        cases = [parse(text) for text in args.cases] if args.cases else defaults
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    steady = _steady_allocator()
    rows = run(args.op, cases, np.dtype(args.dtype), args.threads, args.repeat)
    print(
        f"{args.op}, {args.dtype}, {args.threads} threads, median of {args.repeat} alternating rounds"
        f" (each: {WARM_UP_SECONDS * 1e3:.0f} ms of warm-up calls, then the median of 3)"
        + (f"; malloc keeps freed blocks below {MMAP_THRESHOLD_BYTES >> 20} MiB" if steady else "")
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
