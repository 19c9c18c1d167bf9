"""The sweep's results table: one row per kept trial, as Parquet, Markdown and terminal text."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.sweep import cell_key

TOP_K = re.compile(r"hessian/eig_\d+")

COLUMNS = (
    "batch_size",
    "robust",
    "seed",
    "lr",
    "epochs",
    "train_loss",
    "test_acc",
    "adv_acc",
    "lambda_max",
    "top_k",
    "trace",
    "input_eig_mean",
    "neg_fraction",
    "reached_target",
    "diverged",
    "trial_id",
    "run_id",
)


def trial_row(
    trial_id: str, run_id: str, config: dict[str, Any], last: dict[str, Any], metrics: dict
) -> dict[str, Any]:
    """One table row from a trial's config, its last epoch report and its Hessian metrics."""
    batch, robust, seed = cell_key(config)
    eig = [
        metrics[k]
        for k in sorted(
            (k for k in metrics if TOP_K.fullmatch(k)),
            key=lambda k: int(k.split("_")[-1]),
        )
    ]
    return {
        "batch_size": batch,
        "robust": robust,
        "seed": seed,
        # the lr trained at (after lr_scaling); the config's is the base lr before it
        "lr": _num(last.get("peak_lr", config.get("lr"))),
        "epochs": int(last.get("epoch", 0)),
        "train_loss": _num(last.get("train/loss")),
        "test_acc": _num(last.get("test/acc")),
        "adv_acc": _num(last.get("test/adv_acc")),
        "lambda_max": eig[0] if eig else float("nan"),
        "top_k": eig,
        "trace": _num(metrics.get("hessian/trace")),
        "input_eig_mean": _num(metrics.get("input_hessian/eig_1_mean")),
        "neg_fraction": _num(metrics.get("input_hessian/neg_fraction")),
        "reached_target": (
            None if config.get("target_train_loss") is None else bool(last.get("converged"))
        ),  # None: no target to reach
        "diverged": bool(last.get("diverged", False)),
        "trial_id": trial_id,
        "run_id": run_id,
    }


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def build_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows sorted by robust setting, then batch size (numeric, 'full' last), then seed."""
    table = pd.DataFrame(rows, columns=list(COLUMNS))

    def batch_order(b: str) -> float:
        return math.inf if b == "full" else float(b)

    if len(table):
        table = table.assign(_b=table["batch_size"].map(batch_order))
        table = table.sort_values(["robust", "_b", "seed"]).drop(columns="_b")
    return table.reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of the main columns."""
    cols = [c for c in COLUMNS if c not in ("top_k", "trial_id", "run_id")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def save_table(table: pd.DataFrame, folder: Path, header: str) -> tuple[Path, Path]:
    """Write table.parquet and table.md into ``folder``; return both paths.

    Not report.md: that is ``hessweep report``'s paper report, which a later run or resume
    of the same experiment would otherwise overwrite with this table.
    """
    folder.mkdir(parents=True, exist_ok=True)
    parquet, md = folder / "table.parquet", folder / "table.md"
    table.to_parquet(parquet, index=False)
    md.write_text(f"{header}\n\n{to_markdown(table)}\n")
    return parquet, md
