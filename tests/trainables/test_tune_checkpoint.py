"""A corrupt latest checkpoint is named and the trial falls back to the previous one."""

from __future__ import annotations

import shutil

import pytest
from ray.tune import Checkpoint

from trainables.checkpoint import CheckpointError, load_checkpoint
from trainables.train import fit
from trainables.tune_checkpoint import load_tune_checkpoint


@pytest.fixture(scope="module")
def trial_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trial")
    config = {"dataset": "synthetic", "model": "mlp", "batch_size": 64, "max_epochs": 2}
    snapshots = []
    fit(
        config,
        checkpoint_dir=root / "live",
        on_epoch_end=lambda m: snapshots.append(
            shutil.copytree(root / "live", root / f"checkpoint_{int(m['epoch']):06d}")
        ),
    )
    return root


def test_reads_the_latest_when_it_is_fine(trial_dir):
    payload, source = load_tune_checkpoint(Checkpoint(str(trial_dir / "checkpoint_000002")))
    assert payload["epoch"] == 2 and source.endswith("checkpoint_000002")


def test_corrupt_latest_falls_back_to_the_previous_and_names_the_file(trial_dir, tmp_path, capsys):
    work = shutil.copytree(trial_dir, tmp_path / "t")
    bad = work / "checkpoint_000002" / "checkpoint.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    payload, source = load_tune_checkpoint(Checkpoint(str(work / "checkpoint_000002")))
    assert payload["epoch"] == 1 and source.endswith("checkpoint_000001")
    assert str(bad) in capsys.readouterr().err
    assert payload["epoch"] == load_checkpoint(work / "checkpoint_000001")["epoch"]


def test_no_readable_checkpoint_fails_loudly(trial_dir, tmp_path):
    work = shutil.copytree(trial_dir, tmp_path / "t")
    for name in ("checkpoint_000001", "checkpoint_000002"):
        f = work / name / "checkpoint.pt"
        f.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as err:
        load_tune_checkpoint(Checkpoint(str(work / "checkpoint_000002")))
    assert "checkpoint_000001" in str(err.value) and "checkpoint_000002" in str(err.value)
