"""Lanczos and power iteration against dense eigendecompositions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis.hessian import (
    ConvergenceWarning,
    WeightHessian,
    dense_spectrum,
    hessian_spectrum,
    lanczos,
    power_iteration,
)
from analysis.hessian.lanczos import CRITERIA, batched_lanczos, eigenvalue_error_bounds
from analysis.hessian.protocol import SingleAsBatch
from tests.analysis.hessian.reference import DenseOperator, matrix_with_spectrum

CE = nn.CrossEntropyLoss()


def lanczos_both(op: DenseOperator, k: int, **kwargs) -> torch.Tensor:
    """``which="both"`` through the batched solver (the single-operator form has no "both")."""
    batched = SingleAsBatch(op)
    batched.device = op.device
    out = batched_lanczos(batched, k, which="both", tol=1e-10, **kwargs)
    return out.eigenvalues[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_top_k_matches_dense_eigenvalues(problem, request):
    model, x, y, dense = request.getfixturevalue(problem)
    exact = torch.linalg.eigvalsh(dense).flip(0)
    res = lanczos(WeightHessian(model, CE, [(x, y)]), k=5, tol=1e-8)
    assert res.converged
    assert _rel(res.eigenvalues, exact[:5]) < 1e-6
    assert torch.all(res.eigenvalues[:-1] >= res.eigenvalues[1:])
    for lam, vec, r in zip(res.eigenvalues, res.eigenvectors, res.residuals, strict=True):
        true = (dense @ vec - lam * vec).norm()
        assert abs(float(true) - float(r)) < 1e-9
        assert float(r) <= 1e-6 * float(exact.abs().max())
    assert res.n_matvecs == res.n_iterations  # true residuals come from the kept products


def test_smallest_eigenvalues(mlp_problem):
    model, x, y, dense = mlp_problem
    exact = torch.linalg.eigvalsh(dense)
    res = lanczos(WeightHessian(model, CE, [(x, y)]), k=3, which="smallest", tol=1e-8)
    assert res.converged
    assert torch.allclose(res.eigenvalues, exact[:3].flip(0), rtol=1e-6, atol=1e-9)


def test_hessian_spectrum_one_call_form(cnn_problem):
    model, x, y, dense = cnn_problem
    res = hessian_spectrum(model, CE, [(x, y)], top_k=2, tol=1e-8, seed=3)
    assert _rel(res.eigenvalues, torch.linalg.eigvalsh(dense).flip(0)[:2]) < 1e-6


def test_dense_spectrum_equals_eigvalsh(cnn_problem):
    model, x, y, dense = cnn_problem
    spec = dense_spectrum(WeightHessian(model, CE, [(x, y)]))
    torch.testing.assert_close(spec, torch.linalg.eigvalsh(dense).flip(0), rtol=0, atol=1e-10)


def test_dense_spectrum_refuses_large_operators():
    op = DenseOperator(torch.eye(50, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"size 50, above max_size=20"):
        dense_spectrum(op, max_size=20)


def test_seed_reproduces_and_other_seeds_agree():
    op = DenseOperator(matrix_with_spectrum(torch.linspace(-1, 4, 120) ** 3))
    a = lanczos(op, k=3, tol=1e-10, seed=7)
    b = lanczos(op, k=3, tol=1e-10, seed=7)
    c = lanczos(op, k=3, tol=1e-10, seed=8)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.n_matvecs == b.n_matvecs
    torch.testing.assert_close(a.eigenvalues, c.eigenvalues, rtol=1e-9, atol=0)


def test_non_convergence_is_reported_not_hidden():
    op = DenseOperator(matrix_with_spectrum(torch.linspace(0, 1, 300)))
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = lanczos(op, k=2, tol=1e-12, max_iter=8)
    assert not res.converged
    assert float(res.residuals.max()) > 1e-12
    with pytest.warns(ConvergenceWarning):
        res = power_iteration(op, k=1, tol=1e-9, max_iter=5)
    assert not res.converged


def test_a_tolerance_below_float32_rounding_is_not_reported_as_met():
    values = torch.cat([torch.tensor([9.0, 6.0, 4.0]), torch.linspace(-1, 1, 60)])
    op32 = DenseOperator(matrix_with_spectrum(values, seed=2).float())
    # the recurrence's estimates fall below 1e-9 while float32 products cannot
    with pytest.warns(ConvergenceWarning, match="true residuals .* do not"):
        res = lanczos(op32, k=2, tol=1e-9)
    assert not res.converged and float(res.residuals.max()) > 2e-9 * 9.0
    assert lanczos(op32, k=2, tol=1e-5).converged  # above the rounding: met
    with pytest.warns(ConvergenceWarning, match="below the unit roundoff"):
        assert not lanczos(op32, k=2, tol=1e-10, criterion="eigenvalue").converged
    assert lanczos(op32, k=2, tol=1e-7, criterion="eigenvalue").converged
    op64 = DenseOperator(op32.matrix.double())
    assert lanczos(op64, k=2, tol=1e-9).converged


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_power_iteration_is_converged_only_where_its_true_residuals_meet_the_rule(seed):
    # close eigenvalues: each deflated vector carries the earlier pairs' errors, which the
    # final rotation among the found vectors must take out before the rule is judged
    values = torch.cat([torch.tensor([9.0, 8.5, 8.0]), torch.linspace(-1, 1, 60)])
    op = DenseOperator(matrix_with_spectrum(values, seed=2))
    res = power_iteration(op, k=3, tol=1e-3, seed=seed)
    assert res.converged
    assert bool((res.residuals <= 1e-3 * res.eigenvalues.abs()).all())
    assert _rel(res.eigenvalues, values[:3].double()) < 1e-4
    true = torch.stack(
        [
            (op.matrix @ v - lam * v).norm()
            for v, lam in zip(res.eigenvectors, res.eigenvalues, strict=True)
        ]
    )
    torch.testing.assert_close(true, res.residuals, rtol=1e-6, atol=1e-12)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        rough = power_iteration(op, k=3, tol=1e-3, seed=seed, max_iter=3)
    assert not rough.converged


def test_power_iteration_says_when_its_final_pairs_miss_the_rule(monkeypatch):
    import analysis.hessian.power as power

    op = DenseOperator(matrix_with_spectrum(torch.linspace(-1, 9, 60), seed=2))
    real = power._rayleigh_ritz

    def worse(op, vecs):  # as if the rotation had raised every residual tenfold
        vals, vectors, residuals = real(op, vecs)
        return vals, vectors, residuals * 10 + 1e-2

    monkeypatch.setattr(power, "_rayleigh_ritz", worse)
    with pytest.warns(ConvergenceWarning, match="not on the final pairs' true residuals"):
        res = power_iteration(op, k=2, tol=1e-3)
    assert not res.converged


def test_both_ends_need_room_for_2k_values_and_a_budget_of_2k_steps():
    op = DenseOperator(matrix_with_spectrum(torch.linspace(-1, 1, 5)))
    lo_hi = lanczos_both(op, k=2)
    torch.testing.assert_close(
        lo_hi, torch.tensor([1.0, 0.5, -0.5, -1.0], dtype=torch.float64), rtol=0, atol=1e-9
    )
    with pytest.raises(ValueError, match="which='both' with k=3 asks for 6 eigenvalues"):
        lanczos_both(op, k=3)
    big = DenseOperator(matrix_with_spectrum(torch.linspace(-1, 1, 40)))
    with pytest.raises(ValueError, match="max_iter=5 is smaller than the 6 eigenvalues"):
        lanczos_both(big, k=3, max_iter=5)


def test_lambda_max_and_min_are_the_ends_of_what_was_found():
    op = DenseOperator(matrix_with_spectrum(torch.linspace(-3, 5, 40)))
    top, bottom = lanczos(op, k=2, tol=1e-10), lanczos(op, k=2, tol=1e-10, which="smallest")
    assert top.lambda_max == pytest.approx(5.0) and bottom.lambda_min == pytest.approx(-3.0)
    assert top.lambda_min == pytest.approx(float(torch.linspace(-3, 5, 40)[-2]))


def test_invariant_subspaces_restart_to_find_repeated_eigenvalues():
    gen = torch.Generator().manual_seed(0)
    j = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    op = DenseOperator(j.T @ j)
    exact = torch.linalg.eigvalsh(op.matrix)
    res = lanczos(op, k=3, which="smallest", tol=1e-8)
    assert res.converged
    torch.testing.assert_close(
        res.eigenvalues, torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0
    )
    top = lanczos(op, k=4, tol=1e-8)
    torch.testing.assert_close(top.eigenvalues, exact.flip(0)[:4], rtol=1e-9, atol=1e-10)


def test_full_basis_is_exact_for_tiny_operators():
    values = torch.tensor([3.0, -2.0, 1.0, 1.0], dtype=torch.float64)
    res = lanczos(DenseOperator(matrix_with_spectrum(values)), k=4, tol=1e-12)
    torch.testing.assert_close(res.eigenvalues, values.sort(descending=True).values)


def test_power_iteration_agrees_with_lanczos(mlp_problem):
    values = torch.cat([torch.tensor([9.0, 6.0, 4.0]), torch.linspace(-1, 1, 60)])
    op = DenseOperator(matrix_with_spectrum(values, seed=2))
    p = power_iteration(op, k=3, tol=1e-6, seed=1)
    lz = lanczos(op, k=3, tol=1e-10)
    assert p.converged
    torch.testing.assert_close(p.eigenvalues, lz.eigenvalues, rtol=1e-6, atol=0)
    model, x, y, dense = mlp_problem
    w = WeightHessian(model, CE, [(x, y)])
    top = torch.linalg.eigvalsh(dense)
    dominant = top[-1] if top[-1].abs() >= top[0].abs() else top[0]
    assert abs(float(power_iteration(w, k=1, tol=1e-7).eigenvalues[0] - dominant)) < 1e-6 * float(
        dominant.abs()
    )


@pytest.mark.parametrize("k", [1, 6])
def test_eigenvalue_criterion_meets_its_tolerance_with_fewer_products(k):
    # A Hessian-like spectrum: a few outliers above a dense bulk near zero.
    gen = torch.Generator().manual_seed(3)
    outliers = torch.tensor([5.0, 4.6, 4.5, 3.0, 2.2, 2.0, 1.5])
    bulk = 0.3 * torch.randn(393, generator=gen, dtype=torch.float64)
    values = torch.cat([outliers.double(), bulk])
    op = DenseOperator(matrix_with_spectrum(values, seed=4))
    exact = values.sort(descending=True).values[:k]
    for tol in (1e-4, 1e-8):
        by_value = lanczos(op, k=k, tol=tol, criterion="eigenvalue")
        by_residual = lanczos(op, k=k, tol=tol)
        assert by_value.converged
        assert _rel(by_value.eigenvalues, exact) <= tol
        assert by_value.n_matvecs < by_residual.n_matvecs


def test_cnn_hessian_eigenvalues_by_the_eigenvalue_criterion(cnn_problem):
    model, x, y, dense = cnn_problem
    exact = torch.linalg.eigvalsh(dense).flip(0)
    res = lanczos(WeightHessian(model, CE, [(x, y)]), k=4, tol=1e-6, criterion="eigenvalue")
    assert res.converged and _rel(res.eigenvalues, exact[:4]) < 1e-6


class _Diagonal:
    """A large float32 diagonal operator: exact products, so any error is the solver's."""

    def __init__(self, diag: torch.Tensor) -> None:
        self.diag, self.size, self.dtype, self.device = diag, len(diag), diag.dtype, diag.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        assert v.dtype == torch.float32, "the solver hands operators vectors in their dtype"
        return self.diag * v


