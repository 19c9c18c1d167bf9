"""Connecting to the tracking store: several processes may create a new SQLite store at once."""

from __future__ import annotations

import os
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


def test_params_leave_out_monitoring_and_settings_nothing_reads() -> None:
    default = clean_params(parse_config({}).to_flat_dict())
    assert not {"hessian_every", "lr_schedule.factor", "lr_schedule.epochs"} & set(default)
    assert "base_batch_size" not in default  # lr_scaling none: never read
    assert default["lr_schedule.type"] == "constant"
    assert "lr_schedule.factor" not in clean_params(
        parse_config({"lr_schedule": "cosine", "hessian_every": 2}).to_flat_dict()
    )
    step = {"lr_schedule": {"type": "step", "epochs": [5]}, "lr_scaling": "sqrt"}
    kept = clean_params(parse_config(step).to_flat_dict())
    assert kept["lr_schedule.factor"] == "0.1" and kept["lr_schedule.epochs"] == "[5]"
    assert kept["base_batch_size"] == "64"


def test_batches_keep_every_request_within_mlflows_entity_limit() -> None:
    from orchestrator.tracking import batches

    metrics, params, tags = list(range(900)), [f"p{i}" for i in range(150)], ["t"] * 100
    chunks = list(batches(metrics, params, tags))
    for m, p, t in chunks:
        assert len(m) + len(p) + len(t) <= 1000 and len(p) <= 100 and len(t) <= 100
    assert [x for m, _, _ in chunks for x in m] == metrics  # all of them, in order
    assert [x for _, p, _ in chunks for x in p] == params
    assert sum(len(t) for _, _, t in chunks) == 100
    assert list(batches([], [], [])) == []


def test_connect_shortens_http_retries_only_for_its_own_check(monkeypatch) -> None:
    from orchestrator import tracking

    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    seen = {}

    class Client:
        def __init__(self, tracking_uri: str) -> None:
            self.tracking_uri = tracking_uri

        def search_experiments(self, max_results: int) -> list:
            seen.update({key: os.environ.get(key) for key in keys})
            return []

    monkeypatch.setattr(tracking, "MlflowClient", Client)
    tracking.connect("http://127.0.0.1:9")
    assert seen == {keys[0]: "1", keys[1]: "10"}
    assert not set(keys) & set(os.environ)  # the sweep's writes keep MLflow's defaults
    monkeypatch.setenv(keys[1], "60")  # a user's own value stays
    tracking.connect("http://127.0.0.1:9")
    assert seen[keys[1]] == "60" and os.environ[keys[1]] == "60"


def test_a_failed_write_during_the_sweep_warns_and_loses_nothing(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from mlflow.exceptions import MlflowException

    from orchestrator import tracking

    client, callback = _callback(tmp_path)
    a = _Trial("a")
    callback.on_trial_start(0, [a], a)
    run = callback.child_run_id("a")
    real, failures = tracking.log_batch, [MlflowException("503 Service Unavailable")] * 2

    def flaky(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(tracking, "log_batch", flaky)
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 0.0)
    callback.on_trial_result(0, [a], a, {"epoch": 1, "train/loss": 1.0})  # the write fails
    callback.get_state()  # Tune's snapshot: fails again, still no exception
    err = capsys.readouterr().err
    assert err.count("MLflow write failed") == 1 and "503 Service Unavailable" in err
    callback.on_trial_result(0, [a], a, {"epoch": 2, "train/loss": 0.5})  # the store is back
    assert _history(client, run) == [(1, 1.0), (2, 0.5)]

    failures.extend([MlflowException("down for good")] * 9)
    callback.on_trial_result(0, [a], a, {"epoch": 3, "train/loss": 0.25})
    assert "down for good" in capsys.readouterr().err  # a new outage warns again
    with pytest.raises(MlflowException):  # the experiment's end: the last chance, raised
        callback.on_experiment_end([a])
    failures.clear()
    callback.flush()
    assert _history(client, run)[-1] == (3, 0.25)


def test_a_child_run_found_again_gets_its_params(tmp_path: Path, monkeypatch) -> None:
    from orchestrator import tracking

    client, callback = _callback(tmp_path)
    a = _Trial("a")
    real = tracking.log_batch

    def params_lost(*args, **kwargs):
        raise ConnectionError("the driver died between create_run and log_batch")

    monkeypatch.setattr(tracking, "log_batch", params_lost)
    with pytest.raises(ConnectionError):
        callback.on_trial_start(0, [a], a)
    monkeypatch.setattr(tracking, "log_batch", real)
    for _ in range(2):  # a restored sweep's callback, twice: the same values are taken again
        restored = tracking.TrackingCallback(
            callback.tracking_uri, callback.exp_id, callback.parent_run_id
        )
        restored.on_trial_restore(0, [a], a)
    runs = client.search_runs([callback.exp_id], "tags.`hessweep.role` = 'trial'")
    assert [r.info.run_id for r in runs] == [restored.child_run_id("a")]  # found, not made
    params = runs[0].data.params
    assert params["batch_size"] == "32" and "lr" in params


def test_a_sweeps_live_callback_is_found_until_retired(tmp_path: Path) -> None:
    import pickle

    from orchestrator.errors import UserInputError
    from orchestrator.tracking import TrackingCallback

    _, callback = _callback(tmp_path)
    parent = callback.parent_run_id
    assert TrackingCallback.live(parent) is callback
    restored = pickle.loads(pickle.dumps(callback))  # as Tune's restore makes it
    assert TrackingCallback.live(parent) is restored
    callback.retire()  # not the live one any more: nothing happens
    assert TrackingCallback.live(parent) is restored
    restored.retire()
    with pytest.raises(UserInputError, match=f"holds no tracking callback for MLflow run {parent}"):
        TrackingCallback.live(parent)


def test_a_snapshot_taken_during_an_outage_carries_the_unwritten_epochs(
    tmp_path: Path, monkeypatch
) -> None:
    import pickle

    from orchestrator import tracking

    client, callback = _callback(tmp_path)
    a = _Trial("a")
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 3600.0)
    callback.on_trial_result(0, [a], a, {"epoch": 1, "train/loss": 1.0})
    run = callback.child_run_id("a")
    real = tracking.log_batch

    def down(*args, **kwargs):
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(tracking, "log_batch", down)
    state = callback.get_state()  # Tune saves this with its snapshot; then the driver dies
    assert state is not None and [row[3] for row in state["pending"][run]] == [1]
    monkeypatch.setattr(tracking, "log_batch", real)
    restored = pickle.loads(pickle.dumps(callback))  # the next session's callback
    restored.set_state(state)
    restored.flush()
    assert _history(client, run) == [(1, 1.0)]
    assert restored.get_state() is None  # all written: no state to keep
