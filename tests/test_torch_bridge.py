"""fastconv.torch: the autograd functions match torch.nn.functional and pass gradcheck and gradgradcheck."""

import pytest

torch = pytest.importorskip("torch")
import fastconv.torch as fct  # noqa: E402

# (input shape, weight shape, kwargs): 12 conv2d and 8 conv_transpose2d configurations.
CONV_CONFIGS = [
    ((1, 1, 4, 4), (1, 1, 3, 3), {}),
    ((2, 2, 5, 4), (3, 2, 3, 2), dict(padding=1)),
    ((1, 2, 6, 5), (2, 2, 3, 3), dict(stride=2, padding=1)),
    ((1, 2, 5, 5), (2, 2, 2, 2), dict(dilation=2)),
    ((1, 4, 4, 4), (4, 2, 3, 3), dict(groups=2, padding=1)),
    ((1, 3, 4, 5), (3, 1, 3, 3), dict(groups=3, padding="same")),
    ((2, 1, 5, 5), (2, 1, 3, 3), dict(padding="valid")),
    ((1, 2, 5, 6), (2, 2, 3, 3), dict(padding=((0, 2), (1, 0)))),
    ((1, 2, 7, 7), (1, 2, 3, 3), dict(stride=(2, 3), padding="same")),
    ((2, 2, 3, 3), (2, 2, 1, 1), {}),
    ((1, 2, 6, 4), (2, 2, 2, 3), dict(stride=(1, 2), dilation=(2, 1), padding=(1, 1))),
    ((2, 5, 5), (2, 2, 3, 3), dict(padding=1)),  # unbatched
]
TRANSPOSE_CONFIGS = [
    ((1, 2, 3, 3), (2, 1, 3, 3), {}),
    ((1, 2, 3, 3), (2, 2, 4, 4), dict(stride=2, padding=1)),
    ((2, 2, 2, 3), (2, 1, 3, 2), dict(stride=2, output_padding=1)),
    ((1, 4, 3, 3), (4, 1, 3, 3), dict(groups=2, padding=1)),
    ((1, 2, 3, 3), (2, 2, 2, 2), dict(dilation=2, output_padding=1)),
    ((1, 2, 2, 3), (2, 3, 3, 3), dict(stride=(2, 1), padding=(1, 0))),
    ((1, 1, 4, 4), (1, 1, 2, 2), dict(stride=2)),
    ((2, 3, 3), (2, 2, 3, 3), dict(padding=1)),  # unbatched
]


def _tensors(x_shape, w_shape, bias_size, seed):
    generator = torch.Generator().manual_seed(seed)

    def make(shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)

    return make(x_shape), make(w_shape), make((bias_size,))


@pytest.mark.parametrize("x_shape, w_shape, kwargs", CONV_CONFIGS)
def test_conv2d_matches_torch_and_passes_gradcheck(x_shape, w_shape, kwargs):
    x, w, b = _tensors(x_shape, w_shape, w_shape[0], seed=len(kwargs))
    torch_padding = kwargs.get("padding", 0)
    if (
        isinstance(torch_padding, tuple)
        and isinstance(torch_padding[0], tuple)
        or (torch_padding == "same" and kwargs.get("stride", 1) != 1)
    ):
        expected = None  # PyTorch has no asymmetric padding, nor 'same' at stride > 1
    else:
        expected = torch.nn.functional.conv2d(x, w, b, **kwargs)
    actual = fct.conv2d(x, w, b, **kwargs)
    if expected is not None:
        torch.testing.assert_close(actual, expected)
    assert torch.autograd.gradcheck(lambda *t: fct.conv2d(*t, **kwargs), (x, w, b))


@pytest.mark.parametrize("x_shape, w_shape, kwargs", TRANSPOSE_CONFIGS)
def test_conv_transpose2d_matches_torch_and_passes_gradcheck(x_shape, w_shape, kwargs):
    groups = kwargs.get("groups", 1)
    x, w, b = _tensors(x_shape, w_shape, w_shape[1] * groups, seed=len(kwargs))
    torch.testing.assert_close(
        fct.conv_transpose2d(x, w, b, **kwargs), torch.nn.functional.conv_transpose2d(x, w, b, **kwargs)
    )
    assert torch.autograd.gradcheck(lambda *t: fct.conv_transpose2d(*t, **kwargs), (x, w, b))


@pytest.mark.parametrize("index", [1, 2, 4, 7])
def test_conv2d_gradgradcheck(index):
    x_shape, w_shape, kwargs = CONV_CONFIGS[index]
    x, w, b = _tensors(x_shape, w_shape, w_shape[0], seed=index)
    assert torch.autograd.gradgradcheck(lambda *t: fct.conv2d(*t, **kwargs), (x, w, b))


@pytest.mark.parametrize("index", [1, 2])
def test_conv_transpose2d_gradgradcheck(index):
    x_shape, w_shape, kwargs = TRANSPOSE_CONFIGS[index]
    x, w, b = _tensors(x_shape, w_shape, w_shape[1], seed=index)
    assert torch.autograd.gradgradcheck(lambda *t: fct.conv_transpose2d(*t, **kwargs), (x, w, b))


def test_bridge_refuses_what_it_cannot_compute():
    x = torch.ones(1, 1, 4, 4)
    with pytest.raises(TypeError, match="one dtype"):
        fct.conv2d(x, torch.ones(1, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        fct.conv2d(x.to(torch.int32), torch.ones(1, 1, 3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fct.conv2d(x.numpy(), torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        fct.conv2d(x, torch.ones(1, 2, 3, 3))
