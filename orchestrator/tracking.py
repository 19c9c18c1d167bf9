"""MLflow tracking from the driver: a parent run per sweep, a child run per trial.

All writes happen here, on the driver (head node); trials and actors only return
numbers and files. Ray's MLflowLoggerCallback is not used: it has no nested runs, logs
noise keys and duplicates runs after ``Tuner.restore``. This callback finds a trial's
existing child run by tag after a restore and never re-logs a step it already has.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from orchestrator.errors import UserInputError
from orchestrator.redact import redact_text
from orchestrator.storage import checkpoint_location
from trainables.train import CURVATURE_KEY, METRIC_KEYS

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
DEFAULT_ARTIFACTS = "runs/mlartifacts"
# The trainable's per-epoch metrics, less the bookkeeping flags: diverged is kept as the tag
# hessweep.diverged; converged follows from train/loss and the target_train_loss param.
EPOCH_METRICS = (
    *(k for k in METRIC_KEYS if k not in ("epoch", "converged", "diverged")),
    CURVATURE_KEY,
)
ROLE, TRIAL_ID, SWEEP_DIR = "hessweep.role", "hessweep.trial_id", "hessweep.sweep_dir"
PARENT = "mlflow.parentRunId"
CHECKPOINT = "hessweep.checkpoint"
PARAM_EXCLUDE = ("data_root", "device", "eval_batch_size", "hessian_every")  # not hyper-parameters
# Settings read only for some values of another: (that setting, the values that read it).
READ_ONLY_UNDER = {
    "lr_schedule.factor": ("lr_schedule.type", ("step",)),
    "lr_schedule.epochs": ("lr_schedule.type", ("step",)),
    "base_batch_size": ("lr_scaling", ("linear", "sqrt")),
}
# The settings each attack method reads (trainables.attacks; adv_fraction is training's).
ATTACK_USES = {  # epsilon stays for "none" (0: no perturbation), so every run can be filtered
    "none": ("method", "epsilon"),
    "fgsm": ("method", "epsilon", "adv_fraction"),
    "pgd": ("method", "epsilon", "steps", "step_size", "adv_fraction"),
}
ATTACK_PREFIXES = ("robust", "eval_attack")
# MLflow's limits on one log_batch request (mlflow.utils.validation).
MAX_PARAMS_TAGS, MAX_ENTITIES = 100, 1000
# A tracking server's retries and timeout while checking that it answers (MLflow's own
# defaults, 7 retries with backoff and 120 s, apply to the sweep's writes).
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# What a failed write to the store raises (requests' errors are OSErrors).
WRITE_ERRORS = (MlflowException, OSError)
# Per-epoch metrics are written at most this often (each run's in one request): one write
# per epoch cost ~7 ms on the driver with SQLite (a network round trip with a server),
# for every epoch of every trial.
FLUSH_SECONDS = 1.0
_LIVE: dict[str, TrackingCallback] = {}


def resolve_tracking_uri(explicit: str | None = None, spec_uri: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the spec's, else local SQLite."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or DEFAULT_TRACKING_URI


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (relative or absolute), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


@contextlib.contextmanager
def _sqlite_init_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while MLflow creates or migrates it.

    MLflow builds a new store's tables in several migrations; two processes doing it at
    once (two ``hessweep`` commands started together) leave one or both failing.
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """Few retries and a short timeout for the check that a server answers, unless the user
    set them; the environment is given back afterwards, so the sweep's writes keep
    MLflow's patient defaults."""
    saved = {key: os.environ.get(key) for key in QUICK_HTTP}
    for key, value in QUICK_HTTP.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def require_store(tracking_uri: str, hint: str) -> None:
    """Refuse a SQLite store whose file does not exist (``hint``: where the right one is), so
    commands that only read one never create an empty one from a mistyped URI."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        raise UserInputError(
            f"tracking store {redact_text(tracking_uri)}: no such store ({db.resolve()}); {hint}"
        )


def open_store(tracking_uri: str) -> MlflowClient:
    """A client for an existing store, for the commands that read sweeps (never creates one)."""
    require_store(
        tracking_uri,
        "give the store the sweeps were logged to with --tracking-uri (or "
        "MLFLOW_TRACKING_URI), or run from the folder whose runs/ holds it",
    )
    return connect(tracking_uri)


def connect(tracking_uri: str) -> MlflowClient:
    """A client for ``tracking_uri``, checked to answer before any training starts."""
    try:
        with _quick_http(), _sqlite_init_lock(tracking_uri):
            client = MlflowClient(tracking_uri=tracking_uri)
            client.search_experiments(max_results=1)
    except Exception as err:  # any failure means the store is unusable
        raise UserInputError(
            f"the MLflow tracking store {redact_text(tracking_uri)!r} cannot be reached "
            f"({type(err).__name__}: {redact_text(str(err).splitlines()[0][:200])}). Start the "
            "server, fix --tracking-uri / MLFLOW_TRACKING_URI, or unset them to use the local "
            "SQLite store."
        ) from None
    return client


def experiment_id(client: MlflowClient, name: str, artifacts: str = DEFAULT_ARTIFACTS) -> str:
    """The MLflow experiment called ``name``, created (with local artifacts) when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = Path(artifacts).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def clean_params(flat: dict[str, Any]) -> dict[str, str]:
    """Only real hyper-parameters, as MLflow param strings (no settings a method ignores)."""
    drop = {*PARAM_EXCLUDE, *_unused_attack_keys(flat), *_unread_keys(flat)}
    return {k: "null" if v is None else str(v) for k, v in flat.items() if k not in drop}


