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

_ALL = "all"


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
    eps.add_argument("--accountant", default="pld", metavar="NAME|all",
                     help="accountant name (pld, rdp, prv, gdp) or 'all' for a table; default pld")
    eps.add_argument("--json", action="store_true", help="print one JSON object")
    eps.add_argument("--plot", metavar="FILE.png", help="save a plot of ε versus steps (needs matplotlib)")
    eps.set_defaults(handler=_epsilon_command)

    cal = subparsers.add_parser(
        "calibrate", help="smallest noise multiplier for a target (ε, δ)",
        description="Find the smallest DP-SGD noise multiplier whose ε does not exceed the target.")
    cal.add_argument("--target-epsilon", type=_number, required=True, metavar="E", help="target ε > 0")
    cal.add_argument("--delta", type=_number, required=True, metavar="D", help="δ in (0, 1)")
    _add_schedule(cal)
    cal.add_argument("--accountant", default="pld", metavar="NAME", help="accountant name; default pld")
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    cal.set_defaults(handler=_calibrate_command)


def _schedule(args) -> dict:
    """Validate the schedule flags; return the echoed inputs incl. the resolved q and steps."""
    from dpkit.accountants._schedule import epochs_to_steps

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
    sched = _schedule(args)
    sigma = V.non_negative("--noise-multiplier", args.noise_multiplier)
    delta = V.delta("--delta", args.delta)
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
               "method": methods[names[0]] if args.accountant != _ALL else methods}
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
    sched = _schedule(args)
    name = _accountant_names(args.accountant, allow_all=False)[0]
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
               "target_epsilon": target, "delta": delta, **sched, "method": methods[name]}
        if notes:
            out["notes"] = notes
        print(json.dumps(out))
    else:
        print(f"noise_multiplier = {sigma:.6g}  (epsilon = {achieved:.6g} <= target {target:g}; "
              f"accountant={name}, delta={delta:g}, q={q:g}, steps={steps})")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return 0
