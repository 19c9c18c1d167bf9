"""exact_float32: products run without TF32 and the caller's precision flags come back."""

from __future__ import annotations

import threading

import torch
from torch import nn

from analysis.hessian import WeightHessian
from analysis.hessian.modelutil import _tf32_switches, exact_float32


def _flags() -> list[object]:
    return [getattr(obj, name) for obj, name in _tf32_switches()]


def _exact(flags: list[object]) -> bool:
    return all(f in ("ieee", False) for f in flags)


def test_flags_are_exact_inside_and_restored_after_nesting():
    before = _flags()
    assert not _exact(before), "torch's defaults allow TF32 in cuDNN convolutions"
    with exact_float32():
        assert _exact(_flags())
        with exact_float32():
            assert _exact(_flags())
        assert _exact(_flags()), "the inner exit must not restore while the outer runs"
    assert _flags() == before


def test_overlapping_threads_restore_the_flags_once_both_leave():
    """This thread enters first and leaves first: a plain save/restore would switch TF32
    back on under the other thread, and leave it off once that one left."""
    before = _flags()
    entered, release = threading.Barrier(2), threading.Event()
    seen = []

    def worker() -> None:
        with exact_float32():
            entered.wait()
            release.wait()
            seen.append(_exact(_flags()))

    thread = threading.Thread(target=worker)
    with exact_float32():
        thread.start()
        entered.wait()
    release.set()
    thread.join()
    assert seen == [True] and _flags() == before


class _Recorder(nn.Module):
    """Identity layer that records the TF32 switches each forward pass ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[object]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_flags())
        return x


def test_hessian_products_run_without_tf32():
    recorder = _Recorder()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), recorder, nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    op = WeightHessian(model, nn.CrossEntropyLoss(), [(x, y)], cache_bytes=0)
    op.matvec(torch.randn(op.size))
    assert recorder.seen and all(_exact(flags) for flags in recorder.seen)
    assert not _exact(_flags())
