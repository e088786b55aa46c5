"""Private ADMM randomness (issue 13): OS entropy by default, an explicit integer seed warns."""

import warnings

import numpy as np
import pytest

from dpkit.admm import DPLassoADMM, dp_proximal_sgd, l1_prox, private_admm, squared_loss_grad, squared_loss_prox
from dpkit.errors import SeededRandomnessWarning


def _data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4))
    return X, X @ np.array([1.0, 0.0, -1.0, 0.5])


def _admm(**kw):
    X, y = _data()
    return private_admm(X, y, squared_loss_prox, l1_prox(0.01), noise_multiplier=1.0, clip=1.0,
                        variant="federated", sampling_rate=0.5, max_iter=3, **kw)


def test_default_runs_draw_different_sampling_and_noise_without_warning():
    X, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededRandomnessWarning)
        a, b = _admm(), _admm()
        sgd = [dp_proximal_sgd(X, y, squared_loss_grad, l1_prox(0.01), noise_multiplier=1.0, clip=1.0,
                               learning_rate=0.1, steps=2, sampling_rate=0.5) for _ in range(2)]
        est = [DPLassoADMM(alpha=0.01, epsilon=1.0, max_iter=3).fit(X, y).coef_ for _ in range(2)]
        given = _admm(rng=np.random.default_rng())  # a Generator is the caller's choice: no warning
    assert not np.array_equal(a.released, b.released)
    assert not np.array_equal(sgd[0], sgd[1])
    assert not np.array_equal(est[0], est[1])
    assert given.steps == 3


def test_explicit_integer_seed_warns_at_the_caller_and_reproduces():
    with pytest.warns(SeededRandomnessWarning, match="rng=7") as record:
        a = _admm(rng=7)
    assert record[0].filename == __file__
    with pytest.warns(SeededRandomnessWarning):
        b = _admm(rng=7)
    np.testing.assert_array_equal(a.released, b.released)
    X, y = _data()
    with pytest.warns(SeededRandomnessWarning, match="random_state=3") as record:
        DPLassoADMM(alpha=0.01, epsilon=1.0, max_iter=2, random_state=3).fit(X, y)
    assert record[0].filename == __file__
    with pytest.warns(SeededRandomnessWarning, match="rng=1") as record:
        dp_proximal_sgd(X, y, squared_loss_grad, l1_prox(0.01), noise_multiplier=1.0, clip=1.0,
                        learning_rate=0.1, steps=1, rng=1)
    assert record[0].filename == __file__


@pytest.mark.parametrize("rng, exc", [(-1, ValueError), (1.5, TypeError), ("x", TypeError)])
def test_bad_rng_is_refused(rng, exc):
    with pytest.raises(exc, match="rng must be an integer"):
        _admm(rng=rng)
