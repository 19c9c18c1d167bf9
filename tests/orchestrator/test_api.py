"""run/resume plumbing that needs no sweep: resources, addresses, interruption, timings."""

from __future__ import annotations

import math
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.api import (
    _check_reachable,
    _check_resources,
    _drive,
    _error_summary,
    _log_timings,
)
from orchestrator.cli import _summary, main
from orchestrator.errors import SweepInterrupted, UserInputError
from orchestrator.spec import Experiment
from orchestrator.tracking import finite_metrics

SPEC = {"name": "api", "dataset": "synthetic", "model": "mlp", "batch_sizes": [32]}


def _exp(**changes) -> Experiment:
    return Experiment.from_dict({**SPEC, **changes})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"resources": {"cpus": 8}}, "resources.cpus = 8"),
        ({"resources": {"gpus": 1}}, "resources.gpus = 1"),
        ({"hessian": {"num_actors": 3}}, "hessian.num_actors x hessian.cpus_per_actor = 3"),
    ],
)
def test_resources_a_local_ray_can_never_grant_are_refused(changes, field):
    with pytest.raises(UserInputError, match="would wait forever") as err:
        _check_resources(_exp(**changes), {"CPU": 2.0})
    assert field in str(err.value)


def test_resources_that_fit_pass_and_a_disabled_hessian_phase_needs_no_actors():
    _check_resources(_exp(), {"CPU": 2.0})
    _check_resources(_exp(hessian={"enabled": False, "num_actors": 3}), {"CPU": 2.0})


def test_analyze_checks_only_what_the_actors_need():
    _check_resources(_exp(resources={"cpus": 8}), {"CPU": 2.0}, training=False)
    off = _exp(hessian={"enabled": False, "num_actors": 3})  # analyze starts actors anyway
    with pytest.raises(UserInputError, match=r"hessian\.num_actors"):
        _check_resources(off, {"CPU": 2.0}, training=False)


def test_an_address_nobody_listens_on_fails_in_seconds_naming_it():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(UserInputError, match=f"--address '127.0.0.1:{port}'"):
        _check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - start < 10  # Ray itself retried for minutes
    _check_reachable("auto")  # no host:port: left to Ray
    with socket.socket(socket.AF_INET6) as server:  # a bracketed IPv6 address is reachable
        server.bind(("::1", 0))
        server.listen()
        _check_reachable(f"[::1]:{server.getsockname()[1]}")
    with pytest.raises(UserInputError, match="not a http:// URL"):
        _check_reachable("http://127.0.0.1:8265")


def test_error_summary_takes_the_trials_own_error_from_rays_wrapping():
    err = RuntimeError("ray::train()\n  File x, line 3\nConfigError: config key 'device'\n")
    assert _error_summary(err) == "ConfigError: config key 'device'"
    assert _error_summary(RuntimeError("")) == "RuntimeError"


