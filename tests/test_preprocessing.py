"""DPSGD-F preprocessing vs independent references (exact Gaussian laws, dp_accounting, digits)."""

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event as dpe
from dp_accounting import pld as dp_pld
from scipy import stats

from dpkit.preprocessing import (
    DPSGDFClassifier,
    FeaturePreprocessor,
    dpsgdf_train,
    private_mean,
    private_norm_bound,
)


def _shifted_cloud(n=400, d=4, offset=1000.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x /= np.maximum(1.0, np.linalg.norm(x, axis=1, keepdims=True) / 3.0)  # diameter ≤ 6
    return x + offset


def test_private_mean_error_is_the_predicted_gaussian_and_scales_with_diameter():
    x = _shifted_cloud()
    n, d = x.shape
    R, sigma = 2.2 * 1000 * math.sqrt(d) / 2, 0.5   # public bound on ‖x‖ (≈ 2000 here)
    xt = torch.tensor(x)
    mean = xt.mean(0)
    z, sq_err, sq_pred, naive_var, too_wide = [], [], [], [], 0
    for rep in range(120):
        res = private_mean(x, norm_bound=R, noise_multiplier=sigma,
                           generator=torch.Generator().manual_seed(rep))
        dist = (xt - res.center).norm(dim=1)
        # the clipped target given the released (c0, r): the fine stage adds exactly N(0, (σ3 r/n)²)
        clipped = (xt - res.center) * torch.clamp(res.radius / dist, max=1.0)[:, None]
        target = res.center + clipped.sum(0) / n
        scale = res.fine_noise_multiplier * res.radius / n
        z.append(((res.mean - target) / scale).numpy())
        bias = float((target - mean).norm())
        assert bias <= float(torch.clamp(dist - res.radius, min=0).sum()) / n + 1e-9
        sq_err.append(float((res.mean - mean).norm() ** 2))
        sq_pred.append(d * scale ** 2 + bias ** 2)
        # diameter, not norm: r is within a grid step (√2) of the farthest point from c0, unless the
        # histogram noise above it exceeds 3 std (prob. ≈ 0.1%)
        too_wide += res.radius > math.sqrt(2) * float(dist.max()) * (1 + 1e-12)
        assert float(dist.max()) <= 6.0 + float((res.center - mean).norm()) + 1e-9
        naive_var.append(d * (sigma * R / n) ** 2)  # one Gaussian mean with clip R, same σ
    assert too_wide <= 3
    z = np.concatenate(z)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    ratio = np.mean(sq_err) / np.mean(sq_pred)
    assert 0.75 < ratio < 1.3  # chi-square with 480 dof: these bounds fail with prob. ≪ 1e-3
    assert math.sqrt(np.mean(sq_err)) < 0.05 * math.sqrt(np.mean(naive_var))


def test_private_norm_bound_is_an_upper_quantile():
    x = _shifted_cloud(n=2000, seed=1)
    center = torch.tensor(x).mean(0)
    dist = (torch.tensor(x) - center).norm(dim=1)
    bounds = [private_norm_bound(x, center, norm_bound=3000.0, noise_multiplier=2.0,
                                 generator=torch.Generator().manual_seed(s))[0] for s in range(20)]
    for b in bounds:
        assert b <= math.sqrt(2) * float(dist.max()) * (1 + 1e-12)
        # true count above b ≤ its noisy count + 4σ√m ≤ (3 + 4)σ√m (fails with prob. ≈ 3e-5 per draw)
        assert float((dist > b).sum()) <= 7 * 2.0 * math.sqrt(48)


def _digits_shifted():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    return train_test_split(X + 100.0, y, test_size=0.2, random_state=0, stratify=y)


def test_total_epsilon_is_the_composition_of_the_parts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)) + 50.0
    y = (x[:, 0] > 50.0).astype(int)
    eps, delta, frac = 3.0, 1e-5, 0.25
    res = dpsgdf_train(x, y, target_epsilon=eps, target_delta=delta, feature_bound=200.0, epochs=2,
                       batch_size=50, preprocessing_fraction=frac, seed=3)
    s_pre = res.preprocessing_noise_multiplier
    weights = (0.4, 0.1, 0.4, 0.1)
    pre = [dpe.GaussianDpEvent(s_pre / math.sqrt(w)) for w in weights]
    ref = dp_pld.PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(dpe.ComposedDpEvent(pre))
    ref_pre = ref.get_epsilon(delta)
    ref.compose(dpe.PoissonSampledDpEvent(50 / 300, dpe.GaussianDpEvent(res.noise_multiplier)), res.steps)
    assert res.steps == 2 * 6
    assert res.epsilon == pytest.approx(ref.get_epsilon(delta), rel=5e-3)
    assert res.epsilon <= eps and res.epsilon > 0.98 * eps
    assert ref_pre == pytest.approx(frac * eps, rel=1e-2)  # exact Gaussian curve vs PLD
    assert len(res.accountant.ledger) == 5  # four preprocessing releases + the DP-SGD steps, one ledger


