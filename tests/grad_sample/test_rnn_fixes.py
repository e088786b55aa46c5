"""Issue 13: inputs split on their TRUE batch axis in the torch.func fallback (RNN initial states,
packed sequences, attention padding masks) and cross-example embeddings refused. Every clipped sum
is compared with the float64 batch-of-1 reference; removal sensitivity at σ=0 stays ≤ C."""

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dpkit.errors import UnsupportedModuleError
from dpkit.grad_sample import GradientEngine
from tests.grad_sample.reference import clipped_sum, per_example_grads


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


def _engine_sum(model, inputs, loss_fn, clip, mode):
    engine = GradientEngine(model, max_grad_norm=clip, mode=mode, loss_reduction="sum")
    model.zero_grad()
    loss_fn(model, inputs).backward()
    n = engine.accumulate()
    out = {id(p): engine.clipped_sum(p).clone() for p in model.parameters()}
    engine.detach()
    return n, out


def _check(model, inputs, loss_fn, mode, B):
    ref = per_example_grads(model, inputs, loss_fn)
    clip = 0.5 * min(v.reshape(B, -1).norm(dim=1).median() for v in ref.values()).item()
    expected = clipped_sum(ref, clip)
    n, got = _engine_sum(model, inputs, loss_fn, clip, mode)
    assert n == B
    for p in model.parameters():
        torch.testing.assert_close(got[id(p)], expected[id(p)], rtol=1e-7, atol=1e-9)
    return clip


class Decoder(nn.Module):
    """seq2seq decoder: batch-first input and a per-example initial state (encoder summary).
    The state is given batch-first here so the reference can slice it; the RNN gets (layers, B, H)."""

    def __init__(self, kind):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, num_layers=2, batch_first=True)
        self.kind = kind

    def forward(self, x, h0):
        h0 = h0.transpose(0, 1).contiguous()
        hx = (h0, torch.tanh(h0)) if self.kind == "LSTM" else h0
        out, _ = self.rnn(x, hx)
        return out


def _dec_loss(m, inp):
    return m(inp[0], inp[1]).pow(2).sum()


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
def test_batch_first_rnn_with_initial_state_matches_reference(kind, mode):
    torch.manual_seed(0)
    B = 5
    model = Decoder(kind)
    x, h0 = torch.randn(B, 6, 3), torch.randn(B, 2, 4)
    _check(model, (x, h0), _dec_loss, mode, B)


def test_batch_first_gru_initial_state_removal_sensitivity():
    """σ=0: adding one example changes the clipped sum by at most C (was 15·C with B=16)."""
    torch.manual_seed(1)
    B, clip = 16, 1e-3
    model = Decoder("GRU")
    x, h0 = torch.randn(B, 5, 3), 3 * torch.randn(B, 2, 4)
    _, full = _engine_sum(model, (x, h0), _dec_loss, clip, "bk")
    _, rest = _engine_sum(model, (x[1:], h0[1:]), _dec_loss, clip, "bk")
    diff = torch.sqrt(sum((full[k] - rest[k]).pow(2).sum() for k in full))
    assert diff <= clip * (1 + 1e-9)


class PackedClassifier(nn.Module):
    """LSTM over a PackedSequence (unsorted lengths); reads only the final states."""

    def __init__(self, bidirectional=True):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(4, 2)

    def forward(self, x, lengths, h0=None):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        hx = None if h0 is None else (h0.transpose(0, 1).contiguous(), -h0.transpose(0, 1).contiguous())
        _, (h, c) = self.rnn(packed, hx)  # hx and h_n in the caller's (unsorted) example order
        return self.head(h[-1] + h[-2] + c[-1])


def _packed_loss(m, inp):
    x, lengths, *h0 = inp
    return m(x[:, :int(lengths.max())], lengths, *h0).pow(2).sum()


@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_packed_lstm_final_state_matches_reference(mode, initial_state):
    torch.manual_seed(2)
    B = 4
    x = torch.randn(B, 6, 3)
    lengths = torch.tensor([3, 6, 1, 4])
    inputs = (x, lengths, torch.randn(B, 4, 4)) if initial_state else (x, lengths)
    _check(PackedClassifier(), inputs, _packed_loss, mode, B)


class PackedTagger(nn.Module):
    """GRU over a PackedSequence whose (unpacked) outputs reach the loss."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=batch_first, bidirectional=True)

    def forward(self, x, lengths):
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=self.rnn.batch_first, enforce_sorted=False)
        out, h = self.rnn(packed)
        out = pad_packed_sequence(out, batch_first=self.rnn.batch_first)[0]
        return out.sum(1 if self.rnn.batch_first else 0) + h.sum(0).repeat(1, 2)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_packed_output_reaching_the_loss_matches_reference(mode, batch_first):
    """The packed output's gradient has no batch axis (packed steps): the GRU counts its
    sequences, and its padded output gradient gives exact per-example gradients."""
    torch.manual_seed(3)
    x, lengths = torch.randn(3, 5, 3), torch.tensor([5, 2, 4])
    _check(PackedTagger(batch_first), (x, lengths), _packed_loss, mode, 3)


class TimeMajorAttention(nn.Module):
    """nn.MultiheadAttention(batch_first=False) with a key padding mask (B, S) while inputs are
    (T, B, E); optionally also a per-example 3-D float attention mask (B·heads, T, S)."""

    def __init__(self, per_example_mask=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.per_example_mask = per_example_mask

    def forward(self, x, pad):
        xt = x.transpose(0, 1)
        mask = pad > 0
        attn_mask = None
        if self.per_example_mask:  # a per-example score offset, repeated for the 2 heads
            mask = torch.zeros_like(pad).masked_fill(mask, float("-inf"))
            attn_mask = (x.sum(-1, keepdim=True) * x.sum(-1).unsqueeze(1)).repeat_interleave(2, 0)
        return self.attn(xt, xt, xt, key_padding_mask=mask, attn_mask=attn_mask,
                         need_weights=False)[0].transpose(0, 1)


def _attn_loss(m, inp):
    return m(inp[0], inp[1]).pow(2).sum()


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_time_major_attention_with_key_padding_mask_matches_reference(mode):
    torch.manual_seed(4)
    B, T = 4, 4  # B == T: an axis mix-up cannot hide behind a shape error
    x = torch.randn(B, T, 8)
    pad = torch.zeros(B, T)
    pad[0, 3], pad[2, 2:] = 1, 1
    _check(TimeMajorAttention(), (x, pad), _attn_loss, mode, B)


def test_attention_per_example_3d_mask_matches_reference():
    torch.manual_seed(5)
    B, T = 3, 4
    x = torch.randn(B, T, 8)
    pad = torch.zeros(B, T)
    pad[1, 3] = 1
    _check(TimeMajorAttention(per_example_mask=True), (x, pad), _attn_loss, "per_sample", B)


def test_embedding_scale_grad_by_freq_refused():
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModuleError, match=r"'0'.*scale_grad_by_freq=False"):
        GradientEngine(model, max_grad_norm=1.0)
