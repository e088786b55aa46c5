"""Flower adapter: dpkit's DP-FedAvg as a Flower ``Strategy``, a client helper, an in-process driver.

Optional dependency (``pip install dpkit[flower]``); this module is never imported by
``dpkit.federated`` itself. It targets Flower's ``flwr.server.strategy.Strategy`` interface
(``configure_fit`` / ``aggregate_fit``), which Flower's ``Server`` drives with any transport:
gRPC, the Ray-based simulation engine, or :func:`run_in_process` below (threads, no Ray).

Everything privacy-relevant happens in :class:`~dpkit.federated.dp_fedavg.DPFedAvg`, the object
dpkit's own simulator drives too: ``configure_fit`` Poisson-samples the cohort from the WHOLE
population 0..M−1 (a sampled client that is not connected is a drop-out, which costs no privacy;
sampling only among the connected clients would not match the accounted q), ``aggregate_fit``
clips each Δ_k = (returned weights − sent weights), adds the noise once to the sum, divides by q·M,
steps the server optimizer and accounts ``dpsgd_event(z, q)``.

Empty cohorts: Flower's ``Server.fit_round`` skips ``aggregate_fit`` when ``configure_fit`` returns
no instructions, but a Poisson round with nobody sampled must still release noise. The strategy
therefore runs the noise-only round itself inside ``configure_fit`` and keeps the authoritative
global model (:attr:`DPFedAvgStrategy.current_parameters`): the next round sends ITS parameters,
not the server's copy (which Flower does not update for a skipped round).
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch

try:
    from flwr.client import NumPyClient
    from flwr.common import (Code, DisconnectRes, EvaluateRes, FitIns, GetPropertiesRes,
                             Status, ndarrays_to_parameters, parameters_to_ndarrays)
    from flwr.server import Server, SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy
except ImportError as err:  # pragma: no cover - exercised only without flwr
    raise ImportError("dpkit.federated.flower needs Flower: pip install 'dpkit[flower]' (flwr>=1.42,<2)") from err

from dpkit import _validate
from dpkit.federated import _seeds
from dpkit.federated.client import LocalTrainer
from dpkit.federated.dp_fedavg import DPFedAvg

ROUND_KEY, CLIENT_KEY = "dpkit_round", "dpkit_client"


class DPFedAvgStrategy(Strategy):
    """Flower strategy running dpkit's user-level DP-FedAvg (McMahan et al., ICLR 2018, Alg. 1).

    Args:
        initial_parameters: the initial global model as a list of numpy arrays.
        num_clients: population size M (clients are indexed 0..M−1 through ``client_index``).
        sampling_rate, noise_multiplier, clip_norm, server_optimizer, adaptive_clipping,
        accountant, seed, secure_mode, correlated, weighting: as in :class:`~dpkit.federated.dp_fedavg.DPFedAvg` (seed
            None, the default: OS entropy, kept in :meth:`state_dict`; an explicit seed warns).
        delta: δ of the ε reported in the fit metrics.
        client_index: ``proxy -> int | None`` mapping a Flower client to its population index
            (None: the node serves no user); default ``int(proxy.cid)``. On Flower's engines
            :func:`dpkit.federated.flower_engine.make_server_app` sets it from the nodes' answers.
        evaluate_fn: optional ``(server_round, list of ndarrays) -> (loss, metrics) | None`` for
            centralised evaluation of the released model.
        epsilon_every: compute ε for the fit metrics every this many rounds (others report None).

    Raises:
        ValueError, TypeError: as :class:`DPFedAvg`, or a bad ``client_index`` / ``evaluate_fn``.
    """

    def __init__(self, initial_parameters, *, num_clients, sampling_rate, noise_multiplier, clip_norm,
                 server_optimizer="fedavg", adaptive_clipping=None, accountant="pld", seed=None,
                 secure_mode=False, delta=1e-5, client_index: Callable | None = None,
                 evaluate_fn: Callable | None = None, epsilon_every=1, correlated=None, weighting=None):
        arrays = [np.asarray(a) for a in initial_parameters]
        self.dpfedavg = DPFedAvg([torch.from_numpy(a.copy()) for a in arrays], num_clients=num_clients,
                                 sampling_rate=sampling_rate, noise_multiplier=noise_multiplier,
                                 clip_norm=clip_norm, server_optimizer=server_optimizer,
                                 adaptive_clipping=adaptive_clipping, accountant=accountant, seed=seed,
                                 secure_mode=secure_mode, correlated=correlated, weighting=weighting)
        self.delta = _validate.delta("delta", delta)
        self.epsilon_every = _validate.positive_int("epsilon_every", epsilon_every)
        for name, fn in (("client_index", client_index), ("evaluate_fn", evaluate_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None; got {type(fn).__name__}")
        self.client_index = client_index or (lambda proxy: int(proxy.cid))
        self.evaluate_fn = evaluate_fn
        self.history: list[dict] = []
        self._sent: list[torch.Tensor] | None = None

    @property
    def current_parameters(self) -> list[np.ndarray]:
        """The released global model (authoritative, also after noise-only empty rounds)."""
        return [p.detach().cpu().numpy().copy() for p in self.dpfedavg.params]

    def epsilon(self, delta=None) -> float:
        """User-level ε spent so far."""
        return self.dpfedavg.epsilon(self.delta if delta is None else delta)

    def state_dict(self) -> dict:
        """Checkpoint between rounds: the DPFedAvg server state (run seed, round, model, server
        optimizer, ledger) and ``history``. Keep it secret: the seed regenerates the noise.

        Raises:
            RuntimeError: called between ``configure_fit`` and ``aggregate_fit`` (a round is in flight).
        """
        if self._sent is not None:
            raise RuntimeError("state_dict must be taken between rounds; a round is in flight "
                               "(configure_fit ran, aggregate_fit has not)")
        return {"dpfedavg": self.dpfedavg.state_dict(), "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into a strategy built with the same settings; Flower's next
        ``configure_fit`` then samples and noises round ``state``'s round, as an uninterrupted run
        would (Flower's own ``server_round`` restarts at 1 in a new ``Server.fit``; dpkit keys its
        streams by its own round counter, not Flower's)."""
        if not isinstance(state, dict) or "dpfedavg" not in state:
            raise TypeError("state must be a dict from DPFedAvgStrategy.state_dict()")
        self.dpfedavg.load_state_dict(state["dpfedavg"])
        self.history = [dict(r) for r in state["history"]]
        self._sent = None

    # ---------------------------------------------------------------- Flower interface
    def initialize_parameters(self, client_manager):
        """The initial global model (Flower's server starts from it)."""
        return ndarrays_to_parameters(self.current_parameters)

    def configure_fit(self, server_round, parameters, client_manager):
        """Poisson-sample the cohort from the whole population; run empty rounds here (noise only)."""
        proxies = {}
        for proxy in client_manager.all().values():
            k = self.client_index(proxy)
            if k is None:
                continue   # a node serving no user (e.g. it did not answer the identity query)
            if not (isinstance(k, int) and 0 <= k < self.dpfedavg.num_clients):
                raise ValueError(f"client_index must map every client to an int in [0, {self.dpfedavg.num_clients}); "
                                 f"got {k!r} for cid {proxy.cid!r}")
            proxies[k] = proxy
        cohort = self.dpfedavg.sample_cohort()
        present = [k for k in cohort if k in proxies]   # absent sampled clients are drop-outs
        if not present:
            self._record(self.dpfedavg.aggregate({}))    # noise-only round: Flower would skip it
            return []
        self._sent = [p.clone() for p in self.dpfedavg.params]
        fit_ins_params = ndarrays_to_parameters(self.current_parameters)
        return [(proxies[k], FitIns(fit_ins_params, {ROUND_KEY: self.dpfedavg.round, CLIENT_KEY: k}))
                for k in present]

    def aggregate_fit(self, server_round, results, failures):
        """Δ_k = returned − sent weights; clip, noise once, divide by q·M, step, account (DPFedAvg)."""
        if self._sent is None:
            raise RuntimeError("aggregate_fit called without a configured round")
        updates, counts = {}, {}
        for proxy, res in results:
            k = self.client_index(proxy)
            if k in updates:
                raise ValueError(f"client {k} returned two results in one round")
            weights = parameters_to_ndarrays(res.parameters)
            if len(weights) != len(self._sent):
                raise ValueError(f"client {k} returned {len(weights)} arrays; expected {len(self._sent)}")
            updates[k] = [_minus(w, s)
                          for w, s in zip(weights, self._sent)]
            counts[k] = res.num_examples   # the client's example count (used with weighting)
        self._sent = None
        weighted = self.dpfedavg.weighting is not None
        info = self._record(self.dpfedavg.aggregate(updates, counts if weighted else None))   # failures: drop-outs, nothing to add
        metrics = {"epsilon": info["epsilon"], "clip_norm": info["clip_norm"]}
        return ndarrays_to_parameters(self.current_parameters), metrics

    def settle(self) -> None:
        """Account a configured round whose ``aggregate_fit`` never came (the workflow failed) as a
        noise-only round: nothing it did is left out of the ledger."""
        if self._sent is not None:
            self._sent = None
            self._record(self.dpfedavg.aggregate({}))

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # federated evaluation would be another (unaccounted) release: not offered

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        """Centralised evaluation of the strategy's (authoritative) model with ``evaluate_fn``."""
        if self.evaluate_fn is None:
            return None
        return self.evaluate_fn(server_round, self.current_parameters)

    def _record(self, info: dict) -> dict:
        due = info["round"] % self.epsilon_every == 0
        info["epsilon"] = self.epsilon() if due else None
        info["delta"] = self.delta
        self.history.append(info)
        return info


