"""The Tune side of a sweep: Tuner construction, progress reporting, restore, selection."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import CheckpointConfig, FailureConfig, RunConfig

from orchestrator.redact import redact_text
from orchestrator.retention import CheckpointRetention
from orchestrator.spec import Experiment, RobustSetting
from orchestrator.storage import join
from trainables.train import train_classifier

METRIC_COLUMNS = {
    "epoch": "epoch",
    "train/loss": "train_loss",
    "test/acc": "test_acc",
    "test/adv_acc": "adv_acc",
    "lr": "lr",
}
PARAM_COLUMNS = {"batch_size": "batch", "robust/method": "robust", "robust/epsilon": "eps"}


def storage_path(storage: str) -> str:
    """Tune needs an absolute local path or a URI."""
    return storage if "://" in storage else str(Path(storage).resolve())


def quiet_tune() -> None:
    """Use the classic progress table (the new output ignores reporters) and drop the
    snapshot-frequency warning that Tune's forced snapshots raise on short epochs (sweeps
    started before checkpoint retention moved to ``CheckpointRetention`` still force them)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def trainable(exp: Experiment) -> Any:
    """The trial function with its per-trial Ray resources (fractional GPUs allowed)."""
    return tune.with_resources(
        train_classifier, {"cpu": exp.resources.cpus, "gpu": exp.resources.gpus}
    )


class SweepReporter(tune.CLIReporter):
    """Tune's progress table, naming the sweep folder where Tune names its staging folder.

    Tune's "Result logdir" is the driver's copy under /tmp/ray, not where checkpoints and
    results are kept (and not what ``hessweep resume`` takes).
    """

    def __init__(self, sweep_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sweep_dir = sweep_dir

    def _progress_str(self, trials: list, done: bool, *sys_info: str, **kwargs: Any) -> str:
        text = super()._progress_str(trials, done, *sys_info, **kwargs)
        lines = text.split("\n")
        where = f"Sweep folder: {redact_text(self.sweep_dir)}"
        return "\n".join(where if ln.startswith("Result logdir: ") else ln for ln in lines)


def reporter(exp: Experiment, sweep_dir: str) -> tune.CLIReporter:
    """Tune's progress table, condensed to the columns that matter for this study."""
    params = dict(PARAM_COLUMNS)
    if len(exp.seeds) > 1:
        params["seed"] = "seed"
    if exp.search:
        params.update({k: k for k in exp.search.space})
    return SweepReporter(
        sweep_dir,
        metric_columns=METRIC_COLUMNS,
        parameter_columns=params,
        max_report_frequency=15,
    )


def build_tuner(exp: Experiment, run_name: str, callbacks: list[Any]) -> tune.Tuner:
    """A Tuner over the spec's param_space, writing under ``storage/run_name``."""
    quiet_tune()
    scheduler = None
    if exp.search and exp.search.scheduler == "asha":
        max_t = int(exp.training.get("max_epochs", 20))
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch",
            metric=exp.search.metric,
            mode=exp.search.mode,
            max_t=max_t,
            grace_period=min(exp.search.grace_period, max_t),
        )
    tune_config = tune.TuneConfig(
        num_samples=exp.search.num_samples if exp.search else 1,
        scheduler=scheduler,
        max_concurrent_trials=exp.max_concurrent_trials,
        reuse_actors=True,
    )
    root = storage_path(exp.storage)
    run_config = RunConfig(
        name=run_name,
        storage_path=root,
        failure_config=FailureConfig(max_failures=exp.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=None),
        callbacks=[*callbacks, CheckpointRetention(keep=2)],
        progress_reporter=reporter(exp, join(root, run_name)),
        verbose=1,
    )
    return tune.Tuner(
        trainable(exp),
        param_space=exp.to_param_space(),
        tune_config=tune_config,
        run_config=run_config,
    )


def restore_tuner(exp: Experiment, path: str) -> tune.Tuner:
    """Reopen an interrupted sweep: finished trials stay finished, the rest continue."""
    quiet_tune()
    return tune.Tuner.restore(
        path, trainable=trainable(exp), resume_unfinished=True, resume_errored=True
    )


def cell_key(config: dict[str, Any]) -> tuple[str, str, int]:
    """The grid cell a trial belongs to: (batch size, robust label, seed)."""
    robust = RobustSetting(**(config.get("robust") or {}))
    return str(config["batch_size"]), robust.label, int(config.get("seed", 0))


def select_best(
    results: Iterable[tuple[str, dict[str, Any], dict[str, Any]]], metric: str, mode: str
) -> set[str]:
    """Trial ids of the best trial per cell by ``metric`` (diverged trials lose)."""
    best: dict[tuple, tuple[float, str]] = {}
    for trial_id, config, last in results:
        value = last.get(metric)
        if value is None or last.get("diverged") or value != value:
            score = float("-inf")
        else:
            score = float(value) if mode == "max" else -float(value)
        key = cell_key(config)
        if key not in best or score > best[key][0]:
            best[key] = (score, trial_id)
    return {trial_id for _, trial_id in best.values()}
