"""DPOptimizer and make_private against independent references."""


import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.accountants import make_accountant
from tests.grad_sample.reference import clipped_sum, per_example_grads


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _private(model, opt, **kw):
    kw.setdefault("max_grad_norm", 1.0)
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("sample_rate", 0.1)
    kw.setdefault("expected_batch_size", 8)
    return dpkit.make_private(model, opt, None, **kw)


def test_is_a_torch_optimizer_sharing_state():
    model = _mlp()
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    _, opt, _ = _private(model, base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data(8)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(5e-4)


@pytest.mark.parametrize("clipping", ["bk", "per_sample"])
@pytest.mark.parametrize("base_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop])
def test_no_noise_huge_clip_equals_non_private(clipping, base_cls):
    x, y = _data(32)
    private, plain = _mlp(), _mlp()
    kwargs = {"lr": 0.05}
    opt_p = base_cls(private.parameters(), **kwargs)
    opt_n = base_cls(plain.parameters(), **kwargs)
    _, opt_p, _ = _private(private, opt_p, noise_multiplier=0.0, max_grad_norm=1e6,
                           expected_batch_size=16, clipping=clipping)
    for step in range(3):
        xb, yb = x[16 * (step % 2):16 * (step % 2 + 1)], y[16 * (step % 2):16 * (step % 2 + 1)]
        for model, opt in ((private, opt_p), (plain, opt_n)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    for p, q in zip(private.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_batch_of_one_without_noise_has_clipped_norm_C():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _, opt, _ = _private(model, opt, noise_multiplier=0.0, max_grad_norm=0.01, expected_batch_size=1)
    x, y = _data(1)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    step_norm = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert step_norm.item() == pytest.approx(0.01, rel=1e-5)


def _noise_statistic(noise_multiplier_used, noise_multiplier_claimed, k=40, seed=0):
    """Σ‖Δw‖² over k zero-gradient steps, standardised by the CLAIMED noise (chi-square, k·d dof)."""
    model = _mlp()
    d = sum(p.numel() for p in model.parameters())
    lr, C, B = 0.1, 2.0, 8
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    _, opt, _ = _private(model, opt, noise_multiplier=noise_multiplier_used, max_grad_norm=C,
                         expected_batch_size=B, generator=torch.Generator().manual_seed(seed))
    total = 0.0
    x, y = _data(B)
    for _ in range(k):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        (0.0 * nn.functional.cross_entropy(model(x), y)).backward()  # zero per-example gradients
        opt.step()
        total += sum(((p - b) ** 2).sum().item() for p, b in zip(model.parameters(), before))
    scale = (lr * noise_multiplier_claimed * C / B) ** 2
    return total / scale, k * d


def test_noise_level_matches_claim_and_test_detects_wrong_noise():
    stat, dof = _noise_statistic(1.3, 1.3)
    p_value = 2 * min(stats.chi2.cdf(stat, dof), stats.chi2.sf(stat, dof))
    assert p_value > 1e-3
    stat, dof = _noise_statistic(1.3 * 0.9, 1.3)  # 10% too little noise must be caught
    assert stats.chi2.cdf(stat, dof) < 1e-3


def _train(seed, steps=4, **kw):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _, opt, _ = _private(model, opt, generator=torch.Generator().manual_seed(seed), **kw)
    x, y = _data(16)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_seeded_runs_identical_and_noise_fresh_each_step():
    a, _ = _train(5)
    b, _ = _train(5)
    c, _ = _train(6)
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q)
        assert not torch.equal(p, r)
    noise = dpkit.mechanisms.noise.GaussianNoise(torch.Generator().manual_seed(0))
    like = [torch.zeros(50)]
    assert not torch.equal(noise.sample(0, like)[0], noise.sample(1, like)[0])


def test_checkpoint_resume_continues_identically(tmp_path):
    model, opt = _train(3, steps=2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    x, y = _data(16)

    def more(model, opt):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    more(model, opt)
    model2 = _mlp(seed=99)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    _, opt2, _ = _private(model2, opt2, generator=torch.Generator().manual_seed(12345))
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert "module." not in "".join(ck["model"])  # no wrapper prefixes
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.steps == 2 and opt2.epsilon(1e-5) == pytest.approx(
        make_accountant("pld").compose(dpkit.accountants.dpsgd_event(1.0, 0.1, 2)).epsilon(1e-5))
    more(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.epsilon(1e-5) == pytest.approx(opt.epsilon(1e-5))


def test_epsilon_equals_dp_accounting_directly():
    import dp_accounting
    _, opt = _train(0, steps=7)
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 7)
    assert opt.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)


def test_virtual_batches_equal_one_big_batch():
    x, y = _data(64)
    ds = TensorDataset(x, y)

    def run(max_physical):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _, opt, loader = dpkit.make_private(
            model, opt, DataLoader(ds, batch_size=32), noise_multiplier=0.7, max_grad_norm=0.5,
            max_physical_batch_size=max_physical, generator=torch.Generator().manual_seed(1))
        sizes = []
        for xb, yb in loader:
            sizes.append(len(xb))
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        return model, opt.steps, sizes

    big, steps_big, sizes_big = run(None)
    small, steps_small, sizes_small = run(5)
    assert steps_big == steps_small == 2
    assert max(sizes_small) <= 5 and sum(sizes_small) == sum(sizes_big)
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_empty_poisson_batch_adds_noise_and_counts_step():
    x, y = _data(20)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, loader = dpkit.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=1),
                                        noise_multiplier=1.0, max_grad_norm=1.0,
                                        generator=torch.Generator().manual_seed(0))
    loader.batch_sampler.sample_rate = 1e-9  # force empty batches (test only)
    xb, yb = next(iter(loader))
    assert xb.shape == (0, 6) and yb.shape == (0,)
    opt.zero_grad()
    nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()
    opt.step()
    assert opt.steps == 1
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = torch.tanh(self.mix(h)) + self.mix(h)  # a layer used twice
        return self.out(h)


@pytest.mark.parametrize("clipping", ["bk", "per_sample"])
def test_whole_models_tied_and_frozen_match_reference(clipping):
    torch.manual_seed(0)
    model = TiedLM().double()
    model.norm.bias.requires_grad_(False)  # a frozen parameter
    ids = torch.randint(0, 11, (5, 7))
    ids[0, :3] = 0
    targets = torch.randint(0, 11, (5, 7))

    def loss_fn(m, inp):
        logits = m(inp[0])
        return nn.functional.cross_entropy(logits.reshape(-1, 11), inp[1].reshape(-1), reduction="sum")

    ref = per_example_grads(model, (ids, targets), loss_fn)
    expected = clipped_sum(ref, 0.7)
    engine = dpkit.GradientEngine(model, max_grad_norm=0.7, mode=clipping, loss_reduction="sum")
    loss_fn(model, (ids, targets)).backward()
    engine.accumulate()
    for p in model.parameters():
        if p.requires_grad:
            torch.testing.assert_close(engine.clipped_sum(p), expected[id(p)])


def test_cnn_bk_equals_per_sample_engine():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    sums = []
    for mode in ("bk", "per_sample"):
        model = make()
        engine = dpkit.GradientEngine(model, max_grad_norm=0.1, mode=mode)
        nn.functional.cross_entropy(model(x), y).backward()
        engine.accumulate()
        sums.append([engine.clipped_sum(p) for p in model.parameters()])
    for a, b in zip(*sums):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_batchnorm_refused_with_fix_and_replace_helper():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(dpkit.UnsupportedModuleError, match=r"'1'.*BatchNorm2d.*replace_batchnorm"):
        _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model = dpkit.replace_batchnorm(model)
    assert isinstance(model[1], nn.GroupNorm)
    _private(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_gradient_outside_hooks_is_refused():
    model = _mlp()
    stray = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, _ = _private(model, opt)
    x, y = _data(4)
    with torch.no_grad():
        model.eval()
        h = model(x)  # not captured: eval mode
    model.train()
    loss = nn.functional.cross_entropy(model(x), y) + 0 * stray(h).sum()
    model[2].weight.grad = None
    loss.backward()
    model[0].weight.grad = torch.ones_like(model[0].weight)  # simulate an uncaptured use
    opt.engine.summed_grads.clear()
    opt.engine._records.clear()
    opt.engine.examples_seen = 1
    with pytest.raises(RuntimeError, match="did not see"):
        opt._check_all_gradients_seen()


def test_calibrated_run_stops_at_budget():
    x, y = _data(40)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, loader = dpkit.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=10),
                                        target_epsilon=3.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0)
    assert opt.max_steps == 4
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    assert opt.epsilon(1e-5) <= 3.0
    with pytest.raises(dpkit.PrivacyBudgetExceeded):
        opt.step()


