"""Per-sample input-Hessian eigenvalues against dense per-sample Hessians."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis.hessian import (
    ConvergenceWarning,
    InputHessian,
    input_hessian_eigenvalues,
    input_hessian_spectrum,
)
from tests.analysis.hessian.reference import make_cnn, make_data, make_mlp

CE = nn.CrossEntropyLoss()


def dense_input_spectra(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module = CE
) -> torch.Tensor:
    """Ascending eigenvalues of each sample's own input Hessian, by torch.func.hessian."""
    model.eval()
    out = []
    for xi, yi in zip(x, y, strict=True):
        h = torch.func.hessian(lambda z, yi=yi: loss_fn(model(z[None]), yi[None]))(xi)
        d = xi.numel()
        out.append(torch.linalg.eigvalsh(h.reshape(d, d)))
    return torch.stack(out)


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_matches_dense_per_sample_hessians(which):
    model = make_mlp(act=nn.Tanh)
    x, y = make_data(30, (6,))
    exact = dense_input_spectra(model, x, y)
    got = input_hessian_eigenvalues(model, CE, x, y, k=2, which=which, tol=1e-10)
    want = {
        "largest": exact[:, -2:].flip(1),
        "smallest": exact[:, :2].flip(1),
        "both": torch.cat([exact[:, -2:].flip(1), exact[:, :2].flip(1)], dim=1),
    }[which]
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_cnn_with_batchnorm_and_batching_does_not_change_answers():
    model = make_cnn()
    model.train()
    x, y = make_data(20, (1, 6, 6))
    x0 = x.clone()
    exact = dense_input_spectra(model, x, y)
    model.train()
    together = input_hessian_spectrum(model, CE, x, y, k=1, tol=1e-10)
    assert model.training and torch.equal(x, x0)
    assert bool(together.converged.all())
    torch.testing.assert_close(together.eigenvalues[:, 0], exact[:, -1], rtol=1e-7, atol=1e-10)
    one_by_one = input_hessian_spectrum(model, CE, x, y, k=1, tol=1e-10, batch_size=1)
    torch.testing.assert_close(one_by_one.eigenvalues, together.eigenvalues, rtol=1e-7, atol=1e-10)


def test_a_class_weighted_loss_gives_each_sample_own_loss_hessian():
    model = make_mlp(act=nn.Tanh)
    x, y = make_data(12, (6,))
    weights = torch.tensor([1.0, 5.0, 10.0], dtype=torch.float64)
    for weighted in (
        nn.CrossEntropyLoss(weight=weights),  # the weight cancels in one sample's mean
        nn.CrossEntropyLoss(weight=weights, label_smoothing=0.2),  # and here it does not
        nn.CrossEntropyLoss(weight=weights.float(), label_smoothing=0.2),  # float32 weights
    ):
        exact = dense_input_spectra(
            model,
            x,
            y,
            nn.CrossEntropyLoss(weight=weights, label_smoothing=weighted.label_smoothing),
        )
        got = input_hessian_eigenvalues(model, weighted, x, y, k=1, tol=1e-10)
        torch.testing.assert_close(got[:, 0], exact[:, -1], rtol=1e-7, atol=1e-10)
    y = y.clone()
    y[3] = -100
    with pytest.raises(ValueError, match=r"samples \[3\] have only ignored targets"):
        input_hessian_eigenvalues(model, CE, x, y, k=1)


def test_relu_softmax_input_hessians_are_positive_semidefinite():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).double()
    x, y = make_data(25, (1, 10, 10), classes=5)
    both = input_hessian_eigenvalues(model, CE, x, y, k=1, which="both", tol=1e-10)
    largest, smallest = both[:, 0], both[:, 1]
    assert torch.all(largest > 0)
    assert torch.all(smallest >= -1e-10 * largest)
    exact = dense_input_spectra(model, x, y)
    torch.testing.assert_close(smallest, exact[:, 0], rtol=0, atol=1e-9)
    # The Hessian J^T (diag(p) - p p^T) J has rank at most classes - 1.
    assert torch.all((exact > 1e-9 * exact[:, -1:]).sum(dim=1) <= 4)


def test_seeds_reproduce_and_non_convergence_warns():
    model = make_mlp()
    x, y = make_data(8, (6,))
    a = input_hessian_eigenvalues(model, CE, x, y, k=1, seed=3)
    b = input_hessian_eigenvalues(model, CE, x, y, k=1, seed=3)
    assert torch.equal(a, b)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        input_hessian_eigenvalues(model, CE, x, y, k=2, tol=1e-14, max_iter=2)


