"""Timing and peak-memory helpers shared by the benchmark modules.

Peak memory is the process's resident-set high-water mark (Linux ``VmHWM``), reset to the
current RSS right before each measured call (``/proc/self/clear_refs`` = 5), minus the RSS
at that moment: the extra memory the call needed. Before the reset, glibc's
``malloc_trim(0)`` hands memory that earlier calls freed back to the OS, so a call cannot
hide its needs in pages an earlier call left resident. (Fixing ``MALLOC_MMAP_THRESHOLD_``
instead would do the same but makes every large temporary a fresh mmap: measured 2-3x
slower products, so it is not used.)
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def threads() -> int:
    """Threads for every library in one run: HESSWEEP_BENCH_THREADS, default 1.

    One thread by default: on a shared or busy machine a multi-threaded OpenMP region
    stalls whenever one of its threads is descheduled, which inflates times at random;
    a one-thread run's CPU seconds stay what the work costs, so ratios stay comparable.
    """
    return int(os.environ.get("HESSWEEP_BENCH_THREADS", "1"))


def bench_device() -> str:
    """Where the Hessian benchmark runs: HESSWEEP_BENCH_DEVICE, ``cpu`` (default) or ``cuda``."""
    return os.environ.get("HESSWEEP_BENCH_DEVICE", "cpu")


def worker_env() -> dict[str, str]:
    """Environment for a measuring subprocess: the same thread count for every library."""
    n = str(threads())
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=n,
        MKL_NUM_THREADS=n,
        OPENBLAS_NUM_THREADS=n,
        HESSWEEP_BENCH_THREADS=n,
    )
    return env


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def hwm_supported() -> bool:
    """Whether the RSS high-water mark can be read and reset (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_mib("VmHWM") is not None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> float:
    """Return freed memory to the OS, reset the high-water mark to the current RSS, and
    return that RSS in MiB."""
    gc.collect()
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS") or 0.0


def peak_since(base: float) -> float:
    """Extra resident memory (MiB) at the high-water mark since ``reset_peak``."""
    return max(0.0, (_status_mib("VmHWM") or 0.0) - base)


class BudgetExceeded(RuntimeError):
    """A measured call ran past its time cap; the count of products so far is kept."""


@dataclass
class Counter:
    """Counts calls of a wrapped product function and enforces an optional deadline."""

    calls: int = 0
    deadline: float | None = None

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.deadline is not None and time.perf_counter() > self.deadline:
                raise BudgetExceeded(f"stopped after {self.calls} products")
            self.calls += 1
            return fn(*args, **kwargs)

        return counted


@dataclass
class Run:
    """One measured call: wall and process-CPU seconds, peak extra RSS, its value."""

    wall: float
    cpu: float
    peak_mib: float | None
    value: Any = None
    error: BaseException | None = None


def timed(fn: Callable[[], Any], track_memory: bool, cuda: bool = False) -> Run:
    """Run ``fn`` once. A ``BudgetExceeded`` is caught and returned with the time spent.

    With ``cuda`` the device is synchronised around the call (its kernels are timed, not
    just their launch) and peak memory is the CUDA allocator's peak above what was
    allocated before the call.
    """
    if cuda:
        import torch

        torch.cuda.synchronize()
        gc.collect()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = reset_peak() if track_memory else 0.0
    c0, t0 = time.process_time(), time.perf_counter()
    value, error = None, None
    try:
        value = fn()
    except BudgetExceeded as exc:
        error = exc
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if track_memory else None
    else:
        peak = peak_since(base) if track_memory else None
    return Run(wall, cpu, peak, value, error)


def machine_line() -> str:
    """One line naming the CPU, the thread count and the load when it was printed."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load n/a"
    return f"{cpu}, {os.cpu_count()} cores, {threads()} threads per library, {load}"


def printed_by(main: Callable[[list[str]], object]) -> str:
    """What a script's ``main`` prints when run with its default arguments (for run_all)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([])
    return out.getvalue().strip()
