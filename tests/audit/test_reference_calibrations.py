"""Many-run canary audits of the reference-code calibrations (DiceSGD, private ADMM) and of dpkit's.

Fast settings that keep the demonstrated violations reproducible (docs/dicesgd_dpsgdf.md,
docs/admm.md): each reference claim is exceeded by a 95% Clopper-Pearson lower bound; dpkit's
own claims are not; a deliberately under-noised variant that keeps dpkit's claim is flagged."""

import functools
import importlib.util
import pathlib
import warnings

import numpy as np
import pytest

from dpkit.admm import calibrate_admm_noise, no_prox, private_admm, squared_loss_prox
from dpkit.admm.reference import ReferenceCalibrationWarning as ADMMWarning
from dpkit.admm.reference import reference_admm_calibration
from dpkit.audit import many_runs_epsilon_lower_bound
from dpkit.optim.dicesgd_reference import (ReferenceCalibrationWarning, reference_dicesgd_calibration,
                                           simulate_canary_sums)
from dpkit.optim.error_feedback import calibrate_dicesgd_noise

_EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "audit_reference_calibrations.py"
_spec = importlib.util.spec_from_file_location("audit_reference_calibrations", _EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

# DiceSGD: q = 0.05, T = 100, C1 = 1, B̄ = 20, reference ratio r = B̄·C2/C1 = 1, claim ε = 2
DICE = dict(steps=100, sampling_prob=0.05, clip1=1.0, clip2=0.05, expected_batch_size=20.0)
DICE_EPS, DICE_DELTA = 2.0, 1e-5
# ADMM: 200 users, user 0 the canary (feature e_1, label ±10³), the others with zero data; q = 0.1,
# 30 rounds, λ = 0.5, L = 1, claim ε = 1 at δ = 1e-6
ADMM_N, ADMM_ROUNDS, ADMM_EPS, ADMM_DELTA = 200, 30, 1.0, 1e-6


@functools.lru_cache(maxsize=None)
def _dice_sigmas():
    with pytest.warns(ReferenceCalibrationWarning):
        ref = reference_dicesgd_calibration(DICE_EPS, DICE_DELTA, DICE["sampling_prob"], DICE["steps"],
                                            clip1=DICE["clip1"], clip2=DICE["clip2"],
                                            expected_batch_size=DICE["expected_batch_size"])
    return ref.noise_multiplier, calibrate_dicesgd_noise(
        DICE_EPS, DICE_DELTA, DICE["sampling_prob"], DICE["steps"], clip1=DICE["clip1"],
        clip2=DICE["clip2"], expected_batch_size=DICE["expected_batch_size"])


def _dice_audit(sigma, seed, runs=2000):
    rng = np.random.default_rng(seed)
    common = dict(DICE, noise_multiplier=sigma, canary_norm=1e6, rng=rng)
    return example.threshold_audit(simulate_canary_sums(runs, include=True, **common),
                                   simulate_canary_sums(runs, include=False, **common), delta=DICE_DELTA)


def test_dicesgd_reference_claim_is_violated():
    reference_sigma, _ = _dice_sigmas()
    res = _dice_audit(reference_sigma, seed=1)
    assert res["epsilon_lower_bound"] > DICE_EPS, res   # measured 5.1 (seed 1)


def test_dicesgd_dpkit_claim_holds_and_an_under_noised_variant_is_flagged():
    _, sigma = _dice_sigmas()
    assert _dice_audit(sigma, seed=2)["epsilon_lower_bound"] <= DICE_EPS
    broken = _dice_audit(sigma / 10, seed=3)          # 10× less noise, same claim
    assert broken["epsilon_lower_bound"] > DICE_EPS, broken   # measured 3.15


def _admm_scores(sigma, runs, seed0):
    X, y = np.zeros((ADMM_N, 2)), np.zeros(ADMM_N)
    X[0, 0] = 1.0

    def stat(label, seed):
        y[0] = label
        return private_admm(X, y, squared_loss_prox, no_prox(), noise_multiplier=sigma, clip=1.0,
                            variant="federated", relaxation=0.5, step=1.0, max_iter=ADMM_ROUNDS,
                            sampling_rate=0.1, rng=np.random.default_rng(seed)).released[0]

    s_in = [stat(1e3, seed0 + 2 * i) for i in range(runs)]
    s_out = [stat(-1e3, seed0 + 2 * i + 1) for i in range(runs)]
    return example.threshold_audit(s_in, s_out, delta=ADMM_DELTA)


def _admm_reference_sigma():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ADMMWarning)
        return reference_admm_calibration(ADMM_EPS, ADMM_DELTA, clip=1.0, steps=ADMM_ROUNDS,
                                          num_users=ADMM_N, relaxation=0.5).noise_multiplier


