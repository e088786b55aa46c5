"""User-level DP in centralized training against a per-user reference loop (float64)."""

import pytest
import torch
import torch.nn as nn
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant
from torch.utils.data import DataLoader, TensorDataset

import dpkit

CLIP, SIGMA = 0.3, 1.0


def _data():
    g = torch.Generator().manual_seed(0)
    counts = [1, 3, 2, 7, 1, 4, 2, 5]                 # examples per user: one user dominates
    user_ids = torch.cat([torch.full((c,), u) for u, c in enumerate(counts)])
    x = torch.randn(len(user_ids), 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x, y), user_ids


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _per_example_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _setup(**kw):
    data, user_ids = _data()
    model = _model()
    kw = {"noise_multiplier": 0.0, **kw}
    return data, user_ids, *dpkit.make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(data, batch_size=4),
        max_grad_norm=CLIP, loss_reduction="sum", privacy_unit="user", user_ids=user_ids, **kw)


def _step(model, optimizer, slots):
    optimizer.zero_grad()
    with optimizer.same_examples():
        loss = sum((mask * _per_example_loss(model, batch)).sum() for batch, mask in slots)
    loss.backward()
    optimizer.step()


def test_each_user_summed_gradient_is_clipped_once():
    data, user_ids, model, optimizer, loader = _setup()
    reference = _model()
    params = list(reference.parameters())
    slots = next(s for s in loader if len(s) > 1 and int(s[0][1].sum()) >= 2)
    sampled_rows = slots[0][0][0]
    # which users were sampled: match slot-0 rows back to the data set
    x_all, y_all = data.tensors
    users = [int(user_ids[(x_all == row).all(1)].item()) for row in sampled_rows]
    total = [torch.zeros_like(p) for p in params]
    for u in users:                                   # reference: per-user sum, then clip once
        idx = (user_ids == u).nonzero().flatten()
        loss = nn.functional.cross_entropy(reference(x_all[idx]), y_all[idx], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, CLIP / float(norm))
        total = [t + factor * g for t, g in zip(total, grads)]
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, optimizer, slots)
    for b, p, t in zip(before, model.parameters(), total):
        torch.testing.assert_close(b - p.detach(), t / 4, rtol=1e-9, atol=1e-12)


def test_removing_one_user_moves_the_clipped_sum_by_at_most_c():
    """σ = 0 removal sensitivity at user level: the dominant user (7 examples) counts as one."""
    data, user_ids = _data()
    x_all, y_all = data.tensors

    def clipped_sum(keep_users):
        model = _model()
        _, opt, loader = dpkit.make_private(
            model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(data, batch_size=8),
            max_grad_norm=CLIP, noise_multiplier=0.0, loss_reduction="sum", privacy_unit="user",
            user_ids=user_ids)
        slots = loader._slots(keep_users)
        with opt.same_examples():
            loss = sum((mask * _per_example_loss(model, batch)).sum() for batch, mask in slots)
        loss.backward()
        opt.engine.accumulate()
        return torch.cat([opt.engine.clipped_sum(p).reshape(-1) for p in model.parameters()])

    everyone = list(range(8))
    full = clipped_sum(everyone)
    for u in everyone:
        delta = (full - clipped_sum([v for v in everyone if v != u])).norm()
        assert float(delta) <= CLIP * (1 + 1e-9)


def test_user_level_epsilon_is_dpsgd_at_the_user_rate():
    data, user_ids, model, optimizer, loader = _setup(noise_multiplier=SIGMA)
    for slots in loader:
        _step(model, optimizer, slots)
    assert optimizer.steps == 2                       # ceil(U / B_u) = 8 / 4 draws per pass
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(4 / 8, dpe.GaussianDpEvent(SIGMA)), 2))
    assert optimizer.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)


@pytest.mark.parametrize("kw, match", [
    ({"privacy_unit": "user"}, "user_ids"),
    ({"privacy_unit": "user", "user_ids": [0, 1]}, "one entry per example"),
    ({"privacy_unit": "household"}, "privacy_unit"),
    ({"user_ids": list(range(25))}, "privacy_unit='user'"),
    ({"privacy_unit": "user", "user_ids": list(range(25)), "loss_reduction": "mean"}, "loss_reduction"),
    ({"privacy_unit": "user", "user_ids": [0] * 25}, "number of users"),
])
def test_bad_user_level_arguments(kw, match):
    data, _ = _data()
    model = _model()
    kw = {"loss_reduction": "sum", **kw}
    with pytest.raises(ValueError, match=match):
        dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(data, batch_size=4),
                           max_grad_norm=CLIP, noise_multiplier=1.0, **kw)
