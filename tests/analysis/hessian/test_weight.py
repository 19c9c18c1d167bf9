"""WeightHessian: exact products against torch.func.hessian, weighting, modes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from analysis.hessian import NonDeterminismError, WeightHessian
from tests.analysis.hessian.reference import dense_weight_hessian, make_data, make_mlp

CE = nn.CrossEntropyLoss()


def _random_vectors(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


@pytest.mark.parametrize("hvp", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_matvec_equals_dense_hessian(problem, hvp, request):
    model, x, y, dense = request.getfixturevalue(problem)
    op = WeightHessian(model, CE, [(x, y)], hvp=hvp)
    assert op.size == dense.shape[0]
    for v in _random_vectors(op.size):
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def test_unequal_batches_are_weighted_by_their_size(mlp_problem):
    model, x, y, dense = mlp_problem
    sizes = [7, 13, 1, 19]
    batches = list(zip(x.split(sizes), y.split(sizes), strict=True))
    v = _random_vectors(dense.shape[0], 1)[0]
    for cache in (True, False):
        op = WeightHessian(model, CE, batches, cache_data=cache)
        assert op.num_samples == 40
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    for one_batch in ((x, y), [x, y]):  # a bare (x, y) pair is one batch, not two
        op = WeightHessian(model, CE, one_batch)
        assert op.num_samples == 40
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    rechunked = WeightHessian(model, CE, batches, chunk_size=6)
    assert len(rechunked.chunks) == 7
    torch.testing.assert_close(rechunked.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def test_dataloader_and_loss_reductions_agree(mlp_problem):
    model, x, y, dense = mlp_problem
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    v = _random_vectors(dense.shape[0], 1)[0]
    for loss in (CE, nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(reduction="none")):
        op = WeightHessian(model, loss, loader)
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def test_eval_mode_is_used_and_restored_and_nothing_is_mutated(cnn_problem):
    model, x, y, dense = cnn_problem
    model.train()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    x0, y0 = x.clone(), y.clone()
    v = _random_vectors(dense.shape[0], 1)[0]
    v0 = v.clone()
    op = WeightHessian(model, CE, [(x, y)])
    hv = op.matvec(v)
    torch.testing.assert_close(hv, dense @ v, rtol=1e-10, atol=1e-12)
    assert model.training and all(m.training for m in model.modules())
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(v, v0)


def test_dtype_copy_leaves_the_callers_model_alone(mlp_problem):
    model, x, y, _ = mlp_problem
    model32 = model.float()
    op = WeightHessian(model32, CE, [(x.float(), y)], dtype=torch.float64)
    assert op.dtype == torch.float64
    assert next(model32.parameters()).dtype == torch.float32
    v = _random_vectors(op.size, 1)[0]
    ref = dense_weight_hessian(model32.double(), x, y)
    torch.testing.assert_close(op.matvec(v), ref @ v, rtol=1e-6, atol=1e-7)


def test_params_subset_gives_the_matching_block(mlp_problem):
    model, x, y, dense = mlp_problem
    last = [model[2].weight, model[2].bias]
    op = WeightHessian(model, CE, [(x, y)], params=last)
    n_first = sum(p.numel() for p in model[0].parameters())
    block = dense[n_first:, n_first:]
    v = _random_vectors(op.size, 1)[0]
    assert op.size == block.shape[0]
    torch.testing.assert_close(op.matvec(v), block @ v, rtol=1e-10, atol=1e-12)


class _NoisyDataset(Dataset):
    """Random augmentation: a new noise draw every time an item is read."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn_like(self.x[i]), self.y[i]


def test_determinism_check_catches_augmentation_but_not_shuffling(mlp_problem):
    model, x, y, _ = mlp_problem
    noisy = DataLoader(_NoisyDataset(x, y), batch_size=8)
    with pytest.raises(NonDeterminismError, match="augmentation"):
        WeightHessian(model, CE, noisy, check_determinism=True)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    WeightHessian(model, CE, shuffled, check_determinism=True)


