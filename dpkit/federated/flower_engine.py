"""dpkit's DP strategy and client on Flower's app API: ``ClientApp``/``ServerApp`` and the Ray engine.

Optional dependency (``pip install dpkit[flower]``, which brings ``flwr[simulation]`` and Ray).
:func:`run_ray_simulation` runs :class:`~dpkit.federated.flower.DPFedAvgStrategy` (or any
subclass) with Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend): one
virtual SuperNode per user, ``ClientApp`` instances executed by Ray actors with the resources you
give them, the ``ServerApp`` driving the strategy through Flower's ``DefaultWorkflow``.

User identity. On Flower's engines node ids are random 64-bit integers, while DP-FedAvg samples
USERS 0..M−1 with probability q (McMahan et al., ICLR 2018): the cohort, the privacy account and
the (seed, round, client) streams are keyed by the user index. Two ways to tie nodes to users:

* ``identity="assigned"`` (default; simulation): the virtual nodes are interchangeable compute.
  User k is served by the node of rank k among the sorted node ids, the fit config names k
  (``dpkit_client``) and the :func:`make_client_app` client trains user k's data. No extra
  messages (Flower's per-message cost dominates a Ray simulation: asking 1,000 nodes took minutes
  here).
* ``identity="query"`` (nodes that own their data): the server asks every node once, in one
  batch before round 1, which user it serves (``get_properties`` → ``dpkit_client``).

Either way the sampling is over all M users with the accounted q; a sampled user without a node
is a drop-out (costs no privacy: a user contributing nothing is within the sensitivity), as in
the in-process driver. The strategy object runs in this process (the ServerApp thread of
``run_simulation``), so its ledger, history and model are read directly after the run.
"""

from __future__ import annotations

import copy
import time

try:
    from flwr.app import Context, Message
    from flwr.client import ClientApp
    from flwr.common import GetPropertiesIns, MessageTypeLegacy
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.workflow import DefaultWorkflow
except ImportError as err:  # pragma: no cover - exercised only without flwr
    raise ImportError("dpkit.federated.flower_engine needs Flower: pip install 'dpkit[flower]' "
                      "(flwr[simulation]>=1.42,<2)") from err

from dpkit import _validate
from dpkit.federated.client import LocalTrainer
from dpkit.federated.flower import CLIENT_KEY, DPFedAvgClient, DPFedAvgStrategy

PARTITION_KEY = "partition-id"   # Flower's node_config key of a simulated SuperNode's partition


def make_client_app(model, data, client_optimizer, *, local_epochs=1, local_batch_size=10, loss_fn=None,
                    seed=None) -> ClientApp:
    """A Flower ``ClientApp`` for simulated users: a fit trains the user the server names.

    Each message builds a :class:`~dpkit.federated.flower.DPFedAvgClient` over a deep copy of
    ``model``; ``fit`` trains ``data.clients[k]`` for the user k in its config
    (:class:`~dpkit.federated.client.LocalTrainer`, McMahan et al. 2018, Alg. 1 ``UserUpdate``);
    ``get_properties`` reports the node's ``partition-id`` (for ``identity="query"``).

    Args:
        model: the work model (copied per client).
        data: a :class:`~dpkit.federated.data.FederatedData`.
        client_optimizer: factory ``params -> torch.optim.Optimizer``.
        local_epochs, local_batch_size, loss_fn: local training.
        seed: local-shuffling seed (not privacy noise; default None = OS entropy).

    Raises:
        TypeError, ValueError: bad local-training arguments (checked here, not inside Ray).
    """
    LocalTrainer(copy.deepcopy(model), client_optimizer, epochs=local_epochs, batch_size=local_batch_size,
                 loss_fn=loss_fn)   # eager validation, before anything is shipped to Ray actors
    clients = data.clients

    def client_fn(context: Context):
        k = int(context.node_config[PARTITION_KEY])
        if not 0 <= k < len(clients):
            raise ValueError(f"partition-id must be in [0, {len(clients)}); got {k}")
        trainer = LocalTrainer(copy.deepcopy(model), client_optimizer, epochs=local_epochs,
                               batch_size=local_batch_size, loss_fn=loss_fn)
        return DPFedAvgClient(trainer, clients[k], seed=seed, index=k, population=clients).to_client()

    return ClientApp(client_fn=client_fn)


def _wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= expected or time.monotonic() > deadline:
            return ids
        time.sleep(0.05)


def node_user_table(grid: Grid, node_ids, *, timeout: float | None = None) -> dict[int, int]:
    """``node id -> user index``: one batched ``get_properties`` to every node (``dpkit_client``).

    Raises:
        ValueError: two nodes claim the same user (the population would be mis-sampled).
    """
    ins = compat.getpropertiesins_to_recorddict(GetPropertiesIns(config={}))
    messages = [Message(content=copy.deepcopy(ins), dst_node_id=nid, message_type=MessageTypeLegacy.GET_PROPERTIES)
                for nid in node_ids]
    table: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            continue   # that node is unreachable: its user is a drop-out whenever sampled
        props = compat.recorddict_to_getpropertiesres(reply.content).properties
        if CLIENT_KEY not in props:
            continue
        user = int(props[CLIENT_KEY])
        if user in table.values():
            raise ValueError(f"two nodes claim user {user}: every user must be served by one node")
        table[reply.metadata.src_node_id] = user
    return table


