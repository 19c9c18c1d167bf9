"""Convolutions of data whose second derivative skips the gradient w.r.t. the data.

A Hessian-vector product through a kept gradient graph runs the double backward of every
convolution. PyTorch's (``_convolution_double_backward``) computes the gradient w.r.t. the
convolution's input whenever the weight's term is asked for, even when the input is data
that needs no gradient: for a CNN's first layer that is a whole transposed convolution of
the batch per product, thrown away (a quarter of each product on the benchmark's
CIFAR-shaped CNN, an eighth on the digits CNN). Inside ``data_convolutions()`` a
convolution of an input that needs no gradient is recorded with its own backward instead:
the same weight and bias gradients, whose derivative w.r.t. the output gradient is one
forward convolution of the data. Every other convolution is left as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch.overrides import TorchFunctionMode

_DIMS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}


def _tuple(value: int | Sequence[int], n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, Sequence) else [int(value)] * n


def _convolve(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: tuple):
    """The plain convolution ``x * weight + bias`` with ``conv = (stride, padding, dilation,
    groups)``."""
    stride, padding, dilation, groups = conv
    zeros = [0] * (x.dim() - 2)
    return torch.ops.aten.convolution(
        x, weight, bias, stride, padding, dilation, False, zeros, groups
    )


def _transformed(x: torch.Tensor) -> bool:
    """Whether autocast or a torch.func transform is active (the Functions here define no
    mixed-precision casts, ``jvp`` or ``vmap`` rule: such calls are left to PyTorch)."""
    return torch.is_autocast_enabled(x.device.type) or torch._C._are_functorch_transforms_active()


class _WeightGradient(torch.autograd.Function):
    """The weight gradient ``corr(grad_out, x)`` of a convolution, as a function of
    ``grad_out`` alone (``x`` is data): its own derivative is the convolution ``x * v``."""

    @staticmethod
    def forward(grad_out, x, weight, stride, padding, dilation, groups):
        n = x.dim() - 2
        return torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            None,
            stride,
            padding,
            dilation,
            False,
            [0] * n,
            groups,
            [False, True, False],
        )[1]

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, _, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x)
        ctx.conv = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, v):
        (x,) = ctx.saved_tensors
        return _convolve(x, v, None, ctx.conv), None, None, None, None, None, None


class _DataConvolution(torch.autograd.Function):
    """A convolution of data ``x`` (no gradient): its backward builds the weight gradient
    with ``_WeightGradient`` so that a second backward never differentiates w.r.t. ``x``."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return _convolve(x, weight, bias, (stride, padding, dilation, groups))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        gw = gb = None
        if ctx.needs_input_grad[1]:
            gw = _WeightGradient.apply(
                grad_out, x, weight.detach(), stride, padding, dilation, groups
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum(dim=[0, *range(2, grad_out.dim())])
        return None, gw, gb, None, None, None, None


def _as_data_convolution(args: tuple, kwargs: dict, n: int) -> torch.Tensor | None:
    """The call as a ``_DataConvolution``, or None where it does not apply (the input needs
    a gradient, no parameter does, a string padding, an unbatched input, autocast or a
    torch.func transform)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    given = dict(zip(names, args, strict=False)) | kwargs
    x, weight, bias = given["input"], given["weight"], given.get("bias")
    padding = given.get("padding", 0)
    if (
        x.requires_grad
        or _transformed(x)
        or x.dim() != n + 2
        or isinstance(padding, str)
        or not (weight.requires_grad or (bias is not None and bias.requires_grad))
    ):
        return None
    return _DataConvolution.apply(
        x,
        weight,
        bias,
        _tuple(given.get("stride", 1), n),
        _tuple(padding, n),
        _tuple(given.get("dilation", 1), n),
        int(given.get("groups", 1)),
    )


class _DataConvolutionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = _DIMS.get(func)
        if n is not None and torch.is_grad_enabled():
            out = _as_data_convolution(args, kwargs, n)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def data_convolutions() -> Iterator[None]:
    """Record convolutions of inputs that need no gradient with a cheaper double backward."""
    with _DataConvolutionMode():
        yield
