"""What one step did to the examples: several forward passes, eval mode, batch axes, functional
weight uses, low precision, copies, per-layer thresholds. Every exactness check compares with the
float64 batch-of-1 reference (tests/grad_sample/reference.py); every refusal checks its message."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpkit.errors import AmbiguousStepError
from dpkit.grad_sample import GradientEngine
from tests.grad_sample.reference import clipped_sum, per_example_grads


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


def _mlp(d=4, k=3):
    return nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, k))


def _multi_view_loss(model, x, x_aug, y, views):
    """ce(m(x), y) + Σ_v ‖m(x) − m(x_aug_v)‖²: `views` forward passes of the same examples."""
    out = model(x)
    loss = F.cross_entropy(out, y, reduction="sum")
    for v in range(views - 1):
        loss = loss + ((out - model(x_aug + v)) ** 2).sum()
    return loss


def _assert_matches(engine, model, expected):
    for p in model.parameters():
        torch.testing.assert_close(engine.clipped_sum(p), expected[id(p)], rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------- several forward passes
@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_declared_views_of_one_example_move_the_update_by_at_most_c(views, mode):
    torch.manual_seed(0)
    model = _mlp()
    x, x_aug, y = torch.randn(1, 4), torch.randn(1, 4), torch.tensor([1])
    engine = GradientEngine(model, max_grad_norm=0.01, mode=mode, loss_reduction="sum")
    with engine.same_examples():
        loss = _multi_view_loss(model, x, x_aug, y, views)
    loss.backward()
    assert engine.accumulate() == 1
    norm = torch.sqrt(sum(engine.clipped_sum(p).pow(2).sum() for p in model.parameters()))
    assert norm <= 0.01 * (1 + 1e-9)


@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_same_examples_is_exact_for_the_summed_loss(views, mode):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 40), nn.Tanh(), nn.LayerNorm(40), nn.Linear(40, 3))  # ghost path
    x, x_aug, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 3, (6,))
    ref = per_example_grads(model, (x, x_aug, y), lambda m, i: _multi_view_loss(m, *i, views))
    expected = clipped_sum(ref, 0.3)
    engine = GradientEngine(model, max_grad_norm=0.3, mode=mode, loss_reduction="sum")
    with engine.same_examples():
        loss = _multi_view_loss(model, x, x_aug, y, views)
    loss.backward()
    assert engine.accumulate() == 6
    _assert_matches(engine, model, expected)


def test_undeclared_passes_sharing_a_backward_are_refused():
    model = _mlp()
    engine = GradientEngine(model, max_grad_norm=1.0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    _multi_view_loss(model, x, x, y, 2).backward()
    with pytest.raises(AmbiguousStepError, match=r"same_examples\(\).*different_examples\(\)"):
        engine.accumulate()


def test_different_examples_clips_each_pass_separately():
    torch.manual_seed(2)
    model = _mlp()
    xa, xb = torch.randn(3, 4), torch.randn(4, 4)
    ya, yb = torch.randint(0, 3, (3,)), torch.randint(0, 3, (4,))
    ce = lambda m, i: F.cross_entropy(m(i[0]), i[1], reduction="sum")  # noqa: E731
    ref = per_example_grads(model, (torch.cat([xa, xb]), torch.cat([ya, yb])), ce)
    expected = clipped_sum(ref, 0.2)
    engine = GradientEngine(model, max_grad_norm=0.2, loss_reduction="sum")
    with engine.different_examples():
        loss = ce(model, (xa, ya)) + ce(model, (xb, yb))
    loss.backward()
    assert engine.accumulate() == 7
    _assert_matches(engine, model, expected)


def test_accumulation_and_unused_passes_need_no_declaration():
    """forward/backward twice, plus a train-mode forward whose output never reaches a backward."""
    torch.manual_seed(3)
    model = _mlp()
    xa, xb = torch.randn(3, 4), torch.randn(2, 4)
    ya, yb = torch.randint(0, 3, (3,)), torch.randint(0, 3, (2,))
    ce = lambda m, i: F.cross_entropy(m(i[0]), i[1], reduction="sum")  # noqa: E731
    expected = clipped_sum(per_example_grads(model, (torch.cat([xa, xb]), torch.cat([ya, yb])), ce), 0.2)
    engine = GradientEngine(model, max_grad_norm=0.2, loss_reduction="sum")
    logged = model(torch.randn(8, 4)).mean().item()  # metrics: never backpropagated
    ce(model, (xa, ya)).backward()
    _ = model(torch.randn(9, 4)).argmax(1)
    ce(model, (xb, yb)).backward()
    engine.accumulate()
    assert logged == logged and engine.examples_seen == 5
    _assert_matches(engine, model, expected)


# ------------------------------------------------------------------------- eval mode
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_eval_mode_training_is_clipped_exactly(mode):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 2))
    model.eval()
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    mse = lambda m, i: ((m(i[0]) - i[1]) ** 2).sum()  # noqa: E731
    expected = clipped_sum(per_example_grads(model, (x, y), mse), 0.1)
    engine = GradientEngine(model, max_grad_norm=0.1, mode=mode, loss_reduction="sum")
    mse(model, (x, y)).backward()
    assert engine.accumulate() == 6
    _assert_matches(engine, model, expected)


def test_no_grad_evaluation_captures_nothing():
    model = _mlp()
    engine = GradientEngine(model, max_grad_norm=1.0)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            model(torch.randn(5, 4))
    assert not engine._records
    assert engine.accumulate() == 0 and not engine.summed_grads


# ------------------------------------------------------------------------ batch axis
class _TimeMajorMLP(nn.Module):
    """Position-wise MLP applied to time-major (T, B, d) sequences; loss summed per example."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 2))

    def forward(self, x):  # x: (B, T, d) from the loader; the model works time-major
        return self.net(x.transpose(0, 1)).transpose(0, 1)


