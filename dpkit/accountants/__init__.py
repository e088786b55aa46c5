"""Privacy accounting (TORCH-FREE): events, accountants, calibration, budgets.

Events are ``dp_accounting`` DpEvents built and validated by :mod:`dpkit.accountants.events`;
accountants (``"pld"`` default, ``"rdp"``, ``"prv"``, ``"gdp"``) share one interface
(:class:`Accountant`). Public names are resolved lazily from the module that owns them.
"""

from dpkit._lazy import lazy_exports

# public name -> defining submodule (relative to this package)
_PUBLIC = {
    # events
    "dpsgd_event": "events",
    "fixed_size_event": "events",
    "gaussian_event": "events",
    "laplace_event": "events",
    "compose_events": "events",
    "accumulated_poisson_event": "accumulation",
    "NeighboringRelation": "events",
    # accountants
    "Accountant": "base",
    "make_accountant": "registry",
    "register_accountant": "registry",
    "available_accountants": "registry",
    # calibration and budgets
    "calibrate_noise_multiplier": "calibration",
    "steps_for_budget": "calibration",
    "epochs_to_steps": "calibration",
    "PrivacyBudget": "budget",
    # matrix mechanisms (MMCC)
    "mmcc_epsilon": "mmcc",
    "mmcc_analysis": "mmcc",
    "MMCCResult": "mmcc",
    "MatrixMechanismAccountant": "mmcc",
    "banded_amplified_epsilon": "mmcc",
    "unamplified_epsilon": "mmcc",
    # amplification by iteration
    "IterationAccountant": "iteration",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, __all__)
