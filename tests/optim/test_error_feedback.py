"""DiceSGD error feedback vs independent references (hand recurrences, DP-SGD, closed-form Gaussian ε)."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from dp_accounting import pld as dp_pld
from dp_accounting import dp_event as dpe
from scipy import special

import dpkit
from dpkit.accountants import dpsgd_event, make_accountant
from dpkit.grad_sample import GradientEngine
from dpkit.optim.dp_optimizer import DPOptimizer
from dpkit.optim.error_feedback import (
    ErrorFeedback,
    attach_error_feedback,
    calibrate_dicesgd_noise,
    configure_error_feedback,
    default_noise_split,
    dicesgd_event,
)


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _data(n=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    x[::5] *= 30.0  # a few examples with huge gradients: clipping bias is real
    return x, torch.randint(0, 3, (n,), generator=g)


def _dp(model, base, *, clip1, sigma, batch, q=0.25, mode="bk", unclipped=True, seed=7):
    engine = GradientEngine(model, max_grad_norm=clip1, mode=mode, loss_reduction="sum",
                            track_unclipped=unclipped)
    return DPOptimizer(base, engine=engine, noise_multiplier=sigma, expected_batch_size=batch,
                       step_event=dpsgd_event(sigma, q), accountant=make_accountant("pld"),
                       generator=torch.Generator().manual_seed(seed))


def _step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_clip2_zero_is_dpsgd_exactly(mode):
    x, y = _data()
    a, b = _mlp(), _mlp()
    opt_a = _dp(a, torch.optim.SGD(a.parameters(), lr=0.1), clip1=0.5, sigma=1.3, batch=24, mode=mode)
    opt_b = _dp(b, torch.optim.SGD(b.parameters(), lr=0.1), clip1=0.5, sigma=1.3, batch=24, mode=mode)
    attach_error_feedback(opt_b, clip2=0.0, sampling_prob=0.25)
    for _ in range(4):
        _step(a, opt_a, x, y)
        _step(b, opt_b, x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert opt_b.step_event == opt_a.step_event  # C2 = 0 is accounted as DP-SGD itself


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("base_cls", [torch.optim.SGD, torch.optim.Adam])
def test_no_noise_huge_thresholds_is_plain_training(mode, base_cls):
    x, y = _data(dtype=torch.float64)
    private, plain = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    opt = _dp(private, base_cls(private.parameters(), lr=0.05), clip1=1e8, sigma=0.0, batch=24, mode=mode)
    attach_error_feedback(opt, clip2=1e8, sampling_prob=0.25)
    ref = base_cls(plain.parameters(), lr=0.05)
    for _ in range(3):
        _step(private, opt, x, y)
        ref.zero_grad()
        (nn.functional.cross_entropy(plain(x), y, reduction="sum") / 24).backward()
        ref.step()
    for p, r in zip(private.parameters(), plain.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_error_state_follows_paper_update_by_hand(mode):
    """Least squares, σ = 0: per-example gradients, clips and the recurrence computed in numpy."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(6, 2)) * np.array([[1.0], [4.0], [0.3], [6.0], [1.0], [2.0]])
    Y = rng.normal(size=6)
    C1, C2, B, lr = 0.8, 0.5, 4.0, 0.1  # B̄ deliberately differs from the realised batch of 6
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2]], dtype=torch.float64))
    opt = _dp(model, torch.optim.SGD(model.parameters(), lr=lr), clip1=C1, sigma=0.0, batch=B, mode=mode)
    fb = attach_error_feedback(opt, clip2=C2, sampling_prob=0.5)
    w, e = np.array([0.3, -0.2]), np.zeros(2)
    xt, yt = torch.tensor(X), torch.tensor(Y)
    clipped_e_seen = False
    for _ in range(6):
        g = (X @ w - Y)[:, None] * X                      # ∇ ½(w·x − y)² per example
        norms = np.linalg.norm(g, axis=1)
        cg = g * np.minimum(1.0, C1 / norms)[:, None]
        ne = np.linalg.norm(e)
        ce = e * min(1.0, C2 / ne) if ne > 0 else e
        clipped_e_seen |= ne > C2
        v = cg.sum(0) / B + ce                              # Alg. 1: v_t
        e = e + g.sum(0) / B - v                            # Alg. 1: e_{t+1} = e_t + mean g − v_t
        w = w - lr * v
        opt.zero_grad()
        (0.5 * (model(xt).squeeze(1) - yt) ** 2).sum().backward()
        opt.step()
        np.testing.assert_allclose(model.weight.detach().numpy()[0], w, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(fb.error[0].numpy()[0], e, rtol=1e-11, atol=1e-13)
    assert clipped_e_seen  # the test exercised the clipped branch of the feedback


def test_feedback_removes_clipping_bias_over_time():
    """σ = 0, C2 large: the cumulative update equals the cumulative UNCLIPPED gradient up to one step."""
    x, y = _data(dtype=torch.float64)
    model = _mlp(dtype=torch.float64)
    opt = _dp(model, torch.optim.SGD(model.parameters(), lr=0.0), clip1=0.05, sigma=0.0, batch=24)
    fb = attach_error_feedback(opt, clip2=1e6, sampling_prob=0.25)
    delivered = [torch.zeros_like(p) for p in model.parameters()]
    for _ in range(3):
        _step(model, opt, x, y)
        delivered = [d + p.grad for d, p in zip(delivered, model.parameters())]
    # lr = 0: same gradient every step; after 3 steps delivered = 3·mean g − e_3, with e_3 = mean(g − clip g)
    twin = _mlp(dtype=torch.float64)  # same weights (lr = 0), no dpkit hooks
    nn.functional.cross_entropy(twin(x), y, reduction="sum").backward()
    for d, p, e in zip(delivered, twin.parameters(), fb.error):
        torch.testing.assert_close(d + e, 3 * p.grad / 24, rtol=1e-9, atol=1e-12)
        assert e.abs().max() > 0


def test_one_example_moves_every_later_output_by_about_c2():
    """Why the feedback part is accounted without amplification: an example with a huge gradient
    that took part ONCE shifts the released update of each later step by ≈ C2 (mean units)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 2, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    outlier_x, outlier_y = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([1e6], dtype=torch.float64)
    C1, C2, B = 1.0, 0.05, 20.0
    released = []
    for with_outlier in (False, True):
        model = nn.Linear(2, 1, bias=False).double()
        with torch.no_grad():
            model.weight.zero_()
        opt = _dp(model, torch.optim.SGD(model.parameters(), lr=0.0), clip1=C1, sigma=0.0, batch=B)
        attach_error_feedback(opt, clip2=C2, sampling_prob=1.0)
        updates = []
        for t in range(12):
            xb, yb = (torch.cat([x, outlier_x]), torch.cat([y, outlier_y])) if with_outlier and t == 0 else (x, y)
            opt.zero_grad()
            (0.5 * (model(xb).squeeze(1) - yb) ** 2).sum().backward()
            opt.step()
            updates.append(model.weight.grad.clone())
        released.append(updates)
    shifts = [float((a - b).norm()) for a, b in zip(*released)]
    assert shifts[0] == pytest.approx(C1 / B, rel=1e-9)        # the step it was sampled in: C1/B̄
    assert all(s > 0.9 * C2 for s in shifts[1:])                 # every later step: ≈ C2 ≫ C1/B̄


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_are_refused(dtype):
    """A bf16/fp16 clipped sum is rounded before the noise: outside the Gaussian analysis."""
    model = _mlp().to(dtype)
    with pytest.raises(TypeError, match="float32 parameters.*autocast"):
        _dp(model, torch.optim.SGD(model.parameters(), lr=0.1), clip1=0.1, sigma=1.0, batch=8)


@pytest.mark.parametrize("q,sigma,c2,b", [(0.01, 1.0, 1e-3, 50), (0.1, 2.0, 0.01, 10), (0.05, 3.0, 0.002, 64)])
def test_epsilon_at_least_dpsgd_vs_dp_accounting(q, sigma, c2, b):
    steps = 200
    ref = dp_pld.PLDAccountant()
    ref.compose(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)
    eps_dpsgd = ref.get_epsilon(1e-5)
    acc = make_accountant("pld").compose(dicesgd_event(sigma, q, steps, clip1=1.0, clip2=c2,
                                                       expected_batch_size=b))
    assert acc.epsilon(1e-5) > eps_dpsgd
    zero = make_accountant("pld").compose(dicesgd_event(sigma, q, steps, clip1=1.0, clip2=0.0,
                                                        expected_batch_size=b))
    assert zero.epsilon(1e-5) == pytest.approx(eps_dpsgd, rel=1e-3)  # dpkit PLD discretises finer


def _gaussian_delta(mu, eps):
    """Balle & Wang (2018) Thm. 8: exact δ(ε) of the Gaussian mechanism with μ = Δ/s."""
    phi = lambda t: 0.5 * special.erfc(-t / math.sqrt(2))  # noqa: E731
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


def test_full_batch_event_is_the_gaussian_of_the_split_sensitivities():
    """q = 1: the step is two Gaussians, i.e. ONE Gaussian with μ² = (C1/s_A)² + (2B̄C2/s_B)²."""
    sigma, c1, c2, b, f, steps = 3.0, 1.0, 0.02, 20.0, 0.4, 10
    s = sigma * c1
    mu = math.sqrt(steps * ((c1 / (s * math.sqrt(f))) ** 2 + (2 * b * c2 / (s * math.sqrt(1 - f))) ** 2))
    delta = _gaussian_delta(mu, 1.5)
    got = make_accountant("pld").compose(
        dicesgd_event(sigma, 1.0, steps, clip1=c1, clip2=c2, expected_batch_size=b, noise_split=f))
    assert got.delta(1.5) == pytest.approx(delta, rel=2e-2)
    assert got.delta(1.5) >= delta * (1 - 1e-3)  # PLD discretisation is pessimistic


def test_default_split_beats_other_splits_in_gdp_proxy():
    q, c1, c2, b = 0.02, 1.0, 0.005, 50
    f0 = default_noise_split(q, clip1=c1, clip2=c2, expected_batch_size=b)
    proxy = lambda f: q ** 2 * c1 ** 2 / f + (2 * b * c2) ** 2 / (1 - f)  # noqa: E731
    grid = np.linspace(0.01, 0.99, 99)
    assert proxy(f0) <= min(proxy(f) for f in grid) + 1e-12


def test_calibration_never_overshoots():
    kw = dict(clip1=1.0, clip2=0.002, expected_batch_size=50)
    sigma = calibrate_dicesgd_noise(4.0, 1e-5, 0.05, 100, **kw)
    eps = lambda s: make_accountant("pld").compose(dicesgd_event(s, 0.05, 100, **kw)).epsilon(1e-5)  # noqa: E731
    assert eps(sigma) <= 4.0 < eps(sigma * (1 - 2e-3))
    assert sigma > calibrate_dicesgd_noise(4.0, 1e-5, 0.05, 100, clip1=1.0, clip2=0.0, expected_batch_size=50)


def test_state_dict_round_trip_and_hidden_state():
    x, y = _data()
    model = _mlp()
    opt = _dp(model, torch.optim.SGD(model.parameters(), lr=0.1), clip1=0.1, sigma=0.5, batch=24)
    fb = attach_error_feedback(opt, clip2=0.01, sampling_prob=0.25)
    _step(model, opt, x, y)
    state = fb.state_dict()
    other = ErrorFeedback(opt, clip2=0.01)
    other.load_state_dict(state)
    for a, b in zip(other.error, fb.error):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="clip2"):
        ErrorFeedback(opt, clip2=0.02).load_state_dict(state)


def test_epsilon_of_the_run_matches_event():
    x, y = _data()
    model = _mlp()
    opt = _dp(model, torch.optim.SGD(model.parameters(), lr=0.1), clip1=1.0, sigma=2.0, batch=24, q=0.1)
    attach_error_feedback(opt, clip2=0.003, sampling_prob=0.1)
    for _ in range(5):
        _step(model, opt, x, y)
    ref = make_accountant("pld").compose(dicesgd_event(2.0, 0.1, 5, clip1=1.0, clip2=0.003,
                                                       expected_batch_size=24))
    assert opt.epsilon(1e-5) == pytest.approx(ref.epsilon(1e-5), rel=1e-9)


def _fresh_opt(unclipped=True):
    model = _mlp()
    return _dp(model, torch.optim.SGD(model.parameters(), lr=0.1), clip1=1.0, sigma=1.0, batch=8,
               unclipped=unclipped)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(clip2=-1.0, sampling_prob=0.1), ValueError, "clip2"),
    (dict(clip2="a", sampling_prob=0.1), TypeError, "clip2"),
    (dict(clip2=0.1, sampling_prob=0.0), ValueError, "sampling_prob"),
    (dict(clip2=0.1, sampling_prob=1.5), ValueError, "sampling_prob"),
    (dict(clip2=0.1, sampling_prob=0.1, noise_split=1.0), ValueError, "noise_split"),
    (dict(clip2=0.1, sampling_prob=0.1, noise_split=0.0), ValueError, "noise_split"),
    (dict(clip2=float("nan"), sampling_prob=0.1), ValueError, "clip2"),
])
def test_attach_invalid_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        attach_error_feedback(_fresh_opt(), **kwargs)


def test_attach_invalid_optimizers():
    with pytest.raises(TypeError, match="optimizer"):
        attach_error_feedback(torch.optim.SGD(_mlp().parameters(), lr=0.1), clip2=0.1, sampling_prob=0.1)
    with pytest.raises(ValueError, match="track_unclipped"):
        attach_error_feedback(_fresh_opt(unclipped=False), clip2=0.1, sampling_prob=0.1)
    opt = _fresh_opt()
    attach_error_feedback(opt, clip2=0.1, sampling_prob=0.1)
    with pytest.raises(ValueError, match="already"):
        attach_error_feedback(opt, clip2=0.1, sampling_prob=0.1)
    opt = _fresh_opt()
    x, y = _data(8)
    _step(opt.engine.model, opt, x, y)
    with pytest.raises(ValueError, match="stepped"):
        attach_error_feedback(opt, clip2=0.1, sampling_prob=0.1)


@pytest.mark.parametrize("config,exc,match", [
    ([("clip2", 0.1)], TypeError, "error_feedback"),
    ({"clip_2": 0.1}, ValueError, "clip_2"),
    ({}, ValueError, "clip2"),
    ({"clip2": 0.1, "noise_split": 2.0}, ValueError, "noise_split"),
])
def test_configure_invalid(config, exc, match):
    with pytest.raises(exc, match=match):
        configure_error_feedback(_fresh_opt(), config, sampling_prob=0.1)
    with pytest.raises(ValueError, match="Poisson"):
        configure_error_feedback(_fresh_opt(), {"clip2": 0.1}, sampling_prob=0.1, poisson_sampling=False)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(clip1=0.0, clip2=0.1, expected_batch_size=8), ValueError, "clip1"),
    (dict(clip1=1.0, clip2=-0.1, expected_batch_size=8), ValueError, "clip2"),
    (dict(clip1=1.0, clip2=0.1, expected_batch_size=0), ValueError, "expected_batch_size"),
    (dict(clip1=1.0, clip2=0.1, expected_batch_size=8, noise_split=1.5), ValueError, "noise_split"),
    (dict(clip1=None, clip2=0.1, expected_batch_size=8), TypeError, "clip1"),
])
def test_event_invalid_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dicesgd_event(1.0, 0.1, 10, **kwargs)
    with pytest.raises(ValueError, match="steps"):
        dicesgd_event(1.0, 0.1, 0, clip1=1.0, clip2=0.1, expected_batch_size=8)


def test_zero_noise_is_non_private():
    acc = make_accountant("pld").compose(dicesgd_event(0.0, 0.1, 3, clip1=1.0, clip2=0.1, expected_batch_size=8))
    assert acc.epsilon(1e-5) == math.inf


def test_make_private_keyword_recalibrates_for_target():
    model = _mlp()
    _, opt, _ = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                   max_grad_norm=1.0, target_epsilon=3.0, target_delta=1e-5, steps=50,
                                   sample_rate=0.1, expected_batch_size=10,
                                   error_feedback={"clip2": 0.001})
    ledger = make_accountant("pld").compose(opt.step_event, 50)
    assert 0.99 * 3.0 < ledger.epsilon(1e-5) <= 3.0
    # DP-SGD alone at this σ is strictly below the target: the feedback part costs extra
    assert make_accountant("pld").compose(dpsgd_event(opt.noise_multiplier, 0.1, 50)).epsilon(1e-5) < 2.9
    assert opt.engine.track_unclipped and opt.max_steps == 50


def test_make_private_keyword_trains_and_refuses_fixed_size():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _data(40)
    model = _mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    _, opt, dl = dpkit.make_private(model, torch.optim.Adam(model.parameters(), lr=1e-2), loader,
                                    max_grad_norm=1.0, noise_multiplier=2.0, error_feedback={"clip2": 0.01},
                                    generator=torch.Generator().manual_seed(0))
    for xb, yb in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    ref = make_accountant("pld").compose(dicesgd_event(2.0, 0.25, opt.steps, clip1=1.0, clip2=0.01,
                                                       expected_batch_size=10))
    assert opt.epsilon(1e-5) == pytest.approx(ref.epsilon(1e-5), rel=1e-9)
    other = _mlp()
    with pytest.raises(ValueError, match="Poisson"):
        dpkit.make_private(other, torch.optim.SGD(other.parameters(), lr=0.1), loader, max_grad_norm=1.0,
                           noise_multiplier=1.0, poisson_sampling=False, error_feedback={"clip2": 0.01})
