"""Power iteration with deflation: the paper's (and PyHessian's) method, kept for fidelity."""

from __future__ import annotations

import warnings

import torch

from analysis.hessian.lanczos import ConvergenceWarning, random_unit_rows
from analysis.hessian.protocol import LinearOperator, check_operator, operator_device
from analysis.hessian.results import EigenResult


def _project_out(v: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor:
    for u in found:
        v = v - (u @ v) * u
    return v


def _rayleigh_ritz(
    op: LinearOperator, vecs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The found vectors' Ritz pairs (descending) and true residuals, from one product each.

    Deflation leaves each later vector with components of ``A v`` along the earlier ones
    (their errors); rotating within the found vectors removes those, so the residuals are
    what the deflated iteration measured. For k = 1 this is the Rayleigh quotient.
    """
    prods = torch.stack([op.matvec(v) for v in vecs]).double()
    basis = vecs.double()
    small = basis @ prods.T
    theta, u = torch.linalg.eigh((small + small.T) / 2)
    order = theta.argsort(descending=True)
    theta, u = theta[order], u[:, order]
    rotated = u.T @ basis
    resid = u.T @ prods - theta[:, None] * rotated
    vectors = rotated.to(vecs.dtype)
    return theta.cpu(), vectors, resid.norm(dim=1).cpu()


def power_iteration(
    op: LinearOperator, k: int = 1, tol: float = 1e-3, seed: int = 0, max_iter: int = 1000
) -> EigenResult:
    """The ``k`` eigenvalues of largest magnitude, one at a time, deflating the found ones.

    Stops when ``||A v - lambda v|| <= tol * |lambda|`` (a residual rule: a stalled
    eigenvalue estimate alone does not count as convergence). The k vectors found are then
    rotated among themselves (Rayleigh-Ritz, k more products), which takes out what each
    deflated vector carries of the earlier pairs' errors; ``converged`` also needs the rule
    to hold on those final true residuals.
    """
    check_operator(op)
    if not 1 <= k <= op.size:
        raise ValueError(f"k must be between 1 and the operator size {op.size}, got {k}")
    gen = torch.Generator().manual_seed(seed)
    device = operator_device(op)
    values, vectors = [], []
    n_matvecs, converged, iters = 0, True, 0
    for _ in range(k):
        v = _project_out(random_unit_rows(gen, 1, op.size, op.dtype, device)[0], vectors)
        v = v / v.norm()
        lam, ok = torch.zeros((), dtype=op.dtype), False
        for it in range(max_iter):
            w = _project_out(op.matvec(v), vectors)
            n_matvecs += 1
            lam = v @ w
            res = (w - lam * v).norm()
            wn = w.norm()
            if res <= tol * lam.abs() or wn == 0:
                ok = True
                break
            if it + 1 < max_iter:  # the last pass keeps v: lam is its Rayleigh quotient
                v = w / wn
        iters = max(iters, it + 1)
        converged &= ok
        values.append(lam)
        vectors.append(v)
    vals, vecs, residuals = _rayleigh_ritz(op, torch.stack(vectors))
    if not converged:
        warnings.warn(
            f"power_iteration did not converge in {max_iter} iterations; raise max_iter or tol. "
            "The result is marked converged=False.",
            ConvergenceWarning,
            stacklevel=2,
        )
    elif not bool((residuals <= tol * vals.abs()).all()):
        converged = False
        warnings.warn(
            f"power_iteration: every pair met tol {tol:g} on the deflated products, but the "
            f"true residuals ||A v - lambda v|| of the final pairs do not (largest relative "
            f"{float((residuals / vals.abs()).max()):.3g}). Lower tol, or use lanczos. The "
            "result is marked converged=False.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=vals,
        eigenvectors=vecs,
        residuals=residuals,
        converged=converged,
        n_matvecs=n_matvecs + k,
        n_iterations=iters,
    )
