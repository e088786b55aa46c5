"""Private ADMM: non-private limit vs scikit-learn, the injected noise vs the accounted noise, sampling."""

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import Lasso, LogisticRegression

from dpkit.admm import (DPLassoADMM, DPLogisticADMM, dp_proximal_sgd, l1_prox, l2_prox,
                        elastic_net_prox, logistic_loss_prox, no_prox, private_admm,
                        squared_loss_grad, squared_loss_prox)

INF = float("inf")
# explicit seeds below are test conveniences (they warn; see test_seeds.py)
pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")


def _lasso_data(n=200, p=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) / np.sqrt(p)
    w = np.zeros(p)
    w[:3] = [2.0, -1.5, 1.0]
    return X, X @ w + 0.7 + 0.1 * rng.normal(size=n)


@pytest.fixture(scope="module")
def lasso_ref():
    X, y = _lasso_data()
    ref = Lasso(alpha=0.02, tol=1e-12, max_iter=100_000).fit(X, y)
    return X, y, ref


@pytest.mark.parametrize("variant,max_iter", [("centralized", 300), ("federated", 400), ("decentralized", 150)])
def test_no_noise_no_clip_converges_to_sklearn_lasso(lasso_ref, variant, max_iter):
    X, y, ref = lasso_ref
    m = DPLassoADMM(alpha=0.02, epsilon=None, clip=None, variant=variant, max_iter=max_iter,
                    step=3.0, sampling_rate=0.5, random_state=1).fit(X, y)
    np.testing.assert_allclose(m.coef_, ref.coef_, atol=1e-4)
    assert m.intercept_ == pytest.approx(ref.intercept_, abs=1e-4)
    assert m.epsilon_ == INF and m.noise_multiplier_ == 0.0


def test_clipping_without_noise_keeps_the_fixed_point(lasso_ref):
    X, y, ref = lasso_ref
    m = DPLassoADMM(alpha=0.02, epsilon=None, clip=0.05, max_iter=2000, step=3.0).fit(X, y)
    np.testing.assert_allclose(m.coef_, ref.coef_, atol=1e-4)


def test_no_noise_logistic_matches_sklearn():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(150, 4))
    y = (X @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3 + rng.logistic(size=150) > 0).astype(int)
    alpha = 0.01
    ref = LogisticRegression(C=1.0 / (alpha * len(y)), tol=1e-12, max_iter=10_000).fit(X, y)
    m = DPLogisticADMM(alpha=alpha, classes=[0, 1], epsilon=None, clip=None, max_iter=800, step=2.0).fit(X, y)
    np.testing.assert_allclose(m.coef_, ref.coef_[0], atol=1e-4)
    assert m.intercept_ == pytest.approx(ref.intercept_[0], abs=1e-4)
    assert np.array_equal(m.predict(X), ref.predict(X))
    np.testing.assert_allclose(m.predict_proba(X), ref.predict_proba(X), atol=1e-4)


def test_logistic_accepts_string_labels():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 3))
    y = np.where(X[:, 0] > 0, "spam", "ham")
    m = DPLogisticADMM(alpha=0.01, classes=["ham", "spam"], epsilon=None, clip=None, max_iter=200,
                       step=2.0).fit(X, y)
    assert list(m.classes_) == ["ham", "spam"] and m.score(X, y) > 0.9


