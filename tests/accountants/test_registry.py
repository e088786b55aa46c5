"""Registry: names, refusal of silent overrides, validation."""

import pytest

from dpkit.accountants import available_accountants, make_accountant, register_accountant
from dpkit.accountants import registry
from dpkit.accountants.pld import PLDAccountant


def test_builtin_names_and_classes():
    assert {"pld", "rdp", "prv", "gdp"} <= set(available_accountants())
    for name in ("pld", "rdp", "prv", "gdp"):
        acc = make_accountant(name)
        assert acc.name == name and acc.ledger == []
    assert make_accountant().name == "pld"
    assert make_accountant("gdp").is_approximate and not make_accountant("pld").is_approximate


def test_register_refuses_silent_override(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # isolate this test
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("pld", lambda **kw: PLDAccountant(**kw))

    class Coarse(PLDAccountant):
        name = "coarse"

    register_accountant("coarse", lambda **kw: Coarse(value_discretization_interval=1e-2, **kw))
    assert "coarse" in available_accountants()
    assert make_accountant("coarse").name == "coarse"
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("coarse", Coarse)
    register_accountant("coarse", Coarse, overwrite=True)
    assert make_accountant("coarse")._config() == {"value_discretization_interval": None,
                                                   "relative_tolerance": 5e-4}


@pytest.mark.parametrize("call, exc, match", [
    (lambda: make_accountant("nope"), ValueError, "name"),
    (lambda: make_accountant(None), TypeError, "name"),
    (lambda: make_accountant("pld", value_discretisation_interval=1e-3), TypeError, "value_discretisation"),
    (lambda: register_accountant("", PLDAccountant), ValueError, "name"),
    (lambda: register_accountant(3, PLDAccountant), TypeError, "name"),
    (lambda: register_accountant("x", "not callable"), TypeError, "factory"),
])
def test_invalid_registry_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
