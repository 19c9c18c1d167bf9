"""Per-epoch cost of the training loop under Ray Tune vs the same loop run bare.

The same config (digits, m1, one CPU thread) is trained for a fixed number of epochs

- bare: ``trainables.fit`` in this process; per-epoch wall time from the gaps between
  successive ``on_epoch_end`` calls (training, full evaluation and FGSM evaluation);
- bare + checkpoint: the same, also writing checkpoint.pt every epoch (what the Tune
  trainable does, without Tune), to tell checkpoint cost from Tune's own;
- tune: ``train_classifier`` as one Tune trial (``tune.with_resources(cpu=1)``), per-epoch
  wall time from the reported results' ``time_this_iter_s``; Ray's start-up, trial
  scheduling and data loading before the first report are excluded. Once with the
  sweep's driver callbacks (checkpoint retention: Tune keeps every checkpoint,
  ``CheckpointRetention`` prunes at snapshot time; and MLflow tracking into a temporary
  SQLite store, as a sweep logs every epoch: a trial's report waits for the driver), once
  with Tune's own ``CheckpointConfig(num_to_keep=2)`` and no tracking.

The first epoch of each run is dropped (warm-up) and the median of the rest is compared;
bare runs come before and after the Tune run, so drift in a shared machine's load shows.
Two configs: batch 64 (a "long" epoch of 23 steps) and full batch (a one-step epoch,
where fixed per-report costs weigh most: the demo's full-batch trials run hundreds).
The goal is Tune within 1.2x of bare; times are printed, never asserted.

    .venv/bin/python benchmarks/bench_tune_overhead.py [--epochs 40] [--full-epochs 120]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def config(batch_size: int | str, epochs: int) -> dict[str, Any]:
    """A demo-like trial config that runs exactly `epochs` epochs (no target-loss stop)."""
    return {
        "dataset": "digits",
        "model": "m1",
        "batch_size": batch_size,
        "lr": 0.02,
        "momentum": 0.9,
        "max_epochs": epochs,
        "target_train_loss": None,
        "robust": {"method": "none"},
        "eval_attack": {"method": "fgsm", "epsilon": 0.1},
        "seed": 0,
        "device": "cpu",
    }


def bare_epoch_times(cfg: dict[str, Any], checkpoint: bool) -> list[float]:
    """Per-epoch wall seconds of `trainables.fit` (optionally checkpointing every epoch)."""
    from trainables import fit

    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-bare-") as tmp:
        start = time.perf_counter()
        fit(
            cfg,
            checkpoint_dir=tmp if checkpoint else None,
            on_epoch_end=lambda _m: stamps.append(time.perf_counter()),
        )
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]


def tune_epoch_times(
    cfg: dict[str, Any], storage: str, name: str, sweep_retention: bool = True
) -> tuple[list[float], float]:
    """Per-epoch `time_this_iter_s` of one Tune trial, and the Tuner.fit wall time.

    `sweep_retention` is the orchestrator's set-up (Tune keeps every checkpoint, our
    driver callback prunes them at snapshot time; the tracking callback logs every epoch
    to MLflow); without it Tune's own `num_to_keep=2` deletes them and forces an
    experiment snapshot every second checkpoint, and nothing is tracked.
    """
    from ray import tune

    from orchestrator.retention import CheckpointRetention
    from orchestrator.tracking import TrackingCallback, connect, experiment_id
    from trainables import train_classifier

    callbacks: list[Any] = []
    if sweep_retention:
        uri = f"sqlite:///{storage}/{name}-mlflow.db"
        client = connect(uri)
        exp_id = experiment_id(client, name, f"{storage}/{name}-artifacts")
        parent = client.create_run(exp_id).info.run_id
        callbacks = [CheckpointRetention(keep=2), TrackingCallback(uri, exp_id, parent)]
    tuner = tune.Tuner(
        tune.with_resources(train_classifier, {"cpu": 1}),
        param_space=cfg,
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if sweep_retention else 2),
            callbacks=callbacks,
            verbose=0,
        ),
    )
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    result = grid[0]
    if result.error is not None:
        raise RuntimeError(f"the Tune trial failed: {result.error}")
    frame = result.metrics_dataframe
    return [float(t) for t in frame["time_this_iter_s"]], wall


def summary(times: Sequence[float]) -> tuple[float, float, int]:
    """Median and mean of the per-epoch times after the first (warm-up) epoch."""
    rest = list(times[1:]) or list(times)
    return statistics.median(rest), statistics.fmean(rest), len(rest)


def machine_load() -> str:
    """`uptime` (the machine may be shared: say how loaded it was)."""
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
        return out.stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


def run() -> str:
    """The table with default arguments, as text (for ``run_all``)."""
    from benchmarks.measure import printed_by  # run_all puts the repository on sys.path

    return "## Training under Tune vs bare\n\n" + printed_by(main)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=40, help="epochs of the batch-64 runs")
    p.add_argument("--full-epochs", type=int, default=120, help="epochs of the full-batch runs")
    args = p.parse_args(argv)

    # One thread here, as Ray gives a 1-CPU trial (OMP_NUM_THREADS=1).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune warns on every forced experiment snapshot; the num_to_keep run measures that cost.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import ray
    import torch

    torch.set_num_threads(1)
    print(f"machine before: {machine_load()}")
    cases = [("batch 64", 64, args.epochs), ("full batch", "full", args.full_epochs)]
    ratios: dict[str, float] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as storage:
        t0 = time.perf_counter()
        # address="local": always a fresh instance of our own. A bare ray.init() joins any
        # other local Ray instance on a shared machine (and dies when its owner stops it).
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - t0
        try:
            for label, batch, epochs in cases:
                cfg = config(batch, epochs)
                before = bare_epoch_times(cfg, checkpoint=False)
                with_ckpt = bare_epoch_times(cfg, checkpoint=True)
                tuned, tune_wall = tune_epoch_times(cfg, storage, f"overhead-{batch}")
                keep_all, _ = tune_epoch_times(cfg, storage, f"keep-two-{batch}", False)
                after = bare_epoch_times(cfg, checkpoint=False)
                bare_med = statistics.median([summary(before)[0], summary(after)[0]])
                tune_med = summary(tuned)[0]
                ratios[label] = tune_med / bare_med
                ratios[f"{label} (vs bare+checkpoint)"] = tune_med / summary(with_ckpt)[0]
                ratios[f"{label} (num_to_keep=2)"] = summary(keep_all)[0] / bare_med
                rows.append((label, epochs, before, with_ckpt, tuned, keep_all, after, tune_wall))
        finally:
            ray.shutdown()

    print(f"ray.init: {startup:.1f}s (excluded)")
    print()
    print(
        "| config | epochs | bare before | bare + checkpoint | tune (sweep's callbacks) "
        "| tune, Tune's num_to_keep=2 | bare after | tune / bare | tune / (bare + ckpt) "
        "| num_to_keep=2 / bare | Tuner.fit wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, epochs, before, ckpt, tuned, keep_all, after, wall in rows:
        cells = [f"{summary(t)[0] * 1e3:.1f} ms" for t in (before, ckpt, tuned, keep_all, after)]
        print(
            f"| {label} | {epochs} | "
            + " | ".join(cells)
            + f" | {ratios[label]:.2f}x | {ratios[f'{label} (vs bare+checkpoint)']:.2f}x "
            f"| {ratios[f'{label} (num_to_keep=2)']:.2f}x "
            f"| {wall:.1f}s ({sum(tuned):.1f}s in epochs) |"
        )
    print()
    print(
        "per-epoch medians after the first epoch; tune / bare uses the median of the two bare runs"
    )
    for label in ("batch 64", "full batch"):
        goal = "within" if ratios[label] <= 1.2 else "NOT within"
        print(f"{label}: Tune / bare = {ratios[label]:.2f}x ({goal} the 1.2x goal)")
    print(f"machine after: {machine_load()}")
    return ratios


if __name__ == "__main__":
    main()