def test_float32_operators_get_eigenvalues_as_accurate_as_their_products():
    gen = torch.Generator().manual_seed(0)
    bulk = 0.05 * torch.randn(200_000, generator=gen)
    diag = torch.cat([torch.tensor([1.5, 1.43, 1.41, 1.38]), bulk])
    exact = diag.double().sort(descending=True).values[:4]
    for criterion in CRITERIA:
        res = lanczos(_Diagonal(diag), k=4, tol=1e-7, criterion=criterion)
        assert res.converged and res.eigenvectors.dtype == torch.float32
        # A float32 Krylov basis stalled at 3.5e-5 here; the float64 one reaches 3e-8.
        assert _rel(res.eigenvalues, exact) < 1e-7


def test_eigenvalue_error_bounds_are_conservative_without_a_gap():
    res = torch.tensor([[0.5, 1e-3]], dtype=torch.float64)
    cols = torch.tensor([1])
    far = eigenvalue_error_bounds(torch.tensor([[1.0, 5.0]], dtype=torch.float64), res, cols)
    near = eigenvalue_error_bounds(torch.tensor([[4.6, 5.0]], dtype=torch.float64), res, cols)
    alone = eigenvalue_error_bounds(
        torch.tensor([[5.0]], dtype=torch.float64), res[:, 1:], cols[:1] * 0
    )
    torch.testing.assert_close(far, torch.tensor([[1e-6 / 3.5]], dtype=torch.float64))
    assert float(near[0, 0]) == 1e-3  # the neighbour's residual reaches it: no quadratic gain
    assert float(alone[0, 0]) == 1e-3


