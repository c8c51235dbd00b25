"""4x4 stride-2 layers by Winograd F(2x2, 2x2) on their stride phases: conv2d's forward pass, and its input
gradient (conv_transpose2d's forward pass)."""

import numpy as np
import pytest

import fastconv
from conftest import assert_close, random_array
from fastconv import _conv_kernels, _winograd_strided, reference
from fastconv import conv as conv_module
from fastconv._validate import parse_conv2d
from fastconv.config import KC, MR, NR

CASES = [  # (N, C_in, H, W, C_out, padding, output_padding, groups) of conv_transpose2d, 4x4 filters, stride 2
    (1, 1, 1, 1, 1, 0, 0, 1),  # one pixel: a single tile per phase, all of it padding but one value
    (2, 3, 5, 6, 5, 1, 0, 1),  # DCGAN's padding; C_out not a multiple of MR
    (2, 3, 5, 6, 5, 1, 1, 1),  # output_padding: odd output, the phases differ in size
    (2, 4, 4, 7, 6, 0, 1, 1),  # no padding: every phase reads one row above the input
    (2, 4, 6, 5, 6, 2, 0, 1),  # padding 2: the phases' tiles start inside the input
    (1, 4, 6, 6, 4, 3, 1, 1),  # padding 3: the output is cropped on every side
    (3, 8, 5, 4, 12, 1, 0, 2),  # groups
    (1, 2, 3, 150, 3, 1, 0, 1),  # a row of 75 tiles per phase: runs longer than a vector, over two chunks
    (4, 3, 9, 9, 2, 1, 1, 1),  # many chunks, the last one partial
    (1, KC + 8, 2, 3, 5, 1, 0, 1),  # more input channels than KC: two blocks of the shared dimension
]


def rms_error(actual, exact):
    """Root-mean-square error relative to the largest exact value: steadier from seed to seed than the largest."""
    return np.sqrt(np.mean((actual - exact) ** 2)) / np.abs(exact).max()


