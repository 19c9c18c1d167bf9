"""run/resume plumbing that needs no sweep: resources, addresses, interruption, timings."""

from __future__ import annotations

import signal
import socket
import time
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
    callback = SimpleNamespace(on_complete=None, flush=lambda: flushed.append(True))
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
    callback = SimpleNamespace(on_complete=None, flush=flush)
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
