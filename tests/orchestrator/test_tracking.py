"""Connecting to the tracking store: several processes may create a new SQLite store at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.tracking import clean_params
from trainables.config import parse_config

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


def _logged(robust: dict, eval_attack: dict) -> dict[str, str]:
    """The params a trial with these attack settings logs to MLflow."""
    return clean_params(parse_config({"robust": robust, "eval_attack": eval_attack}).to_flat_dict())


def test_params_leave_out_settings_the_attack_method_ignores() -> None:
    plain = _logged({"method": "none"}, {"method": "none"})
    assert sorted(k for k in plain if k.startswith(("robust.", "eval_attack."))) == [
        "eval_attack.epsilon",
        "eval_attack.method",
        "robust.epsilon",  # the contract's param on every run (0: no perturbation)
        "robust.method",
    ]
    fgsm = _logged({"method": "fgsm", "epsilon": 0.1}, {"method": "fgsm", "epsilon": 0.1})
    assert {"robust.epsilon", "robust.adv_fraction", "eval_attack.epsilon"} <= set(fgsm)
    assert not {"robust.steps", "robust.step_size", "eval_attack.steps"} & set(fgsm)
    pgd = _logged({"method": "pgd", "epsilon": 0.1, "steps": 3}, {"method": "pgd", "epsilon": 0.1})
    assert pgd["robust.steps"] == "3" and pgd["robust.step_size"] == "null"
    assert pgd["eval_attack.steps"] == "10" and "lr" in pgd and "device" not in pgd