def test_timings_add_up_over_the_sessions_of_a_resumed_sweep(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    _log_timings(client, run_id, {"training_s": 95.0, "hessian_s": 37.0})
    _log_timings(client, run_id, {"training_s": 5.0, "hessian_s": 1.0})
    metrics = client.get_run(run_id).data.metrics
    assert metrics["time/training_s"] == 100.0 and metrics["time/hessian_s"] == 38.0
    history = client.get_metric_history(run_id, "time/training_s")
    assert sorted((m.step, m.value) for m in history) == [(0, 95.0), (1, 100.0)]


def _grid(*metrics: dict) -> list:
    """Tune's results: after Ctrl-C it marks stopped trials TERMINATED; only finished ones
    reported ``done``."""
    return [SimpleNamespace(error=None, metrics=m, config={}) for m in metrics]


def test_an_interrupted_fit_is_an_interruption_and_the_parent_run_is_killed(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    parent = client.create_run(client.create_experiment("t")).info.run_id

    def fit():
        signal.signal(signal.SIGINT, lambda *_: None)  # what Tune does, and keeps
        return _grid({"done": True, "epoch": 3}, {"done": False, "epoch": 1}, {})

    before = signal.getsignal(signal.SIGINT)
    tuner = SimpleNamespace(fit=fit)
    flushed = []
    callback = SimpleNamespace(
        on_complete=None, flush=lambda: flushed.append(True), retire=lambda: None
    )
    with pytest.raises(SweepInterrupted) as stop:
        _drive(_exp(), tuner, client, callback, parent, "", str(tmp_path), lambda _: None)
    assert stop.value.sweep_dir == str(tmp_path)  # where `hessweep resume` is pointed
    assert flushed  # the buffered epoch metrics were written before giving up
    assert client.get_run(parent).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is before  # a later Ctrl-C is ours again


def test_a_fit_that_raises_keeps_its_error_when_the_store_is_down_too(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    parent = client.create_run(client.create_experiment("t")).info.run_id

    def fit():
        raise KeyboardInterrupt  # a second Ctrl-C, which Tune does not catch

    def flush():
        raise ConnectionError("store unreachable")

    said = []
    callback = SimpleNamespace(on_complete=None, flush=flush, retire=lambda: None)
    with pytest.raises(SweepInterrupted):
        _drive(_exp(), SimpleNamespace(fit=fit), client, callback, parent, "", "d", said.append)
    assert any("buffered epoch metrics not written" in line for line in said)
    assert client.get_run(parent).info.status == "KILLED"


def test_the_interruption_hint_names_the_sweep_folder_and_the_address(capsys):
    from orchestrator.cli import _interrupted

    assert _interrupted(SweepInterrupted("/data/sweeps/x-20260101-000000"), "10.0.0.1:6379") == 130
    err = capsys.readouterr().err
    assert "hessweep resume /data/sweeps/x-20260101-000000 --address 10.0.0.1:6379" in err


def test_failed_trials_are_listed_and_make_the_exit_code_1(capsys, tmp_path):
    result = SimpleNamespace(
        timings={},
        report_dir=tmp_path,
        parent_run_id="p",
        tracking_uri="sqlite:///x.db",
        result_grid=[1, 2, 3],
        failed_trials=("bs=full none seed=0: ConfigError: config key 'device'",),
    )
    assert _summary(result, 1.0) == 1
    err = capsys.readouterr().err
    assert "1 of 3 trial(s) failed" in err and "config key 'device'" in err
    assert _summary(SimpleNamespace(**{**vars(result), "failed_trials": ()}), 1.0) == 0


def test_ui_refuses_a_port_out_of_range_with_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["ui", "--port", "70000"])
    assert stop.value.code == 2 and "not a port number" in capsys.readouterr().err


def test_download_of_an_unknown_data_set_is_refused_before_fetching(capsys):
    assert main(["download", "imagenet"]) == 2
    out = capsys.readouterr()
    assert "unknown dataset 'imagenet'" in out.err and "fetching" not in out.out


def _junk_cifar10(root: Path) -> None:
    """cifar-10-batches-py/ with every file present but none of them a CIFAR batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not a pickle")


def test_corrupt_data_is_bad_input_naming_data_root_and_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _junk_cifar10(tmp_path / "data")
    store = tmp_path / "store"
    argv = ["run", "demo", "--set", "dataset=cifar10", "--set", "model=c1"]
    argv += ["--set", f"data_root={tmp_path / 'data'}", "--tracking-uri", f"sqlite:///{store}/m.db"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"data_root {tmp_path / 'data'}" in err
    assert f"hessweep download cifar10 --root {tmp_path / 'data'}" in err
    assert not store.exists() and not (tmp_path / "runs").exists()


def test_a_bad_address_leaves_no_tracking_store(tmp_path, monkeypatch, capsys):
    import orchestrator.api as api

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(api.ray, "is_initialized", lambda: False)  # as in a fresh `hessweep`
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "store"
    argv = ["run", "demo", "--address", f"127.0.0.1:{port}"]
    assert main([*argv, "--tracking-uri", f"sqlite:///{store}/m.db"]) == 2
    assert f"--address '127.0.0.1:{port}'" in capsys.readouterr().err
    assert not store.exists() and not (tmp_path / "runs").exists()


def _sweep(tmp_path: Path):
    """A store with a sweep's parent run, and the callback a sweep would log through."""
    from orchestrator.tracking import TrackingCallback, connect, experiment_id

    uri = f"sqlite:///{tmp_path}/m.db"
    client = connect(uri)
    exp_id = experiment_id(client, "api", str(tmp_path / "art"))
    parent = client.create_run(exp_id).info.run_id
    return client, TrackingCallback(uri, exp_id, parent), parent, uri


def _trial(trial_id: str, batch_size: int, tmp_path: Path):
    config = {"dataset": "synthetic", "model": "mlp", "batch_size": batch_size}
    ckpt = SimpleNamespace(path=str(tmp_path / trial_id / "checkpoint_000001"))
    return SimpleNamespace(trial_id=trial_id, config=config, checkpoint=ckpt, last_result={})


def _result(trial):
    """Tune's result of a trial that finished."""
    metrics = {"trial_id": trial.trial_id, "epoch": 1, "done": True, "train/loss": 0.5}
    return SimpleNamespace(
        error=None, metrics=metrics, config=trial.config, checkpoint=trial.checkpoint
    )


@pytest.mark.parametrize(
    ("stop", "status"), [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")]
)
def test_a_stopped_sweep_leaves_no_trial_run_running(stop, status, tmp_path):
    client, callback, parent, uri = _sweep(tmp_path)
    a, b = _trial("a", 32, tmp_path), _trial("b", 64, tmp_path)

    def fit():
        for trial in (a, b):
            callback.on_trial_start(0, [a, b], trial)
        callback.on_trial_error(0, [a, b], b)  # b failed on its own: stays FAILED
        raise stop("the fit stopped")

    expected = SweepInterrupted if stop is KeyboardInterrupt else RuntimeError
    with pytest.raises(expected):
        _drive(_exp(), SimpleNamespace(fit=fit), client, callback, parent, uri, "d", print)
    runs = {t: client.get_run(callback.child_run_id(t)).info.status for t in ("a", "b")}
    assert runs == {"a": status, "b": "FAILED"}
    assert client.get_run(parent).info.status == status


def test_one_failed_analysis_keeps_the_others_and_the_table(tmp_path, monkeypatch):
    from orchestrator.phase import ANALYZED, HessianPhase
    from orchestrator.tracking import log_batch

    monkeypatch.chdir(tmp_path)
    client, callback, parent, uri = _sweep(tmp_path)
    a, b = _trial("a", 32, tmp_path), _trial("b", 64, tmp_path)

    broken = {"b"}

    def analyse(self, trial_id, checkpoint_path, run_id, label):
        if trial_id in broken:
            raise RuntimeError("Lanczos broke down\nCheckpointError: truncated")
        log_batch(
            self.client, run_id, finite_metrics({"hessian/eig_1": 3.0}, 0), tags={ANALYZED: "true"}
        )

    monkeypatch.setattr(HessianPhase, "_analyse", analyse)

    def fit():
        for trial in (a, b):
            callback.on_trial_start(0, [a, b], trial)
        return [_result(a), _result(b)]

    said = []
    tuner = SimpleNamespace(fit=fit)
    result = _drive(_exp(), tuner, client, callback, parent, uri, str(tmp_path), said.append)
    table = result.table.set_index("trial_id")
    assert table.loc["a", "lambda_max"] == 3.0 and math.isnan(table.loc["b", "lambda_max"])
    assert result.failed_trials == (
        "bs=64 none seed=0: Hessian analysis failed: CheckpointError: truncated",
    )
    assert any("bs=64 none seed=0: analysis failed" in line for line in said)
    tags = client.get_run(callback.child_run_id("b")).data.tags
    assert tags[ANALYZED] == "failed"  # so `resume` analyses it again
    assert "CheckpointError: truncated" in tags["hessweep.analysis_error"]
    assert client.get_run(parent).info.status == "FAILED"
    logged = {f.path for f in client.list_artifacts(parent, "report")}
    assert {"report/table.parquet", "report/report.md"} <= logged

    broken.clear()  # analysed again (as `resume` does): the old error goes
    phase = HessianPhase(_exp(), client)
    phase.submit("b", b.checkpoint.path, callback.child_run_id("b"), "bs=64 none seed=0")
    assert phase.wait() == {}
    phase.close()
    tags = client.get_run(callback.child_run_id("b")).data.tags
    assert tags[ANALYZED] == "true" and "hessweep.analysis_error" not in tags


def _one_started_trial(tmp_path, monkeypatch):
    """A sweep's store and callback with one started trial ``a`` (batch 32)."""
    monkeypatch.chdir(tmp_path)
    client, callback, _parent, _uri = _sweep(tmp_path)
    a = _trial("a", 32, tmp_path)
    callback.on_trial_start(0, [a], a)
    return client, callback, a


def test_cancelling_the_phase_stops_running_analyses_without_tagging_them_failed(
    tmp_path, monkeypatch
):
    import threading

    from orchestrator.phase import ANALYZED, HessianPhase
    from orchestrator.spectra import AnalysisCancelled

    client, callback, a = _one_started_trial(tmp_path, monkeypatch)
    started = threading.Event()

    def analyse(self, trial_id, checkpoint_path, run_id, label):
        started.set()
        if self._stop.wait(10):  # a long solver that asks at each product
            raise AnalysisCancelled("lanczos top-5 stopped after 12 matvecs")

    monkeypatch.setattr(HessianPhase, "_analyse", analyse)
    said = []
    phase = HessianPhase(_exp(), client, said.append)
    future = phase.submit("a", a.checkpoint.path, callback.child_run_id("a"), "bs=32")
    assert started.wait(10)
    phase.close(cancel=True)  # returns once the running analysis has stopped
    assert future.done() and isinstance(future.exception(), AnalysisCancelled)
    assert "hessian: stopping 1 running analysis(es)" in said
    assert ANALYZED not in client.get_run(callback.child_run_id("a")).data.tags  # resume redoes it


def test_the_phase_hands_its_stop_to_every_analysis_and_keeps_an_earlier_result(
    tmp_path, monkeypatch
):
    import orchestrator.phase as phase_module
    from orchestrator.phase import ANALYSIS_ERROR, ANALYZED, HessianPhase
    from orchestrator.tracking import log_batch

    client, callback, a = _one_started_trial(tmp_path, monkeypatch)
    run = callback.child_run_id("a")
    log_batch(client, run, tags={ANALYZED: "true"})  # analysed in the sweep itself
    seen = {}

    def analyze_model(*args, stop=None, **kwargs):
        seen["stop"] = stop
        raise FileNotFoundError("no digits here")  # e.g. `hessweep analyze` on another machine

    monkeypatch.setattr(phase_module, "analyze_model", analyze_model)
    monkeypatch.setattr(
        phase_module,
        "load_trained",
        lambda path: SimpleNamespace(model=None, train_data=None, test_data=[]),
    )
    monkeypatch.setattr(HessianPhase, "pool", lambda self, data: None)
    phase = HessianPhase(_exp(), client)
    phase.submit("a", a.checkpoint.path, run, "bs=32")
    failed = phase.wait()
    phase.close()
    assert seen["stop"] is phase._stop and isinstance(failed["a"], FileNotFoundError)
    tags = client.get_run(run).data.tags
    assert tags[ANALYZED] == "true" and "no digits here" in tags[ANALYSIS_ERROR]
