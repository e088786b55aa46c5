"""Hugging Face models, called the default way, clip exactly: the per-example clipped gradient sum
(σ=0, clip norm below the median per-example norm so clipping is active) of every trainable
parameter equals the float64 batch-of-1 reference, for full fine-tuning and LoRA (peft), with both
engines. Tiny random-init configs (2 layers, width 32, vocabulary 100, 8 tokens, batch 4).

``python -m tests.integrations.test_hf_conformance`` writes the exactness table to docs/models.md.
"""

import functools
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from dpkit.grad_sample import GradientEngine  # noqa: E402
from tests.grad_sample.reference import clipped_sum, per_example_grads  # noqa: E402

B, T, VOCAB, WIDTH = 4, 8, 100, 32
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_BERT = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=16, **_NO_DROPOUT)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _text(cls_name, config, labels="tokens"):
    """Builder for a text model: (model, inputs, loss of a batch) with default-call inputs."""
    def build():
        model = getattr(transformers, cls_name)(config())
        ids = torch.randint(3, VOCAB, (B, T))
        y = ids if labels == "tokens" else torch.randint(0, 2, (B,))
        return model, (ids, y), lambda m, inp: m(input_ids=inp[0], labels=inp[1]).loss
    return build


def _vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=WIDTH,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    num_labels=3, **_NO_DROPOUT)
    model = transformers.ViTForImageClassification(config)
    x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 3, (B,))
    return model, (x, y), lambda m, inp: m(pixel_values=inp[0], labels=inp[1]).loss


