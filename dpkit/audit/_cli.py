"""``dpkit risk`` and ``dpkit audit`` sub-commands (torch-free).

``dpkit risk --sampling-rate Q --noise-multiplier S --steps T [--fpr F ...] [--json]`` prints the
closed-form membership-inference bounds of Cherubin et al. (approximate and strict) for both
relations, with the PLD advantage and TPR-at-FPR bounds as references.

``dpkit audit FILE [--confidence C] [--plot OUT.png] [--json]`` audits a
saved artefact (:mod:`dpkit.audit.artifact`): claimed ε vs the one-shot estimate. Exit status 0
when consistent, 1 when the estimate's lower bound exceeds the claim, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math

_DEFAULT_FPRS = (0.001, 0.01, 0.1)


def register(subparsers) -> None:
    """Add the ``risk`` and ``audit`` sub-commands to ``dpkit``'s argparse sub-parsers."""
    risk = subparsers.add_parser(
        "risk", help="membership-inference risk bounds of DP-SGD (closed form and PLD)",
        description="Bayes security / attack advantage of DP-SGD against membership inference "
                    "(Cherubin et al., USENIX Security 2024) and TPR-at-FPR bounds from the PLD.")
    risk.add_argument("--sampling-rate", type=float, required=True, metavar="Q",
                      help="Poisson sampling rate q in (0, 1]")
    risk.add_argument("--noise-multiplier", type=float, required=True, metavar="S",
                      help="noise multiplier sigma > 0")
    risk.add_argument("--steps", type=int, required=True, metavar="T", help="number of steps")
    risk.add_argument("--fpr", type=float, nargs="+", default=list(_DEFAULT_FPRS), metavar="F",
                      help="false-positive rates for the TPR bounds (default: 0.001 0.01 0.1)")
    risk.add_argument("--json", action="store_true", help="print one JSON object")
    risk.set_defaults(handler=_risk)

    aud = subparsers.add_parser(
        "audit", help="audit a saved canary artefact: claimed vs empirical epsilon",
        description="One-shot empirical privacy estimation (Andrew et al., ICLR 2024) on a saved "
                    "artefact (.json or .npz). Exit 1 when the claim is violated.")
    aud.add_argument("file", metavar="FILE", help="artefact written by dpkit.audit.save_artifact")
    aud.add_argument("--confidence", type=float, default=0.95,
                     help="level of the lower confidence bound on epsilon (default 0.95)")
    aud.add_argument("--plot", metavar="OUT.png", help="save the canary histogram to this file")
    aud.add_argument("--json", action="store_true", help="print one JSON object")
    aud.set_defaults(handler=_audit)


def _risk(args: argparse.Namespace) -> int:
    from dpkit.audit.record_level import RELATIONS, record_level_risk
    from dpkit.audit.tradeoff import pld_advantage, tpr_at_fpr_bound

    from dpkit import _validate as V

    # validated here with the FLAG names, before the Python API would name its parameters
    V.probability("--sampling-rate", args.sampling_rate)
    V.positive("--noise-multiplier", args.noise_multiplier)
    V.positive_int("--steps", args.steps)
    fprs = [V.probability("--fpr", f, allow_one=False) for f in args.fpr]
    rows = []
    for relation in RELATIONS:
        risk = record_level_risk(args.noise_multiplier, args.sampling_rate, args.steps,
                                 relation=relation)
        tpr = tpr_at_fpr_bound(fprs, args.noise_multiplier, args.sampling_rate, args.steps,
                               relation=relation)
        row = risk.to_dict()
        row["advantage_pld"] = pld_advantage(args.noise_multiplier, args.sampling_rate,
                                             args.steps, relation=relation)
        row["tpr_at_fpr"] = {f"{f:g}": float(t) for f, t in zip(fprs, tpr)}
        rows.append(row)
    if args.json:
        print(json.dumps({"noise_multiplier": args.noise_multiplier,
                          "sampling_rate": args.sampling_rate, "steps": args.steps,
                          "relations": rows}))
        return 0
    print(f"DP-SGD membership-inference risk: sigma={args.noise_multiplier:g}, "
          f"q={args.sampling_rate:g}, T={args.steps}")
    for row in rows:
        print(f"[{row['relation']}]")
        print(f"  Bayes security (approximate, not a bound): {row['bayes_security']:.4f}")
        print(f"  Bayes security (strict lower bound):       {row['bayes_security_strict']:.4f}")
        print(f"  max advantage: approx {row['advantage']:.4f}, strict <= "
              f"{row['advantage_strict']:.4f}, PLD <= {row['advantage_pld']:.4f}")
        tprs = ", ".join(f"TPR@FPR={k} <= {v:.4f}" for k, v in row["tpr_at_fpr"].items())
        print(f"  {tprs}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from dpkit.audit.artifact import audit, load_artifact

    try:
        artifact = load_artifact(args.file)
    except OSError as exc:
        raise ValueError(f"FILE cannot be read: {exc}") from None
    report = audit(artifact, confidence=args.confidence)
    if args.plot:
        from dpkit.audit._plot import plot_audit

        plot_audit(report, args.plot)
    est = report.estimate
    if args.json:
        out = report.to_dict()
        out["claimed_epsilon"] = None if math.isinf(report.claimed_epsilon) else report.claimed_epsilon
        print(json.dumps(out))
    else:
        print(f"claimed epsilon:   {report.claimed_epsilon:.4g} at delta={est.delta:g} "
              f"(sigma={artifact.noise_multiplier:g}, q={artifact.sampling_rate:g}, "
              f"T={artifact.steps})")
        print(f"empirical epsilon: {est.epsilon:.4g} (one-shot, {artifact.threat_model}, "
              f"{est.num_canaries} canaries)")
        print(f"lower bound:       {est.epsilon_lower:.4g} (confidence {est.confidence:g})")
        print(f"verdict:           {report.verdict.upper()}")
        if args.plot:
            print(f"plot written to {args.plot}")
    return 1 if report.verdict == "violation" else 0