def _unread_keys(flat: dict[str, Any]) -> set[str]:
    """Settings that the setting they depend on leaves unread (a constant schedule's
    ``lr_schedule.factor``, ``base_batch_size`` without lr scaling)."""
    return {
        key
        for key, (setting, values) in READ_ONLY_UNDER.items()
        if key in flat and setting in flat and flat[setting] not in values
    }


def _unused_attack_keys(flat: dict[str, Any]) -> set[str]:
    """``robust.*`` / ``eval_attack.*`` settings that the attack method beside them never
    reads (PGD's steps under FGSM, any budget under none), so they are not hyper-parameters."""
    unused = set()
    for prefix in ATTACK_PREFIXES:
        uses = ATTACK_USES.get(flat.get(f"{prefix}.method"))
        if uses is None:
            continue
        unused |= {
            key
            for key in flat
            if key.startswith(f"{prefix}.") and key.removeprefix(f"{prefix}.") not in uses
        }
    return unused


def finite_metrics(metrics: dict[str, Any], step: int, keys: tuple[str, ...] | None = None):
    """MLflow ``Metric`` entities for the finite numeric values among ``keys``."""
    now = int(time.time() * 1000)
    out = []
    for key in keys or tuple(metrics):
        value = metrics.get(key)
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append(Metric(key, float(value), now, step))
    return out


def log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: list[Metric] = (),
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """``log_batch`` in chunks that respect MLflow's per-request limits."""
    p = [Param(k, v[:6000]) for k, v in (params or {}).items()]
    t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for m_chunk, p_chunk, t_chunk in batches(list(metrics), p, t):
        client.log_batch(run_id, metrics=m_chunk, params=p_chunk, tags=t_chunk)


def batches(metrics: list, params: list, tags: list) -> Iterator[tuple[list, list, list]]:
    """(metrics, params, tags) per request: at most 100 params and 100 tags, and at most
    1000 entities in all (MLflow refuses a bigger batch); nothing for nothing."""
    while metrics or params or tags:
        p, t = params[:MAX_PARAMS_TAGS], tags[:MAX_PARAMS_TAGS]
        m = metrics[: MAX_ENTITIES - len(p) - len(t)]
        yield m, p, t
        metrics, params, tags = metrics[len(m) :], params[len(p) :], tags[len(t) :]


def find_child(client: MlflowClient, exp_id: str, parent_id: str, trial_id: str) -> str | None:
    """The child run already made for ``trial_id`` under ``parent_id`` (after a restore)."""
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{PARENT}` = '{parent_id}' and tags.`{TRIAL_ID}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def last_step(client: MlflowClient, run_id: str) -> int:
    """The last epoch already logged on a run (0 when none)."""
    history = client.get_metric_history(run_id, "train/loss")
    return max((m.step for m in history), default=0)


