"""The Hessian phase for one trained model: weight-Hessian spectrum and input Hessians.

The same code runs on a ``HessianPool`` (distributed) or on plain data (one process):
both go through the ``.matvec`` operator interface and the same seeds, so they agree.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.hessian import (
    BatchedEigenResult,
    WeightHessian,
    hutchinson_trace,
    input_hessian_spectrum,
    lanczos,
    slq_density,
)
from analysis.hessian.modelutil import LossFn
from analysis.hessian.protocol import operator_device
from orchestrator.hessian_pool import HessianPool, as_tensors, without_grad

INPUT_BLOCK = 50
NEG_RTOL = 1e-6
PROGRESS_EVERY_S = 30.0


class AnalysisCancelled(Exception):
    """The analysis was asked to stop (Ctrl-C during the Hessian phase)."""


class _Progress:
    """An operator that forwards products and says, at most every ``every_s`` seconds, how
    many the current solver has taken (a top-k of a large model otherwise runs for minutes
    without a word); once ``stop`` is set, the next product raises ``AnalysisCancelled``."""

    def __init__(
        self,
        op: Any,
        say: Callable[[str], None],
        every_s: float,
        stop: threading.Event | None = None,
    ) -> None:
        self.op, self.say, self.every_s, self.stop = op, say, every_s, stop
        self.size, self.dtype = op.size, op.dtype
        self.device = operator_device(op)
        self.begin("")

    def begin(self, solver: str) -> None:
        """Count the products of ``solver`` from here on."""
        self.solver, self.count = solver, 0
        self.start = self.last = time.perf_counter()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The wrapped operator's product, counted."""
        if self.stop is not None and self.stop.is_set():
            raise AnalysisCancelled(f"{self.solver} stopped after {self.count} matvecs")
        out = self.op.matvec(v)
        self.count += 1
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.say(f"{self.solver}: {self.count} matvecs so far, {now - self.start:.0f}s")
        return out


@dataclass(frozen=True)
class HessianSettings:
    """What to compute for each trained model, and how precisely."""

    top_k: int = 5
    tol: float = 1e-6
    criterion: str = "residual"  # or "eigenvalue": stop on eigenvalue error estimates
    max_iter: int | None = None
    trace: bool = True
    trace_rtol: float = 0.05
    trace_max_probes: int = 200
    density: bool = True
    density_probes: int = 1
    density_steps: int = 60
    input_samples: int = 200
    input_k: int = 1
    dtype: str = "float64"
    seed: int = 0

    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch floating dtype (clear error for anything else)."""
        value = getattr(torch, self.dtype, None)
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise ValueError(f"dtype must name a torch floating dtype, got {self.dtype!r}")
        return value


def _frozen(values: Any) -> np.ndarray:
    """A read-only float64 numpy copy (reports are immutable)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.array(values, dtype=np.float64)
    arr.setflags(write=False)
    return arr


def _mean(arr: np.ndarray, stat: Callable[[np.ndarray], Any] = np.mean) -> float:
    return float(stat(arr)) if len(arr) else float("nan")


