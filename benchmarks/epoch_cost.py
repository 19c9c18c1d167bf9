"""Seconds per training epoch of a spec's trials, and what the whole sweep would cost.

Runs ``trainables.fit`` with the spec's training settings for one batch size and robust
setting (the epoch a trial really runs: training, clean and adversarial evaluation,
curvature when ``hessian_every`` asks, its checkpoint written to local disk, not uploaded)
and prints each epoch's seconds and the sweep's
device-hours: cells x epochs x seconds per epoch / 3600 / trials per device. Without
``--data-root`` a CIFAR-10 spec gets random images written in the real CIFAR pickle format
and size (timing needs the shapes, not the pictures).

Usage: python -m benchmarks.epoch_cost [SPEC] [--batch-size B] [--robust I] [--epochs N]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CIFAR10_SPLITS = {**{f"data_batch_{i}": 10_000 for i in range(1, 6)}, "test_batch": 10_000}


def write_random_cifar10(root: Path, seed: int = 0) -> None:
    """cifar-10-batches-py/ of full size (50,000 + 10,000 images) with random pixels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in CIFAR10_SPLITS.items():
        batch = {
            "batch_label": name,
            "labels": [int(v) for v in rng.integers(0, 10, size=n)],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        labels = [f"class_{i}" for i in range(10)]
        pickle.dump({"num_cases_per_batch": 10_000, "label_names": labels}, f, protocol=2)


def trial_config(spec: dict[str, Any], batch_size: int, robust: int, device: str) -> dict:
    """One grid cell's training config, as the sweep builds it from the spec."""
    robust_settings = spec.get("robust") or [{"method": "none"}]
    return {
        "dataset": spec["dataset"],
        "model": spec["model"],
        **spec.get("training", {}),
        "batch_size": batch_size,
        "robust": robust_settings[robust],
        "seed": (spec.get("seeds") or [0])[0],
        "device": device,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(ROOT / "experiments/paper-cifar10.yaml"))
    parser.add_argument("--batch-size", type=int, help="default: the spec's smallest")
    parser.add_argument("--robust", type=int, default=0, help="index into the spec's robust list")
    parser.add_argument("--epochs", type=int, default=2, help="the first includes warm-up")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", help="real data; default: random data of the real size")
    args = parser.parse_args(argv)
    from trainables import fit
    from trainables import train as train_module
    from trainables.data import load_dataset

    spec = yaml.safe_load(Path(args.spec).read_text())
    sizes = [b for b in spec["batch_sizes"] if isinstance(b, int)]
    batch = args.batch_size or min(sizes)
    cfg = trial_config(spec, batch, args.robust, args.device)
    cfg["max_epochs"] = args.epochs
    cfg.pop("target_train_loss", None)  # time every epoch asked for
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_root:
            cfg["data_root"] = args.data_root
        elif spec["dataset"] == "cifar10":
            write_random_cifar10(Path(tmp))
            cfg["data_root"] = tmp
        times: list[float] = []
        last = [time.perf_counter()]

        def tick(_: dict[str, Any]) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            print(f"epoch {len(times)}: {times[-1]:.1f} s", file=sys.stderr, flush=True)

        # Random pixels fail torchvision's MD5 check of the CIFAR files: the trial's own
        # loader reads them here with verify_checksums=False (real data is checked).
        def load(c: Any) -> Any:
            return load_dataset(c.dataset, root=c.data_root, verify_checksums=bool(args.data_root))

        with mock.patch.object(train_module, "_load_data", load):  # a trial checkpoints too
            result = fit(cfg, checkpoint_dir=Path(tmp) / "trial", on_epoch_end=tick)
    device = torch.cuda.get_device_name() if result.device.type == "cuda" else "CPU"
    per_epoch = times[-1]
    robust, seeds = spec.get("robust") or [1], spec.get("seeds") or [0]
    cells = len(spec["batch_sizes"]) * len(robust) * len(seeds)
    epochs = int(spec.get("training", {}).get("max_epochs", 20))
    share = 1.0 / float(spec.get("resources", {}).get("gpus", 1) or 1)
    hours = cells * epochs * per_epoch / 3600
    print(
        f"{Path(args.spec).name}: {spec['model']} on {spec['dataset']}, batch {batch}, "
        f"robust {cfg['robust']}, {device} (torch {torch.__version__}): epoch seconds "
        + ", ".join(f"{t:.1f}" for t in times)
        + f". If all {cells} trials ran {epochs} epochs at this cell's {per_epoch:.1f} s: "
        f"{hours:.2f} device-hours, {hours / share:.2f} with {share:g} trials per device "
        "(the smallest batch is the slowest per epoch, robust training slower than clean; "
        "trials stopping at target_train_loss take fewer epochs)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
