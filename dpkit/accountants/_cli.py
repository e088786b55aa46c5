"""``dpkit epsilon`` and ``dpkit calibrate``: the DP-SGD budget calculator (torch-free).

Both take the schedule as ``--sampling-rate Q --steps T`` or ``--dataset-size N --batch-size B
--epochs E`` (steps = ceil(E·ceil(N/B)), q = B/N; see :func:`~dpkit.accountants.calibration.epochs_to_steps`).
Errors are raised as ValueError/TypeError naming the flag; ``dpkit.cli`` prints them as one line.
"""

from __future__ import annotations

import json
import math
import sys
import warnings

from dpkit import _validate as V
from dpkit.accountants import _mechanisms as _mech

_ALL = "all"
_PLAN_BATCHES = (64, 256, 1024, 4096)
_PLAN_EPOCHS = (1, 10, 50)
# the plan's σ come from the RDP accountant (a valid upper bound, so every row is feasible; a few %
# more noise than PLD) at 1% precision: 12 calibrations in seconds; `dpkit calibrate` refines a row
_PLAN_ACCOUNTANT = "rdp"
_PLAN_RTOL = 1e-2


def _number(text: str) -> float:
    """argparse type: a float (range checks happen later, with the flag's name)."""
    return float(text)


_number.__name__ = "number"  # argparse names the type in its error: "invalid number value: 'x'"


def _add_schedule(parser) -> None:
    group = parser.add_argument_group("schedule (give Q and T, or N, B and E)")
    group.add_argument("--sampling-rate", type=_number, metavar="Q", help="Poisson sampling rate q in (0, 1]")
    group.add_argument("--steps", type=_number, metavar="T", help="number of DP-SGD steps")
    group.add_argument("--dataset-size", type=_number, metavar="N", help="number of training records")
    group.add_argument("--batch-size", type=_number, metavar="B", help="expected batch size")
    group.add_argument("--epochs", type=_number, metavar="E", help="epochs; steps = ceil(E*ceil(N/B))")


