"""Per-sample input Hessians of models piecewise linear in their input, from the output
Jacobian: every eigenvalue, exactly, without iterating.

A model built from linear maps and piecewise-linear functions of its input (convolutions,
linear layers, ReLU, max-pooling, eval-mode batch norm, ...) has no second derivative in
its input: autograd's double backward gives each sample's input Hessian as exactly
``J_i^T H_i J_i``, with ``J_i`` the Jacobian of its m outputs and ``H_i`` the loss's m x m
Hessian in them. Its nonzero eigenvalues are those of an m x m matrix and the rest are
zero, so m backward passes over a batch give every sample's whole spectrum: no stopping
rule, and no close pair of eigenvalues to miss. Whether a model qualifies is read off the
autograd graph of the very forward pass the Jacobian comes from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from analysis.hessian import convolutions, piecewise
from analysis.hessian.graphcache import check_twice_differentiable
from analysis.hessian.lanczos import check_k, wanted_columns
from analysis.hessian.modelutil import LossFn, exact_float32, summed_loss
from analysis.hessian.results import BatchedEigenResult, concat_batched

if TYPE_CHECKING:
    from analysis.hessian.inputs import InputHessian

AUTO_MAX_OUTPUTS = 20
"""``method="auto"`` takes this route up to this many model outputs per sample: it costs one
backward pass per output, while Lanczos on a Hessian of rank below m needs fewer steps than
m as m grows (a CIFAR-shaped CNN, one CPU thread: faster at m = 10 and 20, as fast at 32,
slower at 50)."""

GRAM_BYTES = 2**25  # float64 scratch for the Gram matrices, per slice of the input
JACOBIAN_BYTES = 2**28  # the Jacobians of one pass's samples (a 512-sample CIFAR batch: 63 MB)

# Linear in every input that depends on x: views, copies, sums, padding, linear pooling.
_LINEAR = frozenset(
    {
        "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0",
        "RsubBackward1", "NegBackward0", "MulBackward1", "DivBackward1", "SumBackward0",
        "SumBackward1", "MeanBackward0", "MeanBackward1", "ViewBackward0",
        "UnsafeViewBackward0", "ReshapeAliasBackward0", "AsStridedBackward0",
        "PermuteBackward0", "TransposeBackward0", "TBackward0", "ExpandBackward0",
        "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0",
        "CloneBackward0", "AliasBackward0", "SliceBackward0", "SelectBackward0",
        "IndexBackward0", "IndexSelectBackward0", "GatherBackward0", "CumsumBackward0",
        "CatBackward0", "StackBackward0", "SplitBackward0",
        "SplitWithSizesBackward0", "UnbindBackward0", "RepeatBackward0", "FlipBackward0",
        "RollBackward0", "PixelShuffleBackward0", "Im2ColBackward0", "ToCopyBackward0",
        "ConstantPadNdBackward0", "ReflectionPad1DBackward0", "ReflectionPad2DBackward0",
        "ReplicationPad1DBackward0", "ReplicationPad2DBackward0", "AvgPool2DBackward0",
        "AvgPool3DBackward0", "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0",
        "UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0",
        "UpsampleBilinear2DBackward0",
    }
)  # fmt: skip
# Piecewise linear: a mask, a selection or a slope chosen by the input's own values.
_PIECEWISE = frozenset(
    {
        "ReluBackward0", "LeakyReluBackward0", "HardtanhBackward0", "ThresholdBackward0",
        "AbsBackward0", "ClampBackward1", "MaximumBackward0",
        "MinimumBackward0", "MaxBackward0", "MinBackward0", "AmaxBackward0",
        "AminBackward0", "WhereBackward0", "MaskedFillBackward0", "SortBackward0",
        "TopkBackward0", "MaxPool2DWithIndicesBackward0",
        "MaxPool3DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0",
    }
)  # fmt: skip
# leangraph's own Functions, by identity (a user's Function may share their names): a
# convolution with one operand constant, ReLU and max-pooling
_LEAN = frozenset(
    f._backward_cls for f in (convolutions._Convolution, piecewise._ReLU, piecewise._MaxPool2d)
)
# Products: linear as long as at most one of these inputs depends on x.
_PRODUCTS = {
    "MulBackward0": (0, 1),
    "MmBackward0": (0, 1),
    "BmmBackward0": (0, 1),
    "MvBackward0": (0, 1),
    "DotBackward0": (0, 1),
    "AddmmBackward0": (1, 2),
    "BaddbmmBackward0": (1, 2),
    "AddcmulBackward0": (1, 2),
    "ConvolutionBackward0": (0, 1),
    "PreluKernelBackward0": (0, 1),
}
# Quotients: linear as long as the divisor does not depend on x.
_DIVISORS = {"DivBackward0": 1}
# Batch norm: linear with running statistics (``_saved_training`` False) and a weight that
# does not depend on x too.
_BATCH_NORMS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0"})


class NotPiecewiseLinearError(ValueError):
    """The model is not piecewise linear in its input, so ``method="jacobian"`` does not apply."""


def nonlinear_node(output: torch.Tensor, x: torch.Tensor) -> str | None:
    """The autograd node through which ``output`` is not piecewise linear in the leaf ``x``
    (its class name), or None when every node on a path from ``x`` is."""
    if output.grad_fn is None:
        return None
    depends = _dependence(output.grad_fn, x)
    for node, dep in depends.items():
        if dep and not _piecewise_linear(node, depends):
            return type(node).__name__
    return None


def _piecewise_linear(node: object, depends: dict[object, bool]) -> bool:
    """Whether the node (one on a path from x) is piecewise linear in its inputs from x."""
    name = type(node).__name__
    if name == "AbsBackward0":  # of a complex tensor: the modulus, not a fold
        return not node._saved_self.is_complex()
    if name == "AccumulateGrad" or name in _LINEAR or name in _PIECEWISE or type(node) in _LEAN:
        return True
    inputs = [nxt is not None and depends[nxt] for nxt, _ in node.next_functions]
    if name in _PRODUCTS:
        return sum(inputs[i] for i in _PRODUCTS[name] if i < len(inputs)) <= 1
    if name in _DIVISORS:
        return not inputs[_DIVISORS[name]]
    if name in _BATCH_NORMS:
        return getattr(node, "_saved_training", True) is False and sum(inputs[:2]) <= 1
    return False


def _dependence(root: object, x: torch.Tensor) -> dict[object, bool]:
    """Every node of the graph under ``root`` -> whether a path leads from it to ``x``."""
    depends: dict[object, bool] = {}
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in depends:
            continue
        children = [nxt for nxt, _ in node.next_functions if nxt is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in depends)
        elif type(node).__name__ == "AccumulateGrad":
            depends[node] = node.variable is x
        else:
            depends[node] = any(depends[c] for c in children)
    return depends


def jacobian_spectrum(
    op: InputHessian, k: int, which: str, max_outputs: int | None = None
) -> BatchedEigenResult:
    """Per-sample input-Hessian eigenvalues of ``op`` (an ``InputHessian``) from the output
    Jacobian, rows as ``batched_lanczos`` gives them (descending; for ``which="both"`` the k
    largest, then the k smallest).

    Raises ``NotPiecewiseLinearError`` when the model is not piecewise linear in its input,
    its output is not one tensor, or it has more than ``max_outputs`` outputs per sample.
    Samples whose Jacobians would take more than ``JACOBIAN_BYTES`` go in several passes.
    Residuals are those of the small float64 eigenproblems (the zero eigenvalues' are 0);
    ``n_matvecs`` counts the backward passes through the model (the loss's m x m Hessians
    take as many more through the loss alone).
    """
    d = int(op.size)
    check_k(k, d, which)
    with exact_float32():
        xs, z = op.outputs()
        why = _unsuitable(z, xs, max_outputs)
        if why is not None:
            raise NotPiecewiseLinearError(
                f"method='jacobian' needs a model piecewise linear in its input (linear and "
                f"convolution layers, ReLU, max-pooling, eval-mode batch norm, ...) with one "
                f"output tensor: {why}; use method='lanczos' (or 'auto', which picks it)"
            )
        n, m = int(z.shape[0]), int(z[0].numel())
        rows = max(1, JACOBIAN_BYTES // (m * d * xs.element_size()))
        if n > rows:  # free this graph and take the samples a part at a time
            del xs, z
            parts = [
                jacobian_spectrum(op.subset(lo, lo + rows), k, which, max_outputs)
                for lo in range(0, n, rows)
            ]
            return concat_batched(parts)
        jac = _jacobian(z, xs, n, m, d)
        hess = _output_hessians(op.loss_fn, z.detach(), op.y).double()
        gram = _gram(jac) if d > m else None
    if gram is None:  # an input no larger than the output: its d x d Hessian directly
        jd = jac.double()
        _check_finite(jd.square().sum(dim=1), hess)
        values, resid = _eigh_with_residuals(jd.mT @ hess @ jd)
    else:
        _check_finite(gram.diagonal(dim1=1, dim2=2), hess)  # sums of squares: NaN/inf show
        s, u = torch.linalg.eigh(gram)
        r = u * s.clamp_min(0).sqrt().unsqueeze(1)  # G = R R^T: same nonzero spectrum as J^T H J
        values, resid = _with_zeros(*_eigh_with_residuals(r.mT @ hess @ r), min(d - m, 2 * k))
    cols = wanted_columns(values.shape[1], k, which)
    return BatchedEigenResult(
        eigenvalues=values[:, cols].flip(1).cpu(),
        residuals=resid[:, cols].flip(1).cpu(),
        converged=torch.ones(n, dtype=torch.bool),
        n_matvecs=m,
        n_iterations=0,
        method="jacobian",
    )


def _with_zeros(
    values: torch.Tensor, resid: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The m eigenvalues joined by ``count`` of the null space's zeros (as many as the wanted
    ends can reach), sorted ascending, residuals alongside."""
    values = torch.cat([values, values.new_zeros(len(values), count)], dim=1)
    resid = torch.cat([resid, resid.new_zeros(len(resid), count)], dim=1)
    values, order = values.sort(dim=1)
    return values, resid.gather(1, order)


def _check_finite(squares: torch.Tensor, hess: torch.Tensor) -> None:
    """Raise for rows whose Jacobian (through its squares' sums) or loss Hessian is NaN/inf."""
    bad = ~(squares.isfinite().all(dim=1) & hess.flatten(1).isfinite().all(dim=1))
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0].tolist()
        raise FloatingPointError(
            f"the output Jacobian or the loss's Hessian is not finite (NaN or inf) for rows "
            f"{rows[:5]}: the loss is not finite at these weights or inputs (a diverged "
            "model, or bad data); check the loss first"
        )


