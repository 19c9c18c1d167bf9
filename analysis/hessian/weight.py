"""The exact Hessian of the mean training loss w.r.t. the weights, as a matrix-free operator."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from analysis.hessian.graphcache import (
    NotTwiceDifferentiableError,
    backward_through,
    check_twice_differentiable,
    counting_saved_bytes,
    default_cache_bytes,
)
from analysis.hessian.leangraph import lean_graph, math_attention
from analysis.hessian.modelutil import (
    LossFn,
    cast_batch,
    eval_mode,
    exact_float32,
    mean_loss,
    select_params,
    summed_terms,
    weight_total,
    working_model,
)

HVP_MODES = ("auto", "forward", "reverse")
DEFAULT_CHUNK_ELEMENTS = 2**23
# On CPUs, products over a few hundred samples at a time stay in cache: 512-sample chunks
# measured 5-20% faster than one chunk of 2,000 (CNNs on digits and CIFAR-shaped data).
DEFAULT_CPU_CHUNK_SAMPLES = 512


class NonDeterminismError(RuntimeError):
    """Two passes over the same data and weights gave different losses or gradients."""


def _is_pair(data: Any) -> bool:
    """Whether ``data`` is one ``(x, y)`` batch rather than an iterable of batches: a batch is
    a pair, never a tensor, so a pair of tensors cannot be two batches."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    )


