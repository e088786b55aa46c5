"""DPSGD-F preprocessing vs independent references (exact Gaussian laws, dp_accounting, digits)."""

import math
import warnings

import numpy as np
import pytest
import torch
from dp_accounting import dp_event as dpe
from dp_accounting import pld as dp_pld
from scipy import stats

from dpkit.errors import SeededRandomnessWarning
from dpkit.preprocessing import (
    DPSGDFClassifier,
    _noisy_mean,
    FeaturePreprocessor,
    dpsgdf_train,
    private_mean,
    private_norm_bound,
)

# explicit seeds below are test conveniences (they warn; checked in the last test)
pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")


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
        res = private_mean(x, norm_bound=R, noise_multiplier=sigma, dataset_size=n,
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
                       batch_size=50, preprocessing_fraction=frac, seed=3, dataset_size=300, classes=[0, 1])
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
    kw = dict(epsilon=4.0, delta=1e-5, feature_bound=1000.0, epochs=3, batch_size=256, lr=2.0, random_state=1,
              classes=range(10), dataset_size=len(Xtr))
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
                       dataset_size=800, epochs=4, batch_size=100, lr=0.5, seed=0)
    with torch.no_grad():
        pred = res.model(res.transform(x + 30.0).float()).squeeze(1).numpy()
    assert np.mean((pred - y) ** 2) < 0.5 * np.var(y)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(norm_bound=0.0), ValueError, "norm_bound"),
    (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier"),
    (dict(generator=3), TypeError, "generator"),
    (dict(weights=(1.0, 1.0)), ValueError, "weights"),
    (dict(weights=(1.0, 0.0, 1.0)), ValueError, r"weights\[1\]"),
    (dict(dataset_size=0), ValueError, "dataset_size"),
    (dict(dataset_size=5.5), TypeError, "dataset_size"),
])
def test_private_mean_invalid(kwargs, exc, match):
    args = dict(norm_bound=1.0, noise_multiplier=1.0, dataset_size=5)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        private_mean(np.ones((5, 2)), **args)


@pytest.mark.parametrize("x,exc,match", [
    (np.ones(5), ValueError, "x must be a 2-d"),
    ([[1.0, 2.0]], TypeError, "x must be"),
    (np.array([[1.0, np.nan]]), ValueError, "finite"),
])
def test_features_invalid(x, exc, match):
    with pytest.raises(exc, match=match):
        private_mean(x, norm_bound=1.0, noise_multiplier=1.0, dataset_size=1)


def test_norm_bound_and_preprocessor_invalid():
    with pytest.raises(ValueError, match="center"):
        private_norm_bound(np.ones((4, 3)), np.zeros(2), norm_bound=1.0, noise_multiplier=1.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        FeaturePreprocessor(norm_bound=1.0, noise_multiplier=1.0, dataset_size=2).transform(np.ones((2, 2)))
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
    (dict(dataset_size=0), ValueError, "dataset_size"),
    (dict(classes=None), ValueError, "classes must be declared"),
    (dict(classes=[1]), ValueError, "at least 2 labels"),
    (dict(classes=[0, 1, 1]), ValueError, "must not repeat"),
    (dict(classes="01"), TypeError, "classes"),
    (dict(task="linear"), ValueError, "classes must be None"),
])
def test_dpsgdf_train_invalid(kwargs, exc, match):
    base = dict(target_epsilon=1.0, target_delta=1e-5, feature_bound=5.0, epochs=1, batch_size=10,
                dataset_size=40, classes=[0, 1])
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        dpsgdf_train(_X, _Y, **base)


def test_dpsgdf_train_label_checks():
    base = dict(target_epsilon=1.0, target_delta=1e-5, feature_bound=5.0, epochs=1, batch_size=10,
                dataset_size=40, classes=[0, 1])
    with pytest.raises(ValueError, match="y must have shape"):
        dpsgdf_train(_X, _Y[:-1], **base)
    with pytest.raises(ValueError, match="1 label\\(s\\) outside the declared classes"):
        dpsgdf_train(_X, np.where(np.arange(40) == 7, 5, _Y), **base)


# ---------------------------------------------------------------- issue 13: labels, n, seeds

