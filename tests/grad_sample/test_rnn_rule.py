"""Issue 17: nn.RNN / nn.LSTM / nn.GRU through :class:`RecurrentRule` (time-summed outer products of
gate pre-activation gradients from one batched backward), compared with the float64 batch-of-1
reference, for both engines; a wrong rule (e.g. an off-by-one state h_t instead of h_{t-1})
fails these comparisons."""

import pytest
import torch
import torch.nn as nn

from dpkit.grad_sample import GradientEngine
from dpkit.grad_sample.contributions import LinearWeightGrad
from dpkit.grad_sample.rnn_rule import RecurrentRule
from tests.grad_sample.reference import clipped_sum, per_example_grads


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


class Tagger(nn.Module):
    """Embedding-free sequence model: RNN (optionally with a per-example initial state, given
    batch-first so the reference can slice it), a linear head on every step and on h_n."""

    def __init__(self, kind, layers, bidirectional, batch_first, bias=True):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, num_layers=layers, bidirectional=bidirectional,
                                     batch_first=batch_first, bias=bias)
        self.head = nn.Linear(4 * (2 if bidirectional else 1), 2)
        self.kind, self.batch_first = kind, batch_first

    def forward(self, x, h0=None):
        if not self.batch_first:
            x = x.transpose(0, 1)
        hx = None
        if h0 is not None:
            h0 = h0.transpose(0, 1).contiguous()
            hx = (h0, torch.tanh(h0)) if self.kind == "LSTM" else h0
        out, state = self.rnn(x, hx)
        h_n = state[0] if self.kind == "LSTM" else state
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out).pow(2).sum() + h_n.sum(0).pow(2).sum()


def _loss(m, inp):
    return m(*inp)


def _engine_sum(model, inputs, clip, mode):
    engine = GradientEngine(model, max_grad_norm=clip, mode=mode, loss_reduction="sum")
    model.zero_grad()
    _loss(model, inputs).backward()
    n = engine.accumulate()
    out = {id(p): engine.clipped_sum(p).clone() for p in model.parameters()}
    paths = dict(engine.paths)
    engine.detach()
    return n, out, paths


def _check(model, inputs, mode, B):
    ref = per_example_grads(model, inputs, _loss)
    clip = 0.5 * min(v.reshape(B, -1).norm(dim=1).median() for v in ref.values()).item()
    expected = clipped_sum(ref, clip)
    n, got, paths = _engine_sum(model, inputs, clip, mode)
    assert n == B
    assert paths["rnn"] == "rnn"  # the rule ran, not the torch.func fallback
    for p in model.parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[id(p)], expected[id(p)], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_rule_matches_reference(kind, layers, bidirectional, batch_first, mode):
    torch.manual_seed(0)
    B = 5
    model = Tagger(kind, layers, bidirectional, batch_first)
    _check(model, (torch.randn(B, 6, 3),), mode, B)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_ghost_norm_path_matches_reference(kind, monkeypatch):
    """Above the instantiation cap the weights take the ghost norm; still exact."""
    monkeypatch.setattr(RecurrentRule, "instantiate_max_elements", 0)
    torch.manual_seed(5)
    B = 4
    model = Tagger(kind, 2, True, False)
    _check(model, (torch.randn(B, 6, 3), torch.randn(B, 4, 4)), "bk", B)
    x = torch.randn(B, 6, 3).transpose(0, 1)
    out, _ = model.rnn(x)
    grads = [torch.randn_like(out), None] + ([None] if kind == "LSTM" else [])
    contribs = [c for _, c in RecurrentRule().contributions(model.rnn, ((x,), {}), grads)]
    assert any(getattr(c, "path", None) == "ghost" for c in contribs)


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_initial_state_and_no_bias_match_reference(kind, mode):
    torch.manual_seed(1)
    B = 4
    model = Tagger(kind, 2, True, True, bias=False)
    _check(model, (torch.randn(B, 5, 3), torch.randn(B, 4, 4)), mode, B)


def test_relu_rnn_and_frozen_weight_match_reference():
    torch.manual_seed(2)
    B = 4
    model = Tagger("RNN", 2, False, True)
    model.rnn = nn.RNN(3, 4, num_layers=2, batch_first=True, nonlinearity="relu")
    model.rnn.weight_hh_l0.requires_grad_(False)
    _check(model, (torch.randn(B, 5, 3),), "bk", B)


def test_rule_contributions_are_exact_per_example_gradients():
    """Each per-example weight gradient (not just the clipped sum) equals the reference."""
    torch.manual_seed(3)
    B = 3
    model = Tagger("GRU", 1, True, True)
    x = torch.randn(B, 7, 3)
    ref = per_example_grads(model, (x,), _loss)
    out, state = model.rnn(x)
    loss = model.head(out).pow(2).sum() + state.sum(0).pow(2).sum()
    g_out = torch.autograd.grad(loss, (out, state))
    rule = RecurrentRule()
    contribs = dict((id(p), c) for p, c in rule.contributions(model.rnn, ((x,), {}), list(g_out)))
    assert all(isinstance(contribs[id(p)], LinearWeightGrad)
               for n, p in model.rnn.named_parameters() if n.startswith("weight"))
    for p in model.rnn.parameters():
        torch.testing.assert_close(contribs[id(p)].instantiate(), ref[id(p)], rtol=1e-8, atol=1e-10)


def test_lstm_removal_sensitivity():
    """σ=0: adding one example changes the clipped sum by at most C."""
    torch.manual_seed(4)
    B, clip = 12, 1e-3
    model = Tagger("LSTM", 2, True, True)
    x, h0 = torch.randn(B, 5, 3), 3 * torch.randn(B, 4, 4)
    _, full, _ = _engine_sum(model, (x, h0), clip, "bk")
    _, rest, _ = _engine_sum(model, (x[1:], h0[1:]), clip, "bk")
    diff = torch.sqrt(sum((full[k] - rest[k]).pow(2).sum() for k in full))
    assert diff <= clip * (1 + 1e-9)


def test_packed_input_stays_on_the_fallback():
    """A PackedSequence input is handed to the torch.func fallback (exact there, see
    test_rnn_fixes.py); an unpacked one to the rule."""
    torch.manual_seed(6)
    lstm = nn.LSTM(3, 4, batch_first=True)
    engine = GradientEngine(lstm, max_grad_norm=1.0, loss_reduction="sum")
    x = torch.randn(3, 5, 3)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), batch_first=True,
                                               enforce_sorted=False)
    lstm(packed)[1][0].sum().backward()
    engine.accumulate()
    assert engine.paths == {"": "functorch"}
    lstm(x)[1][0].sum().backward()
    engine.accumulate()
    assert engine.paths == {"": "rnn"}
    engine.detach()
