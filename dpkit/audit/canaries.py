"""Gradient canaries inside a dpkit DP-SGD run, for one-shot privacy estimation (torch side).

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, ICLR 2024, "One-shot Empirical Privacy
Estimation for Federated Learning": canary clients whose update is a random unit direction,
clipped like everyone else. Here a canary is a virtual EXAMPLE of a DP-SGD run: at every logical
step each inserted canary is Poisson-sampled with the same rate q as the real examples and, when
sampled, adds C·u_j (its unit direction u_j scaled to the clip norm C, i.e. a gradient that is
exactly at the clipping bound) to the clipped sum, before noise and normalisation, through
:meth:`dpkit.DPOptimizer.register_contribution_hook`. A canary is therefore protected exactly
like a real example and the claimed (σ, q, T) covers it.

Because canaries are added to GRADIENTS, plain SGD moves the parameters along −u_j: the final-
model statistic is the cosine between θ_0 − θ_T and u_j. Unseen canaries (never inserted) give the
null. Optimizers that rescale coordinates (Adam, RMSprop) distort the directions; use SGD (with
or without momentum) for audits.

Cost: a step sums the directions of the ≈ q·m sampled canaries. For d ≤ 65,536 or on an
accelerator, the sums of a block of up to 256 steps come from ONE ``embedding_bag`` call over
256-column chunks taken chunk by chunk (no per-canary Python loop, no (k × d) gather copy, launch
costs paid once per block; a chunk's m × 256 slice of the table stays in cache while every step
of the block reads it, so the table is read from memory once per block, not k rows per step);
they are scaled by C and split into per-parameter views once per block, so a step only indexes a
list. For larger d on CPU, k streaming row adds per step (reading k·d floats: the floor of an
exact insertion of dense isotropic directions, see docs/auditing.md). Large models can confine
the canaries to a parameter subset (``parameters=``), which makes every cost scale with its size
d' instead of d. Memory: only the m inserted directions are kept (float32, on the parameters'
device; plus ≤ 16 MiB of block sums); the unseen ones are regenerated from the seed when scored.
Directions come from :func:`dpkit.audit.canary_directions` (counter-based from (seed, canary
index)), so the audit can be redone offline from the seed. The canaries' inclusion coins of
logical step t are keyed by (seed, ⌊t/64⌋) (row t mod 64 of that block's draw), so an auditor restored with
:meth:`CanaryAuditor.load_state_dict` next to a resumed optimizer draws exactly what an
uninterrupted run draws.

Randomness: the seed defaults to OS entropy. It is audit randomness, not privacy noise of the
real examples (they are protected by the optimizer's noise whatever the canaries are), so an
explicit seed does not warn; an auditor who wants a reproducible audit may fix it.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
import torch.nn.functional as F

from dpkit import _validate
from dpkit.audit.artifact import AuditArtifact
from dpkit.audit.canary_stats import canary_cosines, canary_directions
from dpkit.audit.one_shot import OneShotEstimate, one_shot_epsilon
from dpkit.optim.dp_optimizer import DPOptimizer

# columns per embedding_bag bag: the block's bags run chunk by chunk, so the m × 256 float32 slice
# of the table that a chunk's bags read (1 MiB for m = 1,000) stays in L2 across the block's ≈ n·q
# reads of each row: 1.3x faster than 1024-column chunks taken step by step (d = 4,810, 1 thread)
_CHUNK = 256
# Above this d, on CPU, k in-place row adds per step: each add streams one contiguous row (prefetch-
# friendly, its ≈ 3 µs launch < 10% of it); the budget leaves blocks too short for rows to be reused
# (16 steps at d = 203,530, ≈ 0.8 reads per row), where embedding_bag ran 1.1–1.2x slower.
_ROW_ADD_MIN_DIM = 65536
_MASK_BLOCK = 64  # steps whose canary coins are drawn together
# steps per block of canary sums (≤ _SUM_BUDGET): in a real run the table is cold again at each
# block (the steps in between evict it), so its m·d read is paid once per block; 256 steps amortise
# it to ≈ 80 KB per step for m = 1,000, d = 4,810 (64 steps: +2% step time on the 64→64→10 MLP)
_MAX_SUM_STEPS = 256
_SUM_BUDGET = 1 << 22  # floats (16 MiB) of canary sums precomputed for a block of up to 256 steps
_SCORE_BLOCK = 256  # unseen directions regenerated this many at a time when scoring


def _event_sampling_rate(event) -> float:
    """q of a per-step DP-SGD event (Poisson-sampled Gaussian, or the Gaussian itself: q = 1)."""
    from dp_accounting import dp_event

    if isinstance(event, dp_event.PoissonSampledDpEvent):
        return event.sampling_probability
    if isinstance(event, dp_event.GaussianDpEvent):
        return 1.0
    raise ValueError("sampling_rate must be given: it cannot be read from the optimizer's step "
                     f"event {event!r} (no noise, or not Poisson sampling)")


def _subset_indices(all_params, parameters) -> list[int]:
    """Positions (ascending) in the optimizer's trainable parameters of ``parameters`` (None: all)."""
    if parameters is None:
        return list(range(len(all_params)))
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    if isinstance(parameters, torch.nn.Module):
        raise TypeError(f"parameters must be tensors, not a {type(parameters).__name__}: pass "
                        "module.parameters()")
    position = {id(p): i for i, p in enumerate(all_params)}
    indices = []
    for k, p in enumerate(parameters):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters must be tensors of the optimizer; parameters[{k}] is a "
                            f"{type(p).__name__}")
        if id(p) not in position:
            raise ValueError(f"parameters[{k}] (shape {tuple(p.shape)}) is not a trainable parameter "
                             "of the optimizer: pass tensors of the model the optimizer was built on, "
                             "e.g. parameters=model[-1].parameters()")
        indices.append(position[id(p)])
    if not indices:
        raise ValueError("parameters must not be empty: pass None for all the optimizer's parameters")
    if len(set(indices)) != len(indices):
        raise ValueError("parameters must not repeat a tensor: list each canary parameter once")
    return sorted(indices)


