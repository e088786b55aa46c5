"""Saved audit artefacts and the audit report (claimed ε vs the one-shot estimate).

An artefact is what a training run leaves for an offline audit: the canary statistics, the null
statistics (or the model dimension), and the claimed DP-SGD parameters (σ, q, T, δ). Two file
formats carry the same keys:

* JSON (``.json``) — one object::

      {"format": "dpkit-audit-v1", "canary_scores": [...], "null_scores": [...] | null,
       "dim": 12345 | null, "noise_multiplier": 1.1, "sampling_rate": 0.01, "steps": 1000,
       "delta": 1e-5, "threat_model": "final_model" | "all_iterates"}

* NPZ (``.npz``) — arrays ``canary_scores`` (and ``null_scores``), the other keys as 0-d arrays
  (``dim = 0`` means absent), ``format`` as a string.

:func:`audit` compares the claimed ε (dpkit's PLD accountant on ``dpsgd_event(σ, q, T)``) with
the one-shot estimate of Andrew et al. (ICLR 2024): the verdict is ``"violation"`` when the
LOWER confidence bound of ε̂ (:func:`dpkit.audit.one_shot_epsilon`) exceeds the claim, otherwise
``"consistent"``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from dpkit import _validate
from dpkit.audit.one_shot import OneShotEstimate, one_shot_epsilon

FORMAT = "dpkit-audit-v1"
THREAT_MODELS = ("final_model", "all_iterates")
_KEYS = {"format", "canary_scores", "null_scores", "dim", "noise_multiplier", "sampling_rate",
         "steps", "delta", "threat_model"}


@dataclass(frozen=True)
class AuditArtifact:
    """Canary statistics and the claimed DP-SGD parameters of one run (validated on creation).

    Attributes:
        canary_scores: statistics of the inserted canaries (1-D float array, ≥ 2 values).
        noise_multiplier: claimed σ ≥ 0 (0 = no noise: the claim is ε = ∞).
        sampling_rate: claimed Poisson rate q in (0, 1].
        steps: claimed number of steps T ≥ 1.
        delta: δ in (0, 1) at which ε is compared.
        null_scores: statistics of canaries never inserted, or None.
        dim: model dimension d (null N(0, 1/d)), or None; one of dim / null_scores is required.
        threat_model: ``"final_model"`` or ``"all_iterates"`` (the latter needs null_scores:
            a max over rounds is not centred at 0).
    """

    canary_scores: np.ndarray
    noise_multiplier: float
    sampling_rate: float
    steps: int
    delta: float
    null_scores: np.ndarray | None = None
    dim: int | None = None
    threat_model: str = "final_model"

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("canary_scores", _scores("canary_scores", self.canary_scores))
        if self.null_scores is not None:
            put("null_scores", _scores("null_scores", self.null_scores))
        if self.dim is not None:
            put("dim", _validate.positive_int("dim", self.dim))
        put("noise_multiplier", _validate.non_negative("noise_multiplier", self.noise_multiplier))
        put("sampling_rate", _validate.probability("sampling_rate", self.sampling_rate))
        put("steps", _validate.positive_int("steps", self.steps))
        put("delta", _validate.delta("delta", self.delta))
        _validate.one_of("threat_model", self.threat_model, THREAT_MODELS)
        if self.null_scores is None and self.dim is None:
            raise ValueError("an artefact needs null_scores or dim; got neither")
        if self.threat_model == "all_iterates" and self.null_scores is None:
            raise ValueError("threat_model 'all_iterates' needs null_scores (its null is a max "
                             "over rounds, not N(0, 1/d)); got null_scores=None")

    def to_dict(self) -> dict:
        """JSON-serialisable ``dict`` in the artefact format."""
        return {"format": FORMAT, "canary_scores": self.canary_scores.tolist(),
                "null_scores": None if self.null_scores is None else self.null_scores.tolist(),
                "dim": self.dim, "noise_multiplier": self.noise_multiplier,
                "sampling_rate": self.sampling_rate, "steps": self.steps, "delta": self.delta,
                "threat_model": self.threat_model}


def _scores(name, values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size < 2 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a 1-D array of at least 2 finite values; "
                         f"got shape {arr.shape}")
    return arr


def _suffix(path) -> str:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in (".json", ".npz"):
        raise ValueError(f"path must end in .json or .npz; got {os.fspath(path)!r}")
    return suffix


def save_artifact(path, artifact: AuditArtifact) -> None:
    """Write an artefact as JSON or NPZ (chosen by the file suffix).

    Args:
        path: destination ending in ``.json`` or ``.npz``.
        artifact: the :class:`AuditArtifact`.

    Raises:
        ValueError: unsupported suffix.
        TypeError: ``artifact`` is not an :class:`AuditArtifact`.
    """
    if not isinstance(artifact, AuditArtifact):
        raise TypeError(f"artifact must be an AuditArtifact; got {type(artifact).__name__}")
    if _suffix(path) == ".json":
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(artifact.to_dict(), fh)
        return
    data = artifact.to_dict()
    arrays = {"format": np.array(FORMAT), "canary_scores": artifact.canary_scores,
              "dim": np.array(data["dim"] or 0), "noise_multiplier": np.array(data["noise_multiplier"]),
              "sampling_rate": np.array(data["sampling_rate"]), "steps": np.array(data["steps"]),
              "delta": np.array(data["delta"]), "threat_model": np.array(data["threat_model"])}
    if artifact.null_scores is not None:
        arrays["null_scores"] = artifact.null_scores
    with open(path, "wb") as fh:  # a file handle: np.savez would otherwise append ".npz"
        np.savez(fh, **arrays)


def load_artifact(path) -> AuditArtifact:
    """Read and validate an artefact written by :func:`save_artifact` (or by hand).

    Args:
        path: a ``.json`` or ``.npz`` file.

    Returns:
        :class:`AuditArtifact`.

    Raises:
        ValueError: unsupported suffix, unreadable content, wrong ``format``, unknown or missing
            keys, invalid values (the message names the key).
        FileNotFoundError: the file does not exist.
    """
    if _suffix(path) == ".json":
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"artefact must be a JSON object; got {type(data).__name__}")
    else:
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ValueError(f"{os.fspath(path)!r} is not a readable NPZ file: {exc}") from None
        data = {k: (v.item() if v.ndim == 0 else v) for k, v in data.items()}
        if data.get("dim") == 0:
            data["dim"] = None
    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"artefact has unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    if data.get("format") != FORMAT:
        raise ValueError(f"format must be {FORMAT!r}; got {data.get('format')!r}")
    missing = {"canary_scores", "noise_multiplier", "sampling_rate", "steps", "delta"} - set(data)
    if missing:
        raise ValueError(f"artefact is missing keys {sorted(missing)}")
    kwargs = {k: v for k, v in data.items() if k != "format"}
    return AuditArtifact(**kwargs)


@dataclass(frozen=True)
class AuditReport:
    """Outcome of :func:`audit`.

    Attributes:
        claimed_epsilon: ε of the claimed (σ, q, T) at δ (PLD accountant; inf when σ = 0).
        estimate: the :class:`OneShotEstimate`.
        verdict: ``"violation"`` (estimate.epsilon_lower > claimed_epsilon) or ``"consistent"``.
        artifact: the audited :class:`AuditArtifact`.
    """

    claimed_epsilon: float
    estimate: OneShotEstimate
    verdict: str
    artifact: AuditArtifact

    def to_dict(self) -> dict:
        """JSON-serialisable summary (scores omitted)."""
        a = self.artifact
        return {"claimed_epsilon": self.claimed_epsilon, "verdict": self.verdict,
                "estimate": asdict(self.estimate), "noise_multiplier": a.noise_multiplier,
                "sampling_rate": a.sampling_rate, "steps": a.steps, "delta": a.delta,
                "threat_model": a.threat_model, "dim": a.dim}


def claimed_epsilon(noise_multiplier, sampling_rate, steps, delta) -> float:
    """ε claimed for DP-SGD (σ, q, T) at δ by dpkit's PLD accountant (add/remove relation).

    Args:
        noise_multiplier: σ ≥ 0 (0 gives inf).
        sampling_rate: Poisson rate q in (0, 1].
        steps: T ≥ 1.
        delta: δ in (0, 1).

    Returns:
        ε (float, possibly inf).

    Raises:
        ValueError/TypeError: invalid arguments (raised by the accountant's event builder).
    """
    from dpkit.accountants import dpsgd_event, make_accountant

    return float(make_accountant("pld").compose(
        dpsgd_event(noise_multiplier, sampling_rate, steps)).epsilon(delta))


def audit(artifact: AuditArtifact, *, confidence=0.95) -> AuditReport:
    """Audit one run: claimed ε vs the one-shot estimate and its lower confidence bound.

    Args:
        artifact: the :class:`AuditArtifact`.
        confidence: level in (0, 1) of the lower bound.

    Returns:
        :class:`AuditReport`.

    Raises:
        TypeError: ``artifact`` is not an :class:`AuditArtifact`.
        ValueError: invalid options (see :func:`one_shot_epsilon`).
    """
    if not isinstance(artifact, AuditArtifact):
        raise TypeError(f"artifact must be an AuditArtifact; got {type(artifact).__name__}")
    # the exact N(0, 1/d) null holds only for final-model cosines
    dim = artifact.dim if artifact.threat_model == "final_model" else None
    estimate = one_shot_epsilon(
        artifact.canary_scores, delta=artifact.delta,
        null_scores=artifact.null_scores if dim is None else None, dim=dim,
        confidence=confidence)
    claim = claimed_epsilon(artifact.noise_multiplier, artifact.sampling_rate, artifact.steps,
                            artifact.delta)
    verdict = "violation" if estimate.epsilon_lower > claim else "consistent"
    return AuditReport(claimed_epsilon=claim, estimate=estimate, verdict=verdict,
                       artifact=artifact)
