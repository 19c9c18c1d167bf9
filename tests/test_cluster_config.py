"""cluster.yaml and the on-prem example pass Ray's own launcher validation; localhost only."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "cluster.yaml", ROOT / "cluster" / "onprem.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_passes_ray_launcher_validation(path):
    config = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_nothing_listens_on_all_interfaces(path):
    text = path.read_text()
    assert "0.0.0.0" not in text
    head = yaml.safe_load(text)["head_start_ray_commands"]
    assert any("--dashboard-host=127.0.0.1" in cmd for cmd in head)


def test_aws_cluster_matches_the_installed_ray_and_python():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    image = config["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu"
    nodes = config["available_node_types"]
    gpu = [n for n in nodes.values() if n["node_config"]["InstanceType"].startswith("g5.")]
    assert len(gpu) == 2 and all(n["min_workers"] == 0 for n in gpu)
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert "/home/ray/hessweep" in config["file_mounts"]


def test_submit_launcher_runs_the_cli_from_the_mounted_repo(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("submit", ROOT / "cluster" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    monkeypatch.setattr(submit, "CANDIDATES", ("/nonexistent", str(ROOT)))
    monkeypatch.setattr("sys.argv", ["submit.py", "validate", "demo"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir("/")
    assert submit.main() == 0
    assert "valid" in capsys.readouterr().out
    import os

    assert os.environ["RAY_ADDRESS"] == "auto"
    monkeypatch.setattr(submit, "CANDIDATES", ("/nonexistent",))
    assert submit.main() == 2
