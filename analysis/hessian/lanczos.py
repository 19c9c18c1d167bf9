"""Lanczos with full re-orthogonalisation, run in lock-step over independent problems.

One implementation serves the weight Hessian (a batch of one) and the per-sample input
Hessians (a batch of many): each row has its own recurrence, tridiagonal matrix (float64)
and stopping decision, while every step costs a single batched matrix-vector product.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from analysis.hessian.krylov import KrylovBasis
from analysis.hessian.protocol import (
    BatchedOperator,
    LinearOperator,
    SingleAsBatch,
    check_operator,
    not_finite,
    operator_device,
)
from analysis.hessian.results import EigenResult

WHICH = ("largest", "smallest", "both")
CRITERIA = ("residual", "eigenvalue")


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
    true_residuals: torch.Tensor | None = None
    krylov: list[tuple[torch.Tensor, torch.Tensor, bool]] | None = None
    # rows whose estimates met the rule but whose true residuals (keep_products) did not
    rounding_limited: torch.Tensor | None = None


def random_unit_rows(
    generator: torch.Generator, rows: int, size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Gaussian rows of unit norm, drawn on the CPU so a seed means the same on any device
    (in float64 whatever the target, so a seed also means the same in any precision)."""
    v = torch.randn(rows, size, generator=generator, dtype=torch.float64)
    return (v / v.norm(dim=1, keepdim=True)).to(dtype=dtype, device=device)


def mixed_start(start: torch.Tensor, random_rows: torch.Tensor) -> torch.Tensor:
    """Unit rows along ``start / ||start|| + random_rows`` (rows of ``start`` that are zero
    keep their random row): the Krylov space then starts near what the guess points to,
    while the random half keeps every eigenvector within reach (though a large one the
    guess misses may then surface only after many steps: see ``lanczos``)."""
    guess = start.to(dtype=random_rows.dtype, device=random_rows.device)
    norms = guess.norm(dim=1, keepdim=True)
    v = random_rows + torch.where(norms > 0, guess / norms.clamp_min(1e-300), 0.0)
    return v / v.norm(dim=1, keepdim=True)