def test_admm_reference_claim_is_violated():
    res = _admm_scores(_admm_reference_sigma(), runs=250, seed0=0)
    assert res["epsilon_lower_bound"] > ADMM_EPS, res   # measured 3.22


def test_admm_dpkit_claim_holds():
    sigma = calibrate_admm_noise(ADMM_EPS, ADMM_DELTA, ADMM_ROUNDS, variant="federated", sampling_rate=0.1)
    assert _admm_scores(sigma, runs=150, seed0=10**6)["epsilon_lower_bound"] <= ADMM_EPS


@pytest.mark.slow
def test_admm_under_noised_variant_is_flagged():
    sigma = calibrate_admm_noise(ADMM_EPS, ADMM_DELTA, ADMM_ROUNDS, variant="federated", sampling_rate=0.1)
    res = _admm_scores(sigma / 1000, runs=300, seed0=2 * 10**6)
    assert res["epsilon_lower_bound"] > ADMM_EPS, res   # measured 4.12


def test_threshold_audit_counts_held_out_and_has_no_power_on_equal_worlds():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(size=1000), rng.normal(size=1000)
    res = example.threshold_audit(s_in, s_out, delta=1e-5)
    # independent recount on the 800 + 800 runs not used to pick the threshold
    fp = int((s_out[200:] > res["threshold"]).sum())
    fn = int((s_in[200:] <= res["threshold"]).sum())
    assert (res["false_positives"], res["false_negatives"], res["runs"]) == (fp, fn, 1600)
    assert res["epsilon_lower_bound"] == many_runs_epsilon_lower_bound(fp, 800, fn, 800, delta=1e-5)
    assert res["epsilon_lower_bound"] < 0.2
    shifted = example.threshold_audit(s_in + 6.0, s_out, delta=1e-5)
    assert shifted["epsilon_lower_bound"] > 4.0
    with pytest.raises(ValueError, match="scores_in"):
        example.threshold_audit([1.0, 2.0], [0.0], delta=1e-5)


@pytest.mark.slow
def test_example_quick_json_rows():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(_EXAMPLE), "--quick", "--json"], capture_output=True,
                         text=True, check=True, timeout=900).stdout.strip().splitlines()
    rows = json.loads(out[-1])
    assert {(r["mechanism"], r["calibration"]) for r in rows} == {
        ("dicesgd", "reference"), ("dicesgd", "dpkit"), ("admm", "reference"), ("admm", "dpkit")}
    for r in rows:
        assert set(r) == {"mechanism", "calibration", "claimed_epsilon", "epsilon_lower_bound",
                          "confidence", "runs", "utility"}
        violated = r["epsilon_lower_bound"] > r["claimed_epsilon"]
        assert violated == (r["calibration"] == "reference"), r


def test_admm_one_run_audit_flags_the_reference_claim_and_an_under_noised_variant():
    cfg = dict(example.ADMM, p=16)
    rounds = 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ADMMWarning)
        ref = reference_admm_calibration(cfg["epsilon"], cfg["delta"], clip=cfg["clip"], steps=rounds,
                                         num_users=cfg["n"], relaxation=cfg["relaxation"])
    bound, guesses, correct = example.admm_one_run(cfg, ref.noise_multiplier, rounds, seed=3)
    assert guesses == 100
    assert bound > cfg["epsilon"], (bound, correct)   # measured 3.49: 100 of 100 correct
    sigma = calibrate_admm_noise(cfg["epsilon"], cfg["delta"], rounds, variant="federated",
                                 sampling_rate=cfg["q"])
    assert example.admm_one_run(cfg, sigma, rounds, seed=4)[0] <= cfg["epsilon"]   # measured 0.0
    assert example.admm_one_run(cfg, sigma / 1000, rounds, seed=5)[0] > cfg["epsilon"]  # under-noised
