"""Convolutions with a constant operand: the same derivatives, without the constant's."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from analysis.hessian import WeightHessian
from analysis.hessian.convolutions import SMALL_INPUT_CHANNELS, _input_gradient
from analysis.hessian.leangraph import lean_graph
from tests.analysis.hessian.reference import OpRecorder, dense_weight_hessian

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVOLUTIONS = ("convolution", "_convolution")


def _net(dim: int, **conv) -> nn.Module:
    torch.manual_seed(dim)
    net = nn.Sequential(CONVS[dim](4, 6, 3, **conv), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    return net.double()


def _hvp(net: nn.Module, x: torch.Tensor, y: torch.Tensor, v: list, rewrite: bool) -> list:
    params = list(net.parameters())
    with lean_graph() if rewrite else contextlib.nullcontext():
        loss = nn.functional.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    return list(torch.autograd.grad(grads, params, v))


@pytest.mark.parametrize(
    ("dim", "conv"),
    [
        (1, {"stride": 2, "padding": 1}),
        (2, {"stride": 2, "padding": 1, "dilation": 2, "groups": 2}),
        (2, {"bias": False, "padding": (1, 0)}),
        (3, {"stride": (1, 2, 1), "groups": 2}),
        (2, {"padding": "same"}),  # a string padding is left to PyTorch
    ],
)
def test_gradient_and_hessian_vector_product_are_unchanged(dim, conv):
    net = _net(dim, **conv)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, *[9] * dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    net(x)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in net.parameters()]
    for plain, rewritten in zip(_hvp(net, x, y, v, False), _hvp(net, x, y, v, True), strict=True):
        torch.testing.assert_close(rewritten, plain, rtol=1e-12, atol=1e-13)


def test_the_product_no_longer_differentiates_the_data():
    net = _net(2, stride=2)
    x = torch.randn(8, 4, 10, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    net(x)
    v = [torch.randn_like(p) for p in net.parameters()]
    seen = {}
    for rewrite in (False, True):
        params = list(net.parameters())
        with lean_graph() if rewrite else contextlib.nullcontext():
            loss = nn.functional.cross_entropy(net(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
        with OpRecorder() as mode:
            torch.autograd.grad(grads, params, v)
        seen[rewrite] = mode.shapes(*CONVOLUTIONS)
    assert tuple(x.shape) in seen[False]  # PyTorch's double backward: a gradient w.r.t. x
    assert tuple(x.shape) not in seen[True]
    assert len(seen[True]) < len(seen[False])


def test_an_input_that_needs_its_gradient_keeps_it():
    net = _net(2, padding=1)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    with lean_graph():
        out = net(x).square().sum()
    (gx,) = torch.autograd.grad(out, x)
    (expected,) = torch.autograd.grad(net(x).square().sum(), x)
    torch.testing.assert_close(gx, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("hvp", "cache_bytes"), [("auto", None), ("reverse", 0)])
def test_weight_hessian_of_a_strided_cnn_matches_the_dense_one(hvp, cache_bytes):
    """Both paths that build a gradient graph (kept, or afresh per product) use the rewrite."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2, stride=2),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).double()
    x = torch.randn(10, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    dense = dense_weight_hessian(model, x, y)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    op = WeightHessian(model, nn.CrossEntropyLoss(), data, hvp=hvp, cache_bytes=cache_bytes)
    eye = torch.eye(op.size, dtype=torch.float64)
    with OpRecorder() as mode:
        columns = torch.stack([op.matvec(e) for e in eye], dim=1)
    torch.testing.assert_close(columns, dense, rtol=1e-10, atol=1e-12)
    # the data is re-chunked into one chunk of all 10 samples
    convolutions = mode.shapes(*CONVOLUTIONS)
    assert convolutions and tuple(x.shape) not in convolutions


def _input_hvp(net: nn.Module, x: torch.Tensor, v: torch.Tensor, rewrite: bool) -> tuple:
    """Gradient and Hessian-vector product w.r.t. the input, the weights held constant."""
    consts = {k: t.detach() for k, t in net.named_parameters()}
    z = x.clone().requires_grad_(True)
    with lean_graph() if rewrite else contextlib.nullcontext():
        out = torch.func.functional_call(net, consts, (z,))
        (g,) = torch.autograd.grad(out.square().sum(), z, create_graph=True)
    (hv,) = torch.autograd.grad(g, z, v)
    return g.detach(), hv


@pytest.mark.parametrize(
    ("dim", "channels", "conv"),
    [
        (1, 4, {"stride": 2, "padding": 1}),
        (2, 3, {"stride": 3, "padding": 1, "dilation": 2}),  # the fold path
        (2, 1, {"kernel_size": (2, 3), "stride": (2, 1), "padding": (0, 2)}),  # fold
        (2, 1, {"bias": False, "stride": 2}),  # fold; 10 px with stride 2 leaves a column
        (2, 6, {"stride": 2, "groups": 2}),  # oneDNN's input gradient
        (2, SMALL_INPUT_CHANNELS + 1, {"padding": 1}),  # too many channels for the fold
        (3, 2, {"stride": (1, 2, 1)}),
    ],
)
def test_input_gradient_and_input_hessian_product_are_unchanged(dim, channels, conv):
    torch.manual_seed(dim)
    kernel = conv.pop("kernel_size", 3)
    net = nn.Sequential(
        CONVS[dim](channels, 4, kernel, **conv), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)
    ).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, channels, *[10] * dim, generator=gen, dtype=torch.float64)
    net(x)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (g0, hv0), (g1, hv1) = _input_hvp(net, x, v, False), _input_hvp(net, x, v, True)
    torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(hv1, hv0, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "size"),
    [(4, 4, 0, 1, 32), (3, 1, 1, 1, 8), (3, 2, 1, 1, 9), ((2, 5), (1, 3), (1, 2), (2, 1), 11)],
)
def test_the_fold_input_gradient_equals_pytorchs(dtype, kernel, stride, padding, dilation, size):
    pair = nn.modules.utils._pair
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 3, *pair(kernel), generator=gen, dtype=dtype)
    x = torch.randn(4, 3, size, size + 1, generator=gen, dtype=dtype)
    conv = (list(pair(stride)), list(pair(padding)), list(pair(dilation)), 1)
    g = torch.randn(nn.functional.conv2d(x, w, None, *conv).shape, generator=gen, dtype=dtype)
    want = torch.nn.grad.conv2d_input(x.shape, w, g, *conv)
    got = _input_gradient(g, w, x.shape, conv)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)


