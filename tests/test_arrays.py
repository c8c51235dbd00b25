"""What the functions accept and promise about arrays: layouts, dtypes, empty sizes, NaN, chunking, threads."""

import warnings

import numpy as np
import pytest

import fastconv
from conftest import assert_close, random_array
from fastconv import _conv_kernels, _macro, reference
from fastconv import conv as conv_module

PARAMS = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)


def _layouts(array):
    """The same values in C order, Fortran order, a strided view, reversed strides and read-only."""
    fortran = np.asfortranarray(array)
    strided = np.repeat(array, 2, axis=-1)[..., ::2]
    reversed_ = np.ascontiguousarray(array[..., ::-1])[..., ::-1]
    readonly = array.copy()
    readonly.flags.writeable = False
    return {"C": array, "F": fortran, "strided": strided, "negative": reversed_, "readonly": readonly}


@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative", "readonly"])
def test_any_layout_gives_the_same_result_and_inputs_stay_unchanged(rng, layout):
    x = random_array(rng, (2, 4, 9, 8), "float32")
    w = random_array(rng, (6, 2, 3, 3), "float32")
    dy = random_array(rng, fastconv.conv2d(x, w, **PARAMS).shape, "float32")
    expected = [fastconv.conv2d(x, w, **PARAMS), *fastconv.conv2d_backward(x, w, dy, **PARAMS)]
    xs, ws, dys = _layouts(x)[layout], _layouts(w)[layout], _layouts(dy)[layout]
    copies = [a.copy() for a in (xs, ws, dys)]
    actual = [fastconv.conv2d(xs, ws, **PARAMS), *fastconv.conv2d_backward(xs, ws, dys, **PARAMS)]
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)
    fastconv.conv_transpose2d(dys, ws, None, **PARAMS)
    fastconv.conv_transpose2d_backward(dys, ws, xs, **PARAMS)
    for a, copy in zip((xs, ws, dys), copies):
        np.testing.assert_array_equal(a, copy)


@pytest.mark.parametrize(
    "x_dtype, w_dtype, expected",
    [
        ("uint8", "float32", "float32"),
        ("int64", "float32", "float64"),
        ("float16", "float16", "float32"),
        ("float32", "float64", "float64"),
        ("int32", "int32", "float64"),
    ],
)
def test_result_dtype_follows_numpy_promotion_with_float32(rng, x_dtype, w_dtype, expected):
    x = rng.integers(0, 5, size=(1, 2, 5, 5)).astype(x_dtype)
    w = rng.integers(-2, 3, size=(3, 2, 3, 3)).astype(w_dtype)
    y = fastconv.conv2d(x, w)
    assert y.dtype == np.dtype(expected)
    assert_close(y, reference.conv2d(x.astype(np.float64), w.astype(np.float64)).astype(expected))


def test_bias_dtype_takes_part_in_promotion():
    y = fastconv.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 1, 1), np.float32), np.ones(1))
    assert y.dtype == np.float64


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_empty_sizes_give_empty_or_zero_results(dtype):
    w = np.ones((4, 3, 3, 3), dtype)
    assert fastconv.conv2d(np.ones((0, 3, 8, 8), dtype), w, padding=1).shape == (0, 4, 8, 8)
    dx, dw, db = fastconv.conv2d_backward(np.ones((0, 3, 8, 8), dtype), w, np.ones((0, 4, 8, 8), dtype), padding=1)
    assert dx.shape == (0, 3, 8, 8)
    np.testing.assert_array_equal(dw, np.zeros_like(w))
    np.testing.assert_array_equal(db, np.zeros(4, dtype))
    assert fastconv.conv_transpose2d(np.ones((0, 4, 3, 3), dtype), w).shape == (0, 3, 5, 5)
    # Zero input channels: the output is the bias alone, as in PyTorch.
    y = fastconv.conv2d(np.ones((2, 0, 5, 5), dtype), np.ones((4, 0, 3, 3), dtype), np.arange(4, dtype=dtype))
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(4, dtype=dtype).reshape(1, 4, 1, 1), (2, 4, 3, 3)))
    assert fastconv.conv2d(np.ones((2, 3, 5, 5), dtype), np.ones((0, 3, 3, 3), dtype)).shape == (2, 0, 3, 3)


