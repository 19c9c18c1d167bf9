"""Gradient graphs whose second backward skips the work PyTorch's formulas do for nothing.

Inside ``lean_graph()`` a forward pass records a few common layers with their own
Functions: convolutions with one constant operand (``convolutions``), ReLU and max-pooling
(``piecewise``) and eval-mode batch normalisation (``batchnorm``). First and second
derivatives are the same; a Hessian-vector product through the graph then skips full-size
terms that are thrown away or are zero. A call on fewer input elements than
``min_elements`` says for its device is left to PyTorch: the Functions' Python overhead
(tens of microseconds a call, in the forward and in every product) outweighs the work they
save on tensors that small. On a CPU thread, per-sample input Hessians of one image were
6-30% slower with the rewrites below 2**13 elements. On a GPU a small kernel costs little
more than its launch, so the bar is higher: on an H200, weight products of the digits CNN
(one 1,797-sample chunk) were 18-19% slower than without rewrites with a 2**13 bar and as
fast with 2**18, while C1, C2 and ResNet-20 kept their gains (input-Hessian products about
12x faster, weight products 3-12%). The GPU bar was measured on an H200 only.
Anything a handler does not recognise, and every call under autocast, a ``torch.func``
transform or forward-mode AD (the Functions define no mixed-precision casts, ``jvp`` or
``vmap`` rules), is left to PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from analysis.hessian import batchnorm, convolutions, piecewise

Handler = Callable[[tuple, dict], object]
MIN_ELEMENTS = 2**13  # on a CPU
MIN_ELEMENTS_GPU = 2**18  # on any other device

HANDLERS: dict[Callable, Handler] = {
    **{
        conv: functools.partial(convolutions.convolution, n)
        for conv, n in convolutions.DIMS.items()
    },
    **piecewise.HANDLERS,
    **batchnorm.HANDLERS,
}


def min_elements(device: torch.device) -> int:
    """The fewest input elements a call on ``device`` needs to be rewritten."""
    return MIN_ELEMENTS if device.type == "cpu" else MIN_ELEMENTS_GPU


def _transformed(x: torch.Tensor) -> bool:
    """Whether autocast, a torch.func transform or forward-mode AD is active."""
    return (
        torch.is_autocast_enabled(x.device.type)
        or torch._C._are_functorch_transforms_active()
        or getattr(forward_ad, "_current_level", -1) >= 0
    )


class _LeanGraphMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is not None and torch.is_grad_enabled():
            x = args[0] if args else kwargs.get("input")
            if (
                isinstance(x, torch.Tensor)
                and x.numel() >= min_elements(x.device)
                and not _transformed(x)
            ):
                out = handler(args, kwargs)
                if out is not None:
                    return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def lean_graph() -> Iterator[None]:
    """Record the layers above with their lean second derivatives inside the block, and run
    attention with PyTorch's math kernel (``math_attention``)."""
    with _LeanGraphMode(), math_attention():
        yield


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` (``nn.MultiheadAttention``, transformer layers) on its
    math kernel, and ``nn.MultiheadAttention`` off its fused inference path, inside the block:
    the fused kernels PyTorch picks otherwise (flash attention, also for float32 on a CPU)
    have no double backward and no forward-mode rule, so a Hessian through them fails; the
    math kernel computes the same attention from differentiable operations."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
