"""The training configuration: one frozen dataclass, built from a plain (Tune) dict.

Every key is checked on the way in; a bad one raises `ConfigError` naming the key, the
value given and what is allowed, so a sweep fails before any trial starts.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trainables.attacks import ATTACK_METHODS
from trainables.data import DATASET_NAMES
from trainables.models import model_names

LR_SCALINGS = ("linear", "none", "sqrt")
LR_SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
# Exponent notation that YAML 1.1 (PyYAML) reads as text: it needs a dot and a signed exponent.
_TEXT_EXPONENT = re.compile(r"^([-+]?\d+)(\.\d*)?[eE]([-+]?)(\d+)$")


class ConfigError(ValueError):
    """A training-config key is unknown or has a value outside what is allowed."""


@dataclass(frozen=True)
class AttackConfig:
    """An L-inf attack: method (none | fgsm | pgd), budget, and PGD steps / step size."""

    method: str = "none"
    epsilon: float = 0.1
    steps: int = 10
    step_size: float | None = None


@dataclass(frozen=True)
class RobustConfig(AttackConfig):
    """Adversarial training: the attack, and the fraction of each batch it replaces."""

    adv_fraction: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    """The lr schedule after warm-up: constant, cosine to zero, or step decay."""

    type: str = "constant"
    factor: float = 0.1
    epochs: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; see the README for each key's meaning."""

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "m1"
    batch_size: int | str = 64
    micro_batch_size: int | None = None
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_scaling: str = "none"
    base_batch_size: int = 64
    warmup_epochs: float = 0.0
    lr_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_epochs: int = 20
    target_train_loss: float | None = None
    robust: RobustConfig = field(default_factory=RobustConfig)
    eval_attack: AttackConfig = field(
        default_factory=lambda: AttackConfig(method="fgsm", epsilon=0.1)
    )
    seed: int = 0
    device: str = "auto"
    augment: bool = False
    eval_batch_size: int = 1024
    hessian_every: int | None = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TrainConfig:
        """Validate a plain dict (missing keys take their defaults) into a TrainConfig."""
        return parse_config(config)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (lists for tuples) that `from_dict` turns back into this."""
        out = asdict(self)
        out["lr_schedule"]["epochs"] = list(self.lr_schedule.epochs)
        return out

    def to_flat_dict(self) -> dict[str, Any]:
        """One level, nested keys joined with dots (`robust.epsilon`), e.g. for MLflow."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat

    def resolve_batch_size(self, n_train: int) -> int:
        """The batch size in examples ('full' means the whole training set)."""
        return n_train if self.batch_size == "full" else int(self.batch_size)

    def check_data(self, n_train: int) -> None:
        """Reject batch sizes that the training set cannot fill."""
        if self.batch_size != "full" and int(self.batch_size) > n_train:
            raise ConfigError(
                f"config key 'batch_size': got {self.batch_size!r}; the {self.dataset} training "
                f"set has only {n_train} examples (use at most {n_train}, or 'full')"
            )
        if self.micro_batch_size is not None and self.micro_batch_size > n_train:
            raise ConfigError(
                f"config key 'micro_batch_size': got {self.micro_batch_size!r}; the "
                f"{self.dataset} training set has only {n_train} examples"
            )


