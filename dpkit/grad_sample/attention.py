"""Book-keeping for nn.MultiheadAttention: its projections become linear views.

``nn.MultiheadAttention`` applies ``in_proj_weight`` (3E × E) and ``out_proj`` functionally, so
hooks on children never fire. In BK mode its forward is replaced by an equivalent one in which

* the q/k/v projections run through :class:`_InProjection`, whose backward keeps the three output
  gradients and returns only input gradients; the per-example gradient of ``in_proj_weight`` is
  then three stacked blocks G_i = [g_qᵀx_q; g_kᵀx_k; g_vᵀx_v] — a :class:`LinearView` with K = 3
  blocks (shorter sequences zero-padded, which adds nothing to any block);
* ``out_proj`` is CALLED as a module, so the ordinary Linear rule (with BK backward) sees it.

Options outside this form (``bias_k``/``bias_v``, ``add_zero_attn``, separate k/v dimensions) keep
the generic torch.func fallback.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpkit.grad_sample.layers import LinearView


def supports_bk_attention(module: nn.Module) -> bool:
    return (type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim
            and module.bias_k is None and not module.add_zero_attn)


class _InProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xq, xk, xv, weight, bias, record):
        ctx.save_for_backward(weight)
        ctx.record = record
        wq, wk, wv = weight.chunk(3)
        bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
        return F.linear(xq, wq, bq), F.linear(xk, wk, bk), F.linear(xv, wv, bv)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        (weight,) = ctx.saved_tensors
        slots = ctx.record[1]
        for i, g in enumerate((gq, gk, gv)):
            if g is not None:
                slots[i] = g.detach() if slots[i] is None else slots[i] + g.detach()
        blocks = weight.chunk(3)
        grads = [None if g is None else g @ w.to(g.dtype) for g, w in zip((gq, gk, gv), blocks)]
        return (grads[0] if ctx.needs_input_grad[0] else None,
                grads[1] if ctx.needs_input_grad[1] else None,
                grads[2] if ctx.needs_input_grad[2] else None, None, None, None)


class AttentionInProjectionRule:
    """Linear view of ``in_proj_weight`` / ``in_proj_bias`` from the captured inputs and grads."""

    weight_name, bias_name = "in_proj_weight", "in_proj_bias"

    def view(self, module, captured, grads) -> LinearView:
        xs = captured
        B = xs[0].shape[0]
        E = module.embed_dim
        zeros = [torch.zeros_like(x[..., :E]) if g is None else g for x, g in zip(xs, grads)]
        T = max(x.shape[1] for x in xs)
        pad = lambda t: F.pad(t, (0, 0, 0, T - t.shape[1]))  # noqa: E731
        a = torch.stack([pad(x) for x in xs], dim=1)  # (B, 3, T, E)
        g = torch.stack([pad(x) for x in zeros], dim=1)  # (B, 3, T, E)
        bias = g.sum(dim=2).reshape(B, -1) if _trainable(module.in_proj_bias) else None
        return LinearView(a, g, module.in_proj_weight.shape, bias)


def _trainable(p) -> bool:
    return isinstance(p, torch.Tensor) and p.requires_grad


def make_bk_attention_forward(module: nn.MultiheadAttention, capture):
    """Forward for ``module`` equivalent to nn.MultiheadAttention.forward (for the supported
    options), recording through ``capture(inputs) -> record`` when the engine captures, else None."""
    original = module.forward

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        record = capture((query.detach(), key.detach(), value.detach()))
        if record is None:  # engine not capturing (eval / no_grad): the module's own forward
            if not module.batch_first:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
            return original(query, key, value, key_padding_mask, need_weights, attn_mask,
                            average_attn_weights, is_causal)
        B, Tq, E = query.shape
        Tk, H = key.shape[1], module.num_heads
        q, k, v = _InProjection.apply(query, key, value, module.in_proj_weight, module.in_proj_bias, record)
        heads = lambda t, T: t.reshape(B, T, H, E // H).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q, Tq), heads(k, Tk), heads(v, Tk)
        mask = _merge_masks(attn_mask, key_padding_mask, B, H, Tq, Tk, q.dtype)
        dropout = module.dropout if module.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / (E // H) ** 0.5
            if is_causal and mask is None:
                mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril().logical_not()
                mask = torch.zeros(Tq, Tk, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout, training=module.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
            weights = None
        out = module.out_proj(out.transpose(1, 2).reshape(B, Tq, E))
        if not module.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    return forward


def _merge_masks(attn_mask, key_padding_mask, B, H, Tq, Tk, dtype):
    """Additive float mask of shape broadcastable to (B, H, Tq, Tk), or None."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        mask = m.reshape(B, H, Tq, Tk) if m.dim() == 3 else m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill(k, float("-inf"))
        k = k.reshape(B, 1, 1, Tk)
        mask = k if mask is None else mask + k
    return mask
