"""ReLU and max-pooling whose second derivative has no (zero) term for their input.

Their gradients are masks of the incoming gradient: ``threshold_backward(g, x)`` and a
scatter through the pooling indices. Recorded in a gradient graph, PyTorch's derivative
formulas also differentiate those masks w.r.t. ``x``: ``zeros_like(x)``, a full-size tensor
of zeros per layer and product, added into the input's gradient. Here the mask is built
from a detached view of the saved tensor, so the second backward has no such term at all:
the same derivatives, with one fill and one addition less per layer (one thread: the
digits CNN 39 to 35 ms a product, the CIFAR-shaped benchmark CNN about 4%, C1 about 5%
beyond the ``batchnorm`` rewrite). In-place ReLU and other poolings are left to PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from analysis.hessian.convolutions import as_ints


class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out.detach(), 0)


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(x, kernel, stride, padding, dilation, ceil_mode):
        return torch.ops.aten.max_pool2d_with_indices(
            x, kernel, stride, padding, dilation, ceil_mode
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])
        ctx.pool = inputs[1:]

    @staticmethod
    def backward(ctx, grad, _):
        x, indices = ctx.saved_tensors
        gx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x.detach(), *ctx.pool, indices)
        return gx, None, None, None, None, None


def relu(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.relu`` / ``torch.relu`` of an input that needs a gradient, out of place."""
    x = args[0] if args else kwargs["input"]
    if kwargs.get("inplace") or (len(args) > 1 and args[1]) or not x.requires_grad:
        return None
    return _ReLU.apply(x)


def max_pool2d(args: tuple, kwargs: dict) -> torch.Tensor | tuple | None:
    """``F.max_pool2d`` (with or without indices) / ``torch.max_pool2d`` of an input that
    needs a gradient."""
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
    given = dict(zip(names, args, strict=False)) | kwargs
    x = given["input"]
    if not x.requires_grad or x.dim() not in (3, 4):
        return None
    kernel = as_ints(given["kernel_size"], 2)
    stride = given.get("stride")
    out, indices = _MaxPool2d.apply(
        x,
        kernel,
        as_ints(stride, 2) if stride not in (None, (), []) else kernel,
        as_ints(given.get("padding", 0), 2),
        as_ints(given.get("dilation", 1), 2),
        bool(given.get("ceil_mode", False)),
    )
    return (out, indices) if given.get("return_indices") else out


def max_pool2d_with_indices(args: tuple, kwargs: dict) -> tuple | None:
    """``F.max_pool2d_with_indices``: the pooled output and the indices."""
    return max_pool2d(args, {**kwargs, "return_indices": True})


HANDLERS = {
    F.relu: relu,
    torch.relu: relu,
    torch.Tensor.relu: relu,
    F.max_pool2d: max_pool2d,
    torch.max_pool2d: max_pool2d,
    F.max_pool2d_with_indices: max_pool2d_with_indices,
}
