"""Tiny models, data and dense reference Hessians for the engine's tests (float64, CPU)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode


class DenseOperator:
    """A symmetric matrix behind the solver interface, counting its products."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.calls = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.matrix @ v


def matrix_with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with exactly the given eigenvalues, in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(eigenvalues.double()) @ q.T


def make_mlp(seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 3)).double()


def make_cnn(seed: int = 0) -> nn.Module:
    """A small CNN with BatchNorm (eval-mode statistics made non-trivial) and dropout."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(3 * 4 * 4, 3),
    ).double()
    bn = model[1]
    bn.running_mean.copy_(torch.randn(3, dtype=torch.float64) * 0.1)
    bn.running_var.copy_(torch.rand(3, dtype=torch.float64) + 0.5)
    return model


def make_data(n: int, shape: tuple[int, ...], classes: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def dense_weight_hessian(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module | None = None
) -> torch.Tensor:
    """The reference: torch.func.hessian of the loss (mean cross-entropy) over all of (x, y)."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    buffers = dict(model.named_buffers())
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    was_training = model.training
    model.eval()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split(sizes)
        theta = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        out = functional_call(model, {**params, **buffers, **theta}, (x,))
        return loss_fn(out, y)

    h = torch.func.hessian(loss)(flat0)
    model.train(was_training)
    return h


class OpRecorder(TorchDispatchMode):
    """Records every ATen operation that runs inside it: its name and output shape."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        self.ops.append((func.overloadpacket.__name__, shape))
        return out

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.ops]

    def shapes(self, *names: str) -> list[tuple[int, ...]]:
        """Output shapes of the operations called ``names`` (of all, when none is given)."""
        return [shape for name, shape in self.ops if not names or name in names]
