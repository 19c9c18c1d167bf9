"""One adapter per library, each called the way its own documentation shows.

Every adapter exposes ``hvp(v)`` (one exact Hessian-vector product over all the data),
``top(k, ...)`` (the k largest eigenvalues, sorted descending, as float64 numpy) and
``trace(...)``; a shared ``Counter`` counts each library's Hessian-vector products and
stops a run that passes its time cap. Operators are built once, outside the timed calls;
ours drops its kept gradient graphs before every timed solve, so building them is timed too.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.hessian_setups import Setting
from benchmarks.measure import Counter

CE = nn.CrossEntropyLoss()
OUR_TOL = 1e-4  # Lanczos stopping rule: every wanted eigenvalue's estimated rel. error <= 1e-4
EIGSH_TOL = 1e-4  # ARPACK: residual of each Ritz pair <= 1e-4 * |theta_i|


class Ours:
    key = "ours"
    label = "hessweep"

    def __init__(self, s: Setting, counter: Counter) -> None:
        from analysis.hessian import WeightHessian

        self.op = WeightHessian(s.model, CE, s.batches)
        self.op.matvec = counter.wrap(self.op.matvec)
        self.krylov: dict[int, int] = {}
        self.found: dict[int, Any] = {}  # k -> the EigenResult of top(k)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(v)

    def top(self, k: int) -> tuple[np.ndarray, dict[str, Any]]:
        from analysis.hessian import lanczos

        self.op.release()
        res = lanczos(self.op, k=k, tol=OUR_TOL, seed=0, criterion="eigenvalue")
        self.krylov[k] = res.n_iterations
        self.found[k] = res
        return res.eigenvalues.cpu().numpy(), {"converged": res.converged}

    def trace(self, probes: int) -> tuple[float, dict[str, Any]]:
        from analysis.hessian import hutchinson_trace

        self.op.release()
        with warnings.catch_warnings():  # a fixed budget may end above its 1% stderr goal
            warnings.simplefilter("ignore")
            res = hutchinson_trace(self.op, min_probes=probes, max_probes=probes, seed=0)
        return res.estimate, {"converged": res.converged, "stderr": res.stderr}

    def trace_deflated(self, probes: int, k: int) -> tuple[float, dict[str, Any]]:
        """The same probes with the top-k of ``top(k)`` taken exactly (not re-timed here)."""
        from analysis.hessian import hutchinson_trace

        self.op.release()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = hutchinson_trace(
                self.op, min_probes=probes, max_probes=probes, seed=0, deflate=self.found[k]
            )
        return res.estimate, {"converged": res.converged, "stderr": res.stderr}


class PyHessian:
    key = "pyhessian"
    label = "PyHessian 0.1"

    def __init__(self, s: Setting, counter: Counter) -> None:
        from pyhessian import hessian

        self.params = [p for p in s.model.parameters() if p.requires_grad]
        self.h = hessian(s.model, CE, dataloader=s.batches, cuda=s.device.type == "cuda")
        self.h.dataloader_hv_product = counter.wrap(self.h.dataloader_hv_product)

    def hvp(self, v: torch.Tensor) -> Any:
        parts = [
            c.view_as(p)
            for c, p in zip(v.split([p.numel() for p in self.params]), self.params, strict=True)
        ]
        return self.h.dataloader_hv_product(parts)[1]  # it returns (v.Hv, Hv)

    def top(self, k: int) -> tuple[np.ndarray, dict[str, Any]]:
        torch.manual_seed(0)  # PyHessian draws its start vectors from the global RNG
        vals, _ = self.h.eigenvalues(top_n=k)  # defaults: maxIter=100, tol=1e-3
        return np.sort(np.array(vals, dtype=np.float64))[::-1].copy(), {}

    def trace(self, probes: int) -> tuple[float, dict[str, Any]]:
        torch.manual_seed(0)
        samples = self.h.trace(maxIter=probes)  # its own rule: tol=1e-3 on the running mean
        return float(np.mean(samples)), {"probes": len(samples)}


class Eigenthings:
    key = "eigenthings"
    label = "hessian-eigenthings 1.0.0a5"

    def __init__(self, s: Setting, counter: Counter) -> None:
        from hessian_eigenthings import HessianOperator, supervised_loss

        self.op = HessianOperator(s.model, s.batches, supervised_loss(CE))
        self.op.matvec = counter.wrap(self.op.matvec)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(v)

    def top(self, k: int, max_iter: int) -> tuple[np.ndarray, dict[str, Any]]:
        from hessian_eigenthings import lanczos

        res = lanczos(self.op, k=k, max_iter=max_iter, which="LA", reorthogonalize=True, seed=0)
        vals = res.eigenvalues.double().cpu().numpy()
        return np.sort(vals)[::-1].copy(), {"converged": bool(res.converged.all())}

    def trace(self, probes: int) -> tuple[float, dict[str, Any]]:
        from hessian_eigenthings import trace

        res = trace(self.op, num_matvecs=probes, seed=0)  # its default method: Hutch++
        return res.estimate, {"stderr": res.stderr}


class Curvlinops:
    key = "curvlinops"
    label = "curvlinops 3.0.1"

    def __init__(self, s: Setting, counter: Counter) -> None:
        from curvlinops import HessianLinearOperator

        params = [p for p in s.model.parameters() if p.requires_grad]
        # The determinism probe is off (as ours is by default): it costs extra passes.
        self.H = HessianLinearOperator(s.model, CE, params, s.batches, check_deterministic=False)
        self.counter = counter

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        return self.counter.wrap(self.H.__matmul__)(v)

    def top(self, k: int) -> tuple[np.ndarray, dict[str, Any]]:
        from scipy.sparse.linalg import LinearOperator, eigsh

        hs = self.H.to_scipy()
        a = LinearOperator(hs.shape, matvec=self.counter.wrap(hs.matvec), dtype=hs.dtype)
        v0 = np.random.default_rng(0).standard_normal(hs.shape[0])
        vals = eigsh(a, k=k, which="LA", tol=EIGSH_TOL, v0=v0, return_eigenvectors=False)
        return np.sort(vals.astype(np.float64))[::-1].copy(), {}

    def trace(self, probes: int, chunk: int = 10) -> tuple[float, dict[str, Any]]:
        from curvlinops import hutchinson_trace

        torch.manual_seed(0)  # curvlinops draws probes from the global RNG
        total, done = 0.0, 0
        while done < probes:  # chunks of columns bound the memory of A @ G
            m = min(chunk, probes - done)
            self.counter.calls += m
            total += float(hutchinson_trace(self.H, num_matvecs=m)) * m
            done += m
        return total / probes, {"probes": probes}


PEERS = (Ours, PyHessian, Eigenthings, Curvlinops)


def build(s: Setting) -> dict[str, tuple[Any, Counter]]:
    """Every adapter with its own counter, keyed by ``key``."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls in PEERS:
            c = Counter()
            out[cls.key] = (cls(s, c), c)
    return out


def gradient(s: Setting) -> list[torch.Tensor]:
    """The baseline: one plain autograd gradient of the mean loss over the same data."""
    params = [p for p in s.model.parameters() if p.requires_grad]
    total = None
    n = sum(len(x) for x, _ in s.batches)
    for x, y in s.batches:
        g = torch.autograd.grad(CE(s.model(x), y) * (len(x) / n), params)
        total = list(g) if total is None else [a + b for a, b in zip(total, g, strict=True)]
    return total