def _seq_loss(m, i):
    return ((m(i[0]) - i[1]) ** 2).sum()


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_time_major_mlp_is_clipped_per_example_when_the_batch_is_declared(mode):
    torch.manual_seed(5)
    model = _TimeMajorMLP()
    x, y = torch.randn(5, 12, 4), torch.randn(5, 12, 2)  # T = 12 ≠ B = 5
    x2, y2 = torch.randn(5, 5, 4), torch.randn(5, 5, 2)  # then T == B
    expected = clipped_sum(per_example_grads(model, (x, y), _seq_loss), 0.05)
    expected2 = clipped_sum(per_example_grads(model, (x2, y2), _seq_loss), 0.05)
    engine = GradientEngine(model, max_grad_norm=0.05, mode=mode, loss_reduction="sum")
    engine.expect_batch(5)
    _seq_loss(model, (x, y)).backward()
    assert engine.accumulate() == 5
    _assert_matches(engine, model, expected)
    engine.reset()  # T == B: the axis proven by the first batch is kept
    _seq_loss(model, (x2, y2)).backward()
    assert engine.accumulate() == 5
    _assert_matches(engine, model, expected2)


def test_time_major_mlp_with_t_equal_b_and_no_proof_is_refused():
    model = _TimeMajorMLP()
    engine = GradientEngine(model, max_grad_norm=1.0)
    engine.expect_batch(5)
    _seq_loss(model, (torch.randn(5, 5, 4), torch.randn(5, 5, 2))).backward()
    with pytest.raises(AmbiguousStepError, match=r"module 'net.0'.*set_batch_axis\(axis, 'net.0'\)"):
        engine.accumulate()
    with pytest.raises(ValueError, match="module_name"):
        engine.set_batch_axis(1, "nope")


@pytest.mark.parametrize("T", [5, 7])
@pytest.mark.parametrize("declared", [True, False])
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_transformer_encoder_layer_time_major_is_exact(T, declared, mode):
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)  # batch_first=False
    model = _TimeMajor(layer)
    x, y = torch.randn(5, T, 8), torch.randn(5, T, 8)
    expected = clipped_sum(per_example_grads(model, (x, y), _seq_loss), 0.05)
    engine = GradientEngine(model, max_grad_norm=0.05, mode=mode, loss_reduction="sum")
    if declared:
        engine.expect_batch(5)
    _seq_loss(model, (x, y)).backward()
    assert engine.accumulate() == 5
    _assert_matches(engine, model, expected)


