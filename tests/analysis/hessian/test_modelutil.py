"""exact_float32: products run without TF32, and the caller's precision flags come back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

from analysis.hessian import WeightHessian, input_hessian_eigenvalues
from analysis.hessian.modelutil import exact_float32


def _tf32_off() -> bool:
    """Both legacy switches read off (they are readable in torch's default state)."""
    return not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_tf32_is_off_inside_readable_and_restored_after_nesting():
    before = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    assert torch.backends.cudnn.allow_tf32, "torch's default allows TF32 in cuDNN convolutions"
    with exact_float32():
        assert _tf32_off()
        with torch.backends.cudnn.flags(enabled=True):  # reads the legacy flags
            pass
        with exact_float32():
            assert _tf32_off()
        assert _tf32_off(), "the inner exit must not restore while the outer runs"
    assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == before


def test_overlapping_threads_restore_the_flags_once_both_leave():
    """This thread enters first and leaves first: a plain save/restore would switch TF32
    back on under the other thread, and leave it off once that one left."""
    before = torch.backends.cudnn.allow_tf32
    entered, release = threading.Barrier(2), threading.Event()
    seen = []

    def worker() -> None:
        with exact_float32():
            entered.wait()
            release.wait()
            seen.append(_tf32_off())

    thread = threading.Thread(target=worker)
    with exact_float32():
        thread.start()
        entered.wait()
    release.set()
    thread.join()
    assert seen == [True] and torch.backends.cudnn.allow_tf32 == before


CALLER_SETUPS = {
    "legacy matmul TF32 on": "torch.backends.cuda.matmul.allow_tf32 = True",
    "legacy cuDNN TF32 off": "torch.backends.cudnn.allow_tf32 = False",
    "matmul precision medium": "torch.set_float32_matmul_precision('medium')",
    "per-op API matmul tf32": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "per-op API conv ieee": "torch.backends.cudnn.conv.fp32_precision = 'ieee'",
}

PROBE = """
import torch
from analysis.hessian.modelutil import _per_op_precision, exact_float32

def state():
    legacy = []
    for read in (lambda: torch.backends.cudnn.allow_tf32,
                 lambda: torch.backends.cuda.matmul.allow_tf32,
                 torch.get_float32_matmul_precision):
        try:
            legacy.append(read())
        except RuntimeError:
            legacy.append("raises")
    return [getattr(o, n) for o, n in _per_op_precision()], legacy

{setup}
before = state()
with exact_float32():
    per_op, legacy = state()
    off = all(v == "ieee" for v in per_op) or legacy[:2] == [False, False]
after = state()
assert off, (per_op, legacy)
assert after == before, (before, after)
print("ok")
"""


@pytest.mark.parametrize("setup", list(CALLER_SETUPS.values()), ids=list(CALLER_SETUPS))
def test_every_way_a_caller_set_tf32_is_switched_off_and_put_back(setup):
    """Each in a fresh interpreter: torch's flags remember how they were set."""
    code = textwrap.dedent(PROBE).replace("{setup}", setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


class _Recorder(nn.Module):
    """Identity layer that records whether TF32 was off in each forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_tf32_off())
        return x


@pytest.mark.parametrize("cache_bytes", [0, None], ids=["afresh", "kept graph"])
def test_weight_hessian_products_run_without_tf32(cache_bytes):
    recorder = _Recorder()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), recorder, nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    op = WeightHessian(model, nn.CrossEntropyLoss(), [(x, y)], cache_bytes=cache_bytes)
    op.matvec(torch.randn(op.size))
    op.loss_and_gradient()
    assert recorder.seen and all(recorder.seen)
    assert not _tf32_off()


def test_input_hessians_run_without_tf32():
    recorder = _Recorder()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), recorder, nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    input_hessian_eigenvalues(model, nn.CrossEntropyLoss(), x, y, k=1)
    assert recorder.seen and all(recorder.seen)
    assert not _tf32_off()
