"""Hugging Face models: non-private PyTorch vs dpkit BK vs dpkit per-sample vs Opacus hooks/ghost.

    python benchmarks/hf.py [--models gpt2,bert,llama,vit,gpt2-lora] [--rounds 5] [--json] [--no-memory]
                            [--json-out results.json]

Random-init models (no download), 2 layers, width 256, batch 8: GPT-2 (vocab 8000, seq 64, LM
head), a BERT-shaped encoder (sequence classification), a Llama-style decoder (grouped-query
attention, rotary positions, RMSNorm), ViT (32×32 images, 4×4 patches) and GPT-2 with LoRA (peft, r=8
on the attention projection). Step-time ratios are measured side by side in one process,
interleaved; peak memory per configuration in a fresh subprocess (see _harness). A peer that cannot
run a model is reported with its error. Run with OMP_NUM_THREADS=1 for the house numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
import _harness as H  # noqa: E402

CONFIGS = ["non-private", "dpkit-bk", "dpkit-per_sample", "opacus-hooks", "opacus-ghost"]
B, T, VOCAB, WIDTH = 8, 64, 8000, 256


def _positions(ids):
    """Per-example position ids (B, T). The models' default, one (1, T) row shared by the batch, is
    split per example by dpkit's engine only when the batch size is declared (dpkit's data loader
    does it); the harness steps without a loader, and Opacus' hooks fail on the shared row, so the
    benchmark passes what the default means, one row per example."""
    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()


class CausalLM(nn.Module):
    """``model(input_ids=ids).logits`` of a causal LM: the training loop computes the loss."""

    def __init__(self, hf, positions=False):
        super().__init__()
        self.hf, self.positions = hf, positions

    def forward(self, ids):
        if self.positions:
            return self.hf(input_ids=ids, position_ids=_positions(ids)).logits
        return self.hf(input_ids=ids).logits


class Classifier(nn.Module):
    """``model(input_ids=ids).logits`` (or ``pixel_values``) of a classification model."""

    def __init__(self, hf, key="input_ids", positions=False):
        super().__init__()
        self.hf, self.key, self.positions = hf, key, positions

    def forward(self, x):
        if self.positions:
            return self.hf(**{self.key: x}, position_ids=_positions(x)).logits
        return self.hf(**{self.key: x}).logits


def _gpt2(lora=False):
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=T,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(config)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=["c_attn"]))
    return CausalLM(model, positions=True)


def _bert():
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=4 * WIDTH,
                                     max_position_embeddings=T, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=2)
    return Classifier(transformers.BertForSequenceClassification(config), positions=True)


def _llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=4 * WIDTH, max_position_embeddings=T,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return CausalLM(transformers.LlamaForCausalLM(config))


def _vit():
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=WIDTH,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=4 * WIDTH, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, num_labels=10)
    return Classifier(transformers.ViTForImageClassification(config), key="pixel_values")


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _tokens():
    return torch.randint(3, VOCAB, (B, T)), torch.randint(3, VOCAB, (B, T))


MODELS = {
    "gpt2": (f"GPT-2 (2 layers, width {WIDTH}, vocab {VOCAB}, seq {T}, batch {B})", _gpt2, _tokens, lm_loss),
    "bert": (f"BERT-shaped classifier (2 layers, width {WIDTH}, seq {T}, batch {B})", _bert,
             lambda: (torch.randint(3, VOCAB, (B, T)), torch.randint(0, 2, (B,))), F.cross_entropy),
    "llama": (f"Llama-style LM (2 layers, width {WIDTH}, GQA 4/2 heads, seq {T}, batch {B})", _llama,
              _tokens, lm_loss),
    "vit": (f"ViT (32×32, 4×4 patches, 2 layers, width {WIDTH}, batch {B})", _vit,
            lambda: (torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,))), F.cross_entropy),
    "gpt2-lora": (f"GPT-2 + LoRA r=8 on c_attn (same GPT-2, batch {B})", lambda: _gpt2(lora=True),
                  _tokens, lm_loss),
}


def memory_probe(config, model_name):
    """Entry point of the per-configuration memory subprocess."""
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    title, model_fn, batch_fn, loss_fn = MODELS[model_name]
    step = H.make_step(config, model_fn, batch_fn(), loss_fn)
    return H.rss_growth_mib(step)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--json-out", help="also write every model's rows to this JSON file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    configs = args.configs.split(",")
    results = {}
    for name in args.models.split(","):
        title, model_fn, batch_fn, loss_fn = MODELS[name]
        torch.manual_seed(0)
        times = H.time_configs(configs, model_fn, batch_fn(), loss_fn, rounds=args.rounds)
        memory = {} if args.no_memory else {c: H.peak_memory_child("hf", c, name) for c in times}
        results[name] = {"model": title, "rows": H.report(title, times, memory, json_out=args.json)}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": H.machine(), "models": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
