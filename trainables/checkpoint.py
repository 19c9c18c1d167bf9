"""Checkpoint files: one torch file with model, optimizer, scheduler, epoch and RNG states.

Everything is stored as tensors and plain Python values so it loads with
``torch.load(..., weights_only=True)``; writes are atomic (temp file, then rename).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "epoch", "config", "model", "optimizer", "scheduler", "rng", "history")


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, incomplete, or does not fit the run."""


def capture_rng(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state a run can touch: torch CPU/CUDA, numpy, random, and `generators`."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": str(np_state[0]),
            "state": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Put back the RNG states `capture_rng` recorded (CUDA ones only where CUDA exists)."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["key"],
            np_state["state"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


def checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file for a directory (or the path itself when it names a file)."""
    p = Path(path)
    return p / CHECKPOINT_FILE if p.is_dir() else p


def save_checkpoint(directory: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write `payload` to directory/checkpoint.pt atomically; returns the file path."""
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {', '.join(missing)}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_FILE
    tmp = folder / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    torch.save(dict(payload), tmp)
    tmp.replace(target)
    return target


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint (a directory holding checkpoint.pt, or the file itself).

    Uses ``weights_only=True``; a truncated or corrupt file raises `CheckpointError`
    naming the file.
    """
    file = checkpoint_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint file {file} could not be read (truncated or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint file {file} does not hold a hessweep checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint file {file} lacks {', '.join(missing)}")
    if payload["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint file {file} has format {payload['format']!r}; this code reads "
            f"format {FORMAT_VERSION}"
        )
    return payload


__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointError",
    "capture_rng",
    "checkpoint_file",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]
