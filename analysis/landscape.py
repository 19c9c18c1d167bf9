"""The loss along directions through trained weights: the paper's 1-D plot and a 2-D grid.

``f(a) = L(theta + a v)`` is the mean loss over *every* training sample in eval mode, for
``v`` the top eigenvector of the exact weight Hessian (unit norm) and, for contrast, a
seeded random direction of the same norm. Points are evaluated on a private copy of the
model, so the caller's model is never changed. The eigenvector comes from any operator
with ``.matvec`` (pass ``operator=pool.weight_hessian(model)`` to solve on a Hessian actor
pool); the loss comes from ``loss_at(model) -> float``, by default computed here on the
given data (the actor pool has no loss method, so losses are evaluated in this process
unless the caller supplies one).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from analysis.hessian import LinearOperator, WeightHessian, lanczos
from analysis.hessian.modelutil import (
    LossFn,
    cast_batch,
    eval_mode,
    mean_loss,
    select_params,
    summed_terms,
    weight_total,
)

LossAt = Callable[[nn.Module], float]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
DEFAULT_ALPHAS = tuple(np.linspace(-1.0, 1.0, 41))


@dataclass(frozen=True)
class Landscape1D:
    """Loss at ``theta + a v`` for each ``a`` in ``alphas`` (v: top eigenvector, unit norm).

    ``random_losses`` are along a seeded random direction of the same norm (None when not
    asked for); ``eigenvalue`` and ``converged`` say how ``v`` was obtained.
    """

    alphas: np.ndarray
    losses: np.ndarray
    random_losses: np.ndarray | None
    eigenvalue: float
    converged: bool
    base_loss: float


@dataclass(frozen=True)
class Landscape2D:
    """Loss at ``theta + a v1 + b v2`` on the grid ``alphas x betas`` (top two eigenvectors).

    ``losses[i, j]`` is the loss at ``(alphas[i], betas[j])``.
    """

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray
    eigenvalues: tuple[float, float]
    converged: bool


def full_loss(loss_fn: LossFn, data: Batches) -> LossAt:
    """``loss_at(model)``: the mean loss over every sample of ``data`` (read once), eval mode.

    Batches of unequal size are weighted by ``n_batch / N`` (a class-weighted or
    ``ignore_index`` mean by its targets' weights), so the result is the exact mean
    whatever the batching.
    """
    batches = list(data)
    total = sum(int(x.shape[0]) for x, _ in batches)
    if total == 0:
        raise ValueError("data is empty: the mean training loss needs at least one sample")
    weights = weight_total(loss_fn, (y for _, y in batches))  # a class-weighted mean's

    def loss_at(model: nn.Module) -> float:
        first = next(model.parameters())
        acc = 0.0
        with eval_mode(model), torch.no_grad():
            for x, y in batches:
                x, y = cast_batch(x, y, first.dtype, first.device)
                if weights is not None:
                    acc += float(summed_terms(loss_fn, model(x), y))
                else:
                    acc += float(mean_loss(loss_fn, model(x), y)) * int(x.shape[0])
        return acc / (total if weights is None else weights)

    return loss_at


def top_eigenvectors(
    model: nn.Module,
    k: int,
    loss_fn: LossFn | None = None,
    data: Batches | None = None,
    *,
    operator: LinearOperator | None = None,
    tol: float = 1e-3,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The ``k`` top weight-Hessian eigenpairs ``(values, unit vectors [k, size], converged)``.

    Signs are fixed (largest-magnitude entry positive) so a seed gives the same plot.
    """
    if operator is None:
        if loss_fn is None or data is None:
            raise ValueError("give loss_fn and data, or an operator, to find the eigenvectors")
        operator = WeightHessian(model, loss_fn, data, dtype=dtype)
    res = lanczos(operator, k=k, tol=tol, seed=seed)
    vecs = res.eigenvectors.detach().double().cpu()
    vecs = vecs / vecs.norm(dim=1, keepdim=True)
    pivot = vecs.abs().argmax(dim=1)
    signs = torch.sign(vecs.gather(1, pivot[:, None]))
    return res.eigenvalues.double().cpu(), vecs * signs, res.converged


def random_direction(size: int, norm: float, seed: int) -> torch.Tensor:
    """A Gaussian direction of the given norm, from its own seeded generator (float64, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(size, generator=gen, dtype=torch.float64)
    return v * (norm / v.norm())


def losses_at(
    model: nn.Module,
    directions: Sequence[torch.Tensor],
    coords: np.ndarray,
    loss_at: LossAt,
) -> np.ndarray:
    """``loss_at`` of ``theta + sum_i coords[p, i] * directions[i]`` for each row ``p``.

    Directions are flat over the model's trainable parameters, in ``named_parameters``
    order (the order ``WeightHessian`` uses). Only a private copy is perturbed.
    """
    names = select_params(model, None)
    work = copy.deepcopy(model)
    named = dict(work.named_parameters())
    params = [named[n] for n in names]
    base = [p.detach().clone() for p in params]
    size = sum(p.numel() for p in params)
    dirs = []
    for d in directions:
        if d.dim() != 1 or d.numel() != size:
            raise ValueError(
                f"a direction must be a flat vector of the {size} trainable weights, "
                f"got shape {tuple(d.shape)}"
            )
        dirs.append(d.detach().double().cpu())
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    out = np.empty(len(coords))
    for row, point in enumerate(coords):
        offset = sum(float(c) * d for c, d in zip(point, dirs, strict=True))
        parts = offset.split([p.numel() for p in params])
        with torch.no_grad():
            for p, b, part in zip(params, base, parts, strict=True):
                p.copy_(b + part.view_as(b).to(device=b.device, dtype=b.dtype))
        out[row] = loss_at(work)
    return out


def landscape_1d(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    data: Batches | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    direction: torch.Tensor | None = None,
    random: bool = True,
    seed: int = 0,
    tol: float = 1e-3,
    dtype: torch.dtype | None = None,
    operator: LinearOperator | None = None,
    loss_at: LossAt | None = None,
) -> Landscape1D:
    """Loss along the top Hessian eigenvector (or ``direction``) and a random direction.

    Without ``direction`` the top eigenvector is found by Lanczos (``tol``, ``seed``) on
    ``operator`` or on the exact ``WeightHessian`` of ``loss_fn`` over ``data``. Losses
    come from ``loss_at`` or, by default, the exact mean loss over ``data``.
    """
    data = list(data) if data is not None else None
    if loss_at is None:
        if loss_fn is None or data is None:
            raise ValueError("give loss_fn and data, or loss_at, to evaluate the loss")
        loss_at = full_loss(loss_fn, data)
    if direction is None:
        values, vecs, converged = top_eigenvectors(
            model, 1, loss_fn, data, operator=operator, tol=tol, seed=seed, dtype=dtype
        )
        v, eigenvalue = vecs[0], float(values[0])
    else:
        v, eigenvalue, converged = direction.detach().double().cpu(), float("nan"), True
    grid = np.asarray(alphas, dtype=np.float64)
    losses = losses_at(model, [v], grid[:, None], loss_at)
    rand = None
    if random:
        r = random_direction(v.numel(), float(v.norm()), seed + 1)
        rand = losses_at(model, [r], grid[:, None], loss_at)
    return Landscape1D(
        alphas=grid,
        losses=losses,
        random_losses=rand,
        eigenvalue=eigenvalue,
        converged=converged,
        base_loss=loss_at(model),
    )


def landscape_2d(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    data: Batches | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] | None = None,
    *,
    seed: int = 0,
    tol: float = 1e-3,
    dtype: torch.dtype | None = None,
    operator: LinearOperator | None = None,
    loss_at: LossAt | None = None,
) -> Landscape2D:
    """Loss on a grid spanned by the top two Hessian eigenvectors (``betas`` defaults to
    ``alphas``); eigenvectors and losses are obtained as in ``landscape_1d``."""
    data = list(data) if data is not None else None
    if loss_at is None:
        if loss_fn is None or data is None:
            raise ValueError("give loss_fn and data, or loss_at, to evaluate the loss")
        loss_at = full_loss(loss_fn, data)
    values, vecs, converged = top_eigenvectors(
        model, 2, loss_fn, data, operator=operator, tol=tol, seed=seed, dtype=dtype
    )
    a = np.asarray(alphas, dtype=np.float64)
    b = np.asarray(alphas if betas is None else betas, dtype=np.float64)
    coords = np.stack(np.meshgrid(a, b, indexing="ij"), axis=-1).reshape(-1, 2)
    losses = losses_at(model, [vecs[0], vecs[1]], coords, loss_at).reshape(len(a), len(b))
    return Landscape2D(
        alphas=a,
        betas=b,
        losses=losses,
        eigenvalues=(float(values[0]), float(values[1])),
        converged=converged,
    )


__all__ = [
    "DEFAULT_ALPHAS",
    "Landscape1D",
    "Landscape2D",
    "full_loss",
    "landscape_1d",
    "landscape_2d",
    "losses_at",
    "random_direction",
    "top_eigenvectors",
]
