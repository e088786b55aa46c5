"""Clipped sums of every supported layer equal the batch-size-1 reference (float64), both engines."""

import pytest
import torch
import torch.nn as nn

from dpkit.grad_sample import GradientEngine
from tests.grad_sample.reference import clipped_sum, per_example_grads



pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


class Seq(nn.Module):
    """Wraps a layer taking (B, T, ...) input and reduces to one scalar output per example."""

    def __init__(self, layer, tuple_out=False):
        super().__init__()
        self.layer, self.tuple_out = layer, tuple_out

    def forward(self, x):
        out = self.layer(x)
        if self.tuple_out:
            out = out[0]
        return out


def _mse(model, inputs, reduction, batch_axis=0):
    """Squared error summed per example; "mean" averages over the batch (as a mean loss does)."""
    x, y = inputs
    loss = nn.functional.mse_loss(model(x), y, reduction="sum")
    return loss / x.shape[batch_axis] if reduction == "mean" else loss


class AttnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class AttnMasked(nn.Module):
    """Self-attention returning averaged weights too, with a causal float mask and dropout 0."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        T = x.shape[1]
        mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        out, w = self.attn(x, x, x, attn_mask=mask, need_weights=True)
        return out + w.sum(-1, keepdim=True)


class CrossAttn(nn.Module):
    """Time-major cross-attention: queries from x, keys/values from a transformed x (other length)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.kv = nn.Linear(8, 8)

    def forward(self, x):
        xt = x.transpose(0, 1)  # (T, B, E); plain layers see batch-first inputs
        memory = torch.tanh(self.kv(x))[:, :-1].transpose(0, 1)  # shorter key/value sequence
        return self.attn(xt, memory, memory, need_weights=False)[0].transpose(0, 1)


CASES = {
    "linear_2d": (lambda: nn.Linear(5, 3), (6, 5)),
    "linear_seq": (lambda: nn.Linear(5, 3), (6, 7, 5)),
    "linear_seq_wide": (lambda: nn.Linear(40, 30), (4, 3, 40)),  # ghost path (2T² ≤ pd)
    "linear_nobias": (lambda: nn.Linear(5, 3, bias=False), (6, 4, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1, stride=2), (5, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (5, 3, 6, 6)),
    "conv2d_groups_dil": (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, stride=2, padding=2), (3, 4, 7, 7)),
    "conv2d_same": (lambda: nn.Conv2d(2, 3, 4, padding="same"), (3, 2, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=1, padding=1), (3, 2, 4, 4, 4)),
    "conv2d_reflect_fallback": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (3, 2, 5, 5)),
    "layernorm": (lambda: nn.LayerNorm(5), (6, 4, 5)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (5, 4, 3, 3)),
    "instancenorm": (lambda: nn.InstanceNorm2d(3, affine=True), (5, 3, 4, 4)),
    "rmsnorm": (lambda: nn.RMSNorm(5), (6, 4, 5)),
    "lstm": (lambda: Seq(nn.LSTM(5, 4, batch_first=True), tuple_out=True), (4, 3, 5)),
    "gru_time_major": (lambda: Seq(nn.GRU(5, 4), tuple_out=True), (3, 4, 5)),
    "mha": (lambda: AttnBlock(), (4, 3, 8)),
    "mha_weights_masked": (lambda: AttnMasked(), (4, 5, 8)),
    "mha_cross_time_major": (lambda: CrossAttn(), (4, 3, 8)),
    "prelu_fallback": (lambda: nn.PReLU(), (6, 5)),
}


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_clipped_sum_matches_reference(case, reduction, mode):
    torch.manual_seed(0)
    make, shape = CASES[case]
    model = make()
    x = torch.randn(*shape)
    time_major = case == "gru_time_major"
    with torch.no_grad():
        y = torch.randn_like(model(x))
    B = x.shape[1] if time_major else x.shape[0]
    if time_major:
        # reference loop needs batch-first slicing: transpose in and out
        ref_model = lambda m, inp: _mse(m, (inp[0].transpose(0, 1), inp[1].transpose(0, 1)), "sum")  # noqa: E731
        ref = per_example_grads(model, (x.transpose(0, 1), y.transpose(0, 1)), ref_model)
    else:
        ref = per_example_grads(model, (x, y), lambda m, inp: _mse(m, inp, "sum"))
    clip = 0.5 * min(v.reshape(B, -1).norm(dim=1).median() for v in ref.values()).item() + 1e-3
    expected = clipped_sum(ref, clip)
    engine = GradientEngine(model, max_grad_norm=clip, mode=mode, loss_reduction=reduction)
    model.zero_grad()
    _mse(model, (x, y), reduction, batch_axis=1 if time_major else 0).backward()
    assert engine.accumulate() == B
    for p in model.parameters():
        torch.testing.assert_close(engine.clipped_sum(p), expected[id(p)], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("per_layer,automatic", [(True, False), (False, True)])
def test_per_layer_and_automatic_clipping(per_layer, automatic):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(7, 4), torch.randn(7, 2)
    ref = per_example_grads(model, (x, y), lambda m, inp: _mse(m, inp, "sum"))
    expected = clipped_sum(ref, 0.3, per_layer=per_layer, automatic=automatic)
    engine = GradientEngine(model, max_grad_norm=0.3, loss_reduction="sum",
                            clip_scope="per_layer" if per_layer else "flat",
                            clip_function="automatic" if automatic else "standard")
    _mse(model, (x, y), "sum").backward()
    engine.accumulate()
    for p in model.parameters():
        torch.testing.assert_close(engine.clipped_sum(p), expected[id(p)])


NORM_LAYERS = {
    "layernorm": lambda c: nn.LayerNorm(c),
    "rmsnorm": lambda c: nn.RMSNorm(c),
    "groupnorm": lambda c: nn.GroupNorm(2, c),
}


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("norm", sorted(NORM_LAYERS))
def test_norm_layers_over_input_ranks(norm, rank, mode):
    """(B, D) input has no position axis: it used to crash inside the rule (issue 14)."""
    torch.manual_seed(0)
    model = NORM_LAYERS[norm](4)
    with torch.no_grad():  # non-trivial affine parameters
        for p in model.parameters():
            p.normal_()
    shape = (5, 4, 3, 2, 2)[:rank] if norm == "groupnorm" else (5, 3, 2, 2)[:rank - 1] + (4,)
    x = torch.randn(*shape)
    y = torch.randn(*shape)
    ref = per_example_grads(model, (x, y), lambda m, inp: _mse(m, inp, "sum"))
    expected = clipped_sum(ref, 0.5)
    engine = GradientEngine(model, max_grad_norm=0.5, mode=mode, loss_reduction="sum")
    _mse(model, (x, y), "sum").backward()
    assert engine.accumulate() == 5
    for p in model.parameters():
        torch.testing.assert_close(engine.clipped_sum(p), expected[id(p)], rtol=1e-7, atol=1e-9)
