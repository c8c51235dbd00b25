"""Against independent oracles that are not ours: PyTorch (where installed) and scipy.signal.correlate2d."""

import numpy as np
import pytest

import fastconv
from conftest import assert_close, random_array, requires_torch, torch

# (C, K, groups, H, W, R, S, stride, padding, dilation)
CONV_CASES = [
    (3, 8, 1, 12, 12, 3, 3, 1, 1, 1),
    (4, 6, 2, 9, 11, 3, 2, (2, 1), (1, 0), 1),
    (6, 6, 6, 10, 10, 3, 3, 1, 1, 1),  # depthwise
    (5, 4, 1, 8, 7, 1, 1, 1, 0, 1),
    (3, 4, 1, 16, 16, 7, 7, 2, 3, 1),
    (2, 3, 1, 12, 10, 3, 3, 1, 2, 2),
    (4, 8, 2, 7, 7, 3, 3, 1, "same", (2, 1)),
    (3, 2, 1, 7, 9, 2, 4, 3, "valid", 1),
    (16, 16, 1, 31, 32, 4, 4, 2, 1, 1),  # forward and input gradient by Winograd on the stride phases
]


def _torch_padding(padding):
    return padding if isinstance(padding, (str, int)) else tuple(padding)


@requires_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_pytorch(rng, case, dtype):
    C, K, groups, H, W, R, S, stride, padding, dilation = case
    x = random_array(rng, (3, C, H, W), dtype)
    w = random_array(rng, (K, C // groups, R, S), dtype)
    b = random_array(rng, (K,), dtype)
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, **{**params, "padding": _torch_padding(padding)})
    assert_close(fastconv.conv2d(x, w, b, **params), ty.detach().numpy())

    dy = random_array(rng, tuple(ty.shape), dtype)
    ty.backward(torch.tensor(dy))
    grads = fastconv.conv2d_backward(x, w, dy, **params)
    for ours, theirs in zip(grads, (tx.grad, tw.grad, tb.grad)):
        assert_close(ours, theirs.numpy())
    if not isinstance(padding, str):  # torch.nn.grad takes only explicit padding
        tdy = torch.tensor(dy)
        tparams = {**params, "padding": _torch_padding(padding)}
        expected_dx = torch.nn.grad.conv2d_input(x.shape, torch.tensor(w), tdy, **tparams)
        expected_dw = torch.nn.grad.conv2d_weight(torch.tensor(x), w.shape, tdy, **tparams)
        assert_close(fastconv.conv2d_input(x.shape, w, dy, **params), expected_dx.numpy())
        assert_close(fastconv.conv2d_weight(x, w.shape, dy, **params), expected_dw.numpy())


# (C_in, C_out, groups, H, W, R, S, stride, padding, output_padding, dilation)
TRANSPOSE_CASES = [
    (8, 4, 1, 4, 4, 4, 4, 2, 1, 0, 1),  # DCGAN
    (6, 4, 2, 7, 7, 2, 2, 2, 0, 0, 1),  # U-Net
    (3, 5, 1, 5, 6, 3, 3, (2, 3), (1, 0), (1, 2), 1),
    (4, 4, 4, 6, 6, 3, 3, 1, 1, 0, 2),  # depthwise, dilated
    (2, 3, 1, 3, 4, 3, 2, 1, 0, 1, 2),  # output_padding < dilation at stride 1
    (8, 16, 1, 12, 11, 4, 4, 2, 1, 1, 1),  # DCGAN's 4x4 s2 by Winograd on the four stride phases
]


@requires_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_conv_transpose2d_matches_pytorch(rng, case, dtype):
    C_in, C_out, groups, H, W, R, S, stride, padding, output_padding, dilation = case
    x = random_array(rng, (2, C_in, H, W), dtype)
    w = random_array(rng, (C_in, C_out // groups, R, S), dtype)
    b = random_array(rng, (C_out,), dtype)
    params = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.conv_transpose2d(tx, tw, tb, **params)
    assert_close(fastconv.conv_transpose2d(x, w, b, **params), ty.detach().numpy())

    dy = random_array(rng, tuple(ty.shape), dtype)
    ty.backward(torch.tensor(dy))
    grads = fastconv.conv_transpose2d_backward(x, w, dy, **params)
    for ours, theirs in zip(grads, (tx.grad, tw.grad, tb.grad)):
        assert_close(ours, theirs.numpy())


@pytest.mark.parametrize("mode", ["valid", "full"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_single_channel_matches_scipy_correlate2d(rng, mode, dtype):
    signal = pytest.importorskip("scipy.signal")
    image = random_array(rng, (11, 9), dtype)
    kernel = random_array(rng, (4, 3), dtype)
    padding = 0 if mode == "valid" else ((3, 3), (2, 2))
    expected = signal.correlate2d(image.astype(np.float64), kernel.astype(np.float64), mode=mode)
    actual = fastconv.conv2d(image[None, None], kernel[None, None], padding=padding)[0, 0]
    assert_close(actual, expected.astype(dtype))
