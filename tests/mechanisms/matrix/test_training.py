"""DPOptimizer + CorrelatedNoise: the model trajectory carries exactly the decoder's noise B·z."""

import numpy as np
import pytest
import torch
from torch import nn

import dpkit
from dpkit.accountants import dpsgd_event
from dpkit.mechanisms.matrix import CorrelatedNoise, Participation, banded, binary_tree, prefix_sum
from dpkit.mechanisms.matrix.streaming import dense_noise_matrix


@pytest.mark.parametrize("strategy", [banded(12, 3), binary_tree(12)], ids=lambda s: s.name)
def test_zero_gradients_give_prefix_sums_of_correlated_noise(strategy):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    theta0 = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sigma, clip, batch = 0.7, 2.0, 4.0
    # Poisson sampling (data_loader=None) lets an example take part in every step
    noise = CorrelatedNoise(strategy, seed=9, participation=Participation.min_separation(1, 12))
    model, opt, _ = dpkit.make_private(model, opt, None, max_grad_norm=clip, noise_multiplier=sigma,
                                       sample_rate=0.5, expected_batch_size=batch, noise=noise)
    acc = opt.accountant
    x = torch.ones(2, 3, dtype=torch.float64)
    traj = []
    for _ in range(12):
        opt.zero_grad()
        (0.0 * model(x)).sum().backward()  # zero per-example gradients: only noise moves θ
        opt.step()
        traj.append((model.weight.detach() - theta0).reshape(-1).numpy())
    Z = dense_noise_matrix(strategy, 9, model.weight.detach())
    expected = -sigma * clip * noise.sensitivity / batch * (prefix_sum(12) @ strategy.noise_operator() @ Z)
    np.testing.assert_allclose(np.stack(traj), expected, atol=1e-10)
    assert acc.steps == 12 and acc.ledger[0][0] == dpsgd_event(sigma, 0.5, 1)
