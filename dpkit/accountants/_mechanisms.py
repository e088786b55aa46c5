"""``--mechanism`` for ``dpkit epsilon`` / ``dpkit calibrate``: ε(σ) of every mechanism dpkit trains with.

Each mechanism maps the parsed flags to ``epsilon(sigma) -> (ε, details)``, the SAME computation
as its Python API:

==========  ======================================================================================
dpsgd       ``make_accountant(NAME).compose(dpsgd_event(σ, q, T))`` (Abadi et al. 2016)
fedavg      DP-FedAvg, user level: ``dpsgd_event(z, q, R)`` with q = clients per round / clients
            and R rounds, as ``DPFedAvg.step_event`` composes per round (McMahan et al., ICLR 2018)
dicesgd     DiceSGD's per-step event ``Composed[Poisson(q, Gaussian(σ√f)), Gaussian(σC1√(1−f)/(2B̄C2))]``
            (Zhang et al., ICLR 2024; the split f = qC1/(qC1 + 2B̄C2) of
            ``dpkit.optim.error_feedback``, re-derived here so that the CLI stays torch-free);
            with ``--gradient-bound G`` the enforced-bound account
            ``dpkit.optim.dicesgd_bounded.bounded_dicesgd_epsilon`` (per-example gradients clipped at
            G ≥ C1 before C1, as ``error_feedback={"gradient_bound": G}`` trains)
bandmf      amplified BandMF with cyclic Poisson sampling over ``--bands`` groups (Choquette-Choo
            et al., NeurIPS 2023, Thm. 4: ``banded_amplified_epsilon``), or, with
            ``--participation``, the unamplified Gaussian of the column-normalised banded encoder
tree, blt   the unamplified Gaussian (``MatrixMechanismAccountant(method="unamplified")``): the
            noise is standardised by sens(C) under ``--participation`` (Denisov et al. 2022;
            Choquette-Choo et al., ICML 2023), which is printed with the ε
admm        ``dpkit.admm.admm_epsilon`` (RDP, replace-one; ``--variant``)
==========  ======================================================================================

MMCC (matrix mechanisms under Poisson sampling over the whole data set) is not offered here: it
takes 14 s for 32 BandMF steps and minutes for 32 BLT steps, and every calculator call must
answer in seconds. Errors are ValueErrors naming the FLAG.
"""

from __future__ import annotations

import math

from dpkit import _validate as V

MECHANISMS = ("dpsgd", "fedavg", "dicesgd", "bandmf", "tree", "blt", "admm")
_MATRIX = ("bandmf", "tree", "blt")
# which mechanism flags each mechanism accepts (everything else given is a bad combination)
_ACCEPTS = {
    "dpsgd": set(),
    "fedavg": {"num_clients", "clients_per_round", "rounds"},
    "dicesgd": {"clip1", "clip2", "expected_batch_size", "noise_split", "gradient_bound"},
    "bandmf": {"bands", "participation", "min_separation", "max_participations"},
    "tree": {"participation", "min_separation", "max_participations"},
    "blt": {"participation", "min_separation", "max_participations", "buffers"},
    "admm": {"variant"},
}
_FLAG = {name: "--" + name.replace("_", "-") for name in
         ("num_clients", "clients_per_round", "rounds", "clip1", "clip2", "expected_batch_size",
          "noise_split", "gradient_bound", "bands", "participation", "min_separation", "max_participations", "buffers",
          "variant")}
_LARGEST_MATRIX = 4096  # encoders are dense n×n (BLT is optimised): larger n would take minutes


def add_flags(parser) -> None:
    """The ``--mechanism`` flag and the parameters of each mechanism."""
    parser.add_argument("--mechanism", choices=MECHANISMS, default="dpsgd",
                        help="mechanism to account (default dpsgd); see docs/accounting.md")
    group = parser.add_argument_group("mechanism parameters")
    num = _number
    group.add_argument("--num-clients", type=num, metavar="N", help="fedavg: clients in the population")
    group.add_argument("--clients-per-round", type=num, metavar="K", help="fedavg: expected cohort size")
    group.add_argument("--rounds", type=num, metavar="R", help="fedavg: training rounds")
    group.add_argument("--clip1", type=num, metavar="C1", help="dicesgd: per-example clip norm (default 1)")
    group.add_argument("--clip2", type=num, metavar="C2", help="dicesgd: error-feedback threshold C2 > 0")
    group.add_argument("--expected-batch-size", type=num, metavar="B",
                       help="dicesgd: public normaliser B (default: --batch-size in the epochs form)")
    group.add_argument("--noise-split", type=num, metavar="F", help="dicesgd: noise variance fraction f")
    group.add_argument("--gradient-bound", type=num, metavar="G",
                       help="dicesgd: enforced per-example gradient bound G >= C1 (second clip)")
    group.add_argument("--bands", type=num, metavar="b", help="bandmf: bands = cyclic sampling groups")
    group.add_argument("--participation", choices=("single", "min-separation"),
                       help="bandmf/tree/blt: participation pattern (unamplified account)")
    group.add_argument("--min-separation", type=num, metavar="b", help="steps between two participations")
    group.add_argument("--max-participations", type=num, metavar="k", help="participations per example")
    group.add_argument("--buffers", type=num, metavar="d", help="blt: number of buffers (default 4)")
    group.add_argument("--variant", choices=("centralized", "federated", "decentralized"),
                       help="admm: private-ADMM variant (default centralized)")


