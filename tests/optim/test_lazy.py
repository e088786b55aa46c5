"""LazyDP lazy embedding noise against independent references.

References: eager DP-SGD run side by side with the same deterministic probe noise (dense
parameters and embedding rows noised every step by ``DPOptimizer``'s eager path); brute-force
loops over the skipped steps for the closed forms; the published Philox4x32-10 known-answer
vectors (Random123); chi-square / KS tests of the pending-noise variance that reject a wrong
variance; dp_accounting called directly for ε.
"""

import copy
import math

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

import dpkit
from dpkit.errors import NoisePendingError
from dpkit.mechanisms.lazy import (
    CounterGaussianRowNoise,
    GaussianRowNoise,
    MomentumSegment,
    ProbeRowNoise,
    StepHistory,
    philox4x32,
    philox_normal,
)


class _Recsys(nn.Module):
    """Two tables (Embedding with padding, EmbeddingBag mean) feeding an MLP head."""

    def __init__(self, rows=(40, 30), dim=3):
        super().__init__()
        self.user = nn.Embedding(rows[0], dim, padding_idx=0)
        self.items = nn.EmbeddingBag(rows[1], dim, mode="mean")
        self.head = nn.Sequential(nn.Linear(2 * dim, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, users, items):
        return self.head(torch.cat([self.user(users).sum(1), self.items(items)], 1)).squeeze(1)


def _batches(steps, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    # the user vocabulary grows with t: most rows stay untouched for several steps
    return [(torch.randint(0, min(40, 6 + 4 * t), (batch, 3), generator=g), torch.randint(0, 30, (batch, 5), generator=g),
             torch.randn(batch, generator=g, dtype=torch.float64)) for t in range(steps)]


def _setup(mode, *, wd=0.0, lr=0.1, schedule=False, noise=None, sigma=0.7, seed=0, optimizer=None,
           clipping="bk", momentum=0.0):
    torch.manual_seed(seed)
    model = _Recsys().double()
    base = optimizer(model) if optimizer else torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd,
                                                              momentum=momentum)
    probe = ProbeRowNoise() if noise is None else None
    emb = mode if noise is not None or mode == "eager" else probe
    _, opt, _ = dpkit.make_private(model, base, None, max_grad_norm=0.5, noise_multiplier=sigma,
                                   sample_rate=0.1, expected_batch_size=4, noise=probe,
                                   embedding_noise=emb, clipping=clipping,
                                   generator=None if noise is None else torch.Generator().manual_seed(noise))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if schedule else None
    return model, opt, sched


def _train(model, opt, sched, batches):
    for users, items, target in batches:
        opt.zero_grad()
        ((model(users, items) - target) ** 2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("wd, schedule", [(0.0, False), (0.0, True), (0.3, False), (0.3, True)],
                         ids=["constant-lr", "lr-schedule", "weight-decay", "schedule+decay"])
def test_lazy_equals_eager_with_probe_noise(wd, schedule):
    batches = _batches(8)
    eager, opt_e, sch_e = _setup("eager", wd=wd, schedule=schedule)
    lazy, opt_l, sch_l = _setup("lazy", wd=wd, schedule=schedule)
    _train(eager, opt_e, sch_e, batches)
    _train(lazy, opt_l, sch_l, batches)
    # not vacuous: rows were left behind, and the untouched ones still hold their initial values
    assert opt_l._lazy.pending()
    torch.manual_seed(0)
    init = _Recsys().double().user.weight
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[torch.cat([b[0].flatten() for b in batches])] = False
    assert untouched.any() and torch.equal(lazy.user.weight.detach()[untouched], init.detach()[untouched])
    e, l_ = eager.state_dict(), lazy.state_dict()  # state_dict flushes
    assert not opt_l._lazy.pending()
    for name in e:
        torch.testing.assert_close(l_[name], e[name], rtol=1e-12, atol=1e-12, msg=name)
    assert not torch.equal(e["user.weight"][untouched], init.detach()[untouched])  # noise did arrive


@pytest.mark.parametrize("wd, schedule", [(0.0, False), (0.2, False), (0.2, True)],
                         ids=["momentum", "momentum+decay", "momentum+decay+schedule"])
def test_momentum_lazy_equals_eager_jointly(wd, schedule):
    batches = _batches(8)
    eager, opt_e, sch_e = _setup("eager", wd=wd, schedule=schedule, momentum=0.9)
    lazy, opt_l, sch_l = _setup("lazy", wd=wd, schedule=schedule, momentum=0.9)
    _train(eager, opt_e, sch_e, batches)
    _train(lazy, opt_l, sch_l, batches)
    assert opt_l._lazy.pending()
    e, l_ = eager.state_dict(), lazy.state_dict()
    for name in e:
        torch.testing.assert_close(l_[name], e[name], rtol=1e-12, atol=1e-12, msg=name)
    # the lazy momentum buffers equal torch's eager buffers too
    for module in (lazy.user, lazy.items):
        eager_module = eager.get_submodule("user" if module is lazy.user else "items")
        buf = opt_e.state[eager_module.weight]["momentum_buffer"]
        torch.testing.assert_close(opt_l._lazy.tables[id(module.weight)].momentum, buf, rtol=1e-12, atol=1e-12)


def test_weight_decay_switched_on_and_off_mid_run_equals_eager():
    """Steps without decay take the no-merge update (rows' markers only); decay switched on later
    must still decay and noise every row exactly as eager DP-SGD, and switched off again too."""
    batches = _batches(9)
    runs = []
    for mode in ("eager", "lazy"):
        model, opt, _ = _setup(mode)
        for t, batch in enumerate(batches):
            for group in opt.param_groups:
                group["weight_decay"] = 0.3 if 3 <= t < 6 else 0.0
            _train(model, opt, None, [batch])
        runs.append((model, opt))
    (eager, _), (lazy, opt_l) = runs
    assert opt_l._lazy.pending()
    e, l_ = eager.state_dict(), lazy.state_dict()
    for name in e:
        torch.testing.assert_close(l_[name], e[name], rtol=1e-12, atol=1e-12, msg=name)


def test_per_sample_engine_lazy_equals_eager():
    batches = _batches(5)
    eager, opt_e, _ = _setup("eager", wd=0.2, clipping="per_sample")
    lazy, opt_l, _ = _setup("lazy", wd=0.2, clipping="per_sample")
    _train(eager, opt_e, None, batches)
    _train(lazy, opt_l, None, batches)
    e, l_ = eager.state_dict(), lazy.state_dict()
    for name in e:
        torch.testing.assert_close(l_[name], e[name], rtol=1e-12, atol=1e-12, msg=name)


def test_gradient_accumulation_virtual_batches_equal_eager():
    batches = _batches(4, batch=6)
    runs = []
    for mode in ("eager", "lazy"):
        model, opt, _ = _setup(mode)
        for users, items, target in batches:
            opt.zero_grad()
            for half in (slice(0, 3), slice(3, 6)):  # two physical batches, one logical step
                ((model(users[half], items[half]) - target[half]) ** 2).sum().div(6).backward()
                if half.start == 0:
                    opt.signal_skip_step(True)
                opt.step()
        runs.append(model.state_dict())
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-12, atol=1e-12)


def test_no_noise_huge_clip_equals_non_private_sgd():
    batches = _batches(5)
    torch.manual_seed(0)
    plain = _Recsys().double()
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1, weight_decay=0.2)
    torch.manual_seed(0)
    private = _Recsys().double()
    _, opt, _ = dpkit.make_private(private, torch.optim.SGD(private.parameters(), lr=0.1, weight_decay=0.2),
                                   None, max_grad_norm=1e9, noise_multiplier=0.0, sample_rate=0.1,
                                   expected_batch_size=4, embedding_noise="lazy")
    for users, items, target in batches:
        for m, o in ((plain, sgd), (private, opt)):
            o.zero_grad()
            ((m(users, items) - target) ** 2).sum().div(4).backward()
            o.step()
    ref, got = plain.state_dict(), private.state_dict()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------- closed forms
