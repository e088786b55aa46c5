"""DPTrainer (Hugging Face Trainer integration) against independent references.

* ε in the Trainer's logs and in the checkpoint's ledger vs dp_accounting's PLD called directly;
* gradient_accumulation_steps=2 vs 1 with the same logical batch and seed (noise once per step);
* σ=0, huge clip norm vs a plain dpkit loop AND a non-private loop on the same Poisson batches;
* resume_from_checkpoint vs the uninterrupted run (parameters, ledger, the examples each run read);
* refusals of what the Trainer would do wrong privately.
"""

import json
import os
import shutil

import pytest

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dp_accounting  # noqa: E402
import torch  # noqa: E402
from dp_accounting.pld import PLDAccountant as DpaPLD  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import dpkit  # noqa: E402
from dpkit.accountants import make_accountant  # noqa: E402
from dpkit.data import PoissonBatchSampler  # noqa: E402
from dpkit.integrations.trainer import DPTrainer  # noqa: E402
from dpkit.mechanisms.randomness import seed_from_generator  # noqa: E402

hf_logging.set_verbosity_error()

N, T, VOCAB = 48, 12, 50
SEED = 1234
VDI = 1e-3  # PLD grid of dpkit's accountant and of dp_accounting's, so both compute the same bound


class Tokens(torch.utils.data.Dataset):
    """Synthetic token sequences (causal LM: labels = inputs); records the indices it serves."""

    def __init__(self, pad_labels=False):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (N, T), generator=g)
        self.pad_labels = pad_labels
        self.served = []

    def __len__(self):
        return N

    def __getitem__(self, i):
        self.served.append(i)
        labels = self.ids[i].clone()
        if self.pad_labels and i % 2:
            labels[T // 2:] = -100  # half the label tokens of odd examples are padding
        return {"input_ids": self.ids[i], "labels": labels}


def _model():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=T, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=4, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                warmup_steps=0, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                logging_steps=100, max_grad_norm=0.0, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path, dataset=None, *, model=None, seed=SEED, noise_multiplier=1.0, clip=1.0, accountant=None,
             target_epsilon=None, compute_loss_func=None, **kw):
    """A DPTrainer on the tiny GPT-2 (PLD on a fixed 1e-3 grid, as the reference); ``kw`` go to
    TrainingArguments."""
    accountant = accountant or make_accountant("pld", value_discretization_interval=VDI)
    return DPTrainer(model if model is not None else _model(), _args(tmp_path, **kw),
                     train_dataset=dataset if dataset is not None else Tokens(), max_grad_norm=clip,
                     noise_multiplier=None if target_epsilon is not None else noise_multiplier,
                     target_epsilon=target_epsilon, target_delta=1e-5, accountant=accountant,
                     generator=torch.Generator().manual_seed(seed), compute_loss_func=compute_loss_func)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _dpa_epsilon(sigma, q, steps, delta=1e-5, vdi=VDI):
    """dp_accounting's PLD of `steps` Poisson-subsampled Gaussian steps, called directly."""
    ref = DpaPLD(value_discretization_interval=vdi)
    ref.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return ref.get_epsilon(delta)


def _draws(steps, start=0, seed=SEED, q=8 / N):
    """The index lists of the Poisson draws make_private's sampler makes for this seed."""
    sampler = PoissonBatchSampler(N, q, seed=seed_from_generator(torch.Generator().manual_seed(seed)))
    return [sampler.batch(t) for t in range(start, start + steps)]


# ---------------------------------------------------------------------------- ε in the logs
def test_logged_epsilon_equals_dp_accounting_and_trainer_clipping_is_off(tmp_path):
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 is ignored"):
        trainer = _trainer(tmp_path, noise_multiplier=1.3, clip=0.5, max_steps=4, max_grad_norm=1.0, logging_steps=1)
    assert trainer.args.max_grad_norm == 0 and trainer.args.gradient_accumulation_steps == 1
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3, 4]
    for entry in logs:  # ε at each logged step, q = B/N with B = 4 × 2
        assert entry["epsilon"] == pytest.approx(_dpa_epsilon(1.3, 8 / N, entry["step"]), rel=1e-6)
        assert "grad_norm" not in entry  # the non-private gradient norm is never logged
    assert trainer.epsilon() == pytest.approx(_dpa_epsilon(1.3, 8 / N, 4), rel=1e-6)
    assert trainer.dp_optimizer.expected_batch_size == 8 and trainer.dp_optimizer.max_grad_norm == 0.5
    assert trainer.dp_loader.sample_rate == pytest.approx(8 / N)


