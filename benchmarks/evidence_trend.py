"""Evidence that the paper's effect shows here: batch size x FGSM training on digits with m1.

Yao et al. (NeurIPS 2018) find that large-batch training ends at sharper points (larger
top eigenvalue of the weight Hessian), that those points are less robust (lower accuracy
under attack, larger input-Hessian eigenvalues), and that adversarial training lowers the
spectrum at every batch size. This script trains m1 on digits at batch sizes 16, 64, 256
and full batch, with and without FGSM training, every run stopped at the same training
loss (`target_train_loss`: the fair comparison, since large batches need more epochs);
then, per model:

- lambda_max: the top eigenvalue of the exact Hessian of the mean loss over the *whole*
  training set, in float64 (`analysis.hessian.hessian_spectrum`, Lanczos);
- adversarial accuracy: FGSM (eps 0.1) on the test set, from the last epoch's history;
- input lambda_max: the mean over the test set of each sample's top input-Hessian
  eigenvalue (`analysis.hessian.input_hessian_spectrum`, which also says which converged).

It prints a Markdown table, the Spearman rank correlations of batch size with lambda_max,
adversarial accuracy and input lambda_max per robust setting (all seeds pooled, and per
seed), the robust/plain lambda_max ratio per batch size, and a plain verdict.

Every run uses the *same* learning rate and momentum (no lr scaling by default). The
stability bound 2(1 + momentum) / lr printed beside lambda_max is the sharpness above which
(full-batch) heavy-ball gradient descent cannot stay at a minimum: full-batch runs end near
it ("edge of stability", Cohen et al. 2021), so a larger lr for large batches (lr_scaling)
caps their lambda_max lower and can hide the effect. `--lr-scaling sqrt` shows it.

    .venv/bin/python benchmarks/evidence_trend.py                 # 1 seed: ~100 s, 1 core
    .venv/bin/python benchmarks/evidence_trend.py --seeds 0 1 2 --jobs 2   # ~6 min, 2 cores

(times on the shared 2-core machine at load 3-5). Results are deterministic per seed.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH_SIZES: tuple[int | str, ...] = (16, 64, 256, "full")
EPSILON = 0.1


@dataclass(frozen=True)
class Settings:
    """What every run shares (the comparison varies only batch size, robust and seed)."""

    lr: float = 0.02
    momentum: float = 0.9
    lr_scaling: str = "none"
    base_batch_size: int = 64
    warmup_epochs: float = 0.0
    target_train_loss: float = 0.1
    max_epochs: int = 1000
    epsilon: float = EPSILON
    tol: float = 1e-6
    threads: int = 1

    def train_config(self, batch_size: int | str, robust: bool, seed: int) -> dict[str, Any]:
        """The trainables config of one run."""
        return {
            "dataset": "digits",
            "model": "m1",
            "batch_size": batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "lr_scaling": self.lr_scaling,
            "base_batch_size": self.base_batch_size,
            "warmup_epochs": self.warmup_epochs,
            "max_epochs": self.max_epochs,
            "target_train_loss": self.target_train_loss,
            "robust": {"method": "fgsm", "epsilon": self.epsilon} if robust else {"method": "none"},
            "eval_attack": {"method": "fgsm", "epsilon": self.epsilon},
            "seed": seed,
            "device": "cpu",
        }


@dataclass(frozen=True)
class Row:
    """One trained model and what was measured on it."""

    batch: int | str
    batch_examples: int
    robust: bool
    seed: int
    epochs: int
    converged: bool
    diverged: bool
    train_loss: float
    test_acc: float
    adv_acc: float
    peak_lr: float
    lambda_max: float
    lanczos_converged: bool
    lanczos_matvecs: int
    input_lambda_mean: float
    input_converged_fraction: float
    train_s: float
    hessian_s: float


def run_one(settings: Settings, batch: int | str, robust: bool, seed: int) -> dict[str, Any]:
    """Train one model to the target loss and measure its spectra (runs in a worker too)."""
    import warnings

    import torch
    from torch import nn

    from analysis.hessian import hessian_spectrum, input_hessian_spectrum
    from trainables import fit, scaled_lr

    torch.set_num_threads(settings.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    trained = fit(settings.train_config(batch, robust, seed))
    train_s = time.perf_counter() - t0
    final = trained.final
    n_train = len(trained.train_data)
    b = trained.config.resolve_batch_size(n_train)
    peak_lr = scaled_lr(settings.lr, b, settings.base_batch_size, settings.lr_scaling)

    t0 = time.perf_counter()
    loss_fn = nn.CrossEntropyLoss()
    # The whole training set, every example once, in float64: the exact mean-loss Hessian.
    eig = hessian_spectrum(
        trained.model,
        loss_fn,
        trained.train_data.batches(n_train),
        top_k=1,
        tol=settings.tol,
        seed=seed,
        dtype=torch.float64,
    )
    (x_test, y_test) = trained.test_data.batches(len(trained.test_data))[0]
    inp = input_hessian_spectrum(
        trained.model,
        loss_fn,
        x_test,
        y_test,
        k=1,
        tol=settings.tol,
        seed=seed,
        dtype=torch.float64,
    )
    hessian_s = time.perf_counter() - t0
    return {
        "batch": batch,
        "batch_examples": b,
        "robust": robust,
        "seed": seed,
        "epochs": int(final["epoch"]),
        "converged": bool(final["converged"]),
        "diverged": bool(final["diverged"]),
        "train_loss": float(final["train/loss"]),
        "test_acc": float(final["test/acc"]),
        "adv_acc": float(final["test/adv_acc"]),
        "peak_lr": peak_lr,
        "lambda_max": eig.lambda_max,
        "lanczos_converged": bool(eig.converged),
        "lanczos_matvecs": int(eig.n_matvecs),
        "input_lambda_mean": float(inp.eigenvalues[:, 0].mean()),
        "input_converged_fraction": float(inp.converged.double().mean()),
        "train_s": train_s,
        "hessian_s": hessian_s,
    }


def _run_task(task: tuple[Settings, int | str, bool, int]) -> dict[str, Any]:
    return run_one(*task)


def run_all(
    settings: Settings,
    seeds: Sequence[int],
    batch_sizes: Sequence[int | str] = BATCH_SIZES,
    jobs: int = 1,
) -> list[Row]:
    """Every (seed, robust, batch) run, in that order; `jobs` worker processes at once."""
    tasks = [(settings, b, r, s) for s in seeds for r in (False, True) for b in batch_sizes]
    if jobs <= 1:
        results = []
        for task in tasks:
            results.append(_run_task(task))
            _say_progress(results[-1])
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = []
            for res in pool.map(_run_task, tasks):
                results.append(res)
                _say_progress(res)
    return [Row(**res) for res in results]


def _say_progress(res: dict[str, Any]) -> None:
    print(
        f"  done: batch {res['batch']!s:>4} {'fgsm' if res['robust'] else 'none'} seed "
        f"{res['seed']}: {res['epochs']} epochs, loss {res['train_loss']:.4f}, "
        f"lambda_max {res['lambda_max']:.4g} ({res['train_s']:.1f}s train, "
        f"{res['hessian_s']:.1f}s hessian)",
        file=sys.stderr,
        flush=True,
    )


def _robust_label(robust: bool, epsilon: float) -> str:
    return f"fgsm {epsilon:g}" if robust else "none"


def markdown_table(rows: Sequence[Row], settings: Settings) -> str:
    """One line per run."""
    head = (
        "| batch | robust | seed | epochs | train loss | test acc | adv acc | lambda_max "
        "| 2(1+m)/lr | input lambda_max mean |"
    )
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        bound = 2 * (1 + settings.momentum) / r.peak_lr
        flags = "" if r.converged else (" (diverged)" if r.diverged else " (not reached)")
        lam = f"{r.lambda_max:.3f}" + ("" if r.lanczos_converged else " (not converged)")
        lines.append(
            f"| {r.batch} | {_robust_label(r.robust, settings.epsilon)} | {r.seed} "
            f"| {r.epochs}{flags} | {r.train_loss:.4f} | {r.test_acc:.4f} | {r.adv_acc:.4f} "
            f"| {lam} | {bound:.0f} | {r.input_lambda_mean:.3f} |"
        )
    return "\n".join(lines)


def mean_table(rows: Sequence[Row], settings: Settings) -> str:
    """Mean +- standard deviation over seeds per (robust, batch)."""
    head = "| batch | robust | seeds | epochs | adv acc | lambda_max | input lambda_max mean |"
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for robust in (False, True):
        for batch in dict.fromkeys(r.batch for r in rows):
            group = [r for r in rows if r.robust == robust and r.batch == batch]
            if not group:
                continue
            lines.append(
                f"| {batch} | {_robust_label(robust, settings.epsilon)} | {len(group)} "
                f"| {_pm([r.epochs for r in group], 0)} | {_pm([r.adv_acc for r in group], 4)} "
                f"| {_pm([r.lambda_max for r in group], 2)} "
                f"| {_pm([r.input_lambda_mean for r in group], 3)} |"
            )
    return "\n".join(lines)


def _pm(values: Sequence[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def spearman(rows: Sequence[Row], key: str) -> tuple[float, float, int]:
    """Spearman rho of batch size (full = training-set size) vs `key`, a p-value, and n.

    The p-value is two-sided: exact (all permutations) for n <= 8, where scipy's
    t-approximation is meaningless (it gives p = 0 for any perfect ranking of 4 points,
    which chance alone produces 1 time in 12); scipy's otherwise (ties allowed).
    """
    from scipy.stats import spearmanr

    xs = [r.batch_examples for r in rows]
    ys = [getattr(r, key) for r in rows]
    n = len(rows)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan"), float("nan"), n
    res = spearmanr(xs, ys)
    rho = float(res.statistic)
    if n > 8:
        return rho, float(res.pvalue), n
    hits = total = 0
    for perm in itertools.permutations(ys):
        total += 1
        hits += abs(float(spearmanr(xs, perm).statistic)) >= abs(rho) - 1e-12
    return rho, hits / total, n


KEYS = (("lambda_max", "lambda_max"), ("adv_acc", "adv acc"), ("input_lambda_mean", "input lambda"))


def comparable(rows: Sequence[Row]) -> list[Row]:
    """The runs that reached the target loss: only they are compared (same training loss)."""
    return [r for r in rows if r.converged]


def correlations(rows: Sequence[Row], settings: Settings) -> str:
    """Spearman correlations per robust setting (pooled seeds, then each seed).

    Runs that missed the target loss are left out (they stopped somewhere else)."""
    seeds = sorted({r.seed for r in rows})
    rows = comparable(rows)
    head = "| robust | seeds | n | " + " | ".join(f"rho(batch, {t}) | p" for _, t in KEYS) + " |"
    out = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    groups: list[tuple[str, list[int]]] = [("all", seeds)]
    if len(seeds) > 1:
        groups += [(str(s), [s]) for s in seeds]
    for robust in (False, True):
        for name, chosen in groups:
            sub = [r for r in rows if r.robust == robust and r.seed in chosen]
            cells = []
            for key, _ in KEYS:
                rho, p, _n = spearman(sub, key)
                cells.append(f"{rho:+.3f} | {p:.2g}")
            out.append(
                f"| {_robust_label(robust, settings.epsilon)} | {name} | {len(sub)} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(out)


def robust_ratios(rows: Sequence[Row]) -> str:
    """lambda_max(fgsm) / lambda_max(none) per batch size and seed (< 1: robust is flatter)."""
    parts = []
    for batch in dict.fromkeys(r.batch for r in rows):
        ratios = []
        for seed in sorted({r.seed for r in rows}):
            both = [r for r in comparable(rows) if r.batch == batch and r.seed == seed]
            plain = [r for r in both if not r.robust]
            rob = [r for r in both if r.robust]
            if plain and rob:
                ratios.append(rob[0].lambda_max / plain[0].lambda_max)
        parts.append(f"batch {batch}: " + (", ".join(f"{x:.2f}" for x in ratios) or "-"))
    return "; ".join(parts)


def _trend(rho: float, p: float, sign: int, verb: str) -> str:
    """'rises' / 'tends to rise (not significant)' / 'does NOT rise', with the numbers."""
    numbers = f"rho {rho:+.2f}, p {p:.2g}"
    if math.isnan(rho) or rho * sign <= 0:
        return f"does NOT {verb} ({numbers})"
    if p < 0.05:
        return f"{verb}s ({numbers})"
    return f"tends to {verb}, not significant ({numbers})"


def verdict(rows: Sequence[Row]) -> list[str]:
    """Plain statements of which parts of the paper's trend the numbers show."""
    lines = []
    missed = [r for r in rows if not r.converged]
    rows = comparable(rows)
    for robust in (False, True):
        sub = [r for r in rows if r.robust == robust]
        label = "fgsm" if robust else "none"
        lam = _trend(*spearman(sub, "lambda_max")[:2], +1, "rise")
        adv = _trend(*spearman(sub, "adv_acc")[:2], -1, "fall")
        inp = _trend(*spearman(sub, "input_lambda_mean")[:2], +1, "rise")
        lines.append(
            f"{label}: with batch size, lambda_max {lam}; adversarial accuracy {adv}; "
            f"input-Hessian lambda_max mean {inp}"
        )
    pairs = [
        (p, q)
        for p in rows
        if not p.robust
        for q in rows
        if q.robust and q.batch == p.batch and q.seed == p.seed
    ]
    lower = sum(q.lambda_max < p.lambda_max for p, q in pairs)
    lines.append(
        f"robust lambda_max lower than plain in {lower} of {len(pairs)} (batch, seed) pairs"
    )
    if len(rows) and len({r.seed for r in rows}) == 1:
        lines.append(
            "one seed: 4 points per setting, so even a perfect ranking has p = 1/12; "
            "run --seeds 0 1 2 to tell a trend from seed noise"
        )
    if missed:
        lines.append(
            f"WARNING: {len(missed)} run(s) did not reach the target loss and are left out "
            "of the correlations and ratios: "
            + ", ".join(
                f"batch {r.batch} {'fgsm' if r.robust else 'none'} seed {r.seed}" for r in missed
            )
        )
    return lines


