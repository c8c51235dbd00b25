"""Winograd F(2x2, 3x3) against the reference, on shapes that exercise each of its blocking edges."""

import numpy as np
import pytest

import fastconv
from conftest import assert_close, random_array, requires_torch
from fastconv import _winograd, _winograd_grad, reference
from fastconv import conv as conv_module
from fastconv._validate import parse_conv2d
from fastconv._winograd import _winograd_k_block, _winograd_span, _winograd_task_table
from fastconv.config import KC, MR, NR, WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_TILES, WINOGRAD_WEIGHT_GRAD_MIN_TILES
from fastconv.conv import _choose_algorithm, _input_grad_as_conv2d

CASES = [  # (N, C, H, W, K, padding, groups)
    (1, 1, 3, 3, 1, 0, 1),  # one tile, no padding
    (2, 3, 7, 6, 5, 1, 1),  # odd output height: the last tile row overhangs
    (2, 3, 7, 6, 5, ((0, 2), (2, 0)), 1),  # asymmetric padding
    (1, 4, 1, 1, 2, 1, 1),  # one pixel: every tile reads padding
    (1, 4, 3, 200, 6, 1, 1),  # a tile row longer than a chunk of NR tiles
    (3, 8, 9, 11, 6, 1, 2),  # groups
    (2, 5, 30, 31, 9, "same", 1),  # many chunks, the last one partial
    (1, KC + 88, 6, 5, 7, 1, 1),  # more channels than KC: two blocks of the shared dimension
    (1, 6, 10, 10, 302, 1, 1),  # more output channels than one task's block, not a multiple of MR
    (1, 1, 100, 90, 2, 1, 1),  # the weight gradient's ranges span two chunks of tiles
    (2, 3, 16, 14, 10, 1, 1),  # two chunks, the last partial: on two threads one task takes both
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("N, C, H, W, K, padding, groups", CASES)
def test_winograd_matches_the_reference(rng, N, C, H, W, K, padding, groups, dtype, bias):
    x = random_array(rng, (N, C, H, W), dtype)
    w = random_array(rng, (K, C // groups, 3, 3), dtype)
    b = random_array(rng, (K,), dtype) if bias else None
    expected = reference.conv2d(x, w, b, padding=padding, groups=groups)
    assert_close(fastconv.conv2d(x, w, b, padding=padding, groups=groups, algorithm="winograd"), expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("N, C, H, W, K, padding, groups", CASES)
def test_weight_gradient_by_winograd_matches_the_reference(rng, monkeypatch, N, C, H, W, K, padding, groups, dtype):
    """Winograd's weight gradient, taken here whatever the layer's size: chunks of tiles, ranges, padding."""
    monkeypatch.setattr(_winograd_grad, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(_winograd_grad, "WINOGRAD_WEIGHT_GRAD_MIN_TILES", 1)
    monkeypatch.setattr(_winograd_grad, "MIN_RANGES", 1)
    monkeypatch.setattr(conv_module, "DIRECT_MAX_OUT_PER_GROUP", 0)  # groups too
    calls = []
    winograd = conv_module.conv2d_weight_winograd
    monkeypatch.setattr(conv_module, "conv2d_weight_winograd", lambda *args: calls.append(1) or winograd(*args))
    x = random_array(rng, (N, C, H, W), dtype)
    w_shape = (K, C // groups, 3, 3)
    dy = random_array(rng, fastconv.conv2d(x, np.ones(w_shape, dtype), padding=padding, groups=groups).shape, dtype)
    expected = reference.conv2d_weight(x, w_shape, dy, padding=padding, groups=groups)
    assert_close(fastconv.conv2d_weight(x, w_shape, dy, padding=padding, groups=groups), expected)
    assert calls


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_gradient_output_transform_in_vectors_gives_the_scalar_bits(rng, dtype):
    """A micro-panel's filters, a vector register of tiles at a time, against one filter at a time: runs from 1
    to 20 tiles (a last partial vector, two vectors), an odd last column, a last tile row without a second row,
    non-finite values."""
    from fastconv._winograd_grad import _grad_output_panel, _grad_output_tiles

    for P, Q in [(5, 9), (6, 40), (3, 3), (1, 17)]:
        dy = random_array(rng, (2, 2 * MR + 1, P, Q), dtype)
        dy[1, 3, 0, 0], dy[1, 4, -1, -1] = np.inf, np.nan
        TH, TW = -(-P // 2), -(-Q // 2)
        for n, k0, th in [(0, 0, 0), (1, MR, TH - 1), (1, 1, TH // 2)]:
            for tw0, run in [(0, TW), (TW - 1, 1), (TW // 3, TW - TW // 3)]:
                vector = np.full((16, MR * run + 3), -7.0, dtype)
                scalar = vector.copy()
                _grad_output_panel(dy, n, k0, th, tw0, run, vector, 1)
                for f in range(MR):
                    _grad_output_tiles(dy, n, k0 + f, th, tw0, run, scalar, 1 + f, MR)
                np.testing.assert_array_equal(vector, scalar)


def test_the_cases_cross_the_blocking_edges():
    tiles = []
    for N, C, H, W, K, padding, groups in CASES:
        _, geometry, _ = parse_conv2d("conv2d", (N, C, H, W), np.ones((K, C // groups, 3, 3)), 1, padding, 1, groups)
        _, _, P, Q = geometry.output_shape
        tiles.append(N * -(-P // 2) * -(-Q // 2))
    assert max(tiles) > NR and max(tiles) % NR  # several chunks, the last one partial
    assert any(C > KC for _, C, *_ in CASES)
    # Some case splits its output channels between tasks, into blocks that are not all whole multiples of MR.
    blocks = [_winograd_k_block(K // groups, -(-t // NR), 2) for t, (*_, K, _, groups) in zip(tiles, CASES)]
    assert any(b < K and K % b % MR for b, (*_, K, _, _) in zip(blocks, CASES))
    # Some case, on two threads, has tasks of both its chunks and half its output channels each.
    spans = [_winograd_span(K // groups, groups, -(-t // NR), 2) for t, (*_, K, _, groups) in zip(tiles, CASES)]
    assert any(span == 2 * NR and k_block < K for (span, k_block), (*_, K, _, _) in zip(spans, CASES))
    # The weight gradient: some case has several ranges of tiles, some range several chunks of unequal ends.
    ranges = [_winograd_grad._n_ranges(K, C // g, t, 8) for t, (_, C, *_, K, _, g) in zip(tiles, CASES)]
    assert max(ranges) > 1
    assert any(t // r > _winograd_grad.CHUNK for t, r in zip(tiles, ranges))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("groups, tiles, Kg", [(1, 392, 256), (1, 128, 512), (2, 200, 64), (1, 1568, 128), (1, 70, 4)])
def test_winograd_tasks_cover_every_output_once_in_equal_shares(threads, groups, tiles, Kg):
    """The task table covers each (group, tile, output channel) once; where the last chunks are split between
    the threads by output channels, each thread's run of rows (the parallel loop deals out equal runs) holds the
    same number of whole chunks and one piece of each split chunk."""
    span, tasks = _winograd_task_table(groups, tiles, Kg, threads)
    covered = np.zeros((groups, tiles, Kg), np.int64)
    for g, first, last, k0, k1 in tasks:
        assert 0 < last - first <= span
        covered[g, first:last, k0:k1] += 1
    assert (covered == 1).all()
    if len(tasks) % threads == 0 and len(set(int(k1 - k0) for *_, k0, k1 in tasks)) > 1:
        runs = tasks.reshape(threads, -1, 5)
        work = [sum(int((last - first) * (k1 - k0)) for _, first, last, k0, k1 in run) for run in runs]
        assert max(work) - min(work) <= NR * Kg  # at most the odd partial chunk apart
    if (groups, tiles, Kg, threads) == (1, 392, 256, 2):  # 7 chunks: the last split
        assert len(tasks) == 8 and sorted(int(k1 - k0) for *_, k0, k1 in tasks)[:2] == [128, 128]


@pytest.mark.parametrize(
    "groups, tiles, Kg, shared",
    [
        (1, 128, 512, True),  # 8x512x7x7: two chunks, each thread all the tiles for half the output channels
        (1, 64, 512, True),  # one chunk, split by output channels
        (1, 392, 256, False),  # 7 chunks: tasks of different tiles
        (2, 128, 512, False),  # groups: one block of channels each
    ],
)
def test_tasks_of_every_tile_share_the_transformed_input(groups, tiles, Kg, shared):
    """Where every task takes all the tiles (the threads split the output channels), the input is transformed
    once, a share of its channels by each thread, not once per task."""
    _, tasks = _winograd_task_table(groups, tiles, Kg, 2)
    assert _winograd.shared_inputs(groups, 256, tasks) == shared
    assert not _winograd.shared_inputs(groups, KC + 1, tasks)  # two blocks of channels: each task its own


def test_auto_takes_winograd_for_wide_3x3_layers_and_the_input_gradient_follows(rng):
    C = K = WINOGRAD_MIN_CHANNELS
    side = 2 * int(np.ceil(np.sqrt(WINOGRAD_MIN_TILES)))  # enough 2x2 tiles in one image
    x = random_array(rng, (1, C, side, side), "float32")
    w = random_array(rng, (K, C, 3, 3), "float32")
    _, geometry, _ = parse_conv2d("conv2d", x.shape, w, 1, 1, 1, 1)
    assert _choose_algorithm("auto", geometry) == "winograd"
    _, small, _ = parse_conv2d("conv2d", (1, C, 4, 4), w, 1, 1, 1, 1)
    assert _choose_algorithm("auto", small) == "gemm"
    y = fastconv.conv2d(x, w, padding=1)
    assert_close(y, reference.conv2d(x.astype(np.float64), w, padding=1).astype(np.float32))
    dy = random_array(rng, y.shape, "float32")
    expected = reference.conv2d_input(x.shape, w.astype(np.float64), dy, padding=1).astype(np.float32)
    assert_close(fastconv.conv2d_input(x.shape, w, dy, padding=1), expected)


def test_auto_asks_wider_layers_for_more_tiles():
    """The filter transform grows with channels in times channels out: 512 channels need twice the tiles of
    256, small images no more; the weight gradient asks wider layers for more tiles."""
    cases = [  # channels, images, side, algorithm
        (256, 4, 7, "winograd"),  # 7x7 images: 16 tiles each
        (512, 4, 7, "gemm"),
        (512, 8, 7, "winograd"),
        (512, 1, 14, "gemm"),  # 14x14: 49 tiles each
        (512, 2, 14, "winograd"),
    ]
    for channels, images, side, algorithm in cases:
        w = np.zeros((channels, channels, 3, 3), np.float32)
        _, geometry, _ = parse_conv2d("conv2d", (images, channels, side, side), w, 1, 1, 1, 1)
        assert _choose_algorithm("auto", geometry) == algorithm
    # The weight gradient alike: 256 channels on 14x14 images (49 tiles each) need more than 8 of them.
    for images, pays in [(8, False), (12, True)]:
        w = np.zeros((256, 256, 3, 3), np.float32)
        _, geometry, _ = parse_conv2d("conv2d", (images, 256, 14, 14), w, 1, 1, 1, 1)
        assert _winograd_grad.winograd_weight_grad_pays(geometry) == pays


def test_auto_takes_winograd_for_the_weight_gradient_of_layers_with_many_tiles(rng):
    C = K = WINOGRAD_MIN_CHANNELS
    side = 2 * int(np.ceil(np.sqrt(WINOGRAD_WEIGHT_GRAD_MIN_TILES)))
    x = random_array(rng, (1, C, side, side), "float32")
    w = random_array(rng, (K, C, 3, 3), "float32")
    _, geometry, _ = parse_conv2d("conv2d", x.shape, w, 1, 1, 1, 1)
    assert _winograd_grad.winograd_weight_grad_pays(geometry)
    _, few_tiles, _ = parse_conv2d("conv2d", (1, C, side // 2, side), w, 1, 1, 1, 1)
    assert not _winograd_grad.winograd_weight_grad_pays(few_tiles)
    _, few_channels, _ = parse_conv2d("conv2d", (1, C // 2, side, side), w[:, : C // 2], 1, 1, 1, 1)
    assert not _winograd_grad.winograd_weight_grad_pays(few_channels)
    dy = random_array(rng, x.shape[:1] + (K,) + x.shape[2:], "float32")
    expected = reference.conv2d_weight(x.astype(np.float64), w.shape, dy, padding=1).astype(np.float32)
    assert_close(fastconv.conv2d_weight(x, w.shape, dy, padding=1), expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_input_gradient_by_winograd_reads_the_filters_swapped_and_rotated(rng, dtype):
    """The input gradient's Winograd reads the forward filters rotated, channels in and out swapped, per group."""
    N, C, K, groups, H, W = 1, 2 * WINOGRAD_MIN_CHANNELS, 3 * WINOGRAD_MIN_CHANNELS, 2, 18, 16  # 72 tiles
    padding = ((1, 0), (0, 1))
    x_shape, w = (N, C, H, W), random_array(rng, (K, C // groups, 3, 3), dtype)
    _, geometry, _ = parse_conv2d("conv2d", x_shape, w, 1, padding, 1, groups)
    dy = random_array(rng, geometry.output_shape, dtype)
    _, as_conv2d = _input_grad_as_conv2d(dy, geometry, np.dtype(dtype))
    assert _choose_algorithm("auto", as_conv2d) == "winograd"
    expected = reference.conv2d_input(x_shape, w, dy, padding=padding, groups=groups)
    assert_close(fastconv.conv2d_input(x_shape, w, dy, padding=padding, groups=groups), expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("swapped", [False, True])
@pytest.mark.parametrize("C, K, groups", [(32, 20, 1), (36, 12, 2), (3, 5, 1)])
def test_filters_stored_past_the_caches_give_the_same_bits(rng, monkeypatch, dtype, swapped, C, K, groups):
    """Transformed filters stored past the caches (large layers; here any) give the bits of ordinary stores:
    rows a multiple of 16 channels long (every whole vector aligned) and not (channels 36 and 3: some or all
    stored the ordinary way), in the forward pass and with the filters read swapped (the input gradient)."""
    x = random_array(rng, (2, C, 9, 8), dtype)
    w = random_array(rng, (C, K // groups, 3, 3) if swapped else (K, C // groups, 3, 3), dtype)
    _, geometry, _ = parse_conv2d("conv2d", x.shape, np.empty((K, C // groups, 3, 3), dtype), 1, 1, 1, groups)
    dtype = np.dtype(dtype)
    results = []
    for threshold in (2**62, 0):
        monkeypatch.setattr(_winograd, "WINOGRAD_STREAM_FILTERS_BYTES", threshold)
        y = np.empty(geometry.output_shape, dtype)
        _winograd._conv2d_winograd(x, w, geometry.kernel_geometry, groups, False, y, swapped)
        results.append(y)
    np.testing.assert_array_equal(results[0], results[1])
    flipped = w if not swapped else conv_module._flip_for_input_grad(w, groups)
    assert_close(results[1], reference.conv2d(x, flipped, padding=1, groups=groups))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("N, C, H, W, K, padding, groups", CASES)
def test_padded_copy_gives_the_bits_of_reading_around_the_padding(
    rng, monkeypatch, N, C, H, W, K, padding, groups, dtype
):
    """Small images are read from a zero-padded copy, every tile whole; large ones in place, the tiles on the
    border a pixel at a time. Both ways give the same bits, on every case (the copy's rows and columns past
    what the tiles read are cropped, asymmetric padding included)."""
    x = random_array(rng, (N, C, H, W), dtype)
    w = random_array(rng, (K, C // groups, 3, 3), dtype)
    results = []
    for largest in (2**62, -1):  # every image copied, none
        monkeypatch.setattr(_winograd, "WINOGRAD_PAD_MAX_SIZE", largest)
        results.append(fastconv.conv2d(x, w, padding=padding, groups=groups, algorithm="winograd"))
    np.testing.assert_array_equal(results[0], results[1])


@requires_torch
def test_winograd_error_in_float32_stays_near_the_direct_sum():
    """The documented accuracy: within a few times the direct float32 sum's error, on 512 channels."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 512, 12, 12))
    w = rng.standard_normal((8, 512, 3, 3))
    exact = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    scale = np.abs(exact).max()
    winograd = np.abs(fastconv.conv2d(x32, w32, padding=1, algorithm="winograd") - exact).max() / scale
    gemm = np.abs(fastconv.conv2d(x32, w32, padding=1, algorithm="gemm") - exact).max() / scale
    assert winograd < 1e-6
    assert winograd < 5 * gemm


def test_winograd_weight_gradient_error_in_float32_stays_near_the_gemm_path():
    """The weight gradient sums over every pixel: Winograd's within a few times the GEMM path's error."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 32, 32))
    dy = rng.standard_normal((2, 96, 32, 32))
    w_shape = (96, 64, 3, 3)
    exact = fastconv.conv2d_weight(x, w_shape, dy, padding=1)  # float64
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    _, geometry, _ = parse_conv2d("conv2d", x.shape, np.ones(w_shape), 1, 1, 1, 1)
    assert _winograd_grad.winograd_weight_grad_pays(geometry)
    scale = np.abs(exact).max()
    winograd = np.abs(fastconv.conv2d_weight(x32, w_shape, dy32, padding=1) - exact).max() / scale
    gemm = np.zeros(w_shape, np.float32)
    fastconv._conv_kernels._conv2d_weight(x32, dy32, (1, 1, 1, 1, 1, 1), 1, gemm)
    gemm = np.abs(gemm - exact).max() / scale
    assert winograd < 2e-6
    assert winograd < 5 * gemm
