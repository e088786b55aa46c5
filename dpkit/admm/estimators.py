"""scikit-learn style estimators trained with private ADMM (Cyffers, Bellet, Basu, ICML 2023).

``DPLassoADMM`` minimises ``(1/(2n)) ||y - X w - b||^2 + alpha ||w||_1`` (scikit-learn's ``Lasso``
scaling); ``DPLogisticADMM`` minimises ``(1/n) sum log(1 + exp(-y_i (x_i.w + b))) + penalty(w)``
(equal to scikit-learn's ``LogisticRegression(C=1/(alpha n))`` for the L2 penalty). The intercept is an
extra, unpenalised coordinate (no data-dependent centring, which would leak). Each row is one user;
privacy is (epsilon, delta)-DP with respect to replacing one row, accounted by
:func:`dpkit.admm.admm_epsilon`.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from dpkit import _validate as v
from dpkit.admm.accounting import admm_epsilon, calibrate_admm_noise
from dpkit.admm.prox import elastic_net_prox, l1_prox, l2_prox, logistic_loss_prox, squared_loss_prox
from dpkit.admm.solver import VARIANTS, _check_data, as_generator, private_admm


class _ADMMBase(BaseEstimator):
    """Shared parameter checks, noise choice and the ADMM run of the estimators."""

    def _noise_multiplier(self, steps, q, n):
        # explicit noise, calibrated noise, or none (non-private)
        if self.noise_multiplier is not None:
            if self.epsilon is not None:
                raise ValueError("give either epsilon (noise calibrated) or noise_multiplier, not "
                                 f"both; got epsilon={self.epsilon!r}, "
                                 f"noise_multiplier={self.noise_multiplier!r}")
            return v.non_negative("noise_multiplier", self.noise_multiplier)
        if self.epsilon is None:
            return 0.0
        v.positive("epsilon", self.epsilon)
        if v.one_of("calibration", self.calibration, ("dpkit", "reference")) == "reference":
            if self.variant == "centralized" or self.clip is None:
                raise ValueError("calibration='reference' is the reference code's local noise: it needs "
                                 "variant='federated' or 'decentralized' and a clip; got "
                                 f"variant={self.variant!r}, clip={self.clip!r}")
            from dpkit.admm.reference import reference_admm_calibration

            self.reference_ = reference_admm_calibration(self.epsilon, self.delta, clip=self.clip, steps=steps,
                                                         num_users=n, relaxation=self.relaxation)
            return self.reference_.noise_multiplier
        return calibrate_admm_noise(self.epsilon, self.delta, steps, variant=self.variant,
                                    sampling_rate=None if self.variant == "centralized" else q)

    def _fit_admm(self, X, y, loss_prox, reg_prox):
        v.one_of("variant", self.variant, VARIANTS)
        v.delta("delta", self.delta)
        max_iter = v.positive_int("max_iter", self.max_iter)
        n = X.shape[0]
        if self.variant == "federated":
            q = v.probability("sampling_rate", self.sampling_rate)
        else:
            q = 1.0 if self.variant == "centralized" else 1.0 / n
        steps = max_iter * n if self.variant == "decentralized" else max_iter
        sigma = self._noise_multiplier(steps, q, n)
        if sigma > 0 and self.clip is None:
            raise ValueError("clip must be a positive number for private training; got None")
        if self.fit_intercept:
            X = np.hstack([X, np.ones((n, 1))])
        penalized = np.ones(X.shape[1], dtype=bool)
        if self.fit_intercept:
            penalized[-1] = False  # the intercept is not regularised
        res = private_admm(X, y, loss_prox, reg_prox, noise_multiplier=sigma,
                           clip=float("inf") if self.clip is None else self.clip,
                           variant=self.variant, relaxation=self.relaxation, step=self.step,
                           max_iter=max_iter,
                           sampling_rate=q if self.variant == "federated" else None,
                           penalized=penalized, rng=as_generator("random_state", self.random_state))
        w = res.coef
        self.coef_ = w[:-1] if self.fit_intercept else w
        self.intercept_ = float(w[-1]) if self.fit_intercept else 0.0
        self.noise_multiplier_ = sigma
        self.n_steps_ = res.steps
        self.epsilon_ = (float("inf") if sigma == 0 else admm_epsilon(
            sigma, res.steps, self.delta, variant=self.variant,
            sampling_rate=None if self.variant == "centralized" else q))
        self.n_features_in_ = self.coef_.shape[0]
        return self

    def _decision(self, X):
        if not hasattr(self, "coef_"):
            raise ValueError("this estimator is not fitted yet; call fit first")
        X = np.asarray(X, dtype=float)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must be 2-D with {self.n_features_in_} columns; got shape {X.shape}")
        return X @ self.coef_ + self.intercept_


_COMMON_ARGS = """
        epsilon: target epsilon (> 0); the noise is calibrated so that the run's epsilon is at most
            the target. ``None``: non-private (no noise) unless ``noise_multiplier`` is given.
        delta: delta in (0, 1).
        variant: ``"centralized"``, ``"federated"`` or ``"decentralized"``.
        clip: bound L on ``||x_i - z||`` in the update (None: no clipping; non-private only).
        max_iter: rounds (passes over the users for ``"decentralized"``).
        sampling_rate: client sampling rate (``"federated"`` only).
        relaxation: KM relaxation in (0, 1).  step: prox step (> 0).
        fit_intercept: learn an unpenalised intercept.
        noise_multiplier: give the noise directly instead of ``epsilon`` (epsilon must be None).
        calibration: ``"dpkit"`` (default) or ``"reference"``: the authors' code's noise for
            ``epsilon`` (:func:`dpkit.admm.reference.reference_admm_calibration`; federated or
            decentralized only; warns). Its ε, kept in ``reference_``, is only CLAIMED by the
            reference code; ``epsilon_`` is always dpkit's account of the noise that ran.
        random_state: None (default: OS entropy), a numpy Generator, or an int seed for tests
            (emits ``SeededRandomnessWarning``: a fixed seed fixes the noise).

    Attributes:
        coef_, intercept_, noise_multiplier_, epsilon_ (spent at ``delta``; inf without noise),
        n_steps_ (noisy steps accounted).

    Raises:
        ValueError / TypeError: at ``fit`` for invalid parameters or data.
