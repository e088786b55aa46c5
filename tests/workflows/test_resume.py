"""Interrupted-and-resumed training equals the uninterrupted run, in the same and in a new process.

Review found that a resumed run replayed the Poisson sampler (every batch after the resume equal to
the batch 40 steps earlier) and, without ``generator=``, the noise of the first steps. Sampling and
noise are now keyed by (seed, step) and the seed and position travel in ``optimizer.state_dict()``.
"""

import subprocess
import sys

import pytest
import torch

import dpkit
from tests.workflows import resume_script as S


def _run(mode, ckpt, out, *flags, in_process):
    args = [mode, str(ckpt), str(out), *flags]
    if in_process:
        S.main(args)
    else:
        subprocess.run([sys.executable, "-m", "tests.workflows.resume_script", *args], check=True,
                       env={"OMP_NUM_THREADS": "1", "PATH": ""}, cwd=str(_repo_root()))
    return torch.load(out, weights_only=False)


def _repo_root():
    from pathlib import Path
    return Path(__file__).resolve().parents[2]


def _repeats(first, more):
    """How many batches after the resume equal a batch of the first part (same position or any)."""
    seen = {tuple(b) for b in first if b}
    return sum(tuple(b) in seen for b in more if b)


@pytest.mark.parametrize("flags", [(), ("--seed", "7")], ids=["os-entropy", "generator"])
@pytest.mark.parametrize("in_process", [True, False], ids=["same-process", "new-process"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, flags, in_process):
    whole = _run("first", tmp_path / "ck.pt", tmp_path / "whole.pt", *flags, in_process=True)
    resumed = _run("resume", tmp_path / "ck.pt", tmp_path / "resumed.pt", *flags, in_process=in_process)
    assert resumed["more"] == whole["more"]  # same batch sequence after the resume
    for p, q in zip(whole["params"], resumed["params"]):
        assert p.dtype == torch.float64 and torch.equal(p, q)  # bit for bit
    assert resumed["steps"] == whole["steps"] == S.FIRST_STEPS + S.MORE_STEPS
    assert resumed["epsilon"] == whole["epsilon"]
    # the fault that was fixed: Poisson batches of this size (q = 0.05, N = 200) never repeat by chance
    assert _repeats(whole["first"], resumed["more"]) == 0


def test_secure_mode_resume_continues_with_fresh_randomness(tmp_path):
    whole = _run("first", tmp_path / "ck.pt", tmp_path / "whole.pt", "--secure", in_process=True)
    resumed = _run("resume", tmp_path / "ck.pt", tmp_path / "resumed.pt", "--secure", in_process=True)
    assert _repeats(whole["first"], resumed["more"]) == 0
    assert resumed["more"] != whole["more"]  # OS entropy: nothing to replay, nothing reproduced
    assert resumed["steps"] == S.FIRST_STEPS + S.MORE_STEPS


def test_two_secure_runs_with_the_same_global_seed_sample_differently():
    """secure_mode covers the sampler too: a global torch.manual_seed must not fix the coins."""
    runs = []
    for _ in range(2):
        model, opt, loader = S.build(0, None, True)
        runs.append([idx.tolist() for _, _, idx in loader])
    assert _repeats(runs[0], runs[1]) == 0


def test_default_runs_are_not_determined_by_the_global_seed():
    """Without generator= the seed is OS entropy: torch.manual_seed(0) in two scripts must not make
    their noise or batches equal (the old default drew both from torch's global RNG)."""
    runs = []
    for _ in range(2):
        model, opt, loader = S.build(0, None, False)
        runs.append(S.train(model, opt, loader, 3))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert runs[0] != runs[2]
    assert not torch.equal(runs[1][0], runs[3][0])


def test_loader_attached_after_the_load_continues_or_is_refused(tmp_path):
    _run("first", tmp_path / "ck.pt", tmp_path / "whole.pt", "--seed", "3", in_process=True)
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    model, opt, loader = S.build(1, 3, False)
    # a DP loader built by hand and attached AFTER the load picks up the checkpoint's position
    late = dpkit.data.DPDataLoader(loader.dataset, dpkit.data.PoissonBatchSampler(S.N, S.B / S.N, seed=0))
    opt._loader = None
    opt.load_state_dict(ck["opt"])
    late.attach_optimizer(opt)
    assert late.batch_sampler.position == S.FIRST_STEPS
    # no sampler state to restore (e.g. the run sampled its own batches) and a FIXED seed: refused
    opt2 = S.build(1, 3, False)[1]
    opt2._loader = None
    ck["opt"]["dpkit"]["sampler"] = None
    opt2.load_state_dict(ck["opt"])
    seeded = dpkit.data.DPDataLoader(loader.dataset, dpkit.data.PoissonBatchSampler(S.N, S.B / S.N, seed=3))
    with pytest.raises(ValueError, match="replay"):
        seeded.attach_optimizer(opt2)
    # an OS-entropy sampler continues with fresh independent randomness
    dpkit.data.DPDataLoader(loader.dataset, dpkit.data.PoissonBatchSampler(S.N, S.B / S.N)).attach_optimizer(opt2)


def test_checkpoint_without_sampler_state_is_refused_for_a_seeded_loader(tmp_path):
    _run("first", tmp_path / "ck.pt", tmp_path / "whole.pt", "--seed", "3", in_process=True)
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    ck["opt"]["dpkit"]["sampler"] = None
    _, opt, _ = S.build(1, 3, False)
    with pytest.raises(ValueError, match="replay"):
        opt.load_state_dict(ck["opt"])


def test_checkpoint_of_another_sampler_is_refused(tmp_path):
    _run("first", tmp_path / "ck.pt", tmp_path / "whole.pt", in_process=True)
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    ck["opt"]["dpkit"]["sampler"]["sample_rate"] = 0.5
    _, opt, _ = S.build(1, None, False)
    with pytest.raises(ValueError, match="does not match"):
        opt.load_state_dict(ck["opt"])


def test_dicesgd_error_state_travels_in_the_optimizer_checkpoint(tmp_path):
    """DiceSGD's hidden error state is part of optimizer.state_dict(): the resumed run is identical."""
    kw = {"error_feedback": {"clip2": 0.05}}
    model, opt, loader = S.build(0, 5, False, **kw)
    S.train(model, opt, loader, 6)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    S.train(model, opt, loader, 6)
    model2, opt2, loader2 = S.build(1, 5, False, **kw)
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    S.train(model2, opt2, loader2, 6)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # the error state is required: an optimizer built without error feedback refuses the checkpoint
    _, plain, _ = S.build(1, 5, False)
    with pytest.raises(ValueError, match="error_feedback"):
        plain.load_state_dict(ck["opt"])


def test_calibrated_checkpoint_keeps_its_budget_guard_when_resumed_without_a_target(tmp_path):
    kw = dict(noise_multiplier=None, target_epsilon=4.0, target_delta=1e-5, steps=8)
    model, opt, loader = S.build(0, 5, False, **kw)
    S.train(model, opt, loader, 8)
    state = opt.state_dict()
    model2, opt2, _ = S.build(1, 5, False, noise_multiplier=opt.noise_multiplier)  # same σ, no target
    opt2.load_state_dict(state)
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.nn.functional.cross_entropy(model2(x), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(dpkit.PrivacyBudgetExceeded, match="8 steps to reach ε=4.0"):
        opt2.step()
