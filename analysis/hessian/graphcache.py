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


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
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
        ptr, nbytes = _storage_key(t)
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
    """A gradient's graph passes through a backward that has no derivative of its own."""


# The node a backward marked ``@once_differentiable`` leaves in a graph built with
# ``create_graph=True``: it fails only when run, and autograd skips it when asked for
# gradients w.r.t. chosen inputs (it leads to none of them), so a product would silently
# lose that function's terms (all zeros, for a function at the top of the model).
_ERROR_NODE = "torch::autograd::Error"


def check_twice_differentiable(grads: Sequence[torch.Tensor]) -> None:
    """Raise ``NotTwiceDifferentiableError`` if the graph of ``grads`` holds such a node."""
    seen: set[object] = set()
    stack = [g.grad_fn for g in grads if g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.name() == _ERROR_NODE:
            raise NotTwiceDifferentiableError(
                "the loss's gradient passes through a function whose backward is marked "
                "@once_differentiable (its backward has no derivative), so its Hessian cannot "
                "be formed by double backward: autograd would drop that function's terms "
                "without a word. Give the function a differentiable backward (or a jvp rule, "
                "for WeightHessian(hvp='forward')), or leave it out of the model."
            )
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
