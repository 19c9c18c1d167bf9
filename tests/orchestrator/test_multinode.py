"""A simulated multi-node cluster: fractional-GPU trials, actors on different nodes,
spectra equal to the single-node computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multinode_run.py")


def test_sweep_and_pool_across_simulated_nodes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert sorted(set(out["actor_nodes"])) == out["worker_nodes"]
    assert len(out["rows"]) == 2
    for row in out["rows"]:
        assert row["sweep"] == pytest.approx(row["local"], rel=1e-6)
    assert out["pool"] == pytest.approx(out["pool_local"], rel=1e-10)