def parse_config(config: Mapping[str, Any] | TrainConfig) -> TrainConfig:
    """A validated TrainConfig from a dict (a TrainConfig built by hand is re-checked)."""
    if isinstance(config, TrainConfig):
        return parse_config(config.to_dict())
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"config must be a mapping of keys to values, got {type(config).__name__}"
        )
    _reject_unknown("", config, TrainConfig)
    d = dict(config)
    get = d.get
    defaults = TrainConfig()

    batch_size = get("batch_size", defaults.batch_size)
    if batch_size != "full":
        batch_size = _int("batch_size", batch_size, 1, also="or 'full'")
    micro = get("micro_batch_size")
    if micro is not None:
        micro = _int("micro_batch_size", micro, 1, also="or null")
        if batch_size != "full" and micro > batch_size:
            raise ConfigError(
                f"config key 'micro_batch_size': got {micro!r}; expected at most batch_size "
                f"({batch_size}) or null"
            )
    max_epochs = _int("max_epochs", get("max_epochs", defaults.max_epochs), 1)
    target = get("target_train_loss")
    if target is not None:
        target = _real("target_train_loss", target, low=0.0, low_open=True, also="or null")
    data_root = get("data_root")
    if isinstance(data_root, os.PathLike):
        data_root = os.fspath(data_root)
    if data_root is not None and not isinstance(data_root, str):
        raise ConfigError(
            f"config key 'data_root': got {data_root!r}; expected a path string or null"
        )
    device = get("device", defaults.device)
    if not (device in DEVICES or (isinstance(device, str) and device.startswith("cuda:"))):
        raise ConfigError(
            f"config key 'device': got {device!r}; expected one of {', '.join(DEVICES)} or 'cuda:N'"
        )
    augment = get("augment", defaults.augment)
    if not isinstance(augment, bool):
        raise ConfigError(f"config key 'augment': got {augment!r}; expected true or false")
    hessian_every = get("hessian_every")
    if hessian_every is not None:
        hessian_every = _int("hessian_every", hessian_every, 1, also="or null")

    return TrainConfig(
        dataset=_choice("dataset", get("dataset", defaults.dataset), DATASET_NAMES),
        data_root=data_root,
        model=_choice("model", get("model", defaults.model), model_names()),
        batch_size=batch_size,
        micro_batch_size=micro,
        lr=_real("lr", get("lr", defaults.lr), low=0.0, low_open=True),
        momentum=_real(
            "momentum", get("momentum", defaults.momentum), low=0.0, high=1.0, high_open=True
        ),
        weight_decay=_real("weight_decay", get("weight_decay", defaults.weight_decay), low=0.0),
        lr_scaling=_choice("lr_scaling", get("lr_scaling", defaults.lr_scaling), LR_SCALINGS),
        base_batch_size=_int(
            "base_batch_size", get("base_batch_size", defaults.base_batch_size), 1
        ),
        warmup_epochs=_real("warmup_epochs", get("warmup_epochs", defaults.warmup_epochs), low=0.0),
        lr_schedule=_schedule(get("lr_schedule", "constant"), max_epochs),
        max_epochs=max_epochs,
        target_train_loss=target,
        robust=_attack("robust", get("robust", {}), RobustConfig),
        eval_attack=_attack(
            "eval_attack", get("eval_attack", {}), AttackConfig, defaults.eval_attack
        ),
        seed=_int("seed", get("seed", defaults.seed), 0),
        device=device,
        augment=augment,
        eval_batch_size=_int(
            "eval_batch_size", get("eval_batch_size", defaults.eval_batch_size), 1
        ),
        hessian_every=hessian_every,
    )


def _reject_unknown(prefix: str, given: Mapping[str, Any], cls: type) -> None:
    """Raise for any key of `given` that is not a field of dataclass `cls`."""
    allowed = [f.name for f in fields(cls)]
    for key in given:
        if key not in allowed:
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}; allowed keys: "
                + ", ".join(prefix + a for a in allowed)
            )


def text_number_hint(value: Any, integer: bool = False) -> str:
    """How to write a number that arrived as text (YAML reads ``1e-3`` as a string), or ''."""
    if not isinstance(value, str):
        return ""
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        return ""
    if not math.isfinite(number) or (integer and not number.is_integer()):
        return ""
    match = _TEXT_EXPONENT.match(text)
    fix = str(int(number)) if integer else text
    if match is None:
        return f" (text: write {fix} without quotes)"
    mantissa, dot, sign, exponent = match.groups()
    if not integer:
        fix = f"{mantissa}{dot or '.0'}e{sign or '+'}{exponent}"
    missing = "a sign in the exponent" if dot else "a dot"
    return f" (text: YAML reads {text} without {missing} as a string; write {fix})"


def _choice(key: str, value: Any, options: tuple[str, ...]) -> str:
    """A string that must be one of `options`."""
    if value not in options:
        raise ConfigError(
            f"config key {key!r}: got {value!r}; expected one of {', '.join(options)}"
        )
    return value