def test_history_closed_forms_match_brute_force_loop():
    rng = np.random.default_rng(0)
    lrs, wds = rng.uniform(0.01, 0.5, 30), rng.choice([0.0, 0.1, 0.9], 30)
    history = StepHistory()
    for lr, wd in zip(lrs, wds):
        history.append(lr, wd)
    for a, b in [(0, 30), (3, 17), (29, 30), (12, 12)]:
        # simulate one coordinate of eager DP-SGD with the noise of each step kept symbolic
        decay, coef = 1.0, np.zeros(30)
        for u in range(a, b):
            factor = 1.0 - lrs[u] * wds[u]
            decay *= factor
            coef *= factor
            coef[u] = lrs[u]
        assert history.decay(np.array([a]), b)[0] == pytest.approx(decay, rel=1e-13)
        assert history.variance(np.array([a]), b)[0] == pytest.approx(np.sum(coef ** 2), rel=1e-13, abs=0)
        if b > a:
            np.testing.assert_allclose(history.coefficients(np.arange(a, b), b), coef[a:b], rtol=1e-13)


def test_history_rebases_before_overflow_and_stays_exact():
    batches = _batches(12)
    eager, opt_e, _ = _setup("eager", wd=0.9, lr=0.9)
    lazy, opt_l, _ = _setup("lazy", wd=0.9, lr=0.9)
    for table in opt_l._lazy.tables.values():
        table.history.rebase_threshold = 3.0  # −log(1 − 0.81) = 1.66 nats per step: rebases often
    _train(eager, opt_e, None, batches)
    _train(lazy, opt_l, None, batches)
    assert all(t.history.base > 0 for t in opt_l._lazy.tables.values())
    e, l_ = eager.state_dict(), lazy.state_dict()
    for name in e:
        torch.testing.assert_close(l_[name], e[name], rtol=1e-12, atol=1e-12)


