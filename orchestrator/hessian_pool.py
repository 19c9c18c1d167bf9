"""Exact Hessian products over a training set sharded across restartable Ray actors.

Each actor holds one contiguous shard of the training data (put in the object store once)
and answers weighted partial Hessian-vector products, so ``analysis.hessian``'s solvers run
unchanged on the whole data set spread over processes, nodes or GPUs. Every actor call
names the model (by id) and how to rebuild its operator, so a call retried on a restarted
actor reloads what it needs from the object store and gives the same answer.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import ray
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from analysis.hessian import BatchedEigenResult, WeightHessian, input_hessian_spectrum
from analysis.hessian.graphcache import default_cache_bytes
from analysis.hessian.modelutil import LossFn
from analysis.hessian.results import concat_batched

CACHE_SIZE = 8
KEEP_GRAPHS = 2  # operators per actor that keep their gradient graphs (phase.max_parallel)


@dataclass(frozen=True)
class ModelHandle:
    """A model put in the object store once; actors cache it under ``model_id``."""

    model_id: str
    ref: ray.ObjectRef


@dataclass(frozen=True)
class OperatorRecipe:
    """Everything an actor needs to (re)build its shard's weight-Hessian operator."""

    op_key: str
    model: ModelHandle
    loss_fn: LossFn
    dtype: torch.dtype | None


def as_tensors(dataset: Dataset | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The whole data set as ``(x, y)`` tensors, in order (no shuffling, no augmentation)."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        x, y = dataset
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
            return x, y
    tensors = getattr(dataset, "tensors", None)
    if callable(tensors):
        tensors = tensors()
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        return tensors[0], tensors[1]
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"dataset must be a torch Dataset or an (x, y) pair of tensors, got "
            f"{type(dataset).__name__}"
        )
    batches = list(DataLoader(dataset, batch_size=1024, shuffle=False))
    if not batches:
        raise ValueError("dataset is empty: the Hessian of the mean loss needs samples")
    return torch.cat([b[0] for b in batches]), torch.cat([torch.as_tensor(b[1]) for b in batches])


def _assigned_device() -> torch.device:
    """The actor's GPU when Ray assigned it one, else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")


def _cpu_model(model: nn.Module) -> nn.Module:
    """The model itself when it lives on the CPU, else a CPU copy (the caller's is unchanged)."""
    if all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()]):
        return model
    return copy.deepcopy(model).cpu()


def without_grad(model: nn.Module) -> nn.Module:
    """A copy whose parameters do not require grad, so input-Hessian products build no
    autograd graph through the weights (the solver keeps every product it gets)."""
    return copy.deepcopy(model).requires_grad_(False)


