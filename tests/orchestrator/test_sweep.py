"""The sweep's Tune set-up: the progress table names the sweep folder, not Ray's staging."""

from __future__ import annotations

from ray import tune

from orchestrator.spec import Experiment
from orchestrator.sweep import SweepReporter, reporter


def test_the_progress_table_names_the_sweep_folder(monkeypatch):
    staged = "\n".join(
        [
            "== Status ==",
            "Result logdir: /tmp/ray/session_x/artifacts/demo-1/driver_artifacts",
            "Number of trials: 2/2 (2 RUNNING)",
        ]
    )
    monkeypatch.setattr(tune.CLIReporter, "_progress_str", lambda self, *a, **kw: staged)
    exp = Experiment.from_dict({"name": "t", "batch_sizes": [16], "robust": [{"method": "none"}]})
    rep = reporter(exp, "/data/sweeps/t-20260101-000000")
    assert isinstance(rep, SweepReporter)
    assert rep._progress_str([], False).split("\n") == [
        "== Status ==",
        "Sweep folder: /data/sweeps/t-20260101-000000",
        "Number of trials: 2/2 (2 RUNNING)",
    ]
    secret = reporter(exp, "s3://b/t-20260101-000000?secret_key=hunter2&region=eu-west-1")
    line = secret._progress_str([], False).split("\n")[1]
    assert line == "Sweep folder: s3://b/t-20260101-000000?secret_key=***&region=eu-west-1"
