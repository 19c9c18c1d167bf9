"""ReLU and max-pooling in a lean graph: the same derivatives, without the zero terms."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.hessian.leangraph import lean_graph
from tests.analysis.hessian.reference import OpRecorder


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


LAYERS = {
    "nn.ReLU": nn.ReLU(),
    "torch.relu": _Lambda(torch.relu),
    "Tensor.relu": _Lambda(lambda x: x.relu()),
    "in-place ReLU (left to PyTorch)": nn.ReLU(inplace=True),
    "nn.MaxPool2d": nn.MaxPool2d(2),
    "pool padding, dilation, ceil": nn.MaxPool2d(3, 2, padding=1, dilation=2, ceil_mode=True),
    "F.max_pool2d, no stride": _Lambda(lambda x: F.max_pool2d(x, (2, 3))),
    "torch.max_pool2d": _Lambda(lambda x: torch.max_pool2d(x, 2, 1)),
    "return_indices": _Lambda(lambda x: F.max_pool2d(x, 2, return_indices=True)[0]),
    "max_pool2d_with_indices": _Lambda(lambda x: F.max_pool2d_with_indices(x, 2)[0]),
}


def _net(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    # a sum of the layer's input and output makes the tests see both derivatives
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), layer, nn.Tanh(), nn.Flatten())
    return nn.Sequential(net, nn.LazyLinear(3)).double()


def _derivatives(net: nn.Module, x: torch.Tensor, y: torch.Tensor, rewrite: bool) -> list:
    """Weight gradient, weight-Hessian product, input gradient, input-Hessian product."""
    params = list(net.parameters())
    z = x.clone().requires_grad_(True)
    with lean_graph() if rewrite else contextlib.nullcontext():
        loss = F.cross_entropy(net(z), y)
        grads = torch.autograd.grad(loss, [*params, z], create_graph=True)
    v = [torch.full_like(g, 0.1).add_(torch.arange(g.numel()).view_as(g) % 7) for g in grads]
    hv = torch.autograd.grad(grads, [*params, z], v)
    return [g.detach() for g in grads] + list(hv)


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradients_and_products_are_unchanged(name):
    net = _net(LAYERS[name])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 9, 9, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    net(x)
    plain, lean = _derivatives(net, x, y, False), _derivatives(net, x, y, True)
    for a, b in zip(plain, lean, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)


def test_the_product_makes_no_zero_tensors_for_relu_and_pooling():
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 3)
    ).double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    zeros = {}
    for rewrite in (False, True):
        params = list(net.parameters())
        with lean_graph() if rewrite else contextlib.nullcontext():
            grads = torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=True)
        with OpRecorder() as mode:
            torch.autograd.grad(grads, params, [torch.ones_like(g) for g in grads])
        zeros[rewrite] = mode.shapes("fill_", "zero_", "zeros_like")
    activation = (4, 3, 6, 6)  # what ReLU outputs and max-pooling takes
    assert activation in zeros[False]  # the derivative of a mask w.r.t. its input
    assert activation not in zeros[True]


REWRITTEN = {
    "F.relu": (lambda x: F.relu(x), "_ReLUBackward"),
    "torch.relu": (torch.relu, "_ReLUBackward"),
    "Tensor.relu": (lambda x: x.relu(), "_ReLUBackward"),
    "nn.MaxPool2d": (nn.MaxPool2d(2), "_MaxPool2dBackward"),
    "F.max_pool2d, stride=None": (lambda x: F.max_pool2d(x, 2, None), "_MaxPool2dBackward"),
    "torch.max_pool2d": (lambda x: torch.max_pool2d(x, 2, 1), "_MaxPool2dBackward"),
    "return_indices, positional": (
        lambda x: F.max_pool2d(x, 2, 2, 0, 1, False, True)[0],
        "_MaxPool2dBackward",
    ),
    "max_pool2d_with_indices": (lambda x: F.max_pool2d_with_indices(x, 2)[0], "_MaxPool2dBackward"),
    "in-place ReLU": (lambda x: F.relu(x * 1, inplace=True), "ReluBackward0"),
}


@pytest.mark.parametrize("name", list(REWRITTEN))
def test_every_call_form_is_recorded_with_the_lean_function(name):
    fn, grad_fn = REWRITTEN[name]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    with lean_graph():
        out = fn(x)
    assert type(out.grad_fn).__name__ == grad_fn