@ray.remote(max_restarts=3, max_task_retries=3)
class ShardActor:
    """One shard of the training set and the Hessian operators of models on it.

    State (models, operators, cast data) is a cache: any call can rebuild what it needs
    from its arguments, which makes every method idempotent and safe to retry.
    """

    def __init__(
        self,
        num_samples: int,
        total: int,
        chunk_size: int | None,
        num_threads: int,
    ) -> None:
        # No object reference among the constructor's arguments: Ray cannot restart an
        # actor whose creation arguments were evicted (and warns about it at every start).
        # The shard comes with each call that needs it and is fetched once.
        torch.set_num_threads(num_threads)
        self.device = _assigned_device()
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.num_samples = num_samples
        self.scale = num_samples / total
        self.chunk_size = chunk_size
        self.models: OrderedDict[str, nn.Module] = OrderedDict()
        self.operators: OrderedDict[str, tuple[str, WeightHessian]] = OrderedDict()
        self.data: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _model(self, handle: ModelHandle) -> nn.Module:
        if handle.model_id not in self.models:
            self.models[handle.model_id] = ray.get(handle.ref).to(self.device)
            while len(self.models) > CACHE_SIZE:
                self.models.popitem(last=False)
        self.models.move_to_end(handle.model_id)
        return self.models[handle.model_id]

    def _load(self, shard: list[ray.ObjectRef]) -> None:
        """Fetch this actor's samples once (again after a restart); ``[ref]`` is not resolved
        by Ray, so calls that find them loaded transfer nothing."""
        if self.x is None:
            self.x, self.y = ray.get(shard[0])

    def _shard(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This actor's samples on its device in ``dtype`` (operators chunk them as views)."""
        if dtype not in self.data:
            x = self.x.to(self.device)
            x = x.to(dtype) if x.is_floating_point() else x
            self.data[dtype] = (x, self.y.to(self.device))
        return self.data[dtype]

    def _operator(self, recipe: OperatorRecipe) -> WeightHessian:
        if recipe.op_key not in self.operators:
            model = self._model(recipe.model)
            dtype = recipe.dtype or next(model.parameters()).dtype
            op = WeightHessian(
                model,
                recipe.loss_fn,
                [self._shard(dtype)],
                dtype=dtype,
                chunk_size=self.chunk_size,
                cache_bytes=default_cache_bytes(self.device) // KEEP_GRAPHS,
            )
            self.operators[recipe.op_key] = (recipe.model.model_id, op)
            while len(self.operators) > CACHE_SIZE:
                self.operators.popitem(last=False)
        self.operators.move_to_end(recipe.op_key)
        # Only the operators in use keep their gradient graphs (each within its share of
        # the memory budget): the Hessian phase analyses up to KEEP_GRAPHS models at once,
        # and dropping graphs at every switch between them made products 20% dearer.
        for _, other in list(self.operators.values())[:-KEEP_GRAPHS]:
            if other.cached_bytes:
                other.release()
        return self.operators[recipe.op_key][1]

    def prepare(
        self, recipe: OperatorRecipe, shard: list[ray.ObjectRef]
    ) -> tuple[int, torch.dtype, int, float, bool]:
        """Build the operator; return its size, dtype, this shard's sample count and, for a
        weighted-mean loss (class weights, ignored targets), the shard's total weight
        (else the count of its targets, which is that of a plain mean), and which it was."""
        self._load(shard)
        op = self._operator(recipe)
        weight = op.weight_total if op.weight_total is not None else float(self.y.numel())
        return op.size, op.dtype, self.num_samples, weight, op.weight_total is not None

    def matvec(
        self, recipe: OperatorRecipe, v: torch.Tensor, shard: list[ray.ObjectRef]
    ) -> torch.Tensor:
        """This shard's share ``(n_shard / N) * H_shard @ v`` as a CPU tensor."""
        self._load(shard)
        return (self.scale * self._operator(recipe).matvec(v)).cpu()

    def input_spectrum(
        self,
        handle: ModelHandle,
        loss_fn: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        options: dict[str, Any],
    ) -> BatchedEigenResult:
        """Per-sample input-Hessian eigenvalues of the given samples (CPU tensors)."""
        model = without_grad(self._model(handle))
        return input_hessian_spectrum(model, loss_fn, x, y, **options)  # CPU tensors already

    def info(self) -> dict[str, Any]:
        """What this actor holds and has used (pid, device, shard size, cache, CPU seconds)."""
        return {
            "pid": os.getpid(),
            "cpu_seconds": time.process_time(),
            "device": str(self.device),
            "num_samples": self.num_samples,
            "models": list(self.models),
            "operators": list(self.operators),
            "graphs": [k for k, (_, op) in self.operators.items() if op.cached_bytes],
        }

    def release(self, model_id: str | None = None, op_key: str | None = None) -> None:
        """Drop a cached operator, or a model and every operator built on it."""
        if op_key is not None:
            self.operators.pop(op_key, None)
        if model_id is not None:
            self.models.pop(model_id, None)
            for key in [k for k, (mid, _) in self.operators.items() if mid == model_id]:
                del self.operators[key]


class ShardedWeightHessian:
    """The exact mean-loss weight Hessian over every shard: ``sum_s (n_s / N) H_s``.

    Same interface as ``analysis.hessian.WeightHessian`` (``size``, ``dtype``, ``device``,
    ``matvec``), with vectors on the driver's CPU; each product sends ``v`` once to the
    object store and gathers one partial product per actor, summed in shard order.
    """

    def __init__(
        self,
        pool: HessianPool,
        recipe: OperatorRecipe,
        size: int,
        dtype: torch.dtype,
        num_samples: int,
        owns_model: bool,
        rescale: list[float] | None = None,
    ) -> None:
        self.pool = pool
        self.recipe = recipe
        self.size = size
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.num_samples = num_samples
        self.owns_model = owns_model
        self.rescale = rescale  # per shard, for a weighted-mean loss (see weight_hessian)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Exact Hessian-vector product ``H v`` of the mean loss over the whole data set."""
        if v.dim() != 1 or v.shape[0] != self.size:
            raise ValueError(
                f"expected a flat vector of shape ({self.size},), got {tuple(v.shape)}"
            )
        # A fresh copy: a view (solvers pass rows of their Krylov basis) would pickle
        # its whole storage into the object store.
        ref = ray.put(v.detach().to(device="cpu", dtype=self.dtype).clone())
        parts = ray.get(
            [
                a.matvec.remote(self.recipe, ref, [shard])
                for a, shard in zip(self.pool.actors, self.pool.shard_refs, strict=True)
            ]
        )
        if self.rescale is not None:
            parts = [part * factor for part, factor in zip(parts, self.rescale, strict=True)]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def close(self) -> None:
        """Free this operator (and its model, if the pool put it there) on every actor."""
        model_id = self.recipe.model.model_id if self.owns_model else None
        self.pool.broadcast_release(model_id=model_id, op_key=self.recipe.op_key)

    def __enter__(self) -> ShardedWeightHessian:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HessianPool:
    """Ray actors that each hold one contiguous shard of the training set.

    ``weight_hessian`` gives a distributed operator for any solver in ``analysis.hessian``;
    ``input_hessian`` splits per-sample input-Hessian eigenproblems across the actors.
    Calls for different models may run concurrently (e.g. from driver threads). Actors
    restart up to ``max_restarts`` times and retried calls give identical answers.
    """

    def __init__(
        self,
        dataset: Dataset | tuple[torch.Tensor, torch.Tensor],
        num_actors: int = 2,
        num_cpus: float = 1,
        num_gpus: float = 0.0,
        loss_fn: LossFn | None = None,
        max_restarts: int = 3,
        chunk_size: int | None = None,
    ) -> None:
        x, y = as_tensors(dataset)
        n = int(x.shape[0])
        if num_actors < 1 or num_actors > n:
            raise ValueError(f"num_actors must be between 1 and the {n} samples, got {num_actors}")
        if num_cpus < 0 or num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {num_cpus}, {num_gpus}")
        if max_restarts < -1:
            raise ValueError(f"max_restarts must be >= -1 (-1: unlimited), got {max_restarts}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.num_samples = n
        self.shard_sizes = [len(i) for i in torch.arange(n).tensor_split(num_actors)]
        bounds = [0, *itertools.accumulate(self.shard_sizes)]
        self.shard_refs = [
            ray.put((x[lo:hi].clone(), y[lo:hi].clone())) for lo, hi in itertools.pairwise(bounds)
        ]
        options = {
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "max_restarts": max_restarts,
            "max_task_retries": max_restarts,
        }
        threads = max(1, int(num_cpus))
        self.actors = [
            ShardActor.options(**options).remote(size, n, chunk_size, threads)
            for size in self.shard_sizes
        ]
        self._lock = threading.Lock()
        self._closed = False

    @property
    def num_actors(self) -> int:
        """How many shard actors the pool runs."""
        return len(self.actors)

    def put_model(self, model: nn.Module) -> ModelHandle:
        """Put a model in the object store once, for any number of later calls."""
        return ModelHandle(model_id=uuid.uuid4().hex, ref=ray.put(_cpu_model(model)))

    def release(self, handle: ModelHandle) -> None:
        """Forget a model (and its operators) on every actor."""
        self.broadcast_release(model_id=handle.model_id)

    def broadcast_release(self, model_id: str | None = None, op_key: str | None = None) -> None:
        """Ask every actor to drop a model and/or an operator; waits until they have."""
        with self._lock:
            if self._closed:
                return
            refs = [a.release.remote(model_id, op_key) for a in self.actors]
        ray.get(refs)

    def _handle(self, model: nn.Module | ModelHandle) -> tuple[ModelHandle, bool]:
        if isinstance(model, ModelHandle):
            return model, False
        return self.put_model(model), True

    def weight_hessian(
        self,
        model: nn.Module | ModelHandle,
        loss_fn: LossFn | None = None,
        dtype: torch.dtype | None = None,
    ) -> ShardedWeightHessian:
        """The exact weight Hessian of the mean loss over the whole (sharded) training set."""
        handle, owns = self._handle(model)
        recipe = OperatorRecipe(uuid.uuid4().hex, handle, loss_fn or self.loss_fn, dtype)
        infos = ray.get(
            [
                a.prepare.remote(recipe, [shard])
                for a, shard in zip(self.actors, self.shard_refs, strict=True)
            ]
        )
        size, op_dtype = infos[0][:2]
        if any(info[0] != size for info in infos):
            raise RuntimeError(f"actors disagree on the operator size: {[i[0] for i in infos]}")
        total = sum(info[2] for info in infos)
        rescale = None
        if any(info[4] for info in infos):
            # a weighted mean over all the data: shard s counts W_s / W, not n_s / N
            weight = sum(info[3] for info in infos)
            rescale = [(info[3] / weight) / (info[2] / total) for info in infos]
        return ShardedWeightHessian(self, recipe, size, op_dtype, total, owns, rescale)

    def input_hessian(
        self,
        model: nn.Module | ModelHandle,
        x: torch.Tensor,
        y: torch.Tensor,
        k: int = 1,
        which: str = "largest",
        tol: float = 1e-6,
        seed: int = 0,
        max_iter: int | None = None,
        batch_size: int | None = None,
        dtype: torch.dtype | None = None,
        loss_fn: LossFn | None = None,
        method: str = "lanczos",
    ) -> BatchedEigenResult:
        """Per-sample input-Hessian eigenvalues, the samples split across the actors.

        Samples are cut into blocks of ``batch_size`` (default: an equal share per actor)
        and whole blocks are dealt out in order, each seeded ``seed + start`` exactly as
        ``input_hessian_spectrum(..., batch_size=batch_size)`` does, so the rows equal a
        local run with the same ``batch_size``; ``method`` is that function's.
        """
        n = int(x.shape[0])
        if n == 0 or y.shape[0] != n:
            raise ValueError(f"need a non-empty x and a y of the same length; got {n}, {len(y)}")
        batch_size = batch_size or math.ceil(n / self.num_actors)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        handle, owns = self._handle(model)
        starts = torch.arange(0, n, batch_size)
        groups = [g for g in starts.tensor_split(min(self.num_actors, len(starts))) if len(g)]
        loss = loss_fn or self.loss_fn
        refs = []
        for actor, group in zip(self.actors, groups, strict=False):
            lo, hi = int(group[0]), min(int(group[-1]) + batch_size, n)
            options = {
                "k": k,
                "which": which,
                "tol": tol,
                "max_iter": max_iter,
                "seed": seed + lo,
                "batch_size": batch_size,
                "dtype": dtype,
                "method": method,
            }
            part = (x[lo:hi].clone(), y[lo:hi].clone())
            refs.append(actor.input_spectrum.remote(handle, loss, *part, options))
        try:
            results = ray.get(refs)
        finally:
            if owns:
                self.release(handle)
        return concat_batched(results)

    def close(self) -> None:
        """Stop every actor (no restart); the pool cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for actor in self.actors:
                ray.kill(actor, no_restart=True)

    def __enter__(self) -> HessianPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
