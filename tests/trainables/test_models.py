"""The model registry: shapes on every data set geometry, exact definitions, seeding."""

from __future__ import annotations

import pytest
import torch

from trainables.data import SHAPES
from trainables.models import (
    MODELS,
    build_model,
    build_seeded_model,
    check_fits,
    count_parameters,
    model_names,
)

GEOMETRIES = {name: SHAPES[name] for name in ("digits", "mnist", "cifar10")}


# c2's four unpadded convolutions need 16x16 or more: see test_c2_rejects_small_images.
CASES = [(n, g) for n in model_names() for g in sorted(GEOMETRIES) if (n, g) != ("c2", "digits")]


@pytest.mark.parametrize(("name", "geometry"), CASES)
def test_logits_have_one_column_per_class(name: str, geometry: str) -> None:
    classes, channels, size = GEOMETRIES[geometry]
    model = build_model(name, classes, channels, size).eval()
    out = model(torch.rand(3, channels, size, size))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()


def test_m1_is_lenet5_on_mnist() -> None:
    model = build_model("m1", 10, 1, 28)
    # conv 1->6 (5x5), conv 6->16 (5x5), FC 16*7*7->120->84->10, all with biases
    expected = (25 * 6 + 6) + (6 * 25 * 16 + 16) + (784 * 120 + 120) + (120 * 84 + 84) + 850
    assert count_parameters(model) == expected


def test_c1_matches_the_authors_definition() -> None:
    model = build_model("c1", 10, 3, 32)
    convs = (3 * 25 * 64 + 64) + (64 * 25 * 64 + 64)
    bns = 2 * 2 * 64
    fcs = (64 * 8 * 8 * 384 + 384) + (384 * 192 + 192) + (192 * 10 + 10)
    assert count_parameters(model) == convs + bns + fcs
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2


def test_c2_matches_the_authors_definition() -> None:
    model = build_model("c2", 10, 3, 32)
    convs = (3 * 9 * 64 + 64) + (64 * 9 * 64 + 64) + (64 * 9 * 128 + 128) + (128 * 9 * 128 + 128)
    bns = 2 * (64 + 64 + 128 + 128)
    fcs = (128 * 5 * 5 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert count_parameters(model) == convs + bns + fcs
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def test_resnet20_has_depth_20_and_about_270k_parameters() -> None:
    model = build_model("resnet20", 10, 3, 32)
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 20  # 6n+2 weighted layers, n = 3
    assert 0.26e6 < count_parameters(model) < 0.28e6


def test_c2_rejects_small_images() -> None:
    with pytest.raises(ValueError, match="c2 needs image_size >= 16"):
        build_model("c2", 10, 1, 8)


def test_fit_check_runs_the_model_on_the_meta_device(monkeypatch) -> None:
    check_fits("c2", *SHAPES["mnist"])
    check_fits("resnet20", *SHAPES["cifar100"])
    with pytest.raises(ValueError, match="c2 needs image_size >= 16"):
        check_fits("c2", *SHAPES["digits"])
    # layers that do not match the images fail in the forward pass; wrong logits are named
    monkeypatch.setitem(MODELS, "narrow", lambda n, c, s: torch.nn.Linear(5, n))
    with pytest.raises(ValueError, match=r"narrow cannot take 1x8x8 images: "):
        check_fits("narrow", 10, 1, 8)

    # a model the meta device cannot run (a data-dependent step) is run on the CPU instead
    class Gate(torch.nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.fc = torch.nn.LazyLinear(n)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) * float(x.abs().max().item() >= 0)

    monkeypatch.setitem(MODELS, "gate", lambda n, c, s: Gate(n))
    check_fits("gate", 10, 1, 8)
    monkeypatch.setitem(MODELS, "flat", lambda n, c, s: torch.nn.Flatten())
    with pytest.raises(ValueError, match=r"flat gives outputs of shape \(64,\) .* not 10 logits"):
        check_fits("flat", 10, 1, 8)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'lenet'") as info:
        build_model("lenet", 10, 1, 8)
    for name in ("c1", "c2", "m1", "mlp", "resnet20"):
        assert name in str(info.value)


def test_seeded_models_repeat_and_leave_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a = build_seeded_model("m1", 10, 1, 8, seed=3)
    b = build_seeded_model("m1", 10, 1, 8, seed=3)
    c = build_seeded_model("m1", 10, 1, 8, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