def test_determinism_check_catches_a_model_that_ignores_eval(mlp_problem):
    _, x, y, _ = mlp_problem

    class AlwaysDropout(nn.Module):
        def forward(self, t):
            return nn.functional.dropout(t, 0.5, training=True)

    model = nn.Sequential(nn.Linear(6, 8), AlwaysDropout(), nn.Linear(8, 3)).double()
    with pytest.raises(NonDeterminismError):
        WeightHessian(model, CE, [(x, y)], check_determinism=True)


def test_clear_errors():
    model = make_mlp()
    x, y = make_data(5, (6,))
    with pytest.raises(ValueError, match="data is empty"):
        WeightHessian(model, CE, [])
    with pytest.raises(ValueError, match="x has 5 samples but y has 4"):
        WeightHessian(model, CE, [(x, y[:4])])
    with pytest.raises(ValueError, match=r"not an \(x, y\) pair"):
        WeightHessian(model, CE, [x])
    frozen = make_mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        WeightHessian(frozen, CE, [(x, y)])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        WeightHessian(model, CE, [(x, y)], params=[torch.zeros(3)])
    op = WeightHessian(model, CE, [(x, y)])
    with pytest.raises(ValueError, match=rf"flat vector of shape \({op.size},\)"):
        op.matvec(torch.zeros(op.size + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="hvp must be one of"):
        WeightHessian(model, CE, [(x, y)], hvp="finite-difference")
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        WeightHessian(model, CE, [(x, y)], cache_bytes=-1)
    with pytest.raises(ValueError, match=r"without a batch dimension .* DataLoader"):
        WeightHessian(model, CE, list(TensorDataset(x, y)))  # samples, not batches
    with pytest.raises(ValueError, match=r"not a pair of tensors \(x Tensor, y int\)"):
        WeightHessian(model, CE, [(x[0], 1)])  # a torchvision-style (image, label) sample
    weight = model[0].weight
    with pytest.raises(ValueError, match=r"params\[1\] repeats params\[0\] \('0.weight'\)"):
        WeightHessian(model, CE, [(x, y)], params=[weight, weight])


@pytest.mark.parametrize("chunk_size", [None, 4, 7])
def test_a_class_weighted_mean_is_the_whole_datas_whatever_the_chunks(mlp_problem, chunk_size):
    model, x, y, _ = mlp_problem
    y = y.clone()
    y[::5] = -100  # ignored targets
    v = _random_vectors(sum(p.numel() for p in model.parameters()), 2)
    for loss_fn in (
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 10.0], dtype=torch.float64)),
        nn.CrossEntropyLoss(),
    ):
        dense = dense_weight_hessian(model, x, y, loss_fn)
        for cache in (True, False):
            batches = [(x[:13], y[:13]), (x[13:], y[13:])]
            op = WeightHessian(model, loss_fn, batches, chunk_size=chunk_size, cache_data=cache)
            for u in v:
                torch.testing.assert_close(op.matvec(u), dense @ u, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="every target is ignored"):
        WeightHessian(model, CE, [(x, torch.full_like(y, -100))])


def test_float32_class_weights_serve_a_float64_operator():
    model = make_mlp().float()
    x, y = make_data(20, (6,))
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 10.0]))  # float32, as usual
    op = WeightHessian(model, weighted, [(x.float(), y)], dtype=torch.float64, chunk_size=7)
    as64 = nn.CrossEntropyLoss(weight=weighted.weight.double())
    dense = dense_weight_hessian(make_mlp(), x.float().double(), y, as64)
    v = _random_vectors(op.size, 1)[0]
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    assert weighted.weight.dtype == torch.float32  # the caller's loss is left alone


def _batches_of(x: torch.Tensor, y: torch.Tensor):
    for i in range(0, len(x), 4):
        yield x[i : i + 4], y[i : i + 4]


