"""dpkit's exception tree.

Bad argument values raise the built-in ``ValueError`` and wrong kinds ``TypeError``; the classes
here are for domain failures that a caller may want to catch on their own::

    DPKitError
    ├── PrivacyBudgetExceeded      a spend would take ε past the budget (raised BEFORE the spend)
    ├── CalibrationError           no noise level reaches the requested (ε, δ)   (also a ValueError)
    ├── UnsupportedModuleError     a layer dpkit cannot clip per example        (also a TypeError)
    ├── UnsupportedEventError      an accountant cannot account an event
    └── NoisePendingError          weights released while lazy noise is still pending
"""


class DPKitError(Exception):
    """Base class of every dpkit-specific error."""


class PrivacyBudgetExceeded(DPKitError):
    """Raised before a privacy spend that would exceed the budget."""


class CalibrationError(DPKitError, ValueError):
    """Raised when no noise level within the searched range meets the privacy target."""


class UnsupportedModuleError(DPKitError, TypeError):
    """Raised when a module cannot be trained with per-example clipping (e.g. BatchNorm)."""


class UnsupportedEventError(DPKitError):
    """Raised when an accountant is asked to account an event it does not support."""


class NoisePendingError(DPKitError):
    """Raised when weights would be released while lazily delayed noise is still pending."""


class AmbiguousStepError(DPKitError, RuntimeError):
    """Raised when dpkit cannot tell what a training step did to the examples (e.g. several forward
    passes before one backward without a declaration, or Poisson batches accumulated across steps);
    dpkit refuses rather than guess an account."""


class SeededRandomnessWarning(UserWarning):
    """A fixed seed drives privacy-relevant randomness (noise, sampling): anyone who knows the seed
    can remove the noise. Use it for tests and reproducibility studies only."""


# the label every ε printed under a reference calibration carries
CLAIM_LABEL = "claimed by the reference code"


class UnverifiedPrivacyClaimWarning(UserWarning):
    """A noise level was calibrated with a published reference code's unverified privacy bound; the
    ε it states is the reference's claim, not an account dpkit can prove (issue 18: dpkit's audits
    contradict both DiceSGD's and private ADMM's reference calibrations)."""