def _minus(weights, sent: torch.Tensor) -> torch.Tensor:
    """Δ = returned − sent; a wrongly shaped array is left for DPFedAvg to refuse with a ValueError."""
    w = torch.from_numpy(np.array(weights)).to(sent.device, sent.dtype)
    return w - sent if w.shape == sent.shape else w


class DPFedAvgClient(NumPyClient):
    """Flower client running dpkit's local training (:class:`LocalTrainer`) on its own data.

    Returns the locally trained weights; the strategy forms Δ and clips it. The shuffling stream
    is keyed by (seed, round, client) — the same stream dpkit's simulator uses — so a Flower run
    and a simulator run with the same seeds train identically.

    Args:
        trainer: a :class:`LocalTrainer` (its model is this client's work model).
        data: the client's ``(x, y)`` tensors.
        seed: the run seed for local shuffling (default None: fresh OS entropy per round).
            Local shuffling is not privacy noise (the server's clipping and noise protect the
            user whatever the local procedure), so a fixed seed does not warn.
        index: the client's population index, reported by :meth:`get_properties` so that a
            server on Flower's engines (node ids are random there) can map nodes to users.
        population: for simulated nodes, every user's ``(x, y)``: ``fit`` then trains the user the
            server assigned (``dpkit_client`` in the config), ``data`` is unused.
    """

    def __init__(self, trainer: LocalTrainer, data, *, seed=None, index=None, population=None):
        if not isinstance(trainer, LocalTrainer):
            raise TypeError(f"trainer must be a dpkit LocalTrainer; got {type(trainer).__name__}")
        self.trainer, self.data = trainer, data
        self.seed = None if seed is None else _validate.positive_int("seed", seed, allow_zero=True)
        self.index = None if index is None else _validate.positive_int("index", index, allow_zero=True)
        self.population = population

    def get_properties(self, config):
        """``{"dpkit_client": index}`` (the population index this client answers for), if known."""
        return {} if self.index is None else {CLIENT_KEY: self.index}

    def get_parameters(self, config):
        return [p.detach().cpu().numpy().copy() for p in self.trainer.params]

    def user_data(self, config):
        """The data this fit trains: its own, or (a simulated node, ``population`` given) the data
        of the user the server assigned in ``config``."""
        if self.population is None:
            return self.data
        k = int(config[CLIENT_KEY])
        if not 0 <= k < len(self.population):
            raise ValueError(f"config[{CLIENT_KEY!r}] must be a user index in [0, {len(self.population)}); got {k}")
        return self.population[k]

    def fit(self, parameters, config):
        g = _seeds.generator(self.seed, _seeds.LOCAL, int(config[ROUND_KEY]), int(config[CLIENT_KEY]))
        global_params = [torch.from_numpy(np.array(a)).to(p.device, p.dtype) for a, p in zip(parameters, self.trainer.params)]
        data = self.user_data(config)
        self.trainer.update(global_params, data, g)
        return self.get_parameters(config), int(data[1].shape[0]), {}


