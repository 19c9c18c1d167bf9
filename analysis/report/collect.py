"""Read one finished sweep from MLflow alone: its kept trial runs, metrics, histories, spectra.

Only the tracking API is used (runs, metric histories, ``download_artifacts``), so a
remote tracking server works as well as the local SQLite store. Tag and metric names are
those of the DESIGN.md MLflow contract (``analysis`` never imports ``orchestrator``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

ROLE, PARENT, TRIAL_ID = "hessweep.role", "mlflow.parentRunId", "hessweep.trial_id"
CHECKPOINT, SELECTED, EPOCHS = "hessweep.checkpoint", "hessweep.selected", "hessweep.epochs"
DIVERGED = "hessweep.diverged"
CURVATURE_KEY = "hessian/eig_1_epoch"
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
SPECTRUM_FILES = {
    "eigenvalues": "spectrum/eigenvalues.parquet",
    "density": "spectrum/density.parquet",
    "input_hessian": "spectrum/input_hessian.parquet",
}


class ReportError(ValueError):
    """The report cannot be made: no such experiment or sweep, or nothing to report on."""


@dataclass(frozen=True, eq=False)
class Trial:
    """One kept trial: its grid cell, final metrics, and the spectra logged on its run."""

    run_id: str
    trial_id: str
    batch_size: str
    robust: str
    seed: int
    metrics: dict[str, float]
    epochs: int
    diverged: bool
    target_loss: float | None
    checkpoint: str | None
    spectra: dict[str, pd.DataFrame] = field(default_factory=dict)
    curvature: pd.DataFrame | None = None

    @property
    def label(self) -> str:
        """A short name: ``bs=64 none seed=0``."""
        return f"bs={self.batch_size} {self.robust} seed={self.seed}"


@dataclass(frozen=True, eq=False)
class Sweep:
    """A sweep (parent run) and its kept trials; ``notes`` say what was left out and why."""

    experiment: str
    parent_run_id: str
    run_name: str
    status: str
    tracking_uri: str
    params: dict[str, str]
    trials: tuple[Trial, ...]
    notes: tuple[str, ...] = ()


def robust_label(params: dict[str, str]) -> str:
    """The robust setting's label from run params: ``none`` or ``fgsm-0.1``."""
    method = params.get("robust.method", "none")
    if method == "none":
        return "none"
    return f"{method}-{float(params.get('robust.epsilon', 'nan')):g}"


def find_parent(
    client: MlflowClient, experiment_name: str | None, parent_run_id: str | None
) -> tuple[Run, str]:
    """The sweep's parent run (given, or the newest of the experiment) and the experiment name."""
    if parent_run_id is not None:
        try:
            run = client.get_run(parent_run_id)
        except Exception:  # MLflow raises its own exception type for unknown ids
            raise ReportError(f"no MLflow run with id {parent_run_id!r} in this store") from None
        if run.data.tags.get(ROLE) != "sweep":
            raise ReportError(
                f"run {parent_run_id} is not a hessweep sweep (tag {ROLE}=sweep); "
                "give the parent run id, or the experiment name"
            )
        return run, client.get_experiment(run.info.experiment_id).name
    if experiment_name is None:
        raise ReportError("give an experiment name or a parent run id")
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(
            f"no MLflow experiment called {experiment_name!r}; known: {', '.join(names) or 'none'}"
        )
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{ROLE}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ReportError(f"experiment {experiment_name!r} has no hessweep sweep runs")
    return runs[0], experiment_name


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """Every run whose parent is ``parent_run_id`` (all result pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT}` = '{parent_run_id}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


@contextlib.contextmanager
def quiet_downloads() -> Iterator[None]:
    """Turn off MLflow's per-file download progress bars, then restore the setting."""
    before = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_BAR_ENV, None)
        else:
            os.environ[PROGRESS_BAR_ENV] = before


