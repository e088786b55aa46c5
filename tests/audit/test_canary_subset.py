"""CanaryAuditor(parameters=...): canaries confined to a parameter subset S of d' coordinates.

References are independent of the auditor: float64 regenerations of the directions in R^{d'}, the
exact null of a cosine with a uniform direction on the sphere of R^{d'} ((1 + cos)/2 ~
Beta((d'−1)/2, (d'−1)/2)), and the untouched parameters outside S."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

import dpkit
from dpkit.audit import canary_directions
from dpkit.audit.canaries import CanaryAuditor


def _run(sigma=0.0, lr=0.5, clip=1.5, q=0.3, batch=4.0, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype)  # S: 650 of 2762
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5 if sigma else 0.0)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=sigma, max_grad_norm=clip,
                                   sample_rate=q, expected_batch_size=batch,
                                   generator=torch.Generator().manual_seed(seed))
    return model, opt


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).double()


def _steps(model, opt, auditor, count, loss_scale=1.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, generator=g, dtype=model[0].weight.dtype)
    y = torch.tensor([0, 1, 2, 3])
    per_step = []
    for _ in range(count):
        before = auditor.inclusions.copy()
        opt.zero_grad()
        (loss_scale * nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
        per_step.append(auditor.inclusions - before)
    return np.array(per_step)


def test_subset_step_moves_only_the_subset_by_clip_times_the_sampled_directions():
    lr, clip, batch = 0.5, 1.5, 4.0
    model, opt = _run(lr=lr, clip=clip, batch=batch)
    last = model[2]
    # given out of order: the canary space is S in the optimizer's order (weight, then bias)
    auditor = CanaryAuditor(opt, num_canaries=30, num_unseen=6, sampling_rate=0.3, seed=4,
                            parameters=[last.bias, last.weight])
    assert auditor.dim == 650
    rest, subset = list(model[0].parameters()), [last.weight, last.bias]
    rest0, sub0 = _flat(rest), _flat(subset)
    _steps(model, opt, auditor, 1, loss_scale=0.0)
    sampled = auditor.inclusions.astype(bool)
    assert 0 < sampled.sum() < 30
    dirs = canary_directions(4, 30, 650)  # unit vectors of R^{d'}: norm C once scaled
    np.testing.assert_allclose((_flat(subset) - sub0).numpy(), -lr * clip * dirs[sampled].sum(0) / batch,
                               atol=1e-6)
    assert torch.equal(_flat(rest), rest0)  # zero outside S: no canary, no (σ = 0) noise, no data loss
    scores, unseen = auditor.scores()
    delta = (sub0 - _flat(subset)).numpy()
    np.testing.assert_allclose(scores, dirs @ delta / np.linalg.norm(delta), atol=1e-5)
    ref = canary_directions(4, np.arange(30, 36), 650) @ delta / np.linalg.norm(delta)
    np.testing.assert_allclose(unseen, ref, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_unseen_cosines_follow_the_null_of_the_subset_dimension(seed):
    # a noisy run (σ = 1, data loss, momentum): unseen directions are independent of θ_S, so their
    # cosines follow the exact 1/d' null; the full-model null (d = 2762) must be rejected
    model, opt = _run(sigma=1.0, lr=0.1, clip=1.0, q=0.2, seed=seed)
    auditor = CanaryAuditor(opt, num_canaries=20, num_unseen=600, seed=seed,
                            parameters=model[2].parameters())
    _steps(model, opt, auditor, 20)
    _, unseen = auditor.scores()

    def null_cdf(dim):
        return lambda x: stats.beta.cdf((1 + x) / 2, (dim - 1) / 2, (dim - 1) / 2)

    assert stats.kstest(unseen, null_cdf(650)).pvalue > 1e-3
    assert stats.kstest(unseen, null_cdf(2762)).pvalue < 1e-6
    # and the estimate uses d' (the artifact carries it)
    assert auditor.artifact(delta=1e-5).dim == 650


@pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")
def test_subset_auditor_resumed_from_disk_equals_the_uninterrupted_audit(tmp_path):
    def build():
        model, opt = _run(sigma=1.0, lr=0.1, clip=1.0, q=0.2, dtype=torch.float64)
        return model, opt, dict(num_canaries=40, num_unseen=10, parameters=[model[2].weight])

    model, opt, kw = build()
    whole = CanaryAuditor(opt, seed=5, **kw)
    ref = _steps(model, opt, whole, 10)

    model, opt, kw = build()
    first = CanaryAuditor(opt, seed=5, **kw)
    early = _steps(model, opt, first, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "audit": first.state_dict()},
               tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, opt, kw = build()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    everything = CanaryAuditor(opt, num_canaries=40, num_unseen=10)
    with pytest.raises(ValueError, match="dim=640"):  # the same run audited on all parameters
        everything.load_state_dict(state["audit"])
    everything.remove()
    resumed = CanaryAuditor(opt, **kw)
    resumed.load_state_dict(state["audit"])
    late = _steps(model, opt, resumed, 5)

    np.testing.assert_array_equal(np.vstack([early, late]), ref)
    assert not np.array_equal(early, late)
    for a, b in zip(resumed.scores(), whole.scores()):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_different_subset_of_the_same_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=1.0, max_grad_norm=1.0,
                                   sample_rate=0.1, expected_batch_size=4)
    a = CanaryAuditor(opt, num_canaries=5, num_unseen=5, seed=0, parameters=[model[0].weight])
    b = CanaryAuditor(opt, num_canaries=5, num_unseen=5, seed=0, parameters=[model[1].weight])
    with pytest.raises(ValueError, match="pass the same parameters="):
        b.load_state_dict(a.state_dict())


def test_subset_refusals_name_the_argument():
    model, opt = _run()
    other = nn.Linear(64, 10)
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    args = dict(num_canaries=5, num_unseen=5, sampling_rate=0.3, seed=0)
    with pytest.raises(ValueError, match=r"parameters\[1\] \(shape \(10, 64\)\) is not a trainable "
                                         r"parameter of the optimizer"):
        CanaryAuditor(opt, parameters=[model[2].bias, other.weight], **args)
    with pytest.raises(ValueError, match=r"parameters\[0\]"):
        CanaryAuditor(opt, parameters=[frozen], **args)
    with pytest.raises(ValueError, match="parameters must not be empty"):
        CanaryAuditor(opt, parameters=[], **args)
    with pytest.raises(ValueError, match="parameters must not repeat"):
        CanaryAuditor(opt, parameters=[model[2].bias, model[2].bias], **args)
    with pytest.raises(TypeError, match=r"parameters\[0\] is a str"):
        CanaryAuditor(opt, parameters=["weight"], **args)
    with pytest.raises(TypeError, match=r"not a Linear: pass module.parameters\(\)"):
        CanaryAuditor(opt, parameters=model[2], **args)
    with pytest.raises(ValueError, match=r"coordinates in parameters \(10\)"):
        CanaryAuditor(opt, parameters=[model[2].bias], **{**args, "num_canaries": 6})


class _EmbeddingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(100, 8), nn.Linear(8, 30)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_subset_of_the_dense_parameters_audits_a_run_with_lazy_embedding_noise():
    # lazily noised tables leave the dense step: canaries must then live in the dense parameters
    torch.manual_seed(0)
    model = _EmbeddingModel()
    lr, clip, batch = 0.5, 1.5, 4.0
    _, opt, _ = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=lr), None,
                                   noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.3,
                                   expected_batch_size=batch, embedding_noise="lazy")
    ids = torch.randint(0, 100, (4, 5))

    def zero_loss_step():
        opt.zero_grad()
        (0.0 * model(ids).sum()).backward()
        opt.step()

    everything = CanaryAuditor(opt, num_canaries=20, num_unseen=4, sampling_rate=0.3, seed=2)
    with pytest.raises(RuntimeError, match="parameters= a subset of the dense parameters"):
        zero_loss_step()
    everything.remove()
    opt.zero_grad()
    auditor = CanaryAuditor(opt, num_canaries=20, num_unseen=4, sampling_rate=0.3, seed=2,
                            parameters=model.head.parameters())
    head0, emb0 = _flat(model.head.parameters()), model.emb.weight.detach().clone()
    zero_loss_step()
    sampled = auditor.inclusions.astype(bool)
    assert 0 < sampled.sum() < 20
    dirs = canary_directions(2, 20, 270)
    np.testing.assert_allclose((_flat(model.head.parameters()) - head0).numpy(),
                               -lr * clip * dirs[sampled].sum(0) / batch, atol=1e-6)
    assert torch.equal(model.emb.weight, emb0)
