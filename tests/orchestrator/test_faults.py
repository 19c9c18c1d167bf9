"""Faults survived: a trial's worker killed mid-training (its last checkpoint possibly
truncated) resumes from the newest readable checkpoint and loses nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.tune import Callback

import orchestrator.api as api
from orchestrator.spec import Experiment
from trainables.train import load_trained

SPEC = {
    "dataset": "synthetic",
    "model": "mlp",
    "batch_sizes": [16],
    "training": {"max_epochs": 6, "lr": 0.05},
    "hessian": {"enabled": False},
    "max_failures": 2,
}


class KillWorkerOnce(Callback):
    """SIGKILL the trial's worker process right after it reports ``epoch`` (optionally
    truncating the checkpoint it just wrote, as a crash mid-write would)."""

    def __init__(self, epoch: int, corrupt: bool = False) -> None:
        self.epoch = epoch
        self.corrupt = corrupt
        self.killed: list[int] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.killed and result.get("epoch") == self.epoch:
            if self.corrupt:
                file = Path(trial.checkpoint.path) / "checkpoint.pt"
                file.write_bytes(file.read_bytes()[:64])
            self.killed.append(result["pid"])
            os.kill(result["pid"], signal.SIGKILL)


def _run(name: str, tmp_path, killer: Callback | None):
    exp = Experiment.from_dict(
        {
            **SPEC,
            "name": name,
            "storage": str(tmp_path / "ray"),
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        }
    )
    original = api.build_tuner

    def with_killer(exp, run_name, callbacks):
        return original(exp, run_name, callbacks + ([killer] if killer else []))

    api.build_tuner = with_killer
    try:
        return api.run_experiment(exp, progress=lambda _: None)
    finally:
        api.build_tuner = original


@pytest.fixture(scope="module")
def undisturbed(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = _run("undisturbed", root, None)
    finally:
        os.chdir(cwd)
    client = MlflowClient(result.tracking_uri)
    (row,) = result.table.itertuples()
    return load_trained(client.get_run(row.run_id).data.tags["hessweep.checkpoint"])


@pytest.mark.parametrize("corrupt", [False, True], ids=["killed", "killed+corrupt-checkpoint"])
def test_killed_trial_worker_loses_nothing(undisturbed, corrupt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    killer = KillWorkerOnce(epoch=3, corrupt=corrupt)
    killed = _run("killed-worker", tmp_path, killer)
    assert killer.killed, "the worker was never killed"
    client = MlflowClient(killed.tracking_uri)
    (row,) = killed.table.itertuples()
    run = client.get_run(row.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(row.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    exp_id = run.info.experiment_id
    assert len(client.search_runs([exp_id], "tags.`hessweep.role` = 'trial'")) == 1
    a = load_trained(run.data.tags["hessweep.checkpoint"]).model.state_dict()
    for key, value in undisturbed.model.state_dict().items():
        assert torch.equal(a[key], value), key
