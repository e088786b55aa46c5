"""DP-FTRL / BandMF across federated rounds: correlated noise over rounds and the account that matches it.

Instead of fresh noise every round (DP-FedAvg), the server adds ``z·S·sens·(C⁻¹ Z)_t`` to round
t's clipped sum, so the sequence of released models is ``B (C x + z·S·sens·Z)``: a matrix
mechanism over the rounds (Kairouz et al., "Practical and Private (Deep) Learning without
Sampling or Shuffling", ICML 2021 — tree aggregation, DP-FTRL; Choquette-Choo et al.,
"(Amplified) Banded Matrix Factorization", NeurIPS 2023 — BandMF with cyclic participation, the
production Gboard setting; Choquette-Choo, Ganesh, Steinke, Thakurta, "Privacy Amplification for
Matrix Mechanisms", ICLR 2024 — MMCC for Poisson participation).

:class:`CorrelatedRounds` names the strategy AND how users take part; from it
:class:`~dpkit.federated.dp_fedavg.DPFedAvg` builds the cohort sampler, the noise and the
accountant together, so they cannot disagree:

===========================  =======================================  ================================
participation                cohort of round t                        account
===========================  =======================================  ================================
``"poisson"``                every user independently with rate q     MMCC (non-negative square lower-
                                                                      triangular C, noise sensitivity
                                                                      = max column norm); any other C
                                                                      (e.g. a tree): the Gaussian with
                                                                      the sensitivity of taking part in
                                                                      EVERY round (no amplification)
``"cyclic"`` with b groups   users split once into b fixed groups;    banded C with ≤ b bands:
                             group t mod b, each member with rate q   amplified BandMF (Thm 4: DP-SGD
                                                                      with ⌈n/b⌉ rounds at rate q);
                                                                      other C: the Gaussian with the
                                                                      sensitivity of rounds j, j+b, …
===========================  =======================================  ================================

The strategy fixes the number of rounds n: a round past n is refused before anything is
released. Adaptive clipping (whose count release is accounted as DP-SGD) is refused with it.
"""

from __future__ import annotations

from dpkit import _validate
from dpkit.mechanisms.matrix.strategies import Strategy

PARTICIPATIONS = ("poisson", "cyclic")


class CorrelatedRounds:
    """Correlated noise across rounds (DP-FTRL / BandMF) and the participation it is accounted with.

    Args:
        strategy: a :mod:`dpkit.mechanisms.matrix` strategy over the planned rounds n
            (``banded(n, b)``, ``binary_tree(n)``, ``toeplitz_sqrt(n)``, ...).
        participation: ``"poisson"`` (every round samples the whole population with rate q) or
            ``"cyclic"`` (users in ``num_groups`` fixed groups; round t samples group t mod b with
            rate q — then q is the rate WITHIN the group and the public normaliser is q·M/b).
        num_groups: b for ``"cyclic"`` (1 ≤ b ≤ n); must be None for ``"poisson"``.

    Raises:
        TypeError, ValueError: bad arguments.
    """

    def __init__(self, strategy: Strategy, *, participation: str = "poisson", num_groups: int | None = None):
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a dpkit.mechanisms.matrix Strategy; got {type(strategy).__name__}")
        self.strategy = strategy
        self.participation = _validate.one_of("participation", participation, PARTICIPATIONS)
        if self.participation == "cyclic":
            if num_groups is None:
                raise ValueError("num_groups must be given with participation='cyclic'")
            self.num_groups = _validate.positive_int("num_groups", num_groups)
            if self.num_groups > strategy.n:
                raise ValueError(f"num_groups must be <= the strategy's rounds n={strategy.n}; got {num_groups}")
        else:
            if num_groups is not None:
                raise ValueError(f"num_groups must be None with participation='poisson'; got {num_groups!r}")
            self.num_groups = 1

    @property
    def rounds(self) -> int:
        """n, the rounds the strategy covers."""
        return self.strategy.n

    def __repr__(self):
        extra = f", num_groups={self.num_groups}" if self.participation == "cyclic" else ""
        return f"CorrelatedRounds({self.strategy!r}, participation={self.participation!r}{extra})"


