"""Power iteration with deflation: the paper's (and PyHessian's) method, kept for fidelity."""

from __future__ import annotations

import math
import warnings

import torch

from analysis.hessian.lanczos import ConvergenceWarning, random_unit_rows
from analysis.hessian.protocol import (
    LinearOperator,
    check_operator,
    not_finite,
    operator_device,
)
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
    prods = torch.stack([op.matvec(v) for v in vecs])
    small = (vecs @ prods.T).double().cpu()  # k x k, solved in float64 on the CPU
    theta, u = torch.linalg.eigh((small + small.T) / 2)
    order = theta.argsort(descending=True)
    theta, u = theta[order], u[:, order]
    rot = u.to(dtype=vecs.dtype, device=vecs.device)
    vectors = rot.T @ vecs
    resid = rot.T @ prods - theta.to(dtype=vecs.dtype, device=vecs.device)[:, None] * vectors
    return theta, vectors, resid.norm(dim=1).double().cpu()


def power_iteration(
    op: LinearOperator, k: int = 1, tol: float = 1e-3, seed: int = 0, max_iter: int = 1000
) -> EigenResult:
    """The ``k`` eigenvalues of largest magnitude, one at a time, deflating the found ones.

    Stops when ``||A v - lambda v|| <= tol * |lambda|`` (a residual rule: a stalled
    eigenvalue estimate alone does not count as convergence). The k vectors found are then
    rotated among themselves (Rayleigh-Ritz, k more products), which takes out what each
    deflated vector carries of the earlier pairs' errors; ``converged`` says whether the
    rule holds on those final true residuals. As the rotation can raise a residual by up to
    sqrt(k), each deflated vector is iterated to ``tol / sqrt(k)`` (k = 1: ``tol``).
    """
    check_operator(op)
    if not 1 <= k <= op.size:
        raise ValueError(f"k must be between 1 and the operator size {op.size}, got {k}")
    gen = torch.Generator().manual_seed(seed)
    device = operator_device(op)
    values, vectors = [], []
    n_matvecs, converged, iters = 0, True, 0
    # The final rotation can raise a residual by up to sqrt(k): each deflated vector is held
    # to that much less, so the k pairs meet ``tol`` afterwards.
    inner = tol / math.sqrt(k)
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
            if not bool(torch.isfinite(res)):
                raise not_finite(f"at power iteration step {it + 1}")
            if res <= inner * lam.abs() or wn == 0:
                ok = True
                break
            if it + 1 < max_iter:  # the last pass keeps v: lam is its Rayleigh quotient
                v = w / wn
        iters = max(iters, it + 1)
        converged &= ok
        values.append(lam)
        vectors.append(v)
    vals, vecs, residuals = _rayleigh_ritz(op, torch.stack(vectors))
    # converged: the pairs returned meet the rule, whichever way they got there (the
    # rotation can finish what a deflated iteration's budget left undone)
    met = bool((residuals <= tol * vals.abs()).all())
    if not met:
        worst = float((residuals / vals.abs().clamp_min(1e-300)).max())
        why = (
            f"did not converge in {max_iter} iterations; raise max_iter or tol"
            if not converged
            else f"met tol {tol:g} on every deflated product, but not on the final pairs' "
            "true residuals; lower tol, or use lanczos"
        )
        warnings.warn(
            f"power_iteration {why} (largest relative residual {worst:.3g}). The result is "
            "marked converged=False.",
            ConvergenceWarning,
            stacklevel=2,
        )
    converged = met
    return EigenResult(
        eigenvalues=vals,
        eigenvectors=vecs,
        residuals=residuals,
        converged=converged,
        n_matvecs=n_matvecs + k,
        n_iterations=iters,
    )
