"""The paper's figures as PNG files (matplotlib, Agg, no pyplot state).

Each figure function takes the per-trial and summary tables (or the sweep's spectra) and
a path, and returns a ``FigureFile``, or a plain note saying why it was skipped. Batch
size axes are log-scaled, 'full' sitting at the training-set size when known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.report.collect import Sweep
from analysis.report.landscapes import LandscapeSet
from analysis.report.table import robust_order

DPI = 120
ROBUST_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
LAMBDA = "λmax"
HOLLOW = "Hollow markers: a seed of that cell did not reach target_train_loss."


@dataclass(frozen=True)
class FigureFile:
    """A written figure: file name, path, and the caption the report shows under it."""

    name: str
    path: Path
    title: str
    caption: str


@dataclass(frozen=True)
class ReportData:
    """Everything the figures draw from."""

    sweep: Sweep
    trials: pd.DataFrame
    table: pd.DataFrame
    landscapes: LandscapeSet


def _new(ncols: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def robust_color(labels: list[str]) -> dict[str, str]:
    """A fixed colour per robust setting (plain training first)."""
    return {r: ROBUST_COLORS[i % len(ROBUST_COLORS)] for i, r in enumerate(robust_order(labels))}


def batch_colors(batches: list[tuple[str, float]]) -> dict[str, tuple]:
    """A viridis colour per batch size, small to large."""
    from matplotlib import colormaps

    ordered = sorted(set(batches), key=lambda b: b[1])
    cmap = colormaps["viridis"]
    n = max(len(ordered) - 1, 1)
    return {b: cmap(0.85 * i / n) for i, (b, _) in enumerate(ordered)}


def batch_axis(ax, frame: pd.DataFrame, n_train: int | None = None) -> None:
    """Log2 batch axis with a tick per batch size of the sweep ('full' last, with the
    training-set size when known)."""
    ticks = frame[["batch_size", "batch_value"]].drop_duplicates().sort_values("batch_value")
    full = f"full ({n_train})" if n_train is not None else "full"
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks["batch_value"].to_list())
    ax.set_xticklabels([full if b == "full" else b for b in ticks["batch_size"]])
    ax.minorticks_off()
    ax.set_xlabel("batch size (log scale)")
    ax.grid(alpha=0.3)


def _positive_log(ax, values: np.ndarray) -> None:
    finite = values[np.isfinite(values)]
    if len(finite) and (finite > 0).all() and finite.max() / finite.min() > 10:
        ax.set_yscale("log")


def _errorbars(ax, table: pd.DataFrame, col: str, style: str = "o-", label_suffix: str = ""):
    colors = robust_color(list(table["robust"]))
    for robust in robust_order(list(table["robust"])):
        cell = table[table["robust"] == robust]
        ax.errorbar(
            cell["batch_value"],
            cell[f"{col}_mean"],
            yerr=cell[f"{col}_std"].fillna(0.0),
            fmt=style,
            color=colors[robust],
            capsize=3,
            label=f"{robust}{label_suffix}",
        )
        missed = cell[cell["missed_target"] > 0]
        ax.plot(
            missed["batch_value"],
            missed[f"{col}_mean"],
            style[0],
            mfc="white",
            mec=colors[robust],
            zorder=3,
        )


def lambda_vs_batch(data: ReportData, path: Path) -> FigureFile | str:
    """Top weight-Hessian eigenvalue against batch size, a line per robust setting."""
    table = data.table
    if not np.isfinite(table["lambda_max_mean"].astype(float)).any():
        return "no hessian/eig_1 metrics (was the Hessian phase disabled?)"
    fig, (ax,) = _new()
    _errorbars(ax, table, "lambda_max")
    batch_axis(ax, table, data.landscapes.n_train)
    _positive_log(ax, table["lambda_max_mean"].to_numpy(float))
    ax.set_ylabel(f"{LAMBDA} of the weight Hessian")
    ax.set_title("Top Hessian eigenvalue vs batch size")
    ax.legend(title="robust training")
    _save(fig, path)
    return FigureFile(
        path.name,
        path,
        "Top Hessian eigenvalue vs batch size",
        f"{LAMBDA} of the exact full-training-set weight Hessian (Lanczos); error bars: "
        f"std over seeds. {HOLLOW}",
    )


def accuracy_vs_batch(data: ReportData, path: Path) -> FigureFile | str:
    """Clean (solid) and adversarial (dashed) test accuracy against batch size."""
    table = data.table
    fig, (ax,) = _new()
    _errorbars(ax, table, "test_acc", "o-", " clean")
    if np.isfinite(table["adv_acc_mean"].astype(float)).any():
        _errorbars(ax, table, "adv_acc", "s--", " adversarial")
    batch_axis(ax, table, data.landscapes.n_train)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("test accuracy")
    ax.set_title("Clean and adversarial accuracy vs batch size")
    ax.legend(fontsize=8)
    _save(fig, path)
    return FigureFile(
        path.name,
        path,
        "Clean and adversarial accuracy vs batch size",
        "Solid: clean test accuracy; dashed: accuracy under the sweep's eval_attack. "
        f"Error bars: std over seeds. {HOLLOW}",
    )


def input_lambda_vs_batch(data: ReportData, path: Path) -> FigureFile | str:
    """Mean input-Hessian lambda_max over test samples against batch size."""
    table = data.table
    if not np.isfinite(table["input_lambda_max_mean"].astype(float)).any():
        return "no input_hessian/eig_1_mean metrics (input_samples was 0?)"
    fig, (ax,) = _new()
    _errorbars(ax, table, "input_lambda_max")
    batch_axis(ax, table, data.landscapes.n_train)
    _positive_log(ax, table["input_lambda_max_mean"].to_numpy(float))
    ax.set_ylabel(f"input-Hessian {LAMBDA} (mean over test samples)")
    ax.set_title("Input-Hessian top eigenvalue vs batch size")
    ax.legend(title="robust training")
    _save(fig, path)
    return FigureFile(
        path.name,
        path,
        "Input-Hessian top eigenvalue vs batch size",
        f"Mean over test samples of the {LAMBDA} of the Hessian of each sample's loss w.r.t. "
        f"its input; error bars: std over seeds. {HOLLOW}",
    )


def _panels(labels: list[str]) -> tuple[Figure, dict]:
    order = robust_order(labels)
    fig, axes = _new(ncols=len(order), width=5.0 if len(order) > 1 else 6.0)
    return fig, dict(zip(order, axes, strict=True))


def landscape_figure(data: ReportData, path: Path) -> FigureFile | str:
    """The paper's parametric plot: loss along the top eigenvector, a curve per batch size."""
    cells = data.landscapes.cells
    if not cells:
        return "no landscape computed: " + ("; ".join(data.landscapes.notes) or "no trials")
    positions = dict(zip(data.trials["batch_size"], data.trials["batch_value"], strict=False))
    colors = batch_colors([(c.batch_size, positions.get(c.batch_size, 0.0)) for c in cells])
    fig, axes = _panels([c.robust for c in cells])
    for c in sorted(cells, key=lambda c: positions.get(c.batch_size, 0.0)):
        ax, land = axes[c.robust], c.landscape
        color = colors[c.batch_size]
        ax.plot(land.alphas, land.losses, "-", color=color, label=f"bs={c.batch_size}")
        if land.random_losses is not None:
            ax.plot(land.alphas, land.random_losses, ":", color=color, alpha=0.7)
    for robust, ax in axes.items():
        ax.set_title(f"robust: {robust}")
        ax.set_xlabel("step a along the unit direction")
        ax.set_ylabel("training loss (whole set, eval mode)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="solid: top eigenvector\ndotted: random", title_fontsize=7)
    _save(fig, path)
    return FigureFile(
        path.name,
        path,
        "Loss landscape along the top Hessian eigenvector",
        "f(a) = L(theta + a v) over the whole training set, v the unit top eigenvector of "
        "each model's own weight Hessian (solid) or a random unit direction (dotted); one "
        "seed per batch size, recomputed from the final checkpoints.",
    )


def density_figure(data: ReportData, path: Path) -> FigureFile | str:
    """SLQ spectral density per batch size (first seed), log density axis."""
    rows = [
        (t, t.spectra["density"])
        for t in data.sweep.trials
        if "density" in t.spectra and len(t.spectra["density"]) and not t.diverged
    ]
    if not rows:
        return "no spectrum/density.parquet artifacts (hessian.density was off?)"
    firsts: dict[tuple[str, str], tuple] = {}
    for t, frame in sorted(rows, key=lambda r: r[0].seed):
        firsts.setdefault((t.robust, t.batch_size), (t, frame))
    positions = dict(zip(data.trials["batch_size"], data.trials["batch_value"], strict=False))
    colors = batch_colors([(b, positions.get(b, 0.0)) for _, b in firsts])
    fig, axes = _panels([r for r, _ in firsts])
    for (robust, batch), (_, frame) in sorted(
        firsts.items(), key=lambda kv: positions.get(kv[0][1], 0.0)
    ):
        dens = np.maximum(frame["density"].to_numpy(float), 1e-12)
        axes[robust].semilogy(frame["eigenvalue"], dens, color=colors[batch], label=f"bs={batch}")
    for robust, ax in axes.items():
        ax.set_ylim(bottom=1e-8)
        ax.set_title(f"robust: {robust}")
        ax.set_xlabel("weight-Hessian eigenvalue")
        ax.set_ylabel("density (log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    return FigureFile(
        path.name,
        path,
        "Weight-Hessian eigenvalue density",
        "Spectral density from stochastic Lanczos quadrature (the Hessian phase's "
        "spectrum/density.parquet), one seed per batch size.",
    )


def robust_vs_plain(data: ReportData, path: Path) -> FigureFile | str:
    """lambda_max of each robust setting beside plain training, grouped by batch size."""
    table = data.table[np.isfinite(data.table["lambda_max_mean"].astype(float))]
    labels = robust_order(list(table["robust"]))
    if len(labels) < 2 or "none" not in labels:
        return "needs plain training (robust none) and a robust setting with lambda_max"
    batches = (table[["batch_size", "batch_value"]].drop_duplicates().sort_values("batch_value"))[
        "batch_size"
    ].to_list()
    colors = robust_color(labels)
    fig, (ax, ratio_ax) = _new(ncols=2, width=5.0)
    width = 0.8 / len(labels)
    x = np.arange(len(batches))
    plain = table[table["robust"] == "none"].set_index("batch_size").reindex(batches)
    for i, robust in enumerate(labels):
        cell = table[table["robust"] == robust].set_index("batch_size").reindex(batches)
        offset = (i - (len(labels) - 1) / 2) * width
        ax.bar(
            x + offset,
            cell["lambda_max_mean"],
            width,
            yerr=cell["lambda_max_std"].fillna(0.0),
            color=colors[robust],
            capsize=3,
            label=robust,
        )
        if robust != "none":
            ratio = cell["lambda_max_mean"] / plain["lambda_max_mean"]
            ratio_ax.plot(x, ratio, "o-", color=colors[robust], label=robust)
    _positive_log(ax, table["lambda_max_mean"].to_numpy(float))
    ratio_ax.axhline(1.0, color="black", lw=0.8)
    ratio_ax.set_yscale("log")
    ratio_ax.set_ylabel(f"{LAMBDA} robust / {LAMBDA} plain (log)")
    ratio_ax.set_title("below 1: robust training is flatter", fontsize=9)
    ax.set_ylabel(f"{LAMBDA} of the weight Hessian")
    ax.set_title("Robust vs plain training", fontsize=10)
    for a in (ax, ratio_ax):
        a.set_xticks(x)
        a.set_xticklabels(batches)
        a.set_xlabel("batch size")
        a.grid(alpha=0.3, axis="y")
        a.legend(title="robust training", fontsize=8)
    _save(fig, path)
    return FigureFile(
        path.name,
        path,
        "Robust vs plain training",
        f"Left: {LAMBDA} per batch size for each robust setting beside plain training "
        f"(error bars: std over seeds). Right: the ratio of the means; below 1 the robust "
        "model sits in a flatter minimum.",
    )


def input_histogram(data: ReportData, path: Path) -> FigureFile | str:
    """Histograms of per-sample input-Hessian largest and smallest eigenvalues."""
    frames = {
        t.robust: [] for t in data.sweep.trials if "input_hessian" in t.spectra and not t.diverged
    }
    for t in data.sweep.trials:
        if t.robust in frames and "input_hessian" in t.spectra:
            frames[t.robust].append(t.spectra["input_hessian"])
    pooled = {r: pd.concat(frames[r]) for r in robust_order(list(frames)) if frames[r]}
    if not pooled:
        return "no spectrum/input_hessian.parquet artifacts (input_samples was 0?)"
    colors = robust_color(list(pooled))
    fig, (left, right) = _new(ncols=2, width=5.0)
    everything = pd.concat(pooled.values())
    top = everything["eig_max"].to_numpy(float)
    low = everything["eig_min"].to_numpy(float)
    positive = top[top > 0]
    bins_top = (
        np.geomspace(positive.min(), positive.max(), 30)
        if len(positive) and positive.max() > positive.min()
        else 30
    )
    bins_low = np.linspace(min(low.min(), 0.0), max(low.max(), 0.0) or 1e-12, 30)
    for robust, frame in pooled.items():
        kw = {"alpha": 0.6, "color": colors[robust], "label": f"{robust} ({len(frame)})"}
        left.hist(frame["eig_max"].to_numpy(float), bins=bins_top, **kw)
        right.hist(frame["eig_min"].to_numpy(float), bins=bins_low, **kw)
    if not isinstance(bins_top, int):
        left.set_xscale("log")
    left.set_xlabel("largest eigenvalue per sample (log)")
    right.set_xlabel("smallest eigenvalue per sample")
    right.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    right.axvline(0.0, color="black", lw=0.8)
    trials = data.trials[data.trials["input_samples"] > 0]
    neg = np.average(trials["neg_fraction"].fillna(0.0), weights=trials["input_samples"])
    ratio = trials["min_eig_ratio"].min()
    right.set_title(
        f"smallest: negative fraction {neg:.1%}, most negative / largest {ratio:.2g}", fontsize=9
    )
    left.set_title("largest input-Hessian eigenvalue", fontsize=9)
    for ax in (left, right):
        ax.set_ylabel("test samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="robust training (samples)", title_fontsize=7)
    _save(fig, path)
    return FigureFile(
        path.name,
        path,
        "Input-Hessian eigenvalues, both ends",
        "Per test sample, the largest (left) and smallest (right) eigenvalue of the Hessian "
        "of its loss w.r.t. its input, pooled over batch sizes and seeds. The negative "
        "fraction counts samples whose smallest eigenvalue is clearly below zero; the ratio "
        "is the most negative eigenvalue over the largest one of the same trial.",
    )


def curvature_over_epochs(data: ReportData, path: Path) -> FigureFile | str:
    """hessian/eig_1_epoch against epoch, a line per trial (only when tracked)."""
    tracked = [t for t in data.sweep.trials if t.curvature is not None and len(t.curvature) > 0]
    if not tracked:
        return "no trial tracked hessian/eig_1_epoch (set training.hessian_every in the spec)"
    positions = dict(zip(data.trials["batch_size"], data.trials["batch_value"], strict=False))
    colors = batch_colors([(t.batch_size, positions.get(t.batch_size, 0.0)) for t in tracked])
    fig, axes = _panels([t.robust for t in tracked])
    seeds = len({t.seed for t in tracked}) > 1
    for t in sorted(tracked, key=lambda t: (positions.get(t.batch_size, 0.0), t.seed)):
        label = f"bs={t.batch_size}" + (f" seed={t.seed}" if seeds else "")
        axes[t.robust].plot(
            t.curvature["epoch"],
            t.curvature["value"],
            "o-",
            ms=3,
            color=colors[t.batch_size],
            label=label,
        )
    for robust, ax in axes.items():
        values = np.concatenate([t.curvature["value"].to_numpy(float) for t in tracked])
        _positive_log(ax, values)
        ax.set_title(f"robust: {robust}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{LAMBDA} on a fixed training subset")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    return FigureFile(
        path.name,
        path,
        "Top Hessian eigenvalue during training",
        f"hessian/eig_1_epoch: {LAMBDA} on the first 512 training samples (float32, Lanczos "
        "tol 1e-3), every hessian_every epochs.",
    )


FIGURES: tuple[tuple[str, Callable[[ReportData, Path], FigureFile | str]], ...] = (
    ("lambda_max_vs_batch.png", lambda_vs_batch),
    ("accuracy_vs_batch.png", accuracy_vs_batch),
    ("input_lambda_max_vs_batch.png", input_lambda_vs_batch),
    ("landscape_1d.png", landscape_figure),
    ("density.png", density_figure),
    ("robust_vs_plain.png", robust_vs_plain),
    ("input_hessian_hist.png", input_histogram),
    ("lambda_max_over_epochs.png", curvature_over_epochs),
)


def make_figures(data: ReportData, folder: Path) -> tuple[list[FigureFile], list[str]]:
    """Write every figure that has data into ``folder``; notes name the ones skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    made, notes = [], []
    for name, draw in FIGURES:
        out = draw(data, folder / name)
        if isinstance(out, FigureFile):
            made.append(out)
        else:
            notes.append(f"{name} skipped: {out}")
    return made, notes
