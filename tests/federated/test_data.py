"""Client data: Dirichlet partitions (disjoint cover, skew vs α) and FedProx synthetic(α, β)."""

import numpy as np
import pytest

from dpkit.federated import dirichlet_partition, digits_clients, synthetic_clients


def _labels(n=600, classes=6, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def test_partition_is_a_disjoint_balanced_cover():
    y = _labels()
    parts = dirichlet_partition(y, 37, 0.3, seed=1)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(y.size))
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_small_alpha_is_more_label_skewed_than_large_alpha():
    """Mean fraction of a client's most common label: near 1 for α = 0.05, near IID for α = 100."""
    y = _labels(1200, 6)

    def skew(alpha):
        return np.mean([np.bincount(y[p], minlength=6).max() / p.size
                        for p in dirichlet_partition(y, 40, alpha, seed=2)])
    low, high = skew(0.05), skew(100.0)
    assert low > 0.85
    # IID reference: the expected max-class share of 30 draws from 6 near-equal classes (simulated)
    rng = np.random.default_rng(3)
    iid = np.mean([np.bincount(rng.integers(0, 6, 30), minlength=6).max() / 30 for _ in range(4000)])
    assert high == pytest.approx(iid, abs=0.04)


def test_partition_is_seeded():
    y = _labels()
    a, b = dirichlet_partition(y, 10, 1.0, seed=5), dirichlet_partition(y, 10, 1.0, seed=5)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((np.array([0.5, 1.0]), 1, 1.0), {}, ValueError, "labels"),
    ((np.array([0, 1]), 3, 1.0), {}, ValueError, "num_clients"),
    ((np.array([0, 1]), 0, 1.0), {}, ValueError, "num_clients"),
    ((np.array([0, 1]), 1, 0.0), {}, ValueError, "alpha"),
    ((np.array([0, 1]), 1, 1.0), {"seed": -2}, ValueError, "seed"),
])
def test_partition_invalid(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dirichlet_partition(*args, **kwargs)


def test_digits_clients_shapes_and_test_split():
    data = digits_clients(50, 0.5, seed=0)
    assert data.num_clients == 50 and data.num_features == 64 and data.num_classes == 10
    n_train = sum(int(y.numel()) for _, y in data.clients)
    assert n_train + int(data.test[1].numel()) == 1797


def test_synthetic_clients_follow_the_generator():
    data = synthetic_clients(12, 0.5, 0.5, dim=20, num_classes=5, mean_size=30, test_size=100, seed=0)
    assert data.num_clients == 12 and data.num_features == 20
    for x, y in data.clients:
        assert x.shape[0] == y.shape[0] >= 2 and int(y.max()) < 5
    # Σ = diag(j^-1.2): feature variance within a client decays with the index (first vs last)
    x = data.clients[int(np.argmax([len(y) for _, y in data.clients]))][0].numpy()
    assert x[:, 0].var() > 5 * x[:, -1].var()
    assert data.test[0].shape == (100, 20)


def test_synthetic_beta_moves_client_feature_means_apart():
    def spread(beta):
        d = synthetic_clients(60, 0.0, beta, dim=10, mean_size=20, test_size=0, seed=1)
        return np.var([x.numpy().mean() for x, _ in d.clients])
    assert spread(4.0) > 3 * spread(0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clients=0), "num_clients"), (dict(alpha=-1.0), "alpha"), (dict(beta=-1.0), "beta"),
    (dict(num_classes=1), "num_classes"), (dict(mean_size=1.0), "mean_size"), (dict(dim=0), "dim"),
])
def test_synthetic_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_clients(**kwargs)