def test_label_set_is_the_declared_one_not_the_labels_present():
    """The output size and classes_ are public: a rare label present or absent changes nothing."""
    y = (np.arange(40) % 2)
    kw = dict(epsilon=2.0, feature_bound=5.0, epochs=1, batch_size=10, dataset_size=40)
    with_rare = DPSGDFClassifier(classes=[0, 1, 2], **kw).fit(_X, np.where(np.arange(40) == 3, 2, y))
    # string labels, the rare one absent: outputs follow the declared order
    without = DPSGDFClassifier(classes=["dog", "cat", "owl"], **kw).fit(_X, np.array(["cat", "dog"])[y])
    np.testing.assert_array_equal(with_rare.classes_, [0, 1, 2])
    assert list(without.classes_) == ["dog", "cat", "owl"]
    for clf in (with_rare, without):
        assert clf.result_.model.out_features == 3
        assert clf.predict_proba(_X).shape == (40, 3)
        assert set(clf.predict(_X)) <= set(clf.classes_)
    with pytest.raises(ValueError, match="classes must be declared"):
        DPSGDFClassifier(**kw).fit(_X, y)
    with pytest.raises(ValueError, match="dataset_size must be declared"):
        DPSGDFClassifier(**dict(kw, dataset_size=None, classes=[0, 1])).fit(_X, y)
    with pytest.raises(ValueError, match="outside the declared classes"):
        DPSGDFClassifier(classes=[0, 2], **kw).fit(_X, y)


def _coupled_stage_outputs(x, extra, *, seed, N, R=10.0, sigma=2.0):
    """private_mean on D and on D ∪ {extra} with the SAME noise draws (same generator seed)."""
    a = private_mean(x, norm_bound=R, noise_multiplier=sigma, dataset_size=N,
                     generator=torch.Generator().manual_seed(seed))
    b = private_mean(np.vstack([x, extra]), norm_bound=R, noise_multiplier=sigma, dataset_size=N,
                     generator=torch.Generator().manual_seed(seed))
    return a, b


def test_released_means_move_by_the_sensitivity_the_ledger_assumes():
    """Add/remove one record: with the noise held fixed, the coarse centre moves by exactly
    clip(x*, R)/N and, given (c0, r), the fine mean by clip(x* − c0, r)/N — sensitivity R/N and r/N,
    i.e. 1/σ_j noise standard deviations, which is what GaussianDpEvent(σ_j) in the ledger assumes.
    (Dividing by the realised n instead moved the centre by ≈ 2R/n: twice as many deviations.)"""
    rng = np.random.default_rng(5)
    n, d, R, sigma = 200, 3, 10.0, 2.0
    x = rng.normal(size=(n, d)) + np.array([6.0, 0.0, 0.0])  # mean far from 0: worst case
    extra = np.array([[-R, 0.0, 0.0]])                       # ‖x*‖ = R, opposite to the mean
    for N in (n, n + 1):  # the declared size need not equal the realised one
        a, b = _coupled_stage_outputs(x, extra, seed=11, N=N, R=R, sigma=sigma)
        shift = (b.center - a.center).numpy()
        np.testing.assert_allclose(shift, extra[0] / N, rtol=0, atol=1e-12)
        s1 = a.events[0].noise_multiplier
        std1 = s1 * R / N                                   # the coarse noise std per coordinate
        assert np.linalg.norm(shift) / std1 == pytest.approx(1.0 / s1, rel=1e-9)
    # the fine stage runs the same noisy-mean mechanism on x_i − c0 with bound r: given (c0, r)
    # (earlier releases, conditioned on by adaptive composition) it moves by clip(v*, r)/N
    v = torch.tensor(x) - a.center
    v_star = torch.tensor(extra) - a.center
    fine_a = _noisy_mean(v, a.radius, 1.0, n, torch.Generator().manual_seed(2))
    fine_b = _noisy_mean(torch.cat([v, v_star]), a.radius, 1.0, n, torch.Generator().manual_seed(2))
    expected = v_star[0] * min(1.0, a.radius / float(v_star.norm())) / n
    torch.testing.assert_close(fine_b - fine_a, expected, rtol=0, atol=1e-12)
    assert float((fine_b - fine_a).norm()) == pytest.approx(a.radius / n, rel=1e-9)  # x* is clipped


