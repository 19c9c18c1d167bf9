"""L-infinity adversarial attacks (FGSM, PGD) on batches of images in a known range.

Attacks craft with the model in eval mode (BatchNorm uses running statistics, so the
perturbation of one example does not depend on the rest of the batch), restore every
module's previous mode afterwards, never touch parameter gradients, and never modify
the caller's tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from analysis.hessian.modelutil import eval_mode

ATTACK_METHODS = ("fgsm", "none", "pgd")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sum_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy, so each example's input gradient ignores the batch size."""
    return F.cross_entropy(logits, y, reduction="sum")


def _input_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> torch.Tensor:
    """Gradient of the loss w.r.t. the input batch only."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _check(epsilon: float, clamp: tuple[float, float]) -> None:
    """Reject a negative budget or an empty data range."""
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not clamp[0] < clamp[1]:
        raise ValueError(f"clamp must be (low, high) with low < high, got {clamp}")


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    *,
    loss_fn: LossFn = _sum_cross_entropy,
    clamp: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one signed step of size epsilon."""
    _check(epsilon, clamp)
    with eval_mode(model):
        grad = _input_grad(model, x, y, loss_fn)
    return (x.detach() + epsilon * grad.sign()).clamp_(*clamp)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss_fn: LossFn = _sum_cross_entropy,
    clamp: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Projected gradient descent in the L-inf ball (Madry et al. 2018).

    Starts at a uniform random point of the ball when `random_start` (drawn on the CPU
    from `generator`, so runs repeat on any device), then takes `steps` signed steps of
    `step_size` (default 2.5 * epsilon / steps), projecting onto the ball and the range.
    """
    _check(epsilon, clamp)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alpha = 2.5 * epsilon / steps if step_size is None else step_size
    x0 = x.detach()
    lo = (x0 - epsilon).clamp_(*clamp)
    hi = (x0 + epsilon).clamp_(*clamp)
    x_adv = x0.clone()
    if random_start:
        noise = torch.empty(x0.shape, dtype=x0.dtype).uniform_(-1.0, 1.0, generator=generator)
        x_adv = torch.minimum(torch.maximum(x_adv + epsilon * noise.to(x0.device), lo), hi)
    with eval_mode(model):
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y, loss_fn)
            x_adv = torch.minimum(torch.maximum(x_adv + alpha * grad.sign(), lo), hi)
    return x_adv


def attack(
    method: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Adversarial examples by method name: 'fgsm', 'pgd', or 'none' (a copy of x)."""
    if method == "fgsm":
        return fgsm(model, x, y, epsilon, clamp=clamp)
    if method == "pgd":
        return pgd(
            model, x, y, epsilon, steps=steps, step_size=step_size, generator=generator, clamp=clamp
        )
    if method == "none":
        return x.detach().clone()
    raise ValueError(f"unknown attack {method!r}; known attacks: {', '.join(ATTACK_METHODS)}")


__all__ = ["ATTACK_METHODS", "attack", "eval_mode", "fgsm", "pgd"]
