"""The sharded weight-Hessian operator and input-Hessian split equal the local engine."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from analysis.hessian import (
    WeightHessian,
    hutchinson_trace,
    input_hessian_spectrum,
    lanczos,
    slq_density,
)
from orchestrator.hessian_pool import HessianPool, as_tensors
from tests.analysis.hessian.reference import make_data, make_mlp

N = 50
TOL = 1e-10


def make_bn_mlp(seed: int = 2) -> nn.Module:
    """An MLP with eval-mode BatchNorm statistics and dropout (both must act as in eval)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)
    ).double()
    model[1].running_mean.copy_(torch.linspace(-0.2, 0.2, 8, dtype=torch.float64))
    model[1].running_var.copy_(torch.linspace(0.5, 1.5, 8, dtype=torch.float64))
    return model


@pytest.fixture(scope="module")
def data():
    return make_data(N, (6,))


@pytest.fixture(scope="module")
def pool(ray_session, data):
    with HessianPool(data, num_actors=3, num_cpus=0.5) as p:
        yield p


def local_op(model, data, dtype=None):
    return WeightHessian(model, nn.CrossEntropyLoss(), [data], dtype=dtype)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= tol * scale


def test_shards_are_contiguous_and_weighted_by_size(pool):
    assert pool.shard_sizes == [17, 17, 16]
    infos = ray.get([a.info.remote() for a in pool.actors])
    assert [i["num_samples"] for i in infos] == [17, 17, 16]
    assert all(i["device"] == "cpu" for i in infos)


@pytest.mark.parametrize("make_model", [make_mlp, make_bn_mlp])
def test_matvec_equals_local(pool, data, make_model):
    model = make_model()
    with pool.weight_hessian(model) as op:
        ref = local_op(model, data)
        assert (op.size, op.dtype, op.device) == (ref.size, torch.float64, torch.device("cpu"))
        assert op.num_samples == N
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            v = torch.randn(op.size, generator=gen, dtype=torch.float64)
            assert close(op.matvec(v), ref.matvec(v))
    assert model.training, "the caller's model mode must be left alone"


def test_a_class_weighted_loss_is_the_whole_datas_weighted_mean_across_shards(pool, data):
    model = make_mlp()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 5.0, 5.0]))  # float32 weights
    shard_weights = [
        float(weighted.weight[data[1][a:b]].sum()) for a, b in ((0, 17), (17, 34), (34, 50))
    ]
    assert max(shard_weights) / min(shard_weights) > 1.2  # shards weigh unlike their sizes
    with pool.weight_hessian(model, loss_fn=weighted) as op:
        ref = WeightHessian(model, weighted, [data])
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        assert close(op.matvec(v), ref.matvec(v))


def test_float32_model_analysed_in_float64(pool, data):
    model = make_mlp().float()
    with pool.weight_hessian(model, dtype=torch.float64) as op:
        ref = local_op(model, data, dtype=torch.float64)
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        assert op.dtype == torch.float64
        assert close(op.matvec(v), ref.matvec(v))
    assert next(model.parameters()).dtype == torch.float32


def test_solvers_on_sharded_equal_local(pool, data):
    model = make_mlp()
    ref = local_op(model, data)
    with pool.weight_hessian(model) as op:
        a, b = lanczos(op, k=3, tol=1e-8, seed=3), lanczos(ref, k=3, tol=1e-8, seed=3)
        assert a.converged and b.converged and a.n_matvecs == b.n_matvecs
        assert close(a.eigenvalues, b.eigenvalues)
        ta = hutchinson_trace(op, rtol=0.1, seed=4)
        tb = hutchinson_trace(ref, rtol=0.1, seed=4)
        assert ta.n_probes == tb.n_probes
        assert abs(ta.estimate - tb.estimate) <= TOL * max(1.0, abs(tb.estimate))
        da = slq_density(op, n_probes=2, steps=15, seed=5)
        db = slq_density(ref, n_probes=2, steps=15, seed=5)
        assert close(da.grid, db.grid)
        assert close(da.density, db.density, 1e-8)


def test_input_hessians_split_across_actors_equal_local(pool):
    model = make_mlp(seed=4)
    x, y = make_data(20, (6,), seed=9)
    loss = nn.CrossEntropyLoss()
    for batch_size in (None, 4):
        res = pool.input_hessian(model, x, y, k=1, which="both", seed=2, batch_size=batch_size)
        ref = input_hessian_spectrum(
            model, loss, x, y, k=1, which="both", seed=2, batch_size=batch_size or 7
        )
        assert res.eigenvalues.shape == (20, 2)
        assert close(res.eigenvalues, ref.eigenvalues, 1e-12)
        assert torch.equal(res.converged, ref.converged)
    infos = ray.get([a.info.remote() for a in pool.actors])
    assert all(not i["models"] for i in infos), "a model put by input_hessian is released"