def _unsuitable(z: object, xs: torch.Tensor, max_outputs: int | None) -> str | None:
    """Why the model's output ``z`` does not admit the Jacobian route (None: it does)."""
    if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[0] != xs.shape[0]:
        return "the model does not return one tensor with a row per sample"
    if not z.is_floating_point():
        return f"the model's output is {z.dtype}, not floating point"
    m = int(z[0].numel())
    if max_outputs is not None and m > max_outputs:
        return f"{m} outputs per sample (more than {max_outputs}: one backward pass each)"
    node = nonlinear_node(z, xs)
    if node is not None:
        return f"autograd node {node} on the path from the input is not"
    return None


def _jacobian(z: torch.Tensor, xs: torch.Tensor, n: int, m: int, d: int) -> torch.Tensor:
    """``(n, m, d)``: each sample's output Jacobian, one backward pass per output (eval mode
    keeps samples apart, so one pass serves the whole batch)."""
    if not z.requires_grad:
        return xs.new_zeros(n, m, d)
    jac = xs.new_empty(n, m, d)
    flat = z.reshape(n, m)
    for c in range(m):
        cot = torch.zeros_like(flat)
        cot[:, c] = 1
        (gx,) = torch.autograd.grad(flat, xs, cot, retain_graph=c < m - 1, allow_unused=True)
        jac[:, c] = 0 if gx is None else gx.reshape(n, d)
    return jac