class _TimeMajor(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


# ------------------------------------------------------------- functional weight use
class _TiedLM(nn.Module):
    """nanoGPT-style: the output layer reuses the embedding matrix."""

    def __init__(self, functional):
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.wte.weight
        self.functional = functional

    def forward(self, ids):
        h = torch.tanh(self.mix(self.wte(ids)))
        return h @ self.wte.weight.T if self.functional else self.head(h)


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_functional_weight_use_is_refused_and_module_tying_is_exact(mode):
    torch.manual_seed(7)
    ids = torch.randint(0, 11, (4, 5))
    loss = lambda m, i: m(i[0]).logsumexp(-1).sum()  # noqa: E731
    model = _TiedLM(functional=True)
    engine = GradientEngine(model, max_grad_norm=0.1, mode=mode, loss_reduction="sum")
    loss(model, (ids,)).backward()
    with pytest.raises(RuntimeError, match=r"'wte.weight' received gradient from a use outside its module"):
        engine.accumulate()
    model = _TiedLM(functional=False)
    expected = clipped_sum(per_example_grads(model, (ids,), loss), 0.1)
    engine = GradientEngine(model, max_grad_norm=0.1, mode=mode, loss_reduction="sum")
    loss(model, (ids,)).backward()
    engine.accumulate()
    _assert_matches(engine, model, expected)


class _PaddedTiedLM(nn.Module):
    """GPT-2-style tying through modules: the head is an nn.Linear sharing the embedding's
    weight; padding_idx 0 appears in the ids."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.wte(ids))))


@pytest.mark.parametrize("gram", [True, False])  # embedding norm: T×T Gram / sparse rows
@pytest.mark.parametrize("T", [5, 7])  # head: ghost norm (2T² ≤ V·d = 66) / instantiated
def test_tied_embedding_is_exact_without_per_example_embedding_gradients(T, gram, monkeypatch):
    from dpkit.grad_sample.contributions import EmbeddingRowGrad
    from dpkit.grad_sample.layers import EmbeddingRule

    if not gram:
        monkeypatch.setattr(EmbeddingRule, "gram_max_positions", 0)

    torch.manual_seed(23)
    ids = torch.randint(0, 11, (4, T))
    ids[0, :2] = 0
    loss = lambda m, i: m(i[0]).logsumexp(-1).sum()  # noqa: E731
    model = _PaddedTiedLM()
    expected = clipped_sum(per_example_grads(model, (ids,), loss), 0.1)

    def no_instantiation(self):
        raise AssertionError("the tied embedding's (B, V, d) per-example gradients were formed")

    monkeypatch.setattr(EmbeddingRowGrad, "instantiate", no_instantiation)
    engine = GradientEngine(model, max_grad_norm=0.1, loss_reduction="sum")
    loss(model, (ids,)).backward()
    assert engine.accumulate() == 4
    _assert_matches(engine, model, expected)


class _QKVAttention(nn.Module):
    """q/k/v projections into scaled dot-product attention: the key bias's true gradient is 0
    (softmax is invariant to it), so float32 leaves only rounding noise there."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_float32_rounding_on_a_zero_gradient_is_not_a_functional_use(mode):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(20)
    model = _QKVAttention()
    x = 3 * torch.randn(8, 16, 16)
    loss = lambda m, i: m(i[0]).pow(2).sum()  # noqa: E731
    reference = copy.deepcopy(model).double()
    expected = clipped_sum(per_example_grads(reference, (x.double(),), loss), 0.5)
    expected = dict(zip(map(id, model.parameters()), (expected[id(p)] for p in reference.parameters())))
    engine = GradientEngine(model, max_grad_norm=0.5, mode=mode, loss_reduction="sum")
    for _ in range(3):
        engine.reset()
        loss(model, (x,)).backward()
        assert engine.accumulate() == 8
    for p in model.parameters():
        torch.testing.assert_close(engine.clipped_sum(p).double(), expected[id(p)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_functional_weight_use_is_refused_in_float32(mode):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(21)
    model = _TiedLM(functional=True)
    engine = GradientEngine(model, max_grad_norm=0.1, mode=mode, loss_reduction="sum")
    model(torch.randint(0, 11, (4, 5))).logsumexp(-1).sum().backward()
    with pytest.raises(RuntimeError, match=r"'wte.weight' received gradient from a use outside its module"):
        engine.accumulate()


# ---------------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_contributions_never_exceed_c():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    engine = GradientEngine(model, max_grad_norm=0.37, loss_reduction="sum")
    worst = 0.0
    for _ in range(24):  # one example per batch: its clipped contribution is the clipped sum
        engine.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(1, 16) * 3).float().pow(2).sum()
        loss.backward()
        engine.accumulate()
        norm = torch.sqrt(sum(engine.clipped_sum(p).double().pow(2).sum() for p in model.parameters()))
        worst = max(worst, float(norm) / 0.37)
    assert worst <= 1 + 1e-5


# ------------------------------------------------------------------------ deep copies
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_deepcopy_computes_with_its_own_weights_and_records_nothing(mode):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 4), nn.LayerNorm(4),
                          nn.Conv1d(3, 2, 1))
    engine = GradientEngine(model, max_grad_norm=1.0, mode=mode)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5).add_(0.1)
    ids = torch.randint(0, 7, (2, 3))
    plain = copy.deepcopy(ema)
    for m in plain.modules():
        m.__dict__.pop("forward", None)  # class forwards: the reference computation
    ema(ids).sum().backward()
    torch.testing.assert_close(ema(ids), plain(ids))
    assert engine.accumulate() == 0 and not engine.summed_grads


