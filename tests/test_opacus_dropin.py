"""dpkit.opacus: Opacus scripts run on dpkit by changing only their imports.

References: ε from ``dp_accounting`` called directly (PLD / RDP) for the steps that ran; Opacus 1.6
itself running the same script (import swapped back) or the same fixed batch side by side.
"""

import copy
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dp_accounting import dp_event, pld, rdp
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.accountants.rdp import DEFAULT_ORDERS
from dpkit.opacus import BatchMemoryManager, PrivacyEngine
from dpkit.opacus.utils.batch_memory_manager import BatchMemoryManager as BatchMemoryManagerOpacusPath

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "opacus_style"
DELTA = 1e-5
# dpkit's "prv" reports prv_accountant's upper bound with eps_error 0.05, Opacus' with 0.01
PRV_ERROR_GAP = 0.05


def _dpsgd(sigma, q, steps):
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def pld_epsilon(sigma, q, steps, delta=DELTA):
    accountant = pld.PLDAccountant()
    accountant.compose(_dpsgd(sigma, q, steps))
    return accountant.get_epsilon(delta)


def rdp_epsilon(sigma, q, steps, delta=DELTA):
    accountant = rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
    accountant.compose(_dpsgd(sigma, q, steps))
    return accountant.get_epsilon(delta)


def run_script(name, backend, **kwargs):
    """Run examples/opacus_style/<name>.py with dpkit, or with Opacus after swapping ONLY its imports."""
    path = EXAMPLES / f"{name}.py"
    source = path.read_text()
    if backend == "opacus":
        swapped = (source.replace("from dpkit.opacus.utils.batch_memory_manager import",
                                  "from opacus.utils.batch_memory_manager import")
                   .replace("from dpkit.opacus import", "from opacus import"))
        changed = [(a, b) for a, b in zip(source.splitlines(), swapped.splitlines()) if a != b]
        assert changed and all(a.startswith("from dpkit.opacus") for a, _ in changed)
        assert not any(line.startswith(("from dpkit", "import dpkit")) for line in swapped.splitlines())
        source = swapped
    module = types.ModuleType(f"opacus_style_{name}_{backend}")
    module.__file__ = str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG notice, dpkit's seeded-generator notice
        exec(compile(source, str(path), "exec"), module.__dict__)
        return module.main(verbose=False, **kwargs)


# ------------------------------------------------------------------ the scripts, dpkit vs Opacus
def test_cnn_digits_make_private_with_epsilon():
    ours = run_script("cnn_digits", "dpkit", epochs=1)
    theirs = run_script("cnn_digits", "opacus", epochs=1)
    q, steps = 64 / 1792, 28                          # B divides N: Opacus' q = 1/len(loader) is the same
    assert ours["steps"] == theirs["steps"] == steps
    sigma = ours["noise_multiplier"]
    # the "prv" account of the run that ran is an upper bound close to the exact PLD ε
    exact = pld_epsilon(sigma, q, steps)
    assert exact <= ours["epsilon"] <= exact + PRV_ERROR_GAP + 0.02
    # calibrated for the planned run: ≤ the target, not far below it
    assert 2.9 <= ours["epsilon"] <= 3.0 and exact <= 3.0
    # same script on Opacus: its ε is within the accountants' error gap; dpkit adds at least as much noise
    assert ours["epsilon"] <= theirs["epsilon"] + PRV_ERROR_GAP
    assert theirs["noise_multiplier"] <= sigma <= 1.02 * theirs["noise_multiplier"]
    assert ours["loss_after"] < 0.85 * ours["loss_before"]      # one epoch: 2.31 -> about 1.6
    assert theirs["loss_after"] < 0.85 * theirs["loss_before"]


def test_text_embedding_rdp_accountant():
    ours = run_script("text_embedding", "dpkit", epochs=2)
    theirs = run_script("text_embedding", "opacus", epochs=2)
    q, steps = ours["sample_rate"], 2 * 16
    assert ours["steps"] == theirs["steps"] == steps
    assert ours["history"] == [(1.0, q, steps)]
    assert ours["epsilon"] == pytest.approx(rdp_epsilon(1.0, q, steps), rel=1e-9)
    assert ours["epsilon"] <= theirs["epsilon"] * (1 + 1e-3)   # dp_accounting's RDP vs Opacus' RDP
    assert ours["loss_after"] < 0.9 * ours["loss_before"]