def check_start(
    start: torch.Tensor, shape: tuple[int, ...], min_iter: int, what: str = "a tensor"
) -> None:
    """Refuse a start guess of the wrong shape, with non-finite entries, or for a run that
    must double as a random quadrature probe (``min_iter``)."""
    if not isinstance(start, torch.Tensor) or tuple(start.shape) != shape:
        got = tuple(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__
        raise ValueError(f"start must be {what} of shape {shape}, got {got}")
    if not bool(torch.isfinite(start).all()):
        raise ValueError(
            "start has non-finite entries (a NaN or infinite loss gradient?): fix the model "
            "or the data, or leave start=None"
        )
    if min_iter > 0:
        raise ValueError(
            "start and min_iter together: a run from a chosen start vector is no random "
            "quadrature probe for slq_density(reuse=...); leave start=None or min_iter=0"
        )


def krylov_dtype(device: torch.device) -> torch.dtype:
    """The precision of the Krylov basis: float64 whatever the operator's (not on MPS).

    A float32 basis caps a float32 operator's eigenvalues near 1e-5 relative error on
    large models (its rounding breaks the orthonormality the tridiagonal matrix assumes);
    a float64 basis keeps them as accurate as the products (measured 100x better on a
    550k-parameter CNN) for twice the basis memory.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Batched symmetric tridiagonal matrices from diagonals ``alpha`` and ``beta``."""
    t = torch.diag_embed(alpha)
    if beta.shape[-1]:
        t = t + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return t


def check_k(k: int, size: int, which: str) -> None:
    """Refuse a ``k`` (per end, for ``which="both"``) that an operator of ``size`` cannot give."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > size:
        raise ValueError(
            f"k={k} exceeds the operator size {size}; ask for at most {size} eigenvalues"
        )
    if which == "both" and 2 * k > size:
        raise ValueError(
            f"which='both' with k={k} asks for {2 * k} eigenvalues but the operator has "
            f"{size}: ask for k <= {size // 2} per end, or which='largest' with k={size} for "
            "all of them"
        )


def wanted_columns(m: int, k: int, which: str) -> torch.Tensor:
    """Column indices (ascending eigen order) of the Ritz values a caller asked for."""
    low = list(range(min(k, m)))
    high = list(range(max(m - k, 0), m))
    cols = {"largest": high, "smallest": low, "both": sorted(set(low) | set(high))}[which]
    return torch.tensor(cols, dtype=torch.long)


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
    basis: KrylovBasis,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    j: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One three-term step from the basis' last column ``j``: fills ``alpha[:, j]``, returns
    the fully re-orthogonalised next direction (in the basis' precision), its norm (the next
    ``beta``) and the product itself."""
    q = basis.column(j)
    product = bop.matvec(q.to(bop.dtype), rows).reshape(q.shape)
    # The recurrence cancels most of H q (H q ~ alpha q once a Ritz pair converges), so
    # it runs in the basis' precision (float64 by default) whatever the operator's.
    # in place on a copy (the product itself is kept by the caller): on a large model
    # these steps are memory-bound, and every temporary is a vector of the model's size
    w = product.to(q.dtype, copy=True)
    a = torch.linalg.vecdot(q, w)
    w.addcmul_(a[:, None], q, value=-1)
    if j > 0:
        prev = beta[:, j - 1].to(dtype=q.dtype, device=q.device)
        w.addcmul_(prev[:, None], basis.column(j - 1), value=-1)
    w = basis.orthogonalise(w)
    bnorm = w.norm(dim=1)
    finite = torch.isfinite(a) & torch.isfinite(bnorm)
    if not bool(finite.all()):
        bad = rows[~finite.cpu()].tolist()
        raise not_finite(
            f"at Lanczos step {j + 1}" + ("" if bop.batch == 1 else f" for rows {bad[:10]}")
        )
    alpha[:, j] = a.double().cpu()
    return w, bnorm, product


def eigenvalue_error_bounds(
    theta: torch.Tensor, ritz_res: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Error estimates ``min(r_i, r_i^2 / gap_i)`` of the Ritz values in ``cols``.

    ``r_i`` bounds the distance to some eigenvalue; when the rest of the spectrum is at
    least ``gap_i`` away the error is at most ``r_i^2 / gap_i`` (Kato-Temple). The gap is
    taken to the other Ritz values, each widened by its own residual, so an unconverged
    neighbour shrinks it (and a single Ritz value has none: the bound is then ``r_i``).
    """
    t = theta[:, cols]
    dist = (t[:, :, None] - theta[:, None, :]).abs() - ritz_res[:, None, :]
    dist[:, torch.arange(len(cols)), cols] = float("inf")
    gap = dist.amin(dim=2).clamp_min(0.0)
    r = ritz_res[:, cols]
    known = (gap > 0) & torch.isfinite(gap)
    quad = torch.where(known, r.square() / gap, torch.full_like(r, float("inf")))
    return torch.minimum(r, quad)


def batched_lanczos(
    bop: BatchedOperator,
    k: int,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
    return_vectors: bool = True,
    criterion: str = "residual",
    keep_products: bool = False,
    basis_dtype: torch.dtype | None = None,
    min_iter: int = 0,
    record_krylov: bool = False,
    start: torch.Tensor | None = None,
) -> LanczosOutcome:
    """Wanted eigenpairs of every row's operator by Lanczos with full re-orthogonalisation.

    With ``criterion="residual"`` a row stops when each wanted Ritz residual
    ``|beta_m s_mi|`` is at most ``tol`` times the row's largest Ritz value magnitude (an
    estimate of the operator norm). With ``"eigenvalue"`` it stops when each wanted Ritz
    value's error estimate (``eigenvalue_error_bounds``) is at most ``tol`` times its own
    magnitude (floored at 1% of the norm): eigenvalues converge about twice as fast as
    eigenvectors, so this needs fewer products when only the values matter, but it stops
    before a close pair of eigenvalues is resolved more often (one of the pair is then
    missing from the top k; the README gives measured rates). When a Krylov
    space becomes invariant the row restarts from a fresh random vector, so repeated
    eigenvalues are found, and only stops once the newest block cannot improve the answer.
    ``keep_products`` stores every product so the true residuals ``||A x - theta x||``
    come out exact without another product (at the memory of a second basis). The basis
    and the three-term recurrence are float64 unless ``basis_dtype`` says otherwise
    (``krylov_dtype``). ``min_iter`` keeps every row going for at least that many steps
    (its Krylov run then doubles as a quadrature probe); ``record_krylov`` returns each
    row's recurrence over those forced steps, up to its first restart (and whether that
    restart came first: an invariant subspace). ``start`` (``batch x size``) is mixed into
    each row's first vector (``mixed_start``).
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    d, b = int(bop.size), int(bop.batch)
    check_k(k, d, which)
    kk = len(wanted_columns(d, k, which))
    m_max = min(d, max_iter if max_iter is not None else max(30 * kk, 300))
    if m_max < kk:
        raise ValueError(
            f"max_iter={max_iter} is smaller than the {kk} eigenvalues asked for; "
            f"give max_iter >= {kk}"
        )
    if min_iter >= m_max and m_max < d:
        # forcing every step up to the budget would judge convergence only at its last
        # step (a Ritz value then still settling reads as a failure): the floor is dropped
        min_iter = 0
    if start is not None:
        check_start(start, (b, d), min_iter)
    dtype, device = bop.dtype, torch.device(bop.device)
    work = basis_dtype or krylov_dtype(device)
    # Below this a coupling is round-off: treating it as an invariant subspace (and
    # restarting) changes no wanted Ritz value by more than a hundredth of the tolerance.
    breakdown_tol = max(1e-2 * tol, 100 * torch.finfo(dtype).eps)
    gen = torch.Generator().manual_seed(seed)

    rows = torch.arange(b)
    # With many rows (per-sample input Hessians) or a large model the basis is the largest
    # buffer: it grows a block at a time, never copied.
    basis = KrylovBasis(b, d, work, device)
    first = random_unit_rows(gen, b, d, work, device)
    basis.append(first if start is None else mixed_start(start, first))
    products = KrylovBasis(b, d, dtype, device) if keep_products else None
    alpha = torch.zeros(b, m_max, dtype=torch.float64)
    beta = torch.zeros(b, m_max, dtype=torch.float64)
    block_start = torch.zeros(b, dtype=torch.long)
    first_restart = torch.full((b,), m_max, dtype=torch.long)
    out_krylov: list | None = [None] * b if record_krylov else None

    out_vals = torch.zeros(b, kk, dtype=torch.float64)
    out_res = torch.zeros(b, kk, dtype=torch.float64)
    out_conv = torch.zeros(b, dtype=torch.bool)
    out_vecs = torch.zeros(b, kk, d, dtype=dtype, device=device) if return_vectors else None
    out_true = torch.zeros(b, kk, dtype=torch.float64) if keep_products else None
    out_limited = torch.zeros(b, dtype=torch.bool)
    n_matvecs = 0
    j = 0
    for j in range(m_max):
        m = j + 1
        w, bnorm, product = lanczos_step(bop, rows, basis, alpha, beta, j)
        if products is not None:
            products.append(product)
        n_matvecs += 1

        theta, vecs = torch.linalg.eigh(tridiagonal(alpha[:, :m], beta[:, : m - 1]))
        scale = theta.abs().amax(dim=1)
        tol_abs = tol * scale
        bn = bnorm.double().cpu()
        ritz_res = bn[:, None] * vecs[:, -1, :].abs()
        cols = wanted_columns(m, k, which)
        breakdown = bn <= breakdown_tol * scale
        full = m == d
        if criterion == "residual":
            wanted_ok = (ritz_res[:, cols] <= tol_abs[:, None]).all(dim=1) & (m >= kk)
        else:
            wanted_ok = _eigenvalue_rule(theta, ritz_res, cols, tol, scale) & (m > kk)
        restarted = block_start > 0
        check_block = restarted | breakdown
        block_ok = _block_rule(theta, vecs, ritz_res, block_start, k, which, tol_abs)
        done = (wanted_ok & (~check_block | block_ok) & (m >= min_iter)) | full
        last = m == m_max
        finish = done | torch.full_like(done, last)

        if finish.any():
            f = finish.nonzero()[:, 0]
            orig = rows[f]
            sel = cols.flip(0)
            out_vals[orig] = theta[f][:, sel]
            out_res[orig] = ritz_res[f][:, sel]
            out_conv[orig] = done[f]
            s = vecs[f][:, :, sel]
            if out_vecs is not None:
                out_vecs[orig] = basis.combine(s, f).to(dtype)
            if out_krylov is not None and min_iter > 0:
                # only the forced steps: how far a run goes past them depends on its start
                # vector, and a probe kept for that reason would be a biased one
                forced = min(m, min_iter)
                for i, row in zip(f.tolist(), orig.tolist(), strict=True):
                    n = min(forced, int(first_restart[i]))
                    invariant = int(first_restart[i]) < forced
                    out_krylov[row] = (alpha[i, :n].clone(), beta[i, : n - 1].clone(), invariant)
            if products is not None:
                # A x - theta x = P s - Q (s theta), accumulated in place in the basis'
                # precision (the result's size is the largest temporary here).
                resid = products.combine(s, f).to(work)
                basis.combine(-s * theta[f][:, None, sel], f, out=resid)
                true = resid.norm(dim=2).double().cpu()
                out_true[orig] = true
                # The rule was met on the recurrence's residual estimates, which can fall
                # below the rounding of the products themselves (a float32 operator asked
                # for tol=1e-8): the true residuals must meet it too, within a factor 2.
                held = _true_rule_holds(
                    theta[f], ritz_res[f], cols, true.flip(1), tol, scale[f], criterion, dtype
                )
                out_limited[orig] = done[f] & ~held
                out_conv[orig] = done[f] & held
        if last or bool(finish.all()):
            break

        keep = (~finish).nonzero()[:, 0]
        if len(keep) < len(rows):
            rows, alpha, beta = rows[keep], alpha[keep], beta[keep]
            block_start, bn, breakdown = block_start[keep], bn[keep], breakdown[keep]
            w = w.index_select(0, keep.to(w.device))
            first_restart = first_restart[keep]
            basis.keep_rows(keep)
            if products is not None:
                products.keep_rows(keep)
        nxt = w / bnorm_safe(w)
        if breakdown.any():
            r = breakdown.nonzero()[:, 0]
            fresh = random_unit_rows(gen, len(rows), d, work, device)[r]
            fresh = basis.orthogonalise(fresh, r)
            nxt[r] = fresh / bnorm_safe(fresh)
            bn = bn.clone()
            bn[r] = 0.0
            block_start[r] = m
            first_restart[r] = torch.clamp(first_restart[r], max=m)
        beta[:, j] = bn
        basis.append(nxt)

    return LanczosOutcome(
        eigenvalues=out_vals,
        eigenvectors=out_vecs,
        est_residuals=out_res,
        converged=out_conv,
        n_matvecs=n_matvecs,
        n_iterations=j + 1,
        true_residuals=out_true,
        krylov=out_krylov,
        rounding_limited=out_limited,
    )


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: below it no eigenvalue of an operator in ``dtype`` can be
    certified by error estimates that assume exact products."""
    return torch.finfo(dtype).eps / 2


def _true_rule_holds(
    theta: torch.Tensor,
    ritz_res: torch.Tensor,
    cols: torch.Tensor,
    true: torch.Tensor,
    tol: float,
    scale: torch.Tensor,
    criterion: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Whether each row's stopping rule still holds with its true residuals (``true`` in
    the order of ``cols``) in place of the estimates, allowing a factor 2 on residuals.
    The eigenvalue error estimates assume exact products, so with that rule a ``tol``
    below the products' unit roundoff never holds."""
    if criterion == "residual":
        return (true <= 2 * tol * scale[:, None]).all(dim=1)
    if tol < _unit_roundoff(dtype):
        return torch.zeros(len(theta), dtype=torch.bool)
    res = ritz_res.clone()
    res[:, cols] = torch.maximum(res[:, cols], true / 2)
    return _eigenvalue_rule(theta, res, cols, tol, scale)


