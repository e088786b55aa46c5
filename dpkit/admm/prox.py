"""Proximal operators used by private ADMM, vectorised over users.

Conventions (documented signatures a user-supplied prox must follow):

* Loss prox, one row per user: ``loss_prox(V, step, X, y) -> ndarray (m, p)`` returns, for each
  row i, ``argmin_x loss(x; X[i], y[i]) + ||x - V[i]||^2 / (2 * step)``.
* Regulariser prox: ``reg_prox(v, step) -> ndarray (p,)`` returns
  ``argmin_x r(x) + ||x - v||^2 / (2 * step)``.

Closed forms: Parikh and Boyd 2014, "Proximal Algorithms", Sec. 6.1 (quadratic; the rank-one
case via Sherman-Morrison), 6.5.2 (L1 soft-thresholding), 6.1.1 (elastic net). The logistic prox has
no closed form: it reduces to a monotone scalar equation per user, solved by bisection.
"""

from __future__ import annotations

import numpy as np


def squared_loss_prox(V, step, X, y):
    """Prox of ``0.5 * (y_i - <x_i, x>)^2`` for every row (closed form, Sherman-Morrison).

    Args:
        V: (m, p) centres.  step: prox step (> 0).  X: (m, p) features.  y: (m,) targets.

    Returns:
        (m, p) array ``V + step * X * (y - <X, V>) / (1 + step * ||X||^2)`` (row-wise).
    """
    resid = y - np.einsum("ij,ij->i", X, V)
    scale = step * resid / (1.0 + step * np.einsum("ij,ij->i", X, X))
    return V + scale[:, None] * X


def logistic_loss_prox(V, step, X, y, *, iters=60):
    """Prox of ``log(1 + exp(-y_i <x_i, x>))`` (labels in {-1, +1}) for every row.

    The minimiser is ``V[i] + tau_i * y_i * X[i]`` where ``tau`` in (0, step) solves
    ``tau = step * sigmoid(-(m_i + tau * k_i))``, ``m_i = y_i <X[i], V[i]>``, ``k_i = ||X[i]||^2``;
    the left side minus the right is increasing in tau, so bisection converges (width step/2^iters).

    Args:
        V, step, X, y: as in :func:`squared_loss_prox`; ``y`` in {-1, +1}.
        iters: bisection iterations.

    Returns:
        (m, p) array of proximal points.
    """
    m = y * np.einsum("ij,ij->i", X, V)
    k = np.einsum("ij,ij->i", X, X)
    lo = np.zeros_like(m)
    hi = np.full_like(m, float(step))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        # phi(mid) = mid - step * sigmoid(-(m + mid k)), computed stably via logaddexp
        phi = mid - step * np.exp(-np.logaddexp(0.0, m + mid * k))
        above = phi > 0
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    tau = 0.5 * (lo + hi)
    return V + (tau * y)[:, None] * X


def _masked(fn):
    """Apply a coordinate-wise prox only where ``penalized`` is True (the intercept stays free)."""
    def prox(v, step, penalized=None):
        out = fn(v, step)
        return out if penalized is None else np.where(penalized, out, v)
    return prox


@_masked
def _zero(v, step):
    return v


def l1_prox(alpha):
    """Return the prox of ``alpha * ||x||_1`` (soft-thresholding at ``alpha * step``)."""
    return _masked(lambda v, step: np.sign(v) * np.maximum(np.abs(v) - alpha * step, 0.0))


def l2_prox(alpha):
    """Return the prox of ``alpha / 2 * ||x||^2`` (shrinkage ``v / (1 + alpha * step)``)."""
    return _masked(lambda v, step: v / (1.0 + alpha * step))


def elastic_net_prox(alpha, l1_ratio):
    """Return the prox of ``alpha * (l1_ratio ||x||_1 + (1 - l1_ratio) / 2 ||x||^2)`` (sklearn scaling)."""
    def fn(v, step):
        soft = np.sign(v) * np.maximum(np.abs(v) - alpha * l1_ratio * step, 0.0)
        return soft / (1.0 + alpha * (1.0 - l1_ratio) * step)
    return _masked(fn)


def no_prox():
    """Return the prox of the zero function (identity)."""
    return _zero