class WeightHessian:
    """Exact Hessian of the mean loss over *every* sample of ``data`` w.r.t. the weights.

    ``data`` is a DataLoader or any iterable of ``(x, y)`` batches (a bare ``(x, y)`` pair of
    tensors is one batch); batches of unequal size are weighted by ``n_batch / N``. The
    model runs in eval mode (its modes are restored), and neither the model nor caller
    tensors are changed; the operator is the Hessian at the weights as they were when it
    was built. With ``cache_data`` (default) the data is
    read once, kept on the operator's device and re-chunked into ``chunk_size`` samples.

    Products: the first ``matvec`` keeps each chunk's gradient graph (one gradient with
    ``create_graph=True``), so every product after it is a single backward pass through
    that graph: 1.3-2.2x cheaper than recomputing. Graphs are kept while their saved
    tensors fit ``cache_bytes`` (default: a quarter of RAM up to 8 GiB, or 40% of free GPU
    memory; 0 turns caching off); chunks beyond it are differentiated afresh each time, by
    reverse-over-forward (``torch.func``) with a double-backward fallback. ``hvp="forward"``
    never caches; ``hvp="reverse"`` uses double backward only. The double-backward paths
    (kept graphs, and ``"reverse"``) record their graphs with ``lean_graph``: convolutions
    of the data or with weights outside ``params``, ReLU, max-pooling and eval-mode
    BatchNorm get second derivatives without the unused or zero terms PyTorch's would
    compute.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[tuple[torch.Tensor, torch.Tensor]],
        params: Iterable[torch.Tensor] | dict[str, torch.Tensor] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
        cache_data: bool = True,
        hvp: str = "auto",
        cache_bytes: int | None = None,
        check_determinism: bool = False,
    ) -> None:
        if hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if cache_bytes is not None and cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0 (0 turns caching off), got {cache_bytes}")
        if isinstance(data, Iterator) and (not cache_data or check_determinism):
            raise ValueError(
                f"data is a one-shot iterator ({type(data).__name__}), but "
                f"{'cache_data=False' if not cache_data else 'check_determinism=True'} reads "
                "it again: pass a list of batches or a DataLoader, which can be read twice"
            )
        self.names = select_params(model, params)
        self.model = working_model(model, dtype, device)
        self.loss_fn = loss_fn
        self.data = [data] if _is_pair(data) else data
        self.hvp_mode = hvp
        named = dict(self.model.named_parameters())
        self.theta = {n: named[n].detach().clone() for n in self.names}
        self.fixed = {n: p.detach().clone() for n, p in named.items() if n not in self.theta}
        self.fixed.update({n: b.detach().clone() for n, b in self.model.named_buffers()})
        self.shapes = [self.theta[n].shape for n in self.names]
        self.numels = [self.theta[n].numel() for n in self.names]
        self.size = sum(self.numels)
        self.dtype = self.theta[self.names[0]].dtype
        self.device = self.theta[self.names[0]].device
        self.cache_data = cache_data
        self.chunks = self._read_data(chunk_size)
        self.num_samples = sum(int(x.shape[0]) for x, _ in self.chunks)
        # a class-weighted mean (or one with ignored targets) over all the data divides by
        # the data's total weight: each chunk then adds its summed terms over that total
        self.weight_total = weight_total(loss_fn, (y for _, y in self.chunks))
        if not cache_data:
            self.chunks = []
        self.cache_bytes = default_cache_bytes(self.device) if cache_bytes is None else cache_bytes
        self._default_budget = cache_bytes is None
        self.cached_bytes = 0
        self._graphs: list[tuple[torch.Tensor, ...]] | None = None
        self._leaves: list[torch.Tensor] = []
        # whether a product has gone through the kept graphs (the first one may find a
        # layer without a double backward and give them up)
        self._proven = False
        if check_determinism:
            self.check_determinism()

    def _read_data(self, chunk_size: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Read every batch once; validate it; concatenate and re-chunk when shapes allow."""
        batches = []
        for i, batch in enumerate(self.data):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(
                    f"data batch {i} is not an (x, y) pair: got {type(batch).__name__}"
                )
            x, y = batch[0], batch[1]
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise ValueError(
                    f"data batch {i} is not a pair of tensors (x {type(x).__name__}, y "
                    f"{type(y).__name__}): a Dataset's samples are not batches; wrap it in a "
                    "DataLoader"
                )
            if x.dim() == 0 or y.dim() == 0:
                raise ValueError(
                    f"data batch {i} holds a single sample without a batch dimension (x "
                    f"{tuple(x.shape)}, y {tuple(y.shape)}): give batches of shape (n, ...), "
                    "e.g. wrap a Dataset in a DataLoader"
                )
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"data batch {i}: x has {x.shape[0]} samples but y has {y.shape[0]}"
                )
            if x.shape[0] == 0:
                continue
            batches.append(cast_batch(x, y, self.dtype, self.device))
        if not batches:
            raise ValueError(
                "data is empty: the Hessian of the mean loss needs at least one sample"
            )
        same = all(
            x.shape[1:] == batches[0][0].shape[1:] and y.shape[1:] == batches[0][1].shape[1:]
            for x, y in batches
        )
        if not same:
            return batches
        # One batch is chunked as views (a Ray actor's shard is not copied a second time).
        xs = batches[0][0] if len(batches) == 1 else torch.cat([x for x, _ in batches])
        ys = batches[0][1] if len(batches) == 1 else torch.cat([y for _, y in batches])
        per_sample = max(1, xs[0].numel())
        step = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // per_sample)
        if chunk_size is None and self.device.type == "cpu":
            step = min(step, DEFAULT_CPU_CHUNK_SAMPLES)
        return list(zip(xs.split(step), ys.split(step), strict=True))

    def _batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if self.cache_data:
            return self.chunks
        return self._fresh_pass()

    def _fresh_pass(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``data`` read again, checked to hold the samples counted at first."""
        seen = 0
        for b in self.data:
            seen += int(b[0].shape[0])
            yield cast_batch(b[0], b[1], self.dtype, self.device)
        if seen != self.num_samples:
            raise ValueError(
                f"data gave {seen} samples on this pass but {self.num_samples} when the "
                "operator was built: the Hessian needs the same data on every pass (a fixed "
                "dataset; no sampler or drop_last that changes the count), or cache_data=True"
            )

    def _loss(
        self, theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(self.model, {**self.fixed, **theta}, (x,))
        if self.weight_total is not None:
            return summed_terms(self.loss_fn, out, y) / self.weight_total
        return mean_loss(self.loss_fn, out, y) * (x.shape[0] / self.num_samples)

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into per-parameter views keyed by name."""
        if v.dim() != 1 or v.shape[0] != self.size:
            raise ValueError(
                f"expected a flat vector of shape ({self.size},), got {tuple(v.shape)}"
            )
        v = v.to(device=self.device, dtype=self.dtype)
        parts = v.split(self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector, in parameter order."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Exact Hessian-vector product ``H v`` of the mean loss over all the data."""
        tangent = self.unflatten(v)
        with eval_mode(self.model), exact_float32():
            if self._graphs is None:
                self._graphs = self._build_graphs()
            total = self._hvp_cached(tangent) if self._proven else self._first_cached(tangent)
            if self._all_kept():
                return total
            rest = self._hvp_uncached(tangent)
        return rest if total is None else total.add_(rest)

    def _first_cached(self, tangent: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The first product through freshly kept graphs. An operation whose double backward
        PyTorch lacks fails only here, when its node runs: in auto mode the graphs are then
        given up for the uncached paths (forward mode may still work)."""
        if not self._graphs:
            return None
        try:
            total = self._hvp_cached(tangent)
            self._proven = True
            return total
        except (RuntimeError, NotImplementedError) as err:
            if self.hvp_mode == "reverse" or _out_of_memory(err):
                raise
            self._graphs, self._leaves, self.cached_bytes = [], [], 0  # given up for good
            _slower(f"no gradient graph can be kept ({type(err).__name__}: {err})", self.hvp_mode)
            return None

    def release(self) -> None:
        """Free the kept gradient graphs (the next product builds them again)."""
        self._graphs, self._leaves, self.cached_bytes, self._proven = None, [], 0, False

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the mean loss at the operator's weights.

        Free where the gradient graphs are kept: their gradients are this one, chunk by
        chunk (this call keeps them when the first product has not yet), and chunks without
        a kept graph cost a gradient each. As a Lanczos start it saves products but can hide
        the top eigenvector (see ``lanczos``'s ``start``).
        """
        with eval_mode(self.model), exact_float32():
            if self._graphs is None:
                self._graphs = self._build_graphs()
            total = None
            for grads in self._graphs:
                flat = torch.cat([g.detach().reshape(-1) for g in grads])
                total = flat if total is None else total.add_(flat)
            if self._all_kept():
                return total
            _, rest = self.loss_and_gradient(self._uncached_batches())
        return rest if total is None else total.add_(rest)

    def _all_kept(self) -> bool:
        """Whether every chunk's gradient graph is kept (nothing to differentiate afresh)."""
        return self.cache_data and len(self._graphs) == len(self.chunks)

    def _build_graphs(self) -> list[tuple[torch.Tensor, ...]]:
        """Each chunk's gradient graph, in order, while their saved tensors fit the budget.

        Chunks without a kept graph (a layer without a second derivative, no memory, or a
        budget too small) are differentiated afresh in every product, and a RuntimeWarning
        says why: the products stay exact but cost 1.3-2.2x more. Other errors are raised.
        """
        if self.hvp_mode == "forward" or not self.cache_data or self.cache_bytes == 0:
            return []
        leaves = [self.theta[n].detach().requires_grad_(True) for n in self.names]
        theta = dict(zip(self.names, leaves, strict=True))
        graphs, used, sizes = [], 0, []
        for x, y in self.chunks:
            try:
                with torch.enable_grad(), counting_saved_bytes() as saved, lean_graph():
                    loss = self._loss(theta, x, y)
                    grads = torch.autograd.grad(loss, leaves, create_graph=True)
                check_twice_differentiable(grads, loss)
            except (RuntimeError, NotImplementedError) as err:
                oom = _out_of_memory(err)
                missing = isinstance(err, NotTwiceDifferentiableError | NotImplementedError)
                if not oom and (self.hvp_mode == "reverse" or not missing):
                    raise  # a mistake in the model, the loss or the data: say it as it is
                if oom and graphs:
                    # the graphs that fit stay, less the last: a chunk differentiated afresh
                    # needs room too
                    graphs.pop()
                    used -= sizes.pop()
                    _slower(
                        f"{len(graphs)} of {len(self.chunks)} chunks' gradient graphs are kept "
                        f"(out of memory for more: {err})",
                        self.hvp_mode,
                    )
                    break
                if oom and self.hvp_mode == "reverse":
                    raise  # double backward afresh would build the same graph
                _slower(
                    f"no gradient graph can be kept ({type(err).__name__}: {err})", self.hvp_mode
                )
                return []
            if used + saved[0] > self.cache_bytes:
                if not graphs and self._default_budget:
                    _slower(
                        f"the first chunk's gradient graph needs {_size(saved[0])}, more "
                        f"than the cache budget of {_size(self.cache_bytes)} (pass a smaller "
                        "chunk_size, or cache_bytes)",
                        self.hvp_mode,
                    )
                break
            graphs.append(grads)
            sizes.append(saved[0])
            used += saved[0]
        self._leaves, self.cached_bytes = leaves, used
        return graphs

    def _hvp_cached(self, tangent: dict[str, torch.Tensor]) -> torch.Tensor:
        vectors = [tangent[n] for n in self.names]
        total = None
        for grads in self._graphs or []:
            parts = backward_through(grads, self._leaves, vectors)
            flat = torch.cat([h.reshape(-1) for h in parts])
            total = flat if total is None else total.add_(flat)
        return total

    def _uncached_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if self.cache_data:
            return self.chunks[len(self._graphs or []) :]
        return self._batches()

    def _hvp_uncached(self, tangent: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.hvp_mode in ("auto", "forward"):
            try:
                return self._hvp_forward(tangent, self._uncached_batches())
            except (RuntimeError, NotImplementedError) as err:
                if self.hvp_mode == "forward" or _out_of_memory(err):
                    raise  # out of memory says nothing about forward mode's support
                self.hvp_mode = "reverse"
        return self._hvp_reverse(tangent, self._uncached_batches())

    def _hvp_forward(
        self, tangent: dict[str, torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        # Reverse-over-forward: H v is the gradient of the directional derivative
        # <grad L, v>, which forward mode gives in the same pass as L. It never forms the
        # (unused) primal gradient that forward-over-reverse and double backward compute:
        # 8 instead of 9 matrix products per hidden layer. On CPU (one thread) it measured
        # 1.2x faster than forward-over-reverse and double backward on a 550k-parameter CNN;
        # on a 14k-parameter digits CNN double backward was about 5% faster.
        total = None
        for x, y in batches:

            def directional(th: dict[str, torch.Tensor], x=x, y=y) -> torch.Tensor:
                return jvp(lambda t: self._loss(t, x, y), (th,), (tangent,))[1]

            with math_attention():
                flat = self.flatten(grad(directional)(self.theta))
            total = flat if total is None else total.add_(flat)
        return total

    def _hvp_reverse(
        self, tangent: dict[str, torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        total = None
        for x, y in batches:
            theta = {n: t.clone().requires_grad_(True) for n, t in self.theta.items()}
            with lean_graph():
                loss = self._loss(theta, x, y)
                grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            check_twice_differentiable(grads, loss)
            dot = sum((g * tangent[n]).sum() for g, n in zip(grads, self.names, strict=True))
            hv = torch.autograd.grad(dot, list(theta.values()))
            flat = torch.cat([h.reshape(-1) for h in hv])
            total = flat if total is None else total.add_(flat)
        return total

    def loss_and_gradient(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> tuple[float, torch.Tensor]:
        """Mean loss and its flat gradient over all the data (eval mode)."""
        total_loss, total_grad = 0.0, None
        with eval_mode(self.model), exact_float32():
            for x, y in self._batches() if batches is None else batches:
                theta = {n: t.clone().requires_grad_(True) for n, t in self.theta.items()}
                loss = self._loss(theta, x, y)
                g = torch.autograd.grad(loss, list(theta.values()))
                flat = torch.cat([t.reshape(-1) for t in g])
                total_grad = flat if total_grad is None else total_grad.add_(flat)
                total_loss += float(loss.detach())
        return total_loss, total_grad

    def check_determinism(self) -> None:
        """Read ``data`` twice afresh and compare loss and gradient; raise if they differ.

        Catches random augmentation, dropout that ignores eval mode, and batches that
        change between passes: all of which make "the" Hessian ill-defined. A mere change
        of order (a shuffling loader) leaves the mean loss unchanged and passes.
        """
        low_precision = self.dtype in (torch.float32, torch.float16, torch.bfloat16)
        rtol = 1e-4 if low_precision else 1e-9
        passes = []
        for _ in range(2):
            passes.append(self.loss_and_gradient(self._fresh_pass()))
        (l1, g1), (l2, g2) = passes
        gdiff = float((g1 - g2).norm() / g1.norm().clamp_min(1e-30))
        ldiff = abs(l1 - l2) / max(abs(l1), 1e-30)
        if ldiff > rtol or gdiff > rtol:
            raise NonDeterminismError(
                f"two passes over the data gave different results (loss {l1:.6g} vs {l2:.6g}, "
                f"gradient relative difference {gdiff:.2e}, allowed {rtol:g}). The Hessian is "
                "only defined for fixed data and a deterministic model: turn off random "
                "augmentation, use layers that respect eval(), or pass a fixed dataset."
            )


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA's, or the CPU allocator's)."""
    return isinstance(err, torch.OutOfMemoryError) or "not enough memory" in str(err)


def _slower(why: str, mode: str) -> None:
    how = (
        "double backward"
        if mode == "reverse"
        else ("reverse-over-forward (torch.func, or double backward where it cannot)")
    )
    warnings.warn(
        f"WeightHessian: {why}; the chunks without a kept graph are differentiated afresh "
        f"in every product by {how}: exact, but 1.3-2.2x slower",
        RuntimeWarning,
        stacklevel=4,
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"
