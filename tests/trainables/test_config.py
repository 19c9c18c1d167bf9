"""Config validation: defaults, round trips, and clear errors for bad values."""

from __future__ import annotations

from typing import Any

import pytest

from trainables import ConfigError, TrainConfig, fit, parse_config
from trainables.config import text_number_hint


def test_empty_dict_gives_documented_defaults() -> None:
    cfg = parse_config({})
    assert cfg == TrainConfig()
    assert (cfg.dataset, cfg.model, cfg.batch_size, cfg.seed) == ("digits", "m1", 64, 0)
    assert cfg.robust.method == "none" and cfg.eval_attack.method == "fgsm"
    assert cfg.micro_batch_size is None and cfg.target_train_loss is None


def test_round_trip_through_plain_dicts() -> None:
    given = {
        "dataset": "synthetic",
        "batch_size": "full",
        "micro_batch_size": 32,
        "lr_scaling": "sqrt",
        "lr_schedule": {"type": "step", "factor": 0.5, "epochs": [2, 4]},
        "robust": {"method": "pgd", "epsilon": 0.05, "steps": 3, "adv_fraction": 0.5},
        "eval_attack": {"method": "pgd", "epsilon": 0.03},
        "target_train_loss": 0.1,
    }
    cfg = parse_config(given)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.robust.adv_fraction == 0.5 and cfg.eval_attack.steps == 10
    flat = cfg.to_flat_dict()
    assert flat["robust.epsilon"] == 0.05 and flat["lr_schedule.epochs"] == [2, 4]
    assert flat["batch_size"] == "full"


def test_data_root_accepts_paths(tmp_path) -> None:
    assert parse_config({"data_root": tmp_path}).data_root == str(tmp_path)


def test_step_schedule_every_n_epochs_expands_to_milestones() -> None:
    cfg = parse_config({"max_epochs": 10, "lr_schedule": {"type": "step", "epochs": 3}})
    assert cfg.lr_schedule.epochs == (3, 6, 9)
    assert parse_config({"lr_schedule": "cosine"}).lr_schedule.type == "cosine"
    # a step after the last epoch never comes: not listed (a spec refuses asking for one)
    cfg = parse_config({"max_epochs": 9, "lr_schedule": {"type": "step", "epochs": 3}})
    assert cfg.lr_schedule.epochs == (3, 6)
    # configs saved before listed it, and still load (checkpoints, sweep state)
    saved = {"max_epochs": 9, "lr_schedule": {"type": "step", "epochs": [3, 6, 9]}}
    assert parse_config(saved).lr_schedule.epochs == (3, 6, 9)


def test_hand_built_configs_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="'batch_size'"):
        parse_config(TrainConfig(batch_size=0))


BAD_VALUES: list[tuple[dict[str, Any], str, str]] = [
    ({"batch_size": 0}, "batch_size", "0"),
    ({"batch_size": -8}, "batch_size", "-8"),
    ({"batch_size": "half"}, "batch_size", "'half'"),
    ({"batch_size": True}, "batch_size", "True"),
    ({"batch_size": 12.5}, "batch_size", "12.5"),
    ({"batch_size": 16, "micro_batch_size": 32}, "micro_batch_size", "32"),
    ({"micro_batch_size": 0}, "micro_batch_size", "0"),
    ({"lr": 0}, "lr", "0"),
    ({"lr": float("nan")}, "lr", "nan"),
    ({"momentum": 1.0}, "momentum", "1.0"),
    ({"weight_decay": -1e-4}, "weight_decay", "-0.0001"),
    ({"lr_scaling": "cubic"}, "lr_scaling", "'cubic'"),
    ({"lr_schedule": "exponential"}, "lr_schedule.type", "'exponential'"),
    ({"lr_schedule": {"type": "step"}}, "lr_schedule.epochs", "()"),
    ({"lr_schedule": {"type": "step", "epochs": [5, 2]}}, "lr_schedule.epochs", "[5, 2]"),
    ({"lr_schedule": {"type": "cosine", "factor": 2.0}}, "lr_schedule.factor", "2.0"),
    ({"max_epochs": 0}, "max_epochs", "0"),
    ({"target_train_loss": 0.0}, "target_train_loss", "0.0"),
    ({"robust": {"method": "fgsm", "epsilon": -0.1}}, "robust.epsilon", "-0.1"),
    ({"robust": {"method": "cw"}}, "robust.method", "'cw'"),
    ({"robust": {"adv_fraction": 1.5}}, "robust.adv_fraction", "1.5"),
    ({"eval_attack": {"epsilon": 8}}, "eval_attack.epsilon", "<= 1.0"),
    ({"robust": {"steps": 0}}, "robust.steps", "0"),
    ({"eval_attack": {"epsilon": -0.01}}, "eval_attack.epsilon", "-0.01"),
    ({"eval_attack": "fgsm"}, "eval_attack", "'fgsm'"),
    ({"model": "vgg16"}, "model", "'vgg16'"),
    ({"dataset": "imagenet"}, "dataset", "'imagenet'"),
    ({"seed": -1}, "seed", "-1"),
    ({"device": "tpu"}, "device", "'tpu'"),
    ({"augment": "yes"}, "augment", "'yes'"),
]


@pytest.mark.parametrize(("given", "key", "shown"), BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_value_error_names_key_value_and_allowed(given: dict, key: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(given)
    message = str(info.value)
    assert f"'{key}'" in message and shown in message and "expected" in message


def test_unknown_model_error_lists_known_models() -> None:
    with pytest.raises(ConfigError, match="expected one of c1, c2, m1, mlp, resnet20"):
        parse_config({"model": "vgg16"})


def test_unknown_keys_are_rejected_with_the_allowed_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown config key 'batchsize'; allowed keys: .*batch_size"
    ):
        parse_config({"batchsize": 32})
    with pytest.raises(ConfigError, match=r"unknown config key 'robust.eps'.*robust.epsilon"):
        parse_config({"robust": {"eps": 0.1}})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_batch_larger_than_training_set_is_rejected_before_training() -> None:
    with pytest.raises(ConfigError) as info:
        fit({"dataset": "synthetic", "batch_size": 257})
    message = str(info.value)
    assert "'batch_size'" in message and "257" in message and "only 256 examples" in message


def test_model_too_big_for_the_images_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"config key 'model': got 'c2'.*16"):
        fit({"dataset": "digits", "model": "c2", "max_epochs": 1})


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        (
            {"lr": "1e-3"},
            "got '1e-3' (text: YAML reads 1e-3 without a dot as a string; write 1.0e-3)",
        ),
        ({"weight_decay": "5e-4"}, "write 5.0e-4)"),
        (
            {"max_epochs": "1e3"},
            "got '1e3' (text: YAML reads 1e3 without a dot as a string; write 1000)",
        ),
        ({"robust": {"method": "pgd", "step_size": "1.0e-2"}}, "without a sign in the exponent"),
        ({"target_train_loss": "0.1"}, "got '0.1' (text: write 0.1 without quotes)"),
    ],
)
def test_numbers_given_as_text_get_the_way_to_write_them(given: dict, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(given)
    assert shown in str(info.value) and "expected" in str(info.value)


def test_text_number_hint_is_empty_for_anything_but_numeric_text() -> None:
    assert text_number_hint(0.001) == text_number_hint("fast") == text_number_hint("nan") == ""
    assert text_number_hint("1e-3", integer=True) == ""  # not an integer: no rewrite fixes it
    assert text_number_hint("2e5", integer=True).endswith("write 200000)")
