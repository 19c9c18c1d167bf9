"""Batch normalisation in eval mode as the per-channel affine map it is.

With running statistics, ``batch_norm`` is ``x * scale + shift`` with ``scale = weight /
sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``. PyTorch's double
backward of ``native_batch_norm`` is written for training mode too and forms about fifteen
full-size temporaries per layer: a quarter of a Hessian-vector product of the paper's C1 on
CIFAR-shaped data. Written as ``addcmul`` it has the same derivatives (the statistics are
constants) and a second backward of two multiplications.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_norm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.batch_norm`` with running statistics and ``training=False`` as ``addcmul``."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum")
    names += ("eps",)
    given = dict(zip(names, args, strict=False)) | kwargs
    x, mean, var = given["input"], given["running_mean"], given["running_var"]
    if given.get("training", False) or mean is None or var is None or x.dim() < 2:
        return None
    scale = torch.rsqrt(var + given.get("eps", 1e-5))
    if given.get("weight") is not None:
        scale = scale * given["weight"]
    shift = -mean * scale
    if given.get("bias") is not None:
        shift = shift + given["bias"]
    shape = [1, -1] + [1] * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


HANDLERS = {F.batch_norm: batch_norm}