def _int(key: str, value: Any, low: int, also: str = "") -> int:
    """An integer >= low (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        extra = f" {also}" if also else ""
        raise ConfigError(
            f"config key {key!r}: got {value!r}{text_number_hint(value, integer=True)}; "
            f"expected an integer >= {low}{extra}"
        )
    return int(value)


def _real(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    also: str = "",
) -> float:
    """A finite number in [low, high]; `low_open` / `high_open` exclude the ends."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high}")
        bound = " and ".join(parts)
        extra = f" {also}" if also else ""
        raise ConfigError(
            f"config key {key!r}: got {value!r}{text_number_hint(value)}; "
            f"expected a finite number {bound}{extra}"
        )
    return float(value)


def _schedule(value: Any, max_epochs: int) -> ScheduleConfig:
    """lr_schedule: 'constant' | 'cosine' | 'step', or a dict {type, factor, epochs}."""
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"config key 'lr_schedule': got {value!r}; expected one of "
            f"{', '.join(LR_SCHEDULES)} or a mapping with keys type, factor, epochs"
        )
    _reject_unknown("lr_schedule.", value, ScheduleConfig)
    kind = _choice("lr_schedule.type", value.get("type", "constant"), LR_SCHEDULES)
    factor = _real("lr_schedule.factor", value.get("factor", 0.1), low=0.0, high=1.0, low_open=True)
    epochs = value.get("epochs", ())
    if kind == "step":
        if isinstance(epochs, numbers.Integral) and not isinstance(epochs, bool):
            every = _int("lr_schedule.epochs", epochs, 1)
            epochs = tuple(range(every, max_epochs, every))  # a step after the last never comes
        elif isinstance(epochs, (list, tuple)) and epochs:
            epochs = tuple(_int("lr_schedule.epochs", e, 1) for e in epochs)
            if list(epochs) != sorted(set(epochs)):
                raise ConfigError(
                    f"config key 'lr_schedule.epochs': got {list(epochs)!r}; expected "
                    "strictly increasing epochs"
                )
        else:
            raise ConfigError(
                f"config key 'lr_schedule.epochs': got {epochs!r}; expected the epochs after "
                "which a step schedule multiplies the lr by factor (a list), or an integer N "
                "(every N epochs)"
            )
    elif epochs not in ((), []):
        raise ConfigError(
            f"config key 'lr_schedule.epochs': got {epochs!r}; expected none (only a 'step' "
            "schedule takes epochs)"
        )
    return ScheduleConfig(type=kind, factor=factor, epochs=tuple(epochs))


def _attack(
    key: str, value: Any, cls: type[AttackConfig], default: AttackConfig | None = None
) -> Any:
    """robust / eval_attack: a mapping of attack settings (missing ones take defaults)."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"config key {key!r}: got {value!r}; expected a mapping with keys "
            + ", ".join(f.name for f in fields(cls))
        )
    _reject_unknown(f"{key}.", value, cls)
    base = default or cls()
    kwargs: dict[str, Any] = {
        "method": _choice(f"{key}.method", value.get("method", base.method), ATTACK_METHODS),
        "epsilon": _real(  # pixels are in [0, 1]
            f"{key}.epsilon", value.get("epsilon", base.epsilon), low=0.0, high=1.0
        ),
        "steps": _int(f"{key}.steps", value.get("steps", base.steps), 1),
        "step_size": None,
    }
    step_size = value.get("step_size", base.step_size)
    if step_size is not None:
        kwargs["step_size"] = _real(
            f"{key}.step_size", step_size, low=0.0, low_open=True, also="or null"
        )
    if cls is RobustConfig:
        kwargs["adv_fraction"] = _real(
            f"{key}.adv_fraction", value.get("adv_fraction", 1.0), low=0.0, high=1.0
        )
    return cls(**kwargs)


__all__ = [
    "DEVICES",
    "LR_SCALINGS",
    "LR_SCHEDULES",
    "AttackConfig",
    "ConfigError",
    "RobustConfig",
    "ScheduleConfig",
    "TrainConfig",
    "parse_config",
    "text_number_hint",
]
