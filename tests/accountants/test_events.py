"""Event builders: the DpEvents they build, their validation, relation parsing, serialisation."""

import json
import math

import dp_accounting
import pytest
from dp_accounting import dp_event as E

from dpkit.accountants import (NeighboringRelation, compose_events, dpsgd_event, fixed_size_event,
                               gaussian_event, laplace_event)
from dpkit.accountants._serialize import event_from_dict, event_to_dict
from dpkit.accountants.events import as_relation


def test_dpsgd_event_structure():
    assert dpsgd_event(1.5, 0.01) == E.PoissonSampledDpEvent(0.01, E.GaussianDpEvent(1.5))
    assert dpsgd_event(1.5, 0.01, 7) == E.SelfComposedDpEvent(
        E.PoissonSampledDpEvent(0.01, E.GaussianDpEvent(1.5)), 7)
    # q = 1 is the plain Gaussian mechanism
    assert dpsgd_event(2.0, 1.0, 3) == E.SelfComposedDpEvent(E.GaussianDpEvent(2.0), 3)
    # σ = 0 is honest about being non-private
    assert dpsgd_event(0, 0.5) == E.NonPrivateDpEvent()


def test_fixed_size_event_halves_noise_for_replace_one_sensitivity():
    # replacing one record moves the clipped sum by up to 2C: the event's σ is relative to 2C
    ev = fixed_size_event(2.0, batch_size=10, dataset_size=100, steps=4)
    assert ev == E.SelfComposedDpEvent(E.SampledWithoutReplacementDpEvent(100, 10, E.GaussianDpEvent(1.0)), 4)


def test_other_builders():
    assert gaussian_event(3.0) == E.GaussianDpEvent(3.0)
    assert gaussian_event(0) == E.NonPrivateDpEvent()
    assert laplace_event(2.0) == E.LaplaceDpEvent(2.0)
    a, b = gaussian_event(1.0), laplace_event(1.0)
    assert compose_events(a) is a
    assert compose_events(a, b) == E.ComposedDpEvent([a, b])


@pytest.mark.parametrize("call, exc, match", [
    (lambda: dpsgd_event(-1.0, 0.1), ValueError, "noise_multiplier"),
    (lambda: dpsgd_event(math.nan, 0.1), ValueError, "noise_multiplier"),
    (lambda: dpsgd_event(math.inf, 0.1), ValueError, "noise_multiplier"),
    (lambda: dpsgd_event("1", 0.1), TypeError, "noise_multiplier"),
    (lambda: dpsgd_event(1.0, 0.0), ValueError, "sampling_prob"),
    (lambda: dpsgd_event(1.0, 1.5), ValueError, "sampling_prob"),
    (lambda: dpsgd_event(1.0, -0.1), ValueError, "sampling_prob"),
    (lambda: dpsgd_event(1.0, 0.1, 0), ValueError, "steps"),
    (lambda: dpsgd_event(1.0, 0.1, 2.5), TypeError, "steps"),
    (lambda: fixed_size_event(1.0, 0, 10), ValueError, "batch_size"),
    (lambda: fixed_size_event(1.0, 11, 10), ValueError, "batch_size"),
    (lambda: fixed_size_event(1.0, 5, 0), ValueError, "dataset_size"),
    (lambda: fixed_size_event(-1.0, 5, 10), ValueError, "noise_multiplier"),
    (lambda: gaussian_event(-0.5), ValueError, "noise_multiplier"),
    (lambda: laplace_event(0.0), ValueError, "scale"),
    (lambda: laplace_event(None), TypeError, "scale"),
    (lambda: compose_events(), ValueError, "events"),
    (lambda: compose_events(gaussian_event(1.0), "x"), TypeError, r"events\[1\]"),
    (lambda: as_relation("add-remove"), ValueError, "neighboring_relation"),
    (lambda: as_relation(3), TypeError, "neighboring_relation"),
    (lambda: as_relation(NeighboringRelation.REPLACE_SPECIAL), ValueError, "neighboring_relation"),
])
def test_invalid_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_relation_parsing():
    assert as_relation("add_remove") is dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    assert as_relation("replace_one") is dp_accounting.NeighboringRelation.REPLACE_ONE
    assert as_relation(NeighboringRelation.REPLACE_ONE) is NeighboringRelation.REPLACE_ONE


@pytest.mark.parametrize("event", [
    dpsgd_event(1.1, 0.02, 100),
    fixed_size_event(1.0, 10, 100, 3),
    compose_events(gaussian_event(2.0), laplace_event(3.0), dpsgd_event(0.0, 0.5)),
    E.MixtureOfGaussiansDpEvent(1.0, [0.0, 1.0], [0.5, 0.5]),
])
def test_serialisation_round_trip(event):
    data = json.loads(json.dumps(event_to_dict(event)))
    assert event_from_dict(data) == event


def test_deserialisation_refuses_foreign_classes():
    with pytest.raises(ValueError, match="dp_accounting.dp_event"):
        event_from_dict({"type": "Path"})
    with pytest.raises(ValueError, match="missing field"):
        event_from_dict({"type": "GaussianDpEvent"})