def _hessian_like(seed: int = 4) -> tuple[DenseOperator, torch.Tensor, torch.Tensor]:
    """A few outliers above a bulk near zero: operator, eigenvalues, eigenvectors (columns)."""
    gen = torch.Generator().manual_seed(3)
    values = torch.cat(
        [torch.tensor([5.0, 4.6, 4.5, 3.0, 2.2]).double(), 0.3 * torch.randn(295, generator=gen)]
    )
    matrix = matrix_with_spectrum(values, seed=seed)
    evals, evecs = torch.linalg.eigh(matrix)
    return DenseOperator(matrix), evals.flip(0), evecs.flip(1)


def test_a_start_near_the_top_saves_products_and_a_poor_one_still_finds_every_eigenvalue():
    op, exact, vecs = _hessian_like()
    top = vecs[:, :3] @ torch.tensor([1.0, 0.8, 0.6], dtype=torch.float64)  # in the top span
    for k, tol in ((1, 1e-8), (3, 1e-8), (3, 1e-4)):
        plain = lanczos(op, k=k, tol=tol, seed=2, criterion="eigenvalue")
        guided = lanczos(op, k=k, tol=tol, seed=2, criterion="eigenvalue", start=top)
        assert guided.converged and _rel(guided.eigenvalues, exact[:k]) <= tol
        assert guided.n_matvecs < plain.n_matvecs
    # a guess orthogonal to the top five: the random half still reaches them
    poor = vecs[:, 20]
    res = lanczos(op, k=5, tol=1e-8, seed=2, start=poor)
    assert res.converged and _rel(res.eigenvalues, exact[:5]) < 1e-8


