"""Every loop shape the docs mention is accounted as what it runs (checked against dp_accounting).

Review found that the usual accumulation loop — backward on every loader batch, step every k
batches — was accounted as ONE Poisson batch per step (ε = 2.24 printed for a mechanism with
ε = 4.81). The loader now reports each sampled batch to the optimizer.
"""

import math

import dp_accounting
import pytest
import torch
import torch.nn as nn
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant
from torch.utils.data import DataLoader, TensorDataset

import dpkit

N, B, SIGMA = 200, 10, 1.0  # q = 0.05


def _setup(**kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("noise_multiplier", SIGMA)
    return dpkit.make_private(model, opt, DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=B),
                              max_grad_norm=1.0, **kw)


def _train(model, opt, loader, epochs, accumulate=1):
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader):
            nn.functional.cross_entropy(model(x), y).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad()


def _pld_epsilon(event, count, delta=1e-5, grid=1e-4):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    acc.compose(dpe.SelfComposedDpEvent(event, count))
    return acc.get_epsilon(delta)


def test_accumulating_two_poisson_batches_is_accounted_as_their_mixture():
    model, opt, loader = _setup()
    _train(model, opt, loader, epochs=3, accumulate=2)  # 20 batches per epoch -> 10 steps
    assert opt.steps == 30
    q = B / N
    mixture = dpe.MixtureOfGaussiansDpEvent(SIGMA, [0, 1, 2], [(1 - q) ** 2, 2 * q * (1 - q), q ** 2])
    expected = _pld_epsilon(mixture, 30, grid=1e-3)  # pessimistic: still an upper bound (1e-4: 40 s)
    assert expected == pytest.approx(4.81, abs=0.01)  # the number
    assert opt.epsilon(1e-5) == pytest.approx(expected, rel=2e-3)
    single = _pld_epsilon(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(SIGMA)), 30)
    assert opt.epsilon(1e-5) > 2 * single  # what was printed before (2.24)


def test_accumulated_event_for_k_batches_matches_the_binomial_mixture():
    q, k = 0.05, 3
    event = dpkit.accountants.accumulated_poisson_event(SIGMA, q, k)
    assert event.sensitivities == [0, 1, 2, 3]
    assert event.sampling_probs == pytest.approx([math.comb(k, j) * q ** j * (1 - q) ** (k - j)
                                                  for j in range(k + 1)])
    assert dpkit.accountants.accumulated_poisson_event(SIGMA, q, 1) == \
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(SIGMA))
    with pytest.raises(ValueError, match="batches"):
        dpkit.accountants.accumulated_poisson_event(SIGMA, q, 0)


def test_accumulation_refused_where_it_cannot_be_accounted():
    # σ calibrated for one batch per step: the mixture would overshoot the target
    model, opt, loader = _setup(noise_multiplier=None, target_epsilon=3.0, target_delta=1e-5, epochs=2)
    with pytest.raises(dpkit.AmbiguousStepError, match="max_physical_batch_size"):
        _train(model, opt, loader, epochs=1, accumulate=2)
    assert opt.steps == 0 and opt.accountant.epsilon(1e-5) == 0.0  # the refused step spent nothing
    # fixed-size batches (replace-one, RDP): their joint sensitivity is not accounted
    model, opt, loader = _setup(poisson_sampling=False, accountant="rdp")
    with pytest.raises(dpkit.AmbiguousStepError, match="fixed-size"):
        _train(model, opt, loader, epochs=1, accumulate=2)
    # an accountant that cannot account the mixture (RDP)
    model, opt, loader = _setup(accountant="rdp")
    with pytest.raises(dpkit.AmbiguousStepError, match="rdp"):
        _train(model, opt, loader, epochs=1, accumulate=2)


def test_virtual_batches_are_one_sampled_batch_per_step():
    model, opt, loader = _setup(max_physical_batch_size=3)
    steps = 0
    for x, y in loader:
        assert len(x) <= 3
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # accumulates until the last chunk of the logical batch
        opt.zero_grad()
    steps = opt.steps
    assert steps == N // B
    q = B / N
    assert opt.epsilon(1e-5) == pytest.approx(
        _pld_epsilon(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(SIGMA)), steps), rel=2e-3)


def test_empty_batches_are_steps_of_the_same_event():
    model, opt, loader = _setup()
    loader.batch_sampler.sample_rate = 1e-9  # every Poisson batch empty (the accounted q stays B/N)
    _train(model, opt, loader, epochs=1)
    assert opt.steps == N // B
    q = B / N
    assert opt.epsilon(1e-5) == pytest.approx(
        _pld_epsilon(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(SIGMA)), N // B), rel=2e-3)


def test_user_sampled_data_is_accounted_as_declared_one_batch_per_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    _, opt, _ = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                   noise_multiplier=SIGMA, max_grad_norm=1.0, sample_rate=0.05,
                                   expected_batch_size=10)
    for _ in range(4):
        x = torch.randn(10, 4)
        nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        opt.step()
        opt.zero_grad()
    assert opt.epsilon(1e-5) == pytest.approx(
        _pld_epsilon(dpe.PoissonSampledDpEvent(0.05, dpe.GaussianDpEvent(SIGMA)), 4), rel=2e-3)


def test_gradient_the_engine_did_not_see_is_refused_without_spending():
    """A gradient that reached a parameter outside dpkit's hooks (even when the engine saw no
    example at all, as in the old eval-mode fault) is refused before any ε is spent."""
    model, opt, loader = _setup()
    model.weight.grad = torch.ones_like(model.weight)  # a gradient from outside the hooks
    with pytest.raises(RuntimeError, match="did not see"):
        opt.step()
    assert opt.steps == 0 and opt.accountant.epsilon(1e-5) == 0.0


def test_batch_first_declaration_settles_a_batch_as_long_as_the_sequence():
    """A (B, T, d) tensor with B == T before any batch proved the layout is ambiguous: refused by
    default, trained exactly with make_private(batch_first=True) (the batch of 1 reference)."""
    from tests.grad_sample.reference import clipped_sum, per_example_grads

    T, CLIP = 4, 0.1

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))

    def build(**kw):
        model = net()
        data = TensorDataset(torch.randn(40, T, 3, generator=torch.Generator().manual_seed(1)))
        return dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                  DataLoader(data, batch_size=T), noise_multiplier=0.0, max_grad_norm=CLIP,
                                  loss_reduction="sum", generator=torch.Generator().manual_seed(0), **kw)

    def first_batch_of_size_t(loader):
        for _ in range(10):
            for (x,) in loader:
                if len(x) == T:
                    return x
        raise AssertionError("no batch of size T")

    model, opt, loader = build()
    x = first_batch_of_size_t(loader)
    model(x).sum().backward()
    with pytest.raises(dpkit.AmbiguousStepError):
        opt.step()
    model, opt, loader = build(batch_first=True)
    x = first_batch_of_size_t(loader)
    twin = net()  # the reference runs outside dpkit's hooks
    expected = clipped_sum(per_example_grads(twin, (x,), lambda m, xi: m(xi[0]).sum()), CLIP)
    model(x).sum().backward()
    opt.step()
    for p, q in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(p.detach() - q.detach(), expected[id(p)] / T, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="batch_first"):
        build(batch_first="yes")
