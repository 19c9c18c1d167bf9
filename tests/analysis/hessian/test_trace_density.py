"""Hutchinson trace and SLQ density against dense references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis.hessian import (
    ConvergenceWarning,
    WeightHessian,
    hutchinson_trace,
    lanczos,
    power_iteration,
    slq_density,
)
from tests.analysis.hessian.reference import DenseOperator, matrix_with_spectrum

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trace_within_its_stated_error(mlp_problem, seed):
    model, x, y, dense = mlp_problem
    exact = float(torch.trace(dense))
    res = hutchinson_trace(WeightHessian(model, CE, [(x, y)]), rtol=0.1, seed=seed)
    assert res.converged
    assert res.stderr <= 0.1 * abs(res.estimate)
    assert abs(res.estimate - exact) <= 4 * res.stderr
    assert res.n_matvecs == res.n_probes >= 10


def test_trace_reproduces_with_seed_and_reports_budget_exhaustion():
    op = DenseOperator(matrix_with_spectrum(torch.linspace(-3, 5, 80)))
    a, b = hutchinson_trace(op, rtol=0.5, seed=4), hutchinson_trace(op, rtol=0.5, seed=4)
    assert a == b
    with pytest.warns(ConvergenceWarning, match="max_probes=12"):
        res = hutchinson_trace(op, rtol=1e-6, min_probes=10, max_probes=12)
    assert not res.converged and res.n_probes == 12


def test_deflated_trace_is_exact_when_the_deflated_pairs_are_the_whole_spectrum():
    op = DenseOperator(matrix_with_spectrum(torch.tensor([5.0, 4.0, 3.0] + [0.0] * 57)))
    top = lanczos(op, k=3, tol=1e-10)
    res = hutchinson_trace(op, rtol=1e-6, seed=1, deflate=top)
    assert res.converged and res.n_probes == 10 and res.n_deflated == 3
    assert res.estimate == pytest.approx(12.0, abs=1e-8) and res.stderr < 1e-8


@pytest.mark.filterwarnings("ignore::analysis.hessian.lanczos.ConvergenceWarning")  # rtol=0
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deflating_outliers_keeps_the_estimate_honest_and_cuts_its_error(seed):
    gen = torch.Generator().manual_seed(seed)
    bulk = torch.rand(97, generator=gen, dtype=torch.float64) * 2 - 1
    spectrum = torch.cat([torch.tensor([50.0, 30.0, 20.0], dtype=torch.float64), bulk])
    op = DenseOperator(matrix_with_spectrum(spectrum, seed=seed))
    exact = float(spectrum.sum())
    top = lanczos(op, k=3, tol=1e-8)
    plain = hutchinson_trace(op, min_probes=40, max_probes=40, rtol=0, seed=seed)
    deflated = hutchinson_trace(op, min_probes=40, max_probes=40, rtol=0, seed=seed, deflate=top)
    assert abs(deflated.estimate - exact) <= 4 * deflated.stderr
    assert abs(plain.estimate - exact) <= 4 * plain.stderr
    assert deflated.stderr < plain.stderr / 5


@pytest.mark.filterwarnings("ignore::analysis.hessian.lanczos.ConvergenceWarning")
def test_an_unconverged_power_iteration_still_deflates_without_bias():
    spectrum = torch.cat([torch.tensor([40.0, 39.0, 25.0]), torch.linspace(-1, 1, 97)])
    op = DenseOperator(matrix_with_spectrum(spectrum.double(), seed=5))
    rough = power_iteration(op, k=2, max_iter=3)  # far from converged
    assert not rough.converged
    v = rough.eigenvectors
    rayleigh = torch.einsum("kn,nm,km->k", v, op.matrix, v)
    # the estimator's bias is sum(lambda_i - v_i^T A v_i): zero when each value is its
    # vector's Rayleigh quotient
    assert torch.allclose(rough.eigenvalues, rayleigh, rtol=0, atol=1e-10)


def test_deflated_trace_of_a_weight_hessian_within_its_stated_error(mlp_problem):
    model, x, y, dense = mlp_problem
    op = WeightHessian(model, CE, [(x, y)])
    res = hutchinson_trace(op, rtol=0.05, seed=3, deflate=lanczos(op, k=2, tol=1e-8))
    assert res.converged and res.n_deflated == 2
    assert abs(res.estimate - float(torch.trace(dense))) <= 4 * res.stderr


def test_deflation_that_does_not_fit_is_refused_and_a_full_one_is_exact():
    op = DenseOperator(matrix_with_spectrum(torch.linspace(1, 2, 10)))
    other = lanczos(DenseOperator(matrix_with_spectrum(torch.linspace(1, 2, 12))), k=2)
    with pytest.raises(ValueError, match="deflate: eigenvectors must be 2 x 10"):
        hutchinson_trace(op, deflate=other)
    every = lanczos(op, k=10, tol=1e-10)
    calls = op.calls
    res = hutchinson_trace(op, deflate=every)  # the whole spectrum: exact, no product
    assert res.estimate == pytest.approx(15.0, rel=1e-12) and op.calls == calls
    assert res.converged and res.n_probes == 0 and res.stderr == 0.0


def test_a_lanczos_run_is_reused_as_the_same_quadrature_probe():
    op = DenseOperator(matrix_with_spectrum(torch.linspace(-2, 6, 120), seed=3))
    fresh = slq_density(op, n_probes=1, steps=30, seed=7)
    top = lanczos(op, k=2, tol=1e-3, seed=7, min_iter=30)  # same start vector as seed 7
    assert top.n_iterations >= 30
    calls = op.calls
    reused = slq_density(op, n_probes=1, steps=30, seed=99, reuse=top)
    assert op.calls == calls and reused.n_matvecs == 0
    torch.testing.assert_close(reused.nodes, fresh.nodes, rtol=0, atol=1e-10)
    torch.testing.assert_close(reused.weights, fresh.weights, rtol=0, atol=1e-10)
    more = slq_density(op, n_probes=3, steps=30, seed=99, reuse=top)
    assert more.n_matvecs == 60  # the two further probes only
    short = lanczos(op, k=2, tol=1e-3, seed=7)  # stopped before 50 steps: not reusable
    assert short.n_iterations < 50
    assert slq_density(op, n_probes=1, steps=50, seed=7, reuse=short).n_matvecs == 50
    # only forced steps count: how far a run goes on its own depends on its start vector
    unforced = lanczos(op, k=2, tol=1e-9, seed=7, min_iter=10)
    assert unforced.n_iterations >= 30
    assert slq_density(op, n_probes=1, steps=30, seed=7, reuse=unforced).n_matvecs == 30
    with pytest.raises(ValueError, match="reuse: a lanczos result of an operator of size"):
        other = DenseOperator(matrix_with_spectrum(torch.linspace(1, 2, 40)))
        slq_density(op, steps=30, reuse=lanczos(other, k=1, min_iter=30))


def test_a_reused_run_is_not_repeated_by_the_next_probe_of_the_same_seed():
    op = DenseOperator(matrix_with_spectrum(torch.linspace(-2, 6, 120), seed=3))
    top = lanczos(op, k=2, tol=1e-3, seed=7, min_iter=30)
    res = slq_density(op, n_probes=3, steps=30, seed=7, reuse=top)
    # three different probes: no two quadrature rules alike
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (res.nodes[a] - res.nodes[b]).abs().max() > 1e-3


def test_a_step_floor_at_the_whole_budget_is_dropped_not_turned_into_a_failure():
    spectrum = torch.cat([torch.full((5,), 2.0), torch.linspace(-1, 1, 115)])
    op = DenseOperator(matrix_with_spectrum(spectrum.double(), seed=2))
    free = lanczos(op, k=3, max_iter=60, tol=1e-3, seed=1)
    floored = lanczos(op, k=3, max_iter=60, tol=1e-3, seed=1, min_iter=60)
    assert free.converged and floored.converged
    assert floored.n_iterations == free.n_iterations < 60


def test_density_integrates_to_one_and_matches_moments():
    values = torch.cat([torch.linspace(-1, 1, 150), torch.tensor([8.0, 9.0])])
    op = DenseOperator(matrix_with_spectrum(values, seed=3))
    res = slq_density(op, n_probes=30, steps=40, seed=0)
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1) < 1e-9
    assert torch.all(res.density >= 0)
    for p in (1, 2, 3):
        exact = float((values.double() ** p).mean())
        per_probe = (res.weights * res.nodes**p).sum(dim=1)
        stderr = float(per_probe.std() / len(per_probe) ** 0.5)
        assert abs(res.moment(p) - exact) <= 4 * stderr + 1e-12
    # Broadened density: most mass in the bulk [-1, 1], a small bump near the outliers.
    bulk = res.grid.abs() <= 1.2
    assert float(torch.trapezoid(res.density * bulk, res.grid)) > 0.95
    assert float(res.density[(res.grid - 8.5).abs() < 0.3].max()) > 0


def test_density_with_full_steps_is_exact_quadrature(mlp_problem):
    model, x, y, dense = mlp_problem
    op = WeightHessian(model, CE, [(x, y)])
    res = slq_density(op, n_probes=1, steps=op.size, seed=1)
    exact = torch.linalg.eigvalsh(dense)
    nodes = res.nodes[0][res.weights[0] > 1e-12]
    # every quadrature node of a complete run is an exact eigenvalue
    for node in nodes:
        assert float((exact - node).abs().min()) < 1e-8 * float(exact.abs().max())


def test_density_clear_errors():
    op = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_probes >= 1"):
        slq_density(op, n_probes=0)
    with pytest.raises(ValueError, match="min_probes"):
        hutchinson_trace(op, min_probes=1)
