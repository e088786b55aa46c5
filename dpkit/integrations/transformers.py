"""Per-example gradient rules for layers Hugging Face ``transformers`` defines itself.

Imported by :mod:`dpkit.grad_sample.registry` once the user has imported ``transformers``; dpkit
never imports ``transformers`` on its own (``pip install dpkit[hf]`` installs it).

* ``transformers.pytorch_utils.Conv1D`` (GPT, GPT-2): ``y = x @ W + b`` with ``W`` of shape
  (in, out), a linear layer with a transposed weight. Its per-example gradient
  ``G_i = Σ_t x_{i,t}ᵀ ḡ_{i,t}`` (in × out) is a linear view, so book-keeping applies: ghost norm or
  instantiation chosen per input shape, clipped sum by one extra matrix product (Bu, Wang, Zha,
  Karypis, ICML 2023, Sec. 3; the ghost norm of Li, Tramèr, Liang, Hashimoto, ICLR 2022). In BK
  mode its backward returns only the input gradient: the discarded non-private weight-gradient
  product is skipped, as for nn.Linear (:mod:`dpkit.grad_sample.bk_forward`).
* RMSNorm-style layers that model families define themselves (LlamaRMSNorm, MistralRMSNorm,
  Qwen2RMSNorm, GemmaRMSNorm with its ``(1 + weight)`` scale, T5LayerNorm, ...): the output is
  element-wise affine in the weight, ``y = s(x) ⊙ w + r(x)``, so the per-example weight gradient is
  ``Σ_positions ḡ ⊙ s(x)`` with ``s(x) = y(w=1) − y(w=0)`` taken from the layer's OWN forward (its
  dtype casts included). Without these rules the layers take the generic torch.func fallback.

* Batch axis: the model families below are registered batch-first
  (:func:`dpkit.grad_sample.registry.register_batch_first`). Their API takes (batch, seq) inputs
  and their code keeps the batch on axis 0 of every hidden state, so the engine reads every
  position-wise layer's batch on axis 0 — a batch with as many examples as tokens (B == T) is
  clipped exactly from the first step, without ``batch_first=True``. Only families whose code was
  checked (and whose B == T step is tested against the batch-of-1 reference) are listed: some
  older families (XLNet, Transfo-XL, FSMT) transpose to time-major internally.

* ``T5Attention``'s relative position bias: looked up with (q, k) bucket ids and broadcast over
  the batch, so its table's gradient is the sum over examples. While the engine records a step,
  the bias is computed per example instead (ids expanded to (B, q, k)), exactly the same values;
  the embedding rule then clips the table per example
  (:func:`dpkit.grad_sample.registry.register_per_example_inputs`).

Classes are matched by their qualified name (module path + class name), so no model family's code
is imported here; a class absent from the installed version simply never matches.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dpkit.errors import UnsupportedModuleError
from dpkit.grad_sample.bk_forward import register_bk_forward, store_grad
from dpkit.grad_sample.layers import LinearView, LinearViewRule, PerSampleRule
from dpkit.grad_sample.registry import register_batch_first, register_per_example_inputs, register_rule


class Conv1DRule(LinearViewRule):
    """``transformers`` Conv1D on inputs of shape (B, *, in): every non-batch position is a token.

    The weight is (in, out), the transpose of nn.Linear's, so the view's roles are swapped:
    ``G_i = Σ_t a_tᵀ ḡ_t`` is built as a :class:`LinearView` whose "output" side is the activation.
    The ghost norm ‖G_i‖² = ⟨a_i a_iᵀ, ḡ_i ḡ_iᵀ⟩ is symmetric in the two roles.
    """

    def view(self, module, activation, grad_output):
        B = activation.shape[0]
        a = activation.reshape(B, 1, -1, activation.shape[-1])
        g = grad_output.reshape(B, 1, -1, grad_output.shape[-1])
        bias = g.sum(dim=2).reshape(B, -1) if _trainable(module.bias) else None
        return LinearView(a=g, g=a, weight_shape=module.weight.shape, bias_grad=bias)


class _Conv1DBK(torch.autograd.Function):
    """y = x @ W + b whose backward keeps ḡ for the engine and returns only ḡ Wᵀ."""

    @staticmethod
    def forward(ctx, x, weight, bias, record):
        ctx.save_for_backward(weight)
        ctx.record, ctx.x_dtype = record, x.dtype
        return F.linear(x, weight.t(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        store_grad(ctx.record, grad_out)
        grad_x = None
        if ctx.needs_input_grad[0]:  # under autocast the output gradient may be bf16/fp16
            grad_x = (grad_out @ weight.t().to(grad_out.dtype)).to(ctx.x_dtype)
        return grad_x, None, None, None


def _conv1d_bk(module, x, record):
    return _Conv1DBK.apply(x, module.weight, module.bias, record)


class ElementwiseScaleRule(PerSampleRule):
    """Layers ``y = s(x) ⊙ w + r(x)`` with one parameter ``weight`` over the trailing axes
    (RMSNorm variants, with or without Gemma's ``1 + weight``)."""

    def per_sample_grads(self, module, x, grad_output):
        w = module.weight
        out = {}
        if not w.requires_grad:
            return out
        with torch.no_grad():
            ones = functional_call(module, {"weight": torch.ones_like(w)}, (x,))
            zeros = functional_call(module, {"weight": torch.zeros_like(w)}, (x,))
        slope = (ones - zeros).to(grad_output.dtype)
        positions = tuple(range(1, x.dim() - w.dim()))
        out["weight"] = (grad_output * slope).sum(dim=positions).reshape(x.shape[0], *w.shape)
        return out


def _t5_per_example_position_bias(module, args, kwargs):
    """T5Attention with a relative-attention-bias table (first self-attention of each stack):
    its (1, heads, q, k) position bias, looked up with (q, k) bucket ids and broadcast over the
    batch, is computed instead with the ids expanded to (B, q, k), giving a (B, heads, q, k) bias
    of the same values (the attention scores are (B, heads, q, k) already). Example i's gradient
    then reaches the table as row i, and the embedding rule clips it exactly. Passed to the
    module as ``position_bias``; later layers reuse it as they reuse the module's own.

    Raises:
        UnsupportedModuleError: the table trains during incremental decoding (a cache holding
            earlier positions), which this per-example bias does not reproduce.
    """
    table = module.relative_attention_bias if module.has_relative_attention_bias else None
    if table is None or not table.weight.requires_grad:
        return None
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    arguments = {**bound.arguments, **bound.arguments.get("kwargs", {})}
    if arguments.get("position_bias") is not None or arguments.get("key_value_states") is not None:
        return None  # the table is not used by this call
    cache = arguments.get("cache", arguments.get("past_key_values"))
    if cache is not None and cache.get_seq_length(module.layer_idx) != 0:
        raise UnsupportedModuleError(
            f"{type(module).__name__}: its relative_attention_bias trains during incremental decoding "
            "(a cache holding earlier positions); dpkit clips it per example only for a full forward "
            "pass. Decode under torch.no_grad(), or freeze relative_attention_bias.")
    hidden = arguments["hidden_states"]
    B, T = hidden.shape[0], hidden.shape[1]
    position = torch.arange(T, dtype=torch.long, device=hidden.device)
    buckets = module._relative_position_bucket(
        position[None, :] - position[:, None], bidirectional=not module.is_decoder,
        num_buckets=module.relative_attention_num_buckets,
        max_distance=module.relative_attention_max_distance)
    bound.arguments["position_bias"] = table(buckets.expand(B, T, T)).permute(0, 3, 1, 2)  # (B, heads, q, k)
    return bound.args[1:], bound.kwargs


def _trainable(p) -> bool:
    return isinstance(p, torch.Tensor) and p.requires_grad


_MODELS = "transformers.models"
# (model family, class) whose forward is element-wise affine in `weight` (checked against the
# batch-of-1 reference in tests/integrations/test_hf_rules.py)
ELEMENTWISE_SCALE_CLASSES = tuple(f"{_MODELS}.{family}.modeling_{family}.{cls}" for family, cls in (
    ("llama", "LlamaRMSNorm"),
    ("mistral", "MistralRMSNorm"),
    ("mixtral", "MixtralRMSNorm"),
    ("qwen2", "Qwen2RMSNorm"),
    ("qwen2_moe", "Qwen2MoeRMSNorm"),
    ("qwen3", "Qwen3RMSNorm"),
    ("qwen3_moe", "Qwen3MoeRMSNorm"),
    ("phi3", "Phi3RMSNorm"),
    ("gemma", "GemmaRMSNorm"),
    ("gemma2", "Gemma2RMSNorm"),
    ("gemma3", "Gemma3RMSNorm"),
    ("olmo2", "Olmo2RMSNorm"),
    ("granite", "GraniteRMSNorm"),
    ("smollm3", "SmolLM3RMSNorm"),
    ("t5", "T5LayerNorm"),
    ("mt5", "MT5LayerNorm"),
))
CONV1D_CLASS = "transformers.pytorch_utils.Conv1D"
# base classes of model families that keep the batch on axis 0 of every hidden state
BATCH_FIRST_CLASSES = tuple(f"{_MODELS}.{family}.modeling_{family}.{cls}" for family, cls in (
    ("gpt2", "GPT2PreTrainedModel"),
    ("bert", "BertPreTrainedModel"),
    ("distilbert", "DistilBertPreTrainedModel"),
    ("roberta", "RobertaPreTrainedModel"),
    ("t5", "T5PreTrainedModel"),
    ("vit", "ViTPreTrainedModel"),
    ("llama", "LlamaPreTrainedModel"),
    ("mistral", "MistralPreTrainedModel"),
))

register_rule(CONV1D_CLASS, Conv1DRule())
register_bk_forward(CONV1D_CLASS, _conv1d_bk)
for _name in ELEMENTWISE_SCALE_CLASSES:
    register_rule(_name, ElementwiseScaleRule())
for _name in BATCH_FIRST_CLASSES:
    register_batch_first(_name)
T5_ATTENTION_CLASS = f"{_MODELS}.t5.modeling_t5.T5Attention"
register_per_example_inputs(T5_ATTENTION_CLASS, _t5_per_example_position_bias)
