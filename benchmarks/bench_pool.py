"""Lanczos top-5 on the Hessian actor pool: 1 actor vs 2 actors (one thread each).

A model of at least 1M parameters over ~2,000 CIFAR-shaped samples; the same seed and
iteration budget for every run, so the runs do the same products and must agree. Prints
a table with wall times, seconds per product and the speed-up; asserts nothing.

    .venv/bin/python benchmarks/bench_pool.py [--samples 2000] [--model mlp|c1]
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch
from torch import nn

from analysis.hessian import WeightHessian, lanczos
from orchestrator.hessian_pool import HessianPool
from trainables.models import build_seeded_model, count_parameters


def wide_mlp(seed: int) -> nn.Module:
    """A 3072-512-512-10 ReLU MLP (1.84M parameters): large, but cheap per sample."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(3 * 32 * 32, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )


def cifar_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 3x32x32 images in [0, 1] with labels in 0..9."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def cpu_seconds(pool: HessianPool | None) -> list[float]:
    """CPU seconds used so far by each actor (by this process when there is no pool)."""
    if pool is None:
        return [time.process_time()]
    return [i["cpu_seconds"] for i in ray.get([a.info.remote() for a in pool.actors])]


def timed_lanczos(
    op: object, args: argparse.Namespace, pool: HessianPool | None = None
) -> tuple[float, float, object]:
    """Wall time and busiest worker's CPU time of one Lanczos run, after a warm-up product."""
    op.matvec(torch.zeros(op.size, dtype=op.dtype))
    cpu0 = cpu_seconds(pool)
    start = time.perf_counter()
    res = lanczos(op, k=5, tol=args.tol, seed=0, max_iter=args.max_iter)
    wall = time.perf_counter() - start
    cpu = max(b - a for a, b in zip(cpu0, cpu_seconds(pool), strict=True))
    return wall, cpu, res


def run() -> str:
    """The table with default arguments, as text (for ``run_all``)."""
    from benchmarks.measure import printed_by  # run_all puts the repository on sys.path

    return "## Hessian actor pool: 1 vs 2 actors\n\n```\n" + printed_by(main) + "\n```"


def main(argv: list[str] | None = None) -> None:
    """Run the local baseline, then 1 and 2 actors, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--model", choices=("mlp", "c1"), default="mlp")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=60)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    args = parser.parse_args(argv)
    model = wide_mlp(0) if args.model == "mlp" else build_seeded_model("c1", 10, 3, 32, 0)
    data = cifar_like(args.samples, seed=1)
    print(
        f"model {args.model}: {count_parameters(model):,} parameters; {args.samples} samples "
        f"3x32x32; float32; lanczos k=5 tol={args.tol:g} max_iter={args.max_iter}; "
        f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    torch.set_num_threads(1)
    rows = []
    local = WeightHessian(model, nn.CrossEntropyLoss(), [data])
    rows.append(("in-process (1 thread)", *timed_lanczos(local, args)))
    del local
    ray.init(num_cpus=2, num_gpus=1 if args.gpus_per_actor else 0, include_dashboard=False)
    for actors in (1, 2):
        pool = HessianPool(data, num_actors=actors, num_cpus=1, num_gpus=args.gpus_per_actor)
        with pool, pool.weight_hessian(model) as op:
            name = f"pool, {actors} actor(s) x 1 thread"
            rows.append((name, *timed_lanczos(op, args, pool)))
    ray.shutdown()
    base_wall, base_cpu = rows[1][1], rows[1][2]
    ref = rows[0][3].eigenvalues
    head = (
        f"{'setup':<28}{'wall s':>8}{'matvecs':>8}{'s/matvec':>9}{'speed-up':>9}"
        f"{'busiest CPU s':>14}{'CPU ratio':>10}"
    )
    print(f"\n{head}  max rel diff")
    for name, wall, cpu, res in rows:
        diff = float(((res.eigenvalues - ref).abs() / ref.abs()).max())
        print(
            f"{name:<28}{wall:>8.1f}{res.n_matvecs:>8}{wall / res.n_matvecs:>9.3f}"
            f"{base_wall / wall:>8.2f}x{cpu:>14.1f}{base_cpu / cpu:>9.2f}x  {diff:.1e}"
        )
    print(
        "\nspeed-up: wall time vs 1 actor. busiest CPU s: CPU seconds of the busiest worker "
        "(actor, or this process in-process);\nCPU ratio: 1-actor CPU / busiest CPU, the "
        "speed-up to expect when every actor has a free core (an oversubscribed machine "
        "gives less)."
    )
    print(f"lambda_1..5: {[round(float(v), 5) for v in ref]} (converged={rows[0][3].converged})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
