"""Every eigenvalue, by building the matrix column by column: small models only."""

from __future__ import annotations

import torch

from analysis.hessian.protocol import LinearOperator, check_operator, operator_device

DEFAULT_MAX_SIZE = 5000


def dense_matrix(op: LinearOperator, max_size: int = DEFAULT_MAX_SIZE) -> torch.Tensor:
    """The operator as a dense symmetric float64 matrix, built from ``size`` products."""
    check_operator(op)
    n = int(op.size)
    if n > max_size:
        gib = n * n * 8 / 2**30
        raise ValueError(
            f"dense_spectrum: the operator has size {n}, above max_size={max_size} "
            f"(a dense {n}x{n} matrix needs {gib:.1f} GiB and O(n^3) time). Use lanczos() for "
            "extreme eigenvalues or slq_density() for the spectrum, or raise max_size."
        )
    device = operator_device(op)
    eye = torch.eye(n, dtype=op.dtype, device=device)
    cols = [op.matvec(eye[i]).double().cpu() for i in range(n)]
    mat = torch.stack(cols, dim=1)
    return (mat + mat.T) / 2


def dense_spectrum(op: LinearOperator, max_size: int = DEFAULT_MAX_SIZE) -> torch.Tensor:
    """All eigenvalues of a symmetric operator, descending, in float64."""
    return torch.linalg.eigvalsh(dense_matrix(op, max_size)).flip(0)
