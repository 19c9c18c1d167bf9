"""Run the hessweep CLI on the head node of a Ray cluster (the file `ray submit` copies).

    ray submit cluster.yaml cluster/submit.py -- run paper-cifar10 --set seeds=[0]

It runs from the repository that cluster.yaml mounts on every node, joins the running
cluster (RAY_ADDRESS=auto) and keeps the MLflow store on the head (runs/mlflow.db).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CANDIDATES = ("/home/ray/hessweep", "/home/ubuntu/hessweep", str(Path.home() / "hessweep"))


def main() -> int:
    """Find the mounted repository, join the cluster and hand the arguments to hessweep."""
    repo = next((p for p in CANDIDATES if (Path(p) / "pyproject.toml").is_file()), None)
    if repo is None:
        print(
            f"hessweep repository not found on this node (looked in {CANDIDATES})", file=sys.stderr
        )
        return 2
    os.chdir(repo)
    sys.path.insert(0, repo)
    os.environ.setdefault("RAY_ADDRESS", "auto")
    from orchestrator.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
