"""The programmatic tuning API: ``run_experiment`` and ``resume_experiment``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from mlflow.exceptions import MlflowException

from orchestrator.errors import NothingToDo, SweepInterrupted, UserInputError, last_line
from orchestrator.phase import HessianPhase
from orchestrator.redact import redact_text
from orchestrator.results import build_table, save_table, to_markdown, trial_row
from orchestrator.spec import Experiment
from orchestrator.storage import (
    checkpoint_location,
    exists,
    is_uri,
    join,
    read_text,
    subfolders,
    write_text,
)
from orchestrator.sweep import build_tuner, restore_tuner, select_best, storage_path
from orchestrator.tracking import (
    ROLE,
    SWEEP_DIR,
    TrackingCallback,
    clean_params,
    connect,
    experiment_id,
    finite_metrics,
    log_batch,
    require_store,
    resolve_tracking_uri,
    sqlite_path,
)
from trainables.data import DatasetCorruptError, default_root, load_dataset

STATE_FILE = "hessweep.json"
REPORTS_DIR = Path("runs/reports")


@dataclass(frozen=True)
class ExperimentResult:
    """What a finished sweep returns: the table, where it was logged, and Tune's results."""

    table: pd.DataFrame
    parent_run_id: str
    report_dir: Path
    result_grid: Any
    tracking_uri: str
    sweep_dir: str
    timings: dict[str, float] = field(default_factory=dict)
    failed_trials: tuple[str, ...] = ()  # "label: last line of its error", one per trial


def run_experiment(
    exp: Experiment,
    address: str | None = None,
    tracking_uri: str | None = None,
    progress: Any = print,
) -> ExperimentResult:
    """Sweep ``exp`` on Ray Tune, analyse every kept model's Hessian, log it all to MLflow."""
    uri = resolve_tracking_uri(tracking_uri, exp.tracking_uri)
    check_data(exp)
    _init_ray(address, exp)  # before the store is opened: a bad address leaves nothing
    client = connect(uri)
    run_name = f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = join(storage_path(exp.storage), run_name)
    _write_state(sweep_dir, exp, None, uri)  # storage must take a file before MLflow does
    exp_id = experiment_id(client, exp.name)
    parent = client.create_run(
        exp_id, run_name=run_name, tags={ROLE: "sweep", SWEEP_DIR: sweep_dir}
    )
    parent_id = parent.info.run_id
    try:
        client.log_text(parent_id, exp.to_yaml(redacted=True), "spec.yaml")
        _log_sweep_params(client, parent_id, exp)
        _write_state(sweep_dir, exp, parent_id, uri)
        progress(
            f"sweep {run_name}: {exp.num_cells} cell(s); MLflow run {parent_id} at "
            f"{redact_text(uri)}"
        )
        callback = TrackingCallback(uri, exp_id, parent_id, sweep_dir)
        tuner = build_tuner(exp, run_name, [callback])
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    return _drive(exp, tuner, client, callback, parent_id, uri, sweep_dir, progress)