def test_nan_and_inf_propagate_like_pytorch():
    x = np.ones((1, 1, 5, 5), np.float32)
    x[0, 0, 0, 0] = np.nan
    x[0, 0, 4, 4] = np.inf
    w = np.ones((1, 1, 3, 3), np.float32)
    y = fastconv.conv2d(x, w)[0, 0]
    assert np.isnan(y[0, 0]) and np.isinf(y[2, 2]) and np.isfinite(y[1, 1])
    assert np.isnan(fastconv.conv2d(np.ones((1, 1, 3, 3), np.float32), np.full((1, 1, 3, 3), np.nan, np.float32))).all()
    zero_weight = np.zeros((1, 1, 3, 3), np.float32)
    assert np.isnan(fastconv.conv2d(x, zero_weight)[0, 0, 0, 0])  # 0 * NaN is NaN, never optimised away
    dx, dw, _ = fastconv.conv2d_backward(x, w, np.ones((1, 1, 3, 3), np.float32))
    assert np.isnan(dw).any() and np.isfinite(dx).all()


@pytest.mark.parametrize("filters", [4, 72])  # weight gradient from the padded input; by packed patches
def test_opposite_infinities_in_partial_weight_gradients_make_nan_without_a_warning(rng, filters):
    """inf in one image and -inf in the other land in the partial gradients of different tasks: adding them
    (in NumPy) gives NaN, as the reference's one sum does, and NumPy must not warn about it."""
    x = random_array(rng, (2, 2, 40, 8), "float64")
    x[0, :, 5, 3], x[1, :, 30, 3] = np.inf, -np.inf
    dy = np.ones((2, filters, 40, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fastconv.conv2d_weight(x, (filters, 2, 3, 3), dy, padding=1)
    want = reference.conv2d_weight(x, (filters, 2, 3, 3), dy, padding=1)
    assert np.isnan(want).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("groups", [1, 4])  # by GEMM; depthwise, by direct loops
@pytest.mark.parametrize("stride", [1, 2])
def test_an_infinite_pixel_reaches_only_the_gradients_that_read_it(rng, groups, stride):
    """The direct kernel's wide rows also multiply pixels that no output of a tap reads (by zeros of the
    output gradient); an infinite one must not turn that tap's gradient into NaN."""
    x = random_array(rng, (1, 4, 7, 7), "float64")
    x[0, :, 3, 0] = np.inf  # the first column: read by the left taps only, past the right edge of a wide row
    w_shape = (4, 4 // groups, 3, 3)
    y = fastconv.conv2d(x, np.ones(w_shape), stride=stride, padding=1, groups=groups)
    dy = random_array(rng, y.shape, "float64")
    got = fastconv.conv2d_weight(x, w_shape, dy, stride=stride, padding=1, groups=groups)
    want = reference.conv2d_weight(x, w_shape, dy, stride=stride, padding=1, groups=groups)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert np.isfinite(want).any()
    assert_close(np.where(np.isfinite(want), got, 0), np.where(np.isfinite(want), want, 0))


@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_chunked_column_buffer_gives_the_same_result(rng, monkeypatch, dtype, rows):
    """Output rows of the batch are processed a chunk at a time; chunks within and across images change nothing."""
    x = random_array(rng, (2, 4, 11, 9), dtype)
    w = random_array(rng, (6, 2, 3, 2), dtype)
    wt = random_array(rng, (4, 3, 3, 2), dtype)
    whole = [fastconv.conv2d(x, w, **PARAMS)]
    dy = random_array(rng, whole[0].shape, dtype)
    whole += fastconv.conv2d_backward(x, w, dy, **PARAMS)
    whole += [fastconv.conv_transpose2d(x, wt, None, stride=2, padding=1, groups=2)]
    monkeypatch.setattr(conv_module, "_rows_per_chunk", lambda geometry, dtype: rows)
    chunked = [fastconv.conv2d(x, w, **PARAMS), *fastconv.conv2d_backward(x, w, dy, **PARAMS)]
    chunked += [fastconv.conv_transpose2d(x, wt, None, stride=2, padding=1, groups=2)]
    for a, b in zip(chunked, whole):
        assert_close(a, b)
    assert_close(chunked[0], reference.conv2d(x, w, **PARAMS))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "x_shape, w_shape, stride, groups",
    [
        ((3, 64, 5, 6), (64, 30, 3, 3), 2, 2),  # 30 channels of 9 taps a group: tasks of 4 channels, the last of 2
        ((2, 520, 3, 3), (520, 4, 4, 4), 2, 1),  # 520 filters: two KC blocks, the second added to the first
        ((2, 8, 6, 5), (8, 5, 3, 3), 3, 1),  # stride 3: taps summed in three phase rows
    ],
)
def test_input_gradient_adds_each_task_back_with_the_same_bits(
    rng, monkeypatch, dtype, x_shape, w_shape, stride, groups
):
    """In one chunk of at most NC pixels, each task of the input gradient adds its channels' rows of the column
    matrix back into the image as soon as it has them (``_conv_kernels._input_grad_tasks``); otherwise the GEMM
    and col2im run one after the other. The same sums in the same order: the same bits, and the right ones."""
    x = random_array(rng, x_shape, dtype)
    w = random_array(rng, w_shape, dtype)
    params = dict(stride=stride, padding=1, groups=groups)
    fused = fastconv.conv_transpose2d(x, w, **params)
    monkeypatch.setattr(_conv_kernels, "NC", 1)
    apart = fastconv.conv_transpose2d(x, w, **params)
    np.testing.assert_array_equal(fused, apart)
    assert_close(fused, reference.conv_transpose2d(x, w, **params))


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding",
    [
        ((2, 16, 8, 8), (80, 16, 1, 1), 1, 0),  # 1x1: rows of 64 pixels, whole tiles on cache lines
        ((3, 8, 7, 7), (12, 8, 1, 1), 1, 0),  # 1x1: rows of 49 pixels, tiles across images and cache lines
        ((2, 8, 12, 12), (36, 8, 3, 3), 1, 1),  # patches packed per task
        ((2, 8, 12, 12), (20, 8, 3, 3), 2, 1),
    ],
)
def test_streamed_output_has_the_bits_of_a_cached_one(rng, monkeypatch, x_shape, w_shape, stride, padding):
    """conv2d by GEMM stores an output of ``config.STREAM_OUTPUT_BYTES`` or more past the caches (here from its
    first byte), its gradients likewise where they are GEMM outputs: the same bits as through the caches, and
    the reference's values."""
    x = random_array(rng, x_shape, "float32")
    w = random_array(rng, w_shape, "float32")
    params = dict(stride=stride, padding=padding)
    dy = random_array(rng, reference.conv2d(x, w, **params).shape, "float32")

    def results():
        return [fastconv.conv2d(x, w, **params, algorithm="gemm"), *fastconv.conv2d_backward(x, w, dy, **params)]

    cached = results()
    monkeypatch.setattr(_macro, "STREAM_OUTPUT_BYTES", 0)
    streamed = results()
    for a, b in zip(streamed, cached):
        np.testing.assert_array_equal(a, b)
    assert_close(streamed[0], reference.conv2d(x, w, **params))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding, groups",
    [
        ((2, 8, 12, 11), (6, 8, 3, 3), 1, 1, 1),  # 6 filters: a micro-panel and a half
        ((3, 3, 31, 30), (16, 3, 7, 7), 2, 3, 1),  # an RGB stem at stride 2
        ((2, 8, 9, 9), (12, 4, 3, 3), 1, 0, 2),
    ],
)
def test_staged_output_has_the_bits_of_one_written_in_place(
    rng, monkeypatch, rows, x_shape, w_shape, stride, padding, groups
):
    """The forward pass from the padded input stages a large output a block of rows per task and streams it out
    (``_shifted._shifted_gemm_staged``; here from its first byte, ``rows`` rows a task): its tiles start on each
    task's first row, but every output is summed as before: the same bits."""
    x = random_array(rng, x_shape, "float32")
    w = random_array(rng, w_shape, "float32")
    params = dict(stride=stride, padding=padding, groups=groups)
    in_place = fastconv.conv2d(x, w, **params)
    calls = []
    staged_kernel = _conv_kernels._shifted_gemm_staged
    monkeypatch.setattr(_conv_kernels, "_shifted_gemm_staged", lambda *args: calls.append(staged_kernel(*args)))
    monkeypatch.setattr(_conv_kernels, "staged_rows", lambda *args: rows)
    monkeypatch.setattr(_macro, "STREAM_OUTPUT_BYTES", 0)
    staged = fastconv.conv2d(x, w, **params)
    assert len(calls) == groups
    np.testing.assert_array_equal(staged, in_place)
    assert_close(staged, reference.conv2d(x, w, **params))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "x_shape, w_shape, stride, groups",
    [
        ((3, 64, 5, 6), (64, 30, 3, 3), 2, 2),  # 30 channels of 9 taps a group: tasks of 4 channels, the last of 2
        ((2, 520, 3, 3), (520, 4, 4, 4), 2, 1),  # 520 filters: two KC blocks, the second added to the first
        ((5, 24, 7, 5), (24, 40, 4, 4), 2, 1),  # 175 pixels: square blocks of 16 transposed, and the rest
        ((1, 16, 1, 1), (16, 8, 4, 4), 1, 1),  # one pixel
    ],
)
def test_input_gradient_by_swapped_operands_gives_the_same_bits(
    rng, monkeypatch, dtype, x_shape, w_shape, stride, groups
):
    """With few output pixels and large weights (here any), the input gradient multiplies ``dyᵀ @ W``
    (``_conv_kernels._input_grad_swapped_tasks``) rather than ``Wᵀ @ dy``: the same products summed in the same
    order, so the same bits, and the right ones."""
    x = random_array(rng, x_shape, dtype)
    w = random_array(rng, w_shape, dtype)
    params = dict(stride=stride, padding=1 if stride > 1 else 0, groups=groups)
    monkeypatch.setattr(_conv_kernels, "SWAPPED_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(_conv_kernels, "SWAPPED_MAX_PIXELS", 0)
    plain = fastconv.conv_transpose2d(x, w, **params)
    monkeypatch.setattr(_conv_kernels, "SWAPPED_MAX_PIXELS", 10**9)
    calls = []
    swapped_kernel = _conv_kernels._input_grad_swapped_tasks
    monkeypatch.setattr(_conv_kernels, "_input_grad_swapped_tasks", lambda *args: calls.append(swapped_kernel(*args)))
    swapped = fastconv.conv_transpose2d(x, w, **params)
    assert len(calls) == groups
    np.testing.assert_array_equal(swapped, plain)
    assert_close(swapped, reference.conv_transpose2d(x, w, **params))


@pytest.mark.parametrize(
    "x_shape, stride, padding",
    [
        ((1, 2, 3, 3), 2, ((0, 2), (0, 2))),  # the last output row and column read the padding
        ((2, 3, 4, 5), 2, ((0, 3), (0, 1))),
        ((2, 2, 3, 3), 1, ((0, 1), (0, 0))),
        ((3, 3, 0, 0), 1, ((0, 2), (0, 2))),  # an empty input: every output reads the padding
        ((2, 3, 5, 5), 2, ((0, 1), (0, 1))),  # the padding after the input not read at all
    ],
)
def test_1x1_layers_padded_after_the_input_only_match_the_reference(rng, x_shape, stride, padding):
    """A 1x1 layer with no padding before the input reads every sh-th pixel of it (``_subsample``), unless
    padding after it puts its last outputs beyond it: those read zeros, not memory past ``x`` (found by the
    fuzz test: the forward pass read past ``x``, the weight gradient left scratch unwritten)."""
    x = random_array(rng, x_shape, "float32")
    w = random_array(rng, (4, x_shape[1], 1, 1), "float32")
    params = dict(stride=stride, padding=padding)
    y = fastconv.conv2d(x, w, **params)
    assert_close(y, reference.conv2d(x, w, **params))
    dy = random_array(rng, y.shape, "float32")
    for got, want in zip(fastconv.conv2d_backward(x, w, dy, **params), reference.conv2d_backward(x, w, dy, **params)):
        assert_close(got, want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding, groups",
    [
        ((2, 16, 8, 8), (80, 16, 1, 1), 1, 0, 1),  # 1x1: a plain GEMM
        ((3, 8, 7, 7), (12, 8, 1, 1), 1, 0, 1),  # 1x1, tiles across images
        ((2, 8, 12, 12), (36, 8, 3, 3), 1, 1, 1),  # patches packed per task
        ((2, 8, 12, 12), (20, 8, 3, 3), 2, 1, 1),
        ((3, 3, 31, 30), (16, 3, 7, 7), 2, 3, 1),  # the padded input, staged
        ((2, 8, 9, 9), (12, 4, 3, 3), 1, 0, 2),
    ],
)
def test_bias_added_by_the_stores_gives_the_bits_of_one_stored_first(
    rng, monkeypatch, dtype, x_shape, w_shape, stride, padding, groups
):
    """conv2d by GEMM adds the bias as it stores a streamed output (here from its first byte), where it used to
    store the bias first and add the products to it: one addition either way, so ``conv2d(x, w) + bias`` to the
    bit, on every path."""
    x = random_array(rng, x_shape, dtype)
    w = random_array(rng, w_shape, dtype)
    bias = random_array(rng, (w_shape[0],), dtype)
    params = dict(stride=stride, padding=padding, groups=groups, algorithm="gemm")
    monkeypatch.setattr(_macro, "STREAM_OUTPUT_BYTES", 0)
    monkeypatch.setattr(_conv_kernels, "staged_rows", lambda *args: 3)
    expected = fastconv.conv2d(x, w, **params) + bias.reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(fastconv.conv2d(x, w, bias, **params), expected)


def test_results_do_not_depend_on_the_thread_count(rng):
    """The same bits on one thread and on all (``fastconv.set_num_threads``: Numba's own setting is overridden
    by every launch), whatever the size of the call."""
    x = random_array(rng, (2, 8, 40, 40), "float32")  # 16 filters: the weight gradient split over 80 rows
    w = random_array(rng, (16, 8, 3, 3), "float32")
    dy = random_array(rng, (2, 16, 40, 40), "float32")
    x_wide = random_array(rng, (1, 64, 46, 46), "float32")  # 529 tiles: Winograd's weight gradient, in ranges
    dy_72 = random_array(rng, (2, 72, 40, 40), "float32")  # 72 filters: the weight gradient by packed patches
    dy_wide = random_array(rng, (1, 64, 46, 46), "float32")
    w_4x4 = random_array(rng, (16, 16, 4, 4), "float32")  # conv_transpose2d 4x4 s2: Winograd on the phases
    dy_4x4 = random_array(rng, (2, 48, 20, 20), "float32")  # and conv2d_weight 4x4 s2: 200 tiles, 48 filters
    x_28 = random_array(rng, (2, 32, 56, 28), "float32")  # 288 taps at stride 2, 14 pixels a row: outer products
    w_288 = random_array(rng, (64, 32, 3, 3), "float32")

    def run():
        return [
            fastconv.conv2d(x, w, padding=1),
            *fastconv.conv2d_backward(x, w, dy, padding=1),
            fastconv.conv_transpose2d(dy, w, None, padding=1),
            fastconv.gemm(x.reshape(80, -1), x.reshape(-1, 80)),
            fastconv.gemm(x.reshape(5, -1), x.reshape(-1, 5)),  # 5120-long K split into ranges
            fastconv.conv2d(x, w[:8, :1], padding=1, groups=8),  # depthwise: the direct kernel
            fastconv.conv2d_weight(x_wide, (64, 64, 3, 3), dy_wide, padding=1),
            fastconv.conv2d_weight(x, (72, 8, 3, 3), dy_72, padding=1),
            fastconv.conv_transpose2d(dy, w_4x4, None, stride=2, padding=1),
            fastconv.conv2d_weight(dy, (48, 16, 4, 4), dy_4x4, stride=2, padding=1),
            fastconv.conv2d(x_28, w_288, stride=2, padding=1),
        ]

    saved = fastconv.get_num_threads()
    try:
        results = {}
        for threads in sorted({1, saved}):
            fastconv.set_num_threads(threads)
            results[threads] = run()
    finally:
        fastconv.set_num_threads(saved)
    for a, b in zip(results[1], results[saved]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("direct_up_to", [0, 1000])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradients_by_gemm_and_by_direct_loops_agree_with_the_reference(rng, monkeypatch, direct_up_to, stride):
    """Grouped gradients take the direct kernels or the GEMM path by shape; force each on the same cases."""
    monkeypatch.setattr(conv_module, "DIRECT_MAX_OUT_PER_GROUP", direct_up_to)
    for C, K, groups in [(4, 4, 4), (4, 6, 2), (3, 6, 1)]:
        x = random_array(rng, (2, C, 9, 8), "float64")
        w = random_array(rng, (K, C // groups, 3, 2), "float64")
        params = dict(stride=stride, padding=(1, 2), dilation=(2, 1), groups=groups)
        dy = random_array(rng, fastconv.conv2d(x, w, **params).shape, "float64")
        for actual, expected in zip(
            fastconv.conv2d_backward(x, w, dy, **params), reference.conv2d_backward(x, w, dy, **params)
        ):
            assert_close(actual, expected)
        b = random_array(rng, (C,), "float64")
        assert_close(
            fastconv.conv_transpose2d(dy, w, b, **params, output_padding=(stride - 1, 0)),
            reference.conv_transpose2d(dy, w, b, **params, output_padding=(stride - 1, 0)),
        )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_gradient_split_over_pixel_ranges_matches_the_reference(rng, dtype):
    """Few filters and many pixels: the weight gradient is summed over fixed pixel ranges, then in order."""
    from fastconv._conv_kernels import _weight_grad_split

    x = random_array(rng, (2, 4, 33, 33), dtype)
    w = random_array(rng, (6, 2, 3, 3), dtype)
    params = dict(stride=1, padding=1, groups=2)
    dy = random_array(rng, (2, 6, 33, 33), dtype)
    assert _weight_grad_split(3, 18, 2, 2 * 33 * 33)[0] > 1  # this case takes the split path (4 ranges)
    assert_close(fastconv.conv2d_weight(x, w.shape, dy, **params), reference.conv2d_weight(x, w.shape, dy, **params))