def test_an_input_hessian_product_forms_no_weight_gradient():
    net = _net(2, stride=2)
    x = torch.randn(8, 4, 10, 10, dtype=torch.float64)
    net(x)
    seen = {}
    for rewrite in (False, True):
        consts = {k: t.detach() for k, t in net.named_parameters()}
        z = x.clone().requires_grad_(True)
        with lean_graph() if rewrite else contextlib.nullcontext():
            out = torch.func.functional_call(net, consts, (z,))
            (g,) = torch.autograd.grad(out.square().sum(), z, create_graph=True)
        with OpRecorder() as mode:
            torch.autograd.grad(g, z, torch.ones_like(z))
        seen[rewrite] = mode.shapes(*CONVOLUTIONS)
    # PyTorch's double backward also forms a weight gradient: a convolution over the
    # channels (x and the output gradient transposed), not over the 8 samples
    assert any(shape[0] != 8 for shape in seen[False])
    assert seen[True] and all(shape[0] == 8 for shape in seen[True])
    assert len(seen[True]) < len(seen[False])


@pytest.mark.parametrize(("channels", "fold"), [(3, True), (SMALL_INPUT_CHANNELS + 2, False)])
def test_the_input_gradient_of_few_channels_is_a_fold_on_a_cpu(channels, fold):
    net = nn.Sequential(nn.Conv2d(channels, 4, 3, stride=(2,), padding=(1,))).double()
    x = torch.randn(3, channels, 7, 7, dtype=torch.float64)
    consts = {k: t.detach() for k, t in net.named_parameters()}
    z = x.clone().requires_grad_(True)
    with lean_graph():
        out = torch.func.functional_call(net, consts, (z,))
    with OpRecorder() as mode:
        (g,) = torch.autograd.grad(out.square().sum(), z)
    assert ("col2im" in mode.names) == fold
    assert ("convolution_backward" in mode.names) != fold
    (want,) = torch.autograd.grad(net(z).square().sum(), z)
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-13)


def test_an_empty_batch_passes_through():
    net = nn.Conv2d(3, 4, 3).double()
    z = torch.zeros(0, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    consts = {k: t.detach() for k, t in net.named_parameters()}
    with lean_graph():
        out = torch.func.functional_call(net, consts, (z,))
    (g,) = torch.autograd.grad(out.sum(), z)
    assert out.shape == (0, 4, 4, 4) and g.shape == z.shape