def resume_experiment(
    name_or_dir: str,
    address: str | None = None,
    tracking_uri: str | None = None,
    progress: Any = print,
    storage: str = "runs/ray",
) -> ExperimentResult:
    """Finish an interrupted sweep: finished trials are kept, MLflow runs are continued.

    ``name_or_dir`` is a sweep folder (local or a URI) or an experiment name, whose newest
    sweep under ``storage`` is taken.
    """
    sweep_dir = find_sweep_dir(name_or_dir, storage)
    state_file = join(sweep_dir, STATE_FILE)
    with _storage_errors("sweep folder", sweep_dir):
        text = read_text(state_file)
    state = json.loads(text)
    if not state.get("parent_run_id"):
        raise UserInputError(
            f"{state_file}: this sweep stopped before its MLflow run was created; "
            "start it again with `hessweep run`"
        )
    exp = Experiment.from_dict(state["spec"], source=state_file, stored=True)
    uri = tracking_uri or state["tracking_uri"]
    parent_id = state["parent_run_id"]
    client, parent = _sweep_store(uri, parent_id, state["tracking_uri"])
    if parent.info.status == "FINISHED":
        raise NothingToDo(
            f"sweep {redact_text(sweep_dir)} already finished (MLflow run {parent_id}); "
            f"nothing to resume. `hessweep report {exp.name}` builds its paper report."
        )
    _init_ray(address, exp)
    try:
        tuner = restore_tuner(exp, sweep_dir)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserInputError(
            f"{redact_text(sweep_dir)}: Tune cannot restore this sweep ({_error_summary(err)}); "
            "start it again with `hessweep run`"
        ) from None
    callback = TrackingCallback.live(parent_id)
    callback.use_store(uri)  # the restored callback remembers the store of the first session
    client.update_run(parent_id, status="RUNNING")
    progress(f"resuming {sweep_dir} (MLflow run {parent_id})")
    return _drive(exp, tuner, client, callback, parent_id, uri, sweep_dir, progress)


def _sweep_store(uri: str, parent_id: str, logged_to: str) -> tuple[Any, Any]:
    """A client for the store holding the sweep's parent run, and that run; never creates
    a new store."""
    hint = (
        f"the sweep was logged to {redact_text(logged_to)}; give that store with "
        "--tracking-uri (or leave it out)"
    )
    require_store(uri, hint)
    client = connect(uri)
    try:
        return client, client.get_run(parent_id)
    except MlflowException:
        raise UserInputError(
            f"--tracking-uri {redact_text(uri)}: it has no MLflow run {parent_id}; {hint}"
        ) from None


def find_sweep_dir(name_or_dir: str, storage: str = "runs/ray") -> str:
    """A sweep folder, or the newest sweep of the experiment called ``name_or_dir``.

    Sweeps are named ``NAME-YYYYmmdd-HHMMSS``: only those of exactly this experiment count
    (``demo`` never picks a sweep of ``demo-big``), the newest by that timestamp.
    """
    with _storage_errors("sweep folder", name_or_dir):
        if exists(join(name_or_dir, STATE_FILE)):
            return name_or_dir if is_uri(name_or_dir) else str(Path(name_or_dir).resolve())
    root = storage_path(storage)
    pattern = re.compile(rf"{re.escape(name_or_dir)}-\d{{8}}-\d{{6}}")
    with _storage_errors("storage", storage):
        found = [
            name
            for name in subfolders(root)
            if pattern.fullmatch(name) and exists(join(root, name, STATE_FILE))
        ]
    if not found:
        raise UserInputError(
            f"no sweep called {name_or_dir!r} under {redact_text(root)} (looked for "
            f"{name_or_dir}-YYYYmmdd-HHMMSS/{STATE_FILE}); give the experiment name, the "
            "sweep folder, or --storage where the spec's sweeps live"
        )
    return join(root, max(found))


@contextmanager
def _storage_errors(
    what: str, location: str, fix: str = "give a local path, s3://, gs:// or file:// you can reach"
):
    """A storage location that cannot be opened or read (pyarrow's ArrowInvalid for an
    unknown scheme or query option, OSError for one out of reach) as bad input."""
    try:
        yield
    except UserInputError:
        raise
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UserInputError(
            f"{what} {redact_text(location)}: {reason or type(err).__name__}; {fix}"
        ) from None


