"""Removal sensitivity of the clipped sum, measured: σ = 0, remove one example, ‖ΔS‖ / C.

DP-SGD's guarantee needs every example to move Σ_i c_i g_i by at most C (add/remove adjacency).
For each model family the suite uses (and the step shapes that broke it: several forward passes,
time-major layers, T == B, broadcast position ids, per-example RNN states), the harness clips a
batch D and D minus example j with a clip norm far below every gradient norm, and requires
max_j ‖S(D) − S(D∖j)‖ / C ≤ 1 — or the step refused with AmbiguousStepError. Independent of the
engine's internals: only the public clipped sums are compared.
"""

import contextlib

import pytest
import torch
import torch.nn as nn

from dpkit.errors import AmbiguousStepError
from dpkit.grad_sample import GradientEngine

B = 4
CLIP = 1e-4  # far below every per-example gradient norm: every example is clipped to exactly C


def _mse(out, target):
    return ((out - target) ** 2).sum()


class _Head(nn.Module):
    """Runs ``body`` then a linear read-out of the last position (sequence models)."""

    def __init__(self, body, dim, tuple_out=False, time_major=False):
        super().__init__()
        self.body, self.out = body, nn.Linear(dim, 2)
        self.tuple_out, self.time_major = tuple_out, time_major

    def forward(self, x):
        if self.time_major:
            x = x.transpose(0, 1)
        h = self.body(x)
        h = h[0] if self.tuple_out else h
        if self.time_major:
            h = h.transpose(0, 1)
        return self.out(h[:, -1])


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.attn(x, x, x)[0][:, -1])


class _GRUWithState(nn.Module):
    """batch_first GRU fed a per-example initial state h0 (loader layout (B, layers, H))."""

    def __init__(self):
        super().__init__()
        self.gru, self.out = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x, h0):
        return self.out(self.gru(x, h0.transpose(0, 1).contiguous())[0][:, -1])


class _Positional(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe, self.out = nn.Embedding(9, 4), nn.Embedding(8, 4), nn.Linear(4, 2)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T): broadcast over the batch
        return self.out(torch.tanh(self.wte(ids) + self.wpe(pos)).mean(1))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(9, 4)
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.wte(ids))).mean(1)


class _PackedOutput(nn.Module):
    """GRU over a PackedSequence whose padded outputs reach the loss."""

    def __init__(self):
        super().__init__()
        self.gru, self.out = nn.GRU(3, 4, batch_first=True, bidirectional=True), nn.Linear(8, 2)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.out(nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True)[0].sum(1))


class _TimeMajorMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 2))

    def forward(self, x):
        return self.net(x.transpose(0, 1)).sum(0)


def _seq(T, F_=3):
    return lambda n: (torch.randn(n, T, F_),)


def _multi_view(model, x, views):
    out = model(x)
    return sum(((out - model(x + 0.1 * (v + 1))) ** 2).sum() for v in range(views - 1)) + out.pow(2).sum()


# name: (model factory, inputs(n) -> tuple, loss(model, inputs), declare n?, views)
CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)),
            lambda n: (torch.randn(n, 4),), None, False, 1),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(),
                                  nn.Conv2d(3, 2, 3, stride=2), nn.Flatten(), nn.Linear(8, 2)),
            lambda n: (torch.randn(n, 2, 5, 5),), None, False, 1),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(24, 2)),
                  lambda n: (torch.randint(0, 10, (n, 6)),), None, False, 1),
    "embedding_bag_mean_padding": (lambda: nn.Sequential(nn.EmbeddingBag(10, 4, mode="mean", padding_idx=0),
                                                         nn.Linear(4, 2)),
                                   lambda n: (torch.randint(0, 10, (n, 5)),), None, False, 1),
    "rnn": (lambda: _Head(nn.RNN(3, 4, batch_first=True), 4, tuple_out=True), _seq(5), None, False, 1),
    "lstm": (lambda: _Head(nn.LSTM(3, 4, batch_first=True), 4, tuple_out=True), _seq(5), None, False, 1),
    "gru_time_major": (lambda: _Head(nn.GRU(3, 4), 4, tuple_out=True, time_major=True), _seq(5), None, True, 1),
    "gru_batch_first_h0": (_GRUWithState, lambda n: (torch.randn(n, 5, 3), torch.randn(n, 1, 4)), None, True, 1),
    "attention": (_Attention, _seq(5, 8), None, False, 1),
    "transformer_layer": (lambda: _Head(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 8),
                          _seq(5, 8), None, False, 1),
    "transformer_layer_time_major_t_eq_b": (
        lambda: _Head(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 8, time_major=True),
        _seq(B, 8), None, True, 1),
    "layernorm_2d": (lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2)),
                     lambda n: (torch.randn(n, 4),), None, False, 1),
    "rmsnorm_3d": (lambda: _Head(nn.Sequential(nn.Linear(3, 5), nn.RMSNorm(5)), 5), _seq(6), None, False, 1),
    "instancenorm": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, affine=True),
                                           nn.Flatten(), nn.Linear(12, 2)),
                     lambda n: (torch.randn(n, 2, 6),), None, False, 1),
    "time_major_mlp": (_TimeMajorMLP, _seq(12), None, True, 1),
    "time_major_mlp_t_eq_b": (_TimeMajorMLP, _seq(B), None, True, 1),
    "two_views": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)),
                  lambda n: (torch.randn(n, 4),), _multi_view, False, 2),
    "three_views": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)),
                    lambda n: (torch.randn(n, 4),), _multi_view, False, 3),
    "broadcast_position_ids": (_Positional, lambda n: (torch.randint(0, 9, (n, 7)),), None, True, 1),
    "tied_embedding_head": (_Tied, lambda n: (torch.randint(0, 9, (n, 3)),), None, False, 1),
    # 2T² > V·d: the head's per-example gradients are instantiated, the embedding's are not
    "tied_embedding_head_long": (_Tied, lambda n: (torch.randint(0, 9, (n, 6)),), None, False, 1),
    "packed_rnn_output": (_PackedOutput, lambda n: (torch.randn(n, 5, 3), torch.tensor([5, 2, 4, 1])[:n]),
                          None, False, 1),
}


def _clipped(engine, model, inputs, loss_fn, declare, views):
    engine.reset()
    if declare:
        engine.expect_batch(inputs[0].shape[0])
    block = engine.same_examples() if views > 1 else contextlib.nullcontext()
    with block:
        loss = loss_fn(model, *inputs, views) if loss_fn else model(*inputs).pow(2).sum()
    loss.backward()
    engine.accumulate()
    return torch.cat([engine.clipped_sum(p).reshape(-1) for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_removing_one_example_moves_the_clipped_sum_by_at_most_c(case, mode):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        make, inputs_of, loss_fn, declare, views = CASES[case]
        model = make()
        inputs = inputs_of(B)
        engine = GradientEngine(model, max_grad_norm=CLIP, mode=mode, loss_reduction="sum")
        try:
            full = _clipped(engine, model, inputs, loss_fn, declare, views)
            worst = 0.0
            for j in range(B):
                keep = [i for i in range(B) if i != j]
                rest = _clipped(engine, model, tuple(t[keep] for t in inputs), loss_fn, declare, views)
                worst = max(worst, float((full - rest).norm()) / CLIP)
        except AmbiguousStepError:
            assert case == "time_major_mlp_t_eq_b"  # refused: the only allowed alternative
            return
        assert worst <= 1 + 1e-6, f"{case}: one example moved the clipped sum by {worst:.3f}·C"
    finally:
        torch.set_default_dtype(previous)
