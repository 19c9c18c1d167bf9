"""Products under several lean-graph size cutoffs, interleaved: where should the bar sit?

``python -m benchmarks.lean_cutoff [cpu|cuda] [REPEATS] [CASES]`` times one weight product
and one input product (512 samples; ResNet-20 256) with the rewrites applied to calls of at
least 2**13, 2**16, 2**18 and 2**20 input elements, and with none ("off"), taking turns
within each repeat. CASES (comma-separated, default all): the two benchmark settings
``digits`` and ``cifar``, and the study's models on random CIFAR-shaped data ``c1x512``,
``resnet20x256`` and ``c2x512`` (all with BatchNorm). It prints median / min milliseconds
and how far each cutoff's weight product is from the "off" one (relative norm).
"""

from __future__ import annotations

import statistics
import sys

import torch
from torch import nn

from analysis.hessian import WeightHessian, leangraph
from analysis.hessian.inputs import InputHessian
from benchmarks.hessian_setups import make_setting
from benchmarks.measure import timed
from trainables.models import build_model

CE = nn.CrossEntropyLoss()
# Every cutoff keeps all its graphs: the default budget (a share of the memory free when an
# operator is built) would shrink for the operators built later.
CACHE_BYTES = 1 << 40
CUTOFFS = {"2^13": 2**13, "2^16": 2**16, "2^18": 2**18, "2^20": 2**20, "off": 1 << 62}
STUDY_MODELS = {"c1x512": ("c1", 512), "resnet20x256": ("resnet20", 256), "c2x512": ("c2", 512)}
CASES = ("digits", "cifar", *STUDY_MODELS)


def _case(name: str, device: str) -> tuple[nn.Module, list, torch.Tensor, torch.Tensor]:
    if name in ("digits", "cifar"):
        s = make_setting(name, device=device)
        return s.model, s.batches, s.x[:512], s.y[:512]
    model_name, n = STUDY_MODELS[name]
    torch.manual_seed(0)
    model = build_model(model_name, 10, 3, 32).to(device).eval()
    x = torch.randn(n, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    return model, [(x, y)], x, y


def compare(name: str, device: str, repeats: int) -> None:
    """Print one case's weight- and input-product times under every cutoff."""
    model, batches, x, y = _case(name, device)
    rows = torch.arange(len(x))

    weight_ops, input_ops = {}, {}
    for cut, value in CUTOFFS.items():  # graphs are kept at the first product: under value
        leangraph.MIN_ELEMENTS = leangraph.MIN_ELEMENTS_GPU = value
        weight_ops[cut] = WeightHessian(model, CE, batches, cache_bytes=CACHE_BYTES)
        input_ops[cut] = InputHessian(model, CE, x, y)
        v = torch.randn(weight_ops[cut].size, device=device)
        iv = torch.randn(len(x), input_ops[cut].size, device=device)
        weight_ops[cut].matvec(v)
        input_ops[cut].matvec(iv, rows)
        assert len(weight_ops[cut]._graphs) == len(weight_ops[cut].chunks), "graphs not kept"
    times = {(kind, cut): [] for kind in ("weight", "input") for cut in CUTOFFS}
    for _ in range(repeats):
        for cut in CUTOFFS:
            for kind, product in (
                ("weight", lambda: weight_ops[cut].matvec(v)),  # noqa: B023 (called at once)
                ("input", lambda: input_ops[cut].matvec(iv, rows)),  # noqa: B023
            ):
                run = timed(product, track_memory=False, cuda=device == "cuda")
                times[(kind, cut)].append(run.wall)
    ref = weight_ops["off"].matvec(v)
    gaps = {cut: float((op.matvec(v) - ref).norm() / ref.norm()) for cut, op in weight_ops.items()}
    for kind in ("weight", "input"):
        cells = "  ".join(
            f"{cut} {statistics.median(times[(kind, cut)]) * 1e3:8.2f}/"
            f"{min(times[(kind, cut)]) * 1e3:8.2f}"
            for cut in CUTOFFS
        )
        print(f"{name:13s} {kind:6s} ms {cells}")
    cells = "  ".join(f"{cut} {gap:.1e}" for cut, gap in gaps.items() if cut != "off")
    print(f"{name:13s} weight product, relative difference from 'off': {cells}")


def main(argv: list[str]) -> None:
    device = argv[0] if argv else "cpu"
    repeats = int(argv[1]) if len(argv) > 1 else 5
    cases = argv[2].split(",") if len(argv) > 2 else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if device == "cpu":
        torch.set_num_threads(1)
    saved = leangraph.MIN_ELEMENTS, leangraph.MIN_ELEMENTS_GPU
    try:
        for name in cases:
            compare(name, device, repeats)
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        leangraph.MIN_ELEMENTS, leangraph.MIN_ELEMENTS_GPU = saved


if __name__ == "__main__":
    main(sys.argv[1:])
