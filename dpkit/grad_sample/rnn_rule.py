"""Per-example gradients of nn.RNN / nn.LSTM / nn.GRU from ONE batched backward through the recurrence.

Every weight of a recurrent layer enters through an affine map applied at each time step:
the input pre-activations ``gi_t = W_ih x_t + b_ih`` and the hidden pre-activations
``gh_t = W_hh h_{t-1} + b_hh``. Example i's weight gradients are therefore sums over time of outer
products,

    ∇W_ih[i] = Σ_t ∂L/∂gi_{i,t} x_{i,t}ᵀ,      ∇W_hh[i] = Σ_t ∂L/∂gh_{i,t} h_{i,t-1}ᵀ,

and its bias gradients the time sums of ∂L/∂gi and ∂L/∂gh (the observation behind Opacus'
DPLSTM, which gets the same sums from per-step Linear layers; here the user keeps torch's module).
The module runs its own fused forward as usual. To get ∂L/∂gi and ∂L/∂gh for every example at once,
the recurrence is recomputed ONCE for the whole batch from the captured input and initial state,
with the gate pre-activations kept as explicit tensors (vectorised over the batch, a Python loop
over time only), and one ``torch.autograd.grad`` against the captured output gradients returns
them. Examples never interact in a recurrence, so the batched pre-activation gradients are the
per-example ones.

Each weight is then a book-keeping pair (a, g) = (x or h_{t-1}, ∂L/∂gi or ∂L/∂gh) over T positions,
a :class:`~dpkit.grad_sample.contributions.LinearWeightGrad` (Bu, Wang, Zha, Karypis, ICML 2023).
Nothing is unrolled per example (unlike the torch.func fallback, which vmaps the unrolled
recurrence). The fused kernel computes the weight gradient anyway, so book-keeping saves nothing
here: instantiating the (B, G, d) gradients costs one product of that size (B·T·G·d) and makes the
clipped sum a cheap weighted sum, while the ghost norm adds B·T²·(G + d) AND the same-size product
for the clipped sum. The rule therefore instantiates, and takes the ghost norm only when the
instantiated tensor would exceed :attr:`RecurrentRule.instantiate_max_elements` (memory).

Packed-sequence inputs stay on the torch.func fallback (:class:`FunctorchFallback`), whose
interface (capture, batch size, batch axes) this rule inherits.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dpkit.grad_sample.contributions import ExplicitGrad, LinearWeightGrad
from dpkit.grad_sample.functorch_fallback import FunctorchFallback
from dpkit.grad_sample.rnn import cell_step as _step

# exact types: a subclass may override forward with equations this rule does not know
RECURRENT_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


def _bias(module, kind: str, sfx: str):
    b = getattr(module, f"bias_{kind}{sfx}", None)
    return None if b is None else b.detach()


class RecurrentRule(FunctorchFallback):
    """Rule for nn.RNN / nn.LSTM / nn.GRU (any number of layers, uni- or bidirectional,
    ``batch_first`` either way, with or without an initial state): per-example gradients as
    time-summed outer products of the gate pre-activation gradients (see the module docstring).
    A PackedSequence input is handed to the torch.func fallback."""

    path = "rnn"
    # above this many elements of a (B, G, d) per-example weight gradient, use the ghost norm
    instantiate_max_elements = 2 ** 26

    def supports(self, module, captured) -> bool:
        """Whether :meth:`contributions` applies: not a packed input (LSTM projections and
        inter-layer dropout in training are refused at wrap time by ``check_rnn``)."""
        return self.packed_input(module, captured) is None

    def contributions(self, module, captured, grad_outputs):
        """Yield (parameter, contribution) for the module's trainable parameters.

        ``grad_outputs``: the gradient (or None) of each output leaf, (output, h_n[, c_n]), in the
        module's layout.
        """
        args, kwargs = captured
        bound = dict(zip(("input", "hx"), args))
        bound.update(kwargs)
        x, hx = bound["input"], bound.get("hx")
        is_lstm = module.mode == "LSTM"
        dirs = 2 if module.bidirectional else 1
        H = module.hidden_size
        dtype = module.weight_ih_l0.dtype
        gru = module.mode == "GRU"
        with torch.enable_grad():
            layer_input = (x.transpose(0, 1) if module.batch_first else x).to(dtype)  # (T, B, F)
            layer_input = layer_input.detach().requires_grad_()
            T, B = layer_input.shape[:2]
            if hx is None:
                h0 = layer_input.new_zeros(module.num_layers * dirs, B, H)
                c0 = torch.zeros_like(h0) if is_lstm else None
            else:
                h0, c0 = hx if is_lstm else (hx, None)
            h0 = h0.to(dtype).detach().requires_grad_()  # the first step's gh is then in the graph
            c0 = c0.to(dtype) if is_lstm else None
            records, h_n, c_n = [], [], []
            for layer in range(module.num_layers):
                outputs = []
                for d in range(dirs):
                    sfx = f"_l{layer}" + ("_reverse" if d else "")
                    w_ih = getattr(module, f"weight_ih{sfx}").detach()
                    w_hh_t = getattr(module, f"weight_hh{sfx}").detach().T
                    b_ih, b_hh = _bias(module, "ih", sfx), _bias(module, "hh", sfx)
                    if not gru and b_hh is not None:  # gi and gh enter as a sum: fold b_hh into gi
                        b_ih = b_hh if b_ih is None else b_ih + b_hh
                    # (T, B, G): every step at once
                    gi = layer_input @ w_ih.T if b_ih is None else torch.addmm(
                        b_ih, layer_input.flatten(0, 1), w_ih.T).view(T, B, -1)
                    h = h0[layer * dirs + d]
                    c = c0[layer * dirs + d] if is_lstm else None
                    prev, pre, seq = [None] * T, [None] * T, [None] * T
                    for t in (range(T - 1, -1, -1) if d else range(T)):
                        prev[t] = h
                        if gru:  # gh kept apart: r multiplies its n-part
                            pre[t] = h @ w_hh_t if b_hh is None else torch.addmm(b_hh, h, w_hh_t)
                            h, c = _step(module.mode, gi[t], pre[t], h, c)
                        else:  # the whole pre-activation gi_t + gh_t, whose gradient both share
                            pre[t] = torch.addmm(gi[t], h, w_hh_t)
                            h, c = _step(module.mode, pre[t], None, h, c)
                        seq[t] = h
                    outputs.append(torch.stack(seq))
                    h_n.append(h)
                    c_n.append(c)
                    records.append((sfx, layer_input, gi, prev, pre))
                layer_input = torch.cat(outputs, dim=-1) if dirs == 2 else outputs[0]
            produced = [layer_input, torch.stack(h_n)] + ([torch.stack(c_n)] if is_lstm else [])
            g_out = grad_outputs[0]
            wanted = [g_out.transpose(0, 1) if (module.batch_first and g_out is not None) else g_out,
                      *grad_outputs[1:]]
            pairs = [(o, g.to(dtype)) for o, g in zip(produced, wanted) if g is not None]
            # ∂L/∂gh_t (GRU) or ∂L/∂(gi_t + gh_t) for every step; ∂L/∂gi only for GRU
            targets = [t for _, _, _, _, pre in records for t in pre]
            if gru:
                targets += [gi for _, _, gi, _, _ in records]
            grads = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs],
                                        allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]
        d_gh = [torch.stack(grads[i * T:(i + 1) * T]) for i in range(len(records))]  # (T, B, G) each
        d_gi = grads[len(records) * T:] if gru else d_gh  # LSTM/RNN: gi and gh share ∂L/∂(gi + gh)
        for (sfx, inp, _, prev, _), dgi, dgh in zip(records, d_gi, d_gh):
            for kind, a, g in (("ih", inp.detach(), dgi), ("hh", torch.stack(prev).detach(), dgh)):
                weight, bias = getattr(module, f"weight_{kind}{sfx}"), getattr(module, f"bias_{kind}{sfx}", None)
                g = g.transpose(0, 1)  # (B, T, G)
                if weight.requires_grad:
                    ghost = g.shape[0] * weight.numel() > self.instantiate_max_elements
                    yield weight, LinearWeightGrad(a.transpose(0, 1).unsqueeze(1), g.unsqueeze(1), weight.shape,
                                                   ghost=ghost)
                if bias is not None and bias.requires_grad:
                    yield bias, ExplicitGrad(g.sum(dim=1))
