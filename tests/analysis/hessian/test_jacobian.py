"""Input-Hessian spectra from the output Jacobian against dense per-sample Hessians, and
which models the route refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.hessian import NotPiecewiseLinearError, input_hessian_spectrum, jacobian, leangraph
from analysis.hessian.jacobian import AUTO_MAX_OUTPUTS, nonlinear_node
from analysis.hessian.piecewise import HANDLERS
from analysis.hessian.results import BatchedEigenResult, concat_batched
from tests.analysis.hessian.reference import make_data, make_mlp
from tests.analysis.hessian.test_inputs import CE, dense_input_spectra
from trainables.models import build_model, model_names


def relu_cnn(classes: int = 5) -> nn.Module:
    """Every piecewise-linear layer kind a vision model is built from, eval-mode BatchNorm
    statistics made non-trivial."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(1),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 12),
        nn.ReLU6(),
        nn.Linear(12, classes),
    ).double()
    model[1].running_mean.copy_(torch.linspace(-0.3, 0.3, 4, dtype=torch.float64))
    model[1].running_var.copy_(torch.linspace(0.5, 2.0, 4, dtype=torch.float64))
    return model


def picked(exact: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """The columns ``input_hessian_spectrum`` returns, from ascending dense spectra."""
    top, bottom = exact[:, -k:].flip(1), exact[:, :k].flip(1)
    return {"largest": top, "smallest": bottom, "both": torch.cat([top, bottom], 1)}[which]


@pytest.fixture(params=["lean graph", "PyTorch's graph"])
def graph(request, monkeypatch):
    """Both kinds of forward graph the check reads: with leangraph's Functions (the tests'
    default, on tiny tensors too) and PyTorch's own nodes (what small batches get)."""
    if request.param == "PyTorch's graph":
        monkeypatch.setattr(leangraph, "MIN_ELEMENTS", 2**62)
    return request.param


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_every_end_matches_dense_hessians_of_a_relu_cnn(which, k, graph):
    model = relu_cnn()
    x, y = make_data(12, (1, 8, 8), classes=5)
    exact = dense_input_spectra(model, x, y)
    res = input_hessian_spectrum(model, CE, x, y, k=k, which=which, method="jacobian")
    assert res.method == "jacobian" and bool(res.converged.all())
    assert res.n_matvecs == 5  # one backward pass per output
    torch.testing.assert_close(res.eigenvalues, picked(exact, k, which), rtol=1e-9, atol=1e-12)
    assert float(res.residuals.max()) < 1e-12


def test_an_indefinite_loss_hessian_gives_negative_eigenvalues_exactly():
    def loss_fn(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, y) + torch.cos(z).sum(dim=1).mean()

    model = relu_cnn()
    x, y = make_data(10, (1, 8, 8), classes=5)
    exact = dense_input_spectra(model, x, y, loss_fn)
    assert float(exact[:, 0].max().detach()) < -1e-3  # every sample bends down somewhere
    got = input_hessian_spectrum(model, loss_fn, x, y, k=2, which="both", method="jacobian")
    torch.testing.assert_close(got.eigenvalues, picked(exact, 2, "both"), rtol=1e-9, atol=1e-12)


def test_an_input_smaller_than_the_output_and_a_class_weighted_loss():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 7), nn.ReLU(), nn.Linear(7, 4)).double()
    x, y = make_data(9, (2,), classes=4)
    weights = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64)
    loss = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)
    exact = dense_input_spectra(model, x, y, loss)
    got = input_hessian_spectrum(model, loss, x, y, k=1, which="both", method="jacobian")
    torch.testing.assert_close(got.eigenvalues, picked(exact, 1, "both"), rtol=1e-9, atol=1e-12)


def test_batches_and_float32_agree_with_one_float64_pass():
    model = relu_cnn()
    x, y = make_data(13, (1, 8, 8), classes=5)
    whole = input_hessian_spectrum(model, CE, x, y, k=2, method="jacobian")
    parts = input_hessian_spectrum(model, CE, x, y, k=2, method="jacobian", batch_size=4)
    torch.testing.assert_close(parts.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=1e-15)
    single = input_hessian_spectrum(model.float(), CE, x.float(), y, k=2, method="jacobian")
    torch.testing.assert_close(single.eigenvalues, whole.eigenvalues, rtol=1e-4, atol=1e-7)