class _Shrinking:
    """Re-iterable data whose second pass drops the last batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        self.passes += 1
        stop = len(self.x) if self.passes == 1 else len(self.x) - 4
        return _batches_of(self.x[:stop], self.y[:stop])


def test_data_read_on_every_product_must_be_readable_again_and_the_same(mlp_problem):
    model, x, y, dense = mlp_problem
    v = _random_vectors(dense.shape[0], 1)[0]
    for kwargs in ({"cache_data": False}, {"check_determinism": True}):
        with pytest.raises(ValueError, match=r"one-shot iterator .* DataLoader"):
            WeightHessian(model, CE, _batches_of(x, y), **kwargs)
    cached = WeightHessian(model, CE, _batches_of(x, y))  # read once: a generator will do
    torch.testing.assert_close(cached.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    op = WeightHessian(model, CE, _Shrinking(x, y), cache_data=False)
    with pytest.raises(ValueError, match=f"gave {len(x) - 4} samples on this pass but {len(x)}"):
        op.matvec(v)


def _saved_bytes_of_one_chunk(model, x, y) -> int:
    probe = WeightHessian(model, CE, [(x, y)])
    probe.matvec(torch.zeros(probe.size, dtype=torch.float64))
    return probe.cached_bytes


def test_kept_graphs_within_the_budget_give_exact_products(cnn_problem):
    model, x, y, dense = cnn_problem
    per_chunk = _saved_bytes_of_one_chunk(model, x[:8], y[:8])
    assert per_chunk > 0
    vs = _random_vectors(dense.shape[0], 3)
    budgets = {"all": None, "two of three": int(2.5 * per_chunk), "none": 0}
    kept = {}
    for label, budget in budgets.items():
        op = WeightHessian(model, CE, [(x, y)], chunk_size=8, cache_bytes=budget)
        for v in vs:  # the second and third products reuse the kept graphs
            torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
        kept[label] = (len(op._graphs), op.cached_bytes)
        assert op.cached_bytes <= (budget if budget is not None else op.cache_bytes)
    assert kept["all"][0] == 3 and kept["two of three"][0] == 2 and kept["none"] == (0, 0)
    op = WeightHessian(model, CE, [(x, y)], hvp="forward")
    op.matvec(vs[0])
    assert op._graphs == [] and op.cached_bytes == 0


def test_the_operator_is_a_snapshot_of_the_weights(cnn_problem):
    model, x, y, dense = cnn_problem
    v = _random_vectors(dense.shape[0], 1)[0]
    cached = WeightHessian(model, CE, [(x, y)])
    fresh = WeightHessian(model, CE, [(x, y)], cache_bytes=0)
    cached.matvec(v)
    with torch.no_grad():  # later training changes weights and BatchNorm statistics
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.mul_(3.0)
    for op in (cached, fresh):
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    cached.release()
    torch.testing.assert_close(cached.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def test_a_loss_linear_in_the_weights_has_a_zero_hessian():
    model = nn.Linear(4, 2).double()
    x, y = make_data(10, (4,))
    op = WeightHessian(model, lambda out, _: out.sum(), [(x, y)])
    v = _random_vectors(op.size, 1)[0]
    assert torch.equal(op.matvec(v), torch.zeros_like(v))


def _autograd_gradient(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.eval()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    return torch.cat([g.reshape(-1) for g in grads])


def test_gradient_is_the_mean_loss_gradient_kept_graphs_or_not(cnn_problem):
    model, x, y, dense = cnn_problem
    expected = _autograd_gradient(model, CE, x, y)
    per_chunk = _saved_bytes_of_one_chunk(model, x[:8], y[:8])
    v = _random_vectors(dense.shape[0], 1)[0]
    for budget in (None, int(1.5 * per_chunk), 0):  # all, one of three, no graphs kept
        for first in ("gradient", "product"):
            op = WeightHessian(model, CE, [(x, y)], chunk_size=8, cache_bytes=budget)
            if first == "product":
                op.matvec(v)
            torch.testing.assert_close(op.gradient(), expected, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    uncached = WeightHessian(model, CE, [(x[:10], y[:10]), (x[10:], y[10:])], cache_data=False)
    torch.testing.assert_close(uncached.gradient(), expected, rtol=1e-10, atol=1e-12)


def test_gradient_of_a_class_weighted_mean_is_the_whole_datas(mlp_problem):
    model, x, y, _ = mlp_problem
    y = y.clone()
    y[::5] = -100
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 10.0], dtype=torch.float64))
    op = WeightHessian(model, loss_fn, [(x[:13], y[:13]), (x[13:], y[13:])], chunk_size=4)
    expected = _autograd_gradient(model, loss_fn, x, y)
    torch.testing.assert_close(op.gradient(), expected, rtol=1e-10, atol=1e-12)
