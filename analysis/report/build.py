"""``build_report``: a finished sweep in MLflow -> the paper's tables, figures and findings.

Reads only MLflow (plus the trials' checkpoints for the landscape figure, when this
machine can read them), writes ``report.md``, ``report.html`` and ``figures/*.png`` under
``runs/reports/<experiment>/``, and logs them on the sweep's parent run under ``report/``
as ``paper_report.md``, ``paper_report.html``, ``paper_findings.json`` and ``figures/``
(beside the orchestrator's own ``report/report.md`` and ``report/table.parquet``).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.report.collect import Sweep, collect_sweep
from analysis.report.figures import FigureFile, ReportData, make_figures
from analysis.report.findings import RULES, Finding, all_findings
from analysis.report.landscapes import LandscapeSet, report_landscapes
from analysis.report.render import (
    Block,
    Bullets,
    Heading,
    Image,
    Paragraph,
    Table,
    to_html,
    to_markdown,
)
from analysis.report.table import summary, summary_rows, trial_frame, trial_rows

REPORTS_DIR = Path("runs/reports")
ARTIFACT_DIR = "report"


@dataclass(frozen=True, eq=False)
class ReportResult:
    """What ``build_report`` wrote, and the findings and summary table it computed."""

    markdown: Path
    html: Path
    figures: tuple[Path, ...]
    findings: tuple[Finding, ...]
    table: pd.DataFrame
    trials: pd.DataFrame
    parent_run_id: str
    notes: tuple[str, ...]


def document(
    sweep: Sweep,
    trials: pd.DataFrame,
    table: pd.DataFrame,
    findings: list[Finding],
    figures: list[FigureFile],
    notes: list[str],
) -> list[Block]:
    """The report's blocks: header, findings, table, figures, rules, per-trial appendix."""
    p = sweep.params
    what = ", ".join(
        f"{k} `{p[k]}`" for k in ("dataset", "model", "batch_sizes", "robust", "seeds") if k in p
    )
    blocks: list[Block] = [
        Heading(1, f"Paper report: {sweep.experiment}"),
        Paragraph(
            f"Sweep `{sweep.run_name}` (MLflow parent run `{sweep.parent_run_id}`, status "
            f"{sweep.status}) at `{sweep.tracking_uri}`: {len(trials)} trial(s). {what}."
        ),
        Paragraph(
            "Reproduces the checks of Yao et al., *Hessian-based Analysis of Large Batch "
            "Training and Robustness to Adversaries* (NeurIPS 2018) on this sweep alone."
        ),
        Heading(2, "Findings"),
        Table(
            ("#", "claim", "verdict"),
            tuple((str(f.number), f.claim, f"**{f.verdict}**") for f in findings),
        ),
    ]
    for f in findings:
        blocks += [Heading(3, f"{f.number}. **{f.verdict}**: {f.claim}"), Bullets(f.evidence)]
    header, rows = summary_rows(table)
    blocks += [
        Heading(2, "Results: mean ± std over seeds"),
        Table(tuple(header), tuple(tuple(r) for r in rows)),
        Heading(2, "Figures"),
    ]
    for fig in figures:
        blocks.append(Image(fig.path, fig.title, fig.caption))
    if notes:
        blocks += [Heading(2, "Notes"), Bullets(tuple(notes))]
    header, rows = trial_rows(trials)
    blocks += [
        Heading(2, "How verdicts are decided"),
        Bullets(RULES),
        Heading(2, "Appendix: every trial"),
        Table(tuple(header), tuple(tuple(r) for r in rows)),
    ]
    return blocks


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def findings_json(findings: list[Finding]) -> str:
    """The findings as JSON (NaN as null), for scripts and the MLflow artifact view."""
    return json.dumps([_json_safe(asdict(f)) for f in findings], indent=2)


def log_on_parent(tracking_uri: str, parent_run_id: str, folder: Path, findings: str) -> None:
    """Log the report on the parent run as report/paper_report.{md,html}, figures, findings."""
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="hessweep-report-") as tmp:
        staging = Path(tmp)
        shutil.copy(folder / "report.md", staging / "paper_report.md")
        shutil.copy(folder / "report.html", staging / "paper_report.html")
        (staging / "paper_findings.json").write_text(findings)
        shutil.copytree(folder / "figures", staging / "figures")
        client.log_artifacts(parent_run_id, str(staging), ARTIFACT_DIR)


def build_report(
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    *,
    tracking_uri: str,
    out_dir: Path | None = None,
    log_to_mlflow: bool = True,
    progress: Callable[[str], Any] = print,
    landscape: bool = True,
) -> ReportResult:
    """The paper's report for the newest sweep of ``experiment_name`` (or ``parent_run_id``).

    Writes ``report.md``, ``report.html`` (self-contained) and ``figures/*.png`` into
    ``out_dir`` (default ``runs/reports/<experiment>``, beside the run's ``table.md``) and,
    with ``log_to_mlflow``, logs them on the parent run under ``report/``, where this
    superset replaces the table-only ``report.md`` the run logged. ``landscape=False``
    skips the one part that loads checkpoints and solves Hessians (slow for big models on
    a CPU). Raises ``ReportError`` when there is no such experiment or sweep, or nothing
    finished to report on.
    """
    sweep = collect_sweep(tracking_uri, experiment_name, parent_run_id, progress)
    if landscape:
        landscapes = report_landscapes(sweep, progress)
    else:
        landscapes = LandscapeSet((), ("not computed (landscape=False)",), None, math.nan)
    trials = trial_frame(sweep, landscapes.n_train)
    table = summary(trials)
    findings = all_findings(trials)
    folder = Path(out_dir) if out_dir is not None else REPORTS_DIR / sweep.experiment
    figures_dir = folder / "figures"
    if figures_dir.exists():
        shutil.rmtree(figures_dir)
    data = ReportData(sweep, trials, table, landscapes)
    figures, figure_notes = make_figures(data, figures_dir)
    notes = [
        *sweep.notes,
        *(f"landscape: {n}" for n in landscapes.notes),
        *figure_notes,
    ]
    if landscapes.cells:
        notes.append(
            f"landscape axis: a in [-{landscapes.radius:.3g}, {landscapes.radius:.3g}] "
            "(the sharpest model's loss rises by about 2 at the ends)"
        )
    blocks = document(sweep, trials, table, findings, figures, notes)
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(to_markdown(blocks, folder))
    page.write_text(to_html(blocks, f"hessweep report: {sweep.experiment}"))
    progress(f"report: wrote {md} and {page} ({len(figures)} figures)")
    for f in findings:
        progress(f"report: finding {f.number}: {f.verdict}")
    if log_to_mlflow:
        log_on_parent(tracking_uri, sweep.parent_run_id, folder, findings_json(findings))
        progress(f"report: logged on MLflow run {sweep.parent_run_id} under {ARTIFACT_DIR}/")
    return ReportResult(
        markdown=md,
        html=page,
        figures=tuple(f.path for f in figures),
        findings=tuple(findings),
        table=table,
        trials=trials,
        parent_run_id=sweep.parent_run_id,
        notes=tuple(notes),
    )
