"""Kept gradient graphs: a backward without a derivative is an error, never silent zeros;
graphs that cannot be kept are said so, and the products stay exact."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from analysis.hessian import (
    InputHessian,
    NotTwiceDifferentiableError,
    WeightHessian,
    dense_matrix,
    input_hessian_eigenvalues,
)
from analysis.hessian import weight as weight_module
from analysis.hessian.graphcache import check_twice_differentiable

CE = nn.CrossEntropyLoss()


class _Square(torch.autograd.Function):
    """x * x with a backward marked once-differentiable (old style: no torch.func rules)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareWithJvp(torch.autograd.Function):
    """The same, in the torch.func style with a forward-mode rule."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * x * t


class _Squared(nn.Module):
    def __init__(self, square) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.square = square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(self.fc(x))


def _models(square):
    torch.manual_seed(0)
    model = _Squared(square).double()
    plain = _Squared(lambda z: z * z).double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    return model, plain, x, y


def test_check_passes_a_twice_differentiable_graph_and_flags_once_differentiable():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((w * w).sum() ** 2, w, create_graph=True)
    check_twice_differentiable((g,))
    (g,) = torch.autograd.grad(_Square.apply(w).sum() ** 2, w, create_graph=True)
    with pytest.raises(NotTwiceDifferentiableError, match="once_differentiable"):
        check_twice_differentiable((g,))


def test_plain_autograd_would_return_zeros_here():
    # the reason for the check: autograd skips the error node, so the product is silently 0
    model, _, x, y = _models(_Square.apply)
    params = list(model.parameters())
    grads = torch.autograd.grad(CE(model(x), y), params, create_graph=True)
    ones = [torch.ones_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, ones, allow_unused=True, materialize_grads=True)
    assert all(float(h.abs().max()) == 0.0 for h in hv)


@pytest.mark.parametrize("hvp", ["auto", "reverse"])
def test_weight_hessian_refuses_a_backward_without_derivative(hvp):
    model, _, x, y = _models(_Square.apply)
    op = WeightHessian(model, CE, [(x, y)], hvp=hvp)
    v = torch.randn(op.size, dtype=torch.float64)
    if hvp == "auto":  # kept graphs refused (warned), torch.func refused, then the error
        with (
            pytest.warns(RuntimeWarning, match="no gradient graph can be kept"),
            pytest.raises(NotTwiceDifferentiableError, match="once_differentiable"),
        ):
            op.matvec(v)
    else:
        with pytest.raises(NotTwiceDifferentiableError, match="jvp rule"):
            op.matvec(v)


def test_weight_hessian_falls_back_to_forward_mode_where_the_function_has_a_jvp():
    model, plain, x, y = _models(_SquareWithJvp.apply)
    expected = dense_matrix(WeightHessian(plain, CE, [(x, y)]))
    op = WeightHessian(model, CE, [(x, y)])
    with pytest.warns(RuntimeWarning, match="reverse-over-forward"):
        got = dense_matrix(op)
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_input_hessian_refuses_a_backward_without_derivative():
    model, _, x, y = _models(_Square.apply)
    with pytest.raises(NotTwiceDifferentiableError, match="once_differentiable"):
        input_hessian_eigenvalues(model, CE, x, y, k=1)
    op = InputHessian(model, CE, x, y)
    with pytest.raises(NotTwiceDifferentiableError):
        op.matvec(torch.randn(8, 4, dtype=torch.float64), torch.arange(8))


class _OnceDifferentiableCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose backward is once-differentiable: at the top of the graph no
    error node is left (the gradient flowing into it is a constant), the terms just vanish."""

    @staticmethod
    def forward(ctx, z, y):
        ctx.save_for_backward(z, y)
        return F.cross_entropy(z, y)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        z, y = ctx.saved_tensors
        onehot = F.one_hot(y, z.shape[1]).to(z.dtype)
        return g * (z.softmax(1) - onehot) / z.shape[0], None


