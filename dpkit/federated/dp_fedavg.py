"""DP-FedAvg with user-level DP: client sampling, update clipping, noise, accounting — one object.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018, Alg. 1 (DP-FedAvg) with the fixed-denominator estimator f̃_f (Sec. 2, Eq. 1):

    round t:  C_t ← Poisson sample: each of the M users independently with probability q
              Δ_k ← UserUpdate(k, θ_t) clipped to L2 norm ≤ S_t           (for k in C_t)
              Δ̄_t = ( Σ_k clip(Δ_k) + N(0, (z_Δ·S_t)² I) ) / (q·M)      (PUBLIC denominator)
              θ_{t+1} ← server_optimizer(θ_t, pseudo-gradient −Δ̄_t)

One user changes the clipped sum by at most S_t (add/remove adjacency: the user's whole data), so
each round is the Poisson-subsampled Gaussian mechanism and the accountant composes
``dpsgd_event(z, q)`` per round — the SAME q that drew the cohort. With adaptive clipping
(Andrew et al., NeurIPS 2021; :mod:`dpkit.federated.adaptive`) the noisy centred clipped count is
released too; z is then the joint noise multiplier and the update noise z_Δ is raised to match.
An empty cohort is a round like any other: the noise is added and the round is accounted.

The sampler, the noise and the event are built here from the same settings; the in-process
simulator and the Flower strategy both drive this object, so they cannot disagree.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Sequence

import torch

from dpkit import _validate
from dpkit.accountants import dpsgd_event
from dpkit.accountants.registry import fresh_accountant
from dpkit.federated import _seeds
from dpkit.federated.adaptive import AdaptiveClipping, update_noise_multiplier
from dpkit.federated.rounds import CorrelatedRounds, build_round_mechanism
from dpkit.federated.weighting import ExampleWeighting
from dpkit.federated.server_opt import make_server_optimizer
from dpkit.mechanisms.noise import GaussianNoise


class DPFedAvg:
    """Server side of DP-FedAvg (McMahan et al., ICLR 2018, Alg. 1) with user-level DP.

    Usage per round: ``cohort = server.sample_cohort()``; collect each sampled client's update
    Δ_k; ``server.aggregate({k: Δ_k})``. ``server.params`` is the released global model.

    Args:
        params: the initial global model, a sequence of tensors (copied).
        num_clients: population size M ≥ 1 (public; clients indexed 0..M−1).
        sampling_rate: Poisson client-sampling rate q in (0, 1].
        noise_multiplier: z ≥ 0, the noise multiplier the accountant sees (noise std z·S on the
            clipped sum; with adaptive clipping the joint multiplier, see the module docstring).
        clip_norm: S > 0, the L2 bound on each user's update (the initial value if adaptive).
        server_optimizer: ``"fedavg"``, ``"fedadam"`` or a factory ``params -> torch.optim.Optimizer``
            (see :func:`dpkit.federated.server_opt.make_server_optimizer`).
        adaptive_clipping: an :class:`~dpkit.federated.adaptive.AdaptiveClipping`, or None for a fixed S.
        accountant: registered accountant name (default ``"pld"``) or a fresh Accountant.
        seed: run seed of every random stream (sampling, noise), keyed by (seed, purpose, round).
            Default None: 63 bits of OS entropy, drawn once and kept in :meth:`state_dict` so a
            resumed run continues its streams (keep checkpoints secret). An explicit integer is
            for tests: it emits :class:`~dpkit.errors.SeededRandomnessWarning`.
        secure_mode: draw sampling and noise from fresh OS entropy every round (:class:`GaussianNoise`
            secure mode); the run is then not reproducible and ``seed`` must be None.
        correlated: a :class:`~dpkit.federated.rounds.CorrelatedRounds` (DP-FTRL / BandMF across
            rounds): the cohort sampler, the noise ``z·S·sens·(C⁻¹Z)_t`` and the matching
            accountant are built from it (see :mod:`dpkit.federated.rounds`); None: fresh noise
            every round (DP-FedAvg).
        weighting: an :class:`~dpkit.federated.weighting.ExampleWeighting` (weights
            min(n_k/cap, 1) by example count, public or privately estimated normaliser; see
            :mod:`dpkit.federated.weighting`), or None: every user weight 1, normaliser q·M.

    Raises:
        ValueError, TypeError: an argument of the wrong kind or out of range.
    """

    def __init__(self, params: Sequence[torch.Tensor], *, num_clients, sampling_rate, noise_multiplier,
                 clip_norm, server_optimizer="fedavg", adaptive_clipping: AdaptiveClipping | None = None,
                 accountant="pld", seed=None, secure_mode=False, correlated: CorrelatedRounds | None = None,
                 weighting: ExampleWeighting | None = None):
        if isinstance(params, torch.Tensor) or not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError("params must be a sequence of tensors (the global model's parameters)")
        if len(params) == 0:
            raise ValueError("params must contain at least one tensor")
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool; got {secure_mode!r}")
        if secure_mode and seed is not None:
            raise ValueError(f"seed must be None with secure_mode=True (randomness comes from OS entropy); got {seed!r}")
        if not secure_mode:
            seed = _seeds.resolve_seed("seed", seed)
        self.seed, self.secure_mode = seed, secure_mode
        self.num_clients = _validate.positive_int("num_clients", num_clients)
        self.sampling_rate = _validate.probability("sampling_rate", sampling_rate)
        self.noise_multiplier = _validate.non_negative("noise_multiplier", noise_multiplier)
        self.clip_norm = _validate.positive("clip_norm", clip_norm)
        if adaptive_clipping is not None and not isinstance(adaptive_clipping, AdaptiveClipping):
            raise TypeError(f"adaptive_clipping must be an AdaptiveClipping or None; got {type(adaptive_clipping).__name__}")
        self.adaptive_clipping = adaptive_clipping
        if correlated is not None and not isinstance(correlated, CorrelatedRounds):
            raise TypeError(f"correlated must be a CorrelatedRounds or None; got {type(correlated).__name__}")
        if correlated is not None and adaptive_clipping is not None:
            raise ValueError("adaptive_clipping must be None with correlated rounds: its count release is "
                             "accounted as independent per-round noise, which correlated rounds do not add")
        if weighting is not None and not isinstance(weighting, ExampleWeighting):
            raise TypeError(f"weighting must be an ExampleWeighting or None; got {type(weighting).__name__}")
        if weighting is not None and weighting.private and (adaptive_clipping is not None or correlated is not None):
            raise ValueError("weighting with weight_stddev (a privately estimated normaliser) cannot be combined "
                             "with adaptive_clipping or correlated rounds; declare total_weight (public) instead")
        self.weighting = weighting
        self.expected_cohort = self.sampling_rate * self.num_clients  # public normaliser q·M
        if adaptive_clipping is not None:
            self.count_stddev = adaptive_clipping.resolve_count_stddev(self.expected_cohort)
            self.update_noise_multiplier = update_noise_multiplier(self.noise_multiplier, self.count_stddev)
        else:
            self.count_stddev = None
            self.update_noise_multiplier = (self.noise_multiplier if weighting is None
                                            else weighting.update_noise_multiplier(self.noise_multiplier))
        self.correlated = correlated
        self._correlated_noise = self._cohort_sampler = None
        if correlated is not None:
            self._correlated_noise, self._cohort_sampler, self.accountant = build_round_mechanism(
                correlated, num_clients=self.num_clients, sampling_rate=self.sampling_rate,
                noise_multiplier=self.noise_multiplier, seed=self.seed, accountant=accountant)
            self.expected_cohort = self.sampling_rate * self.num_clients / correlated.num_groups
        else:
            self.accountant = fresh_accountant(accountant)
        # the public normaliser: expected cohort size, or expected cohort WEIGHT q·W (/b if cyclic)
        self.public_normaliser = (self.expected_cohort if weighting is None or weighting.private
                                  else self.expected_cohort * weighting.total_weight / self.num_clients)
        self.step_event = dpsgd_event(self.noise_multiplier, self.sampling_rate, 1)
        if not self.accountant.supports(self.step_event):
            raise ValueError(f"accountant {self.accountant.name!r} cannot account Poisson-sampled rounds")
        self.params = [p.detach().clone() for p in params]
        self.server_optimizer = make_server_optimizer(server_optimizer, self.params)
        self.round = 0            # rounds completed
        self._cohort = None       # (round, cohort) sampled for the current round

    # ------------------------------------------------------------------ sampling
    def sample_cohort(self) -> list[int]:
        """The sorted client indices Poisson-sampled (rate q) for the current round.

        Counter-based: the cohort of round t depends only on (seed, t), and repeated calls within
        a round return the same cohort. It may be empty.
        """
        if self._cohort is None or self._cohort[0] != self.round:
            if self._cohort_sampler is not None:   # cyclic participation: group round mod b
                self._check_round_available()
                self._cohort = (self.round, sorted(self._cohort_sampler.batch(self.round)))
            else:
                g = _seeds.generator(None if self.secure_mode else self.seed, _seeds.SAMPLING, self.round)
                mask = torch.rand(self.num_clients, generator=g, dtype=torch.float64) < self.sampling_rate
                self._cohort = (self.round, mask.nonzero().flatten().tolist())
        return list(self._cohort[1])

    # ------------------------------------------------------------------ aggregation
    @torch.no_grad()
    def aggregate(self, updates: Mapping[int, Sequence[torch.Tensor]], num_examples: Mapping[int, int] | None = None) -> dict:
        """Clip, sum, noise, normalise by q·M, step the server optimizer, account; ends the round.

        Args:
            updates: client index → Δ_k (tensors shaped like ``params``) for clients of THIS
                round's cohort; missing sampled clients (drop-outs) contribute nothing.
            num_examples: client index → example count n_k, for every client in ``updates``;
                required with ``weighting``, refused without it.

        Returns:
            A dict of the round's public outputs: ``round`` (1-based), ``clip_norm`` (S_t used),
            ``noisy_unclipped_fraction`` (adaptive only, else None), ``update_norm`` (‖Δ̄_t‖),
            and ``nonprivate`` diagnostics a deployment must NOT release (``cohort_size``,
            ``reporting_clients``, ``unclipped_fraction``).

        Raises:
            TypeError: ``updates`` is not a mapping.
            ValueError: an update from a client not sampled this round, or a malformed update
                (wrong number of tensors, wrong shape, NaN/Inf). The check is atomic: on error
                nothing is released or accounted, the round is not advanced, and the caller may
                call ``aggregate`` again for the same cohort without the offending client (which
                then counts as a drop-out: a user contributing nothing is within the
                sensitivity S, so the round's account is unchanged).
        """
        if not isinstance(updates, Mapping):
            raise TypeError(f"updates must be a mapping client index -> update; got {type(updates).__name__}")
        self._check_round_available()
        cohort = set(self.sample_cohort())
        for k in updates:
            if k not in cohort:
                raise ValueError(f"updates must come from this round's sampled clients; client {k!r} "
                                 f"was not sampled in round {self.round}")
        weights = self._weights(updates, num_examples)
        clip = self.clip_norm
        sums = [torch.zeros_like(p) for p in self.params]
        centred_count = 0.0
        unclipped = 0
        for k in sorted(updates):  # fixed order: the simulator and Flower give identical floats
            delta = self._check_update(k, updates[k])
            norm = math.sqrt(sum(float(d.double().square().sum()) for d in delta))
            if not math.isfinite(norm):
                raise ValueError(f"updates[{k}] must be finite; got norm {norm}")
            factor = min(1.0, clip / norm) if norm > 0 else 1.0
            for s, d in zip(sums, delta):
                s.add_(d, alpha=factor * weights[k])
            unclipped += norm <= clip
            centred_count += (1.0 if norm <= clip else 0.0) - 0.5
        if self.update_noise_multiplier > 0:
            std = self.update_noise_multiplier * clip
            if self._correlated_noise is not None:   # sens·(C⁻¹Z)_t, streamed (DP-FTRL / BandMF)
                noise = self._correlated_noise.sample(self.round, self.params)
            else:
                noise = self._noise(_seeds.NOISE).sample(self.round, self.params)
            for s, z in zip(sums, noise):
                s.add_(z, alpha=std)
        normaliser = self.public_normaliser
        if self.weighting is not None and self.weighting.private:   # released jointly with the sum
            noisy_weight = math.fsum(weights.values()) + self.weighting.weight_stddev * float(
                self._noise(_seeds.WEIGHT_NOISE).sample(self.round, [torch.zeros((), dtype=torch.float64)])[0])
            normaliser = max(noisy_weight, self.weighting.min_denominator)
        mean = [s / normaliser for s in sums]
        for p, m in zip(self.params, mean):
            p.grad = -m
        self.server_optimizer.step()
        for p in self.params:
            p.grad = None
        fraction = None
        if self.adaptive_clipping is not None:
            noisy = centred_count + self.count_stddev * float(
                self._noise(_seeds.COUNT_NOISE).sample(self.round, [torch.zeros((), dtype=torch.float64)])[0])
            self.clip_norm, fraction = self.adaptive_clipping.next_clip(clip, noisy, self.expected_cohort)
        self.accountant.compose(self.step_event)
        info = {
            "round": self.round + 1,  # 1-based: rounds completed, as Flower's server_round
            "clip_norm": clip,
            "normaliser": normaliser,
            "noisy_unclipped_fraction": fraction,
            "update_norm": math.sqrt(sum(float(m.double().square().sum()) for m in mean)),
            "nonprivate": {"cohort_size": len(cohort), "reporting_clients": len(updates),
                           "unclipped_fraction": unclipped / len(updates) if updates else None},
        }
        self.round += 1
        return info

    @torch.no_grad()
    def release_noised_sum(self, noised_sum: Sequence[torch.Tensor], *, reporting_clients: int) -> dict:
        """End a round whose clipped, noised SUM the clients formed themselves (distributed noise).

        For secure aggregation (:mod:`dpkit.federated.secure`): every reporting client clipped its
        update to S and added its noise share; the server saw only the sum. Here: divide by the
        public normaliser, step the server optimizer, account ``dpsgd_event(z, q)``. The caller
        is responsible for the sum carrying at least the accounted noise (z·S)².

        Args:
            noised_sum: tensors shaped like ``params``.
            reporting_clients: how many clients the sum aggregates (a diagnostic, not released).

        Raises:
            ValueError: adaptive clipping, correlated rounds or a private normaliser are set (their
                releases need server-side noise), or a malformed / non-finite sum.
        """
        if self.adaptive_clipping is not None or self.correlated is not None or (
                self.weighting is not None and self.weighting.private):
            raise ValueError("release_noised_sum needs a server without adaptive_clipping, correlated rounds "
                             "or a private normaliser (each adds server-side noise the clients cannot supply)")
        total = self._check_update("noised_sum", noised_sum)
        if not all(bool(torch.isfinite(t).all()) for t in total):
            raise ValueError("noised_sum must be finite")
        reporting = _validate.positive_int("reporting_clients", reporting_clients, allow_zero=True)
        cohort = self.sample_cohort()
        mean = [t / self.public_normaliser for t in total]
        for p, m in zip(self.params, mean):
            p.grad = -m
        self.server_optimizer.step()
        for p in self.params:
            p.grad = None
        self.accountant.compose(self.step_event)
        info = {"round": self.round + 1, "clip_norm": self.clip_norm, "normaliser": self.public_normaliser,
                "noisy_unclipped_fraction": None,
                "update_norm": math.sqrt(sum(float(m.double().square().sum()) for m in mean)),
                "nonprivate": {"cohort_size": len(cohort), "reporting_clients": reporting,
                               "unclipped_fraction": None}}
        self.round += 1
        return info

    def _noise(self, purpose: int) -> GaussianNoise:
        if self.secure_mode:
            return GaussianNoise(secure_mode=True)
        return GaussianNoise(_seeds.generator(self.seed, purpose, self.round))

    def _weights(self, updates, num_examples) -> dict:
        if self.weighting is None:
            if num_examples is not None:
                raise ValueError("num_examples is only used with weighting=ExampleWeighting(...); got it without")
            return {k: 1.0 for k in updates}
        if not isinstance(num_examples, Mapping):
            raise TypeError("num_examples must be a mapping client index -> example count with weighting; "
                            f"got {type(num_examples).__name__}")
        missing = [k for k in updates if k not in num_examples]
        if missing:
            raise ValueError(f"num_examples must give the example count of every reporting client; missing {missing[:5]}")
        return {k: self.weighting.weight(f"num_examples[{k}]", num_examples[k]) for k in updates}

    def _check_round_available(self) -> None:
        if self.correlated is not None and self.round >= self.correlated.rounds:
            raise ValueError(f"round {self.round + 1} is past the {self.correlated.rounds} rounds of the correlated "
                             "strategy (its noise and account cover only those): build a longer strategy")

    def _check_update(self, k, delta) -> list[torch.Tensor]:
        if isinstance(delta, torch.Tensor) or len(delta) != len(self.params):
            raise ValueError(f"updates[{k}] must be a sequence of {len(self.params)} tensors")
        out = []
        for i, (d, p) in enumerate(zip(delta, self.params)):
            if not isinstance(d, torch.Tensor) or d.shape != p.shape:
                raise ValueError(f"updates[{k}][{i}] must be a tensor of shape {tuple(p.shape)}; "
                                 f"got {getattr(d, 'shape', type(d).__name__)}")
            out.append(d.to(p.dtype))
        return out

    # ------------------------------------------------------------------ accounting
    def epsilon(self, delta) -> float:
        """ε spent by the rounds run so far, at ``delta`` (user-level, add/remove one user)."""
        return self.accountant.epsilon(_validate.delta("delta", delta))

    def state_dict(self) -> dict:
        """Run seed, round counter, current clip norm, global model, server optimizer and ledger.

        The seed is included so that :meth:`load_state_dict` into a freshly built server continues
        the (seed, round)-keyed sampling and noise streams at the saved round: the resumed rounds
        are exactly those of an uninterrupted run, never a replay of rounds 0, 1, ... The state
        therefore lets its holder regenerate the noise: store checkpoints as secret as the data.
        """
        return {"seed": self.seed, "secure_mode": self.secure_mode, "settings": self._settings(),
                "round": self.round, "clip_norm": self.clip_norm,
                "params": [p.clone() for p in self.params],
                # deep copy: torch returns live references to its state tensors, and its
                # load_state_dict reuses them, so two servers would otherwise share moments
                "server_optimizer": copy.deepcopy(self.server_optimizer.state_dict()),
                "accountant": self.accountant.state_dict(),
                "correlated_noise": (None if self._correlated_noise is None
                                     else self._correlated_noise.state_dict()),
                "cohort_sampler": None if self._cohort_sampler is None else self._cohort_sampler.state_dict()}

    def _settings(self) -> dict:
        # what a resumed run must repeat: the cohort and noise of round t depend on them
        return {"num_clients": self.num_clients, "sampling_rate": self.sampling_rate,
                "noise_multiplier": self.noise_multiplier,
                "update_noise_multiplier": self.update_noise_multiplier,
                "correlated": repr(self.correlated), "weighting": repr(self.weighting),
                "shapes": [tuple(p.shape) for p in self.params]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`, seed included (build the object with the same settings first).

        Raises:
            TypeError: ``state`` is not a dict.
            ValueError: ``state`` lacks the run seed (a checkpoint without it would restart the
                streams at a new seed silently), or was saved with a different ``secure_mode``,
                population, sampling rate, noise or model shapes.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(); got {type(state).__name__}")
        if "seed" not in state or "secure_mode" not in state:
            raise ValueError("state must come from DPFedAvg.state_dict() and contain 'seed' and "
                             "'secure_mode' (the run's random streams); got keys " + repr(sorted(state)))
        if bool(state["secure_mode"]) != self.secure_mode:
            raise ValueError(f"state was saved with secure_mode={state['secure_mode']}; build the "
                             f"server with the same secure_mode (got {self.secure_mode})")
        saved = {k: (list(map(tuple, v)) if k == "shapes" else v) for k, v in state["settings"].items()}
        if saved != self._settings():
            raise ValueError(f"state was saved with settings {saved}; this server has "
                             f"{self._settings()}: build it with the same settings to resume")
        with torch.no_grad():
            for p, q in zip(self.params, state["params"]):
                p.copy_(q)
        self.server_optimizer.load_state_dict(copy.deepcopy(state["server_optimizer"]))
        self.accountant.load_state_dict(state["accountant"])
        self.seed = None if self.secure_mode else int(state["seed"])
        if self._correlated_noise is not None:
            self._correlated_noise.load_state_dict(state["correlated_noise"])
        if self._cohort_sampler is not None:
            self._cohort_sampler.load_state_dict(state["cohort_sampler"])
        self.round, self.clip_norm, self._cohort = int(state["round"]), float(state["clip_norm"]), None

    def __repr__(self):
        return (f"DPFedAvg(num_clients={self.num_clients}, sampling_rate={self.sampling_rate}, "
                f"noise_multiplier={self.noise_multiplier}, clip_norm={self.clip_norm}, round={self.round})")
