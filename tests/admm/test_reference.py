"""Private-ADMM reference-code calibration vs the reference's formulas, computed independently:
ρ by root-finding on ρ + 2√(ρ log(1/δ)) = ε (the reference bisects it), scale_noise =
2L²T/(ρn²), and the per-user noise std λ·scale_noise that dpkit's federated run then adds."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from dpkit.admm import no_prox, private_admm, squared_loss_prox
from dpkit.admm.reference import (CLAIM_LABEL, ReferenceCalibrationWarning,
                                  reference_admm_calibration, reference_scale_noise,
                                  reference_zcdp_rho)


def _rho(eps, delta):
    return brentq(lambda r: r + 2 * math.sqrt(r * math.log(1 / delta)) - eps, 0.0, 2 * eps, xtol=1e-300,
                  rtol=1e-15)


@pytest.mark.parametrize("setting", [
    # the paper's Fig. 1 ADMM run: n = 1000, T = 1000, L = 1.6, λ = 0.464, δ = 1e-6, smallest ε
    dict(eps=0.01, delta=1e-6, clip=1.6, steps=1000, n=1000, lam=0.464159),
    # its largest ε, and the DP prox-SGD clip L = 13 of the same script
    dict(eps=5.0, delta=1e-6, clip=13.0, steps=1000, n=1000, lam=0.5),
])
def test_reference_calibration_reproduces_the_reference_formulas(setting):
    s = setting
    rho = _rho(s["eps"], s["delta"])
    assert reference_zcdp_rho(s["eps"], s["delta"]) == pytest.approx(rho, rel=1e-10)
    scale = 2 * s["clip"] ** 2 * s["steps"] / (rho * s["n"] ** 2)
    assert reference_scale_noise(s["eps"], s["delta"], clip=s["clip"], steps=s["steps"],
                                 num_users=s["n"]) == pytest.approx(scale, rel=1e-10)
    with pytest.warns(ReferenceCalibrationWarning, match=CLAIM_LABEL):
        cal = reference_admm_calibration(s["eps"], s["delta"], clip=s["clip"], steps=s["steps"],
                                         num_users=s["n"], relaxation=s["lam"])
    assert cal.noise_std == pytest.approx(s["lam"] * scale, rel=1e-10)
    # dpkit's local noise std is σ·4λL
    assert cal.noise_multiplier * 4 * s["lam"] * s["clip"] == pytest.approx(s["lam"] * scale, rel=1e-10)
    assert "claimed by the reference code" in cal.describe()


def test_reference_noise_is_what_the_federated_run_adds():
    """With the reference multiplier, each participating user's update carries λ·scale_noise·N(0, I):
    users with zero data and z = 0 only move by their noise, whose spread is measured."""
    n, p, lam, clip = 400, 3, 0.4, 1.0
    with pytest.warns(ReferenceCalibrationWarning):
        cal = reference_admm_calibration(0.5, 1e-5, clip=clip, steps=1, num_users=n, relaxation=lam)
    res = private_admm(np.zeros((n, p)), np.zeros(n), squared_loss_prox, no_prox(),
                       noise_multiplier=cal.noise_multiplier, clip=clip, variant="federated",
                       relaxation=lam, max_iter=1, sampling_rate=1.0, rng=np.random.default_rng(0))
    assert res.noise_std == pytest.approx(cal.noise_std, rel=1e-12)
    ratio = res.duals.var(ddof=1) / cal.noise_std ** 2  # χ²_{np−1}/(np−1)
    assert 0.85 < ratio < 1.15


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="epsilon"):
        reference_zcdp_rho(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        reference_zcdp_rho(1.0, 1.5)
    with pytest.raises(ValueError, match="num_users"):
        reference_scale_noise(1.0, 1e-5, clip=1.0, steps=10, num_users=0)
    with pytest.raises(ValueError, match="relaxation"):
        reference_admm_calibration(1.0, 1e-5, clip=1.0, steps=10, num_users=10, relaxation=1.5)


def test_estimator_reference_calibration_reports_dpkits_epsilon():
    from dpkit.admm import DPLassoADMM, admm_epsilon

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 3)) / 2, rng.normal(size=60)
    with pytest.warns(ReferenceCalibrationWarning, match=CLAIM_LABEL):
        model = DPLassoADMM(alpha=0.01, epsilon=1.0, delta=1e-6, variant="federated", clip=1.6,
                            max_iter=20, sampling_rate=0.1, relaxation=0.464, calibration="reference",
                            random_state=np.random.default_rng(1)).fit(X, y)
    # T = 20 rounds, n = 60 users: σ = scale_noise/(4L) = 2L²T/(ρn²)/(4L)
    rho = _rho(1.0, 1e-6)
    assert model.noise_multiplier_ == pytest.approx(2 * 1.6 ** 2 * 20 / (rho * 60 ** 2) / (4 * 1.6), rel=1e-10)
    assert model.reference_.claimed_epsilon == 1.0
    # epsilon_ is dpkit's own account of that noise, not the claim
    assert model.epsilon_ == admm_epsilon(model.noise_multiplier_, 20, 1e-6, variant="federated",
                                          sampling_rate=0.1)
    assert model.epsilon_ > 100
    with pytest.raises(ValueError, match="calibration"):
        DPLassoADMM(epsilon=1.0, variant="centralized", calibration="reference").fit(X, y)
    with pytest.raises(ValueError, match="calibration"):
        DPLassoADMM(epsilon=1.0, variant="federated", calibration="paper").fit(X, y)
