"""Loss and accuracy of a model over a whole data set, clean or under attack."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainables.attacks import attack, eval_mode
from trainables.data import to_float_images


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy and accuracy over `n` examples."""

    loss: float
    accuracy: float
    n: int


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 1024,
    method: str = "none",
    epsilon: float = 0.0,
    steps: int = 10,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> EvalResult:
    """Exact mean loss and accuracy over all of (images, labels), in eval mode.

    Images may be uint8 (0..255) or float in [0, 1] and must be on the model's device.
    With `method` 'fgsm' or 'pgd' each chunk is attacked first; results do not depend on
    `batch_size` (per-example losses are summed, then divided by the total count).
    """
    n = len(labels)
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    total_loss = torch.zeros((), dtype=torch.float64, device=labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    with eval_mode(model):
        for start in range(0, n, batch_size):
            x = to_float_images(images[start : start + batch_size])
            y = labels[start : start + batch_size]
            if method != "none":
                x = attack(
                    method,
                    model,
                    x,
                    y,
                    epsilon,
                    steps=steps,
                    step_size=step_size,
                    generator=generator,
                )
            with torch.no_grad():
                logits = model(x)
                total_loss += F.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(1) == y).sum()
    return EvalResult(loss=float(total_loss) / n, accuracy=int(correct) / n, n=n)


__all__ = ["EvalResult", "evaluate"]
