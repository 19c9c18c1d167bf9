"""Frozen result types: every number a solver returns travels with how it was obtained."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator, sorted descending, with their quality.

    ``residuals[i]`` is the true norm ``||A x_i - lambda_i x_i||`` (unit ``x_i``), measured
    after the solver stopped (Lanczos forms ``A x_i`` from the products it kept, power
    iteration with one more product); ``converged`` is whether every pair met the
    stopping rule. Eigenvalues and residuals are float64 on the CPU; eigenvectors stay on
    the operator's device, in its dtype.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: bool
    n_matvecs: int
    n_iterations: int
    # Lanczos with ``min_iter`` only: (alpha, beta, invariant) of the recurrence from its
    # random start vector over the forced steps, up to a first restart (float64, CPU;
    # ``invariant``: a restart ended it early). Its leading s x s block is the s-step Gauss
    # quadrature rule of that start vector, which ``slq_density(reuse=...)`` takes.
    krylov: tuple[torch.Tensor, torch.Tensor, bool] | None = field(
        default=None, compare=False, repr=False
    )

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue found (the first one; with ``which="smallest"`` the largest
        of the bottom k, not the operator's)."""
        return float(self.eigenvalues[0])

    @property
    def lambda_min(self) -> float:
        """The smallest eigenvalue found (the last one; the operator's smallest only with
        ``which="smallest"``)."""
        return float(self.eigenvalues[-1])


@dataclass(frozen=True)
class TraceResult:
    """A Hutchinson trace estimate with its standard error (``n_deflated`` eigenpairs were
    taken exactly and only the rest of the spectrum probed)."""

    estimate: float
    stderr: float
    n_probes: int
    n_matvecs: int
    converged: bool
    n_deflated: int = 0


@dataclass(frozen=True)
class DensityResult:
    """A spectral density from stochastic Lanczos quadrature.

    ``density`` integrates to 1 over ``grid`` (trapezoid rule). ``nodes``/``weights`` are the
    raw Gauss quadrature rules, one row per probe, so moments can be computed exactly.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    n_probes: int
    n_matvecs: int

    def moment(self, p: int) -> float:
        """Estimate of ``trace(A^p) / size`` from the quadrature rules."""
        return float((self.weights * self.nodes**p).sum(dim=1).mean())


@dataclass(frozen=True)
class BatchedEigenResult:
    """Eigenvalues of many independent operators solved together (one row each).

    ``method`` says how: ``"lanczos"`` (``n_matvecs`` products, residual estimates),
    ``"jacobian"`` (exact, from the output Jacobian: ``n_matvecs`` counts its backward
    passes, residuals are the small dense eigenproblems'), or both joined by ``+`` when
    batches went different ways.
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    n_matvecs: int
    n_iterations: int
    method: str = "lanczos"


def concat_batched(parts: list[BatchedEigenResult]) -> BatchedEigenResult:
    """The rows of ``parts`` in order, as one result on the CPU (counts added up)."""
    methods = sorted({m for p in parts for m in p.method.split("+")})
    return BatchedEigenResult(
        eigenvalues=torch.cat([p.eigenvalues.detach().cpu() for p in parts]),
        residuals=torch.cat([p.residuals.detach().cpu() for p in parts]),
        converged=torch.cat([p.converged.cpu() for p in parts]),
        n_matvecs=sum(p.n_matvecs for p in parts),
        n_iterations=max(p.n_iterations for p in parts),
        method="+".join(methods),
    )