def test_philox_known_answer_vectors():
    # Random123 kat_vectors, philox4x32_10
    cases = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
             ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
             ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
              (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for counter, key, expected in cases:
        assert tuple(int(x) for x in philox4x32(counter, key)) == expected


def test_counter_normals_are_standard_and_independent_across_counters():
    rows = np.arange(4000)
    z = philox_normal((12345, 678), rows, np.full(4000, 3), 9, 16)
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
    # neighbouring rows, neighbouring ranges and neighbouring columns are uncorrelated
    other = philox_normal((12345, 678), rows, np.full(4000, 4), 9, 16)
    for a, b in [(z[:-1], z[1:]), (z, other), (z[:, :-1], z[:, 1:])]:
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 4 / math.sqrt(a.size)
    # a pure function of the counter: same (row, range) -> same vector, order-independent
    np.testing.assert_array_equal(philox_normal((12345, 678), rows[::-1], np.full(4000, 3), 9, 16), z[::-1])


# ------------------------------------------------------------ real noise: variance
def _untouched_rows_after(k, lr_fn, wd, mid_read, source="lazy", dtype=torch.float64):
    """Train k steps that only ever touch row 0 of a zero-initialised table; return rows 1: after
    flush, and the brute-force variance Σ_u η_u² Π_{v>u}(1 − η_v λ)² times (σC/B̄)²."""
    torch.manual_seed(0)
    emb = nn.Embedding(3001, 8).to(dtype)
    nn.init.zeros_(emb.weight)
    base = torch.optim.SGD(emb.parameters(), lr=lr_fn(0), weight_decay=wd)
    sigma, clip, batch = 1.3, 0.5, 4.0
    _, opt, _ = dpkit.make_private(emb, base, None, max_grad_norm=clip, noise_multiplier=sigma,
                                   sample_rate=0.01, expected_batch_size=batch,
                                   embedding_noise=CounterGaussianRowNoise(7) if source == "keyed" else source,
                                   generator=torch.Generator().manual_seed(7))
    ids = torch.zeros(4, 1, dtype=torch.long)
    for t in range(k):
        for group in opt.param_groups:
            group["lr"] = lr_fn(t)
        opt.zero_grad()
        emb(ids).sum().backward()
        opt.step()
        if t == k // 2 and mid_read:  # read half the rows mid-run: two aggregated draws for them
            with torch.no_grad():
                emb(torch.arange(1, 1501).view(-1, 1))
    opt.flush()
    lrs = [lr_fn(t) for t in range(k)]
    var = sum(lrs[u] ** 2 * np.prod([(1 - lrs[v] * wd) ** 2 for v in range(u + 1, k)]) for u in range(k))
    return emb.weight.detach()[1:].double().numpy().ravel(), var * (sigma * clip / batch) ** 2


def _chi2_pvalue(x, var):
    stat = np.sum(x ** 2) / var
    cdf = stats.chi2.cdf(stat, df=x.size)
    return 2 * min(cdf, 1 - cdf)


@pytest.mark.parametrize("source, dtype", [("lazy", torch.float64), ("lazy", torch.float32),
                                           ("keyed", torch.float64)],
                         ids=["stream", "stream-float32", "philox-keyed"])
@pytest.mark.parametrize("wd, schedule", [(0.0, False), (0.2, True)], ids=["constant", "decay+schedule"])
def test_untouched_row_variance_matches_eager_and_test_rejects_wrong_variance(wd, schedule, source, dtype):
    k = 9
    lr_fn = (lambda t: 0.3 * 0.8 ** t) if schedule else (lambda t: 0.3)
    x, var = _untouched_rows_after(k, lr_fn, wd, mid_read=True, source=source, dtype=dtype)
    assert _chi2_pvalue(x, var) > 1e-3
    assert stats.kstest(x / math.sqrt(var), "norm").pvalue > 1e-3
    # the same test rejects a 10% larger variance and the paper's plain k·η² (no decay/schedule)
    assert _chi2_pvalue(x, 1.1 * var) < 1e-6
    naive = k * lr_fn(0) ** 2 * (1.3 * 0.5 / 4.0) ** 2
    if not math.isclose(naive, var):
        assert _chi2_pvalue(x, naive) < 1e-6


def test_momentum_untouched_row_joint_variance_and_rejects_momentum_free_variance():
    k, lr, wd, mu = 7, 0.2, 0.1, 0.8
    sigma, clip, batch = 1.3, 0.5, 4.0
    torch.manual_seed(0)
    emb = nn.Embedding(3001, 8).double()
    nn.init.zeros_(emb.weight)
    _, opt, _ = dpkit.make_private(emb, torch.optim.SGD(emb.parameters(), lr=lr, weight_decay=wd, momentum=mu),
                                   None, max_grad_norm=clip, noise_multiplier=sigma, sample_rate=0.01,
                                   expected_batch_size=batch, embedding_noise="lazy",
                                   generator=torch.Generator().manual_seed(8))
    ids = torch.zeros(4, 1, dtype=torch.long)
    for t in range(k):
        opt.zero_grad()
        emb(ids).sum().backward()
        opt.step()
        if t == 3:
            with torch.no_grad():
                emb(torch.arange(1, 1501).view(-1, 1))
    opt.flush()
    # brute force: eager recursion of (w, m) with the noise of each step kept symbolic
    coef_w, coef_m = np.zeros(k), np.zeros(k)
    for u in range(k):
        m_new = mu * coef_m + wd * coef_w
        m_new[u] += 1.0
        coef_w, coef_m = coef_w - lr * m_new, m_new
    s2 = (sigma * clip / batch) ** 2
    w = emb.weight.detach()[1:].numpy().ravel()
    m = opt._lazy.tables[id(emb.weight)].momentum[1:].numpy().ravel()
    assert _chi2_pvalue(w, s2 * np.sum(coef_w ** 2)) > 1e-3
    assert _chi2_pvalue(m, s2 * np.sum(coef_m ** 2)) > 1e-3
    corr = np.sum(coef_w * coef_m) / math.sqrt(np.sum(coef_w ** 2) * np.sum(coef_m ** 2))
    assert abs(np.corrcoef(w, m)[0, 1] - corr) < 4 * (1 - corr ** 2) / math.sqrt(w.size)
    # the variance momentum-free SGD would give (η² Σ (1-ηλ)^2j) is rejected
    naive = s2 * lr ** 2 * sum((1 - lr * wd) ** (2 * j) for j in range(k))
    assert _chi2_pvalue(w, naive) < 1e-6


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_stream_source_resumes_without_replaying_and_streams_are_independent(device):
    history = StepHistory()
    for _ in range(3):
        history.append(0.5, 0.0)
    rows, starts = torch.arange(2000, device=device), torch.zeros(2000, dtype=torch.long, device=device)
    src = GaussianRowNoise(5)
    first = src.combined("t", rows, starts, 3, history, (2000, 16))
    assert first.device == rows.device and first.dtype == torch.float64
    state = copy.deepcopy(src.state_dict())
    second = src.combined("t", rows, starts, 3, history, (2000, 16))
    resumed = GaussianRowNoise(6)  # another seed: the checkpoint's seed and stream position win
    resumed.load_state_dict(state)
    again = resumed.combined("t", rows, starts, 3, history, (2000, 16))
    first, again = first.cpu(), again.cpu()
    assert torch.equal(again, second.cpu())  # continues the stream ...
    r = np.corrcoef(first.ravel().numpy(), again.ravel().numpy())[0, 1]
    assert abs(r) < 4 / math.sqrt(first.numel())  # ... and never replays the draws before it
    # one aggregated draw per row: std sqrt(V) = sqrt(3 · 0.5²), standard normal after scaling
    assert stats.kstest((first / math.sqrt(history.variance(np.array([0]), 3)[0])).ravel(), "norm").pvalue > 1e-3
    # momentum pairs: joint covariance Q(k) of the segment, per coordinate
    seg = MomentumSegment(0, 0.2, 0.1, 0.8)
    for _ in range(4):
        seg.append()
    pair = src.combined_pair("t", rows, starts, 4, seg, (2000, 16)).permute(1, 0, 2).reshape(2, -1).cpu().numpy()
    q = seg.covariance(np.array([0]), 4)[0]
    for i in range(2):
        assert _chi2_pvalue(pair[i], q[i, i]) > 1e-3
        assert _chi2_pvalue(pair[i], 1.1 * q[i, i]) < 1e-6
    corr = q[0, 1] / math.sqrt(q[0, 0] * q[1, 1])
    assert abs(np.corrcoef(pair)[0, 1] - corr) < 4 * (1 - corr ** 2) / math.sqrt(pair.shape[1])


def test_seeded_lazy_runs_reproducible_and_seed_matters():
    batches = _batches(5)
    runs = []
    for seed in (3, 3, 4):
        model, opt, _ = _setup("lazy", noise=seed)
        _train(model, opt, None, batches)
        runs.append(model.state_dict()["user.weight"])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# ------------------------------------------------------------ release guards
def test_flush_before_release_everywhere():
    batches = _batches(4)
    model, opt, _ = _setup("lazy", noise=5)
    _train(model, opt, None, batches)
    assert opt._lazy.pending()
    with pytest.raises(NoisePendingError, match="user.weight|items.weight"):
        copy.deepcopy(model)
    # (pickling a whole hooked model already fails on the engine's local hooks; state_dict is the
    # export path and it flushes)
    model.user.state_dict()  # a submodule's state_dict flushes too
    assert not bool((opt._lazy.tables[id(model.user.weight)].noised < 4).any())
    model.eval()
    model(batches[0][0], batches[0][1])  # evaluation: everything is flushed before the read
    assert not opt._lazy.pending()
    copy.deepcopy(model)
    # optimizer.state_dict() flushes as well
    model.train()
    _train(model, opt, None, batches[:1])
    assert opt._lazy.pending()
    opt.state_dict()
    assert not opt._lazy.pending()


def test_flush_points_do_not_change_the_distribution_of_the_probe_run():
    batches = _batches(6)
    eager, opt_e, _ = _setup("eager", wd=0.1)
    lazy, opt_l, _ = _setup("lazy", wd=0.1)
    _train(eager, opt_e, None, batches)
    for i, batch in enumerate(batches):
        _train(lazy, opt_l, None, [batch])
        if i in (1, 2):
            opt_l.flush()
    e, l_ = eager.state_dict(), lazy.state_dict()
    for name in e:
        torch.testing.assert_close(l_[name], e[name], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------- checkpoint / resume
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_checkpoint_resume_mid_training_equals_eager_with_momentum(tmp_path, momentum):
    batches = _batches(8)
    eager, opt_e, _ = _setup("eager", wd=0.1, momentum=momentum)
    _train(eager, opt_e, None, batches)
    lazy, opt_l, _ = _setup("lazy", wd=0.1, momentum=momentum)
    _train(lazy, opt_l, None, batches[:4])
    torch.save({"model": lazy.state_dict(), "opt": opt_l.state_dict()}, tmp_path / "ckpt.pt")
    resumed, opt_r, _ = _setup("lazy", wd=0.1, momentum=momentum, seed=99)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed.load_state_dict(ckpt["model"])
    opt_r.load_state_dict(ckpt["opt"])
    _train(resumed, opt_r, None, batches[4:])
    e, r = eager.state_dict(), resumed.state_dict()
    for name in e:
        torch.testing.assert_close(r[name], e[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("source", [lambda seed: "lazy", CounterGaussianRowNoise], ids=["stream", "philox-keyed"])
def test_checkpoint_resume_with_gaussian_noise_continues_identically(tmp_path, source):
    batches = _batches(6)
    full, opt_f, _ = _setup(source(11), noise=11)
    _train(full, opt_f, None, batches[:3])
    state = {"model": copy.deepcopy(full.state_dict()), "opt": copy.deepcopy(opt_f.state_dict())}
    _train(full, opt_f, None, batches[3:])
    resumed, opt_r, _ = _setup(source(12), noise=12)  # another seed: the checkpoint's key must be used
    resumed.load_state_dict(state["model"])
    opt_r.load_state_dict(state["opt"])
    _train(resumed, opt_r, None, batches[3:])
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


# --------------------------------------------------------------------- accounting
def test_epsilon_identical_to_eager_and_to_dp_accounting():
    batches = _batches(6)
    eps = []
    for mode in ("eager", "lazy"):
        model, opt, _ = _setup(mode, noise=1)
        _train(model, opt, None, batches)
        eps.append(opt.epsilon(1e-5))
        ledger = opt.accountant.ledger
    assert eps[0] == eps[1]
    ref = dp_accounting.pld.PLDAccountant()
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(0.7)), 6)
    assert len(ledger) >= 1
    assert eps[1] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-3)


# ----------------------------------------------------------------------- refusals
def _model_and(opt_fn):
    torch.manual_seed(0)
    model = _Recsys().double()
    return model, opt_fn(model)


@pytest.mark.parametrize("opt_fn, kwargs, error, match", [
    (lambda m: torch.optim.Adam(m.parameters()), {}, ValueError, "Adam.*eager"),
    (lambda m: torch.optim.Adagrad(m.parameters()), {}, ValueError, "Adagrad.*eager"),
    (lambda m: torch.optim.AdamW(m.parameters()), {}, ValueError, "AdamW"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.1), {}, ValueError, "dampening"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True), {}, ValueError, "nesterov"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, maximize=True), {}, ValueError, "maximize"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=2.0, weight_decay=0.5), {}, ValueError, "lr \\* weight_decay"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), {"secure_mode": True}, ValueError, "secure_mode"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), {"embedding_noise": "sparse"}, ValueError, "embedding_noise"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), {"embedding_noise": 3}, TypeError, "embedding_noise"),
])
def test_refusals_name_the_problem(opt_fn, kwargs, error, match):
    model, base = _model_and(opt_fn)
    kwargs.setdefault("embedding_noise", "lazy")
    with pytest.raises(error, match=match):
        dpkit.make_private(model, base, None, max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.1,
                           expected_batch_size=4, **kwargs)


