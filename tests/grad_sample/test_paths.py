"""BK path selection: per layer AND per input shape, visible, and every path gives the same sums."""

import pytest
import torch
import torch.nn as nn

from dpkit.grad_sample import GradientEngine
from dpkit.grad_sample.contributions import EmbeddingRowGrad, LinearWeightGrad
from dpkit.grad_sample.layers import EmbeddingBagRule, EmbeddingRule
from tests.grad_sample.reference import clipped_sum, per_example_grads


def _sum_loss(m, inp):
    return m(inp[0]).pow(2).sum()


def test_linear_path_follows_sequence_length():
    model = nn.Linear(40, 30)  # p·d = 1200: ghost iff 2T² <= 1200, i.e. T <= 24
    engine = GradientEngine(model, max_grad_norm=1.0, loss_reduction="sum")
    seen = {}
    for T in (3, 40, 3):
        model(torch.randn(4, T, 40)).pow(2).sum().backward()
        engine.accumulate()
        seen.setdefault(T, set()).add(engine.paths[""])
    assert seen == {3: {"ghost"}, 40: {"instantiate"}}


@pytest.mark.parametrize("T", [2, 30])
def test_forced_ghost_and_instantiate_agree(T):
    torch.manual_seed(0)
    a, g = torch.randn(5, 1, T, 7, dtype=torch.float64), torch.randn(5, 1, T, 4, dtype=torch.float64)
    c = torch.rand(5, dtype=torch.float64)
    ghost = LinearWeightGrad(a, g, torch.Size([4, 7]), ghost=True)
    inst = LinearWeightGrad(a, g, torch.Size([4, 7]), ghost=False)
    torch.testing.assert_close(ghost.norm_sq(), inst.norm_sq())
    torch.testing.assert_close(ghost.clipped_sum(c), inst.clipped_sum(c))
    explicit = torch.einsum("btp,btd->bpd", g[:, 0], a[:, 0])
    torch.testing.assert_close(inst.instantiate(), explicit)


@pytest.mark.parametrize("gram_limit", [0, 256])
def test_embedding_row_and_gram_norms_match_reference(gram_limit, monkeypatch):
    monkeypatch.setattr(EmbeddingRule, "gram_max_positions", gram_limit)
    torch.manual_seed(0)
    model = nn.Embedding(9, 4, padding_idx=2).double()
    ids = torch.randint(0, 9, (6, 8))
    ref = per_example_grads(model, (ids,), _sum_loss)
    expected = clipped_sum(ref, 0.5)
    engine = GradientEngine(model, max_grad_norm=0.5, loss_reduction="sum")
    _sum_loss(model, (ids,)).backward()
    engine.accumulate()
    assert engine.paths[""] == ("embedding_gram" if gram_limit else "embedding_rows")
    torch.testing.assert_close(engine.clipped_sum(model.weight), expected[id(model.weight)])


def test_embeddingbag_matches_reference():
    torch.manual_seed(0)
    for mode in ("sum", "mean"):
        model = nn.EmbeddingBag(9, 4, mode=mode).double()
        ids = torch.randint(0, 9, (5, 3))
        ref = per_example_grads(model, (ids,), _sum_loss)
        expected = clipped_sum(ref, 0.3)
        engine = GradientEngine(model, max_grad_norm=0.3, loss_reduction="sum")
        _sum_loss(model, (ids,)).backward()
        engine.accumulate()
        torch.testing.assert_close(engine.clipped_sum(model.weight), expected[id(model.weight)])


@pytest.mark.parametrize("offsets", [False, True])
def test_embeddingbag_mean_with_padding_and_keyword_weights_matches_reference(offsets):
    """torch averages over the NON-padding entries of a bag; per_sample_weights may be a keyword."""
    torch.manual_seed(0)
    model = nn.EmbeddingBag(9, 4, mode="mean" if not offsets else "sum", padding_idx=0).double()
    ids = torch.randint(0, 9, (5, 4))
    ids[:, 0] = 0  # every bag holds padding
    if offsets:  # flat ids + offsets + per-example weights passed by keyword
        weights = torch.rand(5, 4, dtype=torch.float64)
        loss = lambda m, inp: m(inp[0].reshape(-1), torch.arange(0, inp[0].numel(), 4),  # noqa: E731
                                per_sample_weights=inp[1].reshape(-1)).pow(2).sum()
        inputs = (ids, weights)
    else:
        loss, inputs = _sum_loss, (ids,)
    ref = per_example_grads(model, inputs, loss)
    expected = clipped_sum(ref, 0.3)
    engine = GradientEngine(model, max_grad_norm=0.3, loss_reduction="sum")
    loss(model, inputs).backward()
    engine.accumulate()
    torch.testing.assert_close(engine.clipped_sum(model.weight), expected[id(model.weight)])


def test_bk_skips_weight_gradient_but_keeps_input_gradient_flow():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    engine = GradientEngine(model, max_grad_norm=1.0, mode="bk")
    model(torch.randn(4, 3)).sum().backward()
    assert all(p.grad is None for p in model.parameters())  # no discarded GEMMs ran
    engine.accumulate()
    assert set(engine.paths) == {"0", "2"}
    assert all(engine.clipped_sum(p).abs().sum() > 0 for p in model.parameters())  # first layer reached


def test_mixed_precision_bf16_norms_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    ref_model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    ref_model.load_state_dict(model.state_dict())
    expected = clipped_sum(per_example_grads(ref_model, (x.double(),), _sum_loss), 0.5)
    engine = GradientEngine(model, max_grad_norm=0.5, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).sum()
    loss.backward()
    engine.accumulate()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        got = engine.clipped_sum(p)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected[id(q)], rtol=5e-2, atol=5e-3)


