"""In-process federated simulation of DP-FedAvg: clients, rounds, progress bar, JSON-lines log.

Each round (McMahan et al., ICLR 2018, Alg. 1): :class:`~dpkit.federated.dp_fedavg.DPFedAvg`
Poisson-samples the cohort, every sampled client runs :class:`~dpkit.federated.client.LocalTrainer`
from the current global model (or, for a canary client, returns its fixed direction), and the
server clips, sums, noises and normalises by q·M, steps its optimizer and accounts the round.
Optional canary clients (Andrew et al., ICLR 2024) give a one-shot ε̂ from the same run.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from dpkit import _validate
from dpkit.federated import _seeds
from dpkit.federated.adaptive import AdaptiveClipping
from dpkit.federated.canaries import Canaries
from dpkit.federated.client import LocalTrainer
from dpkit.federated.data import FederatedData
from dpkit.federated.dp_fedavg import DPFedAvg


class FederatedSimulation:
    """DP-FedAvg over in-process clients with user-level DP.

    Args:
        model: the model (its current parameters are the initial global model; it is also the
            work model of local training). No buffers (BatchNorm) allowed.
        data: a :class:`~dpkit.federated.data.FederatedData` (its test set is used for evaluation).
        client_optimizer: factory ``params -> torch.optim.Optimizer`` for local training.
        sampling_rate: Poisson client-sampling rate q in (0, 1].
        noise_multiplier: z ≥ 0 (joint noise multiplier with adaptive clipping).
        clip_norm: S > 0 (initial value with adaptive clipping).
        local_epochs, local_batch_size, loss_fn: local training (:class:`LocalTrainer`).
        server_optimizer: ``"fedavg"``, ``"fedadam"`` or a factory.
        adaptive_clipping: :class:`AdaptiveClipping` or None.
        accountant: accountant name or fresh Accountant.
        delta: δ of the ε reported each round (user-level; choose δ ≪ 1/M).
        seed: run seed of every stream (sampling, noise, local shuffling), as in
            :class:`~dpkit.federated.dp_fedavg.DPFedAvg`: default None = OS entropy, kept in
            :meth:`state_dict`; an explicit integer (tests) emits ``SeededRandomnessWarning``.
        secure_mode: sampling, noise and local shuffling from fresh OS entropy (``seed`` None).
        num_canaries: k canary clients added to the population (0: none; else ≥ 2). They are
            sampled like real clients, so M counts them (q·M uses M = real + canaries).
        canary_seed: seed of the canary directions (default: derived from the run seed; OS
            entropy in secure mode). Audit randomness, not privacy noise: a fixed value does not
            warn.
        log_path: file to append one JSON object per round to (None: no file).
        progress: show a tqdm progress bar.
        epsilon_every: compute ε every this many rounds (and at the last one); others log null.
        eval_every: evaluate on the test set every this many rounds (and at the last one).
        correlated: a :class:`~dpkit.federated.rounds.CorrelatedRounds` for DP-FTRL / BandMF
            across rounds (see :class:`~dpkit.federated.dp_fedavg.DPFedAvg`); None: DP-FedAvg.
        weighting: an :class:`~dpkit.federated.weighting.ExampleWeighting` (weights by each
            client's example count; canaries get weight 1), or None (uniform).

    Raises:
        ValueError, TypeError: an argument of the wrong kind or out of range.
    """

    def __init__(self, model: nn.Module, data: FederatedData, *, client_optimizer: Callable,
                 sampling_rate, noise_multiplier, clip_norm, local_epochs=1, local_batch_size=10,
                 loss_fn=None, server_optimizer="fedavg", adaptive_clipping: AdaptiveClipping | None = None,
                 accountant="pld", delta=1e-5, seed=None, secure_mode=False, num_canaries=0,
                 canary_seed=None, log_path=None, progress=True, epsilon_every=1, eval_every=1,
                 correlated=None, weighting=None):
        if not isinstance(data, FederatedData):
            raise TypeError(f"data must be a dpkit.federated.FederatedData; got {type(data).__name__}")
        self.trainer = LocalTrainer(model, client_optimizer, epochs=local_epochs,
                                    batch_size=local_batch_size, loss_fn=loss_fn)
        self.model, self.data = model, data
        self.delta = _validate.delta("delta", delta)
        self.num_canaries = _validate.positive_int("num_canaries", num_canaries, allow_zero=True)
        self.epsilon_every = _validate.positive_int("epsilon_every", epsilon_every)
        self.eval_every = _validate.positive_int("eval_every", eval_every)
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool; got {progress!r}")
        self.progress, self.log_path = progress, log_path
        self.server = DPFedAvg(self.trainer.params, num_clients=data.num_clients + self.num_canaries,
                               sampling_rate=sampling_rate, noise_multiplier=noise_multiplier,
                               clip_norm=clip_norm, server_optimizer=server_optimizer,
                               adaptive_clipping=adaptive_clipping, accountant=accountant, seed=seed,
                               secure_mode=secure_mode, correlated=correlated, weighting=weighting)
        self.dim = sum(p.numel() for p in self.server.params)
        self.canaries = None
        self._initial = self._flat(self.server.params)
        self._round_updates: list[np.ndarray] = []
        if self.num_canaries:
            if canary_seed is None and self.server.seed is not None:
                canary_seed = _seeds.derive_seed(self.server.seed, _seeds.CANARY)
            canary_seed = _seeds.resolve_seed("canary_seed", canary_seed, privacy=False)
            self.canaries = Canaries(self.num_canaries, self.dim, seed=canary_seed)
        self.history: list[dict] = []
        self._planned = math.inf  # last round of the current run(): ε and evaluation always logged there

    @staticmethod
    def _flat(tensors) -> np.ndarray:
        return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors]).numpy()

    def run_round(self) -> dict:
        """Run one round; returns its log record (also appended to ``history`` and the log file)."""
        start = time.perf_counter()
        server = self.server
        before = self._flat(server.params) if self.canaries is not None else None
        updates, counts = {}, {}
        m = self.data.num_clients
        for k in server.sample_cohort():
            if k >= m:
                updates[k] = self.canaries.update(k - m, server.clip_norm, server.params)
                counts[k] = math.ceil(server.weighting.cap) if server.weighting is not None else 0
            else:
                counts[k] = int(self.data.clients[k][1].shape[0])
                g = _seeds.generator(server.seed, _seeds.LOCAL, server.round, k)
                updates[k] = self.trainer.update(server.params, self.data.clients[k], g)
        record = server.aggregate(updates, counts if server.weighting is not None else None)
        if self.canaries is not None:
            self._round_updates.append(self._flat(server.params) - before)
        last = record["round"] == self._planned
        record["delta"] = self.delta
        record["epsilon"] = (server.epsilon(self.delta)
                             if last or record["round"] % self.epsilon_every == 0 else None)
        if self.data.test is not None and (last or record["round"] % self.eval_every == 0):
            record.update(self.evaluate())
        record["seconds"] = time.perf_counter() - start
        self.history.append(record)
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        return record

    def state_dict(self) -> dict:
        """Everything a resumed simulation needs: the server (seed, round, model, server optimizer,
        ledger), the canary seed, the initial model and per-round updates (for the canary estimate)
        and the log ``history``.

        Save it with ``torch.save`` and restore it into a freshly built simulation with the same
        settings and data: the resumed rounds sample, train and noise exactly as an uninterrupted
        run would (every stream is keyed by (seed, round)). The state contains the run seed, so
        it lets its holder regenerate the noise: keep it as secret as the data.
        """
        return {"server": self.server.state_dict(),
                "canary_seed": None if self.canaries is None else self.canaries.seed,
                "initial": torch.from_numpy(self._initial.copy()),   # tensors: torch.load(weights_only=True) works
                "round_updates": [torch.from_numpy(u.copy()) for u in self._round_updates],
                "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into a simulation built with the same settings and data.

        Raises:
            TypeError: ``state`` is not a dict.
            ValueError: the state does not match this simulation (canaries present in one and
                not the other, or a different model size).
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(); got {type(state).__name__}")
        if (state["canary_seed"] is None) != (self.canaries is None):
            raise ValueError("state must come from a simulation with the same num_canaries; got a state "
                             f"{'without' if state['canary_seed'] is None else 'with'} canaries")
        initial = torch.as_tensor(state["initial"], dtype=torch.float64).numpy()
        if initial.shape != (self.dim,):
            raise ValueError(f"state must be for a model with {self.dim} parameters; got {initial.shape[0]}")
        self.server.load_state_dict(state["server"])
        if self.canaries is not None:
            self.canaries = Canaries(self.num_canaries, self.dim, seed=state["canary_seed"])
        self._initial = initial.copy()
        self._round_updates = [torch.as_tensor(u, dtype=torch.float64).numpy().copy() for u in state["round_updates"]]
        self.history = [dict(r) for r in state["history"]]

    def run(self, rounds) -> list[dict]:
        """Run ``rounds`` more rounds with a progress bar; returns their log records."""
        rounds = _validate.positive_int("rounds", rounds)
        self._planned = self.server.round + rounds
        from tqdm.auto import tqdm

        out = []
        bar = tqdm(range(rounds), desc="DP-FedAvg", disable=not self.progress, leave=False)
        for _ in bar:
            rec = self.run_round()
            out.append(rec)
            post = {"eps": rec["epsilon"], "acc": rec.get("test_accuracy")}
            bar.set_postfix({k: f"{v:.3g}" for k, v in post.items() if v is not None})
        bar.close()
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test accuracy and mean loss of the current global model on ``data.test``."""
        model = self.global_model()
        model.eval()
        x, y = self.data.test
        logits = model(x)
        loss = float(self.trainer.loss_fn(logits, y))
        acc = float((logits.argmax(1) == y).double().mean())
        return {"test_accuracy": acc, "test_loss": loss}

    def global_model(self) -> nn.Module:
        """The work model loaded with the current global parameters."""
        with torch.no_grad():
            for p, g in zip(self.trainer.params, self.server.params):
                p.copy_(g)
        return self.model

    def epsilon(self, delta=None) -> float:
        """ε spent so far (user-level) at ``delta`` (default: the simulation's δ)."""
        return self.server.epsilon(self.delta if delta is None else delta)

    def canary_estimate(self, delta=None) -> dict:
        """One-shot ε̂ from the canaries (Andrew et al., ICLR 2024), final model and all iterates.

        Returns:
            dict with ``final_model`` and ``all_iterates`` estimates, plus ``claimed_epsilon``.

        Raises:
            RuntimeError: the simulation has no canaries or has not run.
        """
        if self.canaries is None:
            raise RuntimeError("this simulation has no canaries; pass num_canaries >= 2")
        if not self._round_updates:
            raise RuntimeError("run at least one round before estimating")
        delta = self.delta if delta is None else _validate.delta("delta", delta)
        out = self.canaries.estimate(self._flat(self.server.params) - self._initial,
                                     np.stack(self._round_updates), delta=delta)
        out["claimed_epsilon"] = self.server.epsilon(delta)
        return out
