"""Spectral density by stochastic Lanczos quadrature (SLQ) with Gaussian broadening."""

from __future__ import annotations

import math

import torch

from analysis.hessian.krylov import KrylovBasis
from analysis.hessian.lanczos import krylov_dtype, lanczos_step, random_unit_rows, tridiagonal
from analysis.hessian.protocol import LinearOperator, SingleAsBatch, check_operator, operator_device
from analysis.hessian.results import DensityResult, EigenResult


def _quadrature(
    op: LinearOperator, steps: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gauss quadrature nodes and weights of one random probe (``steps`` Lanczos steps)."""
    bop = SingleAsBatch(op)
    bop.device = operator_device(op)
    d = bop.size
    rows = torch.zeros(1, dtype=torch.long)
    work = krylov_dtype(torch.device(bop.device))
    basis = KrylovBasis(1, d, work, torch.device(bop.device))
    basis.append(random_unit_rows(gen, 1, d, work, bop.device))
    alpha = torch.zeros(1, steps, dtype=torch.float64)
    beta = torch.zeros(1, steps, dtype=torch.float64)
    m = steps
    for j in range(steps):
        w, bnorm, _ = lanczos_step(bop, rows, basis, alpha, beta, j)
        scale = alpha[:, : j + 1].abs().max() + beta[:, :j].abs().sum()
        if j + 1 == steps or float(bnorm[0]) <= 1e3 * torch.finfo(op.dtype).eps * float(scale):
            m = j + 1
            break
        beta[:, j] = bnorm.double().cpu()
        basis.append(w / bnorm[:, None])
    return _gauss_rule(alpha[0, :m], beta[0, : m - 1])


def _gauss_rule(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Nodes, weights and size of the Gauss quadrature rule of a Lanczos tridiagonal (the
    weights are the squared first components of its eigenvectors)."""
    theta, vecs = torch.linalg.eigh(tridiagonal(alpha[None], beta[None]))
    return theta[0], vecs[0, 0, :].square(), len(alpha)


def _reused_rule(
    op: LinearOperator, reuse: EigenResult | None, steps: int
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The quadrature rule of a finished Lanczos run, or None when it cannot serve: no
    recorded run (``min_iter`` unset), another operator's, or fewer than ``steps`` forced
    steps that did not end in an invariant subspace (where the rule is already exact)."""
    if reuse is None or reuse.krylov is None:
        return None
    vectors = reuse.eigenvectors
    if vectors is None or vectors.shape[-1] != int(op.size):
        raise ValueError(
            f"reuse: a lanczos result of an operator of size {op.size} is needed, got "
            f"eigenvectors of shape {None if vectors is None else tuple(vectors.shape)}"
        )
    alpha, beta, invariant = reuse.krylov
    n = len(alpha)
    if n < steps and not invariant:
        return None
    m = min(n, steps)
    return _gauss_rule(alpha[:m], beta[: m - 1])


def slq_density(
    op: LinearOperator,
    n_probes: int = 10,
    steps: int = 80,
    sigma: float | None = None,
    grid_size: int = 1000,
    seed: int = 0,
    reuse: EigenResult | None = None,
) -> DensityResult:
    """The eigenvalue density of a symmetric operator, smoothed by Gaussians of width ``sigma``.

    Each probe contributes a ``steps``-point Gauss quadrature rule; the result averages the
    probes. ``sigma`` defaults to 1% of the spectral range found. The density integrates
    to 1 over the returned grid, which spans the nodes plus 5 sigma on each side.

    ``reuse`` (a ``lanczos`` result of this operator that ran at least ``steps`` steps, see
    its ``min_iter``) is taken as the first probe without a product: a Lanczos run from a
    random unit vector is exactly that probe's quadrature rule. ``n_matvecs`` counts only
    the new products.
    """
    check_operator(op)
    if n_probes < 1 or steps < 1 or grid_size < 2:
        raise ValueError(
            f"need n_probes >= 1, steps >= 1 and grid_size >= 2; got {n_probes}, {steps}, "
            f"{grid_size}"
        )
    steps = min(steps, int(op.size))
    gen = torch.Generator().manual_seed(seed)
    nodes = torch.full((n_probes, steps), float("nan"), dtype=torch.float64)
    weights = torch.zeros(n_probes, steps, dtype=torch.float64)
    n_matvecs = 0
    reused = _reused_rule(op, reuse, steps)
    if reused is not None:
        # the reused run started from its seed's first draw: with the same seed here, the
        # second probe would repeat it, so that draw is skipped
        random_unit_rows(gen, 1, int(op.size), torch.float64, torch.device("cpu"))
    for p in range(n_probes):
        if p == 0 and reused is not None:
            theta, w, m = reused
        else:
            theta, w, m = _quadrature(op, steps, gen)
            n_matvecs += m
        nodes[p, :m], weights[p, :m] = theta, w
    finite = nodes[~nodes.isnan()]
    lo, hi = float(finite.min()), float(finite.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 1e-3
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64)
    nodes_filled = torch.nan_to_num(nodes, nan=0.0)
    z = (grid[None, None, :] - nodes_filled[:, :, None]) / sigma
    kernel = torch.exp(-0.5 * z.square()) / (sigma * math.sqrt(2 * math.pi))
    density = (weights[:, :, None] * kernel).sum(dim=(0, 1)) / n_probes
    density = density / torch.trapezoid(density, grid)
    return DensityResult(
        grid=grid,
        density=density,
        nodes=nodes_filled,
        weights=weights,
        sigma=float(sigma),
        n_probes=n_probes,
        n_matvecs=n_matvecs,
    )
