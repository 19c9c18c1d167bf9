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
_restore_precision: list[Callable[[], None]] = []


def _per_op_precision() -> list[tuple[object, str]]:
    """torch >= 2.9's per-operation TF32 switches (cuDNN conv and RNN, cuBLAS matmul)."""
    found = []
    for owner in (
        getattr(torch.backends.cudnn, "conv", None),
        getattr(torch.backends.cudnn, "rnn", None),
        torch.backends.cuda.matmul,
    ):
        if owner is not None and hasattr(owner, "fp32_precision"):
            found.append((owner, "fp32_precision"))
    return found


def _switch_tf32_off() -> Callable[[], None]:
    """Turn TF32 off for CUDA convolutions, RNNs and matmuls; return what restores the flags.

    The legacy switches are used when they can be read (then the flags stay readable both
    ways inside, as torch.backends.cudnn.flags() needs); after a caller set the per-op API
    (the legacy getters raise then) that API is used. Either way the per-op values are put
    back exactly.
    """
    per_op = [(owner, name, getattr(owner, name)) for owner, name in _per_op_precision()]
    try:
        cudnn_tf32 = torch.backends.cudnn.allow_tf32
        matmul_precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # the per-op API was used: the legacy getters refuse
        for owner, name, _ in per_op:
            setattr(owner, name, "ieee")

        def restore() -> None:
            for owner, name, value in per_op:
                setattr(owner, name, value)

        return restore
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    def restore_legacy() -> None:
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        for owner, name, value in per_op:
            if getattr(owner, name) != value:
                setattr(owner, name, value)

    return restore_legacy


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Keep CUDA float32 convolutions, RNNs and matmuls in IEEE float32 (no TF32).

    cuDNN picks TF32 kernels for large float32 convolutions by default: on an H200 that
    made a CIFAR-sized CNN's Hessian-vector products 30x less accurate (1.3e-2 relative
    error instead of 4e-4). The flags are process-wide: nested and concurrent uses share one
    switch, restored when the last user leaves (a thread that changes the flags meanwhile
    is overwritten then).
    """
    global _precision_users
    with _PRECISION_LOCK:
        if _precision_users == 0:
            _restore_precision[:] = [_switch_tf32_off()]
        _precision_users += 1
    try:
        yield
    finally:
        with _PRECISION_LOCK:
            _precision_users -= 1
            if _precision_users == 0:
                _restore_precision.pop()()


def mean_loss(loss_fn: LossFn, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss whatever the loss function's ``reduction`` is.

    A scalar is taken as it is (divided by the batch size for ``reduction="sum"``), a tensor
    (``"none"``, or a plain function's per-sample losses) is averaged over all its elements:
    a plain function's scalar is taken as a mean, since it cannot say otherwise.
    """
    loss = matched_loss(loss_fn, output)(output, target)
    reduction = getattr(loss_fn, "reduction", "mean")
    if loss.dim() > 0 or reduction == "none":
        return loss.mean()
    if reduction == "sum":
        return loss / output.shape[0]
    return loss


def sample_weights(loss_fn: LossFn, target: torch.Tensor) -> torch.Tensor | None:
    """Each target's weight in ``loss_fn``'s mean where that mean is a weighted one, else None.

    A ``CrossEntropyLoss`` or ``NLLLoss`` on class indices with class weights or ignored
    targets divides by the sum of its targets' weights (0 for ignored ones), not by their
    count: batch means of it cannot be combined by batch size.
    """
    weighted = isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss)
    if not weighted or loss_fn.reduction != "mean" or target.is_floating_point():
        return None
    ignored = target == loss_fn.ignore_index
    if loss_fn.weight is None and not bool(ignored.any()):
        return None
    # float64 on the CPU (some devices have no float64); targets are small
    ignored, target = ignored.cpu(), target.cpu()
    if loss_fn.weight is None:
        w = torch.ones(target.shape, dtype=torch.float64)
    else:
        w = loss_fn.weight.detach().cpu().double()[target.masked_fill(ignored, 0)]
    return w.masked_fill(ignored, 0.0)


def matched_loss(loss_fn: LossFn, output: torch.Tensor) -> LossFn:
    """``loss_fn``, or a copy whose floating tensors (class weights, ``pos_weight``) are in
    the output's dtype and on its device: float32 class weights on a float64 model's
    outputs are otherwise an error. The caller's module is never changed."""
    if not isinstance(loss_fn, nn.Module):
        return loss_fn
    moved = {
        name: t.to(dtype=output.dtype, device=output.device)
        for name, t in loss_fn.named_buffers(recurse=False)
        if t.is_floating_point() and (t.dtype != output.dtype or t.device != output.device)
    }
    if not moved:
        return loss_fn
    copied = copy.copy(loss_fn)
    copied._buffers = {**loss_fn._buffers, **moved}  # a copy's own dict, not the caller's
    return copied


def weight_total(loss_fn: LossFn, targets: Iterable[torch.Tensor]) -> float | None:
    """The sum of every target's weight where ``loss_fn``'s mean is a weighted one (see
    ``sample_weights``), else None; a zero sum (every target ignored) is refused."""
    targets = list(targets)
    parts = [sample_weights(loss_fn, t) for t in targets]
    if all(p is None for p in parts):
        return None
    total = sum(
        float(p.sum()) if p is not None else t.numel() for p, t in zip(parts, targets, strict=True)
    )
    if total <= 0:
        raise ValueError(
            "every target is ignored (ignore_index) or of a class with weight 0: the mean "
            "loss is 0/0; give data with at least one counted target"
        )
    return total


def _reduced(loss_fn: nn.Module, output: torch.Tensor, reduction: str) -> nn.Module:
    """A copy of a loss module with ``reduction``, its tensors matched to ``output``."""
    copied = copy.copy(matched_loss(loss_fn, output))
    copied.reduction = reduction
    return copied


def summed_terms(loss_fn: LossFn, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` with ``reduction="sum"``: the numerator of its weighted mean."""
    return _reduced(loss_fn, output, "sum")(output, target)


def summed_loss(loss_fn: LossFn, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sum over samples of each sample's own loss (``loss_fn`` of that sample alone):
    its input Hessian is block-diagonal over samples."""
    weights = sample_weights(loss_fn, target)
    if weights is None:
        return mean_loss(loss_fn, output, target) * output.shape[0]
    per_sample = weights.reshape(len(target), -1).sum(dim=1)
    if bool((per_sample == 0).any()):
        bad = (per_sample == 0).nonzero()[:, 0].tolist()
        raise ValueError(
            f"samples {bad[:5]} have only ignored targets (ignore_index) or targets of a class "
            "with weight 0: their own loss is 0/0; leave them out"
        )
    terms = _reduced(loss_fn, output, "none")(output, target).reshape(len(target), -1).sum(dim=1)
    return (terms / per_sample.to(dtype=terms.dtype, device=terms.device)).sum()


def select_params(
    model: nn.Module, params: Iterable[torch.Tensor] | dict[str, torch.Tensor] | None
) -> list[str]:
    """Names of the parameters to differentiate: the trainable ones, or those given (as
    tensors of the model, or a dict whose keys name them; its values are not used)."""
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
    repeated = [n for i, n in enumerate(names) if n in names[:i]]
    if repeated:
        first = names.index(repeated[0])
        raise ValueError(
            f"params[{names.index(repeated[0], first + 1)}] repeats params[{first}] "
            f"({repeated[0]!r}): give each parameter once"
        )
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
