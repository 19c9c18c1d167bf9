"""The one-call form: the top of the weight-Hessian spectrum of a model on its data."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from analysis.hessian.lanczos import lanczos
from analysis.hessian.modelutil import LossFn
from analysis.hessian.results import EigenResult
from analysis.hessian.weight import WeightHessian


def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    top_k: int = 1,
    tol: float = 1e-6,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **operator_kwargs: object,
) -> EigenResult:
    """The ``top_k`` largest eigenvalues (and vectors) of the exact mean-loss weight Hessian."""
    op = WeightHessian(model, loss_fn, data, dtype=dtype, **operator_kwargs)
    return lanczos(op, k=top_k, tol=tol, seed=seed)
