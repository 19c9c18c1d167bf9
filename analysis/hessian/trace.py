"""Hutchinson's stochastic trace estimator with a standard error and a stopping rule on it."""

from __future__ import annotations

import math
import warnings

import torch

from analysis.hessian.lanczos import ConvergenceWarning
from analysis.hessian.protocol import LinearOperator, check_operator, not_finite, operator_device
from analysis.hessian.results import EigenResult, TraceResult


def hutchinson_trace(
    op: LinearOperator,
    rtol: float = 1e-2,
    atol: float = 0.0,
    min_probes: int = 10,
    max_probes: int = 500,
    seed: int = 0,
    deflate: EigenResult | None = None,
) -> TraceResult:
    """Estimate ``trace(A)`` as the mean of ``z^T A z`` over Rademacher probes ``z``.

    Probing stops once the standard error is at most ``max(rtol * |estimate|, atol)``
    (after ``min_probes``); hitting ``max_probes`` first warns and sets converged=False.

    ``deflate`` (eigenpairs already computed, e.g. by ``lanczos``) splits the trace into
    their eigenvalues plus the trace of ``A`` projected off their eigenvectors
    (``tr A = sum_i v_i^T A v_i + tr(P A P)`` for orthonormal ``v_i``, ``P = I - V V^T``):
    still unbiased, and the outliers no longer add variance, so far fewer probes reach
    the same standard error on a trained network's Hessian. The pairs must be this
    operator's, with each eigenvalue the Rayleigh quotient of its (orthonormal)
    eigenvector, as ``lanczos`` and ``power_iteration`` return them, converged or not; with
    every eigenpair known the trace is their sum, exactly, without a product.
    """
    check_operator(op)
    if min_probes < 2 or max_probes < min_probes:
        raise ValueError(
            f"need 2 <= min_probes <= max_probes, got min_probes={min_probes}, "
            f"max_probes={max_probes}"
        )
    gen = torch.Generator().manual_seed(seed)
    device = operator_device(op)
    basis, known = _deflation(op, deflate, device)
    if basis is not None and basis.shape[0] == int(op.size):  # the whole spectrum is known
        return TraceResult(known, 0.0, 0, 0, True, n_deflated=int(op.size))
    samples: list[float] = []
    mean = stderr = 0.0
    converged = False
    while len(samples) < max_probes:
        z = (torch.randint(0, 2, (op.size,), generator=gen) * 2 - 1).to(op.dtype).to(device)
        if basis is not None:
            z = z - basis.T @ (basis @ z)
        sample = float(z @ op.matvec(z))
        if not math.isfinite(sample):
            raise not_finite(f"at Hutchinson probe {len(samples) + 1}")
        samples.append(known + sample)
        n = len(samples)
        if n < min_probes:
            continue
        t = torch.tensor(samples, dtype=torch.float64)
        mean = float(t.mean())
        stderr = float(t.std(unbiased=True)) / math.sqrt(n)
        if stderr <= max(rtol * abs(mean), atol):
            converged = True
            break
    if not converged:
        warnings.warn(
            f"hutchinson_trace stopped at max_probes={max_probes} with standard error "
            f"{stderr:.3g} (wanted <= {max(rtol * abs(mean), atol):.3g}); converged=False.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return TraceResult(
        estimate=mean,
        stderr=stderr,
        n_probes=len(samples),
        n_matvecs=len(samples),
        converged=converged,
        n_deflated=0 if basis is None else int(basis.shape[0]),
    )


def _deflation(
    op: LinearOperator, deflate: EigenResult | None, device: torch.device
) -> tuple[torch.Tensor | None, float]:
    """The eigenvectors to project off (rows, on the operator's device) and their sum."""
    if deflate is None or len(deflate.eigenvalues) == 0:
        return None, 0.0
    vectors = deflate.eigenvectors
    k = len(deflate.eigenvalues)
    if vectors is None or tuple(vectors.shape) != (k, int(op.size)):
        shape = None if vectors is None else tuple(vectors.shape)
        raise ValueError(
            f"deflate: eigenvectors must be {k} x {op.size} (one row per eigenvalue, the "
            f"operator's size), got {shape}; pass the EigenResult of this operator"
        )
    return vectors.to(device=device, dtype=op.dtype), float(deflate.eigenvalues.sum())
