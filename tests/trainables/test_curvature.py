"""`hessian_every`: lambda_max on a fixed training subset, reported with the epoch metrics."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from analysis.hessian import WeightHessian, lanczos
from trainables import ConfigError, fit, parse_config
from trainables.train import CURVATURE_KEY, CURVATURE_SAMPLES, curvature

QUICK: dict[str, Any] = {
    "dataset": "synthetic",
    "model": "mlp",
    "batch_size": 32,
    "max_epochs": 3,
    "eval_attack": {"method": "none"},
}


def test_config_accepts_a_positive_interval_or_null() -> None:
    assert parse_config({}).hessian_every is None
    assert parse_config({"hessian_every": 2}).hessian_every == 2
    assert parse_config({"hessian_every": None}).hessian_every is None
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match="hessian_every"):
            parse_config({"hessian_every": bad})


def test_every_n_epochs_reports_lambda_max_and_leaves_training_unchanged() -> None:
    plain = fit(QUICK)
    tracked = fit({**QUICK, "hessian_every": 2})
    assert [CURVATURE_KEY in h for h in tracked.history] == [False, True, False]
    assert all(CURVATURE_KEY not in h for h in plain.history)
    tracked_weights = tracked.model.state_dict()
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, tracked_weights[key])
    assert tracked.history[1][CURVATURE_KEY] > 0


def test_estimate_matches_a_tight_float64_solve_on_the_subset() -> None:
    trained = fit({**QUICK, "max_epochs": 1})
    x, y = trained.train_data.tensors()
    assert len(y) <= CURVATURE_SAMPLES  # synthetic has 256: the subset is the whole set
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    estimate = curvature(trained.model, x, y, seed=0)
    op = WeightHessian(trained.model, nn.CrossEntropyLoss(), [(x, y)], dtype=torch.float64)
    exact = lanczos(op, k=1, tol=1e-10, seed=1).lambda_max
    assert estimate == pytest.approx(exact, rel=1e-2)
    assert curvature(trained.model, x, y, seed=0) == estimate
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, before[key])


def test_only_the_first_samples_count() -> None:
    trained = fit({**QUICK, "max_epochs": 1})
    x, y = trained.train_data.tensors()
    big_x = torch.cat([x, x, x])
    big_y = torch.cat([y, torch.zeros_like(y), torch.ones_like(y)])
    head = curvature(trained.model, big_x[:CURVATURE_SAMPLES], big_y[:CURVATURE_SAMPLES], seed=0)
    assert curvature(trained.model, big_x, big_y, seed=0) == head
