"""Fixtures: tiny float64 problems with their dense reference Hessians."""

from __future__ import annotations

import pytest

from analysis.hessian import leangraph
from tests.analysis.hessian.reference import dense_weight_hessian, make_cnn, make_data, make_mlp


@pytest.fixture
def mlp_problem():
    model = make_mlp()
    x, y = make_data(40, (6,))
    return model, x, y, dense_weight_hessian(model, x, y)


@pytest.fixture
def cnn_problem():
    model = make_cnn()
    x, y = make_data(24, (1, 6, 6))
    return model, x, y, dense_weight_hessian(model, x, y)


@pytest.fixture(autouse=True)
def lean_graphs_on_tiny_tensors(monkeypatch):
    """The tests' tiny models get the lean-graph rewrites too (a real run skips them below
    ``leangraph.min_elements``), so every exactness test here covers them."""
    monkeypatch.setattr(leangraph, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(leangraph, "MIN_ELEMENTS_GPU", 0)
