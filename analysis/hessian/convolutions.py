"""Convolutions with one constant operand, whose second derivative skips the constant's.

A Hessian-vector product through a kept gradient graph runs the double backward of every
convolution. PyTorch's (``_convolution_double_backward``) computes both cross terms
whatever is asked for: the gradient w.r.t. the input whenever the weight's term is asked
for, and the weight's whenever the input's is. For a weight Hessian the first layer's input
is data, so every product ran a transposed convolution of the whole batch and threw it away
(a quarter of a product on the benchmark's CIFAR-shaped CNN); for an input Hessian the
weights are constants, so every product ran a weight gradient of every convolution (a
seventh of a product there). ``_Convolution`` records such convolutions instead:

- when the input needs no gradient (data), its backward is the weight gradient, whose own
  derivative is one forward convolution of the data;
- when the weights need none, its backward is the input gradient, whose own derivative is
  one forward convolution with the weights. On a CPU, when the input has at most
  ``SMALL_INPUT_CHANNELS`` channels (an image model's first layer), that input gradient of
  a 2-d convolution without groups is one matrix product and a ``fold``: oneDNN's
  transposed convolution into 1 or 3 channels measured 2-5x slower (stride-4 patches and
  3x3 kernels on 32x32 RGB, 3x3 on 8x8 grey), and 6x faster than the fold into 16
  channels.

Every other convolution is left as it is. ``lean_graph`` installs the handler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DIMS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
SMALL_INPUT_CHANNELS = 4


def as_ints(value: int | Sequence[int], n: int) -> list[int]:
    """``n`` ints from an int or a sequence (of one, as PyTorch also accepts, or of ``n``)."""
    values = [int(v) for v in value] if isinstance(value, Sequence) else [int(value)]
    return values * n if len(values) == 1 else values


def _convolve(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: tuple):
    """The plain convolution ``x * weight + bias`` with ``conv = (stride, padding, dilation,
    groups)``."""
    stride, padding, dilation, groups = conv
    zeros = [0] * (x.dim() - 2)
    return torch.ops.aten.convolution(
        x, weight, bias, stride, padding, dilation, False, zeros, groups
    )


def _backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conv: tuple, wrt: int
) -> torch.Tensor:
    """PyTorch's convolution gradient w.r.t. the input (``wrt=0``) or the weight (1)."""
    stride, padding, dilation, groups = conv
    mask = [wrt == 0, wrt == 1, False]
    zeros = [0] * (x.dim() - 2)
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, stride, padding, dilation, False, zeros, groups, mask
    )[wrt]


def _sized(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A placeholder of ``shape`` for an operand whose gradient is not formed: only its size
    is read (as ``torch.nn.grad.conv2d_input`` does)."""
    return like.new_empty(1).expand(shape)


def _input_gradient(
    grad_out: torch.Tensor, weight: torch.Tensor, shape: torch.Size, conv: tuple
) -> torch.Tensor:
    """The gradient w.r.t. a convolution's input (of ``shape``), from ``grad_out``."""
    stride, padding, dilation, groups = conv
    few_channels = len(shape) == 4 and groups == 1 and shape[1] <= SMALL_INPUT_CHANNELS
    if grad_out.device.type == "cpu" and few_channels:
        co = weight.shape[0]
        cols = weight.reshape(co, -1).t() @ grad_out.flatten(2)
        return F.fold(cols, list(shape[2:]), list(weight.shape[2:]), dilation, padding, stride)
    return _backward(grad_out, _sized(grad_out, shape), weight, conv, 0)


def _weight_gradient(
    grad_out: torch.Tensor, x: torch.Tensor, shape: torch.Size, conv: tuple
) -> torch.Tensor:
    """The gradient w.r.t. a convolution's weight (of ``shape``), from ``grad_out`` and the
    input ``x``."""
    return _backward(grad_out, x, _sized(grad_out, shape), conv, 1)


class _Gradient(torch.autograd.Function):
    """A convolution's gradient w.r.t. one operand (``wrt``: "input" or "weight") as a
    linear function of ``grad_out`` alone, the other operand ``const`` held constant: its own
    derivative is one convolution of ``v`` with ``const``."""

    @staticmethod
    def forward(grad_out, const, wrt, shape, stride, padding, dilation, groups):
        conv = (stride, padding, dilation, groups)
        if wrt == "input":
            return _input_gradient(grad_out, const, shape, conv)
        return _weight_gradient(grad_out, const, shape, conv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, const, wrt, _, *conv = inputs
        ctx.save_for_backward(const)
        ctx.wrt, ctx.conv = wrt, tuple(conv)

    @staticmethod
    def backward(ctx, v):
        (const,) = ctx.saved_tensors
        x, weight = (v, const) if ctx.wrt == "input" else (const, v)
        return _convolve(x, weight, None, ctx.conv), *[None] * 7


class _Convolution(torch.autograd.Function):
    """A convolution with one constant operand (``const``: "input", data, or "weight"): its
    backward forms the other operand's gradient with ``_Gradient``, so a second backward
    never differentiates w.r.t. the constant."""

    @staticmethod
    def forward(x, weight, bias, const, stride, padding, dilation, groups):
        return _convolve(x, weight, bias, (stride, padding, dilation, groups))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, const, *conv = inputs
        ctx.save_for_backward(x if const == "input" else weight)
        ctx.const, ctx.conv, ctx.has_bias = const, tuple(conv), bias is not None
        ctx.shapes = (x.shape, weight.shape)

    @staticmethod
    def backward(ctx, grad_out):
        (const,) = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.const == "weight" and ctx.needs_input_grad[0]:
            gx = _Gradient.apply(grad_out, const, "input", ctx.shapes[0], *ctx.conv)
        if ctx.const == "input" and ctx.needs_input_grad[1]:
            gw = _Gradient.apply(grad_out, const, "weight", ctx.shapes[1], *ctx.conv)
        if ctx.const == "input" and ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum(dim=[0, *range(2, grad_out.dim())])
        return gx, gw, gb, None, None, None, None, None


def convolution(n: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """An ``n``-d convolution call as a ``_Convolution``, or None where it does not apply
    (both or neither operand needs a gradient, a string padding, unbatched input)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    given = dict(zip(names, args, strict=False)) | kwargs
    x, weight, bias = given["input"], given["weight"], given.get("bias")
    padding = given.get("padding", 0)
    if x.dim() != n + 2 or isinstance(padding, str):
        return None
    params_need_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    if x.requires_grad == params_need_grad:
        return None
    return _Convolution.apply(
        x,
        weight,
        bias,
        "weight" if x.requires_grad else "input",
        as_ints(given.get("stride", 1), n),
        as_ints(padding, n),
        as_ints(given.get("dilation", 1), n),
        int(given.get("groups", 1)),
    )
