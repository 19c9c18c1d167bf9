"""Exact Hessian operators of neural-network losses and the eigen-solvers that run on them.

Pure torch (and numpy-free): any solver accepts any object with ``size``, ``dtype`` and
``matvec``, so the same code runs on one process or on a pool of Ray actors.
"""

from analysis.hessian.api import hessian_spectrum
from analysis.hessian.dense import dense_matrix, dense_spectrum
from analysis.hessian.density import slq_density
from analysis.hessian.graphcache import NotTwiceDifferentiableError
from analysis.hessian.inputs import InputHessian, input_hessian_eigenvalues, input_hessian_spectrum
from analysis.hessian.jacobian import NotPiecewiseLinearError
from analysis.hessian.lanczos import ConvergenceWarning, batched_lanczos, lanczos
from analysis.hessian.power import power_iteration
from analysis.hessian.protocol import BatchedOperator, LinearOperator
from analysis.hessian.results import BatchedEigenResult, DensityResult, EigenResult, TraceResult
from analysis.hessian.trace import hutchinson_trace
from analysis.hessian.weight import NonDeterminismError, WeightHessian

__all__ = [
    "BatchedEigenResult",
    "BatchedOperator",
    "ConvergenceWarning",
    "DensityResult",
    "EigenResult",
    "InputHessian",
    "LinearOperator",
    "NonDeterminismError",
    "NotPiecewiseLinearError",
    "NotTwiceDifferentiableError",
    "TraceResult",
    "WeightHessian",
    "batched_lanczos",
    "dense_matrix",
    "dense_spectrum",
    "hessian_spectrum",
    "hutchinson_trace",
    "input_hessian_eigenvalues",
    "input_hessian_spectrum",
    "lanczos",
    "power_iteration",
    "slq_density",
]
