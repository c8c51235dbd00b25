"""Fuzzing against the reference: random valid configurations match it, random arguments are refused cleanly,
and inputs are never modified. Derandomised, so CI sees the same examples every run."""

import numpy as np
from conftest import assert_close
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastconv
from fastconv import reference

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much])
pairs = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))
paddings = st.one_of(
    st.integers(0, 2),
    st.tuples(st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.tuples(st.integers(0, 2), st.integers(0, 2))),
    st.sampled_from(["valid", "same"]),
)


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


@st.composite
def arrays(draw, shape, dtype):
    """Random values in ``shape``, C-contiguous or not (Fortran order, a strided view, reversed axes)."""
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    layout = draw(st.sampled_from(["C", "F", "strided", "reversed"]))
    if layout == "F":
        return np.asfortranarray(values)
    if layout == "strided":
        return np.repeat(values, 2, axis=-1)[..., ::2]
    if layout == "reversed":
        return np.ascontiguousarray(values[..., ::-1])[..., ::-1]
    return values


@st.composite
def conv_calls(draw):
    """A valid call of one of the conv2d family: (function name, args, kwargs)."""
    dtype = draw(st.sampled_from(["float32", "float64"]))
    groups = draw(st.integers(1, 3))
    C, K = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    N = draw(st.integers(0, 3))
    H, W = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    R, S = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride, dilation = draw(pairs), draw(pairs)
    name = draw(
        st.sampled_from(
            [
                "conv2d",
                "conv2d_backward",
                "conv2d_input",
                "conv2d_weight",
                "conv_transpose2d",
                "conv_transpose2d_backward",
            ]
        )
    )
    if name.startswith("conv_transpose2d"):
        padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2))))
        limit = [max(s, d) - 1 for s, d in zip(_pair(stride), _pair(dilation))]
        output_padding = (draw(st.integers(0, limit[0])), draw(st.integers(0, limit[1])))
        params = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
        x = draw(arrays((N, C, H, W), dtype))
        w = draw(arrays((C, K // groups, R, S), dtype))
        try:
            out_shape = reference.conv_transpose2d(np.zeros(x.shape), np.zeros(w.shape), **params).shape
        except ValueError:
            assume(False)
        if name == "conv_transpose2d":
            return name, (x, w, draw(st.none() | arrays((K,), dtype))), params
        return name, (x, w, draw(arrays(out_shape, dtype))), params
    params = dict(stride=stride, padding=draw(paddings), dilation=dilation, groups=groups)
    x = draw(arrays((N, C, H, W), dtype))
    w = draw(arrays((K, C // groups, R, S), dtype))
    try:
        out_shape = reference.conv2d(np.zeros(x.shape), np.zeros(w.shape), **params).shape
    except ValueError:
        assume(False)
    if name == "conv2d":
        return name, (x, w, draw(st.none() | arrays((K,), dtype))), params
    dy = draw(arrays(out_shape, dtype))
    if name == "conv2d_input":
        return name, (x.shape, w, dy), params
    if name == "conv2d_weight":
        return name, (x, w.shape, dy), params
    return name, (x, w, dy), params


@FUZZ
@given(conv_calls())
def test_valid_configurations_match_the_reference_and_leave_inputs_unchanged(call):
    name, args, params = call
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    actual = getattr(fastconv, name)(*args, **params)
    expected = getattr(reference, name)(*args, **params)
    for a, e in zip(
        actual if isinstance(actual, tuple) else [actual], expected if isinstance(expected, tuple) else [expected]
    ):
        assert_close(a, e)
    for a, copy in zip(args, copies):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, copy)


anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.floats(-2, 2),
    st.text(max_size=3),
    st.tuples(st.integers(-1, 4), st.integers(-1, 4)),
    st.lists(st.integers(-1, 4), max_size=4),
    st.sampled_from(["same", "valid", "full", ((0, 1), (1, 0)), ((1,), (2, 3)), 1.5, np.int64(2)]),
)
odd_arrays = st.one_of(
    st.builds(lambda s: np.ones(s), st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)),
    st.builds(lambda s: np.ones(s, np.complex64), st.lists(st.integers(1, 4), min_size=4, max_size=4).map(tuple)),
    st.builds(lambda s: np.ones(s, bool), st.lists(st.integers(1, 4), min_size=4, max_size=4).map(tuple)),
    st.builds(lambda s: np.ones(s, np.int32), st.lists(st.integers(1, 4), min_size=4, max_size=4).map(tuple)),
    st.just([[1, 2], [3]]),
    st.just("abc"),
    st.none(),
)


@FUZZ
@given(
    st.sampled_from(["conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward"]),
    odd_arrays,
    odd_arrays,
    odd_arrays,
    anything,
    anything,
    anything,
    anything,
)
def test_random_arguments_give_the_reference_result_or_a_clean_error(name, a, b, c, p1, p2, p3, p4):
    if name.startswith("conv_transpose2d"):
        params = dict(stride=p1, padding=p2, output_padding=p3, groups=p4)
    else:
        params = dict(stride=p1, padding=p2, dilation=p3, groups=p4)
    outcomes = []
    for library in (fastconv, reference):
        try:
            outcomes.append(getattr(library, name)(a, b, c, **params))
        except (ValueError, TypeError) as error:
            outcomes.append(type(error))
    ours, theirs = outcomes
    if isinstance(theirs, type):
        assert ours is theirs, (ours, theirs)
    else:
        for x, y in zip(ours if isinstance(ours, tuple) else [ours], theirs if isinstance(theirs, tuple) else [theirs]):
            assert_close(x, y)
