"""LSTM text classifier: non-private vs dpkit (recurrent rule, and the torch.func fallback it
replaces) vs Opacus DPLSTM.

    python benchmarks/lstm.py [--rounds 5] [--batch 64] [--seq 100] [--json]

Model: Embedding 20k × 128 → nn.LSTM(128, 128, batch_first) → Linear(128, 2) on the last hidden
state; batch 64, sequence 100 (issue 17). dpkit trains torch's own nn.LSTM; Opacus needs its
DPLSTM module swapped in (same equations, per-step Linear layers). ``dpkit-bk-fallback`` runs the
same dpkit BK step with the recurrent rule switched off, i.e. the LSTM through the torch.func
fallback (the path before issue 17). All configurations are timed in ONE process, interleaved
round-robin (median of rounds); step-time ratios are against non-private.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
import _harness as H  # noqa: E402

from dpkit.grad_sample.rnn_rule import RecurrentRule  # noqa: E402

CONFIGS = ["non-private", "dpkit-bk", "dpkit-per_sample", "dpkit-bk-fallback", "opacus-hooks", "opacus-ghost"]


class Classifier(nn.Module):
    def __init__(self, lstm_cls=nn.LSTM, vocab=20_000, width=128):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.lstm = lstm_cls(width, width, batch_first=True)
        self.head = nn.Linear(width, 2)

    def forward(self, ids):
        _, (h_n, _) = self.lstm(self.emb(ids))
        return self.head(h_n[-1])


def _dplstm_classifier():
    from opacus.layers import DPLSTM
    return Classifier(DPLSTM)


def _step(config, batch):
    if config == "dpkit-bk-fallback":
        step = H.make_step("dpkit-bk", Classifier, batch, F.cross_entropy)

        def fallback_step():
            with mock.patch.object(RecurrentRule, "supports", lambda self, module, captured: False):
                step()
        return fallback_step
    model_fn = _dplstm_classifier if config.startswith("opacus") else Classifier
    return H.make_step(config, model_fn, batch, F.cross_entropy)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=100)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    batch = (torch.randint(0, 20_000, (args.batch, args.seq)), torch.randint(0, 2, (args.batch,)))
    steps = {}
    for c in args.configs.split(","):
        try:
            steps[c] = _step(c, batch)
            steps[c]()  # warm-up
        except Exception as exc:  # a peer that cannot run this model: report, don't crash
            print(f"  [{c}] unavailable: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
            steps.pop(c, None)
    samples = {c: [] for c in steps}
    for _ in range(args.rounds):
        for c, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            samples[c].append(time.perf_counter() - t0)
    times = {c: statistics.median(v) for c, v in samples.items()}
    spread = {c: (min(v) / times[c], max(v) / times[c]) for c, v in samples.items()}
    H.report(f"LSTM classifier (batch {args.batch}, seq {args.seq})", times, {}, json_out=args.json)
    if not args.json:
        print("run-to-run spread (min/median, max/median): "
              + ", ".join(f"{c} {lo:.2f}–{hi:.2f}" for c, (lo, hi) in spread.items()))


if __name__ == "__main__":
    main()
