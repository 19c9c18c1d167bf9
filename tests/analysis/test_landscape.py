"""analysis.landscape: on a quadratic loss every curve has a closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis.landscape import full_loss, landscape_1d, landscape_2d, random_direction

D, N = 6, 40


@pytest.fixture(scope="module")
def quadratic():
    """Least squares: L(w) = mean (x.w - y)^2, exactly quadratic with Hessian 2 X^T X / N."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randn(N, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, D, generator=gen, dtype=torch.float64))
    data = [(x[:13], y[:13]), (x[13:], y[13:])]  # unequal batches on purpose
    w = model.weight.detach().reshape(-1).clone()
    hess = 2 * x.T @ x / N
    grad = 2 * x.T @ (x @ w - y[:, 0]) / N
    loss0 = float(((x @ w - y[:, 0]) ** 2).mean())
    return model, data, hess, grad, loss0


def closed_form(alphas, loss0, grad, hess, v):
    """L(w + a v) = L(w) + a g.v + a^2 v^T H v / 2, exactly, for a quadratic."""
    a = np.asarray(alphas)
    return loss0 + a * float(grad @ v) + 0.5 * a**2 * float(v @ hess @ v)


def test_1d_landscape_matches_the_closed_form(quadratic):
    model, data, hess, grad, loss0 = quadratic
    before = model.weight.detach().clone()
    alphas = np.linspace(-2, 2, 9)
    land = landscape_1d(model, nn.MSELoss(), data, alphas, tol=1e-10, seed=3)
    evals, evecs = torch.linalg.eigh(hess)
    v = evecs[:, -1] * torch.sign(evecs[evecs[:, -1].abs().argmax(), -1])
    assert land.eigenvalue == pytest.approx(float(evals[-1]), rel=1e-9)
    assert land.converged
    assert land.base_loss == pytest.approx(loss0, rel=1e-12)
    np.testing.assert_allclose(land.losses, closed_form(alphas, loss0, grad, hess, v), rtol=1e-8)
    r = random_direction(D, 1.0, 4)
    np.testing.assert_allclose(
        land.random_losses, closed_form(alphas, loss0, grad, hess, r), rtol=1e-10
    )
    assert torch.equal(model.weight, before)
    assert model.training


def test_the_eigen_direction_curves_at_least_as_much_as_the_random_one(quadratic):
    model, data, *_ = quadratic
    alphas = np.linspace(-1, 1, 5)
    land = landscape_1d(model, nn.MSELoss(), data, alphas, tol=1e-10)
    second = land.losses[0] + land.losses[-1] - 2 * land.losses[2]
    second_random = land.random_losses[0] + land.random_losses[-1] - 2 * land.random_losses[2]
    assert second >= second_random


def test_2d_landscape_matches_the_closed_form(quadratic):
    model, data, hess, grad, loss0 = quadratic
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    land = landscape_2d(model, nn.MSELoss(), data, alphas, betas, tol=1e-10)
    evals = torch.linalg.eigvalsh(hess)
    assert land.eigenvalues == pytest.approx((float(evals[-1]), float(evals[-2])), rel=1e-9)
    l1, l2 = land.eigenvalues
    # Along eigenvectors the Hessian is diagonal: no cross term in a*b.
    expected = np.empty((5, 3))
    evecs = torch.linalg.eigh(hess).eigenvectors
    v1, v2 = evecs[:, -1], evecs[:, -2]
    v1 = v1 * torch.sign(v1[v1.abs().argmax()])
    v2 = v2 * torch.sign(v2[v2.abs().argmax()])
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            expected[i, j] = (
                loss0 + a * float(grad @ v1) + b * float(grad @ v2) + 0.5 * (l1 * a**2 + l2 * b**2)
            )
    np.testing.assert_allclose(land.losses, expected, rtol=1e-8)


def test_the_full_loss_of_a_class_weighted_mean_is_the_whole_datas():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    y[::4] = -100
    model = nn.Linear(4, 3).double()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    with torch.no_grad():
        whole = float(loss_fn(model(x), y))
    assert full_loss(loss_fn, batches)(model) == pytest.approx(whole, rel=1e-12)


def test_given_direction_and_loss_function_are_used_as_is(quadratic):
    model, data, hess, grad, loss0 = quadratic
    calls = []
    exact = full_loss(nn.MSELoss(), data)

    def loss_at(m: nn.Module) -> float:
        calls.append(m)
        return exact(m)

    v = torch.zeros(D, dtype=torch.float64)
    v[0] = 2.0
    land = landscape_1d(model, direction=v, alphas=[0.0, 1.0], random=False, loss_at=loss_at)
    assert land.random_losses is None and np.isnan(land.eigenvalue)
    np.testing.assert_allclose(land.losses, closed_form([0.0, 1.0], loss0, grad, hess, v))
    assert all(m is not model for m in calls[:-1]) and calls[-1] is model


def test_missing_loss_or_bad_direction_is_a_clear_error(quadratic):
    model, data, *_ = quadratic
    with pytest.raises(ValueError, match="loss_at"):
        landscape_1d(model)
    with pytest.raises(ValueError, match="flat vector"):
        landscape_1d(model, nn.MSELoss(), data, direction=torch.ones(D + 1))