def test_coarse_noise_has_the_declared_standard_deviation():
    """(c0 − Σ clip(x_i, R)/N)·N/R over 400 draws is N(0, σ1²) per coordinate (chi-square test)."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 4))
    R, N = 5.0, 60
    clipped = torch.tensor(x) * torch.clamp(R / torch.tensor(x).norm(dim=1), max=1.0)[:, None]
    z = []
    for seed in range(400):
        res = private_mean(x, norm_bound=R, noise_multiplier=1.5, dataset_size=N,
                           generator=torch.Generator().manual_seed(seed))
        z.append(((res.center - clipped.sum(0) / N) * N / (R * res.events[0].noise_multiplier)).numpy())
    z = np.concatenate(z)
    ss = float(np.sum(z ** 2))
    assert stats.chi2.sf(ss, z.size) > 1e-4 and stats.chi2.cdf(ss, z.size) > 1e-4
    assert stats.kstest(z, "norm").pvalue > 1e-4


def test_printed_epsilon_upper_bounds_the_mechanism_that_ran():
    """ε of what ran, composed by dp_accounting directly from the MEASURED stage sensitivities
    (coupled add/remove runs as above), is at most the ε dpsgdf_train prints."""
    rng = np.random.default_rng(7)
    n, d, R = 300, 3, 20.0
    x = rng.normal(size=(n, d)) + 8.0
    y = (x[:, 0] > 8.0).astype(int)
    eps, delta = 2.0, 1e-5
    res = dpsgdf_train(x, y, target_epsilon=eps, target_delta=delta, feature_bound=R, dataset_size=n,
                       classes=[0, 1], epochs=2, batch_size=50, preprocessing_fraction=0.3)
    pre = res.preprocessor
    # measured add/remove shift of the released centre with the noise held fixed, in units of the
    # clip bound / N (the noise std is σ_j times that unit): 1 means "sensitivity as accounted"
    a, b = _coupled_stage_outputs(x, -R * np.ones((1, d)) / math.sqrt(d), seed=3, N=n, R=R, sigma=1.0)
    coarse_shift = float((b.center - a.center).norm()) / (R / n)
    assert coarse_shift == pytest.approx(1.0, rel=1e-9)
    ran = [dpe.GaussianDpEvent(e.noise_multiplier / coarse_shift) if i in (0, 2) else
           dpe.GaussianDpEvent(e.noise_multiplier)                     # histograms: count ±1
           for i, e in enumerate(pre.events_)]
    ref = dp_pld.PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(dpe.ComposedDpEvent(ran))
    ref.compose(dpe.PoissonSampledDpEvent(50 / n, dpe.GaussianDpEvent(res.noise_multiplier)), res.steps)
    true_eps = ref.get_epsilon(delta)
    assert true_eps <= res.epsilon * (1 + 2e-3) and res.epsilon <= eps


def test_default_seed_is_os_entropy_and_an_explicit_seed_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededRandomnessWarning)
        means = []
        for _ in range(2):
            torch.manual_seed(0)  # a script's global seed must not fix the noise
            means.append(private_mean(_X, norm_bound=5.0, noise_multiplier=1.0, dataset_size=40).mean)
        pre = [FeaturePreprocessor(norm_bound=5.0, noise_multiplier=1.0, dataset_size=40).fit(_X) for _ in range(2)]
    assert not torch.equal(means[0], means[1])
    assert not torch.equal(pre[0].mean_, pre[1].mean_)
    base = dict(target_epsilon=1.0, target_delta=1e-5, feature_bound=5.0, epochs=1, batch_size=10,
                dataset_size=40, classes=[0, 1])
    with pytest.warns(SeededRandomnessWarning, match="seed=4") as record:
        dpsgdf_train(_X, _Y, seed=4, **base)
    assert record[0].filename == __file__
    with pytest.warns(SeededRandomnessWarning) as record:
        DPSGDFClassifier(classes=[0, 1], dataset_size=40, epochs=1, batch_size=10, random_state=4).fit(_X, _Y)
    assert record[0].filename == __file__