@pytest.fixture
def everywhere(monkeypatch):
    """Take the sub-pixel path for every 4x4 stride-2 layer, however few its channels and tiles."""
    monkeypatch.setattr(_winograd_strided, "SUBPIXEL_MIN_OUT_CHANNELS", 1)
    monkeypatch.setattr(_winograd_strided, "SUBPIXEL_MIN_TILES", 1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("N, C, H, W, K, padding, output_padding, groups", CASES)
def test_conv_transpose2d_by_phases_matches_the_reference(
    rng, everywhere, N, C, H, W, K, padding, output_padding, groups, dtype, bias
):
    x = random_array(rng, (N, C, H, W), dtype)
    w = random_array(rng, (C, K // groups, 4, 4), dtype)
    b = random_array(rng, (K,), dtype) if bias else None
    params = dict(stride=2, padding=padding, output_padding=output_padding, groups=groups)
    assert_close(fastconv.conv_transpose2d(x, w, b, **params), reference.conv_transpose2d(x, w, b, **params))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv2d_input_of_a_4x4_stride_2_layer_by_phases_matches_the_reference(rng, everywhere, dtype):
    """conv2d's input gradient, asymmetric padding included: the phases' filters and offsets follow the top and
    left padding alone."""
    w = random_array(rng, (6, 4, 4, 4), dtype)
    for size, padding in [((2, 4, 11, 10), 1), ((2, 4, 12, 9), ((0, 3), (2, 1))), ((1, 4, 8, 8), ((3, 0), (1, 2)))]:
        _, geometry, _ = parse_conv2d("conv2d", size, w, 2, padding, 1, 1)
        dy = random_array(rng, geometry.output_shape, dtype)
        expected = reference.conv2d_input(size, w, dy, stride=2, padding=padding)
        assert_close(fastconv.conv2d_input(size, w, dy, stride=2, padding=padding), expected)


def test_the_cases_cross_the_blocking_edges():
    def tiles(N, H, W, padding, output_padding):  # per phase, the largest
        return N * -(-(H + 1 - padding + output_padding // 2) // 2) * -(-(W + 1 - padding + output_padding // 2) // 2)

    counts = [tiles(N, H, W, p, op) for N, _, H, W, _, p, op, _ in CASES]
    assert max(counts) > NR and any(t % NR for t in counts if t > NR)
    assert any(C > KC for _, C, *_ in CASES)
    assert any(K % MR for *_, K, _, _, _ in CASES)


def test_channels_shared_out_between_tasks_when_the_chunks_are_too_few(rng, everywhere, monkeypatch):
    """With more threads than the phases' chunks (16 threads, 4 chunks), each chunk's channels of dx are split
    into blocks of 12 (40 = 12 + 12 + 12 + 4)."""
    assert _winograd_strided._channel_block(40, 4, 16) == 12 and _winograd_strided._channel_block(40, 4, 2) == 40
    monkeypatch.setattr(_winograd_strided, "_channel_block", lambda Cg, chunks, threads: 12)
    x = random_array(rng, (1, 6, 5, 5), "float64")
    w = random_array(rng, (6, 40, 4, 4), "float64")
    expected = reference.conv_transpose2d(x, w, stride=2, padding=1)
    assert_close(fastconv.conv_transpose2d(x, w, stride=2, padding=1), expected)


def test_blocks_of_images_padded_one_at_a_time_give_the_same_result(rng, everywhere, monkeypatch):
    x = random_array(rng, (5, 6, 7, 8), "float64")
    w = random_array(rng, (6, 8, 4, 4), "float64")
    whole = fastconv.conv_transpose2d(x, w, stride=2, padding=1)
    monkeypatch.setattr(_conv_kernels, "COLUMN_BUFFER_BYTES", 2 * 6 * 10 * 11 * 8)  # two images per block
    np.testing.assert_array_equal(fastconv.conv_transpose2d(x, w, stride=2, padding=1), whole)
    assert_close(whole, reference.conv_transpose2d(x, w, stride=2, padding=1))


def test_auto_takes_the_phases_for_decoder_layers_with_enough_channels_and_tiles():
    def pays(N, C_in, H, C_out):
        w = np.empty((C_in, C_out, 4, 4), np.float32)  # conv2d's filters of the input gradient: C_in first
        _, geometry, _ = parse_conv2d("conv2d", (N, C_out, 2 * H, 2 * H), w, 2, 1, 1, 1)
        return _winograd_strided.strided_winograd_applies(geometry) and _winograd_strided.input_grad_pays(geometry)

    assert pays(8, 256, 8, 128) and pays(8, 128, 16, 64) and pays(8, 64, 32, 32)
    assert not pays(8, 512, 4, 256)  # 32 tiles per phase: the products' NR columns half empty
    assert not pays(8, 64, 32, 3)  # an RGB output: too few rows for the micro-kernel


def test_float32_error_stays_near_the_direct_sum(rng):
    """The transforms only add and subtract: on a 256-channel decoder layer the error stays within three times
    the GEMM path's, against float64 (measured: 1.0e-6 and 4.3e-7 of the largest output)."""
    x = rng.standard_normal((4, 256, 8, 8)).astype(np.float32)
    w = rng.standard_normal((256, 32, 4, 4)).astype(np.float32)
    exact = reference.conv_transpose2d(x.astype(np.float64), w.astype(np.float64), stride=2, padding=1)
    by_phases = fastconv.conv_transpose2d(x, w, stride=2, padding=1)
    _, geometry, _ = parse_conv2d("conv2d", (4, 32, 16, 16), w, 2, 1, 1, 1)
    assert _winograd_strided.input_grad_pays(geometry)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_winograd_strided, "SUBPIXEL_MIN_TILES", 10**9)
        by_gemm = fastconv.conv_transpose2d(x, w, stride=2, padding=1)
    scale = np.abs(exact).max()
    assert np.abs(by_phases - exact).max() < 2e-6 * scale
    error, gemm_error = (rms_error(y, exact) for y in (by_phases, by_gemm))
    assert error <= 3 * gemm_error, (error, gemm_error)


FORWARD_CASES = [  # (N, C, H, W, K, padding, groups) of conv2d, 4x4 filters, stride 2
    (1, 1, 4, 4, 1, 0, 1),  # one output pixel: one tile, its last row and column overhanging
    (2, 3, 9, 10, 5, 1, 1),  # odd output height; K not a multiple of MR
    (2, 4, 11, 8, 6, ((0, 3), (2, 1)), 1),  # asymmetric padding
    (2, 4, 7, 7, 6, "same", 1),
    (3, 8, 12, 12, 12, 2, 2),  # groups
    (1, 2, 8, 300, 3, 1, 1),  # a row of 75 tiles: runs longer than a vector, over two chunks
    (1, KC // 4 + 2, 6, 6, 5, 1, 1),  # 4C phase planes past KC: two blocks of the shared dimension
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("N, C, H, W, K, padding, groups", FORWARD_CASES)
def test_forward_by_phases_matches_the_reference(rng, N, C, H, W, K, padding, groups, dtype, bias):
    x = random_array(rng, (N, C, H, W), dtype)
    w = random_array(rng, (K, C // groups, 4, 4), dtype)
    b = random_array(rng, (K,), dtype) if bias else None
    params = dict(stride=2, padding=padding, groups=groups)
    expected = reference.conv2d(x, w, b, **params)
    assert_close(fastconv.conv2d(x, w, b, **params, algorithm="winograd"), expected)


def test_forward_blocks_of_images_give_the_same_result(rng, monkeypatch):
    x = random_array(rng, (5, 3, 10, 9), "float64")
    w = random_array(rng, (7, 3, 4, 4), "float64")
    whole = fastconv.conv2d(x, w, stride=2, padding=1, algorithm="winograd")
    monkeypatch.setattr(_conv_kernels, "COLUMN_BUFFER_BYTES", 2 * 4 * 3 * 7 * 7 * 8)  # two images per block
    np.testing.assert_array_equal(fastconv.conv2d(x, w, stride=2, padding=1, algorithm="winograd"), whole)
    assert_close(whole, reference.conv2d(x, w, stride=2, padding=1))


def test_auto_takes_the_phases_for_the_forward_pass_with_enough_channels_and_tiles():
    def chosen(N, C, H, K):
        _, geometry, _ = parse_conv2d("conv2d", (N, C, H, H), np.empty((K, C, 4, 4)), 2, 1, 1, 1)
        return conv_module._choose_algorithm("auto", geometry)

    assert chosen(8, 64, 32, 128) == chosen(1, 64, 64, 128) == "winograd"
    assert chosen(8, 3, 64, 64) == "gemm"  # an RGB input: too few channels for the transforms to pay
    assert chosen(4, 64, 16, 64) == "gemm"  # 64 tiles: one chunk, its channels split between the threads
    assert chosen(1, 64, 512, 64) == "gemm"  # one image's stride phases (67 MB) past the column buffer


@pytest.fixture
def weight_grad_everywhere(monkeypatch):
    """Take the stride-phase Winograd weight gradient for every 4x4 stride-2 layer."""
    monkeypatch.setattr(conv_module, "weight_grad_pays", lambda geometry: True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("N, C, H, W, K, padding, groups", FORWARD_CASES + [(2, 9, 9, 12, 70, 1, 1)])
def test_weight_gradient_by_phases_matches_the_reference(
    rng, weight_grad_everywhere, N, C, H, W, K, padding, groups, dtype
):
    """Including 36 phase planes (a block of 32 and a partial one) and 70 filters (two micro-panels of B, the
    second padded with zeros)."""
    x = random_array(rng, (N, C, H, W), dtype)
    w = random_array(rng, (K, C // groups, 4, 4), dtype)
    params = dict(stride=2, padding=padding, groups=groups)
    dy = random_array(rng, reference.conv2d(x, w, **params).shape, dtype)
    expected = reference.conv2d_weight(x, w.shape, dy, **params)
    assert_close(fastconv.conv2d_weight(x, w.shape, dy, **params), expected)


def test_weight_gradient_over_chunks_of_tiles_and_blocks_of_images(rng, weight_grad_everywhere, monkeypatch):
    x = random_array(rng, (5, 3, 10, 9), "float64")
    w = random_array(rng, (7, 3, 4, 4), "float64")
    dy = random_array(rng, (5, 7, 5, 4), "float64")
    whole = fastconv.conv2d_weight(x, w.shape, dy, stride=2, padding=1)
    assert_close(whole, reference.conv2d_weight(x, w.shape, dy, stride=2, padding=1))
    monkeypatch.setattr(_winograd_strided, "TILE_CHUNK", 5)  # 6 tiles per image: chunks across images
    chunked = fastconv.conv2d_weight(x, w.shape, dy, stride=2, padding=1)
    monkeypatch.setattr(_conv_kernels, "COLUMN_BUFFER_BYTES", 2 * 4 * 3 * 7 * 5 * 8)  # two images per block
    blocked = fastconv.conv2d_weight(x, w.shape, dy, stride=2, padding=1)
    for result in (chunked, blocked):
        assert_close(result, whole)


def test_auto_takes_the_phases_for_weight_gradients_with_more_filters_than_the_padded_input_path():
    def pays(N, C, H, K):
        _, geometry, _ = parse_conv2d("conv2d", (N, C, H, H), np.empty((K, C, 4, 4)), 2, 1, 1, 1)
        return _winograd_strided.weight_grad_pays(geometry)

    assert pays(8, 64, 32, 128) and pays(8, 64, 32, 48) and pays(2, 64, 32, 128)
    assert not pays(8, 64, 32, 32)  # 32 filters: the padded-input weight gradient's tile
    assert not pays(8, 8, 32, 64)  # 8 input channels: 32 phase planes, too few for the transforms to pay
    assert not pays(8, 256, 8, 512)  # 32 tiles: GEMMs too shallow
    assert not pays(1, 64, 512, 128)  # one image's stride phases (67 MB) past the column buffer


def test_weight_gradient_error_in_float32_stays_near_the_gemm_path(rng, monkeypatch):
    x = rng.standard_normal((4, 64, 32, 32)).astype(np.float32)
    w = rng.standard_normal((64, 64, 4, 4)).astype(np.float32)
    dy = rng.standard_normal((4, 64, 16, 16)).astype(np.float32)
    exact = reference.conv2d_weight(x.astype(np.float64), w.shape, dy.astype(np.float64), stride=2, padding=1)
    by_phases = fastconv.conv2d_weight(x, w.shape, dy, stride=2, padding=1)
    monkeypatch.setattr(conv_module, "weight_grad_pays", lambda geometry: False)
    monkeypatch.setattr(conv_module, "shifted_weight_grad_pays", lambda geometry, dtype: False)
    by_gemm = fastconv.conv2d_weight(x, w.shape, dy, stride=2, padding=1)
    scale = np.abs(exact).max()
    assert np.abs(by_phases - exact).max() < 2e-6 * scale
    error, gemm_error = (rms_error(dw, exact) for dw in (by_phases, by_gemm))
    assert error < 2 * gemm_error, (error, gemm_error)  # measured over 12 seeds: 1.48-1.51
