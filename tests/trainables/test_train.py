"""The training loop: accumulation, lr scaling and schedules, stopping, checkpoints."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainables import (
    METRIC_KEYS,
    CheckpointError,
    ConfigError,
    evaluate,
    fit,
    load_checkpoint,
    load_trained,
    lr_factor,
    parse_config,
    resolve_device,
    scaled_lr,
)
from trainables.checkpoint import CHECKPOINT_FILE

QUICK: dict[str, Any] = {
    "dataset": "synthetic",
    "model": "mlp",
    "batch_size": 32,
    "max_epochs": 2,
    "eval_attack": {"method": "none"},
}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_history(a: list[dict], b: list[dict]) -> bool:
    """Equal metric histories, NaN (e.g. test/adv_acc without an attack) equal to NaN."""
    return len(a) == len(b) and all(
        x.keys() == y.keys()
        and all(x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_every_epoch_reports_the_design_metric_names() -> None:
    result = fit({**QUICK, "max_epochs": 3, "eval_attack": {"method": "fgsm", "epsilon": 0.1}})
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for h in result.history:
        assert set(h) == set(METRIC_KEYS)
        assert 0.0 <= h["test/adv_acc"] <= h["test/acc"] + 1e-9
        assert h["converged"] == 0 and h["diverged"] == 0
    assert not result.model.training
    assert len(result.train_data) == 256 and len(result.test_data) == 128


def test_training_lowers_the_full_training_loss() -> None:
    result = fit({**QUICK, "max_epochs": 3})
    assert result.history[-1]["train/loss"] < 0.5 * math.log(4)
    assert result.history[-1]["train/acc"] > 0.9


@pytest.mark.parametrize("model", ["mlp", "m1"])
def test_gradient_accumulation_equals_full_batch_gradient(model: str) -> None:
    base = {**QUICK, "model": model, "batch_size": "full", "max_epochs": 1, "momentum": 0.0}
    whole = fit(base)
    accumulated = fit({**base, "micro_batch_size": 50})  # 256 = 5 x 50 + 6: uneven on purpose
    assert whole.history[0]["grad_norm"] == pytest.approx(
        accumulated.history[0]["grad_norm"], rel=1e-5
    )
    wa, wb = _weights(whole.model), _weights(accumulated.model)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    # and across several steps of a mini-batch run
    steps = fit({**QUICK, "model": model, "batch_size": 64, "max_epochs": 1})
    steps_acc = fit(
        {**QUICK, "model": model, "batch_size": 64, "micro_batch_size": 16, "max_epochs": 1}
    )
    for key, value in _weights(steps.model).items():
        torch.testing.assert_close(value, _weights(steps_acc.model)[key], rtol=1e-4, atol=1e-5)


def test_lr_scaling_rules() -> None:
    assert scaled_lr(0.1, 256, 64, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 256, 64, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 256, 64, "none") == pytest.approx(0.1)
    assert scaled_lr(0.1, 16, 64, "linear") == pytest.approx(0.025)


@pytest.mark.parametrize(
    ("batch_size", "rule", "expected"),
    [
        (128, "linear", 0.2),
        (128, "sqrt", 0.1 * math.sqrt(2)),
        ("full", "linear", 0.4),
        (16, "none", 0.1),
    ],
)
def test_reported_lr_follows_the_scaling_rule(batch_size: Any, rule: str, expected: float) -> None:
    cfg = {**QUICK, "lr": 0.1, "base_batch_size": 64, "lr_scaling": rule, "batch_size": batch_size}
    result = fit({**cfg, "max_epochs": 1})
    assert result.history[0]["lr"] == pytest.approx(expected)
    assert result.history[0]["peak_lr"] == pytest.approx(expected)


def test_peak_lr_is_the_scaled_lr_while_lr_follows_the_schedule() -> None:
    cfg = {**QUICK, "lr": 0.1, "lr_scaling": "sqrt", "batch_size": 16, "lr_schedule": "cosine"}
    history = fit({**cfg, "max_epochs": 3}).history
    assert [h["peak_lr"] for h in history] == pytest.approx([0.05] * 3)  # 0.1 * sqrt(16 / 64)
    assert history[-1]["lr"] < 0.2 * history[-1]["peak_lr"]  # the cosine's last steps


def test_step_decay_warmup_and_cosine_factors() -> None:
    step = parse_config({"lr_schedule": {"type": "step", "factor": 0.5, "epochs": [2, 4]}})
    assert [lr_factor(s, 10, step) for s in (0, 19, 20, 39, 40, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    warm = parse_config({"warmup_epochs": 1})
    assert [lr_factor(s, 4, warm) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = parse_config({"lr_schedule": "cosine", "max_epochs": 4})
    assert lr_factor(0, 10, cosine) == 1.0
    assert lr_factor(20, 10, cosine) == pytest.approx(0.5)
    assert 0 < lr_factor(39, 10, cosine) < 0.01
    both = parse_config({"lr_schedule": "cosine", "max_epochs": 5, "warmup_epochs": 1})
    assert lr_factor(1, 2, both) == 1.0 and lr_factor(6, 2, both) == pytest.approx(0.5)


def test_fit_applies_the_schedule_per_epoch() -> None:
    cfg = {**QUICK, "lr": 0.1, "max_epochs": 3, "lr_schedule": {"type": "step", "epochs": [1, 2]}}
    lrs = [h["lr"] for h in fit(cfg).history]
    assert lrs == pytest.approx([0.1, 0.01, 0.001])


def test_stops_once_full_training_loss_is_below_target() -> None:
    result = fit({**QUICK, "lr": 0.1, "max_epochs": 30, "target_train_loss": 0.05})
    last = result.history[-1]
    assert result.converged and last["converged"] == 1 and last["train/loss"] < 0.05
    assert len(result.history) < 30
    assert all(h["train/loss"] >= 0.05 and h["converged"] == 0 for h in result.history[:-1])


def test_divergence_ends_the_run_cleanly() -> None:
    result = fit({**QUICK, "lr": 1e6, "max_epochs": 5})
    assert result.diverged and result.history[-1]["diverged"] == 1
    assert len(result.history) < 5
    assert set(result.history[-1]) == set(METRIC_KEYS)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_same_seed_repeats_and_other_seed_differs() -> None:
    a, b, c = fit(QUICK), fit(QUICK), fit({**QUICK, "seed": 1})
    _assert_identical(a.model, b.model)
    assert _same_history(a.history, b.history)
    assert not torch.equal(
        a.model.state_dict()["net.1.weight"], c.model.state_dict()["net.1.weight"]
    )


def test_fit_leaves_the_global_rngs_alone() -> None:
    torch_state, np_state, py_state = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
    )
    fit({**QUICK, "robust": {"method": "pgd", "epsilon": 0.1, "steps": 2}, "augment": True})
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert random.getstate() == py_state


def test_zero_adversarial_fraction_is_clean_training() -> None:
    clean = fit(QUICK)
    mixed0 = fit({**QUICK, "robust": {"method": "fgsm", "epsilon": 0.1, "adv_fraction": 0.0}})
    robust = fit({**QUICK, "robust": {"method": "fgsm", "epsilon": 0.1, "adv_fraction": 0.5}})
    _assert_identical(clean.model, mixed0.model)
    assert robust.history[-1]["train/loss"] != clean.history[-1]["train/loss"]


HARD: dict[str, Any] = {
    "dataset": "synthetic",
    "model": "c1",  # BatchNorm buffers must come back too
    "batch_size": 64,
    "max_epochs": 3,
    "warmup_epochs": 1,
    "lr_schedule": {"type": "step", "epochs": [2], "factor": 0.5},
    "robust": {"method": "pgd", "epsilon": 0.05, "steps": 2, "adv_fraction": 0.5},
    "eval_attack": {"method": "pgd", "epsilon": 0.05, "steps": 2},
    "augment": True,
}


class _Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    straight = fit(HARD)

    def stop_after_first(metrics: dict) -> None:
        if metrics["epoch"] == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(HARD, checkpoint_dir=tmp_path, on_epoch_end=stop_after_first)
    assert load_checkpoint(tmp_path)["epoch"] == 1
    resumed = fit(HARD, checkpoint_dir=tmp_path, resume_from=tmp_path)
    _assert_identical(straight.model, resumed.model)
    assert _same_history(resumed.history, straight.history)
    assert load_checkpoint(tmp_path)["epoch"] == 3


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(tmp_path: Path) -> None:
    result = fit(QUICK, checkpoint_dir=tmp_path)
    payload = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert payload["epoch"] == 2 and _same_history(payload["history"], result.history)
    assert {"torch", "numpy", "python", "generators"} <= set(payload["rng"])
    restored = load_trained(tmp_path)
    _assert_identical(result.model, restored.model)
    assert not restored.model.training


def test_resuming_a_finished_run_trains_no_further(tmp_path: Path) -> None:
    first = fit(
        {**QUICK, "lr": 0.1, "max_epochs": 30, "target_train_loss": 0.05}, checkpoint_dir=tmp_path
    )
    again = fit(
        {**QUICK, "lr": 0.1, "max_epochs": 30, "target_train_loss": 0.05}, resume_from=tmp_path
    )
    assert _same_history(again.history, first.history)
    _assert_identical(first.model, again.model)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_raises_naming_the_file(tmp_path: Path, damage: str) -> None:
    fit({**QUICK, "max_epochs": 1}, checkpoint_dir=tmp_path)
    file = tmp_path / CHECKPOINT_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(file)):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=str(file)):
        fit(QUICK, resume_from=tmp_path)


def test_resuming_with_another_model_is_refused(tmp_path: Path) -> None:
    fit({**QUICK, "max_epochs": 1}, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"model='mlp'.*model='m1'"):
        fit({**QUICK, "model": "m1"}, resume_from=tmp_path)


def test_evaluation_does_not_depend_on_chunk_size() -> None:
    result = fit({**QUICK, "max_epochs": 1})
    x, y = result.train_data.tensors()
    small = evaluate(result.model, x, y, batch_size=7)
    large = evaluate(result.model, x, y, batch_size=1000)
    assert small.accuracy == large.accuracy and small.n == large.n == 256
    assert small.loss == pytest.approx(large.loss, rel=1e-6)
    assert large.loss == pytest.approx(result.history[0]["train/loss"], rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_device_resolution_without_a_gpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"'device'.*CUDA is not available"):
        resolve_device("cuda")


def test_auto_device_needs_a_gpu_from_ray() -> None:
    assert resolve_device("auto", gpu_ids=[]) == torch.device("cpu")
