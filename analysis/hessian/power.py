"""Power iteration with deflation: the paper's (and PyHessian's) method, kept for fidelity."""

from __future__ import annotations

import warnings

import torch

from analysis.hessian.lanczos import ConvergenceWarning, random_unit_rows, true_residuals
from analysis.hessian.protocol import LinearOperator, check_operator, operator_device
from analysis.hessian.results import EigenResult


def _project_out(v: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor:
    for u in found:
        v = v - (u @ v) * u
    return v


def power_iteration(
    op: LinearOperator, k: int = 1, tol: float = 1e-3, seed: int = 0, max_iter: int = 1000
) -> EigenResult:
    """The ``k`` eigenvalues of largest magnitude, one at a time, deflating the found ones.

    Stops when ``||A v - lambda v|| <= tol * |lambda|`` (a residual rule: a stalled
    eigenvalue estimate alone does not count as convergence).
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
    if not converged:
        warnings.warn(
            f"power_iteration did not converge in {max_iter} iterations; raise max_iter or tol. "
            "The result is marked converged=False.",
            ConvergenceWarning,
            stacklevel=2,
        )
    vals = torch.stack(values).double().cpu()
    order = vals.argsort(descending=True)
    vecs = torch.stack(vectors)[order.to(device)]
    vals = vals[order]
    residuals = true_residuals(op, vecs, vals)
    return EigenResult(
        eigenvalues=vals,
        eigenvectors=vecs,
        residuals=residuals,
        converged=converged,
        n_matvecs=n_matvecs + k,
        n_iterations=iters,
    )
