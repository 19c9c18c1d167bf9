"""Helpers shared by the model-backed operators: eval mode, loss reduction, parameter choice."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (BatchNorm running stats, no dropout), then restore."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


_PRECISION_LOCK = threading.Lock()
_precision_users = 0
_saved_precision: list[tuple[object, str, object]] = []


def _tf32_switches() -> list[tuple[object, str]]:
    """The (object, attribute) pairs that let CUDA float32 matmuls and convolutions use TF32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: per-op API
        return [(conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
    return [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Keep CUDA float32 matmuls and convolutions in IEEE float32 (no TF32) for the block.

    cuDNN may pick TF32 kernels for large float32 convolutions by default: on an H200 that
    made a CIFAR-sized CNN's Hessian-vector products 30x less accurate (1.3e-2 relative
    error instead of 4e-4). Nested and concurrent uses share one switch; the flags are
    restored exactly when the last user leaves.
    """
    global _precision_users
    with _PRECISION_LOCK:
        if _precision_users == 0:
            switches = _tf32_switches()
            _saved_precision[:] = [(obj, name, getattr(obj, name)) for obj, name in switches]
            for obj, name in switches:
                setattr(obj, name, "ieee" if name == "fp32_precision" else False)
        _precision_users += 1
    try:
        yield
    finally:
        with _PRECISION_LOCK:
            _precision_users -= 1
            if _precision_users == 0:
                for obj, name, value in _saved_precision:
                    setattr(obj, name, value)
                _saved_precision.clear()


def mean_loss(loss_fn: LossFn, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss whatever the loss function's ``reduction`` is."""
    loss = loss_fn(output, target)
    reduction = getattr(loss_fn, "reduction", "mean")
    if loss.dim() > 0 or reduction == "none":
        return loss.mean()
    if reduction == "sum":
        return loss / output.shape[0]
    return loss


def summed_loss(loss_fn: LossFn, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sum of per-sample losses: its input Hessian is block-diagonal over samples."""
    return mean_loss(loss_fn, output, target) * output.shape[0]


def select_params(
    model: nn.Module, params: Iterable[torch.Tensor] | dict[str, torch.Tensor] | None
) -> list[str]:
    """Names of the parameters to differentiate: the trainable ones, or those given."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (all requires_grad=False); "
                "pass params=[...] to choose the ones to differentiate"
            )
        return names
    if isinstance(params, dict):
        unknown = [n for n in params if n not in named]
        if unknown:
            raise ValueError(f"params names {unknown} are not parameters of the model")
        names = list(params)
    else:
        by_id = {id(p): n for n, p in named.items()}
        given = list(params)
        stray = [i for i, p in enumerate(given) if id(p) not in by_id]
        if stray:
            raise ValueError(f"params[{stray[0]}] is not a parameter of the model")
        names = [by_id[id(p)] for p in given]
    if not names:
        raise ValueError("params is empty: give at least one parameter to differentiate")
    return names


def working_model(
    model: nn.Module, dtype: torch.dtype | None, device: torch.device | str | None
) -> nn.Module:
    """The model itself, or a deep copy in ``dtype`` on ``device`` (the caller's is never cast)."""
    first = next(model.parameters())
    want_dtype = dtype or first.dtype
    want_device = torch.device(device) if device is not None else first.device
    if want_dtype == first.dtype and want_device == first.device:
        return model
    return copy.deepcopy(model).to(device=want_device, dtype=want_dtype)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def cast_batch(
    x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to the operator's device; floating tensors take its dtype (never mutated)."""
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
    return x, y