def test_target_epsilon_is_calibrated_for_the_trainer_run_and_guarded(tmp_path):
    trainer = _trainer(tmp_path, target_epsilon=2.0, max_steps=4,
                       accountant=make_accountant("pld", value_discretization_interval=1e-2))
    trainer.train()
    sigma = trainer.dp_optimizer.noise_multiplier
    assert trainer.dp_optimizer.max_steps == 4
    assert trainer.epsilon() == pytest.approx(_dpa_epsilon(sigma, 8 / N, 4, vdi=1e-2), rel=1e-6)
    assert 1.9 < trainer.epsilon() <= 2.0
    with pytest.raises(dpkit.PrivacyBudgetExceeded):
        trainer.train()  # a second run of 4 steps would exceed the calibrated budget


# ------------------------------------------------------------ accumulation = one noisy step
def test_gradient_accumulation_is_one_poisson_draw_with_noise_once(tmp_path):
    one = _trainer(tmp_path / "a", per_device_train_batch_size=8, gradient_accumulation_steps=1)
    one.train()
    two = _trainer(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    data = two.train_dataset
    two.train()
    sizes = [len(d) for d in _draws(4)]
    assert max(sizes) > 4  # some draw really was split into chunks of at most 4
    assert two.dp_loader.max_physical_batch_size == 4 and one.dp_loader.max_physical_batch_size == 8
    assert data.served == [i for d in _draws(4) for i in d]  # one Poisson draw per step, read once
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert two.dp_optimizer.steps == one.dp_optimizer.steps == 4
    assert two.epsilon() == one.epsilon() == pytest.approx(_dpa_epsilon(1.0, 8 / N, 4), rel=1e-6)


# ----------------------------------------------------------- σ=0, huge C: non-private training
def test_zero_noise_huge_clip_equals_plain_dpkit_loop_and_non_private_sgd(tmp_path):
    steps, lr = 4, 0.05
    trainer = _trainer(tmp_path, noise_multiplier=0.0, clip=1e6, max_steps=steps, learning_rate=lr)
    trainer.train()

    # a plain dpkit loop on the same settings (virtual batches of 4)
    model = _model()
    _, opt, loader = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=lr),
                                        torch.utils.data.DataLoader(Tokens(), batch_size=8),
                                        noise_multiplier=0.0, max_grad_norm=1e6, max_physical_batch_size=4,
                                        generator=torch.Generator().manual_seed(SEED))
    while opt.steps < steps:
        for batch in loader:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
            if opt.steps == steps:
                break

    # non-private SGD on the same draws: Σ_i ∇ℓ_i / B with the PUBLIC B = 8
    ref = _model()
    data = Tokens()
    for draw in _draws(steps):
        ref.zero_grad()
        if draw:
            x = torch.stack([data[i]["input_ids"] for i in draw])
            (ref(input_ids=x, labels=x).loss * len(draw) / 8).backward()  # full-length rows: mean of row means
            with torch.no_grad():
                for p in ref.parameters():
                    p -= lr * p.grad
    for p, q, r in zip(trainer.model.parameters(), model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        torch.testing.assert_close(p, r, rtol=0, atol=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), _model().parameters()))


def test_empty_poisson_batches_are_steps(tmp_path):
    trainer = _trainer(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=8)
    trainer.train()
    assert any(len(d) == 0 for d in _draws(8, q=1 / N))  # the run did meet empty draws
    assert trainer.dp_optimizer.steps == 8
    assert trainer.epsilon() == pytest.approx(_dpa_epsilon(1.0, 1 / N, 8), rel=1e-6)