"""


class DPLassoADMM(RegressorMixin, _ADMMBase):
    __doc__ = """Differentially private Lasso trained with private consensus ADMM.

    Cyffers, Bellet, Basu, ICML 2023, Sec. 4 (private ADMM) and Fig. 1 (Lasso); the accounting is
    described in docs/admm.md.

    Args:
        alpha: L1 strength (>= 0), scikit-learn ``Lasso`` scaling.""" + _COMMON_ARGS

    def __init__(self, alpha=1.0, *, epsilon=1.0, delta=1e-5, variant="centralized", clip=1.0,
                 max_iter=50, sampling_rate=0.1, relaxation=0.5, step=1.0, fit_intercept=True,
                 noise_multiplier=None, random_state=None, calibration="dpkit"):
        self.alpha = alpha
        self.calibration = calibration
        self.epsilon = epsilon
        self.delta = delta
        self.variant = variant
        self.clip = clip
        self.max_iter = max_iter
        self.sampling_rate = sampling_rate
        self.relaxation = relaxation
        self.step = step
        self.fit_intercept = fit_intercept
        self.noise_multiplier = noise_multiplier
        self.random_state = random_state

    def fit(self, X, y):
        """Fit the model on rows of X (one user each); returns self."""
        X, y = _check_data(X, y)
        alpha = v.non_negative("alpha", self.alpha)
        return self._fit_admm(X, y, squared_loss_prox, l1_prox(alpha))

    def predict(self, X):
        """Return ``X @ coef_ + intercept_``."""
        return self._decision(X)


class DPLogisticADMM(ClassifierMixin, _ADMMBase):
    __doc__ = """Differentially private binary logistic regression trained with private consensus ADMM.

    Cyffers, Bellet, Basu, ICML 2023, Sec. 4; the logistic prox is solved per user by bisection.

    Args:
        alpha: penalty strength (>= 0): objective ``mean log-loss + alpha * penalty(w)``.
        penalty: ``"l2"`` (``||w||^2 / 2``), ``"l1"`` or ``"elasticnet"``.
        l1_ratio: elastic-net mixing in [0, 1].
        classes: the two PUBLIC labels (required), ``classes[1]`` the positive class: ``classes_``
            is this, never ``np.unique(y)``, which would release the labels present outside the
            privacy ledger (one user with a unique label changes it: ε = ∞).""" + _COMMON_ARGS

    def __init__(self, alpha=1e-3, *, classes=None, penalty="l2", l1_ratio=0.5, epsilon=1.0, delta=1e-5,
                 variant="centralized", clip=1.0, max_iter=50, sampling_rate=0.1, relaxation=0.5,
                 step=1.0, fit_intercept=True, noise_multiplier=None, random_state=None,
                 calibration="dpkit"):
        self.alpha = alpha
        self.calibration = calibration
        self.classes = classes
        self.penalty = penalty
        self.l1_ratio = l1_ratio
        self.epsilon = epsilon
        self.delta = delta
        self.variant = variant
        self.clip = clip
        self.max_iter = max_iter
        self.sampling_rate = sampling_rate
        self.relaxation = relaxation
        self.step = step
        self.fit_intercept = fit_intercept
        self.noise_multiplier = noise_multiplier
        self.random_state = random_state

    def fit(self, X, y):
        """Fit on binary labels from the declared ``classes``; returns self.

        Raises:
            ValueError: ``classes`` not declared or not two distinct labels, a label of ``y``
                outside ``classes``, or invalid data / parameters.
        """
        labels = np.asarray(y)
        if labels.ndim != 1:
            raise ValueError(f"y must be a 1-D array of labels; got shape {labels.shape}")
        if self.classes is None:
            raise ValueError("classes must be declared: the two public labels, e.g. classes=[0, 1] "
                             "(reading them off y would release which labels occur)")
        classes = np.asarray(list(self.classes))
        if classes.shape != (2,) or classes[0] == classes[1]:
            raise ValueError(f"classes must be two distinct labels; got {self.classes!r}")
        outside = ~np.isin(labels, classes)
        if outside.any():
            raise ValueError(f"y has {int(outside.sum())} label(s) outside the declared classes "
                             f"{classes.tolist()!r}")
        X, signs = _check_data(X, np.where(labels == classes[1], 1.0, -1.0))
        alpha = v.non_negative("alpha", self.alpha)
        v.one_of("penalty", self.penalty, ("l1", "l2", "elasticnet"))
        l1_ratio = v.probability("l1_ratio", self.l1_ratio, allow_zero=True)
        reg = {"l2": lambda: l2_prox(alpha), "l1": lambda: l1_prox(alpha),
               "elasticnet": lambda: elastic_net_prox(alpha, l1_ratio)}[self.penalty]()
        self.classes_ = classes
        return self._fit_admm(X, signs, logistic_loss_prox, reg)

    def decision_function(self, X):
        """Return ``X @ coef_ + intercept_`` (positive means ``classes_[1]``)."""
        return self._decision(X)

    def predict_proba(self, X):
        """Return (m, 2) class probabilities."""
        p1 = np.exp(-np.logaddexp(0.0, -self._decision(X)))
        return np.column_stack([1.0 - p1, p1])

    def predict(self, X):
        """Return the predicted class labels."""
        return np.where(self._decision(X) > 0, self.classes_[1], self.classes_[0])
