"""Connecting to the tracking store: several processes may create a new SQLite store at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import clean_params
from trainables.config import parse_config

CONNECT = "import sys; from orchestrator.tracking import connect; connect(sys.argv[1])"


def test_processes_creating_one_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    # Without the lock around MLflow's table creation three of four such processes failed
    # (alembic "expected to match one row", or "table ... already exists").
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONNECT, uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    failed = [out for p, out in zip(procs, outs, strict=True) if p.returncode != 0]
    assert not failed, failed[0][-2000:]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("Default") is not None


def _logged(robust: dict, eval_attack: dict) -> dict[str, str]:
    """The params a trial with these attack settings logs to MLflow."""
    return clean_params(parse_config({"robust": robust, "eval_attack": eval_attack}).to_flat_dict())


def test_params_leave_out_settings_the_attack_method_ignores() -> None:
    plain = _logged({"method": "none"}, {"method": "none"})
    assert sorted(k for k in plain if k.startswith(("robust.", "eval_attack."))) == [
        "eval_attack.epsilon",
        "eval_attack.method",
        "robust.epsilon",  # the contract's param on every run (0: no perturbation)
        "robust.method",
    ]
    fgsm = _logged({"method": "fgsm", "epsilon": 0.1}, {"method": "fgsm", "epsilon": 0.1})
    assert {"robust.epsilon", "robust.adv_fraction", "eval_attack.epsilon"} <= set(fgsm)
    assert not {"robust.steps", "robust.step_size", "eval_attack.steps"} & set(fgsm)
    pgd = _logged({"method": "pgd", "epsilon": 0.1, "steps": 3}, {"method": "pgd", "epsilon": 0.1})
    assert pgd["robust.steps"] == "3" and pgd["robust.step_size"] == "null"
    assert pgd["eval_attack.steps"] == "10" and "lr" in pgd and "device" not in pgd


class _Trial:
    """What the callback reads of a Tune trial."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id, self.config, self.checkpoint = trial_id, {"batch_size": 32}, None
        self.last_result: dict = {}


def _history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]


def _callback(tmp_path: Path):
    from orchestrator.tracking import TrackingCallback, connect, experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = connect(uri)
    exp_id = experiment_id(client, "buffered", str(tmp_path / "artifacts"))
    parent = client.create_run(exp_id).info.run_id
    return client, TrackingCallback(uri, exp_id, parent)


def test_epoch_metrics_are_buffered_and_written_in_order(tmp_path: Path, monkeypatch) -> None:
    from orchestrator import tracking

    client, callback = _callback(tmp_path)
    a, b = _Trial("a"), _Trial("b")
    calls = []
    monkeypatch.setattr(tracking, "log_batch", lambda *args, **kw: calls.append(args[1]))
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 3600.0)
    for epoch in (1, 2, 3):
        for trial in (a, b):
            callback.on_trial_result(0, [a, b], trial, {"epoch": epoch, "train/loss": 1 / epoch})
    callback.on_trial_result(0, [a, b], a, {"epoch": 3, "train/loss": 9.0})  # a repeat: dropped
    assert calls == [callback.child_run_id("a"), callback.child_run_id("b")]  # params only
    monkeypatch.undo()

    callback.on_trial_complete(0, [a, b], a)  # a's epochs, then its end
    run_a, run_b = callback.child_run_id("a"), callback.child_run_id("b")
    assert _history(client, run_a) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert _history(client, run_b) == []
    callback.on_experiment_end([a, b])  # what b had buffered
    assert _history(client, run_b) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert client.get_run(run_a).info.status == "FINISHED"

    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 0.0)  # due at once: written as reported
    callback.on_trial_result(0, [b], b, {"epoch": 4, "train/loss": 0.25})
    assert _history(client, run_b)[-1] == (4, 0.25)


def test_snapshots_steps_and_failed_writes_lose_no_epoch(tmp_path: Path, monkeypatch) -> None:
    from orchestrator import tracking

    client, callback = _callback(tmp_path)
    a = _Trial("a")
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 3600.0)
    callback.on_trial_result(0, [a], a, {"epoch": 1, "train/loss": 1.0})
    run = callback.child_run_id("a")
    assert callback.get_state() is None  # Tune's snapshot: written first, no state file
    assert _history(client, run) == [(1, 1.0)]

    callback.on_trial_result(0, [a], a, {"epoch": 2, "train/loss": 0.5})
    real = tracking.log_batch

    def down(*args, **kwargs):
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(tracking, "log_batch", down)
    with pytest.raises(ConnectionError):
        callback.flush()
    monkeypatch.setattr(tracking, "log_batch", real)
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 0.0)
    callback.on_step_end(0, [a])  # due: the epoch kept from the failed write goes out
    assert _history(client, run) == [(1, 1.0), (2, 0.5)]
