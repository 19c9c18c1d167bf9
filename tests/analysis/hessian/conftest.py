"""Fixtures: tiny float64 problems with their dense reference Hessians."""

from __future__ import annotations

import pytest

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
