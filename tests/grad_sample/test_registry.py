"""Rule and BK-forward registration by class or qualified name: matched by exact class, bad
registrations refused with the expected form in the message."""

import pytest
import torch
import torch.nn as nn

from dpkit.grad_sample import GradientEngine, bk_forward, registry
from dpkit.grad_sample.layers import LinearRule, rule_for
from tests.grad_sample.reference import clipped_sum, per_example_grads


class Dense(nn.Module):
    """A Linear under another class name (as libraries define their own layers)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight.T + self.bias


class SubDense(Dense):
    pass


@pytest.fixture
def clean_registry():
    saved = dict(registry._BY_NAME), dict(registry._REGISTERED), set(registry._BATCH_FIRST)
    yield
    registry._BY_NAME.clear(), registry._REGISTERED.clear(), registry._BATCH_FIRST.clear()
    registry._BY_NAME.update(saved[0]), registry._REGISTERED.update(saved[1])
    registry._BATCH_FIRST.update(saved[2])


def test_rule_registered_by_qualified_name_matches_exact_class(clean_registry):
    registry.register_rule(f"{__name__}.Dense", LinearRule())
    assert isinstance(rule_for(Dense()), LinearRule)
    assert rule_for(SubDense()) is None  # exact class only: a subclass may compute otherwise
    torch.manual_seed(0)
    model = nn.Sequential(Dense(), nn.Tanh())
    x = torch.randn(5, 4, dtype=torch.float64)
    loss = lambda m, inp: m(inp[0]).pow(2).sum()  # noqa: E731
    expected = clipped_sum(per_example_grads(model, (x,), loss), 0.1)
    engine = GradientEngine(model, max_grad_norm=0.1, loss_reduction="sum")
    loss(model, (x,)).backward()
    engine.accumulate()
    assert engine.paths["0"] in ("ghost", "instantiate")
    for p in model.parameters():
        torch.testing.assert_close(engine.clipped_sum(p), expected[id(p)])


@pytest.mark.parametrize("bad", ["Dense", 3, nn.Linear(2, 2)])
def test_register_rule_refuses_bad_classes(bad):
    with pytest.raises(TypeError, match="module_class must be"):
        registry.register_rule(bad, LinearRule())


def test_register_bk_forward_refuses_bad_arguments():
    with pytest.raises(TypeError, match="package.module.Class"):
        bk_forward.register_bk_forward("Dense", lambda m, x, r: x)
    with pytest.raises(TypeError, match="apply must be callable"):
        bk_forward.register_bk_forward(f"{__name__}.Dense", None)


class TokenMLP(nn.Module):
    """Position-wise layers on (B, T, d): batch-first by construction."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2))

    def forward(self, x):
        return self.net(x)


class TokenMLPHead(TokenMLP):
    pass


@pytest.mark.parametrize("by_name", [True, False])
def test_batch_first_model_class_clips_a_b_equal_t_batch_exactly(clean_registry, by_name):
    from dpkit.errors import AmbiguousStepError

    torch.manual_seed(1)
    x = torch.randn(5, 5, 3, dtype=torch.float64)  # B == T from the first batch on
    loss = lambda m, inp: m(inp[0]).pow(2).sum()  # noqa: E731
    model = TokenMLPHead().double()
    engine = GradientEngine(model, max_grad_norm=0.1, loss_reduction="sum")
    engine.expect_batch(5)
    loss(model, (x,)).backward()
    with pytest.raises(AmbiguousStepError, match="module 'net.0'"):
        engine.accumulate()
    engine.detach()
    registry.register_batch_first(f"{__name__}.TokenMLP" if by_name else TokenMLP)  # a base class
    model = TokenMLPHead().double()
    expected = clipped_sum(per_example_grads(model, (x,), loss), 0.1)
    engine = GradientEngine(model, max_grad_norm=0.1, loss_reduction="sum")
    engine.expect_batch(5)
    loss(model, (x,)).backward()
    assert engine.accumulate() == 5
    for p in model.parameters():
        torch.testing.assert_close(engine.clipped_sum(p), expected[id(p)])
    engine.reset()  # a time-major batch contradicts the registration: refused, never regrouped
    time_major = x[:, :4].transpose(0, 1)
    engine.expect_batch(5, batch=(time_major,))
    loss(model, (time_major,)).backward()
    with pytest.raises(RuntimeError, match="no batch of 5 examples on its batch axis 0"):
        engine.accumulate()


@pytest.mark.parametrize("bad", ["TokenMLP", 3, nn.Linear(2, 2)])
def test_register_batch_first_refuses_bad_classes(bad):
    with pytest.raises(TypeError, match="model_class must be"):
        registry.register_batch_first(bad)
