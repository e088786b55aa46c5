"""Validated builders of ``dp_accounting`` DpEvents, and the neighbouring relation.

dpkit does not invent its own event algebra: every builder returns a plain ``dp_accounting``
``DpEvent`` that any dp_accounting accountant understands too.

Conventions (the "DP-SGD convention"): a ``noise_multiplier`` is the noise standard deviation
divided by the per-record bound C (the clipping norm), as in Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016. Under add/remove-one adjacency the sum of clipped vectors has
L2 sensitivity C, so this equals dp_accounting's "std / sensitivity". Under replace-one it does
NOT (the sensitivity is 2C); :func:`fixed_size_event` accounts for that, and dpkit's accountants
refuse Poisson-sampled events under replace-one rather than guess.

A noise multiplier of 0 (no noise) is legal and yields ``NonPrivateDpEvent``: every dpkit
accountant then reports ε = inf. This keeps the σ = 0 limit usable (non-private training with
the same code path) without ever reporting a finite ε for it.
"""

from __future__ import annotations

import dp_accounting
from dp_accounting import dp_event as _dpe

from dpkit import _validate as V

NeighboringRelation = dp_accounting.NeighboringRelation

_RELATION_NAMES = {
    "add_remove": NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": NeighboringRelation.REPLACE_ONE,
}

__all__ = ["NeighboringRelation", "dpsgd_event", "fixed_size_event", "gaussian_event",
           "laplace_event", "compose_events", "as_relation", "relation_name"]


def as_relation(neighboring_relation) -> NeighboringRelation:
    """Parse a neighbouring relation given as enum or as ``"add_remove"`` / ``"replace_one"``.

    Args:
        neighboring_relation: ``NeighboringRelation.ADD_OR_REMOVE_ONE`` / ``REPLACE_ONE`` or the
            strings ``"add_remove"`` / ``"replace_one"``.

    Returns:
        The ``dp_accounting.NeighboringRelation`` member.

    Raises:
        ValueError: an unknown string or an enum member dpkit does not account for
            (``REPLACE_SPECIAL``).
        TypeError: neither a string nor a ``NeighboringRelation``.
    """
    if isinstance(neighboring_relation, NeighboringRelation):
        if neighboring_relation not in _RELATION_NAMES.values():
            raise ValueError("neighboring_relation must be ADD_OR_REMOVE_ONE or REPLACE_ONE; "
                             f"got {neighboring_relation!r}")
        return neighboring_relation
    if isinstance(neighboring_relation, str):
        V.one_of("neighboring_relation", neighboring_relation, _RELATION_NAMES)
        return _RELATION_NAMES[neighboring_relation]
    raise TypeError("neighboring_relation must be a string or NeighboringRelation; got "
                    f"{neighboring_relation!r} ({type(neighboring_relation).__name__})")


def relation_name(relation: NeighboringRelation) -> str:
    """The string form (``"add_remove"`` / ``"replace_one"``) of a parsed relation."""
    for name, member in _RELATION_NAMES.items():
        if member is relation:
            return name
    raise ValueError(f"neighboring_relation must be ADD_OR_REMOVE_ONE or REPLACE_ONE; got {relation!r}")


def _self_composed(event: _dpe.DpEvent, steps: int) -> _dpe.DpEvent:
    return event if steps == 1 else _dpe.SelfComposedDpEvent(event, steps)


def gaussian_event(noise_multiplier) -> _dpe.DpEvent:
    """One release of the Gaussian mechanism with sensitivity 1.

    Args:
        noise_multiplier: noise std / sensitivity, ≥ 0; 0 gives ``NonPrivateDpEvent``.

    Returns:
        ``GaussianDpEvent(noise_multiplier)`` (or ``NonPrivateDpEvent`` for 0).

    Raises:
        ValueError, TypeError: ``noise_multiplier`` negative, infinite, NaN or not a number.
    """
    sigma = V.non_negative("noise_multiplier", noise_multiplier)
    return _dpe.NonPrivateDpEvent() if sigma == 0 else _dpe.GaussianDpEvent(sigma)


