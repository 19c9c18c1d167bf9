"""A sweep whose driver is killed mid-training resumes without duplicate runs or steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from orchestrator.api import resume_experiment

REPO = Path(__file__).resolve().parents[2]

SPEC = {
    "name": "killed",
    "dataset": "synthetic",
    "model": "mlp",
    "batch_sizes": [8, 16],
    "training": {"max_epochs": 150, "lr": 0.02},
    "hessian": {"top_k": 1, "trace": False, "density": False, "input_samples": 4},
}


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "train/loss")]


def _children(client: MlflowClient):
    exp = client.get_experiment_by_name("killed")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.`hessweep.role` = 'trial'")


def _run_until_epochs(tmp_path: Path, stop: int) -> tuple[MlflowClient, subprocess.Popen, Path]:
    """Start `hessweep run` in its own process group; send ``stop`` to the group once a
    trial has logged 3 epochs (a terminal's Ctrl-C reaches the whole group too)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = tmp_path / "killed.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "storage": str(tmp_path / "ray"), "tracking_uri": uri}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", str(spec)],
            cwd=tmp_path,
            env=env,
            start_new_session=True,
            stdout=out,
            stderr=out,
        )
    deadline = time.time() + 420
    # Touch the store only once the driver has created it (it writes the sweep state after
    # creating its experiment): two processes initialising one SQLite file race.
    while not list((tmp_path / "ray").glob("killed-*/hessweep.json")):
        assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    client = MlflowClient(uri)
    try:
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                runs = _children(client)
                if runs and max(len(_steps(client, r.info.run_id)) for r in runs) >= 3:
                    break
            except Exception:  # the store may not exist yet
                continue
        else:
            raise AssertionError(
                f"the sweep never logged 3 epochs; driver log:\n{log.read_text()[-3000:]}"
            )
    finally:
        os.killpg(proc.pid, stop)
    return client, proc, log


def test_ctrl_c_mid_sweep_stops_it_resumably_without_analysing_partial_models(tmp_path):
    client, proc, log = _run_until_epochs(tmp_path, signal.SIGINT)
    try:
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    (sweep,) = (tmp_path / "ray").glob("killed-*")
    assert code == 130, text[-3000:]
    assert f"continue with `hessweep resume {sweep}`" in text
    assert "Traceback" not in text
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("killed").experiment_id],
        filter_string="tags.`hessweep.role` = 'sweep'",
    )
    assert parent.info.status == "KILLED"  # so `resume` continues it (FINISHED: nothing to do)
    for run in _children(client):
        assert len(_steps(client, run.info.run_id)) < 150
        assert "hessian/eig_1" not in run.data.metrics  # no Hessian phase on unfinished trials


def test_driver_killed_mid_sweep_resumes_without_duplicates(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client, proc, _ = _run_until_epochs(tmp_path, signal.SIGKILL)
    proc.wait()
    before = {r.info.run_id: _steps(client, r.info.run_id) for r in _children(client)}
    assert all(len(s) < 150 for s in before.values()), "killed too late to test a resume"

    result = resume_experiment("killed", storage=str(tmp_path / "ray"), progress=lambda _: None)
    after = _children(client)
    assert len(after) == 2
    assert set(before) <= {r.info.run_id for r in after}
    for run in after:
        steps = _steps(client, run.info.run_id)
        assert steps == sorted(set(steps)), "a step was logged twice"
        assert steps == list(range(1, len(steps) + 1))
        assert run.data.metrics["hessian/eig_1"] > 0
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert len(result.table) == 2
    # Both trials finished under the second driver, which also pruned what the first left.
    kept = {
        trial.name: sorted(c.name for c in trial.glob("checkpoint_*"))
        for trial in Path(result.sweep_dir).iterdir()
        if trial.is_dir() and any(trial.glob("checkpoint_*"))
    }
    assert len(kept) == 2 and all(len(c) == 2 for c in kept.values()), kept
