"""Which trial checkpoints a sweep keeps: old ones go only once a resume cannot need them.

``Tuner.restore`` (``hessweep resume``) reads Tune's newest experiment snapshot *on
storage* and restores each trial from the latest checkpoint that snapshot names. Tune's own
``CheckpointConfig(num_to_keep=...)`` deletes checkpoints as soon as newer ones arrive,
while snapshots are uploaded in the background every ten seconds or more (and skipped while
an upload is still running): a driver killed in between leaves a snapshot naming a deleted
checkpoint, and Tune refuses to restore that trial. So Tune keeps every checkpoint and this
driver callback deletes a trial's old ones, at each snapshot and at the end, only below the
one the snapshot on storage names (and never the newest ``keep``). When the stored snapshot
cannot be read or does not name the trial's checkpoint, nothing of that trial is deleted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pyarrow.fs as pafs
from ray import tune

from trainables.tune_checkpoint import sibling_checkpoints

SNAPSHOT_PREFIX = "experiment_state-"


def stored_latest_checkpoints(fs: pafs.FileSystem, experiment: str) -> dict[str, str | None]:
    """Trial id -> the checkpoint folder name the newest snapshot on storage restores from.

    Read from Tune's snapshot (``experiment_state-<time>.json``: each trial's last result
    carries ``checkpoint_dir_name``; every hessweep report has a checkpoint). Empty when no
    snapshot is readable.
    """
    try:
        infos = fs.get_file_info(pafs.FileSelector(experiment))
    except OSError:
        return {}
    names = sorted(
        PurePosixPath(i.path).name
        for i in infos
        if i.type == pafs.FileType.File
        and PurePosixPath(i.path).name.startswith(SNAPSHOT_PREFIX)
        and i.path.endswith(".json")
    )
    if not names:
        return {}
    try:
        with fs.open_input_stream(f"{experiment}/{names[-1]}") as f:
            state = json.loads(f.read())
        latest = {}
        for trial_state, run_metadata in state["trial_data"]:
            trial_id = json.loads(trial_state)["trial_id"]
            last = json.loads(run_metadata).get("last_result") or {}
            latest[trial_id] = last.get("checkpoint_dir_name")
        return latest
    except (OSError, ValueError, KeyError, TypeError):  # mid-upload, or Tune changed format
        return {}


def _around(checkpoint: Any) -> tuple[list[Any], list[Any]]:
    """The ``checkpoint_*`` folders beside ``checkpoint`` older and newer than it, oldest first."""
    name = PurePosixPath(checkpoint.path).name
    siblings = [(PurePosixPath(c.path).name, c) for c in sibling_checkpoints(checkpoint)]
    return [c for n, c in siblings if n < name], [c for n, c in siblings if n > name]


@dataclass
class _TrialCheckpoints:
    """One trial's checkpoints this driver knows of, oldest first, up to its latest; and,
    at the end, folders above the latest that a driver killed earlier left behind."""

    held: list[Any] = field(default_factory=list)
    orphans: list[Any] = field(default_factory=list)


class CheckpointRetention(tune.Callback):
    """Keeps each trial's newest ``keep`` checkpoints and every one a resume may still need."""

    def __init__(self, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self._trials: dict[str, _TrialCheckpoints] = {}

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info):
        record = self._trials.get(trial.trial_id)
        if record is None:
            # First checkpoint seen by this driver: adopt what an earlier driver left behind.
            record = self._trials[trial.trial_id] = _TrialCheckpoints()
            record.held.extend(_around(checkpoint)[0])
        record.held.append(checkpoint)

    def get_state(self) -> None:
        """Called while Tune writes a snapshot: prune against the one already on storage."""
        self._prune()
        return None

    def on_experiment_end(self, trials: list, **info):
        """Tune has uploaded its final snapshot (when it could): prune every trial, also
        those that finished under an earlier driver and those a restore left extra
        checkpoints for."""
        for trial in trials:
            latest = getattr(trial, "checkpoint", None)
            if latest is None:
                continue
            older, newer = _around(latest)
            self._trials[trial.trial_id] = _TrialCheckpoints([*older, latest], newer)
        self._prune()

    def _prune(self) -> None:
        candidates = [r for r in self._trials.values() if len(r.held) > self.keep or r.orphans]
        if not candidates:
            return
        first = candidates[0].held[-1]
        experiment = str(PurePosixPath(first.path).parent.parent)
        stored = stored_latest_checkpoints(first.filesystem, experiment)
        for trial_id, record in self._trials.items():
            names = [PurePosixPath(c.path).name for c in record.held]
            named = stored.get(trial_id)
            if named not in names:
                continue  # no stored snapshot names one of these: keep them all
            if named == names[-1]:  # a resume restores the latest: the rest is unreachable
                record.orphans = self._delete(record.orphans)
            first_kept = min(names.index(named), len(names) - self.keep)
            if first_kept > 0:
                record.held[:first_kept] = self._delete(record.held[:first_kept])

    @staticmethod
    def _delete(checkpoints: list[Any]) -> list[Any]:
        """Delete these checkpoint folders; return those that failed (retried next time)."""
        remaining = []
        for checkpoint in checkpoints:
            try:
                checkpoint.filesystem.delete_dir(checkpoint.path)
            except FileNotFoundError:
                pass
            except OSError as err:
                print(f"hessweep: could not delete {checkpoint.path}: {err}", file=sys.stderr)
                remaining.append(checkpoint)
        return remaining