def test_auto_picks_the_jacobian_only_where_it_is_exact():
    x, y = make_data(8, (6,))
    relu = make_mlp(act=nn.ReLU)
    auto = input_hessian_spectrum(relu, CE, x, y, k=2, method="auto")
    lanczos = input_hessian_spectrum(relu, CE, x, y, k=2, tol=1e-12)
    assert (auto.method, lanczos.method) == ("jacobian", "lanczos")
    torch.testing.assert_close(auto.eigenvalues, lanczos.eigenvalues, rtol=1e-9, atol=1e-12)
    smooth = make_mlp(act=nn.Tanh)
    assert input_hessian_spectrum(smooth, CE, x, y, method="auto").method == "lanczos"
    with pytest.raises(NotPiecewiseLinearError, match=r"TanhBackward0.*method='lanczos'"):
        input_hessian_spectrum(smooth, CE, x, y, method="jacobian")


def test_auto_leaves_many_outputs_to_lanczos_unless_asked():
    torch.manual_seed(1)
    wide = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, AUTO_MAX_OUTPUTS + 1)).double()
    x, _ = make_data(4, (6,))
    y = torch.arange(4)
    assert input_hessian_spectrum(wide, CE, x, y, method="auto").method == "lanczos"
    forced = input_hessian_spectrum(wide, CE, x, y, k=2, method="jacobian")
    exact = dense_input_spectra(wide, x, y)
    torch.testing.assert_close(forced.eigenvalues, picked(exact, 2, "largest"), rtol=1e-9, atol=0)


