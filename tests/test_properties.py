"""Algebraic properties of convolution, over random configurations drawn by hypothesis."""

import numpy as np
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv
from fastconv.shapes import conv_output_size, same_padding

PROPERTY_SETTINGS = settings(deadline=None, max_examples=60, derandomize=True)


@st.composite
def conv_configs(draw, max_groups=3):
    groups = draw(st.integers(1, max_groups))
    C = groups * draw(st.integers(1, 3))
    K = groups * draw(st.integers(1, 3))
    R, S = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = ((draw(st.integers(0, 2)), draw(st.integers(0, 2))), (draw(st.integers(0, 2)), draw(st.integers(0, 2))))
    # Input at least as large as the dilated kernel once padded.
    H = max(1, dilation[0] * (R - 1) + 1 - sum(padding[0])) + draw(st.integers(0, 6))
    W = max(1, dilation[1] * (S - 1) + 1 - sum(padding[1])) + draw(st.integers(0, 6))
    N = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((K, C // groups, R, S))
    return x, w, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@PROPERTY_SETTINGS
@given(conv_configs(), st.integers(0, 2**32 - 1))
def test_adjoint_identity(config, seed):
    """<conv2d(x, w), y> == <x, conv2d_input(y, w)>, and conv_transpose2d is that adjoint."""
    x, w, params = config
    y = np.random.default_rng(seed).standard_normal(fastconv.conv2d(x, w, **params).shape)
    lhs = np.vdot(fastconv.conv2d(x, w, **params), y)
    adjoint = fastconv.conv2d_input(x.shape, w, y, **params)
    rhs = np.vdot(x, adjoint)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10 * (1 + abs(lhs)))
    # conv_transpose2d gives the same adjoint once output_padding restores conv2d's dropped rows and columns.
    (pt, _), (pl, _) = params["padding"]
    if params["padding"] == ((pt, pt), (pl, pl)):
        size = [
            (y.shape[2 + i] - 1) * params["stride"][i]
            - 2 * (pt, pl)[i]
            + params["dilation"][i] * (w.shape[2 + i] - 1)
            + 1
            for i in range(2)
        ]
        output_padding = (x.shape[2] - size[0], x.shape[3] - size[1])
        if all(0 <= op < max(s, d) for op, s, d in zip(output_padding, params["stride"], params["dilation"])):
            transpose = fastconv.conv_transpose2d(
                y, w, None, params["stride"], (pt, pl), output_padding, params["groups"], params["dilation"]
            )
            assert_close(transpose, adjoint)


@PROPERTY_SETTINGS
@given(conv_configs(max_groups=4))
def test_grouped_conv_is_the_concatenation_of_per_group_convs(config):
    x, w, params = config
    groups = params.pop("groups")
    Cg, Kg = x.shape[1] // groups, w.shape[0] // groups
    parts = [fastconv.conv2d(x[:, g * Cg : (g + 1) * Cg], w[g * Kg : (g + 1) * Kg], **params) for g in range(groups)]
    assert_close(fastconv.conv2d(x, w, groups=groups, **params), np.concatenate(parts, axis=1))


@PROPERTY_SETTINGS
@given(conv_configs(), st.integers(1, 2))
def test_splitting_the_batch_changes_nothing(config, split):
    x, w, params = config
    split = min(split, x.shape[0])
    whole = fastconv.conv2d(x, w, **params)
    halves = [fastconv.conv2d(x[:split], w, **params), fastconv.conv2d(x[split:], w, **params)]
    np.testing.assert_array_equal(whole, np.concatenate(halves))
    dy = np.ones_like(whole)
    dw_whole = fastconv.conv2d_weight(x, w.shape, dy, **params)
    dw_parts = sum(
        fastconv.conv2d_weight(x[s], w.shape, dy[s], **params) for s in (slice(None, split), slice(split, None))
    )
    assert_close(dw_whole, dw_parts)


@PROPERTY_SETTINGS
@given(conv_configs())
def test_same_padding_equals_its_explicit_padding(config):
    x, w, params = config
    explicit = tuple(
        same_padding(x.shape[2 + i], w.shape[2 + i], params["stride"][i], params["dilation"][i]) for i in range(2)
    )
    same = fastconv.conv2d(x, w, **{**params, "padding": "same"})
    assert same.shape[2:] == tuple(-(-x.shape[2 + i] // params["stride"][i]) for i in range(2))
    np.testing.assert_array_equal(same, fastconv.conv2d(x, w, **{**params, "padding": explicit}))
    assert (
        conv_output_size(x.shape[2], w.shape[2], params["stride"][0], *explicit[0], params["dilation"][0])
        == same.shape[2]
    )
