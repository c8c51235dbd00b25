"""fastconv.gemm against a float64 NumPy product, on shapes that are not multiples of MR, NR or KC."""

import numpy as np
import pytest

from conftest import assert_close, random_array
from fastconv import _macro, config, gemm
from fastconv._gemm import FALSE, NARROW, NARROW_PASSES, TRUE, ZERO, _pack_a, _packed_a_size, _packed_b_size
from fastconv._macro import _gemm_a_per_task, _gemm_packed, _k_ranges

SHAPES = [
    (1, 1, 1),
    (7, 13, 5),
    (300, 301, 299),
    (config.MR + 1, config.NR + 1, config.KC + 1),
    (config.MC + 3, 2 * config.NR - 1, 2 * config.KC + 7),
    (config.MC, config.NC + 5, config.KC + 3),  # the most rows the fused GEMM takes, more columns than NC
    (config.MC + 1, config.NC + 5, 2 * config.KC + 3),  # A packed a block at a time, once per NC columns
    (config.MC + config.MR + 1, 3 * config.NR + NARROW, config.KC + 1),  # last micro-panel of B narrow
    (2, 5, 0),  # empty inner dimension: zeros
    (0, 4, 3),
    (3, 0, 4),
]


@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_matches_float64_product(rng, m, n, k, dtype):
    a = random_array(rng, (m, k), dtype)
    b = random_array(rng, (k, n), dtype)
    expected = (a.astype(np.float64) @ b.astype(np.float64)).astype(dtype)
    assert_close(gemm(a, b), expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_narrow_micro_kernel_sums_as_the_wide_one(rng, dtype):
    """A last micro-panel of B with at most NARROW_PASSES * NARROW columns takes the narrow micro-kernel, a pass
    per NARROW columns, otherwise the wide one: the same products added in the same order, so the same bits."""
    a = random_array(rng, (2 * config.MR + 1, 2 * config.KC + 3), dtype)
    b = random_array(rng, (a.shape[1], config.NR + NARROW_PASSES * NARROW + 8), dtype)
    narrow = gemm(a, b[:, : config.NR + NARROW])
    wide = gemm(a, b)
    np.testing.assert_array_equal(narrow, wide[:, : config.NR + NARROW])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("m, n, k", [(270, 90, 32), (36, 9, 2 * config.KC + 8), (2304, 200, 64), (5, 3, 7)])
def test_a_packed_per_task_gives_the_bits_of_a_packed_whole(rng, dtype, m, n, k):
    """The input gradient's GEMM in one chunk packs W.T a block of rows per task (``_macro._gemm_a_per_task``),
    not whole first: the same micro-panels, so the same bits. Shapes: a last task of fewer rows (270 as tasks of
    48), three KC blocks, 16 tasks of 144 rows, fewer rows than a micro-panel."""
    a = random_array(rng, (1, k, m), dtype)  # A is a[0].T, as W.T is the input gradient's A
    b = random_array(rng, (1, k, n), dtype)
    whole, per_task = np.full((2, 1, m, n), np.nan, dtype)
    ap = np.empty(_packed_a_size(m, k), dtype)
    bp = np.empty(_packed_b_size(n), dtype)
    _pack_a(a, ZERO, m, ZERO, k, TRUE, ap)
    _gemm_packed(ap, m, k, b, ZERO, ZERO, n, whole, ZERO, ZERO, False, bp)
    _gemm_a_per_task(a, True, m, k, b, ZERO, ZERO, n, per_task, ZERO, ZERO, bp)
    np.testing.assert_array_equal(per_task, whole)
    assert_close(per_task[0], (a[0].T.astype(np.float64) @ b[0].astype(np.float64)).astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "blocks, m, k, cols",
    [
        (1, 70, 2 * config.KC + 5, 3 * config.NR + 5),  # three KC blocks, a last micro-panel packed
        (3, 9, 40, 2 * config.NR),  # every micro-panel read in place
        (4, config.MC + 44, 33, 49),  # two blocks of rows; micro-panels across blocks (7x7 images), packed
        (2, 12, config.KC, config.NR + NARROW),  # a narrow last micro-panel
    ],
)
def test_plain_b_read_in_place_gives_the_bits_of_a_packed_panel(rng, dtype, blocks, m, k, cols):
    """``_macro._plain_b_tasks`` has the micro-kernel read a plain B's micro-panels where they lie, rows
    ``cols`` apart (float32; float64 packs them per task): the same products in the same order as from a packed
    shared panel, so the same bits."""
    a = random_array(rng, (1, m, k), dtype)
    b = random_array(rng, (blocks, k + 3, cols), dtype)  # B is rows 3: of each block
    ap = np.empty(_packed_a_size(m, k), dtype)
    _pack_a(a, ZERO, m, ZERO, k, FALSE, ap)
    in_place, shared = np.full((2, blocks, m, cols), np.nan, dtype)
    panels, _ = _macro.task_scratch(np.dtype(dtype))
    three = np.int64(3)
    _macro._plain_b_tasks(ap, m, k, b, three, in_place, ZERO, FALSE, FALSE, ap[:0], panels)
    _gemm_packed(
        ap,
        m,
        k,
        b,
        three,
        ZERO,
        blocks * cols,
        shared,
        ZERO,
        ZERO,
        False,
        np.empty(_packed_b_size(cols * blocks), dtype),
    )
    np.testing.assert_array_equal(in_place, shared)
    expected = np.einsum("mk,bkn->bmn", a[0].astype(np.float64), b[:, 3:].astype(np.float64)).astype(dtype)
    assert_close(in_place, expected)


def test_gemm_accepts_any_layout_and_promotes(rng):
    a = rng.standard_normal((40, 30))
    b = rng.integers(-3, 4, size=(70, 30)).T[::-1]  # Fortran order, negative stride, int64
    a_f = np.asfortranarray(a)
    assert_close(gemm(a_f, b), a @ b.astype(np.float64))
    assert gemm(np.ones((2, 2), np.uint8), np.ones((2, 2), np.float32)).dtype == np.float32


@pytest.mark.parametrize("layout", ["TN", "NT", "TT"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_operands_stored_by_columns_give_the_same_bits(rng, layout, dtype):
    """Transposed views are packed as they are, not copied: A's rows read as columns (``_pack_a``'s transposed
    packing), B's columns in square blocks transposed in registers (``_simd._transposed_block``), both
    together as ``(b.T @ a.T).T``. The panels hold the same values as from C-ordered copies, so the products
    are the same bits. Shapes: rows of B's blocks past the matrix, shared dimensions not a multiple of the
    block, split-K, a single row or column."""
    shapes = [s for s in SHAPES if min(s) > 0] + [(20, 70, 5000), (1, 37, 40), (37, 1, 40)]
    for m, n, k in shapes:
        a = random_array(rng, (m, k), dtype)
        b = random_array(rng, (k, n), dtype)
        a_view = np.ascontiguousarray(a.T).T if layout[0] == "T" else a
        b_view = np.ascontiguousarray(b.T).T if layout[1] == "T" else b
        result = gemm(a_view, b_view)
        np.testing.assert_array_equal(result, gemm(a, b))
        if layout == "TT" and min(m, n) > 1:
            assert result.flags.f_contiguous


def test_gemm_never_writes_inputs(rng):
    a = random_array(rng, (9, 8), "float32")
    b = random_array(rng, (8, 7), "float32")
    a_copy, b_copy = a.copy(), b.copy()
    a.flags.writeable = False
    gemm(a, b)
    np.testing.assert_array_equal(a, a_copy)
    np.testing.assert_array_equal(b, b_copy)


@pytest.mark.parametrize(
    "a, b, error, words",
    [
        (np.ones((2, 3)), np.ones((4, 2)), ValueError, ["2x3", "4x2"]),
        (np.ones(3), np.ones((3, 2)), ValueError, ["2-D", "(3,)"]),
        (np.ones((2, 2), complex), np.ones((2, 2)), TypeError, ["a", "complex128"]),
        (np.ones((2, 2)), np.array([["x", "y"], ["z", "w"]]), TypeError, ["b", "<U1"]),
    ],
)
def test_gemm_errors(a, b, error, words):
    with pytest.raises(error) as info:
        gemm(a, b)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_few_tiles_of_c_split_the_shared_dimension(rng, dtype):
    """C of fewer than 4 tiles with a long K: ranges of K summed into partial products added in order."""
    for m, n, k in [(20, 70, 5000), (config.MR + 1, NARROW + 3, 8 * config.KC + 5), (1, 1, 4 * config.KC + 1)]:
        assert _k_ranges(m, n, k) > 1
        a = random_array(rng, (m, k), dtype)
        b = random_array(rng, (k, n), dtype)
        assert_close(gemm(a, b), (a.astype(np.float64) @ b.astype(np.float64)).astype(dtype))
    assert _k_ranges(config.MC, 4 * config.NR, 10**6) == 1  # enough tiles for every thread
    assert _k_ranges(64, 64, config.KC) == 1  # too short to split


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "m, n, k", [(300, 301, 299), (64, 3 * config.NR, 64), (config.MC + 1, config.NC + 5, config.KC)]
)
def test_streamed_output_has_the_bits_of_a_cached_one(rng, monkeypatch, dtype, m, n, k):
    """A C stored past the caches (``config.STREAM_OUTPUT_BYTES``, here from its first byte) holds the bits of
    one stored through them: whole tiles streamed, where their rows start on a cache line, the rest not."""
    a = random_array(rng, (m, k), dtype)
    b = random_array(rng, (k, n), dtype)
    cached = gemm(a, b)
    monkeypatch.setattr(_macro, "STREAM_OUTPUT_BYTES", 0)
    np.testing.assert_array_equal(gemm(a, b), cached)
    np.testing.assert_array_equal(gemm(a, np.asfortranarray(b)), cached)  # B packed from its transpose