def _once_differentiable_loss(z, y):
    return _OnceDifferentiableCrossEntropy.apply(z, y)


@pytest.mark.parametrize("hvp", ["auto", "reverse"])
def test_a_once_differentiable_loss_is_refused_too(hvp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    op = WeightHessian(model, _once_differentiable_loss, [(x, y)], hvp=hvp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto: the fallback's notice
        with pytest.raises(NotTwiceDifferentiableError, match="_OnceDifferentiableCrossEntropy"):
            op.matvec(torch.randn(op.size, dtype=torch.float64))
    with pytest.raises(NotTwiceDifferentiableError, match="once_differentiable"):
        input_hessian_eigenvalues(model, _once_differentiable_loss, x, y, k=1)


def test_an_operation_without_a_double_backward_is_refused_when_the_graphs_are_built():
    # PyTorch implements no double backward for CTC loss: its NotImplemented node would only
    # fail at the first product through a kept graph, past the fallback
    steps, n, classes = 6, 2, 5

    class Frames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).log_softmax(-1).transpose(0, 1)  # (steps, batch, classes)

    def ctc(out, targets):
        batch = out.shape[1]
        lengths = torch.full((batch,), steps), torch.full((batch,), targets.shape[1])
        return F.ctc_loss(out, targets, *lengths)

    torch.manual_seed(0)
    x = torch.randn(n, steps, 3, dtype=torch.float64)
    targets = torch.tensor([[1, 2], [3, 1]])
    op = WeightHessian(Frames().double(), ctc, [(x, targets)], hvp="reverse")
    with pytest.raises(NotTwiceDifferentiableError, match="NotImplemented"):
        op.matvec(torch.randn(op.size, dtype=torch.float64))


def test_an_ordinary_model_keeps_every_graph_without_a_warning(cnn_problem):
    model, x, y, dense = cnn_problem  # convolutions, BatchNorm, ReLU, max-pooling, dropout
    op = WeightHessian(model, CE, [(x[:12], y[:12]), (x[12:], y[12:])], chunk_size=12)
    v = torch.randn(op.size, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hv = op.matvec(v)
    assert len(op._graphs) == len(op.chunks) == 2
    torch.testing.assert_close(hv, dense @ v, rtol=1e-10, atol=1e-12)


def test_out_of_memory_on_a_later_chunk_keeps_the_graphs_that_fit(cnn_problem):
    model, x, y, dense = cnn_problem
    op = WeightHessian(model, CE, [(x, y)], chunk_size=8)  # three chunks
    calls, loss = [0], op._loss

    def third_build_fails(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return loss(*args)

    op._loss = third_build_fails
    v = torch.randn(op.size, dtype=torch.float64)
    # two fitted; the second is given up too, as room for the chunks differentiated afresh
    with pytest.warns(RuntimeWarning, match="1 of 3 chunks' gradient graphs are kept"):
        hv = op.matvec(v)
    assert len(op._graphs) == 1 and op.cached_bytes > 0 and op.hvp_mode == "auto"
    torch.testing.assert_close(hv, dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def test_a_default_budget_too_small_for_one_graph_is_said(cnn_problem, monkeypatch):
    model, x, y, dense = cnn_problem
    monkeypatch.setattr(weight_module, "default_cache_bytes", lambda device: 1024)
    op = WeightHessian(model, CE, [(x, y)])
    v = torch.randn(op.size, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="more than the cache budget of 1024 bytes"):
        hv = op.matvec(v)
    assert not op._graphs
    torch.testing.assert_close(hv, dense @ v, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():  # a budget the caller chose is not second-guessed
        warnings.simplefilter("error", RuntimeWarning)
        WeightHessian(model, CE, [(x, y)], cache_bytes=1024).matvec(v)


def test_out_of_memory_for_the_first_graph_in_reverse_mode_is_raised(cnn_problem):
    model, x, y, _ = cnn_problem
    op = WeightHessian(model, CE, [(x, y)], hvp="reverse")

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    op._loss = no_memory  # double backward afresh would need that same graph
    with pytest.raises(torch.OutOfMemoryError):
        op.matvec(torch.randn(op.size, dtype=torch.float64))


def test_a_mistake_in_the_model_is_raised_as_it_is_without_a_fallback(cnn_problem):
    model, x, y, _ = cnn_problem
    op = WeightHessian(model, CE, [(x[:, :, :5, :5], y)])  # images of the wrong size
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeError, match=r"shape|size"):
            op.matvec(torch.randn(op.size, dtype=torch.float64))
    assert op.hvp_mode == "auto"


class _Doubled(torch.autograd.Function):
    """2 x g, the backward of x * x below, whose own backward is not implemented."""

    @staticmethod
    def forward(g, x):
        return 2 * x * g

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("no second derivative here")


class _SquareWithoutDoubleBackward(_SquareWithJvp):
    """x * x whose backward cannot be differentiated, found only when a product runs it."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _Doubled.apply(g, x)


def test_a_double_backward_failing_at_the_first_product_falls_back_to_forward_mode():
    model, plain, x, y = _models(_SquareWithoutDoubleBackward.apply)
    expected = dense_matrix(WeightHessian(plain, CE, [(x, y)]))
    op = WeightHessian(model, CE, [(x, y)])
    with pytest.warns(RuntimeWarning, match="no second derivative here"):
        got = dense_matrix(op)
    assert op._graphs == []
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError):  # double backward only: nowhere to fall back
        WeightHessian(model, CE, [(x, y)], hvp="reverse").matvec(expected[0])


def test_a_once_differentiable_backward_under_another_decorator_is_found():
    class Square(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type="cpu")
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        @torch.amp.custom_bwd(device_type="cpu")
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    model, _, x, y = _models(Square.apply)
    with pytest.raises(NotTwiceDifferentiableError, match="Square"):
        WeightHessian(model, CE, [(x, y)], hvp="reverse").matvec(
            torch.randn(15, dtype=torch.float64)
        )


class _Attention(nn.Module):
    """Self-attention, which PyTorch runs with flash attention in float32 on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.mha(x, x, x, need_weights=False)
        return self.fc(attended.mean(1))


@pytest.mark.parametrize("hvp", ["auto", "forward"])
def test_attention_in_float32_gets_exact_products(hvp):
    # flash attention has no double backward and no forward-mode rule: the products run
    # attention on PyTorch's math kernel instead
    torch.manual_seed(0)
    model = _Attention().eval()
    x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
    reference = WeightHessian(model, CE, [(x, y)], dtype=torch.float64)
    op = WeightHessian(model, CE, [(x, y)], hvp=hvp)
    v = torch.randn(op.size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hv = op.matvec(v)
    expected = reference.matvec(v.double())
    assert float((hv.double() - expected).norm() / expected.norm()) < 1e-5
    if hvp == "auto":
        assert len(op._graphs) == 1
        u, rows = torch.randn(6, 5 * 8), torch.arange(6)
        got = InputHessian(model, CE, x, y).matvec(u, rows).double()
        want = InputHessian(model, CE, x, y, dtype=torch.float64).matvec(u.double(), rows)
        assert float((got - want).norm() / want.norm()) < 1e-5


def test_a_gradient_taken_before_the_first_product_keeps_its_fallback():
    model, plain, x, y = _models(_SquareWithoutDoubleBackward.apply)
    expected = dense_matrix(WeightHessian(plain, CE, [(x, y)]))
    op = WeightHessian(model, CE, [(x, y)])
    plain_op = WeightHessian(plain, CE, [(x, y)])
    torch.testing.assert_close(op.gradient(), plain_op.gradient(), rtol=1e-12, atol=1e-14)
    with pytest.warns(RuntimeWarning, match="no second derivative here"):
        got = dense_matrix(op)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