def test_input_hessians_by_the_jacobian_on_the_pool_equal_local(pool):
    model = make_mlp(seed=4, act=nn.ReLU)
    x, y = make_data(20, (6,), seed=9)
    res = pool.input_hessian(model, x, y, k=1, which="both", batch_size=4, method="auto")
    ref = input_hessian_spectrum(model, nn.CrossEntropyLoss(), x, y, k=1, which="both")
    assert res.method == "jacobian" and ref.method == "lanczos"
    assert close(res.eigenvalues, ref.eigenvalues, 1e-9)
    assert bool(res.converged.all())


def test_two_models_concurrently_equal_sequentially(pool):
    models = [make_mlp(seed=5), make_bn_mlp(seed=6)]

    def top(model):
        with pool.weight_hessian(model) as op:
            return lanczos(op, k=2, tol=1e-8, seed=0).eigenvalues

    sequential = [top(m) for m in models]
    with ThreadPoolExecutor(max_workers=2) as ex:
        concurrent = list(ex.map(top, models))
    for a, b in zip(concurrent, sequential, strict=True):
        assert torch.equal(a, b)


def test_only_the_operators_in_use_keep_their_gradient_graphs(pool):
    models = [make_mlp(seed=s) for s in (7, 8, 9)]
    v = torch.randn(sum(p.numel() for p in models[0].parameters()), dtype=torch.float64)
    with (
        pool.weight_hessian(models[0]) as a,
        pool.weight_hessian(models[1]) as b,
        pool.weight_hessian(models[2]) as c,
    ):
        for op in (a, b, c):
            op.matvec(v)
        infos = ray.get([actor.info.remote() for actor in pool.actors])
    for info in infos:
        assert len(info["operators"]) == 3
        assert info["graphs"] == info["operators"][-2:]  # the two most recent ones


class KillingOperator:
    """Wraps an operator and kills one actor (Ray restarts it) on the n-th product."""

    def __init__(self, op, actor, at: int) -> None:
        self.op, self.actor, self.at, self.calls = op, actor, at, 0
        self.size, self.dtype, self.device = op.size, op.dtype, op.device

    def matvec(self, v):
        self.calls += 1
        if self.calls == self.at:
            ray.kill(self.actor, no_restart=False)
        return self.op.matvec(v)


def test_actor_killed_mid_lanczos_loses_nothing(pool):
    model = make_bn_mlp(seed=7)
    victim = pool.actors[1]
    pid_before = ray.get(victim.info.remote())["pid"]
    with pool.weight_hessian(model) as op:
        undisturbed = lanczos(op, k=3, tol=1e-8, seed=1)
        killing = KillingOperator(op, victim, at=5)
        disturbed = lanczos(killing, k=3, tol=1e-8, seed=1)
    assert killing.calls > 5
    assert ray.get(victim.info.remote())["pid"] != pid_before
    assert disturbed.converged and disturbed.n_matvecs == undisturbed.n_matvecs
    assert close(disturbed.eigenvalues, undisturbed.eigenvalues, 1e-12)


def test_release_and_close(ray_session, data):
    pool = HessianPool(data, num_actors=1, num_cpus=0.25)
    handle = pool.put_model(make_mlp())
    op = pool.weight_hessian(handle)
    info = ray.get(pool.actors[0].info.remote())
    assert info["models"] == [handle.model_id] and len(info["operators"]) == 1
    op.close()
    assert ray.get(pool.actors[0].info.remote())["operators"] == []
    pool.release(handle)
    assert ray.get(pool.actors[0].info.remote())["models"] == []
    actor = pool.actors[0]
    pool.close()
    pool.close()
    deadline = time.monotonic() + 60
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(actor.info.remote(), timeout=60)
            time.sleep(0.1)


class ItemDataset(Dataset):
    """A map-style dataset yielding (tensor, int) items, as torchvision's do."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_as_tensors_accepts_pairs_and_datasets(data):
    x, y = data
    for source in (data, TensorDataset(x, y), ItemDataset(x, y)):
        gx, gy = as_tensors(source)
        assert torch.equal(gx, x) and torch.equal(gy, y)


def test_bad_arguments_are_named(data):
    with pytest.raises(ValueError, match="num_actors"):
        HessianPool(data, num_actors=N + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        HessianPool(data, chunk_size=0)
    with pytest.raises(TypeError, match="Dataset"):
        as_tensors(42)


def test_matvec_ships_only_the_vector_not_its_storage(pool, monkeypatch):
    """Solvers pass rows of their Krylov basis: only the row may go to the object store."""
    sent = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda obj, **kw: sent.append(obj) or real_put(obj, **kw))
    with pool.weight_hessian(make_mlp()) as op:
        basis = torch.randn(40, op.size, dtype=torch.float64)
        op.matvec(basis[7])
    (vec,) = [s for s in sent if isinstance(s, torch.Tensor)]
    assert vec.untyped_storage().nbytes() == op.size * 8
