"""Helpers shared by the model-backed operators: eval mode, loss reduction, parameter choice."""

from __future__ import annotations

import contextlib
import copy
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
