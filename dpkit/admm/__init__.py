"""Private ADMM (Cyffers, Bellet, Basu, ICML 2023): centralized, federated and decentralized.

numpy/scipy only. Public names:

* :class:`DPLassoADMM`, :class:`DPLogisticADMM` - scikit-learn style estimators.
* :func:`private_admm` - the noisy relaxed Douglas-Rachford iteration (three variants).
* :func:`admm_epsilon`, :func:`calibrate_admm_noise` - its accounting (replace-one neighbours).
* :func:`dp_proximal_sgd` - the DP proximal SGD baseline, accounted the same way.
* prox operators: :func:`squared_loss_prox`, :func:`logistic_loss_prox`, :func:`l1_prox`,
  :func:`l2_prox`, :func:`elastic_net_prox`, :func:`no_prox`.
"""

from dpkit.admm.accounting import (admm_epsilon, calibrate_admm_noise,
                                   growing_sensitivity_gaussian_rdp, sampled_gaussian_replace_rdp)
from dpkit.admm.estimators import DPLassoADMM, DPLogisticADMM
from dpkit.admm.prox import (elastic_net_prox, l1_prox, l2_prox, logistic_loss_prox, no_prox,
                             squared_loss_prox)
from dpkit.admm.proxsgd import dp_proximal_sgd, logistic_loss_grad, squared_loss_grad
from dpkit.admm.solver import ADMMResult, private_admm

__all__ = ["ADMMResult", "DPLassoADMM", "DPLogisticADMM", "admm_epsilon", "calibrate_admm_noise",
           "dp_proximal_sgd", "elastic_net_prox", "growing_sensitivity_gaussian_rdp", "l1_prox", "l2_prox", "logistic_loss_grad",
           "logistic_loss_prox", "no_prox", "private_admm", "sampled_gaussian_replace_rdp",
           "squared_loss_grad", "squared_loss_prox"]