def test_momentum_on_dense_groups_only_is_allowed_and_tied_or_missing_tables_refused():
    torch.manual_seed(0)
    model = _Recsys().double()
    emb = [model.user.weight, model.items.weight]
    base = torch.optim.SGD([{"params": emb}, {"params": model.head.parameters(), "momentum": 0.9}], lr=0.1)
    dpkit.make_private(model, base, None, max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.1,
                       expected_batch_size=4, embedding_noise="lazy")
    tied = nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 10, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared with"):
        dpkit.make_private(tied, torch.optim.SGD(tied.parameters(), lr=0.1), None, max_grad_norm=1.0,
                           noise_multiplier=1.0, sample_rate=0.1, expected_batch_size=4, embedding_noise="lazy")
    mlp = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="at least one trainable nn.Embedding"):
        dpkit.make_private(mlp, torch.optim.SGD(mlp.parameters(), lr=0.1), None, max_grad_norm=1.0,
                           noise_multiplier=1.0, sample_rate=0.1, expected_batch_size=4, embedding_noise="lazy")


def test_schedule_turning_on_momentum_is_refused_before_any_update():
    model, opt, _ = _setup("lazy")
    users, items, target = _batches(1)[0]
    ((model(users, items) - target) ** 2).mean().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.param_groups[0]["momentum"] = 0.5
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    assert opt.steps == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _BagWithOffsets(nn.Module):
    """EmbeddingBag fed 1-D ids + offsets + per-sample weights (the flat input format)."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(25, 3, mode="sum")
        self.out = nn.Linear(3, 1)

    def forward(self, ids, offsets, weights):
        return self.out(self.bag(ids, offsets, per_sample_weights=weights)).squeeze(1)


def test_embedding_bag_offsets_and_weights_equal_eager():
    g = torch.Generator().manual_seed(5)
    data = []
    for t in range(6):
        lengths = torch.randint(1, 4, (4,), generator=g)
        ids = torch.randint(0, min(25, 5 + 4 * t), (int(lengths.sum()),), generator=g)
        offsets = torch.cumsum(lengths, 0) - lengths
        data.append((ids, offsets, torch.rand(ids.numel(), generator=g, dtype=torch.float64),
                     torch.randn(4, generator=g, dtype=torch.float64)))
    states = []
    for mode in ("eager", "lazy"):
        torch.manual_seed(0)
        model = _BagWithOffsets().double()
        probe = ProbeRowNoise()
        _, opt, _ = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=0.1),
                                       None, max_grad_norm=0.5, noise_multiplier=0.7, sample_rate=0.1,
                                       expected_batch_size=4, noise=probe,
                                       embedding_noise=probe if mode == "lazy" else "eager")
        for ids, offsets, weights, target in data:
            opt.zero_grad()
            ((model(ids, offsets, weights) - target) ** 2).mean().backward()
            opt.step()
        states.append(model.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-12, atol=1e-12)


class _LargestNewTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op creates (outputs that alias an input excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_sparse}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if t.is_sparse:  # a sparse gradient holds only its values
                self.largest = max(self.largest, t._values().numel())
            elif t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_lazy_step_never_creates_a_dense_table_sized_tensor(mode):
    rows, dim = 50_000, 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(rows, dim, mode="sum"), nn.Linear(dim, 1))
    _, opt, _ = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), None,
                                   max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.01,
                                   expected_batch_size=4, embedding_noise=mode)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, rows, (4, 3), generator=g) for _ in range(4)]
    opt.zero_grad()
    model(batches[0]).sum().backward()
    opt.step()
    with _LargestNewTensor() as probe:
        for ids in batches[1:]:
            opt.zero_grad()
            model(ids).sum().backward()
            opt.step()
    if mode == "lazy":
        assert probe.largest < 1000  # a few looked-up rows, never O(rows × dim)
    else:  # the control: eager DP-SGD draws dense noise for the whole table
        assert probe.largest >= rows * dim
