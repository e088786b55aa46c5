"""Device readiness: the same checks on CPU and, when present, CUDA (``device`` fixture of
tests/conftest.py; the cuda variants skip cleanly without a GPU).

Per-example clipping of Linear / Conv2d / LayerNorm / Embedding models against the float64
batch-of-1 reference, a make_private step whose noise has the claimed std (a chi-square test that
fails on a wrong variance), and the accountant's ledger against dp_accounting called directly."""

import math

import dp_accounting
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

import dpkit
from dpkit.accountants.rdp import DEFAULT_ORDERS
from dpkit.grad_sample import GradientEngine
from tests.grad_sample.reference import clipped_sum, per_example_grads


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


class _Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)).mean(1))


def _case(name, g):
    """(model, input) of one layer family, float64, on CPU."""
    if name == "linear":
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), torch.randn(6, 5, generator=g)
    if name == "conv":
        return _Conv(), torch.randn(6, 2, 6, 6, generator=g)
    if name == "layernorm":
        return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)), torch.randn(6, 5, generator=g)
    return _Emb(), torch.randint(0, 11, (6, 4), generator=g)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("family", ["linear", "conv", "layernorm", "embedding"])
def test_clipped_sum_on_device_matches_the_float64_reference(family, mode, device):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model, x = _case(family, g)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    reference = per_example_grads(model, (x, y), lambda m, i: F.cross_entropy(m(i[0]), i[1], reduction="sum"))
    norms = torch.sqrt(sum(v.reshape(6, -1).pow(2).sum(1) for v in reference.values()))
    clip = float(norms.median())  # some examples clipped, some not: the norms decide which
    expected = clipped_sum(reference, clip)
    ids = [id(p) for p in model.parameters()]
    model.to(device)
    engine = GradientEngine(model, max_grad_norm=clip, mode=mode, loss_reduction="sum")
    F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum").backward()
    assert engine.accumulate() == 6
    for p, pid in zip(model.parameters(), ids):
        got = engine.clipped_sum(p)
        assert got.device == p.device
        torch.testing.assert_close(got.cpu(), expected[pid], rtol=1e-7, atol=1e-9)


def test_make_private_step_noise_std_and_ledger_on_device(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 32), nn.LayerNorm(32), nn.Linear(32, 4)).to(device)
    sigma, clip, q, batch, lr, steps = 1.3, 0.7, 0.02, 16.0, 0.5, 3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=sigma, max_grad_norm=clip,
                                   sample_rate=q, expected_batch_size=batch, accountant="rdp",
                                   generator=torch.Generator().manual_seed(2))
    x = torch.randn(5, 3, 8, 8, device=device)
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        (0.0 * model(x).sum()).backward()  # zero data gradient: the update is the noise alone
        opt.step()
        for p in model.parameters():
            assert p.device.type == device.type and p.grad.device.type == device.type
    z = torch.cat([((b - p.detach()) / (lr * sigma * clip / batch)).reshape(-1)
                   for b, p in zip(before, model.parameters())]).double().cpu()
    # N(0, 1) per coordinate: mean and variance (chi-square, two-sided) at the claimed std
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    chi2 = float((z ** 2).sum())
    assert stats.chi2.sf(chi2, n) > 1e-4 and stats.chi2.cdf(chi2, n) > 1e-4
    # the ledger: `steps` Poisson-sampled Gaussians, and ε from dp_accounting's RDP called directly
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    assert [(e, c) for e, c in opt.accountant.ledger] == [(event, steps)]
    ref = dp_accounting.rdp.RdpAccountant(list(DEFAULT_ORDERS))
    ref.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    assert opt.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
