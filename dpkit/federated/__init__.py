"""Federated learning with user-level DP: in-process simulator, DP-FedAvg, canaries, Flower adapter.

* :class:`DPFedAvg` — the server mechanism (McMahan et al., ICLR 2018): Poisson client sampling
  with rate q, update clipping, Gaussian noise on the SUM, division by the public q·M, any server
  optimizer (:class:`FedAdam`, Reddi et al., ICLR 2021), accounting of ``dpsgd_event(z, q)`` per
  round, optional :class:`AdaptiveClipping` (Andrew et al., NeurIPS 2021) with its count release
  accounted jointly.
* :class:`CorrelatedRounds` — DP-FTRL / BandMF across rounds (Kairouz et al., ICML 2021;
  Choquette-Choo et al., NeurIPS 2023 / ICLR 2024): correlated noise over the rounds with the
  cohort sampler and accountant that match it.
* :class:`ExampleWeighting` — weighted averaging by example count (McMahan et al. 2018, Sec. 2)
  with a declared public normaliser or a privately estimated, jointly accounted one.
* :class:`FederatedSimulation` — clients trained in process, progress bar, JSON-lines log, canary
  clients (:class:`Canaries`, Andrew et al., ICLR 2024) for a one-shot ε̂.
* Data: :func:`dirichlet_partition`, :func:`digits_clients`, :func:`synthetic_clients`.
* Flower (optional; ``pip install dpkit[flower]``), never imported here: ``dpkit.federated.flower``
  (strategy, client, in-process driver), ``dpkit.federated.flower_engine`` (ServerApp/ClientApp on
  Flower's Ray simulation engine), ``dpkit.federated.secure`` (SecAgg+ with distributed noise).
"""

from dpkit._lazy import lazy_exports

_PUBLIC = {
    "DPFedAvg": "dp_fedavg",
    "FederatedSimulation": "simulation",
    "CorrelatedRounds": "rounds",
    "ExampleWeighting": "weighting",
    "total_weight": "weighting",
    "LocalTrainer": "client",
    "federated_parameters": "client",
    "AdaptiveClipping": "adaptive",
    "update_noise_multiplier": "adaptive",
    "joint_noise_multiplier": "adaptive",
    "FedAdam": "server_opt",
    "make_server_optimizer": "server_opt",
    "Canaries": "canaries",
    "FederatedData": "data",
    "dirichlet_partition": "data",
    "digits_clients": "data",
    "synthetic_clients": "data",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, __all__)
