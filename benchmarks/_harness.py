"""Side-by-side step-time and memory harness shared by the benchmark scripts.

Each configuration (non-private PyTorch, dpkit engines, Opacus modes) trains the SAME model
architecture on the SAME batch. Step times are measured in ONE process, interleaved round-robin
over the configurations (median of rounds), so machine noise hits all of them alike. Peak memory is
measured per configuration in a fresh subprocess as the growth of the resident-set high-water mark
(VmHWM, reset via /proc/self/clear_refs after a warm-up step) over the RSS right before the timed
steps — what the training steps add on top of the model; ratios are taken against the non-private
run.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


def machine() -> str:
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.processor() or platform.machine()}, {threads} torch threads, {device}, torch {torch.__version__}"


def make_step(config: str, model_fn, batch, loss_fn, lr=1e-3):
    """Build (step_fn, model) for one configuration; step_fn runs one training step on ``batch``."""
    torch.manual_seed(0)
    model = model_fn()
    x, y = batch
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    B = x.shape[0]
    if config == "non-private":
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
        return step
    if config.startswith("dpkit"):
        import dpkit
        mode = config.split("-", 1)[1]
        _, dp_opt, _ = dpkit.make_private(model, optimizer, None, noise_multiplier=1.0, max_grad_norm=1.0,
                                          sample_rate=0.01, expected_batch_size=B, clipping=mode)

        def step():
            dp_opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            dp_opt.step()
        return step
    if config.startswith("opacus"):
        import warnings

        from opacus import PrivacyEngine
        warnings.filterwarnings("ignore")
        mode = config.split("-", 1)[1]
        loader = DataLoader(TensorDataset(x, y), batch_size=B)
        engine = PrivacyEngine(accountant="prv")
        criterion = _OpacusLoss(loss_fn)
        out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                  criterion=criterion, noise_multiplier=1.0, max_grad_norm=1.0,
                                  grad_sample_mode=mode, poisson_sampling=False)
        if mode == "ghost":  # ghost mode also returns a criterion that runs the two passes
            gs_model, dp_opt, crit = out[0], out[1], out[2]
        else:
            gs_model, dp_opt, crit = out[0], out[1], loss_fn

        def step():
            dp_opt.zero_grad(set_to_none=True)
            loss = crit(gs_model(x), y)
            loss.backward()
            dp_opt.step()
        return step
    raise ValueError(f"unknown configuration {config!r}")


class _OpacusLoss(nn.Module):
    """Opacus' ghost mode wraps an nn.Module criterion; adapt a plain loss function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.reduction = "mean"

    def forward(self, out, y):
        return self.fn(out, y)


def time_configs(configs, model_fn, batch, loss_fn, *, warmup=2, rounds=5, steps_per_round=3):
    """Median seconds per step of each configuration, interleaved round-robin in this process."""
    steps = {}
    for c in configs:
        try:
            steps[c] = make_step(c, model_fn, batch, loss_fn)
            for _ in range(warmup):
                steps[c]()
        except Exception as exc:  # a peer that cannot run this model: report, don't crash
            print(f"  [{c}] unavailable: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
            steps.pop(c, None)
    samples = {c: [] for c in steps}
    for _ in range(rounds):
        for c, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                fn()
            samples[c].append((time.perf_counter() - t0) / steps_per_round)
    return {c: statistics.median(v) for c, v in samples.items()}


def peak_memory_child(script: str, config: str, model_name: str) -> float | None:
    """Peak RSS growth (MiB) of ``config`` training ``model_name``, measured in a fresh process."""
    code = (f"import sys; sys.path.insert(0, 'benchmarks'); import {script} as s; "
            f"print(s.memory_probe({config!r}, {model_name!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return float(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def status_kib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak() -> bool:
    """Reset the resident-set high-water mark (VmHWM) to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0
        return True
    except OSError:
        return False


def rss_growth_mib(step, steps=3) -> float | None:
    """Run ``step`` a few times; growth of the resident-set high-water mark over the RSS before
    the first timed step, MiB (set-up and imports are not counted); None if the mark cannot be
    reset."""
    step()  # warm-up: lazily created buffers and allocator pools are part of the steady state
    if not reset_peak():
        return None
    before = status_kib("VmRSS")
    for _ in range(steps):
        step()
    return max(status_kib("VmHWM") - before, 0) / 1024


def report(title, times, memory, *, json_out=False):
    """Print a ratio table (and JSON) for one model."""
    base_t = times.get("non-private")
    base_m = memory.get("non-private")
    rows = []
    for c, t in times.items():
        m = memory.get(c)
        rows.append({
            "config": c, "step_ms": 1000 * t,
            "time_ratio": t / base_t if base_t else None,
            "peak_mib": m, "memory_ratio": (m / base_m) if (m is not None and base_m) else None,
        })
    if json_out:
        print(json.dumps({"model": title, "machine": machine(), "rows": rows}))
        return rows
    print(f"\n{title}  ({machine()})")
    print(f"{'configuration':<22}{'step ms':>10}{'× non-private':>16}{'peak MiB':>11}{'mem ×':>8}")
    for r in rows:
        tr = f"{r['time_ratio']:.2f}" if r["time_ratio"] else "-"
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        mr = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] else "-"
        print(f"{r['config']:<22}{r['step_ms']:>10.1f}{tr:>16}{mem:>11}{mr:>8}")
    return rows
