"""Empirical privacy auditing and attack-risk bounds (TORCH-FREE: numpy, scipy, dp_accounting).

* One-shot estimation (Andrew et al., ICLR 2024): :func:`canary_directions`,
  :func:`canary_cosines`, :func:`max_cosines_over_rounds`, :func:`one_shot_epsilon`, and the
  exact unequal-variance Gaussian distance :func:`gaussian_pair_epsilon` / :func:`gaussian_pair_delta`.
* Closed-form record-level bounds (Cherubin et al., USENIX Security 2024):
  :func:`bayes_security_mia`, :func:`bayes_security_attribute`, :func:`record_level_risk`,
  :func:`approximation_error`; PLD-based references :func:`pld_advantage`, :func:`tpr_at_fpr_bound`.
* One-run auditing (Steinke, Nasr, Jagielski, NeurIPS 2023): :func:`one_run_epsilon_lower_bound`,
  :func:`one_run_guesses`; many-runs audits: :func:`clopper_pearson_interval`,
  :func:`many_runs_epsilon_lower_bound`.
* Artefacts and reports: :class:`AuditArtifact`, :func:`save_artifact`, :func:`load_artifact`,
  :func:`audit`, :class:`AuditReport`, :func:`claimed_epsilon`.

Public names resolve lazily from the module that owns them. The torch side (inserting canary
gradients into a dpkit DP-SGD run) lives in ``dpkit.audit.canaries`` and is never imported here.
"""

from dpkit._lazy import lazy_exports

# public name -> defining submodule (relative to this package)
_PUBLIC = {
    "gaussian_pair_delta": "gaussians",
    "gaussian_pair_epsilon": "gaussians",
    "canary_directions": "canary_stats",
    "canary_cosines": "canary_stats",
    "max_cosines_over_rounds": "canary_stats",
    "OneShotEstimate": "one_shot",
    "one_shot_epsilon": "one_shot",
    "approximation_error": "record_level",
    "bayes_security_mia": "record_level",
    "bayes_security_attribute": "record_level",
    "RecordLevelRisk": "record_level",
    "record_level_risk": "record_level",
    "dpsgd_pld": "tradeoff",
    "pld_advantage": "tradeoff",
    "tpr_at_fpr_bound": "tradeoff",
    "one_run_epsilon_lower_bound": "one_run",
    "one_run_guesses": "one_run",
    "clopper_pearson_interval": "one_run",
    "many_runs_epsilon_lower_bound": "one_run",
    "AuditArtifact": "artifact",
    "AuditReport": "artifact",
    "save_artifact": "artifact",
    "load_artifact": "artifact",
    "audit": "artifact",
    "claimed_epsilon": "artifact",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, __all__)
