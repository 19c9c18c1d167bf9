"""Lanczos for the top eigenvalue from the loss gradient vs from a random vector alone.

``python -m benchmarks.gradient_start [MODELS] [SEEDS]`` trains the study's models
(default ``m1,mlp,c1``) on 600 digits images at batch 8, 64 and 600 and, after 1, 4 and 15
epochs, finds the float64 Hessian's top eigenvalue with the eigenvalue rule at tol 1e-3
and 1e-4 from SEEDS seeds (default 4), once from the random start and once with
``start=op.gradient()``. It prints each model's products (mean over seeds) and worst
relative error against a tight reference, then how often each start ended off by more
than its tol (stopping on the lower of a close pair). About 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from analysis.hessian import WeightHessian, lanczos
from trainables.models import build_seeded_model

CE = nn.CrossEntropyLoss()
N_SAMPLES = 600
BATCH_SIZES = (8, 64, 600)
EPOCHS = (1, 4, 15)
TOLS = (1e-3, 1e-4)
STARTS = ("random", "gradient")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images[:N_SAMPLES], dtype=torch.float32)[:, None] / 16
    return x, torch.tensor(d.target[:N_SAMPLES])


def _checkpoints(name: str, batch: int, x: torch.Tensor, y: torch.Tensor):
    """The model after each of EPOCHS epochs of SGD at this batch size."""
    model = build_seeded_model(name, 10, 1, 8, seed=batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if batch < N_SAMPLES else 0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(batch)
    done = 0
    for target in EPOCHS:
        model.train()
        for _ in range(target - done):
            perm = torch.randperm(N_SAMPLES, generator=gen)
            for i in range(0, N_SAMPLES, batch):
                idx = perm[i : i + batch]
                opt.zero_grad()
                CE(model(x[idx]), y[idx]).backward()
                opt.step()
        done = target
        yield target, model.eval()


def measure(op: WeightHessian, ref: float, seeds: int) -> dict[tuple[str, float], tuple]:
    """(start, tol) -> (mean products, worst relative error) over the seeds."""
    out = {}
    for tol in TOLS:
        for start in STARTS:
            errs, steps = [], []
            for seed in range(seeds):
                guess = op.gradient() if start == "gradient" else None
                res = lanczos(op, k=1, tol=tol, seed=seed, criterion="eigenvalue", start=guess)
                errs.append(abs(float(res.eigenvalues[0]) - ref) / abs(ref))
                steps.append(res.n_matvecs)
            out[start, tol] = (float(np.mean(steps)), max(errs))
    return out


def main(models: list[str], seeds: int) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    x, y = _data()
    rows = []
    for name in models:
        for batch in BATCH_SIZES:
            for epochs, model in _checkpoints(name, batch, x, y):
                with torch.no_grad():
                    loss = float(CE(model(x), y))
                if not np.isfinite(loss):
                    print(f"{name:5s} b{batch:<4d} e{epochs:<3d} diverged (loss {loss}): skipped")
                    continue
                op = WeightHessian(model, CE, [(x, y)], dtype=torch.float64)
                top = lanczos(op, k=3, tol=1e-10, seed=99).eigenvalues.tolist()
                got = measure(op, top[0], seeds)
                rows.append(got)
                cells = "  ".join(
                    f"{start[:4]}@{tol:g} {n:4.1f} {err:.1e}"
                    for (start, tol), (n, err) in got.items()
                )
                gap = (top[0] - top[1]) / top[0]
                print(f"{name:5s} b{batch:<4d} e{epochs:<3d} gap {gap:.1e}  {cells}", flush=True)
    print(f"\n{len(rows)} models, {seeds} seeds each (products: mean; error: worst seed)")
    for tol in TOLS:
        for start in STARTS:
            mean = np.mean([r[start, tol][0] for r in rows])
            off = sum(r[start, tol][1] > tol for r in rows)
            print(
                f"tol {tol:g} {start:8s}: {mean:5.2f} products on average; {off} models off > tol"
            )
        fewer = np.mean([r["gradient", tol][0] / r["random", tol][0] for r in rows])
        more = sum(r["gradient", tol][0] > r["random", tol][0] for r in rows)
        print(
            f"tol {tol:g}: gradient / random products {fewer:.2f} (mean ratio); "
            f"{more} models took more"
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        (args[0] if args else "m1,mlp,c1").split(","),
        int(args[1]) if len(args) > 1 else 4,
    )