@dataclass(frozen=True, eq=False)
class SpectrumReport:
    """The Hessian analysis of one model, with how each number was obtained.

    ``eigenvalues`` (descending), ``residuals`` (true ``||Hx - lambda x||``), ``converged``
    and ``n_matvecs`` come from Lanczos on the exact weight Hessian of the mean training
    loss (with the density on, that run takes at least ``density_steps`` steps and serves
    as the density's first SLQ probe). ``trace``/``trace_stderr`` (Hutchinson) and
    ``density_grid``/``density`` (SLQ) are None when not asked for.
    ``input_eig_max``/``input_eig_min`` hold, per test sample, the largest and smallest
    eigenvalue of the Hessian of its loss w.r.t. its input.

    ``neg_fraction`` is the fraction of those samples whose smallest input-Hessian
    eigenvalue is below ``-r * max|largest|`` (the largest over all the samples) with
    ``r = max(1e-6, tol)``: clearly negative on the model's curvature scale, beyond what the
    solver's tolerance can resolve (NaN with no samples).
    ``wall_times`` maps each part (lanczos, trace, density, input, total) to seconds.
    ``trace_converged`` says whether Hutchinson met its standard-error goal and
    ``input_converged`` which samples' Lanczos met its tolerance.
    """

    eigenvalues: list[float]
    residuals: list[float]
    converged: bool
    n_matvecs: int
    trace: float | None
    trace_stderr: float | None
    density_grid: np.ndarray | None
    density: np.ndarray | None
    input_eig_max: np.ndarray
    input_eig_min: np.ndarray
    input_converged: np.ndarray
    neg_fraction: float
    wall_times: dict[str, float] = field(default_factory=dict)
    trace_converged: bool | None = None

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics of the DESIGN.md contract; NaN where a part was not computed."""
        out = {f"hessian/eig_{i + 1}": float(v) for i, v in enumerate(self.eigenvalues)}
        nan = float("nan")
        out["hessian/trace"] = nan if self.trace is None else float(self.trace)
        out["hessian/trace_stderr"] = nan if self.trace_stderr is None else self.trace_stderr
        out["hessian/trace_converged"] = (
            nan if self.trace_converged is None else float(self.trace_converged)
        )
        out["hessian/n_matvecs"] = float(self.n_matvecs)
        out["hessian/converged"] = 1.0 if self.converged else 0.0
        out["input_hessian/eig_1_mean"] = _mean(self.input_eig_max)
        out["input_hessian/eig_1_median"] = _mean(self.input_eig_max, np.median)
        out["input_hessian/neg_fraction"] = float(self.neg_fraction)
        out["input_hessian/min_eig_mean"] = _mean(self.input_eig_min)
        out["input_hessian/converged_fraction"] = _mean(self.input_converged.astype(float))
        return out


def neg_fraction(eig_max: np.ndarray, eig_min: np.ndarray, rtol: float = NEG_RTOL) -> float:
    """Fraction of samples with ``eig_min < -rtol * max_i |eig_max_i|`` among those with a
    finite ``eig_min`` (NaN for none).

    The scale is the largest over the samples, not each sample's own: a confidently
    classified sample's input Hessian can be ~1e-160, where the sign of what is left is
    rounding, and a per-sample scale counted it as clearly negative. A sample without a
    finite smallest eigenvalue says nothing either way, so it is left out of the fraction.
    """
    scale = np.abs(eig_max)
    scale = scale[np.isfinite(scale)]
    lows = np.asarray(eig_min, dtype=float)
    lows = lows[np.isfinite(lows)]
    if not len(scale) or not len(lows):
        return float("nan")
    return float(np.mean(lows < -rtol * scale.max()))


def _local_batches(data: Any) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Plain data as batches: a Dataset becomes one batch; loaders and an (x, y) pair pass
    (``WeightHessian`` takes a pair as one batch)."""
    if isinstance(data, torch.utils.data.Dataset):
        return [as_tensors(data)]
    return data


def _input_spectrum(
    model: Any,
    pool: HessianPool | None,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: HessianSettings,
    loss_fn: LossFn,
) -> BatchedEigenResult:
    """Largest and smallest input-Hessian eigenvalues per sample, on the pool or locally."""
    options = {
        "k": settings.input_k,
        "which": "both",
        "tol": settings.tol,
        "max_iter": settings.max_iter,
        "seed": settings.seed + 3,
        "batch_size": INPUT_BLOCK,
        "dtype": settings.torch_dtype(),
        # Finding 4 says these Hessians are J^T (diag(p) - p p^T) J: they are measured by
        # products, not through that form (method="jacobian"), which would presume it.
        "method": "lanczos",
    }
    if pool is not None:
        return pool.input_hessian(model, x, y, loss_fn=loss_fn, **options)
    return input_hessian_spectrum(without_grad(model), loss_fn, x, y, **options)


