"""fastconv.nn layers against torch.nn's, with the same weights: outputs, input gradients, parameter gradients."""

import numpy as np
import pytest
from conftest import assert_close, requires_torch, torch

from fastconv import reference
from fastconv.nn import Conv2d, ConvTranspose2d


@requires_torch
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), padding=(2, 1), stride=(2, 1), groups=2),
        dict(kernel_size=3, padding="same", dilation=2),
        dict(kernel_size=2, padding="valid", bias=False),
    ],
)
def test_conv2d_layer_matches_torch(rng, padding_mode, kwargs):
    ours = Conv2d(4, 6, padding_mode=padding_mode, dtype=np.float64, rng=rng, **kwargs)
    theirs = torch.nn.Conv2d(4, 6, padding_mode=padding_mode, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.weight))
        if ours.bias is not None:
            theirs.bias.copy_(torch.from_numpy(ours.bias))
    x = rng.standard_normal((2, 4, 7, 6))
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx)
    y = ours.forward(x)
    assert_close(y, ty.detach().numpy())
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.from_numpy(dy))
    for _ in range(2):  # gradients accumulate, as PyTorch's .grad does
        dx = ours.backward(dy)
    assert_close(dx, tx.grad.numpy())
    assert_close(ours.grad_weight, 2 * theirs.weight.grad.numpy())
    if ours.bias is not None:
        assert_close(ours.grad_bias, 2 * theirs.bias.grad.numpy())
    ours.zero_grad()
    assert not any(g.any() for g in ours.gradients())


@requires_torch
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=4, stride=2, padding=1),
        dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2), groups=2),
        dict(kernel_size=3, dilation=2, bias=False),
    ],
)
def test_conv_transpose2d_layer_matches_torch(rng, kwargs):
    ours = ConvTranspose2d(4, 6, dtype=np.float64, rng=rng, **kwargs)
    theirs = torch.nn.ConvTranspose2d(4, 6, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.weight))
        if ours.bias is not None:
            theirs.bias.copy_(torch.from_numpy(ours.bias))
    x = rng.standard_normal((2, 4, 5, 4))
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx)
    assert_close(ours.forward(x), ty.detach().numpy())
    dy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.from_numpy(dy))
    assert_close(ours.backward(dy), tx.grad.numpy())
    assert_close(ours.grad_weight, theirs.weight.grad.numpy())


def test_default_initialisation_follows_pytorch_bounds():
    layer = Conv2d(16, 32, 3, groups=2, rng=0)
    bound = 1 / np.sqrt(16 // 2 * 9)
    assert layer.weight.dtype == np.float32 and layer.weight.shape == (32, 8, 3, 3)
    assert np.abs(layer.weight).max() <= bound and np.abs(layer.weight).max() > 0.9 * bound
    assert np.abs(layer.bias).max() <= bound
    up = ConvTranspose2d(16, 8, 4, rng=0)
    assert up.weight.shape == (16, 8, 4, 4) and np.abs(up.weight).max() <= 1 / np.sqrt(8 * 16)
    assert len(Conv2d(2, 2, 1, bias=False).parameters()) == 1


def test_layer_errors():
    with pytest.raises(ValueError, match="padding_mode"):
        Conv2d(2, 2, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="divisible by groups"):
        Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="zeros"):
        ConvTranspose2d(2, 2, 3, padding_mode="reflect")
    with pytest.raises(TypeError, match="dtype"):
        Conv2d(2, 2, 3, dtype=np.int32)
    with pytest.raises(RuntimeError, match="forward"):
        Conv2d(2, 2, 3).backward(np.ones((1, 2, 1, 1)))


def test_reflect_padding_gradient_matches_the_reference_on_the_padded_input(rng):
    """Without torch: the adjoint of the padding, checked by <backward(dy), x> == <forward(x), dy> (bias off)."""
    layer = Conv2d(2, 3, 3, padding=2, padding_mode="reflect", bias=False, dtype=np.float64, rng=rng)
    x = rng.standard_normal((1, 2, 6, 5))
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(np.vdot(layer.backward(dy), x), np.vdot(y, dy), rtol=1e-12)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    assert_close(y, reference.conv2d(padded, layer.weight))
