"""Load: 64 tiny trials on 2 CPUs all land in MLflow, every run with every epoch.

About a minute on 2 cores (trial actors are reused); `-s` prints the tracking overhead.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.api import run_experiment
from orchestrator.spec import Experiment


@pytest.mark.timeout(900)
def test_64_trials_all_tracked(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = Experiment.from_dict(
        {
            "name": "load",
            "dataset": "synthetic",
            "model": "mlp",
            "batch_sizes": [8, 16, 24, 32, 48, 64, 128, "full"],
            "robust": [{"method": "none"}, {"method": "fgsm", "epsilon": 0.05}],
            "seeds": [0, 1, 2, 3],
            "training": {"max_epochs": 2, "lr": 0.05, "eval_attack": {"method": "none"}},
            "hessian": {"enabled": False},
            "resources": {"cpus": 0.25},
            "storage": str(tmp_path / "ray"),
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        }
    )
    assert exp.num_cells == 64
    result = run_experiment(exp, progress=lambda _: None)
    client = MlflowClient(result.tracking_uri)
    exp_id = client.get_experiment_by_name("load").experiment_id
    runs = client.search_runs([exp_id], "tags.`hessweep.role` = 'trial'", max_results=1000)
    assert len(runs) == 64 and len(result.table) == 64
    assert all(r.info.status == "FINISHED" for r in runs)
    cells = {
        (r.data.params["batch_size"], r.data.params["robust.method"], r.data.params["seed"])
        for r in runs
    }
    assert len(cells) == 64
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == [1, 2]
    share = result.timings["tracking_s"] / result.timings["training_s"]
    print(
        f"tracking overhead: {result.timings['tracking_s']:.2f}s of "
        f"{result.timings['training_s']:.1f}s training ({100 * share:.1f}%)"
    )
    assert share < 1