def test_clear_errors():
    model = make_mlp()
    x, y = make_data(4, (6,))
    with pytest.raises(ValueError, match="x has 4 samples but y has 3"):
        input_hessian_eigenvalues(model, CE, x, y[:3])
    with pytest.raises(ValueError, match=r"batch of shape \(n, ...\)"):
        input_hessian_eigenvalues(model, CE, x[0], y[0])
    with pytest.raises(ValueError, match="k=7 exceeds the operator size 6"):
        input_hessian_eigenvalues(model, CE, x, y, k=7)
    with pytest.raises(ValueError, match="which must be one of"):
        input_hessian_eigenvalues(model, CE, x, y, which="top")


def _dense_input_hessians(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.stack(
        [
            torch.func.hessian(lambda z, yi=yi: CE(model(z[None]), yi[None]))(xi)
            for xi, yi in zip(x, y, strict=True)
        ]
    )


def _assert_dense_products(hv: torch.Tensor, model: nn.Module, x, y, v: torch.Tensor) -> None:
    """``hv`` is every sample's dense input Hessian applied to its row of ``v``."""
    want = torch.einsum("bij,bj->bi", _dense_input_hessians(model, x, y), v)
    torch.testing.assert_close(hv, want, rtol=1e-10, atol=1e-12)


def _counting_builds(op) -> list[int]:
    builds = [0]
    build = op._build

    def counted(rows):
        builds[0] += 1
        return build(rows)

    op._build = counted
    return builds


def test_products_over_changing_rows_match_dense_hessians():
    """The kept graph serves any subset in any order; a small subset gets its own graph."""
    model = make_mlp(act=nn.Tanh)
    x, y = make_data(8, (6,))
    dense = _dense_input_hessians(model, x, y)
    op = InputHessian(model, CE, x, y)
    builds = _counting_builds(op)
    gen = torch.Generator().manual_seed(0)
    expected_builds = [1, 1, 1, 2, 2, 3]  # rebuilt once fewer than half are asked for
    calls = ([0, 1, 2, 3, 4, 5, 6, 7], [7, 2, 5, 0, 1], [3, 6, 1, 4], [6, 1], [1, 6], [0, 3])
    for rows, n_builds in zip(calls, expected_builds, strict=True):
        r = torch.tensor(rows)
        v = torch.randn(len(rows), 6, generator=gen, dtype=torch.float64)
        want = torch.einsum("bij,bj->bi", dense[r], v)
        torch.testing.assert_close(op.matvec(v, r), want, rtol=1e-10, atol=1e-12)
        assert builds[0] == n_builds, rows


def test_a_row_asked_for_twice_gets_each_direction():
    model = make_mlp(act=nn.Tanh)
    x, y = make_data(4, (6,))
    dense = _dense_input_hessians(model, x, y)
    op = InputHessian(model, CE, x, y)
    op.matvec(torch.ones(4, 6, dtype=torch.float64), torch.arange(4))  # keep a graph
    r = torch.tensor([3, 1, 1, 0])
    v = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.einsum("bij,bj->bi", dense[r], v)
    torch.testing.assert_close(op.matvec(v, r), want, rtol=1e-10, atol=1e-12)


def test_changed_weights_rebuild_the_kept_graph():
    model = make_mlp(act=nn.Tanh)
    x, y = make_data(4, (6,))
    op = InputHessian(model, CE, x, y)
    builds = _counting_builds(op)
    rows, v = torch.arange(4), torch.ones(4, 6, dtype=torch.float64)
    op.matvec(v, rows)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an optimiser step: in place
    _assert_dense_products(op.matvec(v, rows), model, x, y, v)
    assert builds[0] == 2
    op.release()
    op.matvec(v, rows)
    assert builds[0] == 3
    for p in model.parameters():
        p.data = p.data * 0.5  # an old-style update: new storage, no version change
    _assert_dense_products(op.matvec(v, rows), model, x, y, v)
    assert builds[0] == 4


def test_a_buffer_without_storage_is_no_obstacle():
    model = make_mlp(act=nn.Tanh)
    model.register_buffer("adjacency", torch.eye(3, dtype=torch.float64).to_sparse())
    x, y = make_data(4, (6,))
    v = torch.ones(4, 6, dtype=torch.float64)
    _assert_dense_products(InputHessian(model, CE, x, y).matvec(v, torch.arange(4)), model, x, y, v)
