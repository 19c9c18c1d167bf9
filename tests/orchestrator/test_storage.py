"""Sweep folders behind URIs: joining keeps the query, files round-trip through pyarrow."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.api import STATE_FILE, find_sweep_dir
from orchestrator.errors import UserInputError
from orchestrator.storage import (
    checkpoint_location,
    exists,
    join,
    local_copy,
    read_text,
    subfolders,
    write_text,
)


def test_join_puts_parts_before_the_query():
    base = "s3://bucket/hessweep?region=us-east-1&endpoint_override=minio:9000"
    assert join(base, "demo-20260101-000000", STATE_FILE) == (
        "s3://bucket/hessweep/demo-20260101-000000/hessweep.json"
        "?region=us-east-1&endpoint_override=minio:9000"
    )
    assert join("/data/ray", "a", "b") == "/data/ray/a/b"


def test_checkpoint_location_is_under_the_sweep_uri():
    # Tune reports paths inside its file system: no scheme, no query
    tune_path = "bucket/hessweep/demo-20260101-000000/train_abc_00000/checkpoint_000003"
    sweep = "s3://bucket/hessweep/demo-20260101-000000?region=eu-west-1"
    assert checkpoint_location(tune_path, sweep) == (
        "s3://bucket/hessweep/demo-20260101-000000/train_abc_00000/checkpoint_000003"
        "?region=eu-west-1"
    )
    assert checkpoint_location("/runs/ray/x/t/checkpoint_000001", "/runs/ray/x") == (
        "/runs/ray/x/t/checkpoint_000001"
    )


def test_files_round_trip_through_a_uri(tmp_path: Path):
    root = tmp_path.as_uri()
    write_text(join(root, "sweep-a", STATE_FILE), '{"x": 1}')
    (tmp_path / "sweep-b" / "ckpt").mkdir(parents=True)
    (tmp_path / "sweep-b" / "ckpt" / "checkpoint.pt").write_bytes(b"weights")
    assert read_text(join(root, "sweep-a", STATE_FILE)) == '{"x": 1}'
    assert exists(join(root, "sweep-a")) and not exists(join(root, "nope"))
    assert subfolders(root) == ["sweep-a", "sweep-b"]
    assert subfolders(join(root, "nope")) == []
    with local_copy(join(root, "sweep-b", "ckpt")) as local:
        assert Path(local) != tmp_path / "sweep-b" / "ckpt"
        assert (Path(local) / "checkpoint.pt").read_bytes() == b"weights"
    assert not Path(local).exists()  # the download is removed afterwards
    with pytest.raises(FileNotFoundError, match="nothing at"), local_copy(join(root, "gone")):
        pass


@pytest.mark.parametrize("uri", [False, True], ids=["path", "uri"])
def test_newest_sweep_of_exactly_that_experiment(tmp_path: Path, uri: bool):
    for name in ("demo-20260101-000000", "demo-20260102-000000", "demo-big-20260103-000000"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text("{}")
    (tmp_path / "demo-20260104-000000").mkdir()  # no state file: not a sweep
    storage = tmp_path.as_uri() if uri else str(tmp_path)
    found = find_sweep_dir("demo", storage)
    assert found.rstrip("/").endswith("demo-20260102-000000")
    assert find_sweep_dir("demo-big", storage).endswith("demo-big-20260103-000000")
    with pytest.raises(UserInputError, match="no sweep called 'dem'"):
        find_sweep_dir("dem", storage)


@pytest.mark.parametrize(
    ("storage", "reason"),
    [
        ("ftp://x/y", "Unrecognized filesystem type"),
        ("gs://b/x?foo=1", "Unexpected query parameter"),
    ],
)
def test_resume_from_a_storage_that_cannot_be_opened_is_bad_input(storage, reason, capsys):
    from orchestrator.cli import main

    assert main(["resume", "demo", "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert f"storage {storage}: {reason}" in err and "s3://, gs:// or file://" in err
    sweep = join(storage, "demo-20260101-000000")
    assert main(["resume", sweep]) == 2  # a sweep folder instead
    assert f"sweep folder {sweep}: {reason}" in capsys.readouterr().err


def test_analyze_of_a_run_whose_checkpoint_cannot_be_opened_is_bad_input(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main
    from orchestrator.tracking import CHECKPOINT, PARENT

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    tags = {CHECKPOINT: "ftp://x/t/checkpoint_000001", PARENT: "p"}
    run = client.create_run(client.create_experiment("a"), tags=tags).info.run_id
    assert main(["analyze", run, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint of run {run} ftp://x/t/checkpoint_000001" in err
    assert "Traceback" not in err


def test_analyze_of_a_run_whose_data_is_damaged_is_bad_input(tmp_path, capsys, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient

    import orchestrator.api
    from orchestrator.cli import main
    from orchestrator.phase import HessianPhase
    from orchestrator.spec import Experiment
    from orchestrator.tracking import CHECKPOINT, PARENT, SWEEP_DIR
    from trainables.data import DatasetCorruptError

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("a")
    sweep = tmp_path / "sweep"
    (sweep / "checkpoint_000001").mkdir(parents=True)
    spec = Experiment.from_dict({"name": "a", "batch_sizes": [16]})
    (sweep / "hessweep.json").write_text(json.dumps({"spec": json.loads(spec.model_dump_json())}))
    parent = client.create_run(exp_id, tags={SWEEP_DIR: str(sweep)}).info.run_id
    tags = {CHECKPOINT: str(sweep / "checkpoint_000001"), PARENT: parent}
    run = client.create_run(exp_id, tags=tags).info.run_id

    def damaged(self, *args):
        raise DatasetCorruptError("cifar10 files in /data exist but torchvision rejected them")

    monkeypatch.setattr(orchestrator.api, "_init_ray", lambda *a, **kw: None)
    monkeypatch.setattr(HessianPhase, "_analyse", damaged)
    assert main(["analyze", run, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"run {run}: cifar10 files in /data exist" in err and "Traceback" not in err
