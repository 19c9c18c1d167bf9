"""FGSM and PGD: they raise the loss, stay in the epsilon ball and the data range."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainables import attack, fgsm, fit, pgd
from trainables.models import build_seeded_model

EPS = 0.1


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained briefly on synthetic data, with a batch of test images."""
    result = fit({"dataset": "synthetic", "model": "mlp", "max_epochs": 2, "batch_size": 32})
    x, y = result.test_data.tensors()
    return result.model, x[:64], y[:64]


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), y).item()


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_attack_raises_loss_within_budget_and_range(trained, method: str) -> None:
    model, x, y = trained
    x_before = x.clone()
    x_adv = attack(method, model, x, y, EPS, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x_before)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert _loss(model, x_adv, y) > _loss(model, x, y) + 0.1


def test_pgd_is_at_least_as_strong_as_fgsm_here(trained) -> None:
    model, x, y = trained
    x_fgsm = fgsm(model, x, y, EPS)
    x_pgd = pgd(model, x, y, EPS, steps=10, generator=torch.Generator().manual_seed(0))
    assert _loss(model, x_pgd, y) >= _loss(model, x_fgsm, y)


def test_pgd_repeats_with_the_same_generator_seed(trained) -> None:
    model, x, y = trained
    a = pgd(model, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(5))
    c = pgd(model, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zero_epsilon_leaves_inputs_unchanged(trained) -> None:
    model, x, y = trained
    assert torch.equal(fgsm(model, x, y, 0.0), x)
    assert torch.equal(pgd(model, x, y, 0.0, steps=2), x)


def test_clamp_range_is_respected_near_the_edges(trained) -> None:
    model, x, y = trained
    x_edge = (x > 0.5).float()  # every pixel at 0 or 1
    x_adv = pgd(model, x_edge, y, 0.3, steps=3, generator=torch.Generator().manual_seed(0))
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_crafting_uses_eval_mode_and_restores_each_module() -> None:
    model = build_seeded_model("c1", 4, 1, 8, seed=0)
    model.train()
    model.fc3.eval()  # a mixed state must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    running = model.bn1.running_mean.clone()
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 4
    pgd(model, x, y, EPS, steps=2, generator=torch.Generator().manual_seed(0))
    fgsm(model, x, y, EPS)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(model.bn1.running_mean, running)  # BatchNorm stats untouched
    assert all(p.grad is None for p in model.parameters())  # parameter grads untouched


def test_bad_attack_arguments_are_rejected(trained) -> None:
    model, x, y = trained
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        attack("cw", model, x, y, EPS)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        fgsm(model, x, y, -0.1)