def _eigenvalue_rule(
    theta: torch.Tensor, ritz_res: torch.Tensor, cols: torch.Tensor, tol: float, scale: torch.Tensor
) -> torch.Tensor:
    """Whether each row's wanted eigenvalue error estimates are within ``tol`` of their
    magnitudes (floored at 1% of the norm estimate ``scale``)."""
    bound = eigenvalue_error_bounds(theta, ritz_res, cols)
    allowed = tol * torch.maximum(theta[:, cols].abs(), 1e-2 * scale[:, None])
    return (bound <= allowed).all(dim=1)


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
    criterion: str = "residual",
    min_iter: int = 0,
    start: torch.Tensor | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator.

    Full re-orthogonalisation, tridiagonal eigenproblem in float64. By default it stops on
    Ritz residuals (``tol`` relative to the operator norm estimate); ``criterion=
    "eigenvalue"`` stops once each eigenvalue's estimated relative error is below ``tol``
    (fewer products when the eigenvectors matter less). The returned residuals are the true
    ``||A x - lambda x||``, from the kept products (no extra product), and the rule must
    hold on them too (within a factor 2): a float32 operator asked for residuals below its
    own rounding says so instead of passing on its estimates, and so does the eigenvalue
    criterion asked for a ``tol`` below the products' unit roundoff (its error estimates
    assume exact products). These are residuals of the operator's own products: a float32
    product can itself be 1e-4 off the exact Hessian's, so for a tight ``tol`` use a
    float64 operator. A run that hit ``max_iter``
    warns and says so. ``min_iter`` runs at least that many steps, so that
    ``slq_density(reuse=result)`` can take the run as a probe of that many steps.

    ``start`` (a flat vector) is a guess at the top eigenvector, mixed at equal weight with
    the seed's random vector, for callers who know a good one (a previous run's
    eigenvector). It is no default anywhere: a start weighted towards some eigenvectors
    can hide a larger one. From the loss gradient (``WeightHessian.gradient()``) the top
    eigenvalue of 26 trained digits models took about 20% fewer products, but at tol 1e-3
    one model's came out 17% low (its second eigenvalue) and was called converged
    (``benchmarks/gradient_start.py``).
    """
    check_operator(op)
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if start is not None:
        check_start(start, (int(op.size),), min_iter, "a flat vector")
    batched = SingleAsBatch(op)
    batched.device = operator_device(op)
    out = batched_lanczos(
        batched,
        k,
        which=which,
        tol=tol,
        max_iter=max_iter,
        seed=seed,
        criterion=criterion,
        keep_products=True,
        min_iter=min_iter,
        record_krylov=True,
        start=None if start is None else start[None],
    )
    values = out.eigenvalues[0]
    vectors = out.eigenvectors[0]
    residuals = out.true_residuals[0]
    converged = bool(out.converged[0])
    if not converged and criterion == "eigenvalue" and tol < _unit_roundoff(op.dtype):
        warnings.warn(
            f"lanczos: tol {tol:g} is below the unit roundoff of the {op.dtype} products "
            f"({_unit_roundoff(op.dtype):.2g}): no eigenvalue error that small can be "
            "certified. Use a float64 operator (dtype=torch.float64) or raise tol. The result "
            "is marked converged=False.",
            ConvergenceWarning,
            stacklevel=2,
        )
    elif not converged and bool(out.rounding_limited[0]):
        warnings.warn(
            f"lanczos: the Ritz estimates met tol {tol:g} but the true residuals "
            f"(largest {float(residuals.max()):.3g}) do not: the {op.dtype} products round "
            "above that tolerance. Use a float64 operator (dtype=torch.float64) or raise tol. "
            "The result is marked converged=False.",
            ConvergenceWarning,
            stacklevel=2,
        )
    elif not converged:
        what = "Ritz residuals" if criterion == "residual" else "eigenvalue error estimates"
        warnings.warn(
            f"lanczos did not converge in {out.n_iterations} iterations "
            f"({what} above tol {tol:g}; largest Ritz residual "
            f"{out.est_residuals[0].max():.3g}); "
            "raise max_iter or tol. The result is marked converged=False.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=values,
        eigenvectors=vectors,
        residuals=residuals,
        converged=converged,
        n_matvecs=out.n_matvecs,
        n_iterations=out.n_iterations,
        krylov=out.krylov[0] if out.krylov else None,
    )