def run_label(config: dict[str, Any]) -> str:
    """A short run name: ``bs=64 fgsm-0.1 seed=0``."""
    robust = config.get("robust") or {}
    method = robust.get("method", "none")
    tag = "none" if method == "none" else f"{method}-{robust.get('epsilon', 0):g}"
    return f"bs={config.get('batch_size')} {tag} seed={config.get('seed', 0)}"


class TrackingCallback(Callback):
    """Driver-side Tune callback writing the DESIGN.md MLflow contract for each trial.

    Only the store, experiment, parent run and sweep folder are pickled with the Tuner
    state, so a restored sweep reconnects, finds each trial's child run by tag and
    continues it. Per-epoch metrics are buffered and written every ``FLUSH_SECONDS``, when
    a trial ends, when Tune snapshots the experiment (so a snapshot never records a
    checkpoint past what MLflow and the snapshot itself hold) and when the experiment ends
    (``flush``). A write of epoch metrics that fails before the end only warns (Tune ends
    the whole sweep on a callback's error), so they wait for the next write. Creating and
    ending a trial's run still need the store: MLflow's own retries (7 with backoff, about
    4 minutes) bridge a server's brief outage; a longer one ends the sweep, which
    ``resume`` continues.
    """

    def __init__(
        self, tracking_uri: str, exp_id: str, parent_run_id: str, sweep_dir: str = ""
    ) -> None:
        self.tracking_uri = tracking_uri
        self.exp_id = exp_id
        self.parent_run_id = parent_run_id
        self.sweep_dir = sweep_dir
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}
        self._steps: dict[str, int] = {}
        self.on_complete = None
        self.log_seconds = 0.0
        self._pending: dict[str, list[Metric]] = {}
        self._flushed_at = time.monotonic()
        self._warned = False
        _LIVE[parent_run_id] = self

    def use_store(self, tracking_uri: str) -> None:
        """Log to ``tracking_uri`` from now on (a resumed sweep's, which may be given anew)."""
        if tracking_uri != self.tracking_uri:
            self.tracking_uri, self._client = tracking_uri, None

    @classmethod
    def live(cls, parent_run_id: str) -> TrackingCallback:
        """The callback instance Tune is using for this sweep (also after a restore)."""
        if parent_run_id not in _LIVE:
            raise UserInputError(
                f"the restored sweep state holds no tracking callback for MLflow run "
                f"{parent_run_id} (written by another version of hessweep?); start the sweep "
                "again with `hessweep run`"
            )
        return _LIVE[parent_run_id]

    def retire(self) -> None:
        """Forget this sweep's callback once it is driven no more (a long-lived process, such
        as a notebook, runs many sweeps)."""
        if _LIVE.get(self.parent_run_id) is self:
            del _LIVE[self.parent_run_id]

    def child_run_id(self, trial_id: str) -> str | None:
        """The child run of a trial seen now or in an earlier (interrupted) session."""
        if trial_id not in self._runs:
            found = find_child(self.client, self.exp_id, self.parent_run_id, trial_id)
            if found is not None:
                self._runs[trial_id] = found
        return self._runs.get(trial_id)

    def __getstate__(self) -> dict[str, Any]:
        keys = ("tracking_uri", "exp_id", "parent_run_id", "sweep_dir")
        return {k: self.__dict__[k] for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def child_run(self, trial: Any) -> str:
        """The trial's child run id, created on first sight or found again after a restore."""
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        from trainables.config import parse_config

        config = dict(trial.config)
        params = clean_params(parse_config(config).to_flat_dict())
        run_id = find_child(self.client, self.exp_id, self.parent_run_id, tid)
        if run_id is None:
            run = self.client.create_run(
                self.exp_id,
                run_name=run_label(config),
                tags={PARENT: self.parent_run_id, ROLE: "trial", TRIAL_ID: tid},
            )
            run_id = run.info.run_id
            log_batch(self.client, run_id, params=params)
            self._steps[tid] = 0
        else:
            self.client.update_run(run_id, status="RUNNING")
            self._steps[tid] = last_step(self.client, run_id)
            # Again: the first session may have died between create_run and its params. The
            # same values are taken again; a differing one (another version's) means they exist.
            with contextlib.suppress(MlflowException):
                log_batch(self.client, run_id, params=params)
        self._runs[tid] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._timed(self.child_run, trial)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._timed(self.child_run, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any):
        self._timed(self._log_result, trial, result)

    def _log_result(self, trial: Any, result: dict) -> None:
        run_id = self.child_run(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self._steps.get(trial.trial_id, 0):
            return
        self._pending.setdefault(run_id, []).extend(finite_metrics(result, step, EPOCH_METRICS))
        self._steps[trial.trial_id] = step
        if result.get("diverged"):
            try:
                log_batch(self.client, run_id, tags={"hessweep.diverged": "true"})
            except WRITE_ERRORS as err:  # the trial's end tags it again
                self._warn(err)
        self._flush_if_due()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._timed(self._flush_if_due)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._timed(self.flush)  # the last chance: a failure here is raised

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self._flush_or_warn()

    def _flush_or_warn(self, run_id: str | None = None) -> None:
        """``flush``, but a failed write keeps its metrics for the next one and warns."""
        try:
            self.flush(run_id)
        except WRITE_ERRORS as err:
            self._flushed_at = time.monotonic()  # try again in FLUSH_SECONDS, not at once
            self._warn(err)

    def _warn(self, err: BaseException) -> None:
        """Say once per outage that writes to the store fail (and that nothing is lost)."""
        if not self._warned:
            self._warned = True
            text = redact_text(str(err).splitlines()[0][:300] if str(err) else "")
            print(
                f"hessweep: warning: MLflow write failed ({type(err).__name__}: {text}); the "
                "epoch metrics are kept and written again later (a trial's start and end "
                "still need the store)",
                file=sys.stderr,
                flush=True,
            )

    def get_state(self) -> dict[str, Any] | None:
        """Called at each of Tune's experiment snapshots: write what is buffered first (a
        resumed trial restarts from the snapshot's checkpoint). What a failed write left in
        the buffer is the state, saved with the snapshot and put back by ``set_state``, so
        a driver that dies during an outage loses no epoch."""
        self._timed(self._flush_or_warn)
        if not self._pending:
            return None
        return {
            "pending": {
                rid: [(m.key, m.value, m.timestamp, m.step) for m in metrics]
                for rid, metrics in self._pending.items()
            }
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Put back the epochs a snapshot saved unwritten (``get_state``)."""
        for rid, rows in (state or {}).get("pending", {}).items():
            self._pending.setdefault(rid, []).extend(Metric(k, v, t, s) for k, v, t, s in rows)

    def flush(self, run_id: str | None = None) -> None:
        """Write the buffered per-epoch metrics (of one run, or of all), one request a run;
        a write that fails keeps its metrics for the next flush."""
        runs = list(self._pending) if run_id is None else [run_id]
        for rid in runs:
            metrics = self._pending.get(rid)
            if metrics:
                log_batch(self.client, rid, metrics)
            self._pending.pop(rid, None)
        if run_id is None:
            self._flushed_at = time.monotonic()
        self._warned = False

    def end_runs(self, status: str) -> list[str]:
        """End the child runs of this session still RUNNING (Tune stops trials without
        telling callbacks) as ``status``, KILLED or FAILED; returns their ids."""
        ended = []
        for run_id in self._runs.values():
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status=status)
                ended.append(run_id)
        return ended

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._timed(self._finish, trial, "FINISHED", trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._timed(self._finish, trial, "FAILED", trials)

    def _finish(self, trial: Any, status: str, trials: list) -> None:
        run_id = self.child_run(trial)
        self._flush_or_warn(run_id)
        last = trial.last_result or {}
        tags = {"hessweep.status": status.lower(), "hessweep.epochs": last.get("epoch", 0)}
        if trial.checkpoint is not None:
            tags[CHECKPOINT] = checkpoint_location(trial.checkpoint.path, self.sweep_dir)
        if last.get("diverged"):
            tags["hessweep.diverged"] = "true"
        log_batch(self.client, run_id, tags=tags)
        self.client.set_terminated(run_id, status=status)
        if self.on_complete is not None and status == "FINISHED":
            self.on_complete(trial, run_id, trials)

    def _timed(self, fn, *args) -> None:
        start = time.perf_counter()
        try:
            fn(*args)
        finally:
            self.log_seconds += time.perf_counter() - start