# ---------------------------------------------------------------------------- checkpoints
def test_resume_from_checkpoint_continues_the_run(tmp_path):
    full = _trainer(tmp_path / "full", max_steps=6, save_strategy="steps", save_steps=3, logging_steps=3)
    full.train()
    ck = tmp_path / "full" / "checkpoint-3"
    ledger = torch.load(ck / "optimizer.pt", weights_only=True)["dpkit"]
    acc = make_accountant("pld", value_discretization_interval=VDI)
    acc.load_state_dict(ledger["accountant"])
    assert ledger["steps"] == 3 and ledger["sampler"]["position"] == 3
    assert acc.epsilon(1e-5) == pytest.approx(_dpa_epsilon(1.0, 8 / N, 3), rel=1e-6)
    logged = json.loads((ck / "trainer_state.json").read_text())["log_history"]
    assert logged[-1]["step"] == 3 and logged[-1]["epsilon"] == pytest.approx(acc.epsilon(1e-5))

    data = Tokens()
    resumed = _trainer(tmp_path / "full", data, model=_model(), max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(ck))
    assert data.served == [i for d in _draws(3, start=3) for i in d]  # draws 3..5 only: nothing replayed
    assert resumed.state.global_step == resumed.dp_optimizer.steps == 6
    assert resumed.epsilon() == full.epsilon()
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # noise and batches continue, not restart

    broken = tmp_path / "broken"
    shutil.copytree(ck, broken)
    os.remove(broken / "optimizer.pt")
    with pytest.raises(ValueError, match="no optimizer.pt"):
        _trainer(tmp_path / "x", max_steps=6).train(resume_from_checkpoint=str(broken))


# ---------------------------------------------------------------------------- refusals
def test_refusals_name_the_argument_and_the_fix(tmp_path):
    args = _args(tmp_path)
    args.fp16 = True  # (TrainingArguments itself refuses fp16 on a CPU-only machine)
    with pytest.raises(ValueError, match="fp16=True.*bf16=True"):
        DPTrainer(_model(), args, train_dataset=Tokens(), max_grad_norm=1.0, noise_multiplier=1.0,
                  target_delta=1e-5)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from Tokens()

    with pytest.raises(TypeError, match="IterableDataset"):
        _trainer(tmp_path, Stream())
    with pytest.raises(TypeError, match="train_dataset is required"):
        DPTrainer(_model(), _args(tmp_path), max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5)
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments"):
        DPTrainer(_model(), None, train_dataset=Tokens(), max_grad_norm=1.0, noise_multiplier=1.0,
                  target_delta=1e-5)
    with pytest.raises(ValueError, match="save_only_model"):
        _trainer(tmp_path, save_only_model=True)
    with pytest.raises(ValueError, match="auto_find_batch_size"):
        _trainer(tmp_path, auto_find_batch_size=True)
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        DPTrainer(_model(), _args(tmp_path), train_dataset=Tokens(), max_grad_norm=1.0, target_delta=1e-5)
    with pytest.raises(ValueError, match="max_grad_norm"):
        _trainer(tmp_path, clip=0.0)
    with pytest.raises(ValueError, match="target_delta"):
        DPTrainer(_model(), _args(tmp_path), train_dataset=Tokens(), max_grad_norm=1.0, noise_multiplier=1.0,
                  target_delta=2.0)


def test_coupled_token_mean_loss_is_refused_unless_a_per_example_loss_is_given(tmp_path):
    trainer = _trainer(tmp_path, Tokens(pad_labels=True), max_steps=2)
    with pytest.raises(ValueError, match="different numbers of label tokens"):
        trainer.train()
    assert trainer.dp_optimizer.steps == 0  # refused before anything was spent

    def per_example_mean(outputs, labels, num_items_in_batch=None):
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                reduction="none")
        valid = targets.ne(-100)
        return ((tok * valid).sum(1) / valid.sum(1)).mean()

    ok = _trainer(tmp_path / "ok", Tokens(pad_labels=True), max_steps=2, compute_loss_func=per_example_mean)
    ok.train()
    assert ok.dp_optimizer.steps == 2


# ---------------------------------------------------------------------------- peft
def test_lora_adapters_alone_are_trained_and_accounted(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, model=model, max_steps=3)
    trainer.train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    for n, p in model.named_parameters():  # frozen base weights untouched, every adapter moved (noise)
        assert torch.equal(p, before[n]) != (n in trained), n
    assert trainer.epsilon() == pytest.approx(_dpa_epsilon(1.0, 8 / N, 3), rel=1e-6)