class Gated(nn.Module):
    """Bilinear in its input: a product of two linear maps of it (curvature of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(x)


class _ReLU(torch.autograd.Function):
    """A surrogate-gradient ReLU (spiking networks) sharing the name of leangraph's: its
    backward depends on x, so it has curvature of its own."""

    @staticmethod
    def forward(x):
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(4 * x)


def test_the_graph_check_names_what_bends_and_passes_what_does_not():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 6, dtype=torch.float64)
    c = torch.randn(6, dtype=torch.float64, requires_grad=True)  # another leaf: constant in x
    img = x.reshape(3, 1, 2, 3)
    k = torch.randn(2, 1, 1, 1, dtype=torch.float64)
    zeros, ones = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    cases = {
        "linear, relu, max": (torch.maximum(F.relu(x @ w), 2 * x - 1).sum(1), None),
        "scaled by a function of another leaf": (x * torch.tanh(c), None),
        "divided by a constant tensor": (x / (w.abs() + 1)[0], None),
        "addmm: x added to x times a constant": (torch.addmm(x, x, w), None),
        "selections, sorts and running sums": (
            x.index_select(1, torch.tensor([0, 2])).cumsum(1)
            + x.sort(1).values[:, :2]
            + x.topk(2).values
            + x.gather(1, x.argmax(1, keepdim=True))
            + x.masked_fill(x > 0, 0.0)[:, :2],
            None,
        ),
        "leangraph's ReLU": (HANDLERS[F.relu]((x,), {}), None),
        "a convolution with constant weights": (F.conv2d(img, k), None),
        "batch norm with running statistics": (
            F.batch_norm(x, zeros, ones, weight=c, training=False),
            None,
        ),
        "a square": (x * x, "MulBackward0"),
        "a product of linear maps": (Gated().double()(x), "MulBackward0"),
        "divided by itself": (w[0] / (x.abs() + 1), "DivBackward0"),
        "addmm of x and its transpose": (torch.addmm(w[:3, :3], x, x.T), "AddmmBackward0"),
        "baddbmm of x with itself": (
            torch.baddbmm(w[None, :1, :1], x[:, None], x[:, :, None]),
            "BaddbmmBackward0",
        ),
        "addcmul of x with itself": (torch.addcmul(w[0], x, x), "AddcmulBackward0"),
        "a convolution whose kernel is x": (
            F.conv2d(img, x[:2, :1].reshape(2, 1, 1, 1)),
            "ConvolutionBackward0",
        ),
        "PReLU whose slope is x": (F.prelu(x, x[0, :1]), "PreluKernelBackward0"),
        "batch norm scaled by x": (
            F.batch_norm(x, zeros, ones, weight=x[0], training=False),
            "NativeBatchNormBackward0",
        ),
        "batch norm on batch statistics": (
            F.batch_norm(x, None, None, training=True),
            "NativeBatchNormBackward0",
        ),
        "the modulus of a complex map": ((x.to(torch.complex128) * (1 + 2j)).abs(), "AbsBackward0"),
        "a user's Function named like leangraph's": (_ReLU.apply(x), "_ReLUBackward"),
        "log-softmax": (F.log_softmax(x, 1), "LogSoftmaxBackward0"),
        "layer norm": (F.layer_norm(x, (6,)), "NativeLayerNormBackward0"),
    }
    for what, (out, want) in cases.items():
        assert nonlinear_node(out, x) == want, what


def test_both_ends_of_a_single_output_with_more_wanted_than_it_has():
    def loss_fn(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cos(3 * z).mean() + ((z[:, 0] - y) ** 2).mean()

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    x, _ = make_data(10, (6,))
    y = torch.randn(10, dtype=torch.float64)
    exact = dense_input_spectra(model, x, y, loss_fn)
    assert bool((exact[:, 0] < -1e-6).any()) and bool((exact[:, -1] > 1e-6).any())
    got = input_hessian_spectrum(model, loss_fn, x, y, k=2, which="both", method="jacobian")
    torch.testing.assert_close(got.eigenvalues, picked(exact, 2, "both"), rtol=1e-9, atol=1e-12)


def test_samples_past_the_memory_bound_go_in_passes(monkeypatch):
    model = relu_cnn()
    x, y = make_data(11, (1, 8, 8), classes=5)
    whole = input_hessian_spectrum(model, CE, x, y, k=2, method="jacobian")
    monkeypatch.setattr(jacobian, "JACOBIAN_BYTES", 4 * 5 * 64 * 8)  # 4 samples' Jacobians
    parts = input_hessian_spectrum(model, CE, x, y, k=2, method="jacobian")
    torch.testing.assert_close(parts.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=1e-15)
    assert (whole.n_matvecs, parts.n_matvecs) == (5, 15)  # three passes of 5 outputs


def test_results_of_both_methods_join_in_order():
    def part(value: float, method: str) -> BatchedEigenResult:
        return BatchedEigenResult(
            torch.full((2, 1), value),
            torch.zeros(2, 1),
            torch.ones(2, dtype=torch.bool),
            3,
            4,
            method,
        )

    joined = concat_batched([part(1.0, "lanczos"), part(2.0, "jacobian"), part(3.0, "lanczos")])
    assert joined.method == "jacobian+lanczos"
    assert joined.eigenvalues[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert (joined.n_matvecs, joined.n_iterations) == (9, 4)


def test_a_non_finite_sample_is_named():
    model = relu_cnn()
    x, y = make_data(6, (1, 8, 8), classes=5)
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not finite \(NaN or inf\) for rows \[2\]"):
        input_hessian_spectrum(model, CE, x, y, method="jacobian")


def test_clear_errors_for_the_method_and_k():
    model = make_mlp(act=nn.ReLU)
    x, y = make_data(4, (6,))
    with pytest.raises(ValueError, match="method must be one of"):
        input_hessian_spectrum(model, CE, x, y, method="gauss-newton")
    with pytest.raises(ValueError, match="k=7 exceeds the operator size 6"):
        input_hessian_spectrum(model, CE, x, y, k=7, method="jacobian")
    with pytest.raises(ValueError, match="which='both' with k=4"):
        input_hessian_spectrum(model, CE, x, y, k=4, which="both", method="jacobian")


@pytest.mark.parametrize("name", model_names())
def test_every_model_the_study_trains_qualifies(name):
    """The registry's models (BatchNorm, residual blocks, dropout) take the exact route under
    "auto", and it agrees with Lanczos on the same float32 model."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=16).eval()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    auto = input_hessian_spectrum(model, CE, x, y, k=1, which="both", method="auto")
    lanczos = input_hessian_spectrum(model, CE, x, y, k=1, which="both", tol=1e-8)
    assert auto.method == "jacobian"
    scale = float(lanczos.eigenvalues.abs().max())
    assert float((auto.eigenvalues - lanczos.eigenvalues).abs().max()) < 1e-5 * scale
