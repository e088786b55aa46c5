"""BK benchmark: non-private PyTorch vs dpkit BK vs dpkit per-sample engine vs Opacus hooks/ghost.

    python benchmarks/bk.py [--models lm,cnn] [--rounds 5] [--json] [--no-memory]

(a) transformer-like LM: vocab 5000, width 256, 2 blocks (LayerNorm, Linear-projection attention,
MLP), sequence 64, batch 32, tied-free output layer; (b) small CNN (GroupNorm) on 32×32 images,
batch 64. Step time ratios are measured side by side in one process; see _harness for memory.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
import _harness as H  # noqa: E402

CONFIGS = ["non-private", "dpkit-bk", "dpkit-per_sample", "opacus-hooks", "opacus-ghost"]


class Block(nn.Module):
    """Pre-norm transformer block with attention projections as nn.Linear (GPT-2 style)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        B, T, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, W))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=5000, width=256, seq=64, depth=2, heads=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids):
        # .contiguous(): Opacus 1.6 ghost mode fails on expanded (strided) embedding indices
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(pos))))


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


MODELS = {
    "lm": ("transformer-like LM (vocab 5000, width 256, seq 64, batch 32)", TinyLM,
           lambda: (torch.randint(0, 5000, (32, 64)), torch.randint(0, 5000, (32, 64))), lm_loss),
    "cnn": ("small CNN (32×32×3, GroupNorm, batch 64)", small_cnn,
            lambda: (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))), F.cross_entropy),
}


def memory_probe(config, model_name):
    """Entry point of the per-configuration memory subprocess."""
    torch.manual_seed(0)
    title, model_fn, batch_fn, loss_fn = MODELS[model_name]
    step = H.make_step(config, model_fn, batch_fn(), loss_fn)
    return H.rss_growth_mib(step)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lm,cnn")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    configs = args.configs.split(",")
    results = {}
    for name in args.models.split(","):
        title, model_fn, batch_fn, loss_fn = MODELS[name]
        torch.manual_seed(0)
        times = H.time_configs(configs, model_fn, batch_fn(), loss_fn, rounds=args.rounds)
        memory = {} if args.no_memory else {c: H.peak_memory_child("bk", c, name) for c in times}
        results[name] = H.report(title, times, memory, json_out=args.json)
    return results


if __name__ == "__main__":
    main()
