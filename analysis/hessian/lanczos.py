"""Lanczos with full re-orthogonalisation, run in lock-step over independent problems.

One implementation serves the weight Hessian (a batch of one) and the per-sample input
Hessians (a batch of many): each row has its own recurrence, tridiagonal matrix (float64)
and stopping decision, while every step costs a single batched matrix-vector product.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from analysis.hessian.protocol import (
    BatchedOperator,
    LinearOperator,
    SingleAsBatch,
    check_operator,
    operator_device,
)
from analysis.hessian.results import EigenResult

WHICH = ("largest", "smallest", "both")
DGKS_ETA = 0.5**0.5


class ConvergenceWarning(UserWarning):
    """A solver stopped at its budget before meeting its stopping rule."""


@dataclass(frozen=True)
class LanczosOutcome:
    """Raw batched outcome: wanted Ritz pairs per row, sorted descending."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    est_residuals: torch.Tensor
    converged: torch.Tensor
    n_matvecs: int
    n_iterations: int


def random_unit_rows(
    generator: torch.Generator, rows: int, size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Gaussian rows of unit norm, drawn on the CPU so a seed means the same on any device."""
    v = torch.randn(rows, size, generator=generator, dtype=torch.float64)
    return (v / v.norm(dim=1, keepdim=True)).to(dtype=dtype, device=device)


def tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Batched symmetric tridiagonal matrices from diagonals ``alpha`` and ``beta``."""
    t = torch.diag_embed(alpha)
    if beta.shape[-1]:
        t = t + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return t


def _wanted_columns(m: int, k: int, which: str) -> torch.Tensor:
    """Column indices (ascending eigen order) of the Ritz values a caller asked for."""
    low = list(range(min(k, m)))
    high = list(range(max(m - k, 0), m))
    cols = {"largest": high, "smallest": low, "both": sorted(set(low) | set(high))}[which]
    return torch.tensor(cols, dtype=torch.long)


def _project_out(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    coeffs = torch.einsum("bmd,bd->bm", basis, w)
    return w - torch.einsum("bm,bmd->bd", coeffs, basis)


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from each row of ``w`` its components along that row's basis.

    Classical Gram-Schmidt with the DGKS test: a row is projected a second time only when
    the first pass shrank it below 1/sqrt(2) of its norm (where cancellation can leave
    round-off along the basis); "twice is enough" for those, once for the rest.
    """
    before = w.norm(dim=1)
    w = _project_out(w, basis)
    again = w.norm(dim=1) < DGKS_ETA * before
    if bool(again.all()):
        return _project_out(w, basis)
    if bool(again.any()):
        r = again.nonzero()[:, 0]
        w = w.clone()
        w[r] = _project_out(w[r], basis[r])
    return w


def _block_rule(
    theta: torch.Tensor,
    vecs: torch.Tensor,
    ritz_res: torch.Tensor,
    block_start: torch.Tensor,
    k: int,
    which: str,
    tol_abs: torch.Tensor,
) -> torch.Tensor:
    """After a restart, the newest block's extreme Ritz values must be converged and no better
    than the k-th wanted one; otherwise a repeated eigenvalue may still be hiding."""
    m = theta.shape[1]
    rows_idx = torch.arange(m).view(1, m, 1)
    in_block_rows = rows_idx >= block_start.view(-1, 1, 1)
    weight = (vecs.square() * in_block_rows).sum(dim=1)
    in_block = weight >= 0.5
    ok = torch.ones(theta.shape[0], dtype=torch.bool)
    inf = torch.tensor(float("inf"), dtype=theta.dtype)
    if which in ("largest", "both"):
        masked = torch.where(in_block, theta, -inf)
        ext, pos = masked.max(dim=1)
        res = ritz_res.gather(1, pos[:, None])[:, 0]
        kth = theta[:, max(m - k, 0)]
        ok &= (res <= tol_abs) & (ext <= kth + tol_abs)
    if which in ("smallest", "both"):
        masked = torch.where(in_block, theta, inf)
        ext, pos = masked.min(dim=1)
        res = ritz_res.gather(1, pos[:, None])[:, 0]
        kth = theta[:, min(k, m) - 1]
        ok &= (res <= tol_abs) & (ext >= kth - tol_abs)
    return ok


def lanczos_step(
    bop: BatchedOperator,
    rows: torch.Tensor,
    basis: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    j: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One three-term step from ``basis[:, j]``: fills ``alpha[:, j]``, returns the fully
    re-orthogonalised next direction and its norm (the next ``beta``)."""
    q = basis[:, j]
    w = bop.matvec(q, rows).reshape(q.shape).to(q.dtype)
    a = (q * w).sum(dim=1)
    w = w - a[:, None] * q
    if j > 0:
        w = w - beta[:, j - 1].to(dtype=q.dtype, device=q.device)[:, None] * basis[:, j - 1]
    w = _orthogonalise(w, basis[:, : j + 1])
    alpha[:, j] = a.double().cpu()
    return w, w.norm(dim=1)


def batched_lanczos(
    bop: BatchedOperator,
    k: int,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
    return_vectors: bool = True,
) -> LanczosOutcome:
    """Wanted eigenpairs of every row's operator by Lanczos with full re-orthogonalisation.

    A row stops when each wanted Ritz residual ``|beta_m s_mi|`` is at most ``tol`` times
    the row's largest Ritz value magnitude (an estimate of the operator norm). When a
    Krylov space becomes invariant the row restarts from a fresh random vector, so repeated
    eigenvalues are found, and only stops once the newest block cannot improve the answer.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    d, b = int(bop.size), int(bop.batch)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > d:
        raise ValueError(f"k={k} exceeds the operator size {d}; ask for at most {d} eigenvalues")
    m_max = min(d, max_iter if max_iter is not None else max(30 * k, 300))
    if m_max < k:
        raise ValueError(f"max_iter={max_iter} is smaller than k={k}")
    dtype, device = bop.dtype, torch.device(bop.device)
    # Below this a coupling is round-off: treating it as an invariant subspace (and
    # restarting) changes no wanted Ritz value by more than a hundredth of the tolerance.
    breakdown_tol = max(1e-2 * tol, 100 * torch.finfo(dtype).eps)
    gen = torch.Generator().manual_seed(seed)
    kk = len(_wanted_columns(d, k, which))

    rows = torch.arange(b)
    # The basis grows geometrically and is never zero-filled: only its first m columns are
    # ever read. With many rows (per-sample input Hessians) it is the largest buffer.
    basis = torch.empty(b, min(m_max, 16), d, dtype=dtype, device=device)
    basis[:, 0] = random_unit_rows(gen, b, d, dtype, device)
    alpha = torch.zeros(b, m_max, dtype=torch.float64)
    beta = torch.zeros(b, m_max, dtype=torch.float64)
    block_start = torch.zeros(b, dtype=torch.long)

    out_vals = torch.zeros(b, kk, dtype=torch.float64)
    out_res = torch.zeros(b, kk, dtype=torch.float64)
    out_conv = torch.zeros(b, dtype=torch.bool)
    out_vecs = torch.zeros(b, kk, d, dtype=dtype, device=device) if return_vectors else None
    n_matvecs = 0
    j = 0
    for j in range(m_max):
        m = j + 1
        w, bnorm = lanczos_step(bop, rows, basis, alpha, beta, j)
        n_matvecs += 1

        theta, vecs = torch.linalg.eigh(tridiagonal(alpha[:, :m], beta[:, : m - 1]))
        scale = theta.abs().amax(dim=1)
        tol_abs = tol * scale
        bn = bnorm.double().cpu()
        ritz_res = bn[:, None] * vecs[:, -1, :].abs()
        cols = _wanted_columns(m, k, which)
        breakdown = bn <= breakdown_tol * scale
        full = m == d
        wanted_ok = (ritz_res[:, cols] <= tol_abs[:, None]).all(dim=1) & (m >= kk)
        restarted = block_start > 0
        check_block = restarted | breakdown
        block_ok = _block_rule(theta, vecs, ritz_res, block_start, k, which, tol_abs)
        done = (wanted_ok & (~check_block | block_ok)) | full
        last = m == m_max
        finish = done | torch.full_like(done, last)

        if finish.any():
            f = finish.nonzero()[:, 0]
            orig = rows[f]
            sel = cols.flip(0)
            out_vals[orig] = theta[f][:, sel]
            out_res[orig] = ritz_res[f][:, sel]
            out_conv[orig] = done[f]
            if out_vecs is not None:
                s = vecs[f][:, :, sel].to(dtype=dtype, device=device)
                out_vecs[orig] = torch.einsum("bmk,bmd->bkd", s, basis[f, :m])
        if last or bool(finish.all()):
            break

        keep = (~finish).nonzero()[:, 0]
        if len(keep) < len(rows):
            rows, alpha, beta = rows[keep], alpha[keep], beta[keep]
            block_start, w, bn, breakdown = block_start[keep], w[keep], bn[keep], breakdown[keep]
            basis = _resized(basis, m, basis.shape[1], keep)
        if m >= basis.shape[1]:
            basis = _resized(basis, m, min(m_max, 2 * m))
        nxt = w / bnorm_safe(w)
        if breakdown.any():
            r = breakdown.nonzero()[:, 0]
            fresh = random_unit_rows(gen, len(rows), d, dtype, device)[r]
            fresh = _orthogonalise(fresh, basis[r, :m])
            nxt[r] = fresh / bnorm_safe(fresh)
            bn = bn.clone()
            bn[r] = 0.0
            block_start[r] = m
        beta[:, j] = bn
        basis[:, m] = nxt

    return LanczosOutcome(
        eigenvalues=out_vals,
        eigenvectors=out_vecs,
        est_residuals=out_res,
        converged=out_conv,
        n_matvecs=n_matvecs,
        n_iterations=j + 1,
    )


def _resized(
    basis: torch.Tensor, m: int, capacity: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """A new basis buffer of ``capacity`` columns holding the first ``m`` (of rows ``keep``)."""
    rows = basis.shape[0] if keep is None else len(keep)
    out = torch.empty(rows, capacity, basis.shape[2], dtype=basis.dtype, device=basis.device)
    out[:, :m] = basis[:, :m] if keep is None else basis[keep.to(basis.device), :m]
    return out


def bnorm_safe(w: torch.Tensor) -> torch.Tensor:
    """Row norms as a column, never zero (a zero row stays zero instead of becoming NaN)."""
    n = w.norm(dim=1, keepdim=True)
    return torch.where(n > 0, n, torch.ones_like(n))


def true_residuals(op: LinearOperator, vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``||A x_i - lambda_i x_i||`` for each unit row ``x_i``: the honest quality measure."""
    res = []
    for x, lam in zip(vectors, values, strict=True):
        r = op.matvec(x) - lam.to(x.dtype) * x
        res.append(r.norm().double().cpu())
    return torch.stack(res) if res else torch.zeros(0, dtype=torch.float64)


def lanczos(
    op: LinearOperator,
    k: int = 5,
    tol: float = 1e-6,
    seed: int = 0,
    which: str = "largest",
    max_iter: int | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator.

    Full re-orthogonalisation, tridiagonal eigenproblem in float64, stopping on Ritz
    residuals (``tol`` relative to the operator norm estimate). The returned residuals are
    recomputed with ``k`` extra products; a run that hit ``max_iter`` warns and says so.
    """
    check_operator(op)
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    batched = SingleAsBatch(op)
    batched.device = operator_device(op)
    out = batched_lanczos(batched, k, which=which, tol=tol, max_iter=max_iter, seed=seed)
    values = out.eigenvalues[0]
    vectors = out.eigenvectors[0]
    residuals = true_residuals(op, vectors, values)
    converged = bool(out.converged[0])
    if not converged:
        warnings.warn(
            f"lanczos did not converge in {out.n_iterations} iterations "
            f"(Ritz residuals {out.est_residuals[0].max():.3g} > tol {tol:g} x norm); "
            "raise max_iter or tol. The result is marked converged=False.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=values,
        eigenvectors=vectors,
        residuals=residuals,
        converged=converged,
        n_matvecs=out.n_matvecs + len(values),
        n_iterations=out.n_iterations,
    )
