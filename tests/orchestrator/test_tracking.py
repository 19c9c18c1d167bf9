"""Connecting to the tracking store: several processes may create a new SQLite store at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

CONNECT = "import sys; from orchestrator.tracking import connect; connect(sys.argv[1])"


def test_processes_creating_one_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    # Without the lock around MLflow's table creation three of four such processes failed
    # (alembic "expected to match one row", or "table ... already exists").
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONNECT, uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    failed = [out for p, out in zip(procs, outs, strict=True) if p.returncode != 0]
    assert not failed, failed[0][-2000:]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("Default") is not None