def register(subparsers) -> None:
    """Add the ``epsilon`` and ``calibrate`` sub-commands to ``dpkit``'s argument parser."""
    eps = subparsers.add_parser(
        "epsilon", help="ε of DP-SGD (Poisson-sampled Gaussian) for a schedule",
        description="Compute ε of DP-SGD with Poisson sampling for a noise multiplier and schedule.")
    _add_schedule(eps)
    eps.add_argument("--noise-multiplier", type=_number, required=True, metavar="S",
                     help="noise std / clipping norm (>= 0)")
    eps.add_argument("--delta", type=_number, required=True, metavar="D", help="δ in (0, 1)")
    eps.add_argument("--accountant", metavar="NAME|all",
                     help="accountant name (pld, rdp, prv, gdp) or 'all' for a table; default pld")
    eps.add_argument("--json", action="store_true", help="print one JSON object")
    eps.add_argument("--plot", metavar="FILE.png", help="save a plot of ε versus steps (needs matplotlib)")
    _mech.add_flags(eps)
    eps.set_defaults(handler=_epsilon_command)

    cal = subparsers.add_parser(
        "calibrate", help="smallest noise multiplier for a target (ε, δ)",
        description="Find the smallest DP-SGD noise multiplier whose ε does not exceed the target.")
    cal.add_argument("--target-epsilon", type=_number, required=True, metavar="E", help="target ε > 0")
    cal.add_argument("--delta", type=_number, required=True, metavar="D", help="δ in (0, 1)")
    _add_schedule(cal)
    cal.add_argument("--accountant", metavar="NAME", help="accountant name; default pld")
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    _mech.add_flags(cal)
    cal.set_defaults(handler=_calibrate_command)

    plan = subparsers.add_parser(
        "plan", help="feasible (batch size, epochs, σ, steps) for a target (ε, δ)",
        description="Tabulate DP-SGD schedules that meet a target (ε, δ), with the noise-to-signal "
                    "ratio σ·C/B (the noise std on the averaged clipped gradient, which drives utility).")
    plan.add_argument("--dataset-size", type=_number, required=True, metavar="N", help="training records")
    plan.add_argument("--target-epsilon", type=_number, required=True, metavar="E", help="target ε > 0")
    plan.add_argument("--delta", type=_number, required=True, metavar="D", help="δ in (0, 1)")
    plan.add_argument("--batch-sizes", type=_number, nargs="+", metavar="B",
                      help=f"expected batch sizes to try (default {' '.join(map(str, _PLAN_BATCHES))}, up to N/2)")
    plan.add_argument("--epochs", type=_number, nargs="+", metavar="E",
                      help=f"epochs to try (default {' '.join(map(str, _PLAN_EPOCHS))})")
    plan.add_argument("--max-grad-norm", type=_number, default=1.0, metavar="C", help="clip norm C (default 1)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(handler=_plan_command)


def _schedule(args, mechanism: str = "dpsgd") -> dict:
    """Validate the schedule flags; return the echoed inputs incl. the resolved q and steps.

    fedavg may give clients/cohort/rounds instead; matrix mechanisms take the rate form only
    (their q is the rate WITHIN a cyclic group), and mechanisms without sampling (unamplified
    matrix mechanisms, centralized ADMM) need only ``--steps``.
    """
    from dpkit.accountants._schedule import epochs_to_steps

    if not _mech.uses_schedule_flags(mechanism, args):
        clash = [f for f, v in (("--sampling-rate", args.sampling_rate), ("--steps", args.steps),
                                ("--dataset-size", args.dataset_size), ("--batch-size", args.batch_size),
                                ("--epochs", args.epochs)) if v is not None]
        if clash:
            raise ValueError(f"{clash[0]} does not apply with --rounds (the schedule is "
                             "--num-clients, --clients-per-round and --rounds)")
        return _mech.fedavg_schedule(args)
    unsampled = ((mechanism in ("tree", "blt") or (mechanism == "bandmf" and args.participation))
                 or (mechanism == "admm" and (args.variant or "centralized") == "centralized"))
    if mechanism in ("bandmf", "tree", "blt", "admm") and args.sampling_rate is None and args.steps is not None \
            and unsampled:
        return {"sampling_rate": 1.0, "steps": V.positive_int("--steps", args.steps)}
    if mechanism in ("bandmf", "tree", "blt") and args.steps is None:
        raise ValueError(f"--mechanism {mechanism} needs --steps (and, for cyclic BandMF, "
                         "--sampling-rate within the group); the epochs form does not apply")

    rate_form = {"--sampling-rate": args.sampling_rate, "--steps": args.steps}
    epoch_form = {"--dataset-size": args.dataset_size, "--batch-size": args.batch_size,
                  "--epochs": args.epochs}
    given_rate = [k for k, v in rate_form.items() if v is not None]
    given_epoch = [k for k, v in epoch_form.items() if v is not None]
    if given_rate and given_epoch:
        raise ValueError(f"give either --sampling-rate and --steps, or --dataset-size, --batch-size and "
                         f"--epochs; got both {' '.join(given_rate + given_epoch)}")
    if given_epoch or not given_rate:
        missing = [k for k, v in epoch_form.items() if v is None]
        if missing:
            raise ValueError(f"{missing[0]} is required (give --sampling-rate and --steps, or "
                             "--dataset-size, --batch-size and --epochs)")
        n = V.positive_int("--dataset-size", args.dataset_size)
        b = V.positive_int("--batch-size", args.batch_size)
        if b > n:
            raise ValueError(f"--batch-size must be <= --dataset-size ({n}); got {b}")
        e = V.positive("--epochs", args.epochs)
        q, steps = epochs_to_steps(e, n, b)
        return {"sampling_rate": q, "steps": steps, "dataset_size": n, "batch_size": b, "epochs": e}
    missing = [k for k, v in rate_form.items() if v is None]
    if missing:
        raise ValueError(f"{missing[0]} is required together with {given_rate[0]}")
    return {"sampling_rate": V.probability("--sampling-rate", args.sampling_rate),
            "steps": V.positive_int("--steps", args.steps)}


def _accountant_names(name: str, *, allow_all: bool) -> list[str]:
    from dpkit.accountants.registry import available_accountants

    # exact accountants first, approximations last
    names = sorted(available_accountants(), key=lambda n: (n == "gdp", n))
    choices = names + ([_ALL] if allow_all else [])
    V.one_of("--accountant", name, choices)
    return names if name == _ALL else [name]


def _json_number(x: float):
    """Strict JSON has no Infinity: an infinite ε is written as the string "inf"."""
    return "inf" if math.isinf(x) else x


def _epsilon_of(name: str, sigma: float, q: float, steps: int, delta: float, notes: list,
                methods: dict | None = None) -> float:
    """ε of one accountant; its warnings go to ``notes`` and how it answered to ``methods[name]``."""
    from dpkit.accountants.events import dpsgd_event
    from dpkit.accountants.registry import make_accountant

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc = make_accountant(name).compose(dpsgd_event(sigma, q, steps))
        value = acc.epsilon(delta)
    for w in caught:
        note = f"{name}: {w.message}"
        if note not in notes:
            notes.append(note)
    details = acc.details() if hasattr(acc, "details") else {"method": name}
    if methods is not None:
        methods[name] = details
    if details.get("reason"):
        notes.append(f"{name}: answered by {details['method']} ({details['reason']})")
    elif details.get("coarsened"):
        notes.append(f"{name}: PLD grid capped at {details['grid_points']} points (step "
                     f"{details['value_discretization_interval']:.3g}); still an upper bound")
    return value


def _warn_large_delta(delta: float, sched: dict, notes: list) -> None:
    """δ ≥ 1/N allows releasing a whole record: say so (Dwork & Roth 2014, §2.3)."""
    n = sched.get("dataset_size")
    if n is not None and delta >= 1.0 / n:
        notes.append(f"--delta {delta:g} is >= 1/--dataset-size (1/{n}): a mechanism that publishes "
                     "one record at random satisfies such a δ; use δ well below 1/N")


def _quiet_backend_logs() -> None:
    """dp_accounting logs (via absl) each RDP order it drops; a CLI user gets the bound, not that."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


def _epsilon_command(args) -> int:
    from dpkit.accountants.registry import make_accountant

    _quiet_backend_logs()
    mechanism = args.mechanism
    _mech.check_combination(mechanism, args)
    sched = _schedule(args, mechanism)
    sigma = V.non_negative("--noise-multiplier", args.noise_multiplier)
    delta = V.delta("--delta", args.delta)
    if mechanism != "dpsgd":
        return _other_epsilon(args, mechanism, sched, sigma, delta)
    args.accountant = args.accountant or "pld"
    names = _accountant_names(args.accountant, allow_all=True)
    if args.plot is not None and not str(args.plot).strip():
        raise ValueError("--plot must be a file name; got ''")
    q, steps = sched["sampling_rate"], sched["steps"]
    notes: list[str] = []
    _warn_large_delta(delta, sched, notes)
    methods: dict = {}
    results = {name: _epsilon_of(name, sigma, q, steps, delta, notes, methods) for name in names}
    approximate = [n for n in names if make_accountant(n).is_approximate]
    if args.plot:
        _plot(args.plot, names, sigma, q, steps, delta)
    if args.json:
        out = {"epsilon": (_json_number(results[names[0]]) if args.accountant != _ALL
                           else {n: _json_number(v) for n, v in results.items()}),
               "noise_multiplier": sigma, "accountant": args.accountant, "delta": delta,
               **sched, "approximate": approximate,
               "method": methods[names[0]] if args.accountant != _ALL else methods, "mechanism": "dpsgd"}
        if notes:
            out["notes"] = notes
        if args.plot:
            out["plot"] = args.plot
        print(json.dumps(out))
    elif args.accountant == _ALL:
        print(f"DP-SGD: q={q:g}, noise_multiplier={sigma:g}, steps={steps}, delta={delta:g}")
        print(f"{'accountant':<12}{'epsilon':>12}  note")
        for name, value in results.items():
            note = "approximate (may under-state epsilon)" if name in approximate else "upper bound"
            print(f"{name:<12}{value:>12.6g}  {note}")
    else:
        name = names[0]
        tag = " (APPROXIMATE: may under-state epsilon)" if name in approximate else ""
        print(f"epsilon = {results[name]:.6g}{tag}  [accountant={name}, delta={delta:g}, "
              f"q={q:g}, noise_multiplier={sigma:g}, steps={steps}]")
    if not args.json:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


def _plot(path: str, names: list[str], sigma: float, q: float, steps: int, delta: float) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib; install it with `pip install matplotlib` "
                         "(or `pip install dpkit[plot]`)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = sorted({max(1, round(steps * k / 12)) for k in range(1, 13)})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        ys = [_epsilon_of(name, sigma, q, t, delta, []) for t in grid]
        ax.plot(grid, ys, marker=".", label=name)
    ax.set_xlabel("steps")
    ax.set_ylabel(f"epsilon at delta={delta:g}")
    ax.set_title(f"DP-SGD, q={q:g}, noise multiplier={sigma:g}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise ValueError(f"--plot could not write {path!r}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _calibrate_command(args) -> int:
    from dpkit.accountants.calibration import calibrate_noise_multiplier

    _quiet_backend_logs()
    target = V.positive("--target-epsilon", args.target_epsilon)
    delta = V.delta("--delta", args.delta)
    mechanism = args.mechanism
    _mech.check_combination(mechanism, args)
    sched = _schedule(args, mechanism)
    if mechanism != "dpsgd":
        return _other_calibrate(args, mechanism, sched, target, delta)
    name = _accountant_names(args.accountant or "pld", allow_all=False)[0]
    q, steps = sched["sampling_rate"], sched["steps"]
    notes: list[str] = []
    _warn_large_delta(delta, sched, notes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant=name)
    notes.extend(dict.fromkeys(f"{name}: {w.message}" for w in caught))
    methods: dict = {}
    achieved = _epsilon_of(name, sigma, q, steps, delta, notes, methods)
    if args.json:
        out = {"noise_multiplier": sigma, "epsilon": achieved, "accountant": name,
               "target_epsilon": target, "delta": delta, **sched, "method": methods[name],
               "mechanism": "dpsgd"}
        if notes:
            out["notes"] = notes
        print(json.dumps(out))
    else:
        print(f"noise_multiplier = {sigma:.6g}  (epsilon = {achieved:.6g} <= target {target:g}; "
              f"accountant={name}, delta={delta:g}, q={q:g}, steps={steps})")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


def _mechanism_accountant(args, mechanism: str) -> str:
    """The accountant a non-DP-SGD mechanism is accounted with (``--accountant`` only where it applies)."""
    if mechanism in ("fedavg", "dicesgd"):
        return _accountant_names(args.accountant or "pld", allow_all=False)[0]
    if args.accountant is not None:
        raise ValueError(f"--accountant does not apply to --mechanism {mechanism} (accounted by "
                         f"{'RDP' if mechanism == 'admm' else 'its matrix-mechanism analysis'})")
    return "rdp" if mechanism == "admm" else "matrix"


def _other_epsilon(args, mechanism: str, sched: dict, sigma: float, delta: float) -> int:
    name = _mechanism_accountant(args, mechanism)
    if sigma == 0 and mechanism in ("bandmf", "tree", "blt", "admm"):
        raise ValueError(f"--noise-multiplier must be > 0 for --mechanism {mechanism}; got 0")
    notes: list[str] = []
    _warn_large_delta(delta, sched, notes)
    fn, echo = _mech.build(mechanism, args, sched, delta, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps, details = fn(sigma)
    notes.extend(dict.fromkeys(f"{name}: {w.message}" for w in caught))
    if args.json:
        out = {"epsilon": _json_number(eps), "noise_multiplier": sigma, "accountant": name, "delta": delta,
               **sched, "approximate": ["gdp"] if name == "gdp" else [], "method": details,
               "mechanism": mechanism, **echo}
        if notes:
            out["notes"] = notes
        print(json.dumps(out))
    else:
        extra = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in echo.items()
                          if v is not None)
        print(f"epsilon = {eps:.6g}  [mechanism={mechanism}, accountant={name}, delta={delta:g}, "
              f"q={sched['sampling_rate']:g}, noise_multiplier={sigma:g}, steps={sched['steps']}"
              f"{', ' + extra if extra else ''}]")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


def _other_calibrate(args, mechanism: str, sched: dict, target: float, delta: float) -> int:
    from dpkit.accountants._search import smallest_feasible
    from dpkit.accountants.calibration import calibrate_noise_multiplier
    from dpkit.errors import CalibrationError

    name = _mechanism_accountant(args, mechanism)
    notes: list[str] = []
    _warn_large_delta(delta, sched, notes)
    fn, echo = _mech.build(mechanism, args, sched, delta, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mechanism == "fedavg":  # exactly DP-SGD's calibration at the cohort rate
            sigma = calibrate_noise_multiplier(target, delta, sched["sampling_rate"], sched["steps"],
                                               accountant=name)
        elif mechanism == "admm":
            from dpkit.admm.accounting import calibrate_admm_noise

            sigma = calibrate_admm_noise(target, delta, sched["steps"], variant=echo["variant"],
                                         sampling_rate=None if echo["variant"] == "centralized"
                                         else sched["sampling_rate"], rtol=1e-3)
        else:  # same contract as calibrate_noise_multiplier: never overshoots, minimal within 1e-3
            sigma = smallest_feasible(
                lambda s: fn(s)[0] <= target, start=1.0, lower=0.1, upper=1e4, rtol=1e-3,
                unreachable=lambda: CalibrationError(
                    f"--target-epsilon {target:g} is not reachable by --mechanism {mechanism} with "
                    "--noise-multiplier <= 1e4"))
        achieved, details = fn(sigma)
    notes.extend(dict.fromkeys(f"{name}: {w.message}" for w in caught))
    if args.json:
        out = {"noise_multiplier": sigma, "epsilon": achieved, "accountant": name, "target_epsilon": target,
               "delta": delta, **sched, "method": details, "mechanism": mechanism, **echo}
        if notes:
            out["notes"] = notes
        print(json.dumps(out))
    else:
        print(f"noise_multiplier = {sigma:.6g}  (epsilon = {achieved:.6g} <= target {target:g}; "
              f"mechanism={mechanism}, accountant={name}, delta={delta:g}, q={sched['sampling_rate']:g}, "
              f"steps={sched['steps']})")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


def _plan_command(args) -> int:
    from dpkit.accountants._schedule import epochs_to_steps
    from dpkit.accountants.calibration import calibrate_noise_multiplier
    from dpkit.errors import CalibrationError

    _quiet_backend_logs()
    n = V.positive_int("--dataset-size", args.dataset_size)
    target = V.positive("--target-epsilon", args.target_epsilon)
    delta = V.delta("--delta", args.delta)
    clip = V.positive("--max-grad-norm", args.max_grad_norm)
    if args.batch_sizes is None:
        batches = [b for b in _PLAN_BATCHES if b <= n // 2] or [max(1, n // 2)]
    else:
        batches = [V.positive_int("--batch-sizes", b) for b in args.batch_sizes]
        for b in batches:
            if b > n:
                raise ValueError(f"--batch-sizes must be <= --dataset-size ({n}); got {b}")
    epochs = [V.positive("--epochs", e) for e in (args.epochs or _PLAN_EPOCHS)]
    notes: list[str] = []
    _warn_large_delta(delta, {"dataset_size": n}, notes)
    rows = []
    for b in batches:
        for e in epochs:
            q, steps = epochs_to_steps(e, n, b)
            try:
                sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant=_PLAN_ACCOUNTANT,
                                                   rtol=_PLAN_RTOL)
            except CalibrationError:
                sigma = None
            rows.append({"batch_size": b, "epochs": e, "steps": steps, "sampling_rate": q,
                         "noise_multiplier": sigma,
                         "noise_to_signal": None if sigma is None else sigma * clip / b})
    rows.sort(key=lambda r: math.inf if r["noise_to_signal"] is None else r["noise_to_signal"])
    if args.json:
        out = {"dataset_size": n, "target_epsilon": target, "delta": delta, "max_grad_norm": clip,
               "accountant": _PLAN_ACCOUNTANT, "rows": rows}
        if notes:
            out["notes"] = notes
        print(json.dumps(out))
        return 0
    print(f"DP-SGD plans for N={n}, target epsilon={target:g}, delta={delta:g}, C={clip:g} "
          "(sorted by noise-to-signal sigma*C/B; lower is better for utility)")
    print(f"{'batch':>8}{'epochs':>8}{'steps':>9}{'sigma':>10}{'sigma*C/B':>12}")
    for r in rows:
        if r["noise_multiplier"] is None:
            print(f"{r['batch_size']:>8}{r['epochs']:>8g}{r['steps']:>9}{'unreachable':>22}")
        else:
            print(f"{r['batch_size']:>8}{r['epochs']:>8g}{r['steps']:>9}{r['noise_multiplier']:>10.4g}"
                  f"{r['noise_to_signal']:>12.4g}")
    print(f"sigma by the {_PLAN_ACCOUNTANT} accountant to 1% (never overshoots); `dpkit calibrate` "
          "gives the tighter PLD value for a chosen row")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
