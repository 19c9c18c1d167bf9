"""Restoring a Tune trial from its newest *readable* checkpoint.

A truncated or corrupt latest checkpoint is reported (naming the file) and the trial
falls back to the previous checkpoint Tune kept beside it, instead of silently starting
from scratch; when none is readable the trial fails with every file's error.
"""

from __future__ import annotations

import sys
from pathlib import PurePosixPath
from typing import Any

import pyarrow.fs as pafs
import torch

from trainables.checkpoint import CheckpointError, load_checkpoint


def sibling_checkpoints(checkpoint: Any) -> list[Any]:
    """Every ``checkpoint_*`` folder beside ``checkpoint`` (itself included), oldest first."""
    from ray.tune import Checkpoint

    path = PurePosixPath(checkpoint.path)
    fs = checkpoint.filesystem
    try:
        infos = fs.get_file_info(pafs.FileSelector(str(path.parent)))
    except OSError:
        return [checkpoint]
    names = sorted(
        n
        for n in (PurePosixPath(i.path).name for i in infos if i.type == pafs.FileType.Directory)
        if n.startswith("checkpoint_")
    )
    return [Checkpoint(path=str(path.parent / n), filesystem=fs) for n in names]


def older_checkpoints(checkpoint: Any) -> list[Any]:
    """Tune's sibling ``checkpoint_*`` folders older than ``checkpoint``, newest first."""
    name = PurePosixPath(checkpoint.path).name
    older = [c for c in sibling_checkpoints(checkpoint) if PurePosixPath(c.path).name < name]
    return older[::-1]


def load_tune_checkpoint(
    checkpoint: Any, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], str]:
    """The payload of the newest readable checkpoint and the path it came from."""
    errors = []
    for candidate in [checkpoint, *older_checkpoints(checkpoint)]:
        with candidate.as_directory() as folder:
            try:
                return load_checkpoint(folder, map_location=map_location), candidate.path
            except (CheckpointError, FileNotFoundError) as err:
                message = str(err).replace(str(folder), candidate.path)
                errors.append(message)
                print(f"hessweep: {message}; trying the previous checkpoint", file=sys.stderr)
    raise CheckpointError("no readable checkpoint to resume from: " + " | ".join(errors))
