"""Keeping each data chunk's gradient graph between Hessian-vector products, within a budget.

Every product over the same data and weights repeats the same forward pass and first
backward pass; only the second backward depends on the vector. Keeping the graph of the
gradient (built once with ``create_graph=True``) leaves one backward pass per product.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch.autograd.function import once_differentiable

# On CPUs the graph lives in host memory shared with everything else: a quarter of it, at
# most 8 GiB. On GPUs 40% of the memory free when the cache is built.
CPU_FRACTION, CPU_CAP = 0.25, 8 * 2**30
GPU_FRACTION = 0.4


def default_cache_bytes(device: torch.device) -> int:
    """The memory the gradient graphs may take on ``device`` when the caller sets no budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(GPU_FRACTION * free)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 4 * CPU_CAP
    return int(min(CPU_FRACTION * total, CPU_CAP))


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """Where ``t``'s storage lives and its size (its id for a tensor without storage)."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


@contextlib.contextmanager
def counting_saved_bytes() -> Iterator[list[int]]:
    """Count the bytes autograd saves for backward inside the block (each storage once).

    Yields a one-element list whose value is the running total: what a graph kept alive
    after the block will hold on to.
    """
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = storage_key(t)
        if ptr not in seen:
            seen.add(ptr)
            total[0] += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def backward_through(
    grads: tuple[torch.Tensor, ...], leaves: list[torch.Tensor], vectors: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``d <grads, vectors> / d leaves`` through a kept graph (which stays usable)."""
    pairs = [(g, v) for g, v in zip(grads, vectors, strict=True) if g.requires_grad]
    if not pairs:
        return [torch.zeros_like(leaf) for leaf in leaves]
    outs = torch.autograd.grad(
        [g for g, _ in pairs],
        leaves,
        grad_outputs=[v for _, v in pairs],
        retain_graph=True,
        materialize_grads=True,
    )
    return list(outs)


class NotTwiceDifferentiableError(RuntimeError):
    """The loss's gradient passes through a function that has no derivative of its own."""


# Nodes that fail when run. A backward marked ``@once_differentiable`` leaves an ``Error``
# node in a graph built with ``create_graph=True``, and autograd skips it when asked for
# gradients w.r.t. chosen inputs (it leads to none of them): a product would silently lose
# that function's terms (all zeros, for a function at the top of the model).
_FAILING_NODES = ("torch::autograd::Error", "torch::autograd::NotImplemented")
# The code of the wrapper ``once_differentiable`` puts around a backward. Where no gradient
# that flows into such a function needs one (a loss, or a function followed only by linear
# maps of constant coefficients), no node is left at all and the terms are simply missing:
# only the function's own node in the forward graph tells.
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx, *grads: None).__code__


def _once_differentiable(node: object) -> str | None:
    """The name of the autograd.Function behind ``node`` if its backward is once-differentiable
    (also under other decorators that keep ``__wrapped__``, such as ``torch.amp.custom_bwd``)."""
    cls = getattr(node, "_forward_cls", None)
    backward = getattr(cls, "backward", None)
    while backward is not None:
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE:
            return cls.__name__
        backward = getattr(backward, "__wrapped__", None)
    return None


def check_twice_differentiable(
    grads: Sequence[torch.Tensor], loss: torch.Tensor | None = None
) -> None:
    """Raise ``NotTwiceDifferentiableError`` if a double backward through the graph of
    ``grads`` (and of ``loss``, the forward graph they came from) would fail or drop terms."""
    for node in autograd_nodes([*grads, *([loss] if loss is not None else [])]):
        function = _once_differentiable(node)
        if function is not None:
            raise NotTwiceDifferentiableError(
                f"{function}, an autograd.Function in the model or the loss, has a backward "
                "marked @once_differentiable (it has no derivative of its own), so the Hessian "
                "cannot be formed by double backward: autograd would drop that function's "
                "second-order terms without a word. " + _FIX
            )
        if node.name() in _FAILING_NODES:
            raise NotTwiceDifferentiableError(
                f"the loss's gradient passes through autograd node {node.name()}, which fails "
                "when differentiated (an operation without a second derivative, or a backward "
                "marked @once_differentiable), so the Hessian cannot be formed by double "
                "backward. " + _FIX
            )


def autograd_nodes(tensors: Sequence[torch.Tensor]) -> Iterator[object]:
    """Every node of the autograd graphs of ``tensors``, each once."""
    seen: set[object] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


_FIX = (
    "Give the function a differentiable backward (or a jvp rule, which "
    "WeightHessian(hvp='auto' or 'forward') can use), or leave it out of the model."
)