def test_a_zero_start_is_the_random_start():
    op, _, _ = _hessian_like()
    a = lanczos(op, k=2, tol=1e-8, seed=5)
    b = lanczos(op, k=2, tol=1e-8, seed=5, start=torch.zeros(op.size, dtype=torch.float64))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.n_matvecs == b.n_matvecs


def test_a_non_finite_product_is_a_clear_error_not_a_linear_algebra_failure(mlp_problem):
    model, x, y, _ = mlp_problem
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # a diverged model: its loss is not finite
    with pytest.raises(FloatingPointError, match=r"not finite \(NaN or inf\) at Lanczos step 1"):
        lanczos(WeightHessian(model, CE, [(x, y)]), k=2)
    matrix = torch.eye(30, dtype=torch.float64)
    matrix[3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="check the loss first"):
        lanczos_both(DenseOperator(matrix), k=1)


def test_clear_errors():
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"start must be a flat vector of shape \(4,\), got \(2, 4\)"
    ):
        lanczos(op, k=1, start=torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"start must be a flat vector of shape \(4,\), got \(3,\)"
    ):
        lanczos(op, k=1, start=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="start has non-finite entries"):
        lanczos(op, k=1, start=torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="start and min_iter together"):
        lanczos(op, k=1, start=torch.ones(4, dtype=torch.float64), min_iter=3)
    with pytest.raises(ValueError, match="criterion must be one of"):
        lanczos(op, k=1, criterion="fast")
    with pytest.raises(ValueError, match="k=5 exceeds the operator size 4"):
        lanczos(op, k=5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        lanczos(op, k=0)
    with pytest.raises(ValueError, match="which must be"):
        lanczos(op, k=1, which="middle")
    with pytest.raises(TypeError, match="lacks size, dtype, matvec"):
        lanczos(object(), k=1)
    with pytest.raises(ValueError, match="between 1 and the operator size 4"):
        power_iteration(op, k=9)
