"""Self-audit: gradient canaries inside dpkit's own DP-SGD, checked by the one-shot estimate."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.audit import audit, canary_directions
from dpkit.audit.canaries import CanaryAuditor


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))  # 2762 parameters


def test_contribution_is_clip_norm_times_sampled_directions():
    # zero data loss, σ = 0: one SGD step moves θ by exactly −lr·C·Σ_{sampled j} u_j / B̄
    model = _model()
    lr, clip, q, expected_batch = 0.5, 2.0, 0.3, 4.0
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=0.0, max_grad_norm=clip,
                                   sample_rate=q, expected_batch_size=expected_batch)
    canaries = CanaryAuditor(opt, num_canaries=40, num_unseen=10, sampling_rate=q, seed=9)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    x = torch.randn(5, 32)
    opt.zero_grad()
    (0.0 * model(x).sum()).backward()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    sampled = canaries.inclusions.astype(bool)
    assert 0 < sampled.sum() < 40
    dirs = canary_directions(9, 40, canaries.dim)  # independent regeneration, float64
    expected = -lr * clip * dirs[sampled].sum(axis=0) / expected_batch
    np.testing.assert_allclose((after - before).numpy(), expected, atol=1e-5)
    # the inserted canaries' cosine statistic sees exactly that movement
    scores, unseen = canaries.scores()
    ref = dirs @ (-expected) / np.linalg.norm(expected)
    np.testing.assert_allclose(scores, ref, atol=1e-4)
    assert unseen.shape == (10,)


def test_canaries_are_poisson_sampled_at_the_given_rate():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=0.0, max_grad_norm=1.0,
                                   sample_rate=0.1, expected_batch_size=4)
    canaries = CanaryAuditor(opt, num_canaries=50, num_unseen=2, sampling_rate=0.1, seed=1)
    x = torch.randn(4, 32)
    for _ in range(40):
        opt.zero_grad()
        (0.0 * model(x).sum()).backward()
        opt.step()
    total = int(canaries.inclusions.sum())
    assert stats.binomtest(total, 50 * 40, 0.1).pvalue > 1e-3
    # per canary: Binomial(40, 0.1) counts (chi-square on the dispersion)
    var = canaries.inclusions.var(ddof=1)
    assert 0.4 * 40 * 0.1 * 0.9 < var < 2.0 * 40 * 0.1 * 0.9
    canaries.remove()
    opt.zero_grad()
    (0.0 * model(x).sum()).backward()
    opt.step()
    assert int(canaries.inclusions.sum()) == total


def _audited_run(noise_multiplier, seed, last_layer=False):
    """5 epochs of DP-SGD (q = 0.05, T = 100) on synthetic 10-class data with 200 + 200 canaries
    (in every parameter, d = 2762, or in the last layer, d' = 650)."""
    g = torch.Generator().manual_seed(seed)
    n, batch = 200, 10
    x = torch.randn(n, 32, generator=g)
    y = (x @ torch.randn(32, 10, generator=g)).argmax(dim=1)
    model = _model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _, opt, loader = dpkit.make_private(
        model, opt, DataLoader(TensorDataset(x, y), batch_size=batch),
        noise_multiplier=noise_multiplier, max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(seed + 1))
    # q given explicitly: with σ = 0 the step event carries no sampling rate
    canaries = CanaryAuditor(opt, num_canaries=200, sampling_rate=batch / n, seed=seed,
                             parameters=model[2].parameters() if last_layer else None)
    for _ in range(5):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    # the claim is what the accountant believed: σ = 1 (also for the broken, noise-free run)
    return audit(canaries.artifact(delta=1e-5, noise_multiplier=1.0)), canaries


def test_self_audit_dp_sgd_lower_bound_below_claim():
    report, auditor = _audited_run(noise_multiplier=1.0, seed=0)
    assert report.artifact.steps == 100
    # the auditor's own estimate is the report's (same scores, same null)
    assert auditor.estimate(delta=1e-5) == report.estimate
    assert report.estimate.epsilon_lower <= report.claimed_epsilon
    assert report.verdict == "consistent"
    assert report.estimate.epsilon > 0.5  # the canaries are visible: the audit has power


def test_self_audit_flags_a_run_without_noise():
    report, _ = _audited_run(noise_multiplier=0.0, seed=0)
    assert report.verdict == "violation"
    assert report.estimate.epsilon_lower > report.claimed_epsilon


@pytest.mark.parametrize("seed", [0, 1])
def test_self_audit_with_canaries_in_the_last_layer(seed):
    # the subset's null is N(0, 1/d'): a correct run stays below the claim, a noise-free one is flagged
    report, auditor = _audited_run(noise_multiplier=1.0, seed=seed, last_layer=True)
    assert auditor.dim == 650 == report.artifact.dim
    assert report.verdict == "consistent"
    assert report.estimate.epsilon > 0.5
    report, _ = _audited_run(noise_multiplier=0.0, seed=seed, last_layer=True)
    assert report.verdict == "violation"


def test_sampling_rate_is_read_from_the_step_event():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=1.0, max_grad_norm=1.0,
                                   sample_rate=0.07, expected_batch_size=4)
    assert CanaryAuditor(opt, num_canaries=5, seed=0).sampling_rate == 0.07
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=0.0, max_grad_norm=1.0,
                                   sample_rate=0.07, expected_batch_size=4)
    with pytest.raises(ValueError, match="sampling_rate must be given"):
        CanaryAuditor(opt, num_canaries=5, seed=0)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(optimizer="sgd"), TypeError, "optimizer"),
    (dict(num_canaries=1), ValueError, "num_canaries"),
    (dict(num_unseen=1), ValueError, "num_unseen"),
    (dict(num_canaries=2.5), TypeError, "num_canaries"),
    (dict(sampling_rate=0.0), ValueError, "sampling_rate"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(num_canaries=3000), ValueError, "num_canaries \\+ num_unseen"),
])
def test_invalid_inputs(kwargs, exc, name):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=1.0, max_grad_norm=1.0,
                                   sample_rate=0.1, expected_batch_size=4)
    args = dict(optimizer=opt, num_canaries=10, num_unseen=10, sampling_rate=0.1, seed=0)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        CanaryAuditor(args.pop("optimizer"), **args)