class CanaryAuditor:
    """Insert Poisson-sampled gradient canaries into a :class:`dpkit.DPOptimizer`.

    Args:
        optimizer: the DPOptimizer of the run.
        num_canaries: inserted canaries (≥ 2).
        num_unseen: canaries never inserted, for the null distribution (≥ 2; default
            ``num_canaries``).
        sampling_rate: Poisson rate q in (0, 1] of the canaries; default: the q of the
            optimizer's per-step event (a Poisson-sampled Gaussian), so canaries are sampled
            exactly like real examples. Required when the event does not carry q (σ = 0, fixed-
            size batches).
        seed: integer seed of the directions and of the canaries' sampling (keyed by (seed, step));
            default None: 63 bits of OS entropy, kept in :attr:`seed` and :meth:`state_dict`.
        parameters: optional subset S of the optimizer's trainable parameters (e.g.
            ``model[-1].parameters()``) that holds the canaries; default: all of them. The canary
            space is the d' = Σ_{p ∈ S} numel(p) coordinates of S, concatenated in the optimizer's
            parameter order (whatever order they are given in): directions are uniform on the
            unit sphere of R^{d'} and zero on every other parameter, each inserted gradient still
            has norm C, scores are cosines of the S-part of θ_0 − θ_T, and the null is N(0, 1/d')
            (:attr:`dim` = d'). Valid because (Andrew et al., ICLR 2024, Sec. 3 with d → d'):
            (i) a canary C·u_j, ‖u_j‖ = 1, is a gradient at the clipping bound like any clipped
            example, so the claimed (σ, q, T) covers it and the mechanism that runs is unchanged;
            (ii) θ_S,T is a post-processing of the released θ_T, so nothing inferred from it can
            exceed the run's true ε; (iii) the Gaussian noise restricted to S is N(0, σ²C² I_{d'}),
            isotropic in the canary space, and an unseen direction uniform on its sphere is
            independent of θ_S,T, so its cosine has mean 0 and variance exactly 1/d'. Cost and
            memory scale with d' instead of d; keep m + m_unseen ≪ d' (the canaries interfere
            like random vectors in d' dimensions).

    Raises:
        TypeError: ``optimizer`` is not a DPOptimizer; non-integer counts or seed; ``parameters``
            is a module or holds something that is not a tensor.
        ValueError: counts < 2, q outside (0, 1] or not inferable, more canaries than
            parameters (d'), a distributed optimizer, ``parameters`` empty, repeated, or not
            trainable parameters of the optimizer.
    """

    def __init__(self, optimizer, *, num_canaries, num_unseen=None, sampling_rate=None, seed=None,
                 parameters=None):
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(f"optimizer must be a dpkit DPOptimizer; got {type(optimizer).__name__}")
        if optimizer.distributed:
            # every rank would add the same canaries before the all-reduce: k-fold contributions
            raise ValueError("optimizer must not be distributed: CanaryAuditor supports "
                             "single-process DP-SGD only")
        self.num_canaries = _validate.positive_int("num_canaries", num_canaries)
        self.num_unseen = _validate.positive_int(
            "num_unseen", self.num_canaries if num_unseen is None else num_unseen)
        for name, value in (("num_canaries", self.num_canaries), ("num_unseen", self.num_unseen)):
            if value < 2:
                raise ValueError(f"{name} must be >= 2; got {value!r}")
        if sampling_rate is None:
            sampling_rate = _event_sampling_rate(optimizer.step_event)
        self.sampling_rate = _validate.probability("sampling_rate", sampling_rate)
        self.seed = (secrets.randbits(63) if seed is None
                     else _validate.positive_int("seed", seed, allow_zero=True))
        self._optimizer = optimizer
        self._indices = _subset_indices(optimizer.params, parameters)
        self._params = [optimizer.params[i] for i in self._indices]
        self._numels = [p.numel() for p in self._params]
        self.dim = sum(self._numels)
        total = self.num_canaries + self.num_unseen
        if total > self.dim:
            what = "trainable parameters" if parameters is None else "coordinates in parameters"
            raise ValueError(f"num_canaries + num_unseen must be <= the number of {what} "
                             f"({self.dim}); got {total}")
        self._directions = self._make_directions(self._params[0].device)
        self._coins = {}  # the last few coin blocks: block index → (64, m) coins
        self._rows = (-1, None)  # (first step of a sum block, per step: C·Σ_{j sampled} u_j views)
        self._layout = (None, None)  # (ids of the hook's params, where each sits in the subset)
        self._theta0 = self._flat(self._params).clone()
        self.inclusions = np.zeros(self.num_canaries, dtype=np.int64)  # times each was sampled
        self._handle = optimizer.register_contribution_hook(self._contribute)

    def _make_directions(self, device) -> torch.Tensor:
        """Inserted directions as a zero-padded (m, c·256) table: its (m·c, 256) view has chunk r
        of canary j at row j·c + r, so one embedding_bag sums any canaries' chunks."""
        self._chunks = -(-self.dim // _CHUNK)
        # steps per sum block: a power of two (so sum and coin blocks nest) within budget
        fit = max(1, _SUM_BUDGET // (self._chunks * _CHUNK))
        self._sum_steps = min(_MAX_SUM_STEPS, 1 << (fit.bit_length() - 1))
        table = torch.zeros(self.num_canaries, self._chunks * _CHUNK, dtype=torch.float32, device=device)
        table[:, :self.dim] = torch.from_numpy(
            canary_directions(self.seed, self.num_canaries, self.dim, dtype=np.float32))
        return table

    def _inclusion_mask(self, step: int) -> np.ndarray:
        """Poisson coins of logical step ``step``: row ``step % 64`` of a block drawn from a stream
        keyed by (seed, tag, step // 64), separate from the directions, so a resumed auditor
        continues instead of replaying step 0's coins (one draw per 64 steps: a fresh generator
        costs ≈ 15 µs, 1.5% of a small model's step)."""
        return self._coin_block(int(step) // _MASK_BLOCK)[int(step) % _MASK_BLOCK]

    def _coin_block(self, block: int) -> np.ndarray:
        """(64, m) coins of steps 64·block … 64·block + 63, cached for the sum block's span."""
        coins = self._coins.get(block)
        if coins is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xCA7A, block]))
            coins = rng.random((_MASK_BLOCK, self.num_canaries)) < self.sampling_rate
            self._coins[block] = coins
            if len(self._coins) > max(1, self._sum_steps // _MASK_BLOCK):
                del self._coins[next(iter(self._coins))]  # the oldest
        return coins

    @staticmethod
    def _flat(params) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in params])

    def _split(self, flat: torch.Tensor) -> list:
        """(..., d') sums → one (..., *p.shape) tensor per subset parameter, in its dtype (views
        when the dtype already matches)."""
        lead = flat.shape[:-1]
        return [part.to(p.dtype).view(*lead, *p.shape)
                for part, p in zip(flat[..., :self.dim].split(self._numels, dim=-1), self._params)]

    def _block_rows(self, step: int) -> list:
        """C·Σ_{sampled j} u_j of ``step`` per subset parameter, from sums computed for its whole
        block of ``_sum_steps`` steps by ONE embedding_bag, scaled and split into parameter views
        once per block: a step only indexes a list (launch, index, cast and split costs paid once
        per block; the sums depend only on the seed, never on the data). Bag r·n + s is column
        chunk r of the canaries sampled at step s: rows j·c + r of the (m·c, 256) table view,
        chunk-major so that every step of the block reuses a chunk's rows from cache."""
        n, step = self._sum_steps, int(step)
        first = step - step % n
        if self._rows[0] != first:
            blocks = range(first // _MASK_BLOCK, (first + n - 1) // _MASK_BLOCK + 1)
            coins = np.concatenate([self._coin_block(b) for b in blocks])[first % _MASK_BLOCK:][:n]
            t, j = np.nonzero(coins)  # sorted by step
            counts = np.bincount(t, minlength=n)
            starts = np.cumsum(counts) - counts
            c, r = self._chunks, np.arange(self._chunks)[:, None]
            rows = (j * c + r).reshape(-1)  # (c, K): chunk r of every sampled canary, steps in order
            offsets = (r * t.size + starts).reshape(-1)  # empty bags sum to 0
            table = self._directions
            sums = F.embedding_bag(torch.from_numpy(rows).to(table.device), table.view(-1, _CHUNK),
                                   torch.from_numpy(offsets).to(table.device), mode="sum")
            sums = sums.view(c, n, _CHUNK).transpose(0, 1).reshape(n, -1)
            sums.mul_(float(self._optimizer.max_grad_norm))  # C·u_j: at the clip bound
            per_param = [v.unbind(0) for v in self._split(sums)]
            self._rows = (first, [list(row) if k else None for row, k in zip(zip(*per_param), counts)])
        return self._rows[1][step - first]

    def _streamed_rows(self, mask: np.ndarray) -> list | None:
        """Large d' on CPU: C·Σ_{sampled j} u_j as k streaming in-place row adds."""
        if not mask.any():
            return None
        table = self._directions
        flat = torch.zeros(table.shape[1], dtype=table.dtype)
        for j in np.flatnonzero(mask).tolist():
            flat.add_(table[j])
        return self._split(flat.mul_(float(self._optimizer.max_grad_norm)))

    def _subset_layout(self, params) -> list | None:
        """Where each of the hook's parameters sits in the subset (None: not a canary parameter);
        None when the hook's parameters ARE the subset. Cached on the parameters' ids."""
        ids = list(map(id, params))
        if ids != self._layout[0]:
            where = {id(p): i for i, p in enumerate(self._params)}
            layout = [where.get(i) for i in ids]
            if sorted(i for i in layout if i is not None) != list(range(len(self._params))):
                # e.g. lazily noised embedding tables are left out of the hook's parameters
                raise RuntimeError("CanaryAuditor: the optimizer's step does not pass every canary "
                                   "parameter through its dense step (lazy embedding noise?); build "
                                   "the auditor with parameters= a subset of the dense parameters")
            self._layout = (ids, None if layout == list(range(len(params))) else layout)
        return self._layout[1]

    def _contribute(self, step, params):
        """Contribution hook: C · Σ_{sampled j} u_j per parameter (None where it is all zero)."""
        layout = self._subset_layout(params)
        mask = self._inclusion_mask(step)
        self.inclusions += mask
        if self.dim > _ROW_ADD_MIN_DIM and self._directions.device.type == "cpu":
            rows = self._streamed_rows(mask)
        else:
            rows = self._block_rows(step)
        if rows is None or layout is None:
            return rows
        return [None if i is None else rows[i] for i in layout]

    def state_dict(self) -> dict:
        """Seed, settings, the canary parameters' positions, θ_0 and inclusion counts: with the
        optimizer's own checkpoint, enough to continue the audit in a new process (the directions
        are regenerated from the seed)."""
        return {"seed": self.seed, "num_canaries": self.num_canaries, "num_unseen": self.num_unseen,
                "sampling_rate": self.sampling_rate, "dim": self.dim,
                "parameter_indices": list(self._indices),
                "theta0": self._theta0.detach().cpu().clone(),
                "inclusions": torch.from_numpy(self.inclusions.copy())}  # tensors: weights_only loads

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into an auditor built on the resumed optimizer.

        Raises:
            TypeError: ``state`` is not a dict.
            ValueError: the counts, sampling rate, canary dimension or canary parameters (their
                positions among the optimizer's parameters) differ from this auditor's.
        """
        if not isinstance(state, dict) or "seed" not in state:
            raise TypeError("state must be a dict from CanaryAuditor.state_dict()")
        for key in ("num_canaries", "num_unseen", "sampling_rate", "dim"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]!r}; this auditor has "
                                 f"{key}={getattr(self, key)!r}: build it with the same settings")
        saved = [int(i) for i in state.get("parameter_indices", range(len(self._optimizer.params)))]
        if saved != self._indices:
            raise ValueError(f"state was saved with canaries in the optimizer's parameters {saved}; "
                             f"this auditor uses {self._indices}: pass the same parameters=")
        self.seed = int(state["seed"])
        self._coins, self._rows = {}, (-1, None)
        self._directions = self._make_directions(self._directions.device)
        self._theta0 = torch.as_tensor(state["theta0"]).to(self._theta0.device, self._theta0.dtype).clone()
        self.inclusions = torch.as_tensor(state["inclusions"]).numpy().astype(np.int64)

    def remove(self) -> None:
        """Stop inserting canaries (the recorded θ_0 and the directions are kept)."""
        self._handle.remove()

    def scores(self):
        """Final-model cosines of θ_0 − θ_now with the inserted and with the unseen canaries.

        Returns:
            (canary_scores, unseen_scores): two 1-D numpy arrays.

        Raises:
            ValueError: the parameters have not moved.
        """
        delta = (self._theta0 - self._flat(self._params)).cpu().numpy().astype(np.float64)
        inserted = self._directions[:, :self.dim].cpu().numpy().astype(np.float64)
        total = self.num_canaries + self.num_unseen
        unseen = [canary_cosines(delta, canary_directions(
            self.seed, np.arange(start, min(start + _SCORE_BLOCK, total)), self.dim))
            for start in range(self.num_canaries, total, _SCORE_BLOCK)]
        return canary_cosines(delta, inserted), np.concatenate(unseen)

    def estimate(self, *, delta, confidence=0.95) -> OneShotEstimate:
        """One-shot estimate of ε for the final model so far (Andrew et al., Sec. 3).

        Args:
            delta: δ in (0, 1).
            confidence: level of ``epsilon_lower``.

        Returns:
            :class:`dpkit.audit.OneShotEstimate` (null N(0, 1/d)).
        """
        canary, _ = self.scores()
        return one_shot_epsilon(canary, delta=delta, dim=self.dim, confidence=confidence)

    def artifact(self, *, delta, noise_multiplier=None, steps=None) -> AuditArtifact:
        """Package this run for :func:`dpkit.audit.audit` / ``dpkit audit``.

        Args:
            delta: δ in (0, 1) of the comparison.
            noise_multiplier: the CLAIMED σ (default: the optimizer's).
            steps: the claimed number of steps (default: steps the optimizer has taken).

        Returns:
            :class:`dpkit.audit.AuditArtifact` (final-model threat model, null N(0, 1/d) via
            ``dim`` plus the unseen canaries' scores for plots and diagnostics).
        """
        canary, unseen = self.scores()
        return AuditArtifact(
            canary_scores=canary, null_scores=unseen, dim=self.dim,
            noise_multiplier=(self._optimizer.noise_multiplier if noise_multiplier is None
                              else noise_multiplier),
            sampling_rate=self.sampling_rate,
            steps=self._optimizer.steps if steps is None else steps, delta=delta)
