"""Spec -> Ray Tune sweep -> Hessian actor pool -> MLflow: the orchestrator and its API.

Names are imported lazily so that ``hessweep --help`` and spec validation stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Experiment": "orchestrator.spec",
    "ExperimentResult": "orchestrator.api",
    "HessianPool": "orchestrator.hessian_pool",
    "UserInputError": "orchestrator.errors",
    "resume_experiment": "orchestrator.api",
    "run_experiment": "orchestrator.api",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
