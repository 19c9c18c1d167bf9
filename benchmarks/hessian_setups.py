"""The two settings: a small CNN trained on digits, a larger CNN on random CIFAR-shaped data.

Every library sees the same model object, the same list of equal ``(x, y)`` batches (tensors
made once, so no data-loader cost is measured) and ``nn.CrossEntropyLoss()`` (mean).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

SETTINGS = ("digits", "cifar")


@dataclass
class Setting:
    name: str
    title: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # what every library is given
    n_params: int
    note: str
    device: torch.device


def digits_cnn() -> nn.Module:
    """14,224 parameters: conv 1->16, pool, conv 16->32, fc 512->18, fc 18->10 (ReLU)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512, 18),
        nn.ReLU(),
        nn.Linear(18, 10),
    )


def cifar_cnn() -> nn.Module:
    """549,994 parameters: 4x4/4 patch conv 3->32, pool, conv 32->64, fc 1024->512, fc 512->10."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 4, stride=4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(1024, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def _digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target, dtype=torch.long)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
        acc = float((out.argmax(1) == y).float().mean())
        loss = float(loss_fn(out, y))
    return (
        f"SGD(lr 0.05, momentum 0.9), batch 64, {epochs} epochs in "
        f"{time.perf_counter() - t0:.1f} s: train loss {loss:.3f}, accuracy {acc:.1%}"
    )


def make_setting(name: str, seed: int = 0, device: str = "cpu") -> Setting:
    """Build a setting deterministically from ``seed`` (the model is left in eval mode).

    The model is trained on the CPU, so every device measures the same weights; model and
    data are then moved to ``device``.
    """
    torch.manual_seed(seed)
    if name == "digits":
        model = digits_cnn()
        x, y = _digits_data()
        note = _train(model, x, y, epochs=3, seed=seed)
        title = "(a) CNN trained on digits: 1,797 images 1x8x8"
    elif name == "cifar":
        model = cifar_cnn()
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(2048, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (2048,), generator=gen)
        note = "untrained (PyTorch default init), random N(0,1) images, random labels"
        title = "(b) larger CNN on 2,048 random CIFAR-shaped samples 3x32x32"
    else:
        raise ValueError(f"unknown setting {name!r}; choose from {SETTINGS}")
    model.eval().to(device)
    x, y = x.to(device), y.to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters())
    # Equal batches (3 x 599, 4 x 512): a common CPU-friendly size, and libraries that
    # average batches without weights (hessian-eigenthings) still get the exact Hessian.
    n_batches = 3 if name == "digits" else 4
    batches = list(zip(x.chunk(n_batches), y.chunk(n_batches), strict=True))
    return Setting(name, title, model, x, y, batches, n_params, note, torch.device(device))
