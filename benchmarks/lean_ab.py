"""Lean gradient graphs on against off, interleaved on one device: is a rewrite worth it here?

``python -m benchmarks.lean_ab [cpu|cuda] [REPEATS]`` times, on both benchmark settings,
the batched input Hessians of 1,000 samples, one 512-sample input product, one weight
product and a top-k solve (graph build included) three ways, taking turns within each
repeat so that load and clock changes hit them alike: ``lean`` (the default),
``plain`` (every rewrite off) and ``plain_direct`` (rewrites off and the input Hessian's
model called directly, not through ``functional_call``). It prints medians and minima and
how far each variant's eigenvalues are from the lean ones. On a CPU it runs one thread.
"""

from __future__ import annotations

import statistics
import sys

import torch

from analysis.hessian import WeightHessian, input_hessian_spectrum, inputs, lanczos, leangraph
from benchmarks import hessian_peers as peers
from benchmarks.hessian_setups import make_setting
from benchmarks.measure import timed

N_INPUT = 1000
PRODUCT_ROWS = 512
# Every variant keeps all its graphs: the default budget (a share of the memory free when an
# operator is built) would shrink for the operators built later.
CACHE_BYTES = 1 << 40


def _direct_loss(self: inputs.InputHessian, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    return inputs.summed_loss(self.loss_fn, self.model(xs), ys)


OFF = 1 << 62
VARIANTS = {
    "lean": (leangraph.MIN_ELEMENTS, leangraph.MIN_ELEMENTS_GPU, inputs.InputHessian._loss),
    "plain": (OFF, OFF, inputs.InputHessian._loss),
    "plain_direct": (OFF, OFF, _direct_loss),
}


def _use(name: str) -> None:
    leangraph.MIN_ELEMENTS, leangraph.MIN_ELEMENTS_GPU, inputs.InputHessian._loss = VARIANTS[name]


def compare(setting: str, device: str, repeats: int) -> None:
    """Print the four timings of every variant on one setting, and the eigenvalue gaps."""
    s = make_setting(setting, device=device)
    x, y = s.x[:N_INPUT], s.y[:N_INPUT]
    k = 1 if setting == "digits" else 10
    rows = torch.arange(PRODUCT_ROWS)
    cuda = device == "cuda"

    def inp() -> torch.Tensor:
        return input_hessian_spectrum(s.model, peers.CE, x, y, k=1, tol=1e-4).eigenvalues

    def top() -> torch.Tensor:
        op = WeightHessian(s.model, peers.CE, s.batches, cache_bytes=CACHE_BYTES)
        return lanczos(op, k=k, tol=1e-4, criterion="eigenvalue").eigenvalues

    weight_ops, input_ops = {}, {}
    v = iv = None
    for name in VARIANTS:  # graphs are kept at the first product: under the variant's setting
        _use(name)
        weight_ops[name] = WeightHessian(s.model, peers.CE, s.batches, cache_bytes=CACHE_BYTES)
        input_ops[name] = inputs.InputHessian(s.model, peers.CE, x[:PRODUCT_ROWS], y[:PRODUCT_ROWS])
        v = torch.randn(weight_ops[name].size, device=device)
        iv = torch.randn(PRODUCT_ROWS, input_ops[name].size, device=device)
        weight_ops[name].matvec(v)
        input_ops[name].matvec(iv, rows)
        assert len(weight_ops[name]._graphs) == len(weight_ops[name].chunks), "graphs not kept"
    tasks = {
        f"input Hessians, {N_INPUT} samples": lambda name: inp(),
        f"input product, {PRODUCT_ROWS} samples": lambda name: input_ops[name].matvec(iv, rows),
        "weight product": lambda name: weight_ops[name].matvec(v),
        f"top-{k}": lambda name: top(),
    }
    times: dict[tuple[str, str], list[float]] = {(t, n): [] for t in tasks for n in VARIANTS}
    values: dict[tuple[str, str], torch.Tensor] = {}
    for rep in range(repeats + 1):  # the first round warms up (graphs, kernels, imports)
        for name in VARIANTS:
            _use(name)
            for task, fn in tasks.items():
                run = timed(lambda: fn(name), track_memory=False, cuda=cuda)  # noqa: B023
                if rep:
                    times[(task, name)].append(run.wall)
                    values[(task, name)] = run.value
    gpu = torch.cuda.get_device_name() if device == "cuda" else "one thread"
    print(f"== {setting} on {device} ({gpu}): ms, median / min of {repeats}")
    for (task, name), ts in times.items():
        print(f"  {task:30s} {name:13s} {statistics.median(ts) * 1e3:10.3f} {min(ts) * 1e3:10.3f}")
    for task in (f"input Hessians, {N_INPUT} samples", f"top-{k}"):
        ref = values[(task, "lean")]
        for name in VARIANTS:
            gap = float((values[(task, name)] - ref).abs().max() / ref.abs().max())
            print(f"  {task}: {name} vs lean, max relative difference {gap:.1e}")


def main(argv: list[str]) -> None:
    device = argv[0] if argv else "cpu"
    repeats = int(argv[1]) if len(argv) > 1 else 5
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        for setting in ("digits", "cifar"):
            compare(setting, device, repeats)
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        _use("lean")


if __name__ == "__main__":
    main(sys.argv[1:])
