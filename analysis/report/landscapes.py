"""1-D loss landscapes for the report, computed from each trial's final checkpoint.

MLflow holds numbers, not weights, so this is the one part of the report that needs the
checkpoints (tag ``hessweep.checkpoint``); where they cannot be read here (a remote
tracking server, a deleted sweep folder) the landscape is skipped with a note.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from analysis.landscape import Landscape1D, landscape_1d, top_eigenvectors
from analysis.report.collect import Sweep, Trial, local_checkpoint

POINTS = 41
RISE = 2.0
TOL = 1e-3
EVAL_BATCH = 1024


@dataclass(frozen=True)
class CellLandscape:
    """The landscape of one trial along its own top eigenvector (lambda_max from Lanczos)."""

    robust: str
    batch_size: str
    seed: int
    eigenvalue: float
    converged: bool
    landscape: Landscape1D


@dataclass(frozen=True)
class LandscapeSet:
    """Landscapes on one shared axis, notes on what was skipped, and the training-set size."""

    cells: tuple[CellLandscape, ...]
    notes: tuple[str, ...]
    n_train: int | None
    radius: float


def first_seed_per_cell(sweep: Sweep) -> list[Trial]:
    """One trial per (robust setting, batch size): the lowest seed that did not diverge."""
    chosen: dict[tuple[str, str], Trial] = {}
    for t in sorted(sweep.trials, key=lambda t: t.seed):
        if not t.diverged:
            chosen.setdefault((t.robust, t.batch_size), t)
    return list(chosen.values())


def shared_radius(eigenvalues: list[float], rise: float = RISE) -> float:
    """Half-width of the common axis: the sharpest model's loss rises by about ``rise``
    at its ends (``lambda a^2 / 2 = rise``), clipped to [1e-3, 10]."""
    top = max((v for v in eigenvalues if math.isfinite(v) and v > 0), default=math.nan)
    if math.isnan(top):
        return 1.0
    return float(np.clip(math.sqrt(2 * rise / top), 1e-3, 10.0))


def _load(trial: Trial) -> Any:
    """The trial's trained model and data, on the GPU when this machine has one."""
    import torch

    from trainables.train import load_trained

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_trained(local_checkpoint(trial), device=device)


def report_landscapes(
    sweep: Sweep, progress: Callable[[str], Any] = print, points: int = POINTS
) -> LandscapeSet:
    """Loss along the top eigenvector (and a random direction) for one trial per cell.

    Two passes: eigenvectors first (each model loaded in turn, only the vector kept), then
    every landscape on one shared axis, so curves of different batch sizes compare. Runs
    on one torch thread: these are many small products, and on a CPU shared with other
    work (Ray workers, a second process) more threads measured up to 12x slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _report_landscapes(sweep, progress, points)
    finally:
        torch.set_num_threads(threads)


def _report_landscapes(sweep: Sweep, progress: Callable[[str], Any], points: int) -> LandscapeSet:
    loss_fn = nn.CrossEntropyLoss()
    notes: list[str] = []
    found: list[tuple[Trial, float, bool, Any]] = []
    n_train = None
    for trial in first_seed_per_cell(sweep):
        if local_checkpoint(trial) is None:
            where = trial.checkpoint or "no hessweep.checkpoint tag"
            notes.append(f"{trial.label}: checkpoint not readable here ({where})")
            continue
        try:
            trained = _load(trial)
        except (OSError, RuntimeError, ValueError) as err:
            notes.append(f"{trial.label}: checkpoint could not be loaded ({err})")
            continue
        data = trained.train_data.batches(EVAL_BATCH)
        n_train = len(trained.train_data)
        values, vecs, converged = top_eigenvectors(trained.model, 1, loss_fn, data, tol=TOL)
        found.append((trial, float(values[0]), converged, vecs[0]))
        progress(f"report: {trial.label}: top eigenvector, lambda_max={float(values[0]):.4g}")
    radius = shared_radius([lam for _, lam, _, _ in found])
    alphas = np.linspace(-radius, radius, points)
    cells = []
    for trial, lam, converged, vec in found:
        trained = _load(trial)
        land = landscape_1d(
            trained.model, loss_fn, trained.train_data.batches(EVAL_BATCH), alphas, direction=vec
        )
        cells.append(
            CellLandscape(trial.robust, trial.batch_size, trial.seed, lam, converged, land)
        )
    return LandscapeSet(tuple(cells), tuple(notes), n_train, radius)
