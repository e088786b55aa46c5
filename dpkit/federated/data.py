"""Client datasets for federated simulation: Dirichlet non-IID partitions and FedProx synthetic data.

* :func:`dirichlet_partition` — label-skewed partition (Hsu, Qi, Brown 2019, "Measuring the
  Effects of Non-Identical Data Distribution for Federated Visual Classification", Sec. 3): every
  client draws its class proportions p_i ~ Dir(α·p) (p = global class frequencies) and fills an
  equal share of the data from the class pools in those proportions. Small α: nearly one class per
  client; α → ∞: IID.
* :func:`synthetic_clients` — the synthetic(α, β) task of Li et al., "Federated Optimization in
  Heterogeneous Networks" (FedProx, MLSys 2020), Sec. 5.1: α controls how much the local models
  differ, β how much the local feature distributions differ.
* :func:`digits_clients` — scikit-learn's bundled digits (8×8 images, 10 classes), standardised,
  split into a held-out test set and Dirichlet-partitioned clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpkit import _validate


@dataclass
class FederatedData:
    """Per-client training data and a held-out test set.

    Attributes:
        clients: one ``(x, y)`` pair of tensors per client (x float32 (n_i, d), y int64 (n_i,)).
        test: ``(x, y)`` held out from every client (evaluation only), or None.
        num_classes: number of labels.
    """

    clients: list
    test: tuple | None
    num_classes: int

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def num_features(self) -> int:
        return int(self.clients[0][0].shape[1])


def _check_seed(seed) -> int:
    # data-partition / synthetic-data seeds: simulation set-up, not privacy noise or sampling, so
    # a fixed default is fine (the DP run's own seed defaults to OS entropy, see _seeds)
    return _validate.positive_int("seed", seed, allow_zero=True)


def dirichlet_partition(labels, num_clients, alpha, *, seed=0) -> list[np.ndarray]:
    """Split example indices among clients with Dirichlet(α) label skew (Hsu et al. 2019, Sec. 3).

    Client i gets ⌊n/M⌋ or ⌈n/M⌉ examples; its label mix is drawn from Dir(α·p), p the global
    label frequencies, and filled from the remaining examples of each class (a class that runs
    out is dropped from the remaining draws and the mix renormalised). Every example goes to
    exactly one client.

    Args:
        labels: 1-D array of integer labels, length n.
        num_clients: M, 1 ≤ M ≤ n (so that every client holds at least one example).
        alpha: concentration α > 0.
        seed: integer seed (data set-up, not privacy randomness: a fixed default is fine).

    Returns:
        A list of M integer index arrays, disjoint, covering range(n).

    Raises:
        ValueError, TypeError: bad labels, M outside [1, n], α not > 0, bad seed.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array; got shape {labels.shape}, "
                         f"dtype {labels.dtype}")
    n = labels.size
    num_clients = _validate.positive_int("num_clients", num_clients)
    if num_clients > n:
        raise ValueError(f"num_clients must be <= the number of examples {n}; got {num_clients}")
    alpha = _validate.positive("alpha", alpha)
    rng = np.random.default_rng(_check_seed(seed))
    classes, inverse = np.unique(labels, return_inverse=True)
    pools = [list(rng.permutation(np.flatnonzero(inverse == c))) for c in range(classes.size)]
    prior = np.array([len(p) for p in pools], dtype=float) / n
    sizes = np.full(num_clients, n // num_clients)
    sizes[: n % num_clients] += 1
    out = []
    for size in sizes:
        mix = rng.dirichlet(alpha * prior)
        taken = []
        for _ in range(size):
            left = np.array([len(p) > 0 for p in pools])
            weights = np.where(left, mix, 0.0)
            if weights.sum() <= 0:  # the client's classes are exhausted: fall back to what is left
                weights = left.astype(float)
            c = rng.choice(classes.size, p=weights / weights.sum())
            taken.append(pools[c].pop())
        out.append(np.array(sorted(taken), dtype=np.int64))
    return out


def digits_clients(num_clients=100, alpha=0.5, *, test_fraction=0.2, seed=0) -> FederatedData:
    """scikit-learn digits split into a test set and Dirichlet(α) non-IID clients.

    Features are standardised with the mean/std of the TRAINING part (the scaler is a
    simulation convenience, not a private computation).

    Args:
        num_clients: M, at most the number of training examples (1437 at the default split).
        alpha: Dirichlet concentration α > 0 of :func:`dirichlet_partition`.
        test_fraction: fraction in (0, 1) held out as the test set.
        seed: integer seed of the split and the partition (data set-up, not privacy randomness).

    Returns:
        :class:`FederatedData` with 64 features and 10 classes.

    Raises:
        ValueError, TypeError: an argument out of range.
    """
    from sklearn.datasets import load_digits

    seed = _check_seed(seed)
    test_fraction = _validate.probability("test_fraction", test_fraction, allow_one=False)
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(y.size)
    n_test = int(round(test_fraction * y.size))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6
    x = ((x - mean) / std).astype(np.float32)
    parts = dirichlet_partition(y[train_idx], num_clients, alpha, seed=seed)
    clients = [(torch.from_numpy(x[train_idx[p]]), torch.from_numpy(y[train_idx[p]].astype(np.int64)))
               for p in parts]
    test = (torch.from_numpy(x[test_idx]), torch.from_numpy(y[test_idx].astype(np.int64)))
    return FederatedData(clients=clients, test=test, num_classes=10)


def synthetic_clients(num_clients=30, alpha=1.0, beta=1.0, *, dim=60, num_classes=10,
                      mean_size=50, test_size=1000, seed=0) -> FederatedData:
    """FedProx synthetic(α, β) clients (Li et al., MLSys 2020, Sec. 5.1).

    Client k: u_k ~ N(0, α), B_k ~ N(0, β); W_k ∈ R^{C×d} and b_k ∈ R^C have entries ~ N(u_k, 1);
    v_k has entries ~ N(B_k, 1); x ~ N(v_k, Σ) with Σ = diag(j^{-1.2}); y = argmax(W_k x + b_k).
    Client sizes are lognormal (power-law-like, as in the paper) with the given mean, at least 2.
    The test set pools ``test_size`` fresh examples drawn from uniformly chosen clients' models.

    Args:
        num_clients: M ≥ 1.
        alpha, beta: heterogeneity of models and of features, ≥ 0.
        dim: feature dimension d ≥ 1 (60 in the paper).
        num_classes: C ≥ 2 (10 in the paper).
        mean_size: mean number of examples per client, ≥ 2.
        test_size: examples in the held-out test set (0: no test set).
        seed: integer seed (data set-up, not privacy randomness: a fixed default is fine).

    Returns:
        :class:`FederatedData`.

    Raises:
        ValueError, TypeError: an argument out of range.
    """
    num_clients = _validate.positive_int("num_clients", num_clients)
    alpha = _validate.non_negative("alpha", alpha)
    beta = _validate.non_negative("beta", beta)
    dim = _validate.positive_int("dim", dim)
    num_classes = _validate.positive_int("num_classes", num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    mean_size = _validate.positive("mean_size", mean_size)
    if mean_size < 2:
        raise ValueError(f"mean_size must be >= 2; got {mean_size!r}")
    test_size = _validate.positive_int("test_size", test_size, allow_zero=True)
    rng = np.random.default_rng(_check_seed(seed))
    cov_diag = np.arange(1, dim + 1, dtype=float) ** -1.2
    # lognormal with sigma 1 and the requested mean: mu = log(mean) - 1/2
    sizes = np.maximum(2, rng.lognormal(np.log(mean_size) - 0.5, 1.0, num_clients).astype(int))
    models = []
    clients = []
    for k in range(num_clients):
        u, b_k = rng.normal(0, np.sqrt(alpha)), rng.normal(0, np.sqrt(beta))
        w, bias = rng.normal(u, 1, (num_classes, dim)), rng.normal(u, 1, num_classes)
        v = rng.normal(b_k, 1, dim)
        models.append((w, bias, v))
        clients.append(_draw(rng, w, bias, v, cov_diag, sizes[k]))
    test = None
    if test_size:
        owners = rng.integers(0, num_clients, test_size)
        xs, ys = zip(*(_draw(rng, *models[k], cov_diag, 1) for k in owners))
        test = (torch.cat(xs), torch.cat(ys))
    return FederatedData(clients=clients, test=test, num_classes=num_classes)


def _draw(rng, w, bias, v, cov_diag, n):
    x = v + rng.normal(size=(int(n), v.size)) * np.sqrt(cov_diag)
    y = np.argmax(x @ w.T + bias, axis=1)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