def build_round_mechanism(rounds: CorrelatedRounds, *, num_clients: int, sampling_rate: float,
                          noise_multiplier: float, seed: int | None, accountant):
    """The cohort sampler, the streaming noise and the accountant of ``rounds``, from one description.

    Args:
        rounds: the :class:`CorrelatedRounds`.
        num_clients: M. sampling_rate: q. noise_multiplier: z > 0.
        seed: the run seed (noise and group/coin seeds are derived from it); None = secure mode
            (OS entropy; the noise seed is kept in the noise's state).
        accountant: a registered accountant name (the analysis is chosen from the table in the
            module docstring) or a ``MatrixMechanismAccountant`` describing the same mechanism.

    Returns:
        ``(noise, sampler, accountant)``; ``sampler`` is a ``CyclicPoissonSampler`` over the users
        for ``"cyclic"``, else None (DPFedAvg's own Poisson sampler).

    Raises:
        ValueError: z = 0, more groups than users, or an accountant that does not describe this
            mechanism (wrong method, sensitivity or sampler).
    """
    from dpkit.accountants.mmcc import MatrixMechanismAccountant
    from dpkit.federated import _seeds
    from dpkit.mechanisms.matrix import CorrelatedNoise, CyclicPoissonSampler, Participation
    from dpkit.mechanisms.matrix.plan import is_mmcc_encoder, matrix_accountant

    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 with correlated rounds; got {noise_multiplier!r}")
    strategy = rounds.strategy
    n = strategy.n
    C = strategy.encoder()
    noise_seed = None if seed is None else _seeds.derive_seed(seed, _seeds.CORRELATED_NOISE)
    sampler = None
    if rounds.participation == "cyclic":
        if rounds.num_groups > num_clients:
            raise ValueError(f"num_groups must be <= num_clients ({num_clients}); got {rounds.num_groups}")
        sampler = CyclicPoissonSampler(num_clients, rounds.num_groups, sampling_rate, n,
                                       seed=None if seed is None else _seeds.derive_seed(seed, _seeds.GROUPS),
                                       secure_mode=seed is None)
        if strategy.kind == "banded" and strategy.bands <= rounds.num_groups:
            noise = CorrelatedNoise(strategy, seed=noise_seed)   # max column norm: Thm 4's sensitivity
            return noise, sampler, matrix_accountant(noise, accountant, noise_multiplier=noise_multiplier,
                                                     sampling_prob=sampling_rate, sampler=sampler)
        # no amplification: rounds j, j+b, ... of one group, the cyclic sensitivity covers them
        noise = CorrelatedNoise(strategy, participation=Participation.cyclic(rounds.num_groups), seed=noise_seed)
        if isinstance(accountant, str):
            accountant = MatrixMechanismAccountant(C, noise_multiplier=noise_multiplier, sampling_prob=sampling_rate,
                                                   sensitivity=noise.sensitivity, method="unamplified")
        elif not (isinstance(accountant, MatrixMechanismAccountant) and accountant.method == "unamplified"
                  and abs(accountant.sensitivity - noise.sensitivity) <= 1e-9 * noise.sensitivity):
            raise ValueError(f"accountant must be a registered name, or MatrixMechanismAccountant(method='unamplified', "
                             f"sensitivity={noise.sensitivity}) for {strategy!r} with cyclic participation (no "
                             "amplification applies; the sensitivity is that of rounds j, j+b, ...)")
        return noise, sampler, accountant
    if C.shape[0] == C.shape[1] and is_mmcc_encoder(C):
        noise = CorrelatedNoise(strategy, seed=noise_seed)
    else:
        noise = CorrelatedNoise(strategy, participation=Participation.min_separation(1, n), seed=noise_seed)
    return noise, None, matrix_accountant(noise, accountant, noise_multiplier=noise_multiplier,
                                          sampling_prob=sampling_rate, sampler="poisson")
