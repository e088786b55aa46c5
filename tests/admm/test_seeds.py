"""Private ADMM randomness (issue 13): OS entropy by default, an explicit integer seed warns,
rounds keyed by (seed, round) so that a checkpointed run resumes without replaying."""

import pickle
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


@pytest.mark.parametrize("variant, q", [("centralized", None), ("federated", 0.4), ("decentralized", None)])
@pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")
def test_resumed_from_disk_equals_uninterrupted_bit_for_bit(tmp_path, variant, q):
    X, y = _data()
    kw = dict(noise_multiplier=0.8, clip=0.5, variant=variant, sampling_rate=q, record_history=True)
    whole = private_admm(X, y, squared_loss_prox, l1_prox(0.01), max_iter=6, rng=21, **kw)
    first = private_admm(X, y, squared_loss_prox, l1_prox(0.01), max_iter=3, rng=21, **kw)
    with open(tmp_path / "admm.pkl", "wb") as fh:
        pickle.dump(first.state_dict(), fh)
    with open(tmp_path / "admm.pkl", "rb") as fh:
        state = pickle.load(fh)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededRandomnessWarning)  # resuming needs no explicit seed
        resumed = private_admm(X, y, squared_loss_prox, l1_prox(0.01), max_iter=6, resume=state, **kw)
    assert resumed.duals.dtype == np.float64
    np.testing.assert_array_equal(resumed.duals, whole.duals)
    np.testing.assert_array_equal(resumed.released, whole.released)
    np.testing.assert_array_equal(resumed.coef, whole.coef)
    for a, b in zip(resumed.history, whole.history):
        np.testing.assert_array_equal(a, b)
    assert resumed.steps == whole.steps and resumed.rounds == 6
    # the resumed rounds are rounds 3..5, not a replay of 0..2: the model moves differently
    moves = np.diff(np.vstack([np.zeros(X.shape[1])] + resumed.history), axis=0)
    assert not np.allclose(moves[:3], moves[3:])


def test_a_default_run_can_be_resumed_and_bad_resumes_are_refused():
    X, y = _data()
    first = _admm()                       # OS-entropy seed, 3 rounds
    state = first.state_dict()
    later = private_admm(
        X, y, squared_loss_prox, l1_prox(0.01), noise_multiplier=1.0, clip=1.0, variant="federated",
        sampling_rate=0.5, max_iter=5, resume=state)
    assert later.seed == first.seed and later.steps == 5
    with pytest.raises(ValueError, match="rng must be None with resume"):
        private_admm(X, y, squared_loss_prox, l1_prox(0.01), noise_multiplier=1.0, clip=1.0,
                     variant="federated", sampling_rate=0.5, max_iter=5, resume=state, rng=np.random.default_rng())
    with pytest.raises(ValueError, match="same data shape and settings"):
        private_admm(X, y, squared_loss_prox, l1_prox(0.01), noise_multiplier=2.0, clip=1.0,
                     variant="federated", sampling_rate=0.5, max_iter=5, resume=state)
    with pytest.raises(ValueError, match="max_iter must be >= the 3 rounds"):
        private_admm(X, y, squared_loss_prox, l1_prox(0.01), noise_multiplier=1.0, clip=1.0,
                     variant="federated", sampling_rate=0.5, max_iter=2, resume=state)
    with pytest.raises(TypeError, match="resume must be a dict"):
        private_admm(X, y, squared_loss_prox, l1_prox(0.01), noise_multiplier=1.0, clip=1.0,
                     variant="federated", sampling_rate=0.5, max_iter=5, resume=[1])