def _bad(**overrides):
    model = _mlp()
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.1, expected_batch_size=8)
    kw.update(overrides)
    opt = kw.pop("optimizer", torch.optim.SGD(model.parameters(), lr=0.1))
    model = kw.pop("model", model)
    loader = kw.pop("data_loader", None)
    return dpkit.make_private(model, opt, loader, **kw)


@pytest.mark.parametrize("overrides,error,match", [
    ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
    ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
    ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm"),
    ({"noise_multiplier": -0.5}, ValueError, "noise_multiplier"),
    ({"noise_multiplier": None}, ValueError, "exactly one of noise_multiplier and target_epsilon"),
    ({"target_epsilon": 1.0}, ValueError, "exactly one"),
    ({"noise_multiplier": None, "target_epsilon": 1.0, "steps": 10}, ValueError, "target_delta"),
    ({"noise_multiplier": None, "target_epsilon": 1.0, "target_delta": 1e-5}, ValueError, "epochs= or steps="),
    ({"noise_multiplier": None, "target_epsilon": 1.0, "target_delta": 1.5, "steps": 10}, ValueError, "target_delta"),
    ({"sample_rate": 0.0}, ValueError, "sample_rate"),
    ({"sample_rate": 1.5}, ValueError, "sample_rate"),
    ({"sample_rate": None}, ValueError, "sample_rate and expected_batch_size are required"),
    ({"expected_batch_size": -3}, ValueError, "expected_batch_size"),
    ({"optimizer": "sgd"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
    ({"model": "net"}, TypeError, "model must be a torch.nn.Module"),
    ({"model": nn.Linear(6, 3).requires_grad_(False),
      "optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)}, ValueError, "trainable"),
    ({"optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)}, ValueError, "not a trainable parameter of the model"),
    ({"clipping": "ghost"}, ValueError, "clipping must be one of"),
    ({"clip_scope": "layer"}, ValueError, "clip_scope"),
    ({"loss_reduction": "avg"}, ValueError, "loss_reduction"),
    ({"accountant": "nope"}, ValueError, "nope"),
    ({"epochs": 1, "steps": 3}, ValueError, "epochs or steps"),
    ({"data_loader": [1, 2]}, TypeError, "data_loader must be a torch DataLoader"),
    ({"generator": 3}, TypeError, "generator"),
    ({"poisson_sampling": "yes"}, TypeError, "poisson_sampling"),
])
def test_bad_input_named(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad(**overrides)


def test_secure_mode_noise_is_standard_normal():
    noise = dpkit.mechanisms.noise.GaussianNoise(secure_mode=True)
    z = noise.sample(0, [torch.zeros(20000, dtype=torch.float64)])[0].numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    z2 = noise.sample(0, [torch.zeros(20000, dtype=torch.float64)])[0].numpy()
    assert not np.array_equal(z, z2)  # not reproducible: OS entropy


@pytest.mark.parametrize("clipping", ["bk", "per_sample"])
def test_gradient_accumulation_equals_one_batch(clipping):
    x, y = _data(12)
    results = []
    for chunks in (1, 3):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        _, opt, _ = _private(model, opt, noise_multiplier=0.0, max_grad_norm=0.2,
                             expected_batch_size=12, clipping=clipping, loss_reduction="sum")
        opt.zero_grad()
        for xb, yb in zip(x.chunk(chunks), y.chunk(chunks)):  # backward per chunk, one step
            nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_grad_scaler_refused_clearly():
    model = _mlp()
    _, opt, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu")
    x, y = _data(4)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(TypeError, match="GradScaler is not supported"):
        scaler.step(opt)


def test_submodule_calls_without_root_forward_are_not_merged_across_batches():
    # two batches through a SUB-module (the root pre-hook never fires), one step: each example must
    # be clipped on its own; merged "examples" g and -g would cancel and escape clipping
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    lin = model[0]
    engine = dpkit.GradientEngine(model, max_grad_norm=1.0, loss_reduction="sum")
    x = torch.tensor([[10.0, 0.0, 0.0]])
    lin(x).sum().backward()
    lin(-x / 2).sum().backward()
    engine.accumulate()
    # separately: two examples clipped to norm C = 1 in opposite directions sum to 0; merged, they
    # would form ONE example (G - G/2) clipped to norm 1, a non-zero sum
    assert engine.examples_seen == 2
    torch.testing.assert_close(engine.clipped_sum(lin.weight), torch.zeros(2, 3))


def test_noise_multiplier_and_clip_norm_are_fixed_for_the_run():
    """A noise/clip scheduler would change the mechanism behind the ledger's back: refused."""
    model = _mlp()
    _, opt, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(AttributeError, match="noise_multiplier is fixed"):
        opt.noise_multiplier = 0.01
    with pytest.raises(AttributeError, match="max_grad_norm is fixed"):
        opt.max_grad_norm = 10.0
    assert opt.noise_multiplier == 1.0 and opt.max_grad_norm == 1.0