def test_shifted_digits_dpsgdf_clearly_ahead_at_equal_epsilon():
    Xtr, Xte, ytr, yte = _digits_shifted()
    kw = dict(epsilon=4.0, delta=1e-5, feature_bound=1000.0, epochs=3, batch_size=256, lr=2.0, random_state=1)
    f = DPSGDFClassifier(preprocess=True, **kw).fit(Xtr, ytr)
    b = DPSGDFClassifier(preprocess=False, **kw).fit(Xtr, ytr)
    assert f.epsilon_ <= 4.0 and b.epsilon_ <= 4.0
    acc_f, acc_b = f.score(Xte, yte), b.score(Xte, yte)
    assert acc_f > 0.75 and acc_f - acc_b > 0.4, (acc_f, acc_b)
    assert f.predict_proba(Xte).shape == (len(Xte), 10)


def test_linear_regression_task_learns():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(800, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=800)
    res = dpsgdf_train(x + 30.0, y, task="linear", target_epsilon=8.0, target_delta=1e-5, feature_bound=100.0,
                       epochs=4, batch_size=100, lr=0.5, seed=0)
    with torch.no_grad():
        pred = res.model(res.transform(x + 30.0).float()).squeeze(1).numpy()
    assert np.mean((pred - y) ** 2) < 0.5 * np.var(y)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(norm_bound=0.0, noise_multiplier=1.0), ValueError, "norm_bound"),
    (dict(norm_bound=1.0, noise_multiplier=-1.0), ValueError, "noise_multiplier"),
    (dict(norm_bound=1.0, noise_multiplier=1.0, generator=3), TypeError, "generator"),
    (dict(norm_bound=1.0, noise_multiplier=1.0, weights=(1.0, 1.0)), ValueError, "weights"),
    (dict(norm_bound=1.0, noise_multiplier=1.0, weights=(1.0, 0.0, 1.0)), ValueError, r"weights\[1\]"),
])
def test_private_mean_invalid(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        private_mean(np.ones((5, 2)), **kwargs)


@pytest.mark.parametrize("x,exc,match", [
    (np.ones(5), ValueError, "x must be a 2-d"),
    ([[1.0, 2.0]], TypeError, "x must be"),
    (np.array([[1.0, np.nan]]), ValueError, "finite"),
])
def test_features_invalid(x, exc, match):
    with pytest.raises(exc, match=match):
        private_mean(x, norm_bound=1.0, noise_multiplier=1.0)


def test_norm_bound_and_preprocessor_invalid():
    with pytest.raises(ValueError, match="center"):
        private_norm_bound(np.ones((4, 3)), np.zeros(2), norm_bound=1.0, noise_multiplier=1.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        FeaturePreprocessor(norm_bound=1.0, noise_multiplier=1.0).transform(np.ones((2, 2)))
    with pytest.raises(RuntimeError, match="not fitted"):
        DPSGDFClassifier().predict(np.ones((2, 2)))


_X = np.random.default_rng(0).normal(size=(40, 2))
_Y = (np.arange(40) % 2)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(target_epsilon=0.0), ValueError, "target_epsilon"),
    (dict(target_delta=1.0), ValueError, "target_delta"),
    (dict(feature_bound=-1.0), ValueError, "feature_bound"),
    (dict(task="poisson"), ValueError, "task"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs=1.5), TypeError, "epochs"),
    (dict(batch_size=41), ValueError, "batch_size"),
    (dict(preprocessing_fraction=1.0), ValueError, "preprocessing_fraction"),
    (dict(preprocess="yes"), TypeError, "preprocess"),
    (dict(accountant="nope"), ValueError, "nope"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_dpsgdf_train_invalid(kwargs, exc, match):
    base = dict(target_epsilon=1.0, target_delta=1e-5, feature_bound=5.0, epochs=1, batch_size=10)
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        dpsgdf_train(_X, _Y, **base)


def test_dpsgdf_train_label_checks():
    base = dict(target_epsilon=1.0, target_delta=1e-5, feature_bound=5.0, epochs=1, batch_size=10)
    with pytest.raises(ValueError, match="y must have shape"):
        dpsgdf_train(_X, _Y[:-1], **base)
    with pytest.raises(ValueError, match="2 classes"):
        dpsgdf_train(_X, np.zeros(40, dtype=int), **base)
