"""DiceSGD reference-code calibration vs independent references: dp_accounting's RDP DP-SGD ε,
the reference's noise formula σ·C1·sqrt(1 + 2r), its error-update formula written out per regime,
and dpkit's own ErrorFeedback trajectory for the audit simulation."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from dpkit.accountants import dpsgd_event
from dpkit.grad_sample import GradientEngine
from dpkit.optim.dicesgd_reference import (CLAIM_LABEL, ReferenceCalibrationWarning,
                                           reference_dicesgd_calibration, reference_error_ratio,
                                           reference_error_update, simulate_canary_sums)
from dpkit.optim.dp_optimizer import DPOptimizer
from dpkit.optim.error_feedback import attach_error_feedback


def _rdp_epsilon(sigma, q, steps, delta):
    """DP-SGD ε straight from dp_accounting's RDP accountant (fastDP's default accounting)."""
    acc = rdp.RdpAccountant()
    acc.compose(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("setting", [
    # the reference CIFAR-10 script: N = 50 000, B = 1000, 3 epochs, C = 0.5, ratio C2 = 1, ε = 2
    dict(eps=2.0, delta=1e-5, q=0.02, steps=150, clip1=0.5, batch=1000, ratio=1.0),
    # the skewed regression of docs/dicesgd_dpsgdf.md with ratio 0.5, ε = 8
    dict(eps=8.0, delta=1e-5, q=0.05, steps=400, clip1=1.0, batch=200, ratio=0.5),
])
def test_reference_calibration_reproduces_the_reference_formula(setting):
    s = setting
    clip2 = s["ratio"] * s["clip1"] / s["batch"]  # the reference clips the SUMMED error at r·C1
    with pytest.warns(ReferenceCalibrationWarning, match=CLAIM_LABEL):
        cal = reference_dicesgd_calibration(s["eps"], s["delta"], s["q"], s["steps"], clip1=s["clip1"],
                                            clip2=clip2, expected_batch_size=s["batch"])
    sigma = cal.dpsgd_noise_multiplier
    # σ is DP-SGD's for (q, T, ε, δ): meets the target, and 0.2% less noise would not
    assert _rdp_epsilon(sigma, s["q"], s["steps"], s["delta"]) <= s["eps"]
    assert _rdp_epsilon(sigma * 0.998, s["q"], s["steps"], s["delta"]) > s["eps"]
    # noise std on the sum / C1 = σ·sqrt(1 + 2·error_max_grad_norm)
    assert cal.error_ratio == pytest.approx(s["ratio"], rel=1e-12)
    assert cal.noise_multiplier == pytest.approx(sigma * math.sqrt(1 + 2 * s["ratio"]), rel=1e-12)
    assert "claimed by the reference code" in cal.describe()
    assert cal.claimed_epsilon == s["eps"] and cal.claimed_delta == s["delta"]


def test_reference_calibration_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match="clip2"):
        reference_error_ratio(1.0, -0.1, 10)
    with pytest.raises(ValueError, match="expected_batch_size"):
        reference_error_ratio(1.0, 0.1, 0)
    with pytest.raises(ValueError, match="target_epsilon"):
        reference_dicesgd_calibration(-1.0, 1e-5, 0.1, 10, clip1=1.0, clip2=0.1, expected_batch_size=10)
    with pytest.raises(ValueError, match="threshold"):
        reference_error_update(np.ones((1, 2)), 0.0, threshold=-1.0)


def test_reference_error_update_in_each_regime():
    thr = 2.0
    res = np.array([[0.5, -0.25]])
    u = np.array([[0.6, 0.8]])  # unit vector
    for norm, fed_ref, kept_ref in [
        (1.5, 1.5 * u, 0 * u),                   # ‖e‖ ≤ thr: all delivered, nothing kept (= paper)
        (3.0, thr * u, (3.0 - thr) * u),         # thr < ‖e‖ ≤ 2thr: e − clip(e) kept (= paper)
        (10.0, thr * u, thr * u),                # ‖e‖ > 2thr: clip(e) kept (paper: (10 − thr)·u)
    ]:
        fed, new = reference_error_update(norm * u, res, threshold=thr)
        np.testing.assert_allclose(fed, fed_ref, rtol=1e-12)
        np.testing.assert_allclose(new, kept_ref + res, rtol=1e-12)
    fed, new = reference_error_update(np.zeros((1, 2)), res, threshold=thr)
    np.testing.assert_array_equal(fed, 0.0)
    np.testing.assert_array_equal(new, res)


def test_simulation_follows_dpkit_error_feedback_step_by_step():
    """σ = 0: the simulated Σ_t y_t equals −B̄/η·(w_T − w_0) of dpkit's DPOptimizer + ErrorFeedback
    on a 1-parameter model whose canary example has gradient G, sampled by the same coins."""
    q, steps, clip1, clip2, batch, big, lr, seed = 0.3, 25, 1.0, 0.05, 4.0, 37.0, 0.1, 5
    model = nn.Linear(1, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    engine = GradientEngine(model, max_grad_norm=clip1, mode="per_sample", loss_reduction="sum",
                            track_unclipped=True)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), engine=engine, noise_multiplier=0.0,
                      expected_batch_size=batch, step_event=dpsgd_event(0.0, q),
                      accountant=None, generator=torch.Generator().manual_seed(0))
    attach_error_feedback(opt, clip2=clip2, sampling_prob=q)
    coins = np.random.default_rng(seed)  # the simulation's stream: one coin, one normal per step
    sums = []
    for t in range(steps):
        sampled = coins.random(1)[0] < q
        coins.standard_normal(1)
        x = torch.tensor([[0.0], [1.0]] if sampled else [[0.0]], dtype=torch.float64)
        s = torch.tensor([0.0, big] if sampled else [0.0], dtype=torch.float64)
        opt.zero_grad()
        (model(x).squeeze(1) * s).sum().backward()  # per-example gradient s_i·x_i: G for the canary
        opt.step()
        sums.append(-float(model.weight.detach()) * batch / lr)
        sim = simulate_canary_sums(1, steps=t + 1, sampling_prob=q, clip1=clip1, clip2=clip2,
                                   expected_batch_size=batch, noise_multiplier=0.0, canary_norm=big,
                                   include=True, rng=np.random.default_rng(seed))
        assert sim[0] == pytest.approx(sums[-1], rel=1e-9, abs=1e-9), t
    # the canary was sampled, and its residual kept feeding C2·B̄ per step afterwards
    assert sums[-1] > clip1 + 5 * clip2 * batch


def test_simulation_always_sampled_and_noise_variance():
    rng = np.random.default_rng(0)
    common = dict(steps=50, sampling_prob=1.0, clip1=1.0, clip2=0.25, expected_batch_size=4.0,
                  canary_norm=1e6, rng=rng)
    # q = 1, σ = 0: C1 every step plus a feedback of B̄·C2 from the second step on, both updates
    # (the reference's cut error is refilled by the canary's new residual every step)
    for update in ("paper", "reference"):
        sums = simulate_canary_sums(3, noise_multiplier=0.0, include=True, update=update, **common)
        np.testing.assert_allclose(sums, 50 * 1.0 + 49 * 4.0 * 0.25)
    # without the canary: Σ of 50 N(0, (σC1)²), variance ratio ~ χ²_3999/3999
    out = simulate_canary_sums(4000, noise_multiplier=0.5, include=False, **common)
    assert 0.9 < out.var(ddof=1) / (50 * 0.25) < 1.1
    with pytest.raises(ValueError, match="update"):
        simulate_canary_sums(2, noise_multiplier=0.0, include=True, update="other", **common)
    with pytest.raises(TypeError, match="rng"):
        simulate_canary_sums(2, noise_multiplier=0.0, include=True, **dict(common, rng=3))


def test_make_private_reference_calibration_warns_and_keeps_dpkits_ledger():
    import dpkit
    from dpkit.accountants import make_accountant
    from dpkit.optim.error_feedback import ErrorFeedback, dicesgd_event

    q, steps, batch, clip2 = 0.02, 150, 1000.0, 0.5 / 1000

    def build(**ef):
        model = nn.Linear(3, 1)
        return dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                  max_grad_norm=0.5, target_epsilon=2.0, target_delta=1e-5, steps=steps,
                                  sample_rate=q, expected_batch_size=batch, accountant="rdp",
                                  error_feedback={"clip2": clip2, **ef})[1]

    with pytest.warns(ReferenceCalibrationWarning, match=CLAIM_LABEL):
        opt = build(calibration="reference")
    feedback = next(h for h in opt._contribution_hooks if isinstance(h, ErrorFeedback))
    ref = feedback.reference
    assert ref.claimed_epsilon == 2.0
    assert opt.noise_multiplier == pytest.approx(ref.dpsgd_noise_multiplier * math.sqrt(3.0), rel=1e-12)
    # the ledger is dpkit's account of that noise, which is far above the claim
    expected = dicesgd_event(opt.noise_multiplier, q, 1, clip1=0.5, clip2=clip2, expected_batch_size=batch)
    assert opt.step_event == expected
    dpkit_eps = make_accountant("rdp").compose(
        dicesgd_event(opt.noise_multiplier, q, steps, clip1=0.5, clip2=clip2,
                      expected_batch_size=batch)).epsilon(1e-5)
    assert dpkit_eps > 2.0


def test_attach_reference_calibration_refuses_bad_input():
    def fresh():
        model = nn.Linear(2, 1)
        engine = GradientEngine(model, max_grad_norm=1.0, mode="per_sample", loss_reduction="sum",
                                track_unclipped=True)
        return DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, noise_multiplier=1.0,
                           expected_batch_size=4.0, step_event=dpsgd_event(1.0, 0.1), accountant=None)

    with pytest.raises(ValueError, match="calibration"):
        attach_error_feedback(fresh(), clip2=0.1, sampling_prob=0.1, calibration="paper")
    with pytest.raises(ValueError, match="target_epsilon"):  # nothing to calibrate for
        attach_error_feedback(fresh(), clip2=0.1, sampling_prob=0.1, calibration="reference")