def make_server_app(strategy: DPFedAvgStrategy, num_rounds: int, *, num_nodes: int | None = None,
                    identity: str = "assigned", wait_timeout: float = 120.0, fit_workflow=None,
                    errors: list | None = None) -> ServerApp:
    """A Flower ``ServerApp`` that runs ``strategy`` for ``num_rounds`` with ``DefaultWorkflow``.

    Before round 1 it waits (up to ``wait_timeout`` s) for ``num_nodes`` nodes (default: the
    strategy's population M), builds the node → user table (``identity="assigned"``: rank of the
    node id; ``"query"``: :func:`node_user_table`) and sets ``strategy.client_index`` to read it.

    Args:
        strategy: a :class:`~dpkit.federated.flower.DPFedAvgStrategy`.
        num_rounds: rounds ≥ 1.
        num_nodes: nodes to wait for.
        identity: ``"assigned"`` or ``"query"`` (module docstring).
        wait_timeout: seconds to wait for the nodes to register.
        fit_workflow: Flower fit workflow (default Flower's plain one).
        errors: a list that receives the exception raised inside the app (Flower's simulation
            runtime logs it and goes on; :func:`run_ray_simulation` re-raises it).

    Raises:
        TypeError, ValueError: bad arguments.
    """
    if not isinstance(strategy, DPFedAvgStrategy):
        raise TypeError(f"strategy must be a DPFedAvgStrategy; got {type(strategy).__name__}")
    num_rounds = _validate.positive_int("num_rounds", num_rounds)
    expected = strategy.dpfedavg.num_clients if num_nodes is None else _validate.positive_int("num_nodes", num_nodes)
    wait_timeout = _validate.positive("wait_timeout", wait_timeout)
    identity = _validate.one_of("identity", identity, ("assigned", "query"))
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            nodes = _wait_for_nodes(grid, expected, wait_timeout)
            if identity == "query":
                table = node_user_table(grid, nodes)
            else:
                table = {nid: k for k, nid in enumerate(nodes[:strategy.dpfedavg.num_clients])}
            strategy.client_index = lambda proxy: table.get(proxy.node_id)
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
            DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        except BaseException as err:  # noqa: BLE001 - handed back to the caller, not swallowed
            if errors is None:
                raise
            errors.append(err)

    return app


def run_ray_simulation(strategy: DPFedAvgStrategy, client_app: ClientApp, num_rounds: int, *,
                       num_nodes: int | None = None, identity: str = "assigned", client_resources: dict | None = None,
                       ray_init_args: dict | None = None, fit_workflow=None, verbose: bool = False) -> list[dict]:
    """Run ``strategy`` on Flower's simulation engine (Ray backend) with ``num_nodes`` virtual clients.

    Args:
        strategy: a :class:`~dpkit.federated.flower.DPFedAvgStrategy` (its population M users).
        client_app: e.g. :func:`make_client_app`.
        num_rounds: rounds ≥ 1.
        num_nodes: virtual SuperNodes (default M).
        identity: how nodes map to users, ``"assigned"`` (default) or ``"query"`` (module docstring).
        client_resources: Ray resources per ClientApp actor (default ``{"num_cpus": 1,
            "num_gpus": 0.0}``); the number of concurrent clients is the CPUs Ray has / num_cpus.
        ray_init_args: arguments of ``ray.init`` (e.g. ``{"num_cpus": 2}``).
        fit_workflow: Flower fit workflow (None: the default).
        verbose: Flower's verbose logging.

    Returns:
        ``strategy.history`` (one record per round, ε included).

    Raises:
        whatever the server app raised (re-raised here), or RuntimeError if the run ended short.
    """
    from flwr.simulation import run_simulation

    if not isinstance(client_app, ClientApp):
        raise TypeError(f"client_app must be a flwr ClientApp; got {type(client_app).__name__}")
    num_nodes = strategy.dpfedavg.num_clients if num_nodes is None else _validate.positive_int("num_nodes", num_nodes)
    resources = {"num_cpus": 1, "num_gpus": 0.0}
    if client_resources is not None:
        if not isinstance(client_resources, dict):
            raise TypeError(f"client_resources must be a dict; got {type(client_resources).__name__}")
        resources.update(client_resources)
    if ray_init_args is not None and not isinstance(ray_init_args, dict):
        raise TypeError(f"ray_init_args must be a dict or None; got {type(ray_init_args).__name__}")
    errors: list = []
    start_round = strategy.dpfedavg.round
    app = make_server_app(strategy, num_rounds, num_nodes=num_nodes, identity=identity, fit_workflow=fit_workflow,
                          errors=errors)
    run_simulation(server_app=app, client_app=client_app, num_supernodes=num_nodes,
                   backend_config={"client_resources": resources, "init_args": dict(ray_init_args or {})},
                   verbose_logging=verbose)
    strategy.settle()   # a round whose workflow failed after configure_fit is still accounted
    if errors:
        raise errors[0]
    if strategy.dpfedavg.round != start_round + num_rounds:
        raise RuntimeError(f"the Flower run ended after {strategy.dpfedavg.round - start_round} of "
                           f"{num_rounds} rounds (see Flower's log)")
    return strategy.history
