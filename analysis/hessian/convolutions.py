"""Convolutions with one constant operand, whose second derivative skips the constant's.

A Hessian-vector product through a kept gradient graph runs the double backward of every
convolution. PyTorch's (``_convolution_double_backward``) computes both cross terms
whatever is asked for: the gradient w.r.t. the input whenever the weight's term is asked
for, and the weight's whenever the input's is. For a weight Hessian the first layer's input
is data, so every product ran a transposed convolution of the whole batch and threw it away
(a quarter of a product on the benchmark's CIFAR-shaped CNN); for an input Hessian the
weights are constants, so every product ran a weight gradient of every convolution (a
seventh of a product there). Two Functions record such convolutions instead:

- ``_DataConvolution`` (the input needs no gradient): its backward is the weight gradient,
  whose own derivative is one forward convolution of the data.
- ``_FixedWeightConvolution`` (the weights need none): its backward is the input gradient,
  whose own derivative is one forward convolution with the weights. On a CPU, when the input
  has at most ``SMALL_INPUT_CHANNELS`` channels (an image model's first layer), that input
  gradient of a 2-d convolution without groups is one matrix product and a ``fold``:
  oneDNN's transposed convolution into 1 or 3 channels measured 2-5x slower (stride-4
  patches and 3x3 kernels on 32x32 RGB, 3x3 on 8x8 grey), and 6x faster than the fold into
  16 channels.

Every other convolution is left as it is. ``lean_graph`` installs the handler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DIMS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
SMALL_INPUT_CHANNELS = 4


def _tuple(value: int | Sequence[int], n: int) -> list[int]:
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


def _input_gradient(
    grad_out: torch.Tensor, weight: torch.Tensor, shape: torch.Size, conv: tuple
) -> torch.Tensor:
    """The gradient w.r.t. a convolution's input (of ``shape``), from ``grad_out``."""
    stride, padding, dilation, groups = conv
    n = len(shape) - 2
    few_channels = n == 2 and groups == 1 and shape[1] <= SMALL_INPUT_CHANNELS
    if grad_out.device.type == "cpu" and few_channels:
        co = weight.shape[0]
        cols = weight.reshape(co, -1).t() @ grad_out.flatten(2)
        return F.fold(cols, list(shape[2:]), list(weight.shape[2:]), dilation, padding, stride)
    # only the input's size is read (as torch.nn.grad.conv2d_input does)
    placeholder = grad_out.new_empty(1).expand(shape)
    return torch.ops.aten.convolution_backward(
        grad_out,
        placeholder,
        weight,
        None,
        stride,
        padding,
        dilation,
        False,
        [0] * n,
        groups,
        [True, False, False],
    )[0]


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


class _InputGradient(torch.autograd.Function):
    """The input gradient of a convolution with constant ``weight``, as a function of
    ``grad_out`` alone: its own derivative is the convolution ``v * weight``."""

    @staticmethod
    def forward(grad_out, weight, shape, stride, padding, dilation, groups):
        return _input_gradient(grad_out, weight, shape, (stride, padding, dilation, groups))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, weight, _, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(weight)
        ctx.conv = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, v):
        (weight,) = ctx.saved_tensors
        return _convolve(v, weight, None, ctx.conv), None, None, None, None, None, None


class _FixedWeightConvolution(torch.autograd.Function):
    """A convolution whose weight and bias need no gradient: its backward builds the input
    gradient with ``_InputGradient``, so a second backward never forms a weight gradient."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return _convolve(x, weight, bias, (stride, padding, dilation, groups))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(weight)
        ctx.shape = x.shape
        ctx.conv = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _InputGradient.apply(grad_out, weight, ctx.shape, *ctx.conv)
        return gx, None, None, None, None, None, None


def convolution(n: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """An ``n``-d convolution call as one of the Functions above, or None where neither
    applies (both or neither operand needs a gradient, a string padding, unbatched input)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    given = dict(zip(names, args, strict=False)) | kwargs
    x, weight, bias = given["input"], given["weight"], given.get("bias")
    padding = given.get("padding", 0)
    if x.dim() != n + 2 or isinstance(padding, str):
        return None
    params_need_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    if x.requires_grad == params_need_grad:
        return None
    function = _FixedWeightConvolution if x.requires_grad else _DataConvolution
    return function.apply(
        x,
        weight,
        bias,
        _tuple(given.get("stride", 1), n),
        _tuple(padding, n),
        _tuple(given.get("dilation", 1), n),
        int(given.get("groups", 1)),
    )
