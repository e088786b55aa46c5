"""Unrolled recurrences for nn.RNN / nn.LSTM / nn.GRU.

torch's fused RNN kernels have no vmap batching rule, so per-example gradients of recurrent
layers are taken through this plain-tensor re-implementation instead (same parameters, same
equations as the torch documentation of each class). Used by the torch.func fallback only.

A :class:`~torch.nn.utils.rnn.PackedSequence` input is handled exactly: it is unpacked to a padded
batch with per-example lengths, and the recurrence of example i only advances while t < length_i
(the reverse direction of a bidirectional layer therefore starts at its own last step), which is
what the packed kernel computes; output gradients at padded positions are zero.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from dpkit.errors import UnsupportedModuleError


def check_rnn(name: str, module: nn.RNNBase) -> None:
    """Refuse the RNN options the unrolled form does not implement."""
    if getattr(module, "proj_size", 0):
        raise UnsupportedModuleError(f"module {name!r}: LSTM with proj_size > 0 is not supported by dpkit")
    if module.dropout and module.training:
        raise UnsupportedModuleError(
            f"module {name!r}: inter-layer dropout in {type(module).__name__} is not supported "
            "(per-example gradients would be recomputed with a different dropout mask); "
            "use dropout=0 or stack single-layer RNNs with nn.Dropout between them")


def cell_step(mode: str, gi, gh, h, c):
    """One time step from the pre-activations gi = W_ih x_t + b_ih and gh = W_hh h_{t-1} + b_hh
    (the equations of the torch documentation of each class); for LSTM and RNN, ``gi`` is their
    sum and ``gh`` is None."""
    if mode == "LSTM":
        i, f, g, o = gi.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, c
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(gi), c


def _cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
    gi = x @ w_ih.T + (b_ih if b_ih is not None else 0)
    gh = h @ w_hh.T + (b_hh if b_hh is not None else 0)
    if mode == "GRU":  # r gates only the hidden part
        return cell_step(mode, gi, gh, h, c)
    return cell_step(mode, gi + gh, None, h, c)


def unpack_input(module: nn.RNNBase, x):
    """(padded input in the module's layout, per-example lengths or None) of an RNN input."""
    if not isinstance(x, PackedSequence):
        return x, None
    padded, lengths = pad_packed_sequence(x, batch_first=module.batch_first)
    return padded, lengths.to(padded.device)


def packed_gradients(module: nn.RNNBase, x, grad_outputs):
    """Output gradients as (output, h_n[, c_n]) leaves; a packed output's gradient is padded (zeros
    at padded positions, examples in their original order, as h_n is)."""
    if not isinstance(x, PackedSequence):
        return tuple(grad_outputs)
    g_data, rest = grad_outputs[0], tuple(grad_outputs[4:])
    if g_data is None:
        return (None, *rest)
    packed = PackedSequence(g_data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    return (pad_packed_sequence(packed, batch_first=module.batch_first)[0], *rest)


def unrolled_forward(module: nn.RNNBase, params: dict, x: torch.Tensor, hx=None, lengths=None):
    """Forward of ``module`` with parameters ``params`` (name -> tensor), returning the same
    structure as the module: (output, h_n) or (output, (h_n, c_n)). With ``lengths`` (B,), example
    i's state only advances for t < lengths[i] (packed-sequence semantics)."""
    batch_first = module.batch_first
    if batch_first:
        x = x.transpose(0, 1)  # (T, B, F)
    T, B = x.shape[0], x.shape[1]
    dirs = 2 if module.bidirectional else 1
    H = module.hidden_size
    is_lstm = module.mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(module.num_layers * dirs, B, H)
        c0 = x.new_zeros(module.num_layers * dirs, B, H) if is_lstm else None
    else:
        h0, c0 = hx if is_lstm else (hx, None)
    layer_input = x
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outputs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = params[f"weight_ih{sfx}"], params[f"weight_hh{sfx}"]
            b_ih, b_hh = params.get(f"bias_ih{sfx}"), params.get(f"bias_hh{sfx}")
            k = layer * dirs + d
            h, c = h0[k], (c0[k] if is_lstm else None)
            steps = range(T - 1, -1, -1) if d else range(T)
            seq = [None] * T
            for t in steps:
                h_t, c_t = _cell(module.mode, layer_input[t], h, c, w_ih, w_hh, b_ih, b_hh)
                if lengths is None:
                    h, c = h_t, c_t
                else:
                    valid = (lengths > t).unsqueeze(-1)
                    h = torch.where(valid, h_t, h)
                    c = torch.where(valid, c_t, c) if is_lstm else None
                seq[t] = h
            outputs.append(torch.stack(seq))
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=-1) if dirs == 2 else outputs[0]
    out = layer_input.transpose(0, 1) if batch_first else layer_input
    h_n = torch.stack(h_n)
    return (out, (h_n, torch.stack(c_n))) if is_lstm else (out, h_n)