# ------------------------------------------------------------- per-layer clipping
def test_per_layer_threshold_follows_unfrozen_tensors():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(1, 3)
    expected = clipped_sum(per_example_grads(model, (x,), lambda m, i: m(i[0]).pow(2).sum()), 0.01, per_layer=True)
    model[2].weight.requires_grad_(False)
    engine = GradientEngine(model, max_grad_norm=0.01, clip_scope="per_layer", loss_reduction="sum")
    model[2].weight.requires_grad_(True)  # unfrozen after wrapping: 4 tensors, not 3
    model(x).pow(2).sum().backward()
    engine.accumulate()
    norm = torch.sqrt(sum(engine.clipped_sum(p).pow(2).sum() for p in model.parameters()))
    _assert_matches(engine, model, expected)
    assert norm <= 0.01 * (1 + 1e-9)


# ------------------------------------------------------------------ broadcast inputs
class _PositionalLM(nn.Module):
    """Hugging Face style: position ids of shape (1, T) broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(9, 4), nn.Embedding(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.out(torch.tanh(self.wte(ids) + self.wpe(pos)))


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_batch_broadcast_position_ids_are_exact(mode):
    torch.manual_seed(11)
    model = _PositionalLM()
    ids, y = torch.randint(0, 9, (8, 5)), torch.randn(8, 5, 3)
    expected = clipped_sum(per_example_grads(model, (ids, y), _seq_loss), 0.05)
    engine = GradientEngine(model, max_grad_norm=0.05, mode=mode, loss_reduction="sum")
    engine.expect_batch(8)
    _seq_loss(model, (ids, y)).backward()
    assert engine.accumulate() == 8
    _assert_matches(engine, model, expected)


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_broadcast_position_ids_with_t_equal_b_are_refused_until_known(mode):
    """(1, T) ids with T == n look like a time-major tensor with one time step: never guessed."""
    torch.manual_seed(12)
    model = _PositionalLM()
    ids, y = torch.randint(0, 9, (5, 5)), torch.randn(5, 5, 3)
    expected = clipped_sum(per_example_grads(model, (ids, y), _seq_loss), 0.05)
    engine = GradientEngine(model, max_grad_norm=0.05, mode=mode, loss_reduction="sum")
    engine.expect_batch(5)
    _seq_loss(model, (ids, y)).backward()
    with pytest.raises(AmbiguousStepError, match=r"module 'wte'.*axes \[0, 1\]"):  # B == T
        engine.accumulate()
    engine.set_batch_axis(0, "wte")
    engine.set_batch_axis(0, "out")
    _seq_loss(model, (ids, y)).backward()
    with pytest.raises(AmbiguousStepError, match=r"module 'wpe'.*set_batch_axis\(0, 'wpe'\)"):
        engine.accumulate()
    for declare in (True, False):  # declared, then proven by a batch with T != n
        engine.reset()
        if declare:
            engine.set_batch_axis(0)  # every position-wise layer: batch first
        else:
            engine._declared_axes.clear()
            engine.expect_batch(3)
            _seq_loss(model, (ids[:3], y[:3])).backward()
            engine.accumulate()
            engine.reset()
            engine.expect_batch(5)
        _seq_loss(model, (ids, y)).backward()
        assert engine.accumulate() == 5
        _assert_matches(engine, model, expected)


def test_dp_optimizer_delegates_the_declarations():
    import dpkit
    torch.manual_seed(13)
    model = _mlp()
    x, x_aug, y = torch.randn(4, 4), torch.randn(4, 4), torch.randint(0, 3, (4,))
    expected = clipped_sum(per_example_grads(model, (x, x_aug, y), lambda m, i: _multi_view_loss(m, *i, 2)), 0.1)
    _, opt, _ = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), None,
                                   noise_multiplier=0.0, max_grad_norm=0.1, sample_rate=0.5,
                                   expected_batch_size=4)
    opt.engine.loss_reduction = "sum"
    opt.zero_grad()
    _multi_view_loss(model, x, x_aug, y, 2).backward()
    with pytest.raises(AmbiguousStepError, match="same_examples"):
        opt.step()
    opt.zero_grad()
    with opt.same_examples():
        loss = _multi_view_loss(model, x, x_aug, y, 2)
    loss.backward()
    opt.step()
    for p in model.parameters():
        torch.testing.assert_close(p.grad * 4, expected[id(p)], rtol=1e-7, atol=1e-9)


def test_stale_declaration_from_a_prefetched_batch_is_not_applied():
    """Batches collected before training: the last declaration (12) must not turn a batch of 11
    sequences of length 12 into 'time-major' per-position clipping."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(11, 12, 3), torch.randn(11, 12, 2)
    expected = clipped_sum(per_example_grads(model, (x, y), _seq_loss), 0.05)
    engine = GradientEngine(model, max_grad_norm=0.05, loss_reduction="sum")
    engine.expect_batch(11)
    engine.expect_batch(12)  # the loader yielded the next batch before this one was used
    _seq_loss(model, (x, y)).backward()
    assert engine.accumulate() == 11
    _assert_matches(engine, model, expected)


