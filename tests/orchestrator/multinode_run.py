"""Run by test_multinode.py in its own process: a simulated 3-node cluster (head + two
workers with fake GPUs) runs a tiny sweep with fractional-GPU trials and a 2-actor
Hessian pool; prints JSON with where things ran and what they computed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
import torch
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from torch import nn

from analysis.hessian import lanczos
from orchestrator.api import run_experiment
from orchestrator.hessian_pool import HessianPool
from orchestrator.spec import Experiment
from trainables.train import load_trained


def main(root: Path) -> dict:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    exp = Experiment.from_dict(
        {
            "name": "multinode",
            "dataset": "synthetic",
            "model": "mlp",
            "batch_sizes": [32, "full"],
            "training": {"max_epochs": 2, "lr": 0.1},
            "resources": {"cpus": 0.5, "gpus": 0.5},
            "hessian": {
                "top_k": 2,
                "trace": False,
                "density": False,
                "input_samples": 8,
                "num_actors": 2,
                "cpus_per_actor": 1,
            },
            "storage": str(root / "ray"),
            "tracking_uri": f"sqlite:///{root}/mlflow.db",
        }
    )
    result = run_experiment(exp, progress=lambda _: None)
    client = MlflowClient(result.tracking_uri)
    out = {"worker_nodes": sorted(w.node_id for w in workers), "rows": []}
    for _, row in result.table.iterrows():
        run = client.get_run(row["run_id"])
        trained = load_trained(run.data.tags["hessweep.checkpoint"])
        local = lanczos_local(trained)
        out["rows"].append(
            {
                "sweep": [run.data.metrics["hessian/eig_1"], run.data.metrics["hessian/eig_2"]],
                "local": local,
            }
        )
    trained = load_trained(
        client.get_run(result.table["run_id"][0]).data.tags["hessweep.checkpoint"]
    )
    pool = HessianPool(trained.train_data.tensors(), num_actors=2, num_cpus=1)
    out["actor_nodes"] = ray.get(
        [
            a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
            for a in pool.actors
        ]
    )
    op = pool.weight_hessian(trained.model, dtype=torch.float64)
    out["pool"] = [float(v) for v in lanczos(op, k=2, tol=1e-10).eigenvalues]
    out["pool_local"] = lanczos_local(trained, tol=1e-10)
    pool.close()
    ray.shutdown()
    cluster.shutdown()
    return out


def lanczos_local(trained, tol: float = 1e-6) -> list[float]:
    from analysis.hessian import WeightHessian

    op = WeightHessian(
        trained.model, nn.CrossEntropyLoss(), [trained.train_data.tensors()], dtype=torch.float64
    )
    return [float(v) for v in lanczos(op, k=2, tol=tol).eigenvalues]


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(Path(sys.argv[1]))))
