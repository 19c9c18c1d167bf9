"""analyze_model: one report whether the Hessians run on a pool or in this process."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from orchestrator.hessian_pool import HessianPool
from orchestrator.spectra import (
    INPUT_BLOCK,
    HessianSettings,
    SpectrumReport,
    analyze_model,
    neg_fraction,
)
from trainables.models import build_seeded_model

SETTINGS = HessianSettings(
    top_k=3,
    tol=1e-8,
    trace_rtol=0.2,
    density_probes=2,
    density_steps=20,
    input_samples=INPUT_BLOCK + 10,
)
EXPECTED_KEYS = {
    "hessian/eig_1",
    "hessian/eig_2",
    "hessian/eig_3",
    "hessian/trace",
    "hessian/trace_stderr",
    "hessian/trace_converged",
    "hessian/n_matvecs",
    "hessian/converged",
    "input_hessian/eig_1_mean",
    "input_hessian/eig_1_median",
    "input_hessian/neg_fraction",
    "input_hessian/min_eig_mean",
    "input_hessian/converged_fraction",
}


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


@pytest.fixture(scope="module")
def problem():
    """A ReLU MLP from the model registry, 40 training and 60 test images of 4x4."""
    model = build_seeded_model("mlp", num_classes=3, in_channels=1, image_size=4, seed=0)
    return model, images(40, seed=1), images(INPUT_BLOCK + 10, seed=2)


@pytest.fixture(scope="module")
def pool(ray_session, problem):
    with HessianPool(problem[1], num_actors=2, num_cpus=0.5) as p:
        yield p


@pytest.fixture(scope="module")
def local_report(problem):
    model, train, test = problem
    return analyze_model(model, train, *test, SETTINGS)


def assert_same(a: SpectrumReport, b: SpectrumReport, rtol: float = 1e-10) -> None:
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=rtol)
    assert (a.converged, a.n_matvecs) == (b.converged, b.n_matvecs)
    assert a.trace == pytest.approx(b.trace, rel=rtol)
    assert a.trace_stderr == pytest.approx(b.trace_stderr, rel=1e-8)
    np.testing.assert_allclose(a.density_grid, b.density_grid, rtol=rtol)
    np.testing.assert_allclose(a.density, b.density, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(a.input_eig_max, b.input_eig_max, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(a.input_eig_min, b.input_eig_min, rtol=rtol, atol=1e-14)
    assert a.neg_fraction == b.neg_fraction


def test_pool_and_local_give_the_same_report(pool, problem, local_report):
    model, _, test = problem
    lines: list[str] = []
    report = analyze_model(model, pool, *test, SETTINGS, progress=lines.append)
    assert_same(report, local_report)
    assert report.converged and len(report.eigenvalues) == 3
    assert report.eigenvalues == sorted(report.eigenvalues, reverse=True)
    assert report.input_eig_max.shape == (INPUT_BLOCK + 10,)
    assert lines[0].startswith("lanczos 3/3 converged after ")
    assert any(line.startswith("input hessian: 60 samples") for line in lines)
    assert set(report.wall_times) == {"lanczos", "trace", "density", "input", "total"}
    assert all(not i for i in pool_caches(pool)), "actors forget the model afterwards"


def pool_caches(pool: HessianPool) -> list[list[str]]:
    import ray

    infos = ray.get([a.info.remote() for a in pool.actors])
    return [i["models"] + i["operators"] for i in infos]


def test_relu_input_hessians_are_psd(local_report):
    assert local_report.neg_fraction == 0.0
    assert (local_report.input_eig_max > 0).all()
    assert (local_report.input_eig_min >= -1e-6 * local_report.input_eig_max).all()


def test_metrics_have_exactly_the_contract_keys(local_report):
    metrics = local_report.metrics()
    assert set(metrics) == EXPECTED_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["hessian/eig_1"] == local_report.eigenvalues[0]
    assert metrics["hessian/converged"] == 1.0
    assert metrics["hessian/trace_converged"] == float(local_report.trace_converged)
    assert metrics["input_hessian/converged_fraction"] == 1.0
    assert metrics["input_hessian/eig_1_median"] == pytest.approx(
        float(np.median(local_report.input_eig_max))
    )


def test_parts_can_be_switched_off(problem):
    model, train, test = problem
    settings = dataclasses.replace(SETTINGS, trace=False, density=False, input_samples=0, top_k=2)
    report = analyze_model(model, TensorDataset(*train), *test, settings)
    assert report.trace is None and report.density_grid is None
    assert len(report.input_eig_max) == 0
    metrics = report.metrics()
    assert set(metrics) == (EXPECTED_KEYS - {"hessian/eig_3"})
    assert math.isnan(metrics["hessian/trace"]) and math.isnan(
        metrics["input_hessian/neg_fraction"]
    )
    assert math.isnan(metrics["hessian/trace_converged"])
    assert math.isnan(metrics["input_hessian/converged_fraction"])
    assert math.isfinite(metrics["hessian/eig_2"])


def test_long_solvers_say_how_far_they_have_got(problem, local_report, monkeypatch):
    import orchestrator.spectra as spectra

    monkeypatch.setattr(spectra, "PROGRESS_EVERY_S", 0.0)  # every product says so
    model, train, test = problem
    said: list[str] = []
    report = analyze_model(model, train, *test, SETTINGS, progress=said.append)
    assert_same(report, local_report)  # counting changes nothing
    running = [m for m in said if "matvecs so far" in m]
    lanczos_counts = [int(m.split(": ")[1].split()[0]) for m in running if m.startswith("lanczos")]
    assert lanczos_counts == list(range(1, report.n_matvecs + 1))
    assert any(m.startswith("trace: ") for m in running)
    assert any(m.startswith("density: ") for m in running)
    monkeypatch.undo()
    quiet: list[str] = []
    analyze_model(model, train, *test, SETTINGS, progress=quiet.append)
    assert not [m for m in quiet if "so far" in m]  # the default: at most every 30 s


def test_a_stop_request_ends_the_analysis_at_the_next_product(problem, monkeypatch):
    import threading

    import orchestrator.spectra as spectra

    monkeypatch.setattr(spectra, "PROGRESS_EVERY_S", 0.0)
    model, train, test = problem
    stop = threading.Event()
    said: list[str] = []

    def progress(msg: str) -> None:
        said.append(msg)
        if msg.startswith("lanczos") and "3 matvecs" in msg:
            stop.set()  # as Ctrl-C does from the driver's thread

    with pytest.raises(spectra.AnalysisCancelled, match="stopped after 3 matvecs"):
        analyze_model(model, train, *test, SETTINGS, progress=progress, stop=stop)
    assert not [m for m in said if "4 matvecs" in m or m.startswith("trace")]


def test_eigenvalue_criterion_gives_the_same_top_k_with_fewer_products(problem, local_report):
    model, train, test = problem
    settings = dataclasses.replace(
        SETTINGS, criterion="eigenvalue", trace=False, density=False, input_samples=0
    )
    report = analyze_model(model, train, *test, settings)
    assert report.converged
    np.testing.assert_allclose(report.eigenvalues, local_report.eigenvalues, rtol=1e-8)
    assert report.n_matvecs < local_report.n_matvecs


def test_report_is_immutable(local_report):
    with pytest.raises(dataclasses.FrozenInstanceError):
        local_report.trace = 0.0
    with pytest.raises(ValueError):
        local_report.input_eig_max[0] = 0.0


def test_neg_fraction_is_relative_to_the_largest_eigenvalue_of_all_samples():
    eig_max = np.array([1.0, 1.0, 1.0, 0.0, 1e-3])
    eig_min = np.array([-1e-3, -1e-7, 0.5, 0.0, -1e-4])
    assert neg_fraction(eig_max, eig_min) == 0.4  # the small-scale sample's -1e-4 counts
    # a confidently classified sample's ~1e-160 Hessian is rounding, whatever its sign
    # (seen in a sweep: eig_max -1.2e-162, eig_min -6.4e-159 was counted as negative)
    underflow = neg_fraction(np.array([25.0, -1.2e-162]), np.array([0.0, -6.4e-159]))
    assert underflow == 0.0
    assert neg_fraction(np.array([np.nan, 1.0]), np.array([0.0, -0.5])) == 0.5  # NaN: no scale
    assert math.isnan(neg_fraction(np.array([np.nan]), np.array([-1.0])))
    assert math.isnan(neg_fraction(np.zeros(0), np.zeros(0)))
    # a sample without a finite smallest eigenvalue is neither negative nor counted
    assert neg_fraction(np.array([1.0, 2.0, np.nan]), np.array([-0.5, np.nan, np.nan])) == 1.0
    assert math.isnan(neg_fraction(np.array([1.0]), np.array([np.nan])))


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="dtype"):
        HessianSettings(dtype="int64").torch_dtype()


def test_a_model_smaller_than_top_k_gets_its_exact_trace():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(12, 1, 2, 2, dtype=torch.float64), torch.randint(0, 2, (12,))
    settings = dataclasses.replace(SETTINGS, top_k=50, density=False, input_samples=0)
    report = analyze_model(model, TensorDataset(x, y), x, y, settings)
    assert len(report.eigenvalues) == 10  # every parameter
    assert report.trace == pytest.approx(sum(report.eigenvalues), rel=1e-9)
    assert report.trace_stderr == 0.0 and report.trace_converged