def test_rnn_dropout_switched_on_after_wrapping_is_refused():
    from dpkit.errors import UnsupportedModuleError
    model = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True).eval()
    engine = GradientEngine(model, max_grad_norm=1.0)  # eval mode: no dropout, accepted
    model.train()
    with pytest.raises(UnsupportedModuleError, match="inter-layer dropout"):
        model(torch.randn(2, 3, 3))
    assert engine.accumulate() == 0


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_mlp_fed_time_major_batches_bound_to_their_declaration(mode):
    """The brief's case: (T, B, d) fed to a position-wise MLP, B declared with the batch; batches
    prefetched before use keep their own sizes."""
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    batches = [torch.randn(n, 12, 4) for n in (3, 5)]  # loader layout (B, T, d)
    loss = lambda m, i: m(i[0].transpose(0, 1)).pow(2).sum()  # noqa: E731
    expected = [clipped_sum(per_example_grads(model, (b,), loss), 0.05) for b in batches]
    engine = GradientEngine(model, max_grad_norm=0.05, mode=mode, loss_reduction="sum")
    for b in batches:  # list(loader): both declared before either is used
        engine.expect_batch(b.shape[0], batch=(b,))
    for b, exp in zip(batches, expected):
        engine.reset()
        loss(model, (b,)).backward()
        assert engine.accumulate() == b.shape[0]
        _assert_matches(engine, model, exp)


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_bf16_autocast_step_is_not_mistaken_for_a_functional_use(mode):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 8))
    engine = GradientEngine(model, max_grad_norm=0.5, mode=mode)
    for _ in range(3):
        engine.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(6, 16)).float().pow(2).mean()
        loss.backward()
        assert engine.accumulate() == 6


class _GRUTimeMajorHead(nn.Module):
    """Time-major GRU (fixes the batch on axis 1) then a position-wise Linear on (T, B, H)."""

    def __init__(self):
        super().__init__()
        self.gru, self.out = nn.GRU(3, 4), nn.Linear(4, 2)

    def forward(self, x):  # x: (B, T, 3)
        return self.out(self.gru(x.transpose(0, 1))[0]).transpose(0, 1)