def test_logistic_label_set_is_declared_not_read_off_the_data():
    """Issue 13: classes_ is the declared pair, whatever labels occur; others are refused."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(30, 3))
    kw = dict(alpha=0.01, epsilon=None, clip=None, max_iter=5)
    m = DPLogisticADMM(classes=["no", "yes"], **kw).fit(X, np.full(30, "no"))  # one label present
    assert list(m.classes_) == ["no", "yes"] and m.predict_proba(X).shape == (30, 2)
    with pytest.raises(ValueError, match="classes must be declared"):
        DPLogisticADMM(**kw).fit(X, np.arange(30) % 2)
    with pytest.raises(ValueError, match="two distinct labels"):
        DPLogisticADMM(classes=[1, 1], **kw).fit(X, np.arange(30) % 2)
    with pytest.raises(ValueError, match="1 label\\(s\\) outside the declared classes"):
        DPLogisticADMM(classes=[0, 1], **kw).fit(X, np.where(np.arange(30) == 4, 2, np.arange(30) % 2))


def test_prox_operators_solve_their_problems():
    # each prox checked by its optimality condition / direct minimisation
    rng = np.random.default_rng(0)
    V, X = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    y, ys, step = rng.normal(size=5), np.sign(rng.normal(size=5)), 0.7
    P = squared_loss_prox(V, step, X, y)
    grad = -(y - np.einsum("ij,ij->i", X, P))[:, None] * X + (P - V) / step
    np.testing.assert_allclose(grad, 0, atol=1e-12)
    P = logistic_loss_prox(V, step, X, ys)
    marg = ys * np.einsum("ij,ij->i", X, P)
    grad = -(ys / (1 + np.exp(marg)))[:, None] * X + (P - V) / step
    np.testing.assert_allclose(grad, 0, atol=1e-10)
    v = np.array([1.0, -0.2, 0.05, -3.0])
    np.testing.assert_allclose(l1_prox(0.5)(v, 0.4), [0.8, 0.0, 0.0, -2.8])
    np.testing.assert_allclose(l2_prox(2.0)(v, 0.5), v / 2.0)
    np.testing.assert_allclose(elastic_net_prox(1.0, 1.0)(v, 0.4), l1_prox(1.0)(v, 0.4))
    np.testing.assert_allclose(elastic_net_prox(2.0, 0.0)(v, 0.5), v / 2.0)
    np.testing.assert_allclose(no_prox()(v, 3.0), v)
    mask = np.array([True, True, True, False])
    np.testing.assert_allclose(l1_prox(0.5)(v, 0.4, mask), [0.8, 0.0, 0.0, -3.0])


def _one_step(variant, sigma, seed, lam=0.3, L=0.2, n=3000, p=4, q=None):
    X, y = _lasso_data(n=n, p=p, seed=5)
    return private_admm(X, y, squared_loss_prox, l1_prox(0.01), noise_multiplier=sigma, clip=L,
                        variant=variant, relaxation=lam, max_iter=1, sampling_rate=q, rng=seed)


def _check_gaussian(noise, expected_std):
    assert stats.kstest(noise / expected_std, "norm").pvalue > 1e-3
    # chi-square test of the variance (two-sided, level 1e-3)
    chi2, dof = np.sum(noise ** 2) / expected_std ** 2, noise.size
    assert stats.chi2.ppf(5e-4, dof) < chi2 < stats.chi2.ppf(1 - 5e-4, dof)


def test_local_noise_has_the_accounted_std():
    # one federated step (q = 1) with and without noise from the same start: the difference IS the noise
    lam, L, sigma = 0.3, 0.2, 1.7
    noisy = _one_step("federated", sigma, seed=11, lam=lam, L=L, q=1.0)
    clean = _one_step("federated", 0.0, seed=11, lam=lam, L=L, q=1.0)
    expected_std = sigma * 2 * lam * 2 * L  # sigma times the replace-one sensitivity 2*lam*(2L)
    assert noisy.noise_std == pytest.approx(expected_std)
    _check_gaussian((noisy.duals - clean.duals).ravel(), expected_std)


def test_centralized_noise_has_the_accounted_std():
    # the curator's noise is on the released aggregate only; the users' states stay exact
    lam, L, sigma, n, p = 0.4, 0.5, 2.3, 40, 4000
    noisy = _one_step("centralized", sigma, seed=3, lam=lam, L=L, n=n, p=p)
    clean = _one_step("centralized", 0.0, seed=3, lam=lam, L=L, n=n, p=p)
    expected_std = sigma * 4 * lam * L / n
    assert noisy.noise_std == pytest.approx(expected_std)
    assert np.array_equal(noisy.duals, clean.duals)
    _check_gaussian(noisy.released - clean.released, expected_std)


def test_centralized_aggregate_moves_within_the_accounted_sensitivity():
    # replacing one user's data moves the mean of u after t noiseless steps by <= t * 4 lam L / n
    lam, L, n = 0.5, 0.1, 30
    X, y = _lasso_data(n=n, p=5, seed=9)
    X2, y2 = X.copy(), y.copy()
    X2[0], y2[0] = -10 * X[0], 50.0
    for t in (1, 3, 8):
        runs = [private_admm(A, b, squared_loss_prox, l1_prox(0.01), noise_multiplier=0.0, clip=L,
                             relaxation=lam, max_iter=t) for A, b in ((X, y), (X2, y2))]
        gap = np.linalg.norm(runs[0].released - runs[1].released)
        assert gap <= t * 4 * lam * L / n * (1 + 1e-9)
        assert runs[0].sensitivity == pytest.approx(4 * lam * L / n)


def test_clean_update_respects_the_sensitivity():
    lam, L = 0.3, 0.2
    clean = _one_step("centralized", 0.0, seed=0, lam=lam, L=L)
    norms = np.linalg.norm(clean.duals, axis=1)
    assert norms.max() <= 2 * lam * L * (1 + 1e-12)


def test_federated_samples_clients_at_the_accounted_rate():
    q, n = 0.2, 3000
    res = _one_step("federated", 0.0, seed=4, n=n, q=q)
    moved = np.count_nonzero(np.linalg.norm(res.duals, axis=1) > 0)
    assert res.sampling_rate == q
    assert stats.binomtest(moved, n, q).pvalue > 1e-3


def test_decentralized_visits_one_user_per_step_and_counts_steps():
    X, y = _lasso_data(n=50)
    res = private_admm(X, y, squared_loss_prox, l1_prox(0.01), noise_multiplier=1.0, clip=0.5,
                       variant="decentralized", max_iter=3, rng=0)
    assert res.steps == 150 and res.sampling_rate == pytest.approx(1 / 50)


def test_seeded_runs_are_reproducible_and_seeds_differ():
    a = _one_step("federated", 1.0, seed=7, q=0.3, n=200)
    b = _one_step("federated", 1.0, seed=7, q=0.3, n=200)
    c = _one_step("federated", 1.0, seed=8, q=0.3, n=200)
    assert np.array_equal(a.duals, b.duals) and not np.array_equal(a.duals, c.duals)


def test_private_estimator_spends_at_most_its_budget(lasso_ref):
    X, y, _ = lasso_ref
    for variant in ("centralized", "federated", "decentralized"):
        m = DPLassoADMM(alpha=0.02, epsilon=2.0, delta=1e-5, variant=variant, max_iter=5,
                        sampling_rate=0.2, random_state=0).fit(X, y)
        assert 0 < m.noise_multiplier_ and m.epsilon_ <= 2.0
        assert np.all(np.isfinite(m.coef_))


def test_more_budget_gives_a_better_model_on_average(lasso_ref):
    X, y, ref = lasso_ref
    err = {}
    for eps in (0.5, 50.0):
        errs = [np.linalg.norm(DPLassoADMM(alpha=0.02, epsilon=eps, max_iter=20, clip=0.5, step=3.0,
                                           random_state=s).fit(X, y).coef_ - ref.coef_)
                for s in range(4)]
        err[eps] = np.mean(errs)
    assert err[50.0] < err[0.5]


def test_dp_proximal_sgd_without_noise_matches_sklearn(lasso_ref):
    X, y, ref = lasso_ref
    Xb = np.hstack([X, np.ones((len(y), 1))])
    mask = np.r_[np.ones(X.shape[1], bool), False]
    w = dp_proximal_sgd(Xb, y, squared_loss_grad, l1_prox(0.02), noise_multiplier=0.0, clip=1e6,
                        learning_rate=1.0, steps=3000, penalized=mask)
    np.testing.assert_allclose(w[:-1], ref.coef_, atol=1e-4)
    assert w[-1] == pytest.approx(ref.intercept_, abs=1e-4)


X0, Y0 = _lasso_data(n=20, p=3)
BASE = dict(noise_multiplier=1.0, clip=1.0)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(variant="gossip"), ValueError, "variant"),
    (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier"),
    (dict(clip=0.0), ValueError, "clip"),
    (dict(clip=INF), ValueError, "clip"),
    (dict(relaxation=1.0), ValueError, "relaxation"),
    (dict(relaxation=0.0), ValueError, "relaxation"),
    (dict(step=-1.0), ValueError, "step"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(variant="federated"), ValueError, "sampling_rate"),
    (dict(variant="federated", sampling_rate=1.5), ValueError, "sampling_rate"),
    (dict(sampling_rate=0.5), ValueError, "sampling_rate"),
    (dict(penalized=np.ones(2, bool)), ValueError, "penalized"),
    (dict(X=np.ones(3)), ValueError, "X"),
    (dict(y=np.ones(7)), ValueError, "y"),
    (dict(X=np.full((20, 3), np.nan)), ValueError, "finite"),
    (dict(loss_prox="squared"), TypeError, "loss_prox"),
    (dict(loss_prox=lambda V, step, X, y: V[:, :2]), ValueError, "loss_prox"),
    (dict(loss_prox=lambda V, step, X, y: np.full_like(V, np.inf)), ValueError, "loss_prox"),
])
def test_private_admm_invalid_inputs(kwargs, exc, word):
    args = dict(BASE, X=X0, y=Y0, loss_prox=squared_loss_prox, reg_prox=l1_prox(0.1))
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        private_admm(args.pop("X"), args.pop("y"), args.pop("loss_prox"), args.pop("reg_prox"), **args)


@pytest.mark.parametrize("est,kwargs,exc,word", [
    (DPLassoADMM, dict(alpha=-1.0), ValueError, "alpha"),
    (DPLassoADMM, dict(epsilon=0.0), ValueError, "epsilon"),
    (DPLassoADMM, dict(delta=1.0), ValueError, "delta"),
    (DPLassoADMM, dict(variant="p2p"), ValueError, "variant"),
    (DPLassoADMM, dict(clip=None), ValueError, "clip"),
    (DPLassoADMM, dict(noise_multiplier=1.0), ValueError, "noise_multiplier"),
    (DPLassoADMM, dict(epsilon=None, noise_multiplier=-2.0), ValueError, "noise_multiplier"),
    (DPLassoADMM, dict(variant="federated", sampling_rate=0.0), ValueError, "sampling_rate"),
    (DPLassoADMM, dict(max_iter=2.5), TypeError, "max_iter"),
    (DPLogisticADMM, dict(penalty="l0"), ValueError, "penalty"),
    (DPLogisticADMM, dict(penalty="elasticnet", l1_ratio=2.0), ValueError, "l1_ratio"),
])
def test_estimator_invalid_params(est, kwargs, exc, word):
    y = Y0 if est is DPLassoADMM else (Y0 > np.median(Y0)).astype(int)
    if est is DPLogisticADMM:
        kwargs = {"classes": [0, 1], **kwargs}
    with pytest.raises(exc, match=word):
        est(**kwargs).fit(X0, y)


def test_estimator_invalid_data_and_unfitted():
    with pytest.raises(ValueError, match="outside the declared classes"):
        DPLogisticADMM(classes=[0, 1]).fit(X0, np.full(20, 3))
    with pytest.raises(ValueError, match="fit"):
        DPLassoADMM().predict(X0)
    m = DPLassoADMM(epsilon=None, clip=None, max_iter=2).fit(X0, Y0)
    with pytest.raises(ValueError, match="columns"):
        m.predict(np.ones((2, 5)))


@pytest.mark.parametrize("variant,q", [("centralized", None), ("federated", 0.5), ("decentralized", None)])
def test_history_records_one_model_per_round(variant, q):
    X, y = _lasso_data(n=30)
    res = private_admm(X, y, squared_loss_prox, l1_prox(0.01), noise_multiplier=0.5, clip=0.3,
                       variant=variant, max_iter=4, sampling_rate=q, rng=0, record_history=True)
    assert len(res.history) == 4
    np.testing.assert_array_equal(res.history[-1], res.coef)