def _output_hessians(loss_fn: LossFn, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(n, m, m)``: each sample's Hessian of its own loss w.r.t. its m outputs ``z`` (a
    detached tensor, which this makes a leaf of the loss's graph)."""
    n, m = int(z.shape[0]), int(z[0].numel())
    zz = z.requires_grad_(True)
    with torch.enable_grad():
        loss = summed_loss(loss_fn, zz, y)
        (g,) = torch.autograd.grad(loss, zz, create_graph=True)
    hess = zz.new_zeros(n, m, m)
    if g.grad_fn is None:  # a loss linear in the outputs
        return hess
    check_twice_differentiable((g,), loss)
    for c in range(m):
        e = zz.new_zeros(n, m)
        e[:, c] = 1
        (h,) = torch.autograd.grad(
            g, zz, e.reshape(zz.shape), retain_graph=c < m - 1, allow_unused=True
        )
        if h is not None:
            hess[:, c] = h.reshape(n, m)
    return hess


def _gram(jac: torch.Tensor) -> torch.Tensor:
    """``J J^T`` per sample in float64, over slices of the input (bounded scratch). Summed in
    float32 (6x faster), the top three input-Hessian eigenvalues of a float32 digits CNN
    came out up to 8e-6 off a float64 model's; summed in float64, 3e-7 (Lanczos at
    ``tol=1e-6``: 6e-7)."""
    n, m, d = jac.shape
    step = max(1, GRAM_BYTES // (8 * n * m))
    gram = torch.zeros(n, m, m, dtype=torch.float64, device=jac.device)
    for lo in range(0, d, step):
        part = jac[:, :, lo : lo + step].double()
        gram.baddbmm_(part, part.mT)
    return gram


def _eigh_with_residuals(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues of each symmetric matrix and each pair's residual norm."""
    a = (a + a.mT) / 2
    values, vectors = torch.linalg.eigh(a)
    resid = (a @ vectors - vectors * values.unsqueeze(1)).norm(dim=1)
    return values, resid
