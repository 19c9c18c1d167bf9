"""Training on a CUDA device (skipped without a GPU): curvature and checkpoints carry over."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainables import fit, load_trained
from trainables.train import CURVATURE_KEY, curvature

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_RUN = {
    "dataset": "digits",
    "model": "m1",
    "batch_size": 32,
    "lr": 0.05,
    "max_epochs": 6,
    "hessian_every": 1,
    "device": "cuda",
    "eval_attack": {"method": "fgsm", "epsilon": 0.1},
}


def test_gpu_run_reports_the_curvature_of_its_weights_and_reloads_on_cpu(tmp_path: Path):
    result = fit(GPU_RUN, checkpoint_dir=tmp_path)
    assert result.device.type == "cuda"
    assert next(result.model.parameters()).is_cuda
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    reported = result.history[-1][CURVATURE_KEY]
    assert reported > 0 and result.history[-1]["test/acc"] > 0.5

    on_cpu = load_trained(tmp_path, device="cpu")
    for a, b in zip(result.model.parameters(), on_cpu.model.parameters(), strict=True):
        assert torch.equal(a.detach().cpu(), b.detach())
    x, y = on_cpu.train_data.tensors()
    cpu_value = curvature(on_cpu.model, x, y, seed=on_cpu.config.seed)
    assert cpu_value == pytest.approx(reported, rel=1e-3)