def machine_load() -> str:
    """`uptime`'s load averages (the machine may be shared: timings are noisy)."""
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "uptime unavailable; os.getloadavg() = " + str(os.getloadavg())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Settings()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        default=[str(b) for b in BATCH_SIZES],
        help="integers or 'full' (default: 16 64 256 full)",
    )
    p.add_argument("--lr", type=float, default=d.lr, help="the same for every batch size")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--lr-scaling", choices=("none", "sqrt", "linear"), default=d.lr_scaling)
    p.add_argument("--base-batch-size", type=int, default=d.base_batch_size)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--target-train-loss", type=float, default=d.target_train_loss)
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--epsilon", type=float, default=d.epsilon)
    p.add_argument("--tol", type=float, default=d.tol, help="Lanczos relative tolerance")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    settings = Settings(
        lr=args.lr,
        momentum=args.momentum,
        lr_scaling=args.lr_scaling,
        base_batch_size=args.base_batch_size,
        warmup_epochs=args.warmup_epochs,
        target_train_loss=args.target_train_loss,
        max_epochs=args.max_epochs,
        epsilon=args.epsilon,
        tol=args.tol,
        threads=args.threads,
    )
    batch_sizes = [b if b == "full" else int(b) for b in args.batch_sizes]
    print(f"machine before: {machine_load()}")
    print(
        f"digits, m1; lr {settings.lr:g} (scaling {settings.lr_scaling}), momentum "
        f"{settings.momentum:g}, warm-up {settings.warmup_epochs:g} epochs, stop at train loss "
        f"< {settings.target_train_loss:g} (max {settings.max_epochs} epochs); FGSM eps "
        f"{settings.epsilon:g}; seeds {args.seeds}; {settings.threads} thread(s) x "
        f"{args.jobs} job(s)",
        flush=True,
    )
    start = time.perf_counter()
    rows = run_all(settings, args.seeds, batch_sizes, jobs=args.jobs)
    wall = time.perf_counter() - start
    print()
    print(markdown_table(rows, settings))
    if len(args.seeds) > 1:
        print()
        print(mean_table(rows, settings))
    print()
    print(
        "Spearman rank correlation of batch size (full = 1437) with lambda_max, adversarial "
        "accuracy and input-Hessian lambda_max mean (p two-sided; exact for n <= 8):"
    )
    print()
    print(correlations(rows, settings))
    print()
    print("lambda_max(fgsm) / lambda_max(none): " + robust_ratios(rows))
    for line in verdict(rows):
        print(line)
    print()
    print(
        f"wall {wall:.1f}s (training {sum(r.train_s for r in rows):.1f}s, Hessians "
        f"{sum(r.hessian_s for r in rows):.1f}s summed over runs); machine after: "
        f"{machine_load()}"
    )
    not_conv = [r for r in rows if not r.lanczos_converged]
    if not_conv:
        print(f"WARNING: Lanczos did not converge for {len(not_conv)} model(s)")
    partial = [r for r in rows if r.input_converged_fraction < 1.0]
    if partial:
        print(
            f"WARNING: some input-Hessian eigenvalues did not converge in {len(partial)} model(s)"
        )
    return rows


if __name__ == "__main__":
    main()
