"""Hutchinson's stochastic trace estimator with a standard error and a stopping rule on it."""

from __future__ import annotations

import math
import warnings

import torch

from analysis.hessian.lanczos import ConvergenceWarning
from analysis.hessian.protocol import LinearOperator, check_operator, operator_device
from analysis.hessian.results import TraceResult


def hutchinson_trace(
    op: LinearOperator,
    rtol: float = 1e-2,
    atol: float = 0.0,
    min_probes: int = 10,
    max_probes: int = 500,
    seed: int = 0,
) -> TraceResult:
    """Estimate ``trace(A)`` as the mean of ``z^T A z`` over Rademacher probes ``z``.

    Probing stops once the standard error is at most ``max(rtol * |estimate|, atol)``
    (after ``min_probes``); hitting ``max_probes`` first warns and sets converged=False.
    """
    check_operator(op)
    if min_probes < 2 or max_probes < min_probes:
        raise ValueError(
            f"need 2 <= min_probes <= max_probes, got min_probes={min_probes}, "
            f"max_probes={max_probes}"
        )
    gen = torch.Generator().manual_seed(seed)
    device = operator_device(op)
    samples: list[float] = []
    mean = stderr = 0.0
    converged = False
    while len(samples) < max_probes:
        z = (torch.randint(0, 2, (op.size,), generator=gen) * 2 - 1).to(op.dtype).to(device)
        samples.append(float(z @ op.matvec(z)))
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
    )
