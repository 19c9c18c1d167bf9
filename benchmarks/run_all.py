"""Run every benchmark module and print its report: ``python benchmarks/run_all.py [NAME ...]``.

A benchmark module lives in ``benchmarks/`` and has ``run() -> str`` returning markdown.
To add one, append its module name to ``BENCHMARKS``. Times are printed, never asserted.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BENCHMARKS = [
    "bench_hessian",
    "bench_pool",
    "bench_tune_overhead",
]


def main(argv: list[str]) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    chosen = argv or BENCHMARKS
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {BENCHMARKS}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        t0 = time.perf_counter()
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        try:
            report = importlib.import_module(f"benchmarks.{name}").run()
        except Exception as exc:  # one broken benchmark must not hide the others
            failed.append(name)
            print(f"[run_all] {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(report)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
