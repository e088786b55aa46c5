"""BK benchmark: non-private PyTorch vs dpkit BK vs dpkit per-sample engine vs Opacus hooks/ghost.

    python benchmarks/bk.py [--models lm,cnn] [--rounds 5] [--json] [--no-memory] [--threads N]
                            [--device cpu|cuda]
    python benchmarks/bk.py --models cnn --threads 1 --profile   # where the extra time goes

(a) ``lm``: transformer-like LM, vocab 5000, width 256, 2 blocks (LayerNorm, Linear-projection
attention, MLP), sequence 64, batch 32, tied-free output layer; (b) ``cnn``: small CNN (3 conv +
GroupNorm) on 32×32 images, batch 32; (c) ``resnet18``: ResNet-18 (CIFAR stem: 3×3 conv, no max
pool) with GroupNorm(32) in place of BatchNorm, 32×32, batch 32, built here (torchvision is not
a dependency); a non-private ResNet-18 step takes ≈1 s on one CPU thread, so it runs only when
named: ``--models cnn,resnet18``.

Step times are measured side by side in ONE process, interleaved round-robin; each round's ratio
to the non-private step of the SAME round is reported as median and min–max (the run-to-run
spread). Wall-clock and process CPU time are both recorded: on a shared machine other jobs inflate
wall time, CPU time much less. See _harness for the memory probe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

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


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., CVPR 2016) with GroupNorm instead of BatchNorm."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(32, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(32, cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(32, cout))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet18_gn(num_classes=10):
    """ResNet-18 for 32×32 inputs, GroupNorm(32 groups) after every convolution."""
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.GroupNorm(32, 64), nn.ReLU()]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


MODELS = {
    "lm": ("transformer-like LM (vocab 5000, width 256, seq 64, batch 32)", TinyLM,
           lambda: (torch.randint(0, 5000, (32, 64)), torch.randint(0, 5000, (32, 64))), lm_loss),
    "cnn": ("small CNN (3 conv + GroupNorm, 32×32×3, batch 32)", small_cnn,
            lambda: (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), F.cross_entropy),
    "resnet18": ("ResNet-18 with GroupNorm (32×32×3, batch 32)", resnet18_gn,
                 lambda: (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), F.cross_entropy),
}


def memory_probe(config, model_name):
    """Entry point of the per-configuration memory subprocess."""
    torch.manual_seed(0)
    title, model_fn, batch_fn, loss_fn = MODELS[model_name]
    step = H.make_step(config, model_fn, batch_fn(), loss_fn)
    return H.rss_growth_mib(step)


def on_device(model_fn, batch, device):
    """The model factory and batch moved to ``device``."""
    return (lambda: model_fn().to(device)), tuple(t.to(device) for t in batch)


def time_rounds(configs, model_fn, batch, loss_fn, *, rounds, steps_per_round, warmup=2, device="cpu"):
    """Per-round seconds per step, wall-clock and process CPU time, interleaved round-robin (CUDA:
    each step synchronised, so its time is the device's)."""
    model_fn, batch = on_device(model_fn, batch, device)
    steps = {}
    for c in configs:
        try:
            step = H.make_step(c, model_fn, batch, loss_fn)
            if torch.device(device).type == "cuda":
                step = (lambda s: lambda: (s(), torch.cuda.synchronize()))(step)
            steps[c] = step
            for _ in range(warmup):
                steps[c]()
        except Exception as exc:  # a peer that cannot run this model: report, don't crash
            print(f"  [{c}] unavailable: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
            steps.pop(c, None)
    wall = {c: [] for c in steps}
    cpu = {c: [] for c in steps}
    for _ in range(rounds):
        for c, fn in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                fn()
            wall[c].append((time.perf_counter() - w0) / steps_per_round)
            cpu[c].append((time.process_time() - c0) / steps_per_round)
    return wall, cpu


def summarise(title, wall, cpu, memory, *, json_out):
    """Ratio table (and, with ``json_out``, one JSON line): per-round ratios to the same round's
    non-private step."""
    base_w, base_c = wall.get("non-private"), cpu.get("non-private")
    base_m = memory.get("non-private")
    rows = []
    for c in wall:
        row = {"config": c, "step_ms": 1000 * statistics.median(wall[c]),
               "cpu_ms": 1000 * statistics.median(cpu[c]), "rounds": len(wall[c])}
        for key, times, base in (("time", wall[c], base_w), ("cpu", cpu[c], base_c)):
            ratios = [t / b for t, b in zip(times, base)] if base else []
            row[f"{key}_ratio"] = statistics.median(ratios) if ratios else None
            row[f"{key}_ratio_min"] = min(ratios) if ratios else None
            row[f"{key}_ratio_max"] = max(ratios) if ratios else None
        m = memory.get(c)
        row["peak_mib"] = m
        row["memory_ratio"] = m / base_m if (m is not None and base_m) else None
        rows.append(row)
    print(f"\n{title}  ({H.machine()})")
    print(f"{'configuration':<20}{'step ms':>9}{'× non-private (min–max)':>25}"
          f"{'CPU × (min–max)':>22}{'peak MiB':>10}{'mem ×':>7}")
    for r in rows:
        def ratio(key):
            if r[f"{key}_ratio"] is None:
                return "-"
            return f"{r[f'{key}_ratio']:.2f} ({r[f'{key}_ratio_min']:.2f}–{r[f'{key}_ratio_max']:.2f})"
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        mr = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] else "-"
        print(f"{r['config']:<20}{r['step_ms']:>9.1f}{ratio('time'):>25}{ratio('cpu'):>22}{mem:>10}{mr:>7}")
    if json_out:  # one line, after the table (benchmarks/gpu.sh collects the JSON lines)
        print(json.dumps({"model": title, "machine": H.machine(), "rows": rows}))
    return rows


def profile_ops(model_name, configs=("non-private", "dpkit-bk"), steps=5, top=15):
    """Per-step self time of the heaviest operators in each configuration, side by side (torch
    profiler, CPU): where the private step's extra time goes."""
    title, model_fn, batch_fn, loss_fn = MODELS[model_name]
    torch.manual_seed(0)
    batch = batch_fn()
    per_config = {}
    for c in configs:
        step = H.make_step(c, model_fn, batch, loss_fn)
        for _ in range(2):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        per_config[c] = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
    names = sorted({k for v in per_config.values() for k in v},
                   key=lambda k: -max(v.get(k, 0.0) for v in per_config.values()))[:top]
    print(f"\nper-step self time, ms ({title}; {H.machine()})")
    print(f"{'operator':<44}" + "".join(f"{c:>18}" for c in configs))
    for k in names:
        print(f"{k[:43]:<44}" + "".join(f"{per_config[c].get(k, 0.0):>18.2f}" for c in configs))
    print(f"{'total':<44}" + "".join(f"{sum(per_config[c].values()):>18.2f}" for c in configs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lm,cnn", help="comma-separated, from: lm, cnn, resnet18")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=None,
                    help="steps timed per round (default: 3, 1 for resnet18)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]; memory is measured on CPU only")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="print per-operator self times of non-private vs dpkit-bk instead of timing")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        ap.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available; use --device cpu")
    configs = args.configs.split(",")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    if args.profile:
        for name in args.models.split(","):
            profile_ops(name)
        return {}
    results = {}
    for name in args.models.split(","):
        title, model_fn, batch_fn, loss_fn = MODELS[name]
        torch.manual_seed(0)
        steps = args.steps_per_round or (1 if name == "resnet18" else 3)
        wall, cpu = time_rounds(configs, model_fn, batch_fn(), loss_fn, rounds=args.rounds,
                                steps_per_round=steps, device=device)
        cpu_memory = not args.no_memory and device.type == "cpu"
        memory = {c: H.peak_memory_child("bk", c, name) for c in wall} if cpu_memory else {}
        results[name] = summarise(title, wall, cpu, memory, json_out=args.json)
    return results


if __name__ == "__main__":
    main()
