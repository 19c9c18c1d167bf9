"""Batch normalisation in eval mode as the per-channel affine map it is.

With running statistics, ``batch_norm`` is ``(x - running_mean) * scale + bias`` with the
per-channel ``scale = weight / sqrt(running_var + eps)``. PyTorch's double backward of
``native_batch_norm`` is written for training mode too and forms about fifteen full-size
temporaries per layer: a quarter of a Hessian-vector product of the paper's C1 on
CIFAR-shaped data. Written as a subtraction of a constant and one ``addcmul`` it has the
same derivatives (the statistics are constants) and a second backward of a few
multiplications. The input is centred first, as PyTorch does, so the weight's gradient does
not cancel when the mean is large against the spread. Float16/bfloat16 (which PyTorch
normalises in float32), mixed dtypes, and calls PyTorch would refuse (statistics of the
wrong length, or that need a gradient) are left to PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def batch_norm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.batch_norm`` with running statistics and ``training=False``, as plain arithmetic."""
    given = dict(zip(NAMES, args, strict=False)) | kwargs
    x, mean, var = given["input"], given["running_mean"], given["running_var"]
    weight, bias = given.get("weight"), given.get("bias")
    if given.get("training", False) or mean is None or var is None or x.dim() < 2:
        return None
    tensors = [t for t in (mean, var, weight, bias) if t is not None]
    if x.dtype not in (torch.float32, torch.float64) or any(t.dtype != x.dtype for t in tensors):
        return None
    if any(t.numel() != x.shape[1] for t in tensors) or mean.requires_grad or var.requires_grad:
        return None
    shape = [1, -1] + [1] * (x.dim() - 2)
    # centred before scaling, as PyTorch does: the weight's gradient is then
    # sum(g * (x - mean)) * invstd, which does not cancel when the mean is large
    centred = x - mean.view(shape)
    scale = torch.rsqrt(var + given.get("eps", 1e-5))
    if weight is not None:
        scale = scale * weight
    if bias is None:
        return centred * scale.view(shape)
    return torch.addcmul(bias.view(shape), centred, scale.view(shape))


HANDLERS = {F.batch_norm: batch_norm}
