"""Learning-rate scaling with batch size, warm-up, and the decay schedule, per step."""

from __future__ import annotations

import math

import torch

from trainables.config import TrainConfig


def scaled_lr(lr: float, batch_size: int, base_batch_size: int, rule: str) -> float:
    """Peak lr for `batch_size` when `lr` was tuned at `base_batch_size`.

    'linear' multiplies by batch/base (Goyal et al. 2017), 'sqrt' by its square root
    (Krizhevsky 2014; Hoffer et al. 2017), 'none' leaves lr unchanged.
    """
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "none":
        return lr
    raise ValueError(f"unknown lr scaling {rule!r}; expected none, linear or sqrt")


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Multiplier on the peak lr for optimizer step `step` (0-based).

    Warm-up ramps linearly over `warmup_epochs` and reaches 1 on its last step. Step decay
    multiplies by `factor` once per listed epoch already completed (epochs [30] means epoch
    31 onwards is decayed). Cosine falls from 1 towards 0 between the end of warm-up and
    `max_epochs`.
    """
    done = step / steps_per_epoch
    factor = 1.0
    warm_steps = config.warmup_epochs * steps_per_epoch
    if step < warm_steps:
        factor *= (step + 1) / math.ceil(warm_steps)
    schedule = config.lr_schedule
    if schedule.type == "step":
        completed = step // steps_per_epoch
        factor *= schedule.factor ** sum(1 for e in schedule.epochs if e <= completed)
    elif schedule.type == "cosine":
        span = config.max_epochs - config.warmup_epochs
        t = 0.0 if span <= 0 else min(max((done - config.warmup_epochs) / span, 0.0), 1.0)
        factor *= 0.5 * (1.0 + math.cos(math.pi * t))
    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following `lr_factor` (its state is just the step count)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, config)
    )


__all__ = ["lr_factor", "make_scheduler", "scaled_lr"]