def _number(text: str) -> float:
    return float(text)


_number.__name__ = "number"


def given(args) -> dict:
    """The mechanism flags present on the command line, by parameter name."""
    return {name: getattr(args, name) for name in _FLAG if getattr(args, name, None) is not None}


def check_combination(mechanism: str, args) -> None:
    """Refuse a flag the mechanism does not take, and a missing one it needs (one line, the flag)."""
    extra = [name for name in given(args) if name not in _ACCEPTS[mechanism]]
    if extra:
        raise ValueError(f"{_FLAG[extra[0]]} does not apply to --mechanism {mechanism}")
    if mechanism == "dicesgd" and args.clip2 is None:
        raise ValueError("--mechanism dicesgd needs --clip2 (the error-feedback threshold C2 > 0)")
    if mechanism == "dicesgd" and args.gradient_bound is not None and args.noise_split is not None:
        raise ValueError("--noise-split does not apply with --gradient-bound (its account chooses the "
                         "split itself)")
    if mechanism == "fedavg":
        fed = [args.num_clients, args.clients_per_round, args.rounds]
        if any(v is not None for v in fed) and any(v is None for v in fed):
            missing = [_FLAG[n] for n, v in zip(("num_clients", "clients_per_round", "rounds"), fed) if v is None]
            raise ValueError(f"{missing[0]} is required with --num-clients/--clients-per-round/--rounds")
    if mechanism in _MATRIX:
        if args.participation == "min-separation" and (args.min_separation is None or args.max_participations is None):
            raise ValueError("--participation min-separation needs --min-separation and --max-participations")
        if args.participation != "min-separation" and (args.min_separation is not None
                                                       or args.max_participations is not None):
            raise ValueError("--min-separation/--max-participations need --participation min-separation")
    if mechanism == "bandmf" and args.bands is None:
        raise ValueError("--mechanism bandmf needs --bands")
    if mechanism in ("tree", "blt") and args.participation is None:
        raise ValueError(f"--mechanism {mechanism} needs --participation (single or min-separation): "
                         "its noise is standardised by sens(C) under that pattern")


def uses_schedule_flags(mechanism: str, args) -> bool:
    """fedavg may give its schedule as clients/cohort/rounds instead of Q and T."""
    return not (mechanism == "fedavg" and args.rounds is not None)


def fedavg_schedule(args) -> dict:
    n = V.positive_int("--num-clients", args.num_clients)
    k = V.positive("--clients-per-round", args.clients_per_round)
    if k > n:
        raise ValueError(f"--clients-per-round must be <= --num-clients ({n}); got {k:g}")
    return {"sampling_rate": k / n, "steps": V.positive_int("--rounds", args.rounds),
            "num_clients": n, "clients_per_round": k}


def dicesgd_event(sigma: float, q: float, steps: int, *, clip1: float, clip2: float, batch: float,
                  split: float | None):
    """DiceSGD's event (see the module table); σ = 0 gives a non-private event."""
    from dp_accounting import dp_event as dpe

    from dpkit.accountants.events import dpsgd_event

    if sigma == 0:
        return dpsgd_event(0.0, q, steps)
    f = q * clip1 / (q * clip1 + 2.0 * batch * clip2) if split is None else split
    grad = dpe.GaussianDpEvent(sigma * math.sqrt(f))
    step = dpe.ComposedDpEvent([grad if q == 1 else dpe.PoissonSampledDpEvent(q, grad),
                                dpe.GaussianDpEvent(sigma * clip1 * math.sqrt(1 - f) / (2 * batch * clip2))])
    return step if steps == 1 else dpe.SelfComposedDpEvent(step, steps)


