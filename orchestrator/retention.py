"""Which trial checkpoints a sweep keeps, deleted only when no snapshot can still need them.

Tune's own ``CheckpointConfig(num_to_keep=...)`` deletes a checkpoint as soon as newer ones
arrive, while its experiment snapshot (what ``Tuner.restore`` reads after the driver dies)
is written every ten seconds or more: a driver killed in between leaves a snapshot naming a
deleted checkpoint, and Tune then refuses to restore that trial. Here Tune keeps every
checkpoint and this driver callback deletes old ones at snapshot time, sparing every
checkpoint from the one named ``snapshots`` snapshots ago onwards and the newest ``keep``.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from trainables.tune_checkpoint import older_checkpoints


@dataclass
class _TrialCheckpoints:
    """One trial's checkpoints, oldest first, and the newest one each recent snapshot named."""

    held: list[Any] = field(default_factory=list)
    named: deque[str] = field(default_factory=deque)
    finished: bool = False
    snapshot_after_finish: bool = False


class CheckpointRetention(tune.Callback):
    """Keeps the newest ``keep`` checkpoints per trial, plus any a recent snapshot names."""

    def __init__(self, keep: int = 2, snapshots: int = 2) -> None:
        if keep < 1 or snapshots < 1:
            raise ValueError("keep and snapshots must be at least 1")
        self.keep = keep
        self.snapshots = snapshots
        self._trials: dict[str, _TrialCheckpoints] = {}

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info):
        record = self._trials.get(trial.trial_id)
        if record is None:
            # First checkpoint seen by this driver: adopt what an earlier driver left behind.
            record = self._trials[trial.trial_id] = _TrialCheckpoints()
            record.held.extend(reversed(older_checkpoints(checkpoint)))
        record.held.append(checkpoint)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info):
        if trial.trial_id in self._trials:
            self._trials[trial.trial_id].finished = True

    def get_state(self) -> None:
        """Called while Tune writes a snapshot: the snapshot names each trial's newest."""
        for record in self._trials.values():
            if not record.held:
                continue
            record.named.append(record.held[-1].path)
            while len(record.named) > self.snapshots + 1:
                record.named.popleft()
            paths = [c.path for c in record.held]
            protected = [paths.index(p) for p in record.named if p in paths]
            first_kept = min([len(paths) - self.keep, *protected])
            self._delete(record, first_kept)
            if record.finished:
                record.snapshot_after_finish = True
        return None

    def on_experiment_end(self, trials: list, **info):
        """Tune's final snapshot is on storage now: finished trials keep only the newest."""
        for record in self._trials.values():
            if record.snapshot_after_finish:
                self._delete(record, len(record.held) - self.keep)

    @staticmethod
    def _delete(record: _TrialCheckpoints, first_kept: int) -> None:
        for checkpoint in record.held[: max(first_kept, 0)]:
            with contextlib.suppress(FileNotFoundError):
                checkpoint.filesystem.delete_dir(checkpoint.path)
        del record.held[: max(first_kept, 0)]
