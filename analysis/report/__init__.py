"""The paper's report from a finished sweep in MLflow: tables, figures and a findings check.

``build_report(experiment_name, tracking_uri=...)`` reads the newest sweep of an experiment
(or a given parent run) from MLflow alone, and writes Markdown and self-contained HTML with
the figures and a verdict on each of the paper's four findings.
"""

from analysis.report.build import ReportResult, build_report
from analysis.report.collect import ReportError
from analysis.report.findings import NOT_ENOUGH, NOT_SUPPORTED, SUPPORTED, Finding, all_findings

__all__ = [
    "NOT_ENOUGH",
    "NOT_SUPPORTED",
    "SUPPORTED",
    "Finding",
    "ReportError",
    "ReportResult",
    "all_findings",
    "build_report",
]