MODELS = {
    "gpt2": (_text("GPT2LMHeadModel", lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)), ["c_attn"]),
    "bert": (_text("BertForSequenceClassification", lambda: transformers.BertConfig(**_BERT),
                   labels="class"), ["query", "value"]),
    "distilbert": (_text("DistilBertForSequenceClassification", lambda: transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=WIDTH, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=16,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0), labels="class"),
        ["q_lin", "v_lin"]),
    "roberta": (_text("RobertaForSequenceClassification", lambda: transformers.RobertaConfig(
        **{**_BERT, "max_position_embeddings": 16 + 2}, pad_token_id=1), labels="class"),
        ["query", "value"]),
    "t5": (_text("T5ForConditionalGeneration", lambda: transformers.T5Config(
        vocab_size=VOCAB, d_model=WIDTH, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
        ["q", "v"]),
    "vit": (_vit, ["q_proj", "v_proj"]),
    "llama": (_text("LlamaForCausalLM", lambda: transformers.LlamaConfig(**_LLAMA)), ["q_proj", "v_proj"]),
    "mistral": (_text("MistralForCausalLM", lambda: transformers.MistralConfig(**_LLAMA, sliding_window=4)),
                ["q_proj", "v_proj"]),
}


@functools.lru_cache(maxsize=None)
def _case(name, variant):
    """(model, inputs, loss, clip, expected clipped sums by parameter id), float64, seeded."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        build, lora_targets = MODELS[name]
        model, inputs, loss = build()
        model = model.to(torch.float64).train()
        if variant == "lora":
            config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_targets)
            model = peft.get_peft_model(model, config)
            with torch.no_grad():  # LoRA starts with B = 0: give the adapters some weight
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
        ref = per_example_grads(model, inputs, loss)
        norms = torch.sqrt(sum(g.reshape(B, -1).pow(2).sum(1) for g in ref.values()))
        clip = 0.5 * norms.median().item()
        return model, inputs, loss, clip, clipped_sum(ref, clip)
    finally:
        torch.set_default_dtype(previous)


def max_relative_error(name, variant, mode):
    """max over trainable parameters of ‖engine sum − reference sum‖ / ‖reference sum‖; a parameter
    whose reference is (numerically) zero, e.g. a key bias (softmax ignores it), is measured against
    10⁻⁶ of the whole clipped sum's norm instead."""
    model, inputs, loss, clip, expected = _case(name, variant)
    total = torch.sqrt(sum(v.pow(2).sum() for v in expected.values())).item()
    engine = GradientEngine(model, max_grad_norm=clip, mode=mode, loss_reduction="mean")
    try:
        engine.expect_batch(B)  # what dpkit's data loader declares before yielding each batch
        model.zero_grad(set_to_none=True)
        loss(model, inputs).backward()  # the batch's mean loss, as a training loop computes it
        assert engine.accumulate() == B
        worst = 0.0
        for p in model.parameters():
            if p.requires_grad:
                want, got = expected[id(p)], engine.clipped_sum(p)
                worst = max(worst, (got - want).norm().item() / max(want.norm().item(), 1e-6 * total))
        return worst
    finally:
        engine.detach()
        model.zero_grad(set_to_none=True)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TESTED = [(name, variant) for name in sorted(MODELS) for variant in ("full", "lora")]


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("name,variant", TESTED)
def test_clipped_sum_matches_batch_of_one_reference(name, variant, mode):
    assert max_relative_error(name, variant, mode) <= 1e-8


@pytest.mark.parametrize("name,mode", [("gpt2", "bk"), ("gpt2", "per_sample"), ("bert", "bk")])
def test_first_batch_with_as_many_examples_as_tokens_trains_exactly(name, mode):
    """make_private with dpkit's loader, no batch_first declaration, and a first batch of
    B == T == 8 sequences: the model family is registered batch-first, so every position-wise
    layer's (8, 8, d) tensors are read on axis 0 (the SGD step with σ = 0 equals the reference)."""
    import copy

    import dpkit
    from torch.utils.data import DataLoader, TensorDataset

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        model, _, loss = MODELS[name][0]()
        model = model.to(torch.float64).train()
        ids = torch.randint(3, VOCAB, (16, T))
        labels = ids if name == "gpt2" else torch.randint(0, 2, (16,))
        before = copy.deepcopy(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model, optimizer, loader = dpkit.make_private(
            model, optimizer, DataLoader(TensorDataset(ids, labels), batch_size=T), max_grad_norm=0.05,
            noise_multiplier=0.0, poisson_sampling=False, accountant="rdp", clipping=mode)
        batch = next(iter(loader))
        assert batch[0].shape == (T, T)
        optimizer.zero_grad()
        loss(model, batch).backward()
        optimizer.step()
        expected = clipped_sum(per_example_grads(before, tuple(batch), loss), 0.05)
        total = torch.sqrt(sum(v.pow(2).sum() for v in expected.values())).item()
        for p0, p1 in zip(before.parameters(), model.parameters()):
            want = -expected[id(p0)] / T  # SGD, lr 1, the clipped sum over the expected batch size
            assert (p1.detach() - p0.detach() - want).norm().item() <= 1e-8 * max(want.norm().item(), total)
        optimizer.engine.detach()
    finally:
        torch.set_default_dtype(previous)


def test_t5_relative_bias_training_during_incremental_decoding_is_refused():
    from dpkit.errors import UnsupportedModuleError

    torch.manual_seed(2)
    model, (ids, _), _ = MODELS["t5"][0]()
    engine = GradientEngine(model, max_grad_norm=1.0)
    try:
        first = model(input_ids=ids, decoder_input_ids=ids[:, :3], use_cache=True)
        with pytest.raises(UnsupportedModuleError, match="relative_attention_bias trains during incremental"):
            model(input_ids=ids, decoder_input_ids=ids[:, 3:4], past_key_values=first.past_key_values)
        with torch.no_grad():  # decoding without gradients records nothing and is left alone
            model(input_ids=ids, decoder_input_ids=ids[:, 3:4], past_key_values=first.past_key_values)
    finally:
        engine.detach()


COST_SECTION = "## Cost"


def write_table(path):
    """Run every case and write the exactness table (markdown) to ``path``."""
    lines = ["# Models checked for exact per-example clipping", "",
             "Generated by `python -m tests.integrations.test_hf_conformance` (transformers "
             f"{transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}).",
             "Tiny random-init configs (2 layers, width 32, vocabulary 100, 8 tokens or an 8×8 image, "
             "batch 4), float64, the model called the default way (`model(input_ids=..., labels=...)`). "
             "Entry: max over trainable parameters of ‖dpkit clipped sum − reference‖ / ‖reference‖, "
             "the reference being a loop of batch-of-1 backward passes clipped with the same C "
             "(half the median per-example norm, so clipping is active).", "",
             "| model | full, bk | full, per_sample | LoRA, bk | LoRA, per_sample |",
             "| --- | --- | --- | --- | --- |"]
    for name in sorted(MODELS):
        cells = []
        for variant in ("full", "lora"):
            for mode in ("bk", "per_sample"):
                try:
                    cells.append(f"{max_relative_error(name, variant, mode):.1e}")
                except Exception as e:  # noqa: BLE001 - the table reports failures as they are
                    cells.append(f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    from dpkit.integrations.transformers import (
        BATCH_FIRST_CLASSES, CONV1D_CLASS, ELEMENTWISE_SCALE_CLASSES, T5_ATTENTION_CLASS)

    lines += ["", "## Native rules for layers transformers defines itself", "",
              "Registered by `dpkit.integrations.transformers` once `transformers` is imported "
              "(`pip install dpkit[hf]`); without them these layers take the slower torch.func fallback.", "",
              f"- `{CONV1D_CLASS}` (GPT, GPT-2): a linear view with a transposed weight; book-keeping "
              "chooses the ghost norm or instantiation per input shape, like `nn.Linear`.",
              "- element-wise-scale norms (output affine in `weight`, per-example gradient "
              "Σ_positions ḡ ⊙ (y(w=1) − y(w=0))): " + ", ".join(
                  f"`{c.rsplit('.', 1)[1]}`" for c in ELEMENTWISE_SCALE_CLASSES) + ".",
              f"- `{T5_ATTENTION_CLASS.rsplit('.', 1)[1]}` (T5 full fine-tuning): the relative position "
              "bias, looked up with (q, k) ids and broadcast over the batch, is computed per example "
              "(ids expanded to (B, q, k), the same values) while dpkit records a step, so the bias "
              "table is clipped per example.",
              "- Batch axis: models of these families keep the batch on axis 0 of every hidden state "
              "and are registered batch-first, so a batch with as many examples as tokens (B == T) is "
              "clipped exactly from the first step without `make_private(batch_first=True)` (tested "
              "for GPT-2 and BERT): " + ", ".join(f"`{c.rsplit('.', 1)[1]}`" for c in BATCH_FIRST_CLASSES)
              + ". Other families need `batch_first=True` only when such a batch comes before one "
              "that proves the layout.",
              "", "Models with a `fails:` entry are listed in the report of the engine work they wait "
              "for; they are not in the test parametrisation until they pass."]
    text = "\n".join(lines) + "\n"
    if os.path.exists(path):  # the measured-cost section (benchmarks/hf.py) is kept as written
        with open(path) as f:
            old = f.read()
        if COST_SECTION in old:
            text += "\n" + old[old.index(COST_SECTION):]
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_table(sys.argv[1] if len(sys.argv) > 1 else os.path.join("docs", "models.md"))