def _resumable_run():
    """A float64 model, a DP-SGD optimizer (σ = 1, momentum) on one fixed batch, no sampler."""
    model = _model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=1.0, max_grad_norm=1.0,
                                   sample_rate=0.2, expected_batch_size=4,
                                   generator=torch.Generator().manual_seed(3))
    return model, opt


def _steps(model, opt, auditor, count):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 32, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    per_step = []
    for _ in range(count):
        before = auditor.inclusions.copy()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        per_step.append(auditor.inclusions - before)
    return np.array(per_step)


@pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")
def test_auditor_resumed_from_disk_equals_the_uninterrupted_audit(tmp_path):
    model, opt = _resumable_run()
    whole = CanaryAuditor(opt, num_canaries=40, num_unseen=10, seed=5)
    ref = _steps(model, opt, whole, 10)

    model, opt = _resumable_run()
    first = CanaryAuditor(opt, num_canaries=40, num_unseen=10, seed=5)
    early = _steps(model, opt, first, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "audit": first.state_dict()},
               tmp_path / "ckpt.pt")
    del model, opt, first
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, opt = _resumable_run()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    resumed = CanaryAuditor(opt, num_canaries=40, num_unseen=10)   # default seed: OS entropy
    resumed.load_state_dict(state["audit"])
    late = _steps(model, opt, resumed, 5)

    np.testing.assert_array_equal(np.vstack([early, late]), ref)  # the same coins, step by step
    assert not np.array_equal(early, late)                        # steps 5..9 are not a replay
    np.testing.assert_array_equal(resumed.inclusions, whole.inclusions)
    for p, q in zip(resumed._optimizer.params, whole._optimizer.params):
        assert p.dtype == torch.float64 and torch.equal(p, q)
    for a, b in zip(resumed.scores(), whole.scores()):
        np.testing.assert_array_equal(a, b)


def test_auditor_default_seed_is_fresh_and_state_must_match():
    model, opt = _resumable_run()
    a = CanaryAuditor(opt, num_canaries=5, num_unseen=5)
    b = CanaryAuditor(opt, num_canaries=5, num_unseen=5)
    assert a.seed != b.seed
    a.remove()
    b.remove()
    with pytest.raises(ValueError, match="num_canaries=5"):
        CanaryAuditor(opt, num_canaries=6, num_unseen=5).load_state_dict(a.state_dict())
    with pytest.raises(TypeError, match="state must be a dict"):
        a.load_state_dict({"x": 1})
