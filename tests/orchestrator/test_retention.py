"""Old checkpoints are deleted only below the one the snapshot on storage names."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
from ray import tune
from ray.tune import Checkpoint

from orchestrator.retention import CheckpointRetention, stored_latest_checkpoints

TRIAL = SimpleNamespace(trial_id="t0")


def _checkpoint(trial_dir: Path, index: int) -> Checkpoint:
    folder = trial_dir / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint.pt").write_bytes(b"x")
    return Checkpoint(path=str(folder), filesystem=pafs.LocalFileSystem())


def _store_snapshot(experiment: Path, named: dict[str, int | None], stamp: str = "1") -> None:
    """A snapshot in Tune's format: each trial's last result names its checkpoint."""
    trial_data = [
        [
            json.dumps({"trial_id": trial_id}),
            json.dumps(
                {
                    "last_result": {
                        "checkpoint_dir_name": None if i is None else f"checkpoint_{i:06d}"
                    }
                }
            ),
        ]
        for trial_id, i in named.items()
    ]
    (experiment / f"experiment_state-2026-11-27_00-00-0{stamp}.json").write_text(
        json.dumps({"trial_data": trial_data})
    )


def _on_disk(trial_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in trial_dir.glob("checkpoint_*"))


@pytest.fixture
def trial_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "experiment" / "trial_t0"
    folder.mkdir(parents=True)
    return folder


def test_checkpoint_named_by_a_stale_stored_snapshot_survives(trial_dir):
    """The failure Tune's num_to_keep=2 caused: storage names c1 while c2..c5 arrive."""
    experiment = trial_dir.parent
    retention = CheckpointRetention(keep=2)
    _store_snapshot(experiment, {"t0": 1})
    for i in range(6):
        retention.on_checkpoint(i, [], TRIAL, _checkpoint(trial_dir, i))
        retention.get_state()
    assert _on_disk(trial_dir) == [1, 2, 3, 4, 5]
    _store_snapshot(experiment, {"t0": 5}, stamp="2")  # a newer upload lands
    retention.get_state()
    assert _on_disk(trial_dir) == [4, 5]


@pytest.mark.parametrize(
    "stored",
    [None, {"other": 3}, {"t0": None}, "garbage"],
    ids=["no snapshot", "trial not in it", "no checkpoint named", "unreadable"],
)
def test_nothing_is_deleted_when_the_stored_snapshot_names_none_of_them(trial_dir, stored):
    experiment = trial_dir.parent
    if stored == "garbage":
        (experiment / "experiment_state-2026-11-27_00-00-01.json").write_text('{"trial_da')
    elif stored is not None:
        _store_snapshot(experiment, stored)
    retention = CheckpointRetention(keep=2)
    for i in range(5):
        retention.on_checkpoint(i, [], TRIAL, _checkpoint(trial_dir, i))
        retention.get_state()
    retention.on_experiment_end([])
    assert _on_disk(trial_dir) == [0, 1, 2, 3, 4]


def test_a_restored_driver_adopts_the_checkpoints_left_before_the_kill(trial_dir):
    for i in range(5):
        _checkpoint(trial_dir, i)
    _store_snapshot(trial_dir.parent, {"t0": 5})
    retention = CheckpointRetention(keep=2)
    retention.on_checkpoint(5, [], TRIAL, _checkpoint(trial_dir, 5))
    retention.get_state()
    assert _on_disk(trial_dir) == [4, 5]


def test_the_end_prunes_trials_finished_under_an_earlier_driver_and_orphans(trial_dir):
    """A trial this driver never saw checkpoint, with folders above its latest (written
    after the last snapshot an earlier, killed driver uploaded)."""
    for i in range(7):
        _checkpoint(trial_dir, i)
    finished = SimpleNamespace(trial_id="t0", checkpoint=_checkpoint(trial_dir, 3))
    retention = CheckpointRetention(keep=2)
    _store_snapshot(trial_dir.parent, {"t0": 1})
    retention.on_experiment_end([finished])
    assert _on_disk(trial_dir) == [1, 2, 3, 4, 5, 6], "storage still names checkpoint 1"
    _store_snapshot(trial_dir.parent, {"t0": 3}, stamp="2")
    retention.on_experiment_end([finished])
    assert _on_disk(trial_dir) == [2, 3]


def test_a_failed_delete_is_reported_and_retried(trial_dir, capsys):
    _store_snapshot(trial_dir.parent, {"t0": 3})
    flaky = _FlakyFS()
    retention = CheckpointRetention(keep=1)
    for i in range(4):
        c = _checkpoint(trial_dir, i)
        retention.on_checkpoint(i, [], TRIAL, SimpleNamespace(path=c.path, filesystem=flaky))
    retention.get_state()
    assert _on_disk(trial_dir) == [0, 3] and "could not delete" in capsys.readouterr().err
    retention.get_state()
    assert _on_disk(trial_dir) == [3]


class _FlakyFS:
    """The local file system, whose first delete_dir fails like a throttled object store."""

    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()
        self.failed = False

    def delete_dir(self, path: str) -> None:
        if not self.failed:
            self.failed = True
            raise OSError("SlowDown: please reduce your request rate")
        self.local.delete_dir(path)

    def __getattr__(self, name: str):
        return getattr(self.local, name)


def test_keep_must_be_positive():
    with pytest.raises(ValueError, match="keep"):
        CheckpointRetention(keep=0)


def test_tunes_own_snapshot_is_read(ray_session, tmp_path):
    """Pins the private snapshot format: the last result names the latest checkpoint."""

    def trainable(config):
        for i in range(3):
            folder = tmp_path / f"ck{i}"
            folder.mkdir()
            (folder / "x").write_text(str(i))
            tune.report({"i": i}, checkpoint=Checkpoint.from_directory(str(folder)))

    tuner = tune.Tuner(
        trainable,
        run_config=tune.RunConfig(name="fmt", storage_path=str(tmp_path / "ray"), verbose=0),
    )
    result = tuner.fit()[0]
    stored = stored_latest_checkpoints(pafs.LocalFileSystem(), str(tmp_path / "ray" / "fmt"))
    assert list(stored.values()) == [Path(result.checkpoint.path).name]
    assert Path(result.checkpoint.path).name == "checkpoint_000002"
