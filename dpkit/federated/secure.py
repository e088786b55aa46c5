"""DP-FedAvg under Flower's secure aggregation (SecAgg+) with distributed noise.

Protocol (per round), combining Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017) / Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead" (CCS 2020, SecAgg+, as implemented by Flower's
``SecAggPlusWorkflow`` / ``secaggplus_mod``) with distributed Gaussian noise (each client adds a
share, as in Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021, here with continuous shares and subtractive dither):

1. The server Poisson-samples the cohort exactly as :class:`~dpkit.federated.dp_fedavg.DPFedAvg`
   (same (seed, round) stream, same accounted q). If fewer than ``min_cohort`` sampled clients are
   connected, the round carries no client data: it is a noise-only round (accounted).
2. Client k trains, clips Δ_k to L2 norm S, adds a share ξ_k ~ N(0, (z·S)²/m_min) drawn from OS
   entropy (the server never learns it), adds a public dither u_k ~ U[−h/2, h/2]^d (keyed by
   (run, round, client), known to the server) and rounds to the grid h·ℤ:
   g_k = h·round((clip(Δ_k) + ξ_k + u_k)/h). On the grid, Flower's stochastic quantisation is the
   identity (R and h are powers of two: the arithmetic is exact).
3. SecAgg+ (complete graph, so every client sees the survivor list) reveals only Σ_k g_k; the
   clients' :func:`min_cohort_mod` refuses to release its key shares when fewer than
   ``min_cohort`` clients survived, so a too-small sum is never unmasked.
4. The server subtracts Σ_k u_k: by subtractive dithering (Schuchman 1964) the rounding errors are
   i.i.d. U[−h/2, h/2] and independent of everything else, so the result is
   Σ clip(Δ_k) + Σ ξ_k + (independent noise): post-processing of the Gaussian mechanism whose
   noise has variance n_surv·(z·S)²/m_min ≥ (z·S)² — at least the accounted noise.

Threat model. Honest-but-curious server (follows the protocol, tries to learn from what it sees);
honest clients (they clip, add their share, run ``min_cohort_mod``). Against the server alone the
round is the accounted Gaussian mechanism (z, q) whatever the drop-outs, because (a) a sum of fewer
than m_min shares is never unmasked and (b) more survivors only add noise. NOT covered: clients
colluding with the server (c colluders remove c shares: the noise drops to (n−c)/m_min of the
accounted variance — raise ``min_cohort`` margin accordingly) and malicious clients (they can
bias the sum; they cannot weaken others' privacy below (b) unless colluding).

Overflow. A coordinate of clip(Δ_k) + ξ_k + u_k beyond the quantisation range ±R would be clamped
(a data-dependent change). R is the smallest power of two with R ≥ S + h + c·s (s the share std),
c chosen so that P(any clamp in a round) ≤ M·d·2Φ(−c) ≤ ``overflow_delta``; the run is then
(ε, δ + rounds·overflow_delta)-DP where (ε, δ) is the accounted Gaussian mechanism, and
:meth:`SecureDPFedAvgStrategy.epsilon` reports ε at δ − rounds·overflow_delta.

Modular range. Flower sums integers modulo 2^32; the quantisation range T is 2^32 / 2^⌈log2(M+1)⌉
so that the sum of any cohort (≤ M clients) cannot wrap.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from scipy import special

try:
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.server.workflow import SecAggPlusWorkflow
except ImportError as err:  # pragma: no cover - exercised only without flwr
    raise ImportError("dpkit.federated.secure needs Flower: pip install 'dpkit[flower]'") from err

from dpkit import _validate
from dpkit.federated import _seeds
from dpkit.federated.client import LocalTrainer
from dpkit.federated.flower import CLIENT_KEY, ROUND_KEY, DPFedAvgClient, DPFedAvgStrategy

CLIP_KEY, SHARE_KEY, STEP_KEY, DITHER_KEY = "dpkit_clip", "dpkit_share_std", "dpkit_grid_step", "dpkit_dither_seed"
MODULUS_BITS = 32
DITHER = 0x64697468   # purpose key of the public dither streams


def dither(seed: int, shapes, step: float) -> list[np.ndarray]:
    """The public dither u ~ U[−step/2, step/2] for one (round, client) stream ``seed``."""
    rng = np.random.default_rng(seed)
    return [(rng.random(shape) - 0.5) * step for shape in shapes]


def min_cohort_mod(min_cohort: int):
    """A ClientApp mod refusing SecAgg+'s unmask stage when fewer than ``min_cohort`` clients survived.

    With the complete graph (:meth:`SecureDPFedAvgStrategy.fit_workflow`) each client's list of
    active neighbours is the survivor set; without our key shares the server cannot unmask a sum
    carrying fewer than ``min_cohort`` noise shares.
    """
    min_cohort = _validate.positive_int("min_cohort", min_cohort)

    def mod(msg, ctxt, call_next):
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and cfg.get(Key.STAGE) == Stage.UNMASK:
            survivors = len(cfg[Key.ACTIVE_NODE_ID_LIST])
            if survivors < min_cohort:
                raise ValueError(f"refusing to unmask: {survivors} clients survived, fewer than min_cohort="
                                 f"{min_cohort} noise shares")
        return call_next(msg, ctxt)

    return mod


class SecureDPFedAvgClient(DPFedAvgClient):
    """Client side of :mod:`dpkit.federated.secure`: clip, add a noise share, dither, round to the grid.

    The share comes from OS entropy (never from a seed the server knows); local shuffling as in
    :class:`~dpkit.federated.flower.DPFedAvgClient`.
    """

    def fit(self, parameters, config):
        for key in (CLIP_KEY, SHARE_KEY, STEP_KEY, DITHER_KEY):
            if key not in config:
                raise ValueError(f"fit config must contain {key!r}: use SecureDPFedAvgStrategy with this client")
        g = _seeds.generator(self.seed, _seeds.LOCAL, int(config[ROUND_KEY]), int(config[CLIENT_KEY]))
        global_params = [torch.from_numpy(np.array(a)).to(p.device, p.dtype) for a, p in zip(parameters, self.trainer.params)]
        delta = [d.double().cpu().numpy() for d in self.trainer.update(global_params, self.user_data(config), g)]
        clip, share, step = float(config[CLIP_KEY]), float(config[SHARE_KEY]), float(config[STEP_KEY])
        norm = math.sqrt(sum(float(np.square(d).sum()) for d in delta))
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        noise_rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))   # secret share
        u = dither(int(config[DITHER_KEY]), [d.shape for d in delta], step)
        out = [step * np.round((factor * d + share * noise_rng.standard_normal(d.shape) + ui) / step)
               for d, ui in zip(delta, u)]
        return out, 1, {}   # weight 1: SecAgg+ returns the plain mean, the server rescales to the sum


def make_secure_client_app(model, data, client_optimizer, *, min_cohort, local_epochs=1, local_batch_size=10,
                           loss_fn=None, seed=None) -> ClientApp:
    """``ClientApp`` with ``min_cohort_mod`` and Flower's ``secaggplus_mod`` around :class:`SecureDPFedAvgClient`.

    Args: as :func:`dpkit.federated.flower_engine.make_client_app`, plus ``min_cohort`` (the
    strategy's). Raises: TypeError, ValueError on bad arguments.
    """
    import copy

    from dpkit.federated.flower_engine import PARTITION_KEY

    LocalTrainer(copy.deepcopy(model), client_optimizer, epochs=local_epochs, batch_size=local_batch_size,
                 loss_fn=loss_fn)
    clients = data.clients

    def client_fn(context):
        trainer = LocalTrainer(copy.deepcopy(model), client_optimizer, epochs=local_epochs,
                               batch_size=local_batch_size, loss_fn=loss_fn)
        k = int(context.node_config[PARTITION_KEY])   # reported by get_properties (identity="query")
        return SecureDPFedAvgClient(trainer, clients[k], seed=seed, index=k, population=clients).to_client()

    return ClientApp(client_fn=client_fn, mods=[min_cohort_mod(min_cohort), secaggplus_mod])


class SecureDPFedAvgStrategy(DPFedAvgStrategy):
    """DP-FedAvg whose noise is added by the clients under SecAgg+ (see the module docstring).

    Args:
        min_cohort: m_min ≥ 2; each share has variance (z·S)²/m_min, a round is unmasked only
            with ≥ m_min survivors, and a round with fewer connected sampled clients is noise-only.
        reconstruction_threshold: SecAgg+'s share threshold (fraction of the cohort, in (0, 1]).
        overflow_delta: bound on the probability that a round clamps a coordinate (added to δ).
        other arguments: as :class:`~dpkit.federated.flower.DPFedAvgStrategy` (adaptive clipping,
            correlated rounds and a private normaliser are refused: they need server-side noise).

    Raises:
        ValueError, TypeError: bad arguments, or a combination the clients cannot noise.
    """

    def __init__(self, initial_parameters, *, min_cohort, reconstruction_threshold=0.5, overflow_delta=1e-12,
                 **kwargs):
        super().__init__(initial_parameters, **kwargs)
        server = self.dpfedavg
        if server.adaptive_clipping is not None or server.correlated is not None or (
                server.weighting is not None):
            raise ValueError("SecureDPFedAvgStrategy supports fixed clipping, per-round noise and uniform weights "
                             "only (adaptive clipping, correlated rounds and weighting need server-side releases)")
        self.min_cohort = _validate.positive_int("min_cohort", min_cohort)
        if self.min_cohort < 2:
            raise ValueError(f"min_cohort must be >= 2 (SecAgg+ needs two clients); got {min_cohort}")
        self.reconstruction_threshold = _validate.probability("reconstruction_threshold", reconstruction_threshold)
        self.overflow_delta = _validate.probability("overflow_delta", overflow_delta)
        if server.noise_multiplier == 0:
            raise ValueError("noise_multiplier must be > 0 with distributed noise")
        dim = sum(p.numel() for p in server.params)
        self.share_std = server.noise_multiplier * server.clip_norm / math.sqrt(self.min_cohort)
        self.quantization_range = 2 ** (MODULUS_BITS - math.ceil(math.log2(server.num_clients + 1)))
        if self.quantization_range < 2 ** 8:
            raise ValueError(f"num_clients={server.num_clients} leaves too few quantisation levels in 2^32")
        # c with M·d·2Φ(−c) ≤ overflow_delta
        c = math.sqrt(2) * special.erfcinv(self.overflow_delta / (server.num_clients * dim))
        needed = server.clip_norm + c * self.share_std
        self.clipping_range = 2.0 ** math.ceil(math.log2(needed * (1 + 2 / self.quantization_range)))
        self.grid_step = 2 * self.clipping_range / self.quantization_range
        self._pending = None   # (round, user indices sent) while SecAgg+ runs
        # public dither streams: from the run seed, or (secure mode) a fresh OS-entropy base
        self._dither_base = server.seed if server.seed is not None else _seeds.resolve_seed("dither", None)

    def fit_workflow(self, timeout: float | None = None) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ workflow with the complete graph and this strategy's quantisation."""
        return SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=self.reconstruction_threshold,
                                  max_weight=1.0, clipping_range=self.clipping_range,
                                  quantization_range=self.quantization_range,
                                  modulus_range=2 ** MODULUS_BITS, timeout=timeout)

    def epsilon(self, delta=None) -> float:
        """User-level ε at ``delta`` including the overflow probability (see the module docstring).

        Raises:
            ValueError: ``delta`` does not exceed rounds·overflow_delta.
        """
        delta = self.delta if delta is None else _validate.delta("delta", delta)
        spent = self.dpfedavg.round * self.overflow_delta
        if not delta > spent:
            raise ValueError(f"delta must exceed rounds·overflow_delta = {spent}; got {delta}")
        return self.dpfedavg.epsilon(delta - spent)

    def configure_fit(self, server_round, parameters, client_manager):
        """As DPFedAvgStrategy, plus the public share std, grid step and per-client dither seeds."""
        self.settle()   # a previous round whose SecAgg+ failed: accounted, never skipped
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if not instructions:
            return []
        if len(instructions) < self.min_cohort:
            self._sent = None
            self._noise_only_round()
            return []
        rnd = self.dpfedavg.round
        out = []
        for proxy, ins in instructions:
            k = ins.config[CLIENT_KEY]
            cfg = dict(ins.config)
            cfg.update({CLIP_KEY: self.dpfedavg.clip_norm, SHARE_KEY: self.share_std, STEP_KEY: self.grid_step,
                        DITHER_KEY: self._dither_seed(rnd, k)})
            out.append((proxy, FitIns(ins.parameters, cfg)))
        self._pending = (rnd, [ins.config[CLIENT_KEY] for _, ins in instructions])
        return out

    def aggregate_fit(self, server_round, results, failures):
        """Σ g_k = n·(SecAgg+ mean); subtract the reporting clients' dither; release (no server noise)."""
        if self._sent is None or self._pending is None:
            raise RuntimeError("aggregate_fit called without a configured round")
        rnd, _ = self._pending
        reporting = sorted(self.client_index(proxy) for proxy, _ in results)
        self._pending, self._sent = None, None
        if len(reporting) < self.min_cohort:   # never unmasked by honest clients; refuse to use it
            info = self._noise_only_round()
            return ndarrays_to_parameters(self.current_parameters), {"epsilon": info["epsilon"]}
        mean = parameters_to_ndarrays(results[0][1].parameters)
        shapes = [tuple(p.shape) for p in self.dpfedavg.params]
        total = [np.asarray(a, dtype=np.float64) * len(reporting) for a in mean]
        for k in reporting:
            for t, u in zip(total, dither(self._dither_seed(rnd, k), shapes, self.grid_step)):
                t -= u
        info = self._record(self.dpfedavg.release_noised_sum(
            [torch.from_numpy(t.reshape(s)).to(p.device, p.dtype) for t, s, p in zip(total, shapes, self.dpfedavg.params)],
            reporting_clients=len(reporting)))
        return ndarrays_to_parameters(self.current_parameters), {"epsilon": info["epsilon"]}

    def _dither_seed(self, rnd: int, k: int) -> int:
        return _seeds.derive_seed(self._dither_base, DITHER, rnd, k)

    def _noise_only_round(self) -> dict:
        """A round without client data: the server adds the full noise itself and accounts it."""
        return self._record(self.dpfedavg.aggregate({}))

    def settle(self) -> None:
        """Account a round whose SecAgg+ run failed before ``aggregate_fit`` (as noise-only)."""
        if self._pending is not None:
            self._pending, self._sent = None, None
            self._noise_only_round()
