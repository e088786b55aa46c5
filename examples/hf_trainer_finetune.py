"""Private fine-tuning with the Hugging Face Trainer: dpkit's DPTrainer on a tiny BERT.

A synthetic sentiment task (no download): each sequence is [CLS] followed by 15 tokens, mostly
neutral words, with a few "positive" or "negative" words that decide its label; a small random-init
BERT learns to classify it. The
DPTrainer Poisson-samples batches of expected size B = per_device_train_batch_size ×
gradient_accumulation_steps, clips every example's gradient, adds the noise once per optimizer step,
and logs ε next to the loss. The same model trained by the plain (non-private) Trainer is shown for
comparison. About half a minute on 2 CPU cores.

    python examples/hf_trainer_finetune.py [--target-epsilon 8] [--epochs 3]
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from dpkit.integrations.trainer import DPTrainer  # noqa: E402

POSITIVE, NEGATIVE, NEUTRAL = range(0, 10), range(10, 20), range(20, 40)
CLS, LENGTH = 40, 16


class Sentiment(torch.utils.data.Dataset):
    """[CLS] + 15 tokens: 3 to 5 words of the label's sentiment (0 negative, 1 positive), the rest neutral."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.labels = torch.as_tensor(rng.integers(0, 2, n), dtype=torch.long)
        ids = rng.integers(NEUTRAL.start, NEUTRAL.stop, (n, LENGTH))
        ids[:, 0] = CLS
        for row, label in zip(ids, self.labels.tolist()):
            words = POSITIVE if label else NEGATIVE
            k = rng.integers(3, 6)
            row[rng.choice(np.arange(1, LENGTH), k, replace=False)] = rng.integers(words.start, words.stop, k)
        self.ids = torch.as_tensor(ids, dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert(seed):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=CLS + 1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def accuracy(trainer, data):
    logits = trainer.predict(data).predictions
    return float((logits.argmax(-1) == data.labels.numpy()).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--clip", type=float, default=1.0, help="per-example clip norm C")
    opts = parser.parse_args()
    hf_logging.set_verbosity_error()

    train, test = Sentiment(2000, seed=0), Sentiment(500, seed=1)

    with tempfile.TemporaryDirectory() as out:
        common = dict(per_device_train_batch_size=32, num_train_epochs=opts.epochs,
                      lr_scheduler_type="constant", report_to="none", use_cpu=True, disable_tqdm=True,
                      save_strategy="no", logging_steps=20, seed=0)
        # logical batch B = 32 × 4 = 128 examples in expectation, read in chunks of at most 32. Noisy
        # gradients want a larger step and a larger Adam epsilon (coordinates that carry only noise
        # then move by less than lr per step).
        args = TrainingArguments(output_dir=os.path.join(out, "dp"), gradient_accumulation_steps=4,
                                 max_grad_norm=0.0, learning_rate=5e-2, adam_epsilon=1e-3, **common)
        trainer = DPTrainer(tiny_bert(0), args, train_dataset=train, max_grad_norm=opts.clip,
                            target_epsilon=opts.target_epsilon, target_delta=opts.delta)
        trainer.train()
        private_acc = accuracy(trainer, test)

        baseline = Trainer(model=tiny_bert(0), train_dataset=train,
                           args=TrainingArguments(output_dir=os.path.join(out, "np"), learning_rate=5e-3,
                                                  **common))
        baseline.train()
        public_acc = accuracy(baseline, test)

    opt = trainer.dp_optimizer
    print(f"non-private test accuracy   {public_acc:.3f}")
    print(f"private test accuracy       {private_acc:.3f}")
    print(f"noise multiplier σ          {opt.noise_multiplier:.4f}  (calibrated for ε={opts.target_epsilon})")
    print(f"ε spent                     {trainer.epsilon():.4f}  at δ={opts.delta} "
          f"(q={trainer.dp_loader.sample_rate:.4f}, {opt.steps} steps, B={trainer.logical_batch_size})")
    print(f"ε in the Trainer's log      {trainer.state.log_history[-1]['epsilon']:.4f}")


if __name__ == "__main__":
    main()