def build(mechanism: str, args, sched: dict, delta: float, accountant: str):
    """``(epsilon_of_sigma, echoed parameters)`` for a non-DP-SGD mechanism (flags validated)."""
    from dpkit.accountants.registry import make_accountant

    q, steps = sched["sampling_rate"], sched["steps"]
    if mechanism == "fedavg":
        from dpkit.accountants.events import dpsgd_event

        def fedavg(sigma):
            acc = make_accountant(accountant).compose(dpsgd_event(sigma, q, steps))
            return acc.epsilon(delta), _details(acc)
        return fedavg, {}
    if mechanism == "dicesgd":
        clip1 = V.positive("--clip1", 1.0 if args.clip1 is None else args.clip1)
        clip2 = V.positive("--clip2", args.clip2)
        if args.expected_batch_size is not None:
            batch = V.positive("--expected-batch-size", args.expected_batch_size)
        elif "batch_size" in sched:
            batch = float(sched["batch_size"])
        else:
            raise ValueError("--mechanism dicesgd needs --expected-batch-size with --sampling-rate/--steps")
        split = None if args.noise_split is None else V.probability("--noise-split", args.noise_split,
                                                                     allow_one=False)

        if args.gradient_bound is not None:
            bound = V.positive("--gradient-bound", args.gradient_bound)
            if bound < clip1:
                raise ValueError(f"--gradient-bound must be >= --clip1 ({clip1:g}); got {bound:g}")

            def bounded(sigma):
                # imports torch through dpkit.optim, like admm below
                from dpkit.optim.dicesgd_bounded import bounded_dicesgd_epsilon

                return bounded_dicesgd_epsilon(sigma, q, steps, delta, clip1=clip1, clip2=clip2,
                                               gradient_bound=bound, expected_batch_size=batch,
                                               accountant=accountant), {"method": "dicesgd-bounded"}
            return bounded, {"clip1": clip1, "clip2": clip2, "expected_batch_size": batch,
                             "gradient_bound": bound}

        def dice(sigma):
            event = dicesgd_event(sigma, q, steps, clip1=clip1, clip2=clip2, batch=batch, split=split)
            acc = make_accountant(accountant).compose(event)
            return acc.epsilon(delta), _details(acc)
        return dice, {"clip1": clip1, "clip2": clip2, "expected_batch_size": batch, "noise_split": split}
    if mechanism == "admm":
        variant = args.variant or "centralized"
        rate = None if variant == "centralized" else q
        if variant == "centralized" and q != 1.0:
            raise ValueError("--variant centralized releases every step (give --sampling-rate 1); "
                             "use --variant federated or decentralized for sampled users")

        def admm(sigma):
            from dpkit.admm.accounting import admm_epsilon  # imports torch through dpkit.admm

            return admm_epsilon(sigma, steps, delta, variant=variant, sampling_rate=rate), {"method": "rdp"}
        return admm, {"variant": variant}
    return _matrix(mechanism, args, q, steps, delta)


def _details(acc) -> dict:
    return acc.details() if hasattr(acc, "details") else {"method": acc.name}


def _matrix(mechanism: str, args, q: float, steps: int, delta: float):
    from dpkit.accountants.events import dpsgd_event
    from dpkit.accountants.mmcc import MatrixMechanismAccountant
    from dpkit.mechanisms.matrix import strategies
    from dpkit.mechanisms.matrix.sensitivity import Participation

    if steps > _LARGEST_MATRIX:
        raise ValueError(f"--steps must be <= {_LARGEST_MATRIX} for --mechanism {mechanism} (dense "
                         f"{steps}×{steps} encoder); got {steps}")
    if mechanism == "bandmf":
        bands = V.positive_int("--bands", args.bands)
        if bands > steps:
            raise ValueError(f"--bands must be <= --steps ({steps}); got {bands}")
        strategy = strategies.banded(steps, bands)
    elif mechanism == "tree":
        strategy = strategies.binary_tree(steps)
    else:
        buffers = V.positive_int("--buffers", 4 if args.buffers is None else args.buffers)
        strategy = strategies.blt(steps, buffers)
    echo = {"bands": strategy.bands if mechanism == "bandmf" else None}
    if args.participation is None:  # bandmf with cyclic Poisson sampling over b groups
        method, participation, rate = "banded", None, q
        echo.update(sampler="cyclic", group_sampling_rate=q)
    else:
        method, rate = "unamplified", 1.0
        participation = (Participation.single() if args.participation == "single" else
                         Participation.min_separation(V.positive_int("--min-separation", args.min_separation),
                                                      V.positive_int("--max-participations",
                                                                     args.max_participations)))
        echo.update(participation=args.participation, min_separation=participation.separation,
                    max_participations=participation.max_participations)
    sens = strategy.sensitivity(participation)
    echo["sensitivity"] = sens
    C = strategy.encoder()

    def matrix(sigma):
        acc = MatrixMechanismAccountant(C, noise_multiplier=sigma, sampling_prob=rate, sensitivity=sens,
                                        method=method, bands=echo["bands"] if method == "banded" else None)
        acc.compose(dpsgd_event(sigma, rate, 1), steps)
        return acc.epsilon(delta), {"method": method}
    return matrix, {k: v for k, v in echo.items() if v is not None}
