"""Eval-mode batch normalisation as an affine map: the same values and derivatives."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from analysis.hessian.leangraph import lean_graph
from tests.analysis.hessian.reference import OpRecorder


def _with_statistics(bn: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    if bn.running_mean is not None:
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
    return bn


def _derivatives(net: nn.Module, x: torch.Tensor, rewrite: bool) -> list:
    """Output, then gradient and Hessian-vector product w.r.t. weights and input."""
    params = [p for p in net.parameters() if p.requires_grad]
    z = x.clone().requires_grad_(True)
    with lean_graph() if rewrite else contextlib.nullcontext():
        out = net(z)
        grads = torch.autograd.grad(out.tanh().square().sum(), [*params, z], create_graph=True)
    v = [torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view_as(g) for g in grads]
    hv = torch.autograd.grad(grads, [*params, z], v, allow_unused=True, materialize_grads=True)
    return [out.detach()] + [g.detach() for g in grads] + list(hv)


@pytest.mark.parametrize(
    ("bn", "shape", "train"),
    [
        (nn.BatchNorm2d(3), (4, 3, 5, 5), False),
        (nn.BatchNorm1d(3), (4, 3), False),
        (nn.BatchNorm1d(3), (4, 3, 6), False),
        (nn.BatchNorm2d(3, affine=False), (4, 3, 5, 5), False),
        (nn.BatchNorm2d(3, eps=0.3), (4, 3, 5, 5), False),
        (nn.BatchNorm2d(3), (4, 3, 5, 5), True),  # batch statistics: left to PyTorch
        (nn.BatchNorm2d(3, track_running_stats=False), (4, 3, 5, 5), False),  # likewise
    ],
)
def test_values_and_derivatives_are_unchanged(bn, shape, train):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 3, 1) if len(shape) == 3 else nn.Identity(), bn)
    if len(shape) == 4:
        net[0] = nn.Conv2d(3, 3, 1)
    net = net.double()
    _with_statistics(net[1])
    net.train(train)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain, lean = _derivatives(net, x, False), _derivatives(net, x, True)
    for a, b in zip(plain, lean, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_the_product_runs_no_batch_norm_double_backward():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten()).double().eval()
    _with_statistics(net[1])
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    params = list(net.parameters())
    ops, full = {}, {}
    for rewrite in (False, True):
        with lean_graph() if rewrite else contextlib.nullcontext():
            grads = torch.autograd.grad(net(x).tanh().sum(), params, create_graph=True)
        with OpRecorder() as mode:
            torch.autograd.grad(grads, params, [torch.ones_like(g) for g in grads])
        ops[rewrite] = mode.names
        full[rewrite] = mode.shapes().count((4, 3, 4, 4))  # tensors the activations' size
    assert any("batch_norm" in name for name in ops[False])
    assert not any("batch_norm" in name for name in ops[True])
    assert full[True] < full[False]


def test_a_large_mean_does_not_cancel_the_weight_gradient():
    """float32 with running_mean 1e4 times the spread: as accurate as PyTorch's formula."""
    gen = torch.Generator().manual_seed(7)
    x64 = 1e4 + torch.randn(256, 4, generator=gen, dtype=torch.float64)
    g64 = torch.randn(256, 4, generator=gen, dtype=torch.float64)
    mean = torch.full((4,), 1e4, dtype=torch.float64) + 0.1
    var = torch.full((4,), 1.5, dtype=torch.float64)

    def weight_gradient(dtype: torch.dtype, rewrite: bool) -> torch.Tensor:
        w = torch.ones(4, dtype=dtype, requires_grad=True)
        args = (x64.to(dtype), mean.to(dtype), var.to(dtype), w, torch.zeros(4, dtype=dtype))
        with lean_graph() if rewrite else contextlib.nullcontext():
            out = torch.nn.functional.batch_norm(*args)
        return torch.autograd.grad(out, w, g64.to(dtype))[0].double()

    exact = weight_gradient(torch.float64, False)
    plain = (weight_gradient(torch.float32, False) - exact).norm() / exact.norm()
    lean = (weight_gradient(torch.float32, True) - exact).norm() / exact.norm()
    assert lean < max(10 * plain, 1e-6)


@pytest.mark.parametrize(
    "case", ["bfloat16", "float32 statistics in a bfloat16 model", "wrong length", "stats grad"]
)
def test_calls_pytorch_normalises_differently_or_refuses_are_left_to_it(case):
    bn = _with_statistics(nn.BatchNorm2d(3)).eval()
    x = torch.randn(2, 3, 4, 4)
    if case == "bfloat16":
        bn, x = bn.bfloat16(), x.bfloat16()
    elif case == "float32 statistics in a bfloat16 model":
        x = x.bfloat16()
        bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()
    elif case == "wrong length":
        bn = _with_statistics(nn.BatchNorm2d(1)).eval()
    else:
        bn.running_mean.requires_grad_(True)
    try:
        plain = bn(x)
    except RuntimeError as err:
        with pytest.raises(RuntimeError, match=str(err)[:30]), lean_graph():
            bn(x)
        return
    with lean_graph():
        lean = bn(x)
    assert lean.dtype == plain.dtype
    assert type(lean.grad_fn).__name__ == type(plain.grad_fn).__name__
    torch.testing.assert_close(lean, plain)
