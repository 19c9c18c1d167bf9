"""Files logged on a trial's child run: spectra as Parquet and plots as PNG."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_PYPLOT = threading.Lock()


def write_spectrum_files(report: Any, folder: Path, title: str) -> list[Path]:
    """Write spectrum/*.parquet and plots/*.png for one trial's SpectrumReport.

    Serialised: trials are analysed in driver threads and pyplot is not thread-safe.
    """
    with _PYPLOT:
        return _write(report, folder, title)


def _write(report: Any, folder: Path, title: str) -> list[Path]:
    spectrum, plots = folder / "spectrum", folder / "plots"
    spectrum.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    eig = np.asarray(report.eigenvalues, dtype=float)
    written = [
        _parquet(
            spectrum / "eigenvalues.parquet",
            index=np.arange(1, len(eig) + 1),
            eigenvalue=eig,
            residual=report.residuals,
        )
    ]
    if report.density_grid is not None and len(report.density_grid):
        written.append(
            _parquet(
                spectrum / "density.parquet",
                eigenvalue=report.density_grid,
                density=report.density,
            )
        )
        written.append(plots / "density.png")
        _density_plot(report, written[-1], title)
    if report.input_eig_max is not None and len(report.input_eig_max):
        written.append(
            _parquet(
                spectrum / "input_hessian.parquet",
                eig_max=report.input_eig_max,
                eig_min=report.input_eig_min,
                converged=report.input_converged,
            )
        )
    written.append(plots / "eigenvalues.png")
    _eigen_plot(eig, written[-1], title)
    return written


def _parquet(path: Path, **columns: Any) -> Path:
    """Write float columns (an integer ``index`` and boolean flags keep their type) as one
    Parquet table."""
    table = {
        name: values
        if name == "index" or np.asarray(values).dtype == bool
        else np.asarray(values, dtype=float)
        for name, values in columns.items()
    }
    pq.write_table(pa.table(table), path)
    return path


def _eigen_plot(eig: np.ndarray, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.stem(np.arange(1, len(eig) + 1), eig)
    ax.set_xlabel("index i")
    ax.set_ylabel("Hessian eigenvalue $\\lambda_i$")
    ax.set_title(f"Top weight-Hessian eigenvalues\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _density_plot(report: Any, path: Path, title: str) -> None:
    grid = np.asarray(report.density_grid, dtype=float)
    dens = np.asarray(report.density, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.semilogy(grid, np.maximum(dens, 1e-12))
    ax.set_ylim(bottom=max(1e-8, dens[dens > 0].min() if (dens > 0).any() else 1e-8))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_title(f"Weight-Hessian spectral density (SLQ)\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
