"""The training loop, as plain `fit` and as the Ray Tune function trainable.

One loop serves both: SGD (with momentum and weight decay) over seeded shuffles, optional
gradient accumulation, optional adversarial training, and after every epoch an exact
evaluation on the whole training set (what `target_train_loss` checks), the test set,
and the test set under `eval_attack`.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from analysis.hessian import WeightHessian, lanczos
from trainables.attacks import attack
from trainables.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from trainables.config import ConfigError, TrainConfig, parse_config
from trainables.data import (
    DataSplits,
    ImageTensorDataset,
    load_dataset,
    random_crop_flip,
    to_float_images,
)
from trainables.evaluate import evaluate
from trainables.models import build_seeded_model
from trainables.schedule import make_scheduler, scaled_lr
from trainables.tune_checkpoint import load_tune_checkpoint

METRIC_KEYS = (
    "epoch",
    "train/loss",
    "train/acc",
    "test/loss",
    "test/acc",
    "test/adv_acc",
    "grad_norm",
    "lr",
    "peak_lr",
    "converged",
    "diverged",
)

CURVATURE_KEY = "hessian/eig_1_epoch"
CURVATURE_SAMPLES = 512
CURVATURE_TOL = 1e-3

Metrics = dict[str, float]
SaveFn = Callable[[Path], Path]
EpochHook = Callable[[Metrics, SaveFn], None]


@dataclass(frozen=True)
class TrainedModel:
    """What `fit` returns: the model (eval mode), per-epoch metrics, and the data used."""

    model: nn.Module
    history: list[Metrics]
    train_data: ImageTensorDataset
    test_data: ImageTensorDataset
    config: TrainConfig
    device: torch.device

    @property
    def final(self) -> Metrics:
        """Metrics of the last epoch (empty if no epoch ran)."""
        return self.history[-1] if self.history else {}

    @property
    def converged(self) -> bool:
        """Whether the full training loss reached `target_train_loss`."""
        return bool(self.final.get("converged", 0))

    @property
    def diverged(self) -> bool:
        """Whether training stopped on a NaN or infinite loss or gradient."""
        return bool(self.final.get("diverged", 0))


@dataclass
class _State:
    """The mutable part of a run: exactly what a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generators: dict[str, torch.Generator]
    epoch: int = 0
    history: list[Metrics] = field(default_factory=list)


def resolve_device(spec: str, gpu_ids: list[Any] | None = None) -> torch.device:
    """The torch device for a config's `device`; 'auto' is CUDA when available (and granted).

    `gpu_ids` are the GPUs Ray gave the trial (None outside Ray): 'auto' then means CUDA
    only if Ray granted at least one.
    """
    cuda_ok = torch.cuda.is_available() and (gpu_ids is None or len(gpu_ids) > 0)
    if spec == "auto":
        return torch.device("cuda" if cuda_ok else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'device': got {spec!r} but CUDA is not available here; use 'auto' or 'cpu'"
        )
    return torch.device(spec)


def fit(
    config: dict[str, Any] | TrainConfig,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    on_epoch_end: Callable[[Metrics], None] | None = None,
) -> TrainedModel:
    """Train a model as `config` says, in this process.

    `checkpoint_dir`: write checkpoint.pt there after every epoch. `resume_from`: a
    checkpoint (directory or file) to continue from exactly. `on_epoch_end(metrics)` runs
    after each epoch (and after its checkpoint is written).
    """
    cfg = parse_config(config)
    device = resolve_device(cfg.device)
    data = _load_data(cfg)
    state = _new_state(cfg, data, device)
    if resume_from is not None:
        _restore(state, load_checkpoint(resume_from, map_location=device), cfg, resume_from)

    def hook(metrics: Metrics, save: SaveFn) -> None:
        if checkpoint_dir is not None:
            save(Path(checkpoint_dir))
        if on_epoch_end is not None:
            on_epoch_end(metrics)

    _run(cfg, data, state, device, hook)
    state.model.eval()
    return TrainedModel(state.model, state.history, data.train, data.test, cfg, device)