def test_multihead_attention_uses_linear_views_in_bk_and_fallback_otherwise():
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    engine = GradientEngine(attn, max_grad_norm=1.0, mode="bk")
    attn(x, x, x)[0].sum().backward()
    engine.accumulate()
    assert engine.paths[""] in ("ghost", "instantiate") and engine.paths["out_proj"] in ("ghost", "instantiate")
    engine.detach()
    exotic = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    engine = GradientEngine(exotic, max_grad_norm=1.0, mode="bk")
    exotic(x, x, x)[0].sum().backward()
    engine.accumulate()
    assert engine.paths == {"": "functorch"}


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 5, 3, padding=1, stride=2), nn.Conv1d(4, 6, 3, groups=2, dilation=2)])
def test_conv_ghost_and_kernel_instantiation_agree(conv):
    from dpkit.grad_sample.contributions import ConvWeightGrad
    from dpkit.grad_sample.layers import ConvRule
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(4, conv.in_channels, *([9] * (conv.weight.dim() - 2)), dtype=torch.float64)
    g = torch.randn_like(conv(x))
    c = torch.rand(4, dtype=torch.float64)
    view = lambda: LinearWeightGrad(*(lambda v: (v.a, v.g, v.weight_shape))(ConvRule().view(conv, x, g)), ghost=True)  # noqa: E731
    ghost, inst = ConvWeightGrad(x, g, conv, view, ghost=True), ConvWeightGrad(x, g, conv, view, ghost=False)
    torch.testing.assert_close(ghost.norm_sq(), inst.norm_sq())
    loop = torch.stack([torch.autograd.grad((conv(x[i:i + 1]) * g[i:i + 1]).sum(), conv.weight)[0] for i in range(4)])
    torch.testing.assert_close(inst.instantiate(), loop)
    torch.testing.assert_close(ghost.clipped_sum(c), torch.einsum("b...,b->...", loop, c))


@pytest.mark.parametrize("mode, weighted, twice", [("sum", False, False), ("mean", False, False),
                                                   ("sum", True, False), ("sum", False, True)])
def test_fixed_size_bags_with_repeated_ids_match_reference(mode, weighted, twice):
    """(B, T) bags: the broadcast fast path (‖g_i‖² · #equal-id pairs), the weighted Gram path and
    two uses of one bag (concatenated positions) all equal float64 batch-of-1 gradients."""
    torch.manual_seed(1)
    model = nn.EmbeddingBag(7, 3, mode=mode).double()
    ids = torch.randint(0, 7, (6, 5))
    ids[:, 1] = ids[:, 0]  # repeated ids inside every bag
    ids[0] = 3  # one bag of a single repeated id
    weights = torch.rand(6, 5, dtype=torch.float64) if weighted else None

    def loss(m, inp):
        out = m(inp[0], per_sample_weights=inp[1]) if weighted else m(inp[0])
        if twice:
            out = out + m(inp[0].flip(1)).sin()
        return out.pow(2).sum()

    inputs = (ids, weights) if weighted else (ids,)
    ref = per_example_grads(model, inputs, loss)
    engine = GradientEngine(model, max_grad_norm=0.4, loss_reduction="sum")
    with engine.same_examples():
        loss(model, inputs).backward()
    engine.accumulate()
    torch.testing.assert_close(engine.clipped_sum(model.weight), clipped_sum(ref, 0.4)[id(model.weight)])


@pytest.mark.parametrize("mode, weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_fixed_size_bags_sparse_rows_and_dropped_examples_match_reference(mode, weighted):
    """The lazy-noise form of (B, T) bags — sparse clipped rows (bag gradients scaled once, then
    copied to their ids), norms, the explicit gradients and dropping examples, all formed without
    the (B·T, d) copy until needed — equals float64 batch-of-1 gradients."""
    torch.manual_seed(3)
    B, T, V, d = 6, 5, 9, 4
    module = nn.EmbeddingBag(V, d, mode=mode).double()
    ids = torch.randint(0, V, (B, T))
    ids[:, 2] = ids[:, 0]  # repeated ids inside every bag
    weights = torch.rand(B, T, dtype=torch.float64) if weighted else None
    go = torch.randn(B, d, dtype=torch.float64)
    ref = torch.stack([torch.autograd.grad((module(ids[i:i + 1], per_sample_weights=None if weights is None
                                                   else weights[i:i + 1]) * go[i:i + 1]).sum(),
                                           module.weight)[0] for i in range(B)])
    c = torch.rand(B, dtype=torch.float64)
    bad = torch.zeros(B, dtype=torch.bool)
    bad[[1, 4]] = True
    for drop in (False, True):
        example, rows, grads, dense, gram = EmbeddingBagRule().rows(module, (ids, None, weights), go)
        contrib = EmbeddingRowGrad(example, rows, grads, B, module.weight.shape, dense, gram)
        expected = ref
        if drop:
            contrib.zero_examples(bad)
            expected = torch.where(bad.view(-1, 1, 1), 0, ref)
        assert contrib.positions[1].stride(1) == (d if weighted or drop else 0)  # fast path exercised
        rows, vals = contrib.clipped_rows(c)
        dense = torch.zeros(V, d, dtype=torch.float64).index_add_(0, rows, vals)
        torch.testing.assert_close(dense, torch.einsum("bvd,b->vd", expected, c))
        torch.testing.assert_close(contrib.norm_sq(), expected.pow(2).sum(dim=(1, 2)))
        torch.testing.assert_close(contrib.instantiate(), expected)
