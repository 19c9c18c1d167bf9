"""The tiny operator interfaces every solver accepts."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear operator on flat vectors: ``size``, ``dtype``, ``device``, ``matvec``."""

    size: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


def not_finite(where: str) -> FloatingPointError:
    """The error for a product that came out NaN or inf: a diverged model or bad data, said
    at once instead of a solver running its whole budget or failing in its linear algebra."""
    return FloatingPointError(
        f"the operator's product is not finite (NaN or inf) {where}: the loss is not finite "
        "at these weights or inputs (a diverged model, or bad data); check the loss first"
    )


class BatchedOperator(Protocol):
    """``batch`` independent symmetric operators of one ``size``, applied row by row.

    ``matvec(V, rows)`` applies operator ``rows[i]`` to ``V[i]``; solvers use it to iterate
    many small problems (per-sample input Hessians) in lock-step with one call per step.
    """

    size: int
    batch: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...


class SingleAsBatch:
    """Views one ``LinearOperator`` as a ``BatchedOperator`` with a batch of one."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op
        self.size = int(op.size)
        self.batch = 1
        self.dtype = op.dtype
        self.device = torch.device(op.device)

    def matvec(self, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(v[0]).reshape(1, -1)


def check_operator(op: object) -> None:
    """Raise a clear ``TypeError`` when ``op`` lacks the solver interface."""
    missing = [name for name in ("size", "dtype", "matvec") if not hasattr(op, name)]
    if missing:
        raise TypeError(
            f"{type(op).__name__} is not a linear operator: it lacks {', '.join(missing)}. "
            "Solvers need .size (int), .dtype and .matvec(v) on flat vectors."
        )
    if int(op.size) < 1:
        raise ValueError(f"operator size must be >= 1, got {op.size}")


def operator_device(op: object) -> torch.device:
    """The device an operator's vectors live on (CPU when it does not say)."""
    return torch.device(getattr(op, "device", "cpu"))