def train_classifier(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: `fit`'s loop, reporting and checkpointing every epoch.

    Resumes from `ray.tune.get_checkpoint()` when Tune restores the trial; each report
    carries a checkpoint with model, optimizer, scheduler, epoch and all RNG states.
    """
    import ray
    from ray import tune

    cfg = parse_config(config)
    device = resolve_device(cfg.device, gpu_ids=ray.get_gpu_ids())
    data = _load_data(cfg)
    state = _new_state(cfg, data, device)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        payload, source = load_tune_checkpoint(checkpoint, map_location=device)
        _restore(state, payload, cfg, source)

    def hook(metrics: Metrics, save: SaveFn) -> None:
        with tempfile.TemporaryDirectory(prefix="hessweep-ckpt-") as tmp:
            save(Path(tmp))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    _run(cfg, data, state, device, hook)


def load_trained(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> TrainedModel:
    """Rebuild a trained model (eval mode) and its data from a checkpoint."""
    payload = load_checkpoint(path, map_location=device)
    cfg = parse_config(payload["config"])
    data = _load_data(cfg)
    model = _build_model(cfg, data).to(device)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} does not match model {cfg.model!r}: {err}"
        ) from err
    model.eval()
    return TrainedModel(
        model, list(payload["history"]), data.train, data.test, cfg, torch.device(device)
    )


def _load_data(cfg: TrainConfig) -> DataSplits:
    """The config's data set (never downloads: fetch it first with download=True)."""
    data = load_dataset(cfg.dataset, root=cfg.data_root)
    cfg.check_data(len(data.train))
    return data


def _build_model(cfg: TrainConfig, data: DataSplits) -> nn.Module:
    """The config's model for this data set, initialised from `seed`."""
    try:
        return build_seeded_model(
            cfg.model, data.num_classes, data.in_channels, data.image_size, cfg.seed
        )
    except ValueError as err:
        raise ConfigError(f"config key 'model': got {cfg.model!r}; {err}") from err


def _steps_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    """Optimizer steps per epoch (the last batch may be smaller)."""
    return math.ceil(n_train / cfg.resolve_batch_size(n_train))


def _peak_lr(cfg: TrainConfig, n_train: int) -> float:
    """The lr after `lr_scaling` for this batch size: what warmup rises to and schedules decay."""
    return scaled_lr(cfg.lr, cfg.resolve_batch_size(n_train), cfg.base_batch_size, cfg.lr_scaling)


def _new_state(cfg: TrainConfig, data: DataSplits, device: torch.device) -> _State:
    """Fresh model, SGD optimizer, per-step scheduler and seeded generators."""
    model = _build_model(cfg, data).to(device)
    n_train = len(data.train)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=_peak_lr(cfg, n_train),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    scheduler = make_scheduler(optimizer, _steps_per_epoch(cfg, n_train), cfg)
    generators = {
        "data": torch.Generator().manual_seed(cfg.seed),
        "attack": torch.Generator().manual_seed(cfg.seed + 1),
    }
    return _State(model, optimizer, scheduler, generators)


def _payload(cfg: TrainConfig, state: _State) -> dict[str, Any]:
    """Everything needed to continue the run exactly."""
    return {
        "format": FORMAT_VERSION,
        "epoch": state.epoch,
        "config": cfg.to_dict(),
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": capture_rng(state.generators),
        "history": list(state.history),
    }


def _restore(
    state: _State, payload: dict[str, Any], cfg: TrainConfig, source: str | os.PathLike[str]
) -> None:
    """Load a checkpoint into a fresh state (also restores the global RNG states)."""
    saved = payload["config"]
    for key in ("dataset", "model"):
        if saved.get(key) != getattr(cfg, key):
            raise CheckpointError(
                f"checkpoint {source} was made with {key}={saved.get(key)!r}, "
                f"but this run has {key}={getattr(cfg, key)!r}"
            )
    try:
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        restore_rng(payload["rng"], state.generators)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {source} does not fit this run: {err}") from err
    state.epoch = int(payload["epoch"])
    state.history = list(payload["history"])


def _finished(history: list[Metrics]) -> bool:
    """Whether the last epoch converged or diverged (so training is over)."""
    return bool(history) and bool(history[-1]["converged"] or history[-1]["diverged"])


def _run(
    cfg: TrainConfig, data: DataSplits, state: _State, device: torch.device, hook: EpochHook
) -> None:
    """Epochs until max_epochs, convergence or divergence; `hook` gets each epoch's metrics."""
    x_train, y_train = (t.to(device) for t in (data.train.images, data.train.labels))
    x_test, y_test = (t.to(device) for t in (data.test.images, data.test.labels))
    peak_lr = _peak_lr(cfg, len(y_train))
    while state.epoch < cfg.max_epochs and not _finished(state.history):
        grad_norm, lr, step_diverged = _train_epoch(cfg, state, x_train, y_train)
        state.epoch += 1
        metrics = _epoch_metrics(cfg, state, (x_train, y_train), (x_test, y_test))
        metrics.update(grad_norm=grad_norm, lr=lr, peak_lr=peak_lr)
        diverged = step_diverged or not math.isfinite(metrics["train/loss"])
        if cfg.hessian_every and state.epoch % cfg.hessian_every == 0 and not diverged:
            metrics[CURVATURE_KEY] = curvature(state.model, x_train, y_train, cfg.seed)
        target = cfg.target_train_loss
        metrics["diverged"] = int(diverged)
        metrics["converged"] = int(
            not diverged and target is not None and metrics["train/loss"] < target
        )
        state.history.append(metrics)
        hook(metrics, lambda folder: save_checkpoint(folder, _payload(cfg, state)))


def _train_epoch(
    cfg: TrainConfig, state: _State, x_train: torch.Tensor, y_train: torch.Tensor
) -> tuple[float, float, bool]:
    """One pass over the shuffled training set: (mean grad norm, last lr, diverged).

    Each batch's gradient is that of its mean loss, summed over micro-batches, so
    accumulation reproduces the full-batch gradient exactly for models without
    BatchNorm (with BatchNorm, batch statistics come from each micro-batch).
    """
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    n = len(y_train)
    batch = cfg.resolve_batch_size(n)
    micro = cfg.micro_batch_size or batch
    robust = cfg.robust
    model.train()
    order = torch.randperm(n, generator=state.generators["data"]).to(x_train.device)
    norms: list[float] = []
    lr = optimizer.param_groups[0]["lr"]
    for start in range(0, n, batch):
        idx = order[start : start + batch]
        xb, yb = to_float_images(x_train[idx]), y_train[idx]
        if cfg.augment:
            xb = random_crop_flip(xb, state.generators["data"])
        n_adv = round(robust.adv_fraction * len(idx)) if robust.method != "none" else 0
        optimizer.zero_grad(set_to_none=True)
        for m in range(0, len(idx), micro):
            xm, ym = xb[m : m + micro], yb[m : m + micro]
            k = min(max(n_adv - m, 0), len(xm))
            if k:
                adv = attack(
                    robust.method,
                    model,
                    xm[:k],
                    ym[:k],
                    robust.epsilon,
                    steps=robust.steps,
                    step_size=robust.step_size,
                    generator=state.generators["attack"],
                )
                xm = torch.cat([adv, xm[k:]])
            loss = F.cross_entropy(model(xm), ym, reduction="sum") / len(idx)
            loss.backward()
        norm = float(_grad_norm(model))
        if not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return _mean(norms), lr, True
        norms.append(norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return _mean(norms), lr, False


def curvature(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, seed: int) -> float:
    """lambda_max of the float32 loss Hessian on the first CURVATURE_SAMPLES training examples,
    to a relative error of about CURVATURE_TOL.

    A cheap, fixed-subset estimate for watching curvature during training (the exact
    full-set spectrum is the Hessian phase's job); seeded, eval mode, model unchanged.
    """
    x = to_float_images(x_train[:CURVATURE_SAMPLES])
    op = WeightHessian(model, nn.CrossEntropyLoss(), [(x, y_train[:CURVATURE_SAMPLES])])
    return lanczos(op, k=1, tol=CURVATURE_TOL, seed=seed, criterion="eigenvalue").lambda_max


def _grad_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm of all parameter gradients together (before weight decay and momentum)."""
    grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads))


def _mean(values: list[float]) -> float:
    """Mean of a list, NaN when empty."""
    return sum(values) / len(values) if values else float("nan")


def _epoch_metrics(
    cfg: TrainConfig,
    state: _State,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
) -> Metrics:
    """Full-train and test loss/accuracy, and test accuracy under `eval_attack`."""
    model, bs = state.model, cfg.eval_batch_size
    tr = evaluate(model, *train, batch_size=bs)
    te = evaluate(model, *test, batch_size=bs)
    ea = cfg.eval_attack
    adv_acc = float("nan")
    if ea.method != "none":
        adv_acc = evaluate(
            model,
            *test,
            batch_size=bs,
            method=ea.method,
            epsilon=ea.epsilon,
            steps=ea.steps,
            step_size=ea.step_size,
            generator=torch.Generator().manual_seed(cfg.seed + 2),
        ).accuracy
    return {
        "epoch": state.epoch,
        "train/loss": tr.loss,
        "train/acc": tr.accuracy,
        "test/loss": te.loss,
        "test/acc": te.accuracy,
        "test/adv_acc": adv_acc,
    }


__all__ = [
    "CURVATURE_KEY",
    "METRIC_KEYS",
    "TrainedModel",
    "fit",
    "load_trained",
    "resolve_device",
    "train_classifier",
]
