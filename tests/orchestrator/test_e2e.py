"""End to end on local Ray: a tiny sweep lands in MLflow exactly as DESIGN.md's contract says."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn

from analysis.hessian import hessian_spectrum
from orchestrator.api import STATE_FILE, resume_experiment, run_experiment
from orchestrator.cli import main
from orchestrator.errors import NothingToDo
from orchestrator.spec import Experiment
from orchestrator.storage import join, read_text
from trainables.train import load_trained

SPEC = {
    "name": "e2e",
    "dataset": "synthetic",
    "model": "mlp",
    "batch_sizes": [32, "full"],
    "robust": [{"method": "none"}],
    "training": {"max_epochs": 2, "lr": 0.1, "eval_attack": {"method": "fgsm", "epsilon": 0.05}},
    "hessian": {
        "top_k": 2,
        "trace_rtol": 0.3,
        "density_probes": 1,
        "density_steps": 8,
        "input_samples": 8,
        "num_actors": 1,
        "cpus_per_actor": 1,
    },
}


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    exp = Experiment.from_dict(
        {**SPEC, "storage": str(root / "ray"), "tracking_uri": f"sqlite:///{root}/mlflow.db"}
    )
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = run_experiment(exp, progress=lambda _: None)
    finally:
        os.chdir(cwd)
    return exp, result, MlflowClient(result.tracking_uri), root


def _children(client, result):
    exp_id = client.get_run(result.parent_run_id).info.experiment_id
    return client.search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )


def test_parent_and_child_runs_follow_the_contract(finished):
    _, result, client, root = finished
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["hessweep.role"] == "sweep"
    assert client.get_experiment(parent.info.experiment_id).name == "e2e"
    children = _children(client, result)
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["hessweep.role"] == "trial" and run.data.tags["hessweep.trial_id"]
        params = run.data.params
        assert params["model"] == "mlp" and params["dataset"] == "synthetic"
        assert params["batch_size"] in ("32", "full") and params["robust.method"] == "none"
        assert {"lr", "seed", "robust.epsilon", "momentum"} <= set(params)
        assert not {"data_root", "device"} & set(params)
        for key in (
            "train/loss",
            "train/acc",
            "test/loss",
            "test/acc",
            "test/adv_acc",
            "grad_norm",
            "lr",
        ):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == [1, 2], key
        metrics = run.data.metrics
        assert metrics["hessian/eig_1"] >= metrics["hessian/eig_2"]
        assert {"hessian/trace", "input_hessian/eig_1_mean", "input_hessian/neg_fraction"} <= set(
            metrics
        )
        files = {a.path for a in client.list_artifacts(run.info.run_id, "spectrum")}
        assert {"spectrum/eigenvalues.parquet", "spectrum/density.parquet"} <= files
        local = client.download_artifacts(run.info.run_id, "spectrum/input_hessian.parquet")
        inputs = pq.read_table(local).to_pydict()
        assert len(inputs["eig_max"]) == 8 and all(v is True for v in inputs["converged"])
        assert metrics["input_hessian/converged_fraction"] == 1.0
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/eigenvalues.png", "plots/density.png"} <= plots
    report = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert report == {"report/report.md", "report/table.parquet"}
    assert (root / "runs/reports/e2e/table.parquet").is_file()


def test_table_holds_the_engines_numbers(finished):
    _, result, client, _ = finished
    table = result.table
    assert list(table["batch_size"]) == ["32", "full"]
    for _, row in table.iterrows():
        run = client.get_run(row["run_id"])
        assert row["lambda_max"] == pytest.approx(run.data.metrics["hessian/eig_1"])
        ckpt = run.data.tags["hessweep.checkpoint"]
        trained = load_trained(ckpt)
        local = hessian_spectrum(
            trained.model,
            nn.CrossEntropyLoss(),
            [trained.train_data.tensors()],
            top_k=2,
            dtype=torch.float64,
        )
        assert row["lambda_max"] == pytest.approx(float(local.eigenvalues[0]), rel=1e-6)


def test_resume_of_a_finished_sweep_changes_nothing(finished, capsys):
    _, result, client, root = finished
    runs = [result.parent_run_id, *(r.info.run_id for r in _children(client, result))]
    before = {rid: client.get_run(rid).data.metrics for rid in runs}
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(NothingToDo, match="already finished"):
            resume_experiment("e2e", storage=str(root / "ray"), progress=lambda _: None)
        code = main(["resume", "e2e", "--storage", str(root / "ray")])
    finally:
        os.chdir(cwd)
    assert code == 0 and "nothing to resume" in capsys.readouterr().out
    assert {rid: client.get_run(rid).data.metrics for rid in runs} == before  # time/* too


def test_resume_against_a_store_without_the_sweep_is_refused(finished, tmp_path, capsys):
    _, result, _, _ = finished
    missing = tmp_path / "elsewhere.db"
    code = main(["resume", result.sweep_dir, "--tracking-uri", f"sqlite:///{missing}"])
    err = capsys.readouterr().err
    assert code == 2 and "no such store" in err and "--tracking-uri" in err
    assert not missing.exists()  # no empty store left behind
    other = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(other).search_experiments()  # an existing store without this sweep's run
    code = main(["resume", result.sweep_dir, "--tracking-uri", other])
    err = capsys.readouterr().err
    assert code == 2 and f"no MLflow run {result.parent_run_id}" in err


def test_unreachable_tracking_store_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "demo", "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2
    assert "cannot be reached" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "ray").exists()


def test_search_spaces_and_select_keep_one_trial_per_cell(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = Experiment.from_dict(
        {
            **SPEC,
            "name": "select",
            "training": {"max_epochs": 1},
            "search": {"space": {"lr": {"grid": [0.001, 0.3]}}},
            "select": {"metric": "test/acc", "mode": "max"},
            "hessian": {"enabled": False},
            "storage": str(tmp_path / "ray"),
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        }
    )
    result = run_experiment(exp, progress=lambda _: None)
    client = MlflowClient(result.tracking_uri)
    children = _children(client, result)
    assert len(children) == 4
    assert sorted(r.data.params["lr"] for r in children) == ["0.001", "0.001", "0.3", "0.3"]
    kept = [r for r in children if r.data.tags["hessweep.selected"] == "true"]
    assert len(kept) == 2 and len(result.table) == 2
    for run in kept:
        same_cell = [
            r for r in children if r.data.params["batch_size"] == run.data.params["batch_size"]
        ]
        best = max(r.data.metrics["test/acc"] for r in same_cell)
        assert run.data.metrics["test/acc"] == best
    assert set(result.table["run_id"]) == {r.info.run_id for r in kept}


def test_cli_report_and_analyze_on_the_finished_sweep(finished, capsys, monkeypatch):
    _, result, client, root = finished
    monkeypatch.chdir(root)
    uri = result.tracking_uri
    assert main(["report", "e2e", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "Findings" in out and (root / "runs/reports/e2e/report.html").is_file()
    assert main(["report", "no-such-experiment", "--tracking-uri", uri]) == 2
    run_id = result.table["run_id"][0]
    before = client.get_run(run_id).data.metrics["hessian/eig_1"]
    assert main(["analyze", run_id, "--tracking-uri", uri]) == 0
    assert client.get_run(run_id).data.metrics["hessian/eig_1"] == pytest.approx(before, rel=1e-9)
    assert main(["analyze", "0" * 32, "--tracking-uri", uri]) == 2


def test_a_sweep_on_uri_storage_runs_resumes_and_reanalyses(ray_session, tmp_path, monkeypatch):
    """``file://`` storage takes the path every URI (s3://, gs://) takes: pyarrow for the
    state file and the sweep listing, checkpoints addressed under the sweep's URI."""
    monkeypatch.chdir(tmp_path)
    storage = (tmp_path / "remote").as_uri()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = Experiment.from_dict(
        {**SPEC, "name": "uri", "batch_sizes": [64], "storage": storage, "tracking_uri": uri}
    )
    result = run_experiment(exp, progress=lambda _: None)
    assert result.sweep_dir.startswith("file://")
    state = json.loads(read_text(join(result.sweep_dir, STATE_FILE)))
    assert state["parent_run_id"] == result.parent_run_id
    client = MlflowClient(uri)
    (child,) = _children(client, result)
    checkpoint = child.data.tags["hessweep.checkpoint"]
    assert checkpoint.startswith(result.sweep_dir + "/")
    assert "hessian/eig_1" in child.data.metrics  # the phase read the checkpoint by its URI

    client.set_terminated(result.parent_run_id, "KILLED")  # as an interrupted sweep leaves it
    again = resume_experiment("uri", storage=storage, progress=lambda _: None)
    assert again.parent_run_id == result.parent_run_id and again.sweep_dir == result.sweep_dir
    assert len(_children(client, result)) == 1
    before = client.get_run(child.info.run_id).data.metrics["hessian/eig_1"]
    assert main(["analyze", child.info.run_id, "--tracking-uri", uri]) == 0
    after = client.get_run(child.info.run_id).data.metrics["hessian/eig_1"]
    assert after == pytest.approx(before, rel=1e-9)


def test_unwritable_storage_fails_before_any_run_or_trial(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = tmp_path / "spec.yaml"
    storage = str(tmp_path / "a-file" / "ray")
    spec.write_text(yaml.safe_dump({**SPEC, "storage": storage, "tracking_uri": uri}))
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "storage" in err and "writable folder or URI" in err
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(ids) == []