def test_batch_memory_manager_noise_once_per_logical_batch():
    ours = run_script("memory_manager_digits", "dpkit", epochs=2)
    theirs = run_script("memory_manager_digits", "opacus", epochs=2)
    q, steps = 256 / 1792, 2 * 7
    assert ours["logical_steps"] == steps
    assert ours["largest_physical_batch"] <= 64 and ours["physical_batches"] >= 3 * steps
    exact = pld_epsilon(1.0, q, steps)
    assert exact <= ours["epsilon"] <= exact + PRV_ERROR_GAP + 0.02
    assert ours["epsilon"] <= theirs["epsilon"] + PRV_ERROR_GAP
    assert ours["loss_after"] < 0.7 * ours["loss_before"]


# ------------------------------------------------------------------ same batch, same update as Opacus
def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(n=64):
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _one_step(engine, model, x, y, *, criterion=None, **kwargs):
    loader = DataLoader(TensorDataset(*_data()), batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                  noise_multiplier=0.0, **kwargs)
    model, optimizer = out[0], out[1]
    loss_fn = out[2] if kwargs.get("grad_sample_mode") == "ghost" else nn.CrossEntropyLoss()
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()
    module = model._module if hasattr(model, "_module") else model
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("kwargs", [
    {"max_grad_norm": 1.5},
    {"max_grad_norm": [0.5] * 4, "clipping": "per_layer"},
    {"max_grad_norm": 1.5, "grad_sample_mode": "ghost", "criterion": nn.CrossEntropyLoss(reduction="sum")},
], ids=["flat", "per_layer", "ghost"])
def test_update_equals_opacus_on_a_fixed_batch(kwargs):
    """σ = 0 and a norm near the median per-example norm (0.88–2.1 here): some examples clipped, some not."""
    from opacus import PrivacyEngine as OpacusEngine

    x, y = _data(16)
    model = _mlp()
    opacus_kwargs = {k: v for k, v in kwargs.items() if k not in ("grad_sample_mode", "criterion")}
    theirs = _one_step(OpacusEngine(), copy.deepcopy(model), x, y, **opacus_kwargs)
    ours = _one_step(PrivacyEngine(), model, x, y, **kwargs)
    before = list(_mlp().parameters())
    for a, b, p0 in zip(ours, theirs, before):
        assert not torch.allclose(a, p0)             # the step moved the weights
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_batch_memory_manager_equals_full_batches_with_same_seed():
    """Same seeded sampling and noise: chunked logical batches give exactly the full-batch result."""
    def train(physical):
        model = _mlp()
        loader = DataLoader(TensorDataset(*_data()), batch_size=16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        engine = PrivacyEngine(accountant="rdp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=0.5, noise_generator=torch.Generator().manual_seed(7))
        batches = 0

        def epoch(source):
            nonlocal batches
            for xb, yb in source:
                assert len(xb) <= (physical or 64)
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                batches += 1

        if physical is None:
            epoch(loader)
        else:
            with BatchMemoryManagerOpacusPath(data_loader=loader, max_physical_batch_size=physical,
                                              optimizer=optimizer) as memory_safe_loader:
                epoch(memory_safe_loader)
            assert loader.max_physical_batch_size is None      # restored on exit
        return [p.detach() for p in model.parameters()], len(engine.accountant), batches

    full, steps_full, batches_full = train(None)
    chunked, steps_chunked, batches_chunked = train(3)
    assert steps_full == steps_chunked == 4 and batches_chunked > batches_full
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert BatchMemoryManager is BatchMemoryManagerOpacusPath


# ------------------------------------------------------------------ model, checkpoints, compatibility
def _setup(engine=None, **kwargs):
    engine = engine or PrivacyEngine()
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(*_data()), batch_size=16)
    args = {"module": model, "optimizer": optimizer, "data_loader": loader, "noise_multiplier": 1.0,
            "max_grad_norm": 1.0, **kwargs}
    return engine, args


def _train(model, optimizer, loader, steps):
    for i, (xb, yb) in enumerate(loader):
        if i == steps:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()


def test_model_is_not_wrapped_and_hooks_can_be_removed():
    engine, args = _setup()
    keys = list(args["module"].state_dict())
    model, _, _ = engine.make_private(**args)
    assert model is args["module"] and model._module is model and list(model.state_dict()) == keys
    engine, args = _setup(wrap_model=False)
    handle, _, _ = engine.make_private(**args)
    linear = args["module"][0]
    assert "forward" in vars(linear)                  # dpkit's per-example forward is installed
    handle.cleanup()
    assert "forward" not in vars(linear)


def test_checkpoint_round_trip_restores_ledger_and_steps(tmp_path):
    engine, args = _setup(PrivacyEngine(accountant="pld"))
    model, optimizer, loader = engine.make_private(**args)
    _train(model, optimizer, loader, 3)
    engine.save_checkpoint(path=tmp_path / "ck.pt", module=model, optimizer=optimizer)
    eps = engine.get_epsilon(DELTA)
    assert len(engine.accountant) == 3 and eps == pytest.approx(pld_epsilon(1.0, 0.25, 3), rel=1e-3)

    engine2, args2 = _setup(PrivacyEngine(accountant="pld"))
    model2, optimizer2, loader2 = engine2.make_private(**args2)
    checkpoint = engine2.load_checkpoint(path=tmp_path / "ck.pt", module=model2, optimizer=optimizer2)
    assert "privacy_accountant_state_dict" in checkpoint
    assert len(engine2.accountant) == 3 and optimizer2.steps == 3 and engine2.get_epsilon(DELTA) == eps
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    _train(model2, optimizer2, loader2, 1)
    assert len(engine2.accountant) == 4 and engine2.get_epsilon(DELTA) > eps


@pytest.mark.parametrize("name", ["rdp", "gdp", "pld"])
def test_accountant_names(name):
    engine, args = _setup(PrivacyEngine(accountant=name))
    model, optimizer, loader = engine.make_private(**args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # "gdp" warns that it is an approximation
        _train(model, optimizer, loader, 2)
        eps = engine.get_epsilon(DELTA)
    assert engine.accountant.mechanism() == name and engine.accountant.dpkit_accountant.name == name
    assert optimizer.accountant is engine.accountant.dpkit_accountant and len(engine.accountant) == 2
    if name == "pld":
        assert eps == pytest.approx(pld_epsilon(1.0, 0.25, 2), rel=1e-3)


def test_compatibility_helpers():
    bn_model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    engine = PrivacyEngine()
    assert not engine.is_compatible(module=bn_model, optimizer=None, data_loader=None)
    with pytest.raises(dpkit.UnsupportedModuleError, match="BatchNorm"):
        engine.validate(module=bn_model, optimizer=None, data_loader=None)
    fixed = PrivacyEngine.get_compatible_module(bn_model)
    assert isinstance(fixed[1], nn.GroupNorm) and isinstance(bn_model[1], nn.BatchNorm2d)
    assert engine.is_compatible(module=fixed, optimizer=None, data_loader=None)
    assert engine.get_epsilon(DELTA) == 0.0 and len(engine.accountant) == 0 and engine.accountant.history == []


# ------------------------------------------------------------------ what is refused, and why
BAD = [
    ({"grad_sample_mode": "functorch"}, ValueError, "torch.func"),
    ({"grad_sample_mode": "ew"}, ValueError, "ExpandedWeights"),
    ({"grad_sample_mode": "magic"}, ValueError, "grad_sample_mode must be"),
    ({"clipping": "adaptive"}, ValueError, "adaptive"),
    ({"clipping": "per_layer"}, TypeError, "list of per-parameter norms"),
    ({"clipping": "per_layer", "max_grad_norm": [1.0, 2.0, 1.0, 1.0]}, ValueError, "SAME norm"),
    ({"clipping": "per_layer", "max_grad_norm": [1.0]}, ValueError, "one norm per trainable"),
    ({"max_grad_norm": [1.0] * 4}, TypeError, "clipping='per_layer'"),
    ({"batch_first": False}, ValueError, "batch_first must be True"),
    ({"rand_on_empty": True}, ValueError, "rand_on_empty must be False"),
    ({"poisson_sampling": False}, ValueError, "accountant='rdp'"),
    ({"target_unclipped_quantile": 0.5}, TypeError, "adaptive clipping"),
    ({"foo": 1}, TypeError, "unsupported keyword argument"),
    ({"data_loader": None}, TypeError, "data_loader must be a torch DataLoader"),
    ({"grad_sample_mode": "ghost", "criterion": F.cross_entropy}, TypeError, "reduction"),
    ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier"),
]


@pytest.mark.parametrize("overrides,error,match", BAD, ids=[str(sorted(b[0])) for b in BAD])
def test_bad_make_private_arguments(overrides, error, match):
    engine, args = _setup()
    with pytest.raises(error, match=match):
        engine.make_private(**{**args, **overrides})


def test_other_refusals():
    with pytest.raises(ValueError, match="accountant must be one of"):
        PrivacyEngine(accountant="moments")
    with pytest.raises(TypeError, match="secure_mode must be a bool"):
        PrivacyEngine(secure_mode="yes")
    engine, args = _setup(PrivacyEngine(secure_mode=True), noise_generator=torch.Generator())
    with pytest.raises(ValueError, match="noise_generator must be None"):
        engine.make_private(**args)
    engine, args = _setup(PrivacyEngine(accountant="rdp"))
    del args["noise_multiplier"]
    with pytest.raises(ValueError, match="poisson_sampling=False cannot be combined"):
        engine.make_private_with_epsilon(**args, target_epsilon=1.0, target_delta=DELTA, epochs=1,
                                         poisson_sampling=False)
    engine, args = _setup()
    model, optimizer, loader = engine.make_private(**args)
    with pytest.raises(RuntimeError, match="new PrivacyEngine"):
        engine.make_private(**_setup()[1])
    with pytest.raises(ValueError, match="needs optimizer="):
        engine.save_checkpoint(path="unused.pt", module=model)
    with pytest.raises(ValueError, match="grad_clip_scheduler must be None"):
        engine.save_checkpoint(path="unused.pt", module=model, optimizer=optimizer, noise_scheduler=object())
    with pytest.raises(TypeError, match="DPDataLoader"):
        BatchMemoryManager(data_loader=DataLoader(TensorDataset(*_data())), max_physical_batch_size=4,
                           optimizer=optimizer)
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        BatchMemoryManager(data_loader=loader, max_physical_batch_size=0, optimizer=optimizer)


def test_opacus_noise_scheduler_cannot_change_sigma_behind_the_ledger():
    """An Opacus script keeps `from opacus.schedulers import ExponentialNoise`; it must not lower σ silently."""
    from opacus.schedulers import ExponentialNoise

    engine, args = _setup(PrivacyEngine(accountant="rdp"))
    model, optimizer, loader = engine.make_private(**args)
    _train(model, optimizer, loader, 4)
    with pytest.raises(AttributeError, match="noise_multiplier is fixed"):
        ExponentialNoise(optimizer, gamma=0.1)       # refused when built (it assigns σ right away)
    assert optimizer.noise_multiplier == 1.0 and isinstance(optimizer, dpkit.DPOptimizer)
    assert engine.accountant.history == [(1.0, 0.25, 4)]
    assert engine.get_epsilon(DELTA) == pytest.approx(rdp_epsilon(1.0, 0.25, 4), rel=1e-9)


def test_planned_run_is_enforced():
    """make_private_with_epsilon: the calibrated budget is a hard limit (Opacus would keep spending)."""
    engine, args = _setup(PrivacyEngine(accountant="rdp"))
    del args["noise_multiplier"]
    model, optimizer, loader = engine.make_private_with_epsilon(**args, target_epsilon=2.0,
                                                                target_delta=DELTA, epochs=1)
    _train(model, optimizer, loader, 4)
    assert engine.get_epsilon(DELTA) <= 2.0
    with pytest.raises(dpkit.PrivacyBudgetExceeded):
        _train(model, optimizer, loader, 1)


def test_resume_through_opacus_checkpoints_continues_the_run(tmp_path):
    """save_checkpoint/load_checkpoint into fresh objects: the same batches and parameters as the
    uninterrupted run, and no batch after the resume repeats one from before it (issue 13, item 1)."""
    def run(model, optimizer, loader, steps):
        seen = []
        while len(seen) < steps:
            for xb, yb in loader:
                seen.append((xb.sum().item(), len(xb)))
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                if len(seen) == steps:
                    break
        return seen

    engine, args = _setup(PrivacyEngine(accountant="pld"))
    model, optimizer, loader = engine.make_private(**args)   # OS-entropy seeds, as Opacus users run
    first = run(model, optimizer, loader, 6)
    engine.save_checkpoint(path=tmp_path / "ck.pt", module=model, optimizer=optimizer)
    whole = run(model, optimizer, loader, 6)
    engine2, args2 = _setup(PrivacyEngine(accountant="pld"))
    model2, optimizer2, loader2 = engine2.make_private(**args2)
    engine2.load_checkpoint(path=tmp_path / "ck.pt", module=model2, optimizer=optimizer2,
                            torch_load_kwargs={"weights_only": False})
    resumed = run(model2, optimizer2, loader2, 6)
    assert resumed == whole and not set(b for b in resumed if b[1]) & set(b for b in first if b[1])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert engine2.get_epsilon(DELTA) == engine.get_epsilon(DELTA)
