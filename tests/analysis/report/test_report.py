"""build_report on a tiny finished sweep: figures, HTML, Markdown, MLflow artifacts, errors."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import struct
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from analysis.report import SUPPORTED, ReportError, build_report
from analysis.report.collect import collect_sweep
from analysis.report.figures import FIGURES, ReportData, landscape_figure
from analysis.report.landscapes import report_landscapes
from analysis.report.table import summary, trial_frame

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPEC = {
    "name": "paper",
    "dataset": "synthetic",
    "model": "mlp",
    "batch_sizes": [32, "full"],
    "robust": [{"method": "none"}, {"method": "fgsm", "epsilon": 0.1}],
    "training": {
        "max_epochs": 2,
        "lr": 0.1,
        "hessian_every": 1,
        "eval_attack": {"method": "fgsm", "epsilon": 0.05},
    },
    "hessian": {
        "top_k": 1,
        "trace": False,
        "density_probes": 1,
        "density_steps": 8,
        "input_samples": 8,
        "num_actors": 1,
        "cpus_per_actor": 1,
    },
}


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """The report's small Hessian solves run faster on one thread on shared CPUs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    from orchestrator.api import run_experiment
    from orchestrator.spec import Experiment

    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    exp = Experiment.from_dict({**SPEC, "storage": str(root / "ray"), "tracking_uri": uri})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = run_experiment(exp, progress=lambda _: None)
    return result, uri, root


@pytest.fixture(scope="module")
def report(sweep):
    _, uri, root = sweep
    messages: list[str] = []
    out = build_report("paper", tracking_uri=uri, out_dir=root / "out", progress=messages.append)
    return out, messages


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_every_figure_is_a_valid_non_empty_png(report):
    out, _ = report
    assert sorted(p.name for p in out.figures) == sorted(name for name, _ in FIGURES)
    for path in out.figures:
        data = path.read_bytes()
        width, height = _png_size(data)
        assert width >= 400 and height >= 300 and len(data) > 5000, path.name
        assert data.endswith(b"IEND\xaeB`\x82"), path.name


def test_html_embeds_every_figure_and_needs_no_other_file(report):
    out, _ = report
    page = out.html.read_text()
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == len(out.figures)
    assert {base64.b64decode(u) for u in uris} == {p.read_bytes() for p in out.figures}
    assert "figures/" not in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for finding in out.findings:
        assert finding.verdict in page


def test_markdown_has_findings_table_and_figure_links(report):
    out, _ = report
    md = out.markdown.read_text()
    assert out.markdown.name == "report.md" and out.html.name == "report.html"
    for path in out.figures:
        assert f"](figures/{path.name})" in md
    assert "## Findings" in md and "## Results: mean ± std over seeds" in md
    assert [f.number for f in out.findings] == [1, 2, 3, 4]
    for f in out.findings:
        assert f"### {f.number}. **{f.verdict}**" in md
    # two batch sizes cannot show a trend in batch size
    assert out.findings[0].verdict == "Not enough data"
    assert "a trend needs 3" in out.findings[0].evidence[0]


def test_table_holds_mlflow_numbers_per_cell(sweep, report):
    _, uri, _ = sweep
    out, _ = report
    client = MlflowClient(uri)
    table = out.table
    assert len(table) == 4 and set(table["seeds"]) == {1}
    assert list(table["robust"]) == ["none", "none", "fgsm-0.1", "fgsm-0.1"]
    assert list(table["batch_size"]) == ["32", "full", "32", "full"]
    assert table.loc[table["batch_size"] == "full", "batch_value"].eq(256.0).all()
    for _, row in out.trials.iterrows():
        metrics = client.get_run(row["run_id"]).data.metrics
        assert row["lambda_max"] == pytest.approx(metrics["hessian/eig_1"])
        assert row["adv_acc"] == pytest.approx(metrics["test/adv_acc"])
        assert row["input_samples"] == 8


