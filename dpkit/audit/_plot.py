"""Histogram of canary statistics vs the null and the fitted Gaussian (matplotlib, lazily)."""

from __future__ import annotations

import numpy as np


def _normal_pdf(x, mean, std):
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))


def plot_audit(report, path) -> None:
    """Draw observed-canary and null histograms with both Gaussians and save to ``path``.

    The picture behind Andrew et al. (ICLR 2024), Fig. 1: the further N(μ̂, σ̂²) sits from the
    null, the larger ε̂.

    Args:
        report: an :class:`dpkit.audit.AuditReport`.
        path: image file to write (format from its suffix, e.g. ``.png``).

    Raises:
        ImportError: matplotlib is not installed (``pip install dpkit[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")  # file output only; never needs a display
    import matplotlib.pyplot as plt

    est, art = report.estimate, report.artifact
    samples = [art.canary_scores] + ([art.null_scores] if art.null_scores is not None else [])
    lo = min(min(s.min() for s in samples), est.null_mean - 4 * est.null_std)
    hi = max(max(s.max() for s in samples), est.mean + 4 * est.std)
    grid = np.linspace(lo, hi, 400)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(lo, hi, 50)
    ax.hist(art.canary_scores, bins=bins, density=True, alpha=0.5, label="inserted canaries")
    if art.null_scores is not None:
        ax.hist(art.null_scores, bins=bins, density=True, alpha=0.5, label="unseen canaries")
    ax.plot(grid, _normal_pdf(grid, est.null_mean, est.null_std), "k--", label="null Gaussian")
    ax.plot(grid, _normal_pdf(grid, est.mean, est.std), "r-", label="fitted N(μ̂, σ̂²)")
    ax.set_xlabel("canary statistic (cosine)")
    ax.set_ylabel("density")
    ax.set_title(f"ε̂ = {est.epsilon:.3g} (≥ {est.epsilon_lower:.3g}), "
                 f"claimed ε = {report.claimed_epsilon:.3g} at δ = {est.delta:g}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