def make_client_fn(model, data, client_optimizer, *, local_epochs=1, local_batch_size=10, loss_fn=None, seed=None):
    """``cid -> flwr Client`` for the clients of a :class:`~dpkit.federated.data.FederatedData`.

    Each call builds a fresh :class:`DPFedAvgClient` over its own deep copy of ``model``; ``seed``
    is its local-shuffling seed (default None: OS entropy; not privacy noise).
    """
    def client_fn(cid: str):
        trainer = LocalTrainer(copy.deepcopy(model), client_optimizer, epochs=local_epochs,
                               batch_size=local_batch_size, loss_fn=loss_fn)
        return DPFedAvgClient(trainer, data.clients[int(cid)], seed=seed).to_client()
    return client_fn


class InProcessClientProxy(ClientProxy):
    """A Flower ``ClientProxy`` that calls a client built by ``client_fn(cid)`` in this process."""

    def __init__(self, cid: str, client_fn: Callable):
        super().__init__(cid)
        self.client_fn = client_fn

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(status=Status(code=Code.OK, message=""), properties={})

    def get_parameters(self, ins, timeout, group_id):
        return self.client_fn(self.cid).get_parameters(ins)

    def fit(self, ins, timeout, group_id):
        return self.client_fn(self.cid).fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return EvaluateRes(status=Status(code=Code.OK, message=""), loss=0.0, num_examples=0, metrics={})

    def reconnect(self, ins, timeout, group_id):
        return DisconnectRes(reason="")


def run_in_process(strategy: DPFedAvgStrategy, client_fn: Callable, num_clients: int, num_rounds: int,
                   *, max_workers: int = 1):
    """Run Flower's own ``Server.fit`` loop with in-process clients (no Ray, no network).

    Args:
        strategy: the :class:`DPFedAvgStrategy`.
        client_fn: ``cid -> flwr Client`` (e.g. :func:`make_client_fn`).
        num_clients: clients registered, with cids "0".."num_clients−1".
        num_rounds: rounds ≥ 1.
        max_workers: Flower's client thread pool size.

    Returns:
        Flower's ``History``.
    """
    num_clients = _validate.positive_int("num_clients", num_clients)
    num_rounds = _validate.positive_int("num_rounds", num_rounds)
    manager = SimpleClientManager()
    for cid in range(num_clients):
        manager.register(InProcessClientProxy(str(cid), client_fn))
    server = Server(client_manager=manager, strategy=strategy)
    server.set_max_workers(_validate.positive_int("max_workers", max_workers))
    history, _ = server.fit(num_rounds=num_rounds, timeout=None)
    return history