def test_report_is_logged_on_the_parent_run_beside_the_orchestrators(sweep, report):
    result, uri, _ = sweep
    out, messages = report
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {
        "report/report.md",
        "report/table.parquet",
        "report/paper_report.md",
        "report/paper_report.html",
        "report/paper_findings.json",
        "report/figures",
    } <= logged
    figures = {a.path for a in client.list_artifacts(result.parent_run_id, "report/figures")}
    assert figures == {f"report/figures/{p.name}" for p in out.figures}
    local = client.download_artifacts(result.parent_run_id, "report/paper_findings.json")
    findings = json.loads(Path(local).read_text())
    assert [f["verdict"] for f in findings] == [f.verdict for f in out.findings]
    assert any("logged on MLflow run" in m for m in messages)


def test_curvature_tracked_during_training_reaches_the_report(sweep, report):
    result, uri, _ = sweep
    data = collect_sweep(uri, parent_run_id=result.parent_run_id, progress=lambda _: None)
    for trial in data.trials:
        assert list(trial.curvature["epoch"]) == [1, 2]
        assert (trial.curvature["value"] > 0).all()


def test_parent_run_id_selects_the_same_sweep(sweep, report):
    result, uri, _ = sweep
    out, _ = report
    by_id = collect_sweep(uri, parent_run_id=result.parent_run_id, progress=lambda _: None)
    by_name = collect_sweep(uri, "paper", progress=lambda _: None)
    assert by_id.parent_run_id == by_name.parent_run_id == out.parent_run_id
    assert by_id.experiment == "paper" and by_id.status == "FINISHED"
    assert [t.run_id for t in by_id.trials] == [t.run_id for t in by_name.trials]
    assert sorted(t.run_id for t in by_id.trials) == sorted(out.trials["run_id"])


def test_unreachable_checkpoints_skip_the_landscape_with_a_note(sweep, tmp_path):
    result, uri, _ = sweep
    data = collect_sweep(uri, parent_run_id=result.parent_run_id, progress=lambda _: None)
    remote = dataclasses.replace(
        data,
        trials=tuple(dataclasses.replace(t, checkpoint="s3://bucket/ckpt") for t in data.trials),
    )
    lands = report_landscapes(remote, progress=lambda _: None)
    assert lands.cells == () and len(lands.notes) == 4
    assert all("checkpoint not readable here (s3://bucket/ckpt)" in n for n in lands.notes)
    trials = trial_frame(remote)
    skipped = landscape_figure(
        ReportData(remote, trials, summary(trials), lands), tmp_path / "landscape_1d.png"
    )
    assert isinstance(skipped, str) and "s3://bucket/ckpt" in skipped
    assert not (tmp_path / "landscape_1d.png").exists()


def test_report_without_landscapes_needs_no_checkpoint(sweep, tmp_path):
    _, uri, _ = sweep
    out = build_report(
        "paper",
        tracking_uri=uri,
        out_dir=tmp_path,
        log_to_mlflow=False,
        progress=lambda _: None,
        landscape=False,
    )
    assert len(out.figures) == len(FIGURES) - 1
    assert not (tmp_path / "figures" / "landscape_1d.png").exists()
    assert any("landscape_1d.png skipped" in n for n in out.notes)
    assert "landscape_1d.png skipped" in out.markdown.read_text()


def test_unknown_experiment_or_run_is_a_clear_error(sweep):
    _, uri, _ = sweep
    with pytest.raises(ReportError, match=r"no MLflow experiment called 'nope'; known: .*paper"):
        build_report("nope", tracking_uri=uri, log_to_mlflow=False)
    with pytest.raises(ReportError, match="no MLflow run with id 'abc'"):
        build_report(parent_run_id="abc", tracking_uri=uri, log_to_mlflow=False)
    with pytest.raises(ReportError, match="experiment name or a parent run id"):
        build_report(tracking_uri=uri, log_to_mlflow=False)


def test_saddle_free_check_runs_on_the_logged_input_hessians(report):
    out, _ = report
    f4 = out.findings[3]
    assert f4.statistics["samples"] == 32
    assert f4.verdict == SUPPORTED  # ReLU + softmax cross-entropy: PSD input Hessians
