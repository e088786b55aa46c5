"""DiceSGD with an enforced gradient bound: each inequality of the proof checked numerically.

References are independent of dpkit's code: float64 microbatch-of-1 gradients, coupled runs of the
real optimizer, scipy quadrature / binomial tails, dp_accounting called directly.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from dp_accounting import dp_event as dpe
from dp_accounting import pld as dp_pld
from scipy import integrate, stats

import dpkit
from dpkit.accountants import dpsgd_event, make_accountant
from dpkit.errors import CalibrationError, UnsupportedEventError
from dpkit.grad_sample import GradientEngine
from dpkit.optim.dicesgd_bounded import (
    BoundedDiceSGDAccountant,
    bounded_dicesgd_epsilon,
    calibrate_bounded_dicesgd_noise,
    gaussian_dp_delta,
    participation_delta,
    truncation_count,
)
from dpkit.optim.dp_optimizer import DPOptimizer
from dpkit.optim.error_feedback import attach_error_feedback


def _clip(v, c):
    n = np.linalg.norm(v)
    return v if n <= c else v * (c / n)


def _optimizer(model, *, clip1, batch, clip_function="standard", mode="bk", sigma=0.0, q=0.25):
    engine = GradientEngine(model, max_grad_norm=clip1, mode=mode, loss_reduction="sum",
                            track_unclipped=True, clip_function=clip_function)
    return DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), engine=engine, noise_multiplier=sigma,
                       expected_batch_size=batch, step_event=dpsgd_event(sigma, q),
                       accountant=make_accountant("pld"), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ the engine enforces G
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("scope", ["flat", "per_layer"])
def test_second_clip_matches_microbatch_of_one_gradients(mode, scope):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(12, 5, dtype=torch.float64)
    x[::3] *= 30.0
    y = torch.randint(0, 3, (12,))
    c1, g_bound, batch = 0.5, 0.8, 12.0
    engine = GradientEngine(model, max_grad_norm=c1, mode=mode, loss_reduction="sum", track_unclipped=True,
                            clip_scope=scope)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), engine=engine, noise_multiplier=0.0,
                      expected_batch_size=batch, step_event=dpsgd_event(0.0, 0.25))
    fb = attach_error_feedback(opt, clip2=1.0, sampling_prob=0.25, gradient_bound=g_bound)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    expected = [torch.zeros_like(p) for p in ref.parameters()]
    n_params, clipped_at_g = len(expected), 0
    for i in range(len(x)):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        grads = [p.grad.clone() for p in ref.parameters()]
        if scope == "flat":
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            norms, c1s, gs = [norm] * n_params, [c1] * n_params, [g_bound] * n_params
        else:
            norms = [float(g.norm()) for g in grads]
            c1s, gs = [c1 / math.sqrt(n_params)] * n_params, [g_bound / math.sqrt(n_params)] * n_params
        residual = [g * (min(1.0, b / n) - min(1.0, a / n)) for g, n, a, b in zip(grads, norms, c1s, gs)]
        clipped_at_g += any(n > b for n, b in zip(norms, gs))
        # the residual each example leaves is bounded by G − C1 by construction
        assert math.sqrt(sum(float(r.pow(2).sum()) for r in residual)) <= g_bound - c1 + 1e-12
        for e, r in zip(expected, residual):
            e += r
    # e_1 = e_0 − clip(e_0) + residual/B̄ with e_0 = 0
    for e, r in zip(fb.error, expected):
        torch.testing.assert_close(e * batch, r, rtol=1e-9, atol=1e-10)
    assert clipped_at_g > 0  # the second clip acted on this batch


# ------------------------------------------------------------------ Lemma A
def test_lemma_a_projection_is_firmly_nonexpansive():
    rng = np.random.default_rng(0)
    for dim in (1, 2, 3, 7):
        for _ in range(2000):
            radius = rng.uniform(0.1, 3.0)
            x, y = rng.normal(size=(2, dim)) * rng.uniform(0.1, 5.0, size=(2, 1))
            px, py = _clip(x, radius), _clip(y, radius)
            lhs = np.sum((px - py) ** 2) + np.sum(((x - px) - (y - py)) ** 2)
            assert lhs <= np.sum((x - y) ** 2) * (1 + 1e-12) + 1e-15
    # the weaker "1-Lipschitz" inequalities alone would not give the energy bound: the sum is needed,
    # and it is tight for points inside the ball (then (I−P) vanishes and P is the identity)
    x, y = np.array([0.1, 0.2]), np.array([-0.3, 0.1])
    assert np.sum((_clip(x, 1) - _clip(y, 1)) ** 2) == pytest.approx(np.sum((x - y) ** 2))


# ------------------------------------------------------------------ Lemma B + steps 2 and 5 on the real optimizer
def _coupled_run(gradient_bound, *, seed, steps=40, clip1=1.0, clip2=0.5, batch=4.0, q=0.3):
    """Two DiceSGD runs (D and D' = D + canary) with a common history (lr = 0, σ = 0).

    Returns per step: ‖E_t‖ (sum units), d_t, ‖m_t‖ (difference of the released sums) and k_t.
    """
    rng = np.random.default_rng(seed)
    d = 4
    worlds = []
    for _ in range(2):
        torch.manual_seed(seed)
        model = nn.Linear(d, 1).double()
        opt = _optimizer(model, clip1=clip1, batch=batch)
        fb = attach_error_feedback(opt, clip2=clip2, sampling_prob=q, gradient_bound=gradient_bound)
        worlds.append((model, opt, fb))
    x_star = torch.tensor(rng.normal(size=(1, d)) * 50.0)
    y_star = torch.tensor([[300.0]], dtype=torch.float64)
    rows = []
    k = 0
    for _ in range(steps):
        # others: a few examples, some with huge gradients in fresh directions (saturate and rotate e)
        n = int(rng.integers(1, 5))
        x = torch.tensor(rng.normal(size=(n, d)) * rng.choice([1.0, 40.0], size=(n, 1)))
        y = torch.tensor(rng.normal(size=(n, 1)) * 40.0)
        sampled = rng.random() < q
        errors, grads = [], []
        for world, (model, opt, fb) in enumerate(worlds):
            xb, yb = (torch.cat([x, x_star]), torch.cat([y, y_star])) if world and sampled else (x, y)
            errors.append(None if fb.error is None else [e.clone() for e in fb.error])
            opt.zero_grad()
            nn.functional.mse_loss(model(xb), yb, reduction="sum").backward()
            opt.step()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        if errors[0] is None:
            e_diff, d_t = 0.0, 0.0
        else:
            e0 = torch.cat([e.flatten() for e in errors[0]]).numpy()
            e1 = torch.cat([e.flatten() for e in errors[1]]).numpy()
            e_diff = batch * np.linalg.norm(e1 - e0)
            d_t = batch * np.linalg.norm(_clip(e1, clip2) - _clip(e0, clip2))
        m_t = batch * float((grads[1] - grads[0]).norm())  # σ = 0: the released sums differ by m_t
        rows.append((e_diff, d_t, m_t, k))
        k += sampled
    return rows, k


@pytest.mark.parametrize("seed", range(4))
def test_lemma_b_energy_and_total_sensitivity_on_coupled_runs(seed):
    clip1, clip2, batch, g_bound = 1.0, 0.5, 4.0, 1.6
    residual = g_bound - clip1
    rows, k = _coupled_run(g_bound, seed=seed, clip1=clip1, clip2=clip2, batch=batch)
    assert k >= 3  # the canary participated enough for the bound to bite
    energy = 0.0
    for e_diff, d_t, m_t, k_t in rows:
        # Lemma B: ‖E_t‖² + Σ_{s<t} d_s² ≤ (k_t Δ)²  (k_t = participations before t)
        assert e_diff ** 2 + energy <= (k_t * residual) ** 2 * (1 + 1e-9) + 1e-12
        assert d_t <= 2 * batch * clip2 * (1 + 1e-12)
        energy += d_t ** 2
    assert rows[0][1] == 0.0  # d_1 = 0
    total = math.sqrt(sum(m ** 2 for _, _, m, _ in rows))
    steps = len(rows)
    bound = math.sqrt(k) * clip1 + min(k * residual, math.sqrt(steps - 1) * 2 * batch * clip2)
    assert total <= bound * (1 + 1e-9)
    # the feedback really carries the canary's residual (the bound is not vacuous here)
    assert energy > 0.05 * (k * residual) ** 2


def test_energy_bound_fails_without_the_second_clip():
    # the same coupled run without G: the canary's residual is unbounded and Lemma B's bound for
    # G = 1.6 is exceeded (the inequality the test above checks can fail)
    rows, _ = _coupled_run(None, seed=0)
    energy, excess = 0.0, []
    for e_diff, d_t, _, k_t in rows:
        excess.append(e_diff ** 2 + energy - (k_t * 0.6) ** 2)
        energy += d_t ** 2
    assert max(excess) > 100.0


# ------------------------------------------------------------------ step 6 and the mixture over k
def test_gaussian_dp_delta_matches_dp_accounting():
    for mu in (0.3, 1.0, 2.5):
        pld = dp_pld.PLDAccountant().compose(dpe.GaussianDpEvent(1.0 / mu))
        for eps in (0.0, 0.5, 2.0, 8.0):
            ref = pld.get_delta(eps)
            assert float(gaussian_dp_delta(mu, eps)) == pytest.approx(ref, rel=2e-3, abs=1e-12)


def test_participation_delta_matches_quadrature():
    sigma, q, steps, c1, c2, g, b = 2.0, 0.3, 12, 1.0, 0.2, 1.4, 5.0
    for eps in (0.3, 1.5, 4.0):
        ref = 0.0
        for k in range(1, steps + 1):
            mu = (math.sqrt(k) * c1 + min(k * (g - c1), math.sqrt(steps - 1) * 2 * b * c2)) / (sigma * c1)
            # hockey stick H_{e^ε}(N(μ,1) ‖ N(0,1)) by quadrature over the region where it is positive
            x0 = eps / mu + mu / 2
            hs = integrate.quad(lambda x: stats.norm.pdf(x, mu) - math.exp(eps) * stats.norm.pdf(x), x0, np.inf)[0]
            ref += math.comb(steps, k) * q ** k * (1 - q) ** (steps - k) * hs
        got = participation_delta(eps, sigma, q, steps, clip1=c1, clip2=c2, gradient_bound=g, expected_batch_size=b)
        assert got == pytest.approx(ref, rel=1e-6)


def test_truncation_count_against_scipy_binomial_tail():
    for steps, q in ((400, 0.05), (50, 0.3), (1000, 0.001)):
        for tail in (1e-3, 1e-6, 1e-9):
            k = truncation_count(steps, q, tail)
            pmf = [math.comb(steps, j) * q ** j * (1 - q) ** (steps - j) for j in range(steps + 1)]
            assert sum(pmf[k + 1:]) <= tail * (1 + 1e-9)
            assert k == 0 or sum(pmf[k:]) > tail  # the smallest such K
            assert stats.binom.sf(k, steps, q) <= tail
    assert truncation_count(10, 0.5, 0.0) == 10


def test_gradient_bound_equal_to_clip1_is_dpsgd_exactly():
    sigma, q, steps, delta = 1.1, 0.05, 300, 1e-5
    ref = dp_pld.PLDAccountant(value_discretization_interval=1e-4).compose(
        dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)).get_epsilon(delta)
    got = bounded_dicesgd_epsilon(sigma, q, steps, delta, clip1=1.0, clip2=0.3, gradient_bound=1.0,
                                  expected_batch_size=50)
    assert got == pytest.approx(ref, rel=1e-2)


def test_bound_is_above_dpsgd_and_grows_with_g():
    sigma, q, steps, delta = 4.0, 0.05, 300, 1e-5
    dpsgd = make_accountant("pld").compose(dpsgd_event(sigma, q, steps)).epsilon(delta)
    eps = [bounded_dicesgd_epsilon(sigma, q, steps, delta, clip1=1.0, clip2=0.01, gradient_bound=g,
                                   expected_batch_size=50) for g in (1.0, 1.05, 1.3, 2.0)]
    assert eps[0] == pytest.approx(dpsgd, rel=1e-6)
    assert all(a <= b for a, b in zip(eps, eps[1:])) and eps[-1] > dpsgd


def test_calibration_meets_the_target_and_is_tight():
    kw = dict(clip1=1.0, clip2=0.05, gradient_bound=1.2, expected_batch_size=10)
    sigma = calibrate_bounded_dicesgd_noise(3.0, 1e-5, 0.1, 50, rtol=1e-3, **kw)
    assert bounded_dicesgd_epsilon(sigma, 0.1, 50, 1e-5, **kw) <= 3.0
    assert bounded_dicesgd_epsilon(sigma * (1 - 3e-3), 0.1, 50, 1e-5, **kw) > 3.0
    with pytest.raises(CalibrationError, match="gradient_bound"):
        calibrate_bounded_dicesgd_noise(0.01, 1e-9, 1.0, 500, max_noise_multiplier=2.0, **kw)


# ------------------------------------------------------------------ the accountant and make_private
def test_make_private_with_gradient_bound_meets_its_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    y = x.sum(1, keepdim=True) + torch.distributions.LogNormal(0.0, 1.5).sample((40, 1))
    model = nn.Linear(3, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model, opt, loader = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.05), loader,
                                            max_grad_norm=1.0, target_epsilon=4.0, target_delta=1e-5, epochs=2,
                                            error_feedback={"clip2": 0.1, "gradient_bound": 1.5},
                                            generator=torch.Generator().manual_seed(1))
    assert isinstance(opt.accountant, BoundedDiceSGDAccountant)
    for _ in range(2):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
    assert opt.steps == opt.max_steps
    assert 3.9 <= opt.epsilon(1e-5) <= 4.0
    # a fresh accountant restored from the optimizer's checkpoint gives the same ε
    state = opt.state_dict()["dpkit"]["accountant"]
    fresh = BoundedDiceSGDAccountant(clip1=1.0, clip2=0.1, gradient_bound=1.5, expected_batch_size=8)
    assert fresh.load_state_dict(state).epsilon(1e-5) == opt.epsilon(1e-5)


def test_accountant_refuses_what_the_theorem_does_not_cover():
    acc = BoundedDiceSGDAccountant(clip1=1.0, clip2=0.1, gradient_bound=1.5, expected_batch_size=8)
    acc.compose(dpsgd_event(2.0, 0.1), 3)
    with pytest.raises(ValueError, match="one \\(q, sigma\\)"):
        acc.compose(dpsgd_event(3.0, 0.1))
    with pytest.raises(UnsupportedEventError):
        acc.compose(dpe.LaplaceDpEvent(1.0))
    replace = BoundedDiceSGDAccountant(clip1=1.0, clip2=0.1, gradient_bound=1.5, expected_batch_size=8,
                                       neighboring_relation="replace_one")
    with pytest.raises(UnsupportedEventError, match="add/remove"):
        replace.compose(dpsgd_event(2.0, 0.1))
    # δ(ε) is a valid bound in its own right (the participation bound), never below the ε(δ) query's
    eps = acc.epsilon(1e-5)
    assert acc.delta(eps) >= 0.0 and participation_delta(
        eps, 2.0, 0.1, 3, clip1=1.0, clip2=0.1, gradient_bound=1.5, expected_batch_size=8) == acc.delta(eps)


def test_bad_gradient_bound_arguments_are_named():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="gradient_bound must be >= max_grad_norm"):
        attach_error_feedback(_optimizer(model, clip1=1.0, batch=4), clip2=0.1, sampling_prob=0.25,
                              gradient_bound=0.5)
    with pytest.raises(ValueError, match="clip_function='standard'"):
        attach_error_feedback(_optimizer(nn.Linear(3, 1), clip1=1.0, batch=4, clip_function="automatic"),
                              clip2=0.1, sampling_prob=0.25, gradient_bound=2.0)
    with pytest.raises(ValueError, match="calibration='reference'"):
        attach_error_feedback(_optimizer(nn.Linear(3, 1), clip1=1.0, batch=4), clip2=0.1, sampling_prob=0.25,
                              gradient_bound=2.0, calibration="reference")
    with pytest.raises(ValueError, match="gradient_bound"):
        participation_delta(1.0, 1.0, 0.1, 10, clip1=1.0, clip2=0.1, gradient_bound=0.9, expected_batch_size=4)


# ------------------------------------------------------------------ many-run audit of the bounded claim
def _audit(sigma, seed, gradient_bound, runs=2000):
    import importlib.util
    import pathlib

    from dpkit.optim.dicesgd_reference import simulate_canary_sums

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "audit_reference_calibrations.py"
    spec = importlib.util.spec_from_file_location("audit_reference_calibrations", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # a canary of gradient norm G (the simulator clips it at C1 and keeps the residual G − C1):
    # exactly the enforced-bound mechanism when the other examples have zero gradients
    common = dict(steps=100, sampling_prob=0.05, clip1=1.0, clip2=0.05, expected_batch_size=20.0,
                  noise_multiplier=sigma, canary_norm=gradient_bound, rng=np.random.default_rng(seed))
    return example.threshold_audit(simulate_canary_sums(runs, include=True, **common),
                                   simulate_canary_sums(runs, include=False, **common), delta=1e-5)


def test_audit_never_contradicts_the_bounded_claim_and_flags_an_under_noised_variant():
    g_bound = 1.5
    sigma = calibrate_bounded_dicesgd_noise(2.0, 1e-5, 0.05, 100, clip1=1.0, clip2=0.05, gradient_bound=g_bound,
                                            expected_batch_size=20.0)
    assert _audit(sigma, 2, g_bound)["epsilon_lower_bound"] <= 2.0       # measured 0.0
    broken = _audit(sigma / 40, 3, g_bound)                               # 40× less noise, same claim
    assert broken["epsilon_lower_bound"] > 2.0, broken                     # measured 3.29


def test_replace_one_optimizer_is_refused_at_attach():
    model = nn.Linear(3, 1)
    engine = GradientEngine(model, max_grad_norm=1.0, loss_reduction="sum", track_unclipped=True)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, noise_multiplier=1.0,
                      expected_batch_size=4, step_event=dpsgd_event(1.0, 0.25),
                      accountant=make_accountant("rdp", neighboring_relation="replace_one"))
    with pytest.raises(ValueError, match="add/remove"):
        attach_error_feedback(opt, clip2=0.1, sampling_prob=0.25, gradient_bound=2.0)
    # refused before anything was changed: the optimizer still works as built
    assert opt.step_event == dpsgd_event(1.0, 0.25) and not opt._contribution_hooks
    assert "_clip_factors" not in vars(engine)


def test_error_state_checkpoint_records_the_gradient_bound():
    fb = attach_error_feedback(_optimizer(nn.Linear(3, 1), clip1=1.0, batch=4), clip2=0.1, sampling_prob=0.25,
                               gradient_bound=2.0)
    state = fb.state_dict()
    assert state["gradient_bound"] == 2.0
    other = attach_error_feedback(_optimizer(nn.Linear(3, 1), clip1=1.0, batch=4), clip2=0.1, sampling_prob=0.25)
    with pytest.raises(ValueError, match="gradient_bound=2.0"):
        other.load_state_dict(state)
    fb.load_state_dict(state)


def test_second_clip_accumulates_over_virtual_batches_and_resets_between_steps():
    torch.manual_seed(1)
    x = torch.randn(10, 4, dtype=torch.float64) * 20.0
    y = torch.randn(10, 1, dtype=torch.float64)
    errors = []
    for chunks in ((slice(0, 10),), (slice(0, 4), slice(4, 10))):
        torch.manual_seed(2)
        model = nn.Linear(4, 1).double()
        opt = _optimizer(model, clip1=1.0, batch=10.0)
        fb = attach_error_feedback(opt, clip2=1e3, sampling_prob=0.25, gradient_bound=3.0)
        for _ in range(2):  # two logical steps: the second must not see the first's residuals twice
            for i, part in enumerate(chunks):
                nn.functional.mse_loss(model(x[part]), y[part], reduction="sum").backward()
                opt.signal_skip_step(i < len(chunks) - 1)
                opt.step()
            opt.zero_grad()
        errors.append([e.clone() for e in fb.error])
    for a, b in zip(*errors):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # C2 huge: e_2 = e_1 − e_1 + r/B̄ = r/B̄ (lr = 0: the same residual r both steps)
    torch.manual_seed(2)
    model = nn.Linear(4, 1).double()
    r = torch.zeros(5, dtype=torch.float64)
    for i in range(10):
        model.zero_grad()
        nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        g = torch.cat([model.weight.grad.flatten(), model.bias.grad])
        n = float(g.norm())
        r += g * (min(1.0, 3.0 / n) - min(1.0, 1.0 / n))
    torch.testing.assert_close(torch.cat([e.flatten() for e in errors[0]]) * 10.0, r, rtol=1e-9, atol=1e-10)


def test_accumulating_poisson_batches_is_refused_not_misaccounted():
    from dpkit.errors import AmbiguousStepError

    x, y = torch.randn(40, 3), torch.randn(40, 1)
    model = nn.Linear(3, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model, opt, loader = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.05), loader,
                                            max_grad_norm=1.0, noise_multiplier=5.0,
                                            error_feedback={"clip2": 0.1, "gradient_bound": 1.5},
                                            generator=torch.Generator().manual_seed(1))
    batches = iter(loader)
    for _ in range(2):  # two Poisson batches summed into one step
        xb, yb = next(batches)
        nn.functional.mse_loss(model(xb), yb).backward()
    with pytest.raises(AmbiguousStepError, match="other than plain DP-SGD"):
        opt.step()


def test_engine_bound_unclipped_refuses_bad_settings():
    import torch.nn as nn

    from dpkit.grad_sample.engine import GradientEngine

    untracked = GradientEngine(nn.Linear(3, 2), max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="track_unclipped"):
        untracked.bound_unclipped(2.0)
    tracked = GradientEngine(nn.Linear(3, 2), max_grad_norm=1.0, track_unclipped=True)
    with pytest.raises(ValueError, match="bound must be >= max_grad_norm"):
        tracked.bound_unclipped(0.5)
    auto = GradientEngine(nn.Linear(3, 2), max_grad_norm=1.0, track_unclipped=True,
                          clip_function="automatic")
    with pytest.raises(RuntimeError, match="clip_function='standard'"):
        auto.bound_unclipped(2.0)