def laplace_event(scale) -> _dpe.DpEvent:
    """One release of the Laplace mechanism with L1 sensitivity 1 (pure (1/scale)-DP).

    Args:
        scale: the Laplace scale b (density exp(-|x|/b)/(2b)) divided by the L1 sensitivity; > 0.

    Returns:
        ``LaplaceDpEvent(scale)``.

    Raises:
        ValueError, TypeError: ``scale`` not a finite number > 0.
    """
    return _dpe.LaplaceDpEvent(V.positive("scale", scale))


def dpsgd_event(noise_multiplier, sampling_prob, steps=1) -> _dpe.DpEvent:
    """``steps`` DP-SGD steps: Poisson sampling with rate q, then the Gaussian mechanism.

    Follows Abadi et al. (CCS 2016), Alg. 1, accounted as the Poisson-subsampled Gaussian
    (Mironov, Talwar, Zhang 2019 "Rényi DP of the Sampled Gaussian Mechanism"). Valid under
    add/remove-one adjacency with ``noise_multiplier`` = noise std / clip norm.

    Args:
        noise_multiplier: σ ≥ 0 (std / clipping norm); 0 means no noise → ``NonPrivateDpEvent``
            (every accountant reports ε = inf).
        sampling_prob: Poisson sampling rate q in (0, 1]; q = 1 gives the plain Gaussian.
        steps: number of steps T ≥ 1 (self-composition).

    Returns:
        A ``dp_accounting`` DpEvent (``SelfComposedDpEvent`` when ``steps > 1``).

    Raises:
        ValueError, TypeError: an argument outside its range or of the wrong kind.
    """
    sigma = V.non_negative("noise_multiplier", noise_multiplier)
    q = V.probability("sampling_prob", sampling_prob)
    steps = V.positive_int("steps", steps)
    if sigma == 0:
        step = _dpe.NonPrivateDpEvent()
    elif q == 1.0:
        step = _dpe.GaussianDpEvent(sigma)
    else:
        step = _dpe.PoissonSampledDpEvent(q, _dpe.GaussianDpEvent(sigma))
    return _self_composed(step, steps)


def fixed_size_event(noise_multiplier, batch_size, dataset_size, steps=1) -> _dpe.DpEvent:
    """``steps`` DP-SGD steps on fixed-size batches sampled WITHOUT replacement.

    Only valid under REPLACE-ONE adjacency (the dataset size is public): dpkit's accountants
    refuse it under add/remove, and only the ``"rdp"`` accountant (Wang, Balle, Kasiviswanathan,
    AISTATS 2019, Thm. 27) supports it. Replacing one record changes the sum of clipped vectors
    by up to 2·C, so the Gaussian inside the event carries ``noise_multiplier / 2`` (dp_accounting
    reads its noise multiplier as std / sensitivity); forgetting this factor halves the noise.

    Args:
        noise_multiplier: σ ≥ 0 (std / clipping norm, DP-SGD convention); 0 → ``NonPrivateDpEvent``.
        batch_size: B, records per batch, 1 ≤ B ≤ dataset_size.
        dataset_size: N ≥ 1.
        steps: number of steps T ≥ 1.

    Returns:
        ``SampledWithoutReplacementDpEvent(N, B, GaussianDpEvent(σ/2))``, self-composed T times.

    Raises:
        ValueError, TypeError: an argument outside its range or of the wrong kind.
    """
    sigma = V.non_negative("noise_multiplier", noise_multiplier)
    batch_size = V.positive_int("batch_size", batch_size)
    dataset_size = V.positive_int("dataset_size", dataset_size)
    steps = V.positive_int("steps", steps)
    if batch_size > dataset_size:
        raise ValueError(f"batch_size must be <= dataset_size ({dataset_size}); got {batch_size!r}")
    if sigma == 0:
        step = _dpe.NonPrivateDpEvent()
    else:
        step = _dpe.SampledWithoutReplacementDpEvent(
            dataset_size, batch_size, _dpe.GaussianDpEvent(sigma / 2.0))
    return _self_composed(step, steps)


