"""Local training on one client: start from the global model, return the model delta.

McMahan et al., ICLR 2018 ("Learning Differentially Private Recurrent Language Models"),
Alg. 1, ``UserUpdate``: E local epochs of minibatch training from the current global model θ;
the client returns Δ = θ_local − θ. Any ``torch.optim`` optimizer may be used locally (the
clipping of Δ at the server bounds a user's influence whatever the local procedure is).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from dpkit import _validate


def federated_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The trainable parameters of ``model`` that federated training exchanges, in a fixed order.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: the model has buffers (e.g. BatchNorm running statistics): they would be
            trained locally but never aggregated, clipped or noised, so they are refused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ValueError(f"model must have no buffers (they escape aggregation and noise); got {buffers[:3]}"
                         " — replace BatchNorm with GroupNorm/LayerNorm")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model must have at least one trainable parameter")
    return params


class LocalTrainer:
    """Runs ``UserUpdate`` (McMahan et al. 2018, Alg. 1) for any client on a shared work model.

    Args:
        model: the work model; its trainable parameters are overwritten with the global model
            before each client trains.
        optimizer: callable ``params -> torch.optim.Optimizer`` building a FRESH local optimizer
            for every client update (e.g. ``lambda p: torch.optim.SGD(p, lr=0.1)``).
        epochs: local epochs E ≥ 1.
        batch_size: local minibatch size ≥ 1.
        loss_fn: ``loss_fn(model(x), y)`` → mean loss; default cross-entropy.

    Raises:
        TypeError, ValueError: an argument of the wrong kind or out of range.
    """

    def __init__(self, model: nn.Module, optimizer: Callable, *, epochs: int = 1, batch_size: int = 10,
                 loss_fn: Callable | None = None):
        self.params = federated_parameters(model)
        if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("optimizer must be a callable params -> torch.optim.Optimizer (a factory, so "
                            f"every client starts with fresh optimizer state); got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.epochs = _validate.positive_int("epochs", epochs)
        self.batch_size = _validate.positive_int("batch_size", batch_size)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn or nn.functional.cross_entropy

    def update(self, global_params, data, generator: torch.Generator) -> list[torch.Tensor]:
        """Train on ``data`` from ``global_params``; return Δ (one tensor per parameter).

        Args:
            global_params: tensors shaped like the model's trainable parameters.
            data: the client's ``(x, y)`` tensors (may be empty: Δ = 0).
            generator: shuffling stream of this (round, client).

        Returns:
            List of detached tensors θ_local − θ.
        """
        with torch.no_grad():
            for p, g in zip(self.params, global_params):
                p.copy_(g)
        x, y = data
        n = int(x.shape[0])
        if n > 0:
            opt = self.optimizer(self.params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizer factory must return a torch.optim.Optimizer; got {type(opt).__name__}")
            self.model.train()
            for _ in range(self.epochs):
                order = torch.randperm(n, generator=generator)
                for start in range(0, n, self.batch_size):
                    idx = order[start:start + self.batch_size]
                    opt.zero_grad(set_to_none=True)
                    self.loss_fn(self.model(x[idx]), y[idx]).backward()
                    opt.step()
        with torch.no_grad():
            return [p.detach() - g for p, g in zip(self.params, global_params)]