def test_undeclared_batch_read_on_a_time_major_layer():
    """No declaration: n comes from the GRU's axis 1; the Linear's (T, B, H) is exact for T ≠ B
    and refused for T == B (axis 0 could hold the batch just as well)."""
    torch.manual_seed(17)
    model = _GRUTimeMajorHead()
    x, y = torch.randn(4, 6, 3), torch.randn(4, 6, 2)
    expected = clipped_sum(per_example_grads(model, (x, y), _seq_loss), 0.05)
    engine = GradientEngine(model, max_grad_norm=0.05, loss_reduction="sum")
    _seq_loss(model, (x, y)).backward()
    assert engine.accumulate() == 4
    _assert_matches(engine, model, expected)
    fresh = _GRUTimeMajorHead()
    engine = GradientEngine(fresh, max_grad_norm=0.05, loss_reduction="sum")
    _seq_loss(fresh, (torch.randn(4, 4, 3), torch.randn(4, 4, 2))).backward()
    with pytest.raises(AmbiguousStepError, match="module 'out'"):
        engine.accumulate()


def test_micro_batches_sliced_from_a_declared_batch_are_not_bound_to_it():
    """Splitting a loader batch of 8 sequences of length 8 into halves: each half holds 4
    examples; binding it to n = 8 would clip per position (axis 1)."""
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 8, 3), torch.randn(8, 8, 2)
    expected = clipped_sum(per_example_grads(model, (x, y), _seq_loss), 0.05)
    engine = GradientEngine(model, max_grad_norm=0.05, loss_reduction="sum")
    engine.expect_batch(8, batch=(x, y))
    for half in (slice(0, 4), slice(4, 8)):
        _seq_loss(model, (x[half], y[half])).backward()
    engine.accumulate()
    assert engine.examples_seen == 8
    _assert_matches(engine, model, expected)


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_input_gradients_for_adversarial_examples_do_not_count(mode):
    """FGSM-style training: autograd.grad w.r.t. the input, then train on x_adv. Each example
    must count once (the training pass), not twice."""
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ce = lambda m, i: F.cross_entropy(m(i[0]), i[1], reduction="sum")  # noqa: E731
    x_adv = x.clone().requires_grad_(True)
    grad_x = torch.autograd.grad(ce(model, (x_adv, y)), x_adv)[0]  # before the engine: reference
    x_adv = (x + 0.1 * grad_x.sign()).detach()
    expected = clipped_sum(per_example_grads(model, (x_adv, y), ce), 0.05)
    engine = GradientEngine(model, max_grad_norm=0.05, mode=mode, loss_reduction="sum")
    probe = x.clone().requires_grad_(True)
    torch.autograd.grad(ce(model, (probe, y)), probe)  # input gradient only
    ce(model, (x_adv, y)).backward()
    engine.accumulate()
    assert engine.examples_seen == 5
    _assert_matches(engine, model, expected)


# ------------------------------------------------------------------- one engine per model
def test_a_model_hooked_by_an_attached_engine_is_refused_copies_and_detached_models_are_not():
    torch.manual_seed(22)
    model = _mlp()
    first = GradientEngine(model, max_grad_norm=0.1, loss_reduction="sum")
    with pytest.raises(RuntimeError, match=r"already has the per-example hooks.*optimizer\.engine\.detach\(\)"):
        GradientEngine(model, max_grad_norm=0.1)
    copy_engine = GradientEngine(copy.deepcopy(model), max_grad_norm=0.1)  # a copy is unhooked
    copy_engine.detach()
    first.detach()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ce = lambda m, i: F.cross_entropy(m(i[0]), i[1], reduction="sum")  # noqa: E731
    expected = clipped_sum(per_example_grads(model, (x, y), ce), 0.1)
    second = GradientEngine(model, max_grad_norm=0.1, loss_reduction="sum")  # after detach(): fine
    with pytest.raises(RuntimeError, match="already has the per-example hooks"):
        first.attach()  # re-attaching the first would hook the model twice
    ce(model, (x, y)).backward()
    assert second.accumulate() == 5
    _assert_matches(second, model, expected)
