"""Server optimizers: how the noisy average update Δ̄ moves the global model.

The server treats −Δ̄ as a pseudo-gradient (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, Alg. 1), so any ``torch.optim`` optimizer works: ``SGD(lr=η_s)`` is FedAvg with server
learning rate η_s (η_s = 1: plain FedAvg, McMahan et al. 2017), SGD with momentum is FedAvgM.
:class:`FedAdam` is the paper's FedAdam (Alg. 2), which differs from ``torch.optim.Adam``: no bias
correction and the adaptivity τ added outside the square root, with v₀ = τ².
The optimizer is post-processing of the DP release: it costs no privacy.
"""

from __future__ import annotations

import torch

from dpkit import _validate


class FedAdam(torch.optim.Optimizer):
    """FedAdam (Reddi et al., ICLR 2021, Alg. 2) on the pseudo-gradient g = −Δ̄.

    m_t = β₁ m_{t−1} + (1−β₁) Δ̄_t;  v_t = β₂ v_{t−1} + (1−β₂) Δ̄_t²;  x_{t+1} = x_t + η m_t / (√v_t + τ),
    with m₋₁ = 0 and v₋₁ = τ².

    Args:
        params: the global model's tensors.
        lr: server learning rate η > 0.
        betas: (β₁, β₂) in [0, 1).
        tau: adaptivity τ > 0.

    Raises:
        ValueError, TypeError: an argument out of range.
    """

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.99), tau=1e-3):
        lr = _validate.positive("lr", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats; got {betas!r}")
        for i, b in enumerate(betas):
            b = _validate.finite(f"betas[{i}]", b)
            if not 0 <= b < 1:
                raise ValueError(f"betas[{i}] must lie in [0, 1); got {b!r}")
        tau = _validate.positive("tau", tau)
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), tau=tau))

    @torch.no_grad()
    def step(self, closure=None):
        """One server step from ``p.grad`` = −Δ̄."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                delta = -p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["tau"] ** 2)
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(delta, alpha=1 - b1)
                v.mul_(b2).addcmul_(delta, delta, value=1 - b2)
                p.addcdiv_(m, v.sqrt().add_(group["tau"]), value=group["lr"])
        return loss


def make_server_optimizer(spec, params) -> torch.optim.Optimizer:
    """Build the server optimizer from ``"fedavg"``, ``"fedadam"``, or a factory.

    Args:
        spec: ``"fedavg"`` (SGD, lr 1: plain FedAvg), ``"fedadam"`` (:class:`FedAdam` with the
            defaults), or a callable ``params -> torch.optim.Optimizer`` (e.g.
            ``lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9)``).
        params: the global model's tensors.

    Returns:
        A ``torch.optim.Optimizer`` over ``params``.

    Raises:
        ValueError: an unknown name. TypeError: neither a name nor a callable, or the factory
            returned something else.
    """
    if isinstance(spec, str):
        _validate.one_of("server_optimizer", spec, {"fedavg", "fedadam"})
        return torch.optim.SGD(params, lr=1.0) if spec == "fedavg" else FedAdam(params)
    if isinstance(spec, torch.optim.Optimizer) or not callable(spec):
        raise TypeError("server_optimizer must be 'fedavg', 'fedadam' or a callable params -> "
                        f"torch.optim.Optimizer; got {type(spec).__name__}")
    opt = spec(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"server_optimizer factory must return a torch.optim.Optimizer; got {type(opt).__name__}")
    return opt