def analyze_model(
    model: nn.Module,
    pool_or_data: HessianPool | Any,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    settings: HessianSettings | None = None,
    progress: Callable[[str], None] | None = None,
    loss_fn: LossFn | None = None,
    stop: threading.Event | None = None,
) -> SpectrumReport:
    """Exact Hessian spectra of one trained model: weight Hessian over the whole training
    set (top-k, trace, density) and input Hessians of the first ``input_samples`` test points.

    ``pool_or_data`` is a ``HessianPool`` over the training set or the training data itself
    ((x, y) tensors, a Dataset or an iterable of batches). Input-Hessian samples are solved
    in blocks of ``INPUT_BLOCK`` seeded per block, identically on a pool and locally.
    Setting ``stop`` ends the weight-Hessian solvers at their next product, or the analysis
    before its input Hessians (``AnalysisCancelled``).
    """
    settings = settings or HessianSettings()
    say = progress or (lambda _msg: None)
    dtype = settings.torch_dtype()
    pool = pool_or_data if isinstance(pool_or_data, HessianPool) else None
    loss_fn = loss_fn or (pool.loss_fn if pool is not None else nn.CrossEntropyLoss())
    times: dict[str, float] = {}
    start = time.perf_counter()
    handle = pool.put_model(model) if pool is not None else None
    try:
        if pool is not None:
            op = pool.weight_hessian(handle, loss_fn=loss_fn, dtype=dtype)
        else:
            op = WeightHessian(model, loss_fn, _local_batches(pool_or_data), dtype=dtype)
        k = min(settings.top_k, int(op.size))
        t0 = time.perf_counter()
        counted = _Progress(op, say, PROGRESS_EVERY_S, stop)
        counted.begin(f"lanczos top-{k}")
        eig = lanczos(
            counted,
            k=k,
            tol=settings.tol,
            seed=settings.seed,
            max_iter=settings.max_iter,
            criterion=settings.criterion,
            # the run doubles as the density's first SLQ probe: fewer products in all
            min_iter=settings.density_steps if settings.density else 0,
        )
        times["lanczos"] = time.perf_counter() - t0
        state = "converged" if eig.converged else "NOT converged"
        say(
            f"lanczos {k}/{k} {state} after {eig.n_matvecs} matvecs, {times['lanczos']:.1f}s "
            f"(lambda_max={eig.lambda_max:.4g})"
        )
        trace = stderr = trace_ok = None
        if settings.trace:
            t0 = time.perf_counter()
            counted.begin("trace")
            tr = hutchinson_trace(
                counted,
                rtol=settings.trace_rtol,
                max_probes=settings.trace_max_probes,
                seed=settings.seed + 1,
                deflate=eig,  # the top-k taken exactly: the outliers add no variance
            )
            times["trace"] = time.perf_counter() - t0
            trace, stderr, trace_ok = tr.estimate, tr.stderr, bool(tr.converged)
            say(
                f"trace {trace:.4g} +- {stderr:.2g} ({tr.n_probes} probes, top {tr.n_deflated} "
                f"deflated), {times['trace']:.1f}s"
            )
        grid = dens = None
        if settings.density:
            t0 = time.perf_counter()
            counted.begin("density")
            sd = slq_density(
                counted,
                n_probes=settings.density_probes,
                steps=settings.density_steps,
                seed=settings.seed + 2,
                reuse=eig,
            )
            times["density"] = time.perf_counter() - t0
            grid, dens = _frozen(sd.grid), _frozen(sd.density)
            say(
                f"density {sd.n_probes} probes x {settings.density_steps} steps "
                f"({sd.n_matvecs} matvecs beyond the Lanczos run), {times['density']:.1f}s"
            )
        if pool is not None:
            op.close()
        if stop is not None and stop.is_set():
            raise AnalysisCancelled("stopped before the input Hessians")
        n_in = min(settings.input_samples, int(test_x.shape[0]))
        eig_max = eig_min = _frozen([])
        in_conv = np.zeros(0, dtype=bool)
        if n_in > 0:
            t0 = time.perf_counter()
            target = handle if pool is not None else model
            res = _input_spectrum(target, pool, test_x[:n_in], test_y[:n_in], settings, loss_fn)
            times["input"] = time.perf_counter() - t0
            values = res.eigenvalues.detach().cpu()
            eig_max, eig_min = _frozen(values[:, 0]), _frozen(values[:, -1])
            in_conv = res.converged.numpy().copy()
            in_conv.setflags(write=False)
            say(
                f"input hessian: {n_in} samples, lambda_max mean {eig_max.mean():.4g}, "
                f"min eig mean {eig_min.mean():.3g}, {times['input']:.1f}s"
            )
    finally:
        if handle is not None:
            pool.release(handle)
    times["total"] = time.perf_counter() - start
    return SpectrumReport(
        eigenvalues=[float(v) for v in eig.eigenvalues],
        residuals=[float(r) for r in eig.residuals],
        converged=bool(eig.converged),
        n_matvecs=int(eig.n_matvecs),
        trace=trace,
        trace_stderr=stderr,
        density_grid=grid,
        density=dens,
        input_eig_max=eig_max,
        input_eig_min=eig_min,
        input_converged=in_conv,
        neg_fraction=neg_fraction(eig_max, eig_min, max(NEG_RTOL, settings.tol)),
        wall_times=times,
        trace_converged=trace_ok,
    )


__all__ = [
    "INPUT_BLOCK",
    "NEG_RTOL",
    "AnalysisCancelled",
    "HessianSettings",
    "SpectrumReport",
    "analyze_model",
    "neg_fraction",
]