def compose_events(*events) -> _dpe.DpEvent:
    """Sequential (possibly adaptive) composition of events.

    Args:
        *events: one or more ``dp_accounting`` DpEvents.

    Returns:
        The single event if one was given, else ``ComposedDpEvent(list(events))``.

    Raises:
        ValueError: no event given.
        TypeError: an argument is not a DpEvent.
    """
    if not events:
        raise ValueError("events must contain at least one DpEvent; got none")
    for i, event in enumerate(events):
        check_event(f"events[{i}]", event)
    return events[0] if len(events) == 1 else _dpe.ComposedDpEvent(list(events))


def check_event(name: str, event) -> _dpe.DpEvent:
    """Raise ``TypeError`` unless ``event`` is a ``dp_accounting`` DpEvent; return it."""
    if not isinstance(event, _dpe.DpEvent):
        raise TypeError(f"{name} must be a dp_accounting DpEvent (see dpkit.accountants.dpsgd_event); "
                        f"got {event!r} ({type(event).__name__})")
    return event


def relation_policy(event: _dpe.DpEvent, relation: NeighboringRelation) -> str | None:
    """Why dpkit refuses ``event`` under ``relation``, or ``None`` when the pairing is sound.

    Under add/remove: everything except sampling without replacement (which needs a public
    dataset size). Under replace-one: only trees of sampling-without-replacement events (and
    no-op / non-private ones), because the other builders use the add/remove sensitivity.
    """
    allowed_wor = relation is NeighboringRelation.REPLACE_ONE
    for leaf in _walk(event):
        if isinstance(leaf, _dpe.SampledWithoutReplacementDpEvent) and not allowed_wor:
            return ("sampling without replacement (fixed_size_event) is only accounted under "
                    "neighboring_relation='replace_one'")
        if allowed_wor and not isinstance(leaf, (_dpe.SampledWithoutReplacementDpEvent,
                                                 _dpe.NoOpDpEvent, _dpe.NonPrivateDpEvent)):
            return (f"under 'replace_one' dpkit only accounts fixed_size_event events; "
                    f"{type(leaf).__name__} uses the add/remove sensitivity")
    return None


def _walk(event: _dpe.DpEvent):
    """Yield the non-composition nodes of an event tree (sampling events count as leaves)."""
    if isinstance(event, _dpe.SelfComposedDpEvent):
        yield from _walk(event.event)
    elif isinstance(event, _dpe.ComposedDpEvent):
        for sub in event.events:
            yield from _walk(sub)
    else:
        yield event


def leaves_with_counts(event: _dpe.DpEvent, count: int = 1):
    """Yield ``(leaf, count)`` for every non-composition node, multiplying self-composition counts."""
    if isinstance(event, _dpe.SelfComposedDpEvent):
        yield from leaves_with_counts(event.event, event.count * count)
    elif isinstance(event, _dpe.ComposedDpEvent):
        for sub in event.events:
            yield from leaves_with_counts(sub, count)
    else:
        yield event, count


def merge_gaussians(leaf_counts):
    """Fold every plain Gaussian leaf into ONE equivalent Gaussian; return ``(sigma or None, rest)``.

    n_i releases of the Gaussian mechanism with noise multipliers σ_i compose EXACTLY to one
    Gaussian with σ = (Σ n_i / σ_i²)^(-1/2) (Dong, Roth, Su, JRSS-B 2022, Cor. 3.3: μ-GDP
    composes as μ² = Σ μ_i², and the Gaussian mechanism is exactly 1/σ-GDP). Numerical
    accountants then handle one Gaussian instead of self-composing a huge count, which is both
    faster and tighter. ``rest`` keeps the other ``(leaf, count)`` pairs, merged by equality.
    """
    inv_var = 0.0
    rest: list = []
    for leaf, count in leaf_counts:
        if isinstance(leaf, _dpe.GaussianDpEvent) and leaf.noise_multiplier > 0:
            inv_var += count / float(leaf.noise_multiplier) ** 2
            continue
        for pair in rest:  # linear scan: leaves such as mixtures hold lists and are unhashable
            if pair[0] == leaf:
                pair[1] += count
                break
        else:
            rest.append([leaf, count])
    sigma = 1.0 / inv_var ** 0.5 if inv_var > 0 else None
    return sigma, [tuple(pair) for pair in rest]