def _drive(exp, tuner, client, callback, parent_id, uri, sweep_dir, progress) -> ExperimentResult:
    """Fit, select, analyse, tabulate and log; the parent run's status mirrors the outcome."""
    phase = HessianPhase(exp, client, progress)
    overlap = exp.hessian.enabled and exp.select is None
    done: dict[str, tuple[str, str, str]] = {}
    started: list[bool] = []

    def on_complete(trial: Any, run_id: str, trials: list) -> None:
        """Start analysing finished trials as soon as the actors fit beside the rest."""
        if trial.checkpoint is None or (trial.last_result or {}).get("diverged"):
            return
        location = checkpoint_location(trial.checkpoint.path, sweep_dir)
        done[trial.trial_id] = (location, run_id, _label(trial.config))
        if not overlap:
            return
        unfinished = sum(
            1 for t in trials if t is not trial and t.status not in ("TERMINATED", "ERROR")
        )
        if not started and _room_for_actors(exp, unfinished):
            started.append(True)
            progress(f"hessian: analysis starts beside {unfinished} unfinished trial(s)")
        if started:
            for tid, (path, rid, label) in list(done.items()):
                phase.submit(tid, path, rid, label)

    callback.on_complete = on_complete
    timings: dict[str, float] = {}
    interrupted = False
    try:
        start = time.perf_counter()
        with _own_signal_handlers():
            try:
                grid = tuner.fit()
            except BaseException:
                _flush_after_failure(callback, progress)
                raise
            callback.flush()  # what an interrupted fit left buffered
        timings["training_s"] = time.perf_counter() - start
        if any(r.error is None and not r.metrics.get("done") for r in grid):
            # Tune caught Ctrl-C (or SIGUSR1), saved its state and returned; it marks the
            # trials it stopped TERMINATED, but only finished ones reported done
            raise KeyboardInterrupt
        trials = [(r.metrics.get("trial_id"), r.config, r.metrics, r.checkpoint) for r in grid]
        kept = {t[0] for t in trials}
        if exp.select:
            kept = select_best(
                ((t, c, m) for t, c, m, _ in trials), exp.select.metric, exp.select.mode
            )
            progress(f"select: kept {len(kept)} of {len(trials)} trials by {exp.select.metric}")
        run_ids = {tid: callback.child_run_id(tid) for tid, *_ in trials}
        for tid, _, _, _ in trials:
            if run_ids[tid] is not None:
                client.set_tag(run_ids[tid], "hessweep.selected", str(tid in kept).lower())
        start = time.perf_counter()
        if exp.hessian.enabled:
            for tid, config, metrics, ckpt in trials:
                wanted = tid in kept and ckpt is not None and not metrics.get("diverged")
                if wanted and not phase.already_done(run_ids[tid]):
                    location = checkpoint_location(ckpt.path, sweep_dir)
                    phase.submit(tid, location, run_ids[tid], _label(config))
        unanalysed = phase.wait()
        timings["hessian_s"] = time.perf_counter() - start
        labels = {tid: _label(config) for tid, config, _, _ in trials}
        for tid, err in unanalysed.items():
            progress(f"hessian: {labels.get(tid, tid)}: analysis failed ({_error_summary(err)})")
        rows = [
            trial_row(tid, run_ids[tid], config, metrics, _final_metrics(client, run_ids[tid]))
            for tid, config, metrics, _ in trials
            if tid in kept
        ]
        table = build_table(rows)
        report_dir = REPORTS_DIR / exp.name
        header = (
            f"# {exp.name}\n\n{exp.description}\n\n"
            f"MLflow parent run `{parent_id}` at `{redact_text(uri)}`"
        )
        parquet, md = save_table(table, report_dir, header)
        client.log_artifact(parent_id, str(parquet), "report")
        client.log_text(parent_id, md.read_text(), "report/report.md")  # DESIGN's name
        timings["tracking_s"] = callback.log_seconds
        _log_timings(client, parent_id, timings)
        failed = tuple(
            f"{_label(r.config)}: {_error_summary(r.error)}" for r in grid if r.error is not None
        ) + tuple(
            f"{labels.get(tid, tid)}: Hessian analysis failed: {_error_summary(err)}"
            for tid, err in unanalysed.items()
        )
        client.set_terminated(parent_id, status="FAILED" if failed else "FINISHED")
        progress(to_markdown(table))
        return ExperimentResult(table, parent_id, report_dir, grid, uri, sweep_dir, timings, failed)
    except KeyboardInterrupt:
        interrupted = True
        phase.cancel()  # first: no analysis starts while the runs are being ended
        _end_trial_runs(callback, "KILLED", progress)
        client.set_terminated(parent_id, status="KILLED")
        raise SweepInterrupted(sweep_dir) from None
    except BaseException:
        _end_trial_runs(callback, "FAILED", progress)
        client.set_terminated(parent_id, status="FAILED")
        raise
    finally:
        phase.close(cancel=interrupted)
        callback.retire()


