"""Gradient graphs through a backward without a derivative: an error, never silent zeros."""

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from analysis.hessian import (
    InputHessian,
    NotTwiceDifferentiableError,
    WeightHessian,
    dense_matrix,
    input_hessian_eigenvalues,
)
from analysis.hessian.graphcache import check_twice_differentiable

CE = nn.CrossEntropyLoss()


class _Square(torch.autograd.Function):
    """x * x with a backward marked once-differentiable (old style: no torch.func rules)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareWithJvp(torch.autograd.Function):
    """The same, in the torch.func style with a forward-mode rule."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * x * t


class _Squared(nn.Module):
    def __init__(self, square) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.square = square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(self.fc(x))


def _models(square):
    torch.manual_seed(0)
    model = _Squared(square).double()
    plain = _Squared(lambda z: z * z).double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    return model, plain, x, y


def test_check_passes_a_twice_differentiable_graph_and_flags_once_differentiable():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((w * w).sum() ** 2, w, create_graph=True)
    check_twice_differentiable((g,))
    (g,) = torch.autograd.grad(_Square.apply(w).sum() ** 2, w, create_graph=True)
    with pytest.raises(NotTwiceDifferentiableError, match="once_differentiable"):
        check_twice_differentiable((g,))


def test_plain_autograd_would_return_zeros_here():
    # the reason for the check: autograd skips the error node, so the product is silently 0
    model, _, x, y = _models(_Square.apply)
    params = list(model.parameters())
    grads = torch.autograd.grad(CE(model(x), y), params, create_graph=True)
    ones = [torch.ones_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, ones, allow_unused=True, materialize_grads=True)
    assert all(float(h.abs().max()) == 0.0 for h in hv)


@pytest.mark.parametrize("hvp", ["auto", "reverse"])
def test_weight_hessian_refuses_a_backward_without_derivative(hvp):
    model, _, x, y = _models(_Square.apply)
    op = WeightHessian(model, CE, [(x, y)], hvp=hvp)
    v = torch.randn(op.size, dtype=torch.float64)
    if hvp == "auto":  # kept graphs refused (warned), torch.func refused, then the error
        with (
            pytest.warns(RuntimeWarning, match="keeps no gradient graphs"),
            pytest.raises(NotTwiceDifferentiableError, match="once_differentiable"),
        ):
            op.matvec(v)
    else:
        with pytest.raises(NotTwiceDifferentiableError, match="jvp rule"):
            op.matvec(v)


def test_weight_hessian_falls_back_to_forward_mode_where_the_function_has_a_jvp():
    model, plain, x, y = _models(_SquareWithJvp.apply)
    expected = dense_matrix(WeightHessian(plain, CE, [(x, y)]))
    op = WeightHessian(model, CE, [(x, y)])
    with pytest.warns(RuntimeWarning, match="reverse-over-forward"):
        got = dense_matrix(op)
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_input_hessian_refuses_a_backward_without_derivative():
    model, _, x, y = _models(_Square.apply)
    with pytest.raises(NotTwiceDifferentiableError, match="once_differentiable"):
        input_hessian_eigenvalues(model, CE, x, y, k=1)
    op = InputHessian(model, CE, x, y)
    with pytest.raises(NotTwiceDifferentiableError):
        op.matvec(torch.randn(8, 4, dtype=torch.float64), torch.arange(8))