def download_spectra(client: MlflowClient, run_id: str) -> dict[str, pd.DataFrame]:
    """The run's spectrum/*.parquet artifacts that exist, read into DataFrames."""
    present = {a.path for a in client.list_artifacts(run_id, "spectrum")}
    out: dict[str, pd.DataFrame] = {}
    with quiet_downloads(), tempfile.TemporaryDirectory(prefix="hessweep-report-") as tmp:
        for key, path in SPECTRUM_FILES.items():
            if path in present:
                local = client.download_artifacts(run_id, path, tmp)
                out[key] = pd.read_parquet(local)
    return out


def curvature_history(client: MlflowClient, run: Run) -> pd.DataFrame | None:
    """``hessian/eig_1_epoch`` by epoch when the trial tracked it (None otherwise)."""
    if CURVATURE_KEY not in run.data.metrics:
        return None
    history = client.get_metric_history(run.info.run_id, CURVATURE_KEY)
    frame = pd.DataFrame({"epoch": [m.step for m in history], "value": [m.value for m in history]})
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch", ignore_index=True)


def _epochs(client: MlflowClient, run: Run) -> int:
    tag = run.data.tags.get(EPOCHS)
    if tag is not None:
        try:
            return int(float(tag))
        except ValueError:
            pass
    history = client.get_metric_history(run.info.run_id, "train/loss")
    return max((m.step for m in history), default=0)


def _optional_float(text: str | None) -> float | None:
    """A param that may be unset ('null' or 'None') as a float or None."""
    if text is None or text in ("null", "None", ""):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_trial(client: MlflowClient, run: Run) -> Trial:
    """One trial run as a ``Trial`` (downloads its spectrum artifacts)."""
    params, tags = run.data.params, run.data.tags
    checkpoint = tags.get(CHECKPOINT)
    return Trial(
        run_id=run.info.run_id,
        trial_id=tags.get(TRIAL_ID, run.info.run_id),
        batch_size=params.get("batch_size", "?"),
        robust=robust_label(params),
        seed=int(params.get("seed", 0)),
        metrics=dict(run.data.metrics),
        epochs=_epochs(client, run),
        diverged=tags.get(DIVERGED) == "true",
        target_loss=_optional_float(params.get("target_train_loss")),
        checkpoint=checkpoint or None,
        spectra=download_spectra(client, run.info.run_id),
        curvature=curvature_history(client, run),
    )


def collect_sweep(
    tracking_uri: str,
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    progress: Callable[[str], Any] = print,
) -> Sweep:
    """The sweep (newest of ``experiment_name``, or ``parent_run_id``) and its kept trials.

    Trials the sweep's ``select`` rule dropped, and trials that failed or are still
    running, are left out and counted in ``notes``.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    parent, name = find_parent(client, experiment_name, parent_run_id)
    pid = parent.info.run_id
    progress(f"report: reading sweep {parent.info.run_name} ({pid}) of {name!r}")
    trials: list[Trial] = []
    dropped: Counter[str] = Counter()
    for run in child_runs(client, parent.info.experiment_id, pid):
        tags = run.data.tags
        if tags.get(ROLE) != "trial":
            continue
        if tags.get(SELECTED) == "false":
            dropped["not selected by the sweep's select rule"] += 1
        elif run.info.status != "FINISHED":
            dropped[f"status {run.info.status}"] += 1
        else:
            trials.append(read_trial(client, run))
    notes = [f"{n} trial run(s) left out: {why}" for why, n in sorted(dropped.items())]
    if not trials:
        raise ReportError(
            f"sweep {parent.info.run_name} ({pid}) has no finished trial runs to report on"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
    progress(f"report: {len(trials)} trial(s) read")
    return Sweep(
        experiment=name,
        parent_run_id=pid,
        run_name=parent.info.run_name or pid,
        status=parent.info.status,
        tracking_uri=tracking_uri,
        params=dict(parent.data.params),
        trials=tuple(sorted(trials, key=lambda t: (t.robust, t.batch_size, t.seed))),
        notes=tuple(notes),
    )


def local_checkpoint(trial: Trial) -> Path | None:
    """The trial's checkpoint folder when this machine can read it (not a remote URI)."""
    if trial.checkpoint is None or "://" in trial.checkpoint:
        return None
    path = Path(trial.checkpoint)
    return path if path.exists() else None