def _flush_after_failure(callback: Any, progress: Callable[[str], None]) -> None:
    """Write the buffered epoch metrics after a failed fit, without hiding its error."""
    try:
        callback.flush()
    except Exception as err:  # the store is down too: the fit's error is the one to see
        progress(f"tracking: buffered epoch metrics not written ({type(err).__name__}: {err})")


def _end_trial_runs(callback: Any, status: str, progress: Callable[[str], None]) -> None:
    """Mark the trials' runs still RUNNING as ``status`` (Tune stopped them without a
    callback), without hiding the error or interruption that stopped the sweep."""
    try:
        callback.end_runs(status)
    except Exception as err:  # the store is down too
        progress(f"tracking: trial runs not marked {status} ({type(err).__name__}: {err})")


@contextmanager
def _own_signal_handlers():
    """Give back SIGINT/SIGUSR1 after ``Tuner.fit``: Tune installs its own and keeps them, so
    a first Ctrl-C in the Hessian phase would only print Tune's stop message."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    saved = {kind: signal.getsignal(kind) for kind in kinds}
    try:
        yield
    finally:
        for kind, handler in saved.items():
            signal.signal(kind, handler)


def _log_timings(client, parent_id: str, timings: dict[str, float]) -> None:
    """``time/*`` on the parent run, summed over the sessions of a resumed sweep."""
    before = client.get_run(parent_id).data.metrics
    step = len(client.get_metric_history(parent_id, "time/training_s"))
    totals = {f"time/{k}": v + before.get(f"time/{k}", 0.0) for k, v in timings.items()}
    log_batch(client, parent_id, finite_metrics(totals, step))


def _error_summary(error: BaseException) -> str:
    """The last non-empty line of an error's text (``last_line``), else its type's name."""
    return (last_line(error) or type(error).__name__)[:300]


def _final_metrics(client, run_id: str) -> dict[str, float]:
    return dict(client.get_run(run_id).data.metrics)


def _label(config: dict[str, Any]) -> str:
    from orchestrator.tracking import run_label

    return run_label(config)


def _room_for_actors(exp: Experiment, unfinished_trials: int) -> bool:
    """Whether the Hessian actors fit beside the trials that still need resources."""
    total = ray.cluster_resources()
    h, r = exp.hessian, exp.resources
    free_cpu = total.get("CPU", 0) - unfinished_trials * r.cpus
    free_gpu = total.get("GPU", 0) - unfinished_trials * r.gpus
    return free_cpu >= h.num_actors * h.cpus_per_actor and (
        h.gpus_per_actor == 0 or free_gpu >= h.num_actors * h.gpus_per_actor
    )


def check_data(exp: Experiment) -> None:
    """Load the data set once on the driver so a missing or damaged one fails before any
    trial; its error names the files, the folder and the ``hessweep download`` to run."""
    root = exp.data_root if exp.data_root is not None else exp.training.get("data_root")
    try:
        load_dataset(exp.dataset, root=root)
    except (FileNotFoundError, DatasetCorruptError) as err:
        shown = root if root is not None else f"{default_root()} (the default)"
        raise UserInputError(f"dataset {exp.dataset!r}, data_root {shown}: {err}") from None


def _init_ray(address: str | None, exp: Experiment, training: bool = True) -> None:
    """Join ``address`` (or RAY_ADDRESS) or start a private local Ray, checked to be usable.

    ``training=False`` (``analyze``) checks only what the Hessian actors need.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError) as err:
            raise UserInputError(
                f"--address {address!r}: {_error_summary(err)}; give host:port or ray://host:port "
                "of a running cluster (`ray start --head`), fix --address / RAY_ADDRESS, or "
                "leave both unset to run locally"
            ) from None
        return
    # "local" starts a private instance: never attach to another process's Ray.
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        _check_resources(exp, ray.cluster_resources(), training)
    except UserInputError:
        ray.shutdown()  # a later call in this process checks again instead of reusing it
        raise


def _check_reachable(address: str) -> None:
    """Fail fast on a ``host:port`` nobody listens on (Ray itself retries for minutes)."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "ray":
        raise UserInputError(
            f"--address {address!r}: a Ray address is host:port (the head node's GCS port, "
            f"6379 by default) or ray://host:port (Ray Client), not a {scheme}:// URL"
        )
    host, sep, port = (rest if sep else address).rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray reports those itself
    host = host.strip("[]")  # [::1]:6379
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise UserInputError(
            f"--address {address!r}: nothing answers at {host}:{port} ({err}); start the "
            "cluster's head node, fix --address / RAY_ADDRESS, or leave both unset to run "
            "locally"
        ) from None


def _check_resources(exp: Experiment, total: dict[str, float], training: bool = True) -> None:
    """Refuse resource settings this (local, fixed-size) Ray can never satisfy: they hang."""
    r, h = exp.resources, exp.hessian
    needs = []
    if training:
        needs += [("resources.cpus", r.cpus, "CPU"), ("resources.gpus", r.gpus, "GPU")]
    if h.enabled or not training:
        needs += [
            ("hessian.num_actors x hessian.cpus_per_actor", h.num_actors * h.cpus_per_actor, "CPU"),
            ("hessian.num_actors x hessian.gpus_per_actor", h.num_actors * h.gpus_per_actor, "GPU"),
        ]
    for field_name, wanted, kind in needs:
        have = total.get(kind, 0.0)
        if wanted > have:
            raise UserInputError(
                f"{field_name} = {wanted:g} but this machine's Ray has {have:g} {kind}(s), so "
                f"it would wait forever; lower it, or run on a cluster with --address"
            )


def _log_sweep_params(client, parent_id: str, exp: Experiment) -> None:
    params = {
        "dataset": exp.dataset,
        "model": exp.model,
        "batch_sizes": ",".join(map(str, exp.batch_sizes)),
        "robust": ",".join(r.label for r in exp.robust),
        "seeds": ",".join(map(str, exp.seeds)),
        **{f"training.{k}": v for k, v in exp.training.items()},
        **{f"hessian.{k}": v for k, v in exp.hessian.model_dump().items()},
    }
    log_batch(client, parent_id, params=clean_params(params))


def _write_state(sweep_dir: str, exp: Experiment, parent_id: str | None, uri: str) -> None:
    """The sweep's spec and MLflow run beside its trials: what ``resume`` restores from.

    A relative SQLite store is saved with its absolute path, so ``resume`` finds it from
    any folder.
    """
    db = sqlite_path(uri)
    if db is not None:
        uri = f"sqlite:///{db.resolve()}"
    state = {"spec": exp.model_dump(mode="json"), "parent_run_id": parent_id, "tracking_uri": uri}
    target = join(sweep_dir, STATE_FILE)
    try:
        write_text(target, json.dumps(state, indent=2))
    except (OSError, ValueError) as err:  # pyarrow: ArrowInvalid for a bad URI option
        raise UserInputError(
            f"storage {redact_text(exp.storage)!r}: cannot write {redact_text(target)} "
            f"({err}); set the spec's storage (or --set storage=...) to a writable folder or URI"
        ) from None
