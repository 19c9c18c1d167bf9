"""The paper's table: one row per (robust setting, batch size), mean and std over seeds.

``trial_frame`` is the per-trial view every figure and finding works from; ``summary``
aggregates it; ``batch_position`` puts 'full' on the batch axis.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.report.collect import Sweep, Trial

QUANTITIES = {
    "test_acc": "test accuracy",
    "adv_acc": "adversarial accuracy",
    "lambda_max": "lambda_max (weight Hessian)",
    "trace": "trace (weight Hessian)",
    "input_lambda_max": "input-Hessian lambda_max (mean over samples)",
    "epochs": "epochs",
}
METRICS = {
    "test_acc": "test/acc",
    "adv_acc": "test/adv_acc",
    "lambda_max": "hessian/eig_1",
    "trace": "hessian/trace",
    "input_lambda_max": "input_hessian/eig_1_mean",
    "neg_fraction": "input_hessian/neg_fraction",
    "converged": "hessian/converged",
    "input_converged": "input_hessian/converged_fraction",
}


def batch_position(batch_size: str, numeric: list[float], n_train: int | None) -> float:
    """Where a batch size sits on the (log) batch axis: its value; 'full' at the training-set
    size when known, else one factor of 4 beyond the largest numeric batch size."""
    if batch_size != "full":
        return float(batch_size)
    if n_train is not None:
        return float(n_train)
    return 4.0 * max(numeric) if numeric else 1.0


def robust_order(labels: list[str]) -> list[str]:
    """Robust settings in display order: plain training first, then by name."""
    return sorted(set(labels), key=lambda r: (r != "none", r))


def _finite_inputs(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """The per-sample input-Hessian rows with finite eigenvalues (None without data)."""
    if frame is None:
        return None
    keep = np.isfinite(frame["eig_max"].astype(float)) & np.isfinite(frame["eig_min"].astype(float))
    return frame[keep]


def _min_eig_ratio(frame: pd.DataFrame | None) -> float:
    """Most negative input-Hessian eigenvalue relative to the largest (NaN without data)."""
    if frame is None or not len(frame):
        return float("nan")
    top = float(np.max(np.abs(frame["eig_max"])))
    return float(np.min(frame["eig_min"])) / top if top > 0 else float("nan")


def _unconverged(frame: pd.DataFrame | None) -> int:
    """How many of the samples' input-Hessian solves did not converge (0 when not logged)."""
    if frame is None or "converged" not in frame:
        return 0
    return int((~frame["converged"].astype(bool)).sum())


def _reached(trial: Trial) -> float:
    """1.0 / 0.0: the final training loss is below ``target_train_loss``; NaN: no target."""
    loss = trial.metrics.get("train/loss", math.nan)
    if trial.target_loss is None:
        return math.nan
    return float(loss < trial.target_loss)


def trial_frame(sweep: Sweep, n_train: int | None = None) -> pd.DataFrame:
    """One row per kept trial with the numbers the report uses (NaN where not logged)."""
    numeric = [float(t.batch_size) for t in sweep.trials if t.batch_size != "full"]
    rows = []
    for t in sweep.trials:
        logged = t.spectra.get("input_hessian")
        inputs = _finite_inputs(logged)
        row = {
            "robust": t.robust,
            "batch_size": t.batch_size,
            "batch_value": batch_position(t.batch_size, numeric, n_train),
            "seed": t.seed,
            "epochs": float(t.epochs),
            "diverged": t.diverged,
            "train_loss": t.metrics.get("train/loss", math.nan),
            "reached_target": _reached(t),
            "min_eig_ratio": _min_eig_ratio(inputs),
            "input_samples": 0 if inputs is None else len(inputs),
            "input_unconverged": _unconverged(inputs),
            "input_nonfinite": 0 if logged is None else len(logged) - len(inputs),
            "run_id": t.run_id,
        }
        row.update({col: t.metrics.get(key, math.nan) for col, key in METRICS.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    return sort_cells(frame, extra=["seed"])


def sort_cells(frame: pd.DataFrame, extra: list[str] | None = None) -> pd.DataFrame:
    """Rows by robust setting (plain first), then batch position, then ``extra`` columns."""
    if not len(frame):
        return frame.reset_index(drop=True)
    order = {r: i for i, r in enumerate(robust_order(list(frame["robust"])))}
    keyed = frame.assign(_r=frame["robust"].map(order))
    keyed = keyed.sort_values(["_r", "batch_value", *(extra or [])], kind="stable")
    return keyed.drop(columns="_r").reset_index(drop=True)


def summary(trials: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds (std NaN for a single seed) per (robust, batch size) cell."""
    groups = trials.groupby(["robust", "batch_size", "batch_value"], sort=False)
    rows = []
    for (robust, batch, position), cell in groups:
        row = {
            "robust": robust,
            "batch_size": batch,
            "batch_value": position,
            "seeds": len(cell),
            "missed_target": int((cell["reached_target"].astype(float) == 0.0).sum()),
        }
        for col in QUANTITIES:
            values = cell[col].astype(float).dropna()
            row[f"{col}_mean"] = values.mean() if len(values) else math.nan
            row[f"{col}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        rows.append(row)
    return sort_cells(pd.DataFrame(rows))


def fmt(value: float, digits: int = 4) -> str:
    """A number for a table cell ('-' for NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def mean_std(mean: float, std: float) -> str:
    """``mean ± std``, or just the mean when there is no spread (one seed)."""
    if isinstance(std, float) and math.isnan(std):
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt(std, 2)}"


def summary_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the summary table, for Markdown and HTML alike."""
    header = ["robust", "batch size", "seeds", *QUANTITIES.values()]
    rows = [
        [
            str(r["robust"]),
            str(r["batch_size"]),
            str(r["seeds"]),
            *(mean_std(r[f"{c}_mean"], r[f"{c}_std"]) for c in QUANTITIES),
        ]
        for _, r in table.iterrows()
    ]
    return header, rows


def trial_rows(trials: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the per-trial appendix table."""
    cols = [
        "robust",
        "batch_size",
        "seed",
        "epochs",
        "train_loss",
        "reached_target",
        "test_acc",
        "adv_acc",
        "lambda_max",
        "trace",
        "input_lambda_max",
        "neg_fraction",
        "run_id",
    ]

    def cell(row: pd.Series, col: str) -> str:
        value = row[col]
        if col == "reached_target":
            return "-" if math.isnan(value) else ("yes" if value else "no")
        return fmt(value) if isinstance(value, float) else str(value)

    return cols, [[cell(r, c) for c in cols] for _, r in trials.iterrows()]
