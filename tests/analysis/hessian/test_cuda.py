"""The engine on a CUDA device agrees with the dense CPU reference (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from analysis.hessian import (
    WeightHessian,
    hutchinson_trace,
    input_hessian_eigenvalues,
    input_hessian_spectrum,
    lanczos,
    leangraph,
    slq_density,
)
from benchmarks.hessian_setups import cifar_cnn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CE = nn.CrossEntropyLoss()


def _on_cuda(model, x, y, dtype=torch.float64):
    return copy.deepcopy(model).to("cuda", dtype), x.to("cuda", dtype), y.cuda()


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_top_eigenvalues_on_cuda_match_the_dense_reference(cnn_problem, dtype, rtol):
    model, x, y, dense = cnn_problem
    ref = torch.linalg.eigvalsh(dense).flip(0)[:3]
    m, xc, yc = _on_cuda(model, x, y, dtype)
    op = WeightHessian(m, CE, [(xc[:10], yc[:10]), (xc[10:], yc[10:])])
    assert op.device.type == "cuda"
    res = lanczos(op, k=3, tol=1e-9, seed=0)
    assert res.converged
    assert torch.allclose(res.eigenvalues.double(), ref, rtol=rtol, atol=rtol * ref[0])


def test_kept_graphs_on_cuda_give_the_fresh_products(cnn_problem):
    model, x, y, dense = cnn_problem
    m, xc, yc = _on_cuda(model, x, y)
    kept = WeightHessian(m, CE, [(xc, yc)])
    fresh = WeightHessian(m, CE, [(xc, yc)], cache_bytes=0)
    v = torch.randn(kept.size, dtype=torch.float64, device="cuda")
    first, second = kept.matvec(v), kept.matvec(v)
    assert kept.cached_bytes > 0 and fresh.cached_bytes == 0
    expected = (dense @ v.cpu()).cuda()
    for out in (first, second, fresh.matvec(v)):
        assert torch.allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_trace_and_density_on_cuda_reproduce_the_cpu_run(cnn_problem):
    """Probes are drawn on the CPU, so a seed means the same run on either device."""
    model, x, y, dense = cnn_problem
    m, xc, yc = _on_cuda(model, x, y)
    gpu = WeightHessian(m, CE, [(xc, yc)])
    cpu = WeightHessian(model, CE, [(x, y)])
    tr_gpu = hutchinson_trace(gpu, rtol=5e-2, max_probes=400, seed=0)
    tr_cpu = hutchinson_trace(cpu, rtol=5e-2, max_probes=400, seed=0)
    assert tr_gpu.converged and tr_gpu.n_probes == tr_cpu.n_probes
    assert tr_gpu.estimate == pytest.approx(tr_cpu.estimate, rel=1e-9)
    assert abs(tr_gpu.estimate - float(dense.trace())) < 4 * tr_gpu.stderr
    d_gpu = slq_density(gpu, n_probes=3, steps=30, seed=0)
    d_cpu = slq_density(cpu, n_probes=3, steps=30, seed=0)
    assert torch.allclose(d_gpu.nodes.cpu(), d_cpu.nodes, rtol=1e-7, atol=1e-9)
    assert torch.allclose(d_gpu.weights.cpu(), d_cpu.weights, rtol=1e-6, atol=1e-9)
    area = torch.trapezoid(d_gpu.density.cpu(), d_gpu.grid.cpu())
    assert float(area) == pytest.approx(1.0, abs=1e-6)


def test_input_hessians_on_cuda_match_cpu(cnn_problem):
    model, x, y, _ = cnn_problem
    cpu = input_hessian_eigenvalues(model, CE, x, y, k=2, which="both", tol=1e-10)
    m, xc, yc = _on_cuda(model, x, y)
    gpu = input_hessian_eigenvalues(m, CE, xc, yc, k=2, which="both", tol=1e-10)
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-7, atol=1e-10)


def test_large_convolutions_on_cuda_keep_float32_accuracy():
    """cuDNN's TF32 kernels (on by default) made these products 1.3e-2 off on an H200."""
    torch.manual_seed(0)
    model = cifar_cnn().cuda()  # the benchmark's setting (b)
    x = torch.randn(2048, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (2048,), device="cuda")
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    op32 = WeightHessian(model, CE, [(x, y)])
    op64 = WeightHessian(model, CE, [(x, y)], dtype=torch.float64)
    v = torch.randn(op32.size, device="cuda")
    ref = op64.matvec(v.double())
    for out in (op32.matvec(v), op32.matvec(v)):  # building the kept graph, then through it
        assert float((out.double() - ref).norm() / ref.norm()) < 2e-3
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == flags


@pytest.mark.parametrize("lean", ["rewritten", "PyTorch's own"])
def test_the_jacobian_route_on_cuda_matches_the_cpu_and_lanczos(lean, monkeypatch):
    """cuDNN's own batch-norm and convolution nodes (below leangraph's GPU bar) qualify as
    on the CPU, and the float32 route on a large CNN stays within float32 reach of float64."""
    if lean == "PyTorch's own":
        monkeypatch.setattr(leangraph, "MIN_ELEMENTS_GPU", 2**62)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 16 * 16, 10),
    )  # fmt: skip
    model[1].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(300, 3, 32, 32), torch.randint(0, 10, (300,))
    cpu = input_hessian_spectrum(model, CE, x, y, k=2, which="both", method="jacobian",
                                 dtype=torch.float64)  # fmt: skip
    m, xc, yc = _on_cuda(model, x, y, torch.float32)
    gpu = input_hessian_spectrum(m, CE, xc, yc, k=2, which="both", method="auto")
    assert gpu.method == "jacobian"
    scale = float(cpu.eigenvalues.abs().max())
    assert float((gpu.eigenvalues - cpu.eigenvalues).abs().max()) < 1e-5 * scale
    lz = input_hessian_spectrum(m, CE, xc, yc, k=2, which="largest", tol=1e-8)
    assert torch.allclose(gpu.eigenvalues[:, :2], lz.eigenvalues, rtol=1e-4, atol=1e-6 * scale)
