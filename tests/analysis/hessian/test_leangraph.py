"""Lean graphs end to end: operators on a model with every rewritten layer stay exact."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from analysis.hessian import InputHessian, WeightHessian
from analysis.hessian.graphcache import autograd_nodes
from analysis.hessian.leangraph import lean_graph
from tests.analysis.hessian.reference import dense_weight_hessian
from trainables.models import build_model, model_names

CE = nn.CrossEntropyLoss()


def _model() -> nn.Module:
    """RGB input (the fold path of the input gradient), BatchNorm, ReLU and max-pooling."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).double()
    bn = model[1]
    gen = torch.Generator().manual_seed(5)
    bn.running_mean.copy_(torch.randn(4, generator=gen, dtype=torch.float64) * 0.1)
    bn.running_var.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
    return model.eval()


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


def test_weight_hessian_matches_the_dense_one():
    model = _model()
    x, y = _data(12)
    dense = dense_weight_hessian(model, x, y)
    op = WeightHessian(model, CE, [(x[:5], y[:5]), (x[5:], y[5:])])
    eye = torch.eye(op.size, dtype=torch.float64)
    columns = torch.stack([op.matvec(e) for e in eye], dim=1)
    torch.testing.assert_close(columns, dense, rtol=1e-10, atol=1e-12)


def test_input_hessians_match_the_dense_ones():
    model = _model()
    x, y = _data(6)
    op = InputHessian(model, CE, x, y)
    d = x[0].numel()
    eye = torch.eye(d, dtype=torch.float64)
    rows = torch.arange(len(x))
    columns = torch.stack([op.matvec(e.expand(len(x), d), rows) for e in eye], dim=2)
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        dense = torch.func.hessian(lambda z, yi=yi: CE(model(z[None]), yi[None]))(xi)
        torch.testing.assert_close(columns[i], dense.reshape(d, d), rtol=1e-10, atol=1e-12)


def test_autocast_and_torch_func_transforms_are_left_to_pytorch():
    net = _model().float()
    x = torch.randn(3, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = net(x)
        with lean_graph():
            assert net(x).dtype == plain.dtype == torch.bfloat16
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(net, p, (xi[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
    expected = per_sample(params, x)
    with lean_graph():
        got = per_sample(params, x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_forward_mode_ad_is_left_to_pytorch():
    from torch.autograd import forward_ad

    net = _model()
    x, _ = _data(2)
    tangents = {}
    for rewrite in (False, True):
        with forward_ad.dual_level():
            z = forward_ad.make_dual(x, torch.ones_like(x))
            with lean_graph() if rewrite else contextlib.nullcontext():
                tangents[rewrite] = forward_ad.unpack_dual(net(z)).tangent
    torch.testing.assert_close(tangents[True], tangents[False])


def test_input_hessian_of_a_torchscript_model():
    plain = _model()
    model = torch.jit.script(plain)
    x, y = _data(3)
    v = torch.randn(3, x[0].numel(), dtype=torch.float64)
    hv = InputHessian(model, CE, x, y).matvec(v, torch.arange(3))
    for i in range(3):
        dense = torch.func.hessian(lambda z, i=i: CE(plain(z[None]), y[i : i + 1]))(x[i])
        d = x[i].numel()
        torch.testing.assert_close(hv[i], dense.reshape(d, d) @ v[i], rtol=1e-10, atol=1e-12)


def test_small_calls_are_left_to_pytorch(monkeypatch):
    from analysis.hessian import leangraph

    monkeypatch.setattr(leangraph, "MIN_ELEMENTS", 100)
    small = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)  # 96 elements
    large = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)  # 144
    with lean_graph():
        assert type(torch.relu(small).grad_fn).__name__ == "ReluBackward0"
        assert type(torch.relu(large).grad_fn).__name__ == "_ReLUBackward"


def test_the_size_bar_depends_on_the_device(monkeypatch):
    from analysis.hessian import leangraph

    monkeypatch.setattr(leangraph, "MIN_ELEMENTS", 10)
    monkeypatch.setattr(leangraph, "MIN_ELEMENTS_GPU", 1000)
    assert leangraph.min_elements(torch.device("cpu")) == 10
    assert leangraph.min_elements(torch.device("cuda", 0)) == 1000
    assert leangraph.min_elements(torch.device("mps")) == 1000
    asked = []
    monkeypatch.setattr(leangraph, "min_elements", lambda device: asked.append(device) or 10)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    with lean_graph():
        assert type(torch.relu(x).grad_fn).__name__ == "_ReLUBackward"
    assert asked == [x.device]  # the bar of the call's own device


def _node_names(tensor: torch.Tensor) -> set[str]:
    """Class names of every node in ``tensor``'s autograd graph."""
    return {type(node).__name__ for node in autograd_nodes([tensor])}


@pytest.mark.parametrize("name", model_names())
def test_every_model_hessweep_trains_gets_the_same_products(name):
    """Weight- and input-Hessian products of the study's own models, rewrites on and off."""
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32).double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    model.train()
    model(x)  # BatchNorm running statistics that are not the defaults
    model.eval()
    params = list(model.parameters())
    consts = {k: p.detach() for k, p in model.named_parameters()}
    products, nodes = {}, set()
    for rewrite in (False, True):
        z = x.clone().requires_grad_(True)
        with lean_graph() if rewrite else contextlib.nullcontext():
            loss = CE(model(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            summed = CE(torch.func.functional_call(model, consts, (z,)), y) * len(y)
            (gz,) = torch.autograd.grad(summed, z, create_graph=True)
        if rewrite:
            nodes = _node_names(loss)
        v = [torch.linspace(-1, 1, p.numel(), dtype=torch.float64).view_as(p) for p in params]
        hv = torch.autograd.grad(grads, params, v)
        (hz,) = torch.autograd.grad(gz, z, torch.ones_like(z))
        products[rewrite] = (torch.cat([h.reshape(-1) for h in hv]), hz)
    for plain, lean in zip(products[False], products[True], strict=True):
        # float64 summation order differs between the two graphs: compare whole vectors
        assert float((lean - plain).norm() / plain.norm()) < 1e-12
    assert "_ReLUBackward" in nodes  # every model of the study uses ReLU
    assert "NativeBatchNormBackward0" not in nodes
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        assert "_ConvolutionBackward" in nodes
