"""Old checkpoints are deleted only once no recent experiment snapshot can name them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
from ray.tune import Checkpoint

from orchestrator.retention import CheckpointRetention

TRIAL = SimpleNamespace(trial_id="t0")


def _checkpoint(root: Path, index: int) -> Checkpoint:
    folder = root / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.pt").write_bytes(b"x")
    return Checkpoint(path=str(folder), filesystem=pafs.LocalFileSystem())


def _on_disk(root: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in root.glob("checkpoint_*"))


def test_checkpoint_named_by_a_stale_snapshot_survives_newer_checkpoints(tmp_path):
    """The failure Tune's num_to_keep=2 caused: a snapshot names c1, c2 and c3 arrive."""
    retention = CheckpointRetention(keep=2, snapshots=2)
    for i in range(2):
        retention.on_checkpoint(i, [], TRIAL, _checkpoint(tmp_path, i))
    retention.get_state()  # snapshot names checkpoint 1
    for i in range(2, 4):
        retention.on_checkpoint(i, [], TRIAL, _checkpoint(tmp_path, i))
    assert _on_disk(tmp_path) == [0, 1, 2, 3]
    retention.get_state()  # names 3; the one before still names 1
    assert _on_disk(tmp_path) == [1, 2, 3]


@pytest.mark.parametrize("per_snapshot", [[1, 3, 0, 5, 2, 1, 4, 0, 0, 2], [6, 1, 1, 1, 7, 2]])
def test_every_checkpoint_a_recent_snapshot_names_is_kept_and_the_rest_go(tmp_path, per_snapshot):
    retention = CheckpointRetention(keep=2, snapshots=2)
    named: list[int] = []
    index = 0
    for count in per_snapshot:
        for _ in range(count):
            retention.on_checkpoint(index, [], TRIAL, _checkpoint(tmp_path, index))
            index += 1
        if index:
            named.append(index - 1)
        retention.get_state()
        on_disk = _on_disk(tmp_path)
        oldest_needed = min([index - 2, *named[-3:]])
        assert on_disk == list(range(max(oldest_needed, 0), index)), (named, on_disk)


def test_a_restored_driver_adopts_the_checkpoints_left_before_the_kill(tmp_path):
    for i in range(5):
        _checkpoint(tmp_path, i)
    retention = CheckpointRetention(keep=2, snapshots=1)
    retention.on_checkpoint(5, [], TRIAL, _checkpoint(tmp_path, 5))
    retention.get_state()
    retention.get_state()
    assert _on_disk(tmp_path) == [4, 5]


def test_finished_trials_keep_only_the_newest_after_the_final_snapshot(tmp_path):
    retention = CheckpointRetention(keep=2, snapshots=2)
    for i in range(6):
        retention.on_checkpoint(i, [], TRIAL, _checkpoint(tmp_path, i))
        retention.get_state()
    retention.on_trial_complete(6, [], TRIAL)
    retention.on_experiment_end([])
    assert _on_disk(tmp_path) == [3, 4, 5], "no snapshot after the trial finished yet"
    retention.get_state()
    retention.on_experiment_end([])
    assert _on_disk(tmp_path) == [4, 5]


def test_keep_must_be_positive():
    with pytest.raises(ValueError, match="keep"):
        CheckpointRetention(keep=0)
