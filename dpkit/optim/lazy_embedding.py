"""Lazy DP-SGD noise for embedding tables: the optimizer-side component of LazyDP.

LazyDP (Lim, Kwon, Hwang, Maeng, Suh, Rhu, ASPLOS 2024): the embedding weights are updated
SPARSELY — per step only the rows with a clipped gradient are written (O(rows·d) work), while the
noise every other row would have received is remembered as "pending" (the step each row was last
noised) and applied in closed form (:mod:`dpkit.mechanisms.lazy`) just before the row is read:

* a forward pre-hook on every lazy embedding module materialises the rows the input looks up
  (LazyDP's look-ahead over the input queue, done at the moment of the read);
* :meth:`LazyEmbeddingNoise.flush` materialises every row; it runs automatically before
  ``model.state_dict()`` / ``module.state_dict()``, ``optimizer.state_dict()``, the first forward
  pass in eval mode, and whenever the weight-decay prefix sums need a rebase;
* copying a module while noise is pending (``copy.deepcopy(model)``; pickling too, where the
  hooked model is picklable at all) raises :class:`dpkit.errors.NoisePendingError` — by the time
  the copy reaches the guard the weights are already copied, so a flush there would be too late.

Each row then holds exactly what eager DP-SGD would hold, in distribution (and bit-for-bit up to
float64 rounding with the deterministic :class:`~dpkit.mechanisms.lazy.ProbeRowNoise`).

Supported base optimizer: ``torch.optim.SGD`` (any learning-rate schedule, weight decay with
lr·weight_decay < 1). Without momentum, schedules and decay are handled by closed forms
(:class:`~dpkit.mechanisms.lazy.StepHistory`). With momentum (dampening 0, no Nesterov) each row's
momentum buffer is kept here and (row, buffer) receive their EXACT joint pending noise
(:class:`~dpkit.mechanisms.lazy.MomentumSegment`); a change of lr/weight decay/momentum flushes
the table first (a per-step schedule with momentum therefore costs a dense pass per step). Adam /
Adagrad / RMSprop keep non-linear per-coordinate statistics of the NOISY gradient: refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dpkit.errors import NoisePendingError
from dpkit.mechanisms.lazy import MAX_COUNTER, MomentumSegment, RowNoise, StepHistory

EMBEDDING_MODULES = (nn.Embedding, nn.EmbeddingBag)
FLUSH_CHUNK_ROWS = 1 << 15  # rows materialised at once by flush(): bounds its extra memory


class _Table:
    """One lazy embedding weight: its module, name, history and per-row step markers.

    ``det[r]``: the step up to which row r's deterministic part (decay and gradients) is applied
    (steps without weight decay may be left out: their decay factor is exactly 1).
    ``noised[r]``: the step up to which row r's noise is applied; ``noised ≤ det``, except that
    reads while the history has no decaying step advance ``noised`` only: ``det`` then lags over
    steps whose decay factor is exactly 1.
    ``first``: scratch of the read's deduplication (a lookup position per row).
    """

    def __init__(self, name: str, module: nn.Module, group: dict, base: int):
        self.name, self.module, self.group = name, module, group
        self.weight = module.weight
        rows = self.weight.shape[0]
        self.det = torch.full((rows,), base, dtype=torch.int32, device=self.weight.device)
        self.noised = torch.full((rows,), base, dtype=torch.int32, device=self.weight.device)
        self.first = torch.empty((rows,), dtype=torch.int32, device=self.weight.device)
        self.history = StepHistory(base)
        # SGD momentum: the row's buffer evolves jointly with the row (MomentumSegment)
        self.momentum = self.segment = None
        if group.get("momentum", 0) != 0:
            self.momentum = torch.zeros_like(self.weight, memory_format=torch.contiguous_format)
            self.new_segment(base)

    def hyper(self) -> tuple[float, float, float]:
        g = self.group
        return float(g["lr"]), float(g.get("weight_decay", 0.0)), float(g.get("momentum", 0.0))

    def new_segment(self, base: int) -> None:
        self.segment = MomentumSegment(base, *self.hyper())


class LazyEmbeddingNoise:
    """Sparse, lazily-noised SGD updates of the embedding tables of a DP-SGD model.

    Built by :class:`dpkit.DPOptimizer` with ``embedding_noise="lazy"`` (or a
    :class:`~dpkit.mechanisms.lazy.RowNoise`); dense parameters keep ordinary DP-SGD noise.

    Args:
        optimizer: the BASE optimizer (must be ``torch.optim.SGD``; momentum with dampening 0).
        model: the model whose ``nn.Embedding`` / ``nn.EmbeddingBag`` weights are made lazy
            (every one that is trainable and held by ``optimizer``).
        row_noise: the pending-noise source (:class:`GaussianRowNoise` or :class:`CounterGaussianRowNoise`
            for DP).
        noise_std: σ·C, the std of the noise on the clipped SUM.
        expected_batch_size: public normaliser B̄.
        names: parameter name of each weight (used as the table's key).

    Raises:
        ValueError: a base optimizer without an exact lazy form (named, with the alternative),
            no embedding table, an embedding weight shared with another module, a table of
            2**31 rows or more.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *, row_noise: RowNoise,
                 noise_std: float, expected_batch_size: float, names: dict[int, str]):
        if not isinstance(row_noise, RowNoise):
            raise TypeError(f"row_noise must be a dpkit RowNoise; got {type(row_noise).__name__}")
        _check_optimizer(optimizer)
        self.row_noise = row_noise
        self.expected_batch_size = expected_batch_size
        self.scale = noise_std / expected_batch_size
        self.steps = 0
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        owners: dict[int, list[str]] = {}
        for mname, module in model.named_modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(mname or type(module).__name__)
        self.tables: dict[int, _Table] = {}
        for mname, module in model.named_modules():
            if not isinstance(module, EMBEDDING_MODULES):
                continue
            w = module.weight
            if not w.requires_grad or id(w) not in groups:
                continue
            if len(owners[id(w)]) > 1:
                raise ValueError(f"embedding weight {names[id(w)]!r} is shared with {owners[id(w)]}; "
                                 "lazy noise needs the table to be read only through its embedding "
                                 "(tied weights are read densely). Use embedding_noise='eager'.")
            if w.shape[0] > MAX_COUNTER:
                raise ValueError(f"embedding {names[id(w)]!r} must have < 2**31 rows for lazy noise; "
                                 f"got {w.shape[0]}")
            self.tables[id(w)] = _Table(names[id(w)], module, groups[id(w)], 0)
        if not self.tables:
            raise ValueError("embedding_noise='lazy' needs at least one trainable nn.Embedding or "
                             "nn.EmbeddingBag held by the optimizer; got none")
        for table in self.tables.values():
            _check_group(table.group)
        self._handles = []
        for table in self.tables.values():
            # the autograd gradient of a lazy table is discarded (dpkit clips from its hooks);
            # a dense (V, d) gradient would cost O(V·d) per step and defeat the sparse update
            table.module.sparse = True
            self._handles.append(table.module.register_forward_pre_hook(self._before_read(table),
                                                                        with_kwargs=True))
            self._handles.append(table.module.register_state_dict_pre_hook(self._before_release))
            table.module._dpkit_release_guard = _ReleaseGuard(self, table.name)

    # ---------------------------------------------------------------- queries
    def owns(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is a lazily noised embedding weight."""
        return id(p) in self.tables

    def pending(self) -> bool:
        """Whether some row still lacks noise of a step that already ran."""
        return any(bool((t.noised < self.steps).any()) for t in self.tables.values())

    # ------------------------------------------------------------ materialise
    @torch.no_grad()
    def _materialise(self, table: _Table, rows: torch.Tensor, stop: int, bulk: bool = False) -> None:
        """Bring ``rows`` (unique) to step ``stop``: decay since ``det``, noise since ``noised``.

        Arithmetic in the table's dtype (as eager DP-SGD's). Without weight decay in the history
        the noise, times −s (eager's w −= η·(σC z)/B̄ enters with a minus sign), is scattered in
        with one ``index_add_`` and only ``noised`` is set (``det`` may lag over steps of decay
        factor 1): per read, one draw of the looked-up rows plus one scatter, the floor of any
        lazy scheme.
        """
        if rows.numel() == 0:
            return
        noised = table.noised.index_select(0, rows)
        late = noised < stop  # det ≥ noised, so this catches every row behind ``stop``
        if not bool(late.all()):  # a training read: (nearly) every looked-up row is late
            rows, noised = rows[late], noised[late]
            if rows.numel() == 0:
                return
        weight, shape = table.weight, tuple(table.weight.shape)
        if table.segment is not None:
            det = table.det.index_select(0, rows)
            self._materialise_pair(table, rows, det.long(), noised.long(), stop, bulk)
        elif table.history.decays:
            det = table.det.index_select(0, rows)
            decay = table.history.decay(det.cpu().numpy(), stop)
            w = weight.index_select(0, rows)
            w.mul_(torch.from_numpy(decay).to(w.device, w.dtype).unsqueeze(1))
            if self.scale > 0:
                w.add_(self.row_noise.combined(table.name, rows, noised.long(), stop, table.history, shape,
                                               bulk, dtype=weight.dtype, scale=-self.scale))
            weight.index_copy_(0, rows, w)
        else:
            if self.scale > 0:  # CPU index_add_ with alpha is ~3x slower: −s goes into the draw's scaling
                weight.index_add_(0, rows, self.row_noise.combined(
                    table.name, rows, noised.long(), stop, table.history, shape, bulk, dtype=weight.dtype,
                    scale=-self.scale))
            table.noised.index_fill_(0, rows, stop)
            return
        table.det.index_fill_(0, rows, stop)
        table.noised.index_fill_(0, rows, stop)

    def _materialise_pair(self, table, rows, det, noised, stop, bulk):
        """Momentum: (w, m) ← A^k (w, m) + s·(joint pending noise) (see MomentumSegment)."""
        w = table.weight.index_select(0, rows)
        m = table.momentum.index_select(0, rows)
        phi = torch.from_numpy(table.segment.transition(det.cpu().numpy(), stop)).to(w.device, w.dtype)
        w_new = phi[:, 0, 0, None] * w + phi[:, 0, 1, None] * m
        m_new = phi[:, 1, 0, None] * w + phi[:, 1, 1, None] * m
        if self.scale > 0:  # β = (−η, 1) carries the signs: the noise is added
            noise = self.row_noise.combined_pair(table.name, rows, noised, stop, table.segment,
                                                 tuple(table.weight.shape), bulk, dtype=w.dtype)
            w_new.add_(noise[:, 0], alpha=self.scale)
            m_new.add_(noise[:, 1], alpha=self.scale)
        table.weight.index_copy_(0, rows, w_new)
        table.momentum.index_copy_(0, rows, m_new)

    def _before_read(self, table: _Table):
        def hook(module, args, kwargs):
            if not module.training:  # evaluation / export: nothing may be read with noise pending
                self.flush()
                return
            ids = args[0] if args else kwargs.get("input")
            if ids is None:
                raise TypeError(f"embedding {table.name!r} was called without input ids")
            self._read(table, ids)
        return hook

    def _read(self, table: _Table, ids: torch.Tensor) -> None:
        """A training forward pass reads the rows ``ids`` looks up: bring them to the current step.

        Each row once, in order of first lookup: ``first[row]`` ← the smallest position that looks
        it up (``scatter_reduce`` amin: deterministic, ≈ 3x faster than ``torch.unique``'s sort);
        the positions that hold their row's minimum are the distinct rows.
        """
        ids = ids.detach().reshape(-1).to(table.weight.device, torch.long)
        if ids.numel() >= 2**31:  # positions must fit ``first``'s int32
            self._materialise(table, torch.unique(ids), self.steps)
            return
        pos = torch.arange(ids.numel(), dtype=torch.int32, device=ids.device)
        table.first.scatter_reduce_(0, ids, pos, "amin", include_self=False)
        self._materialise(table, ids[table.first.index_select(0, ids) == pos], self.steps)

    def _before_release(self, module, prefix, keep_vars):
        self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every row's pending noise (O(V·d)); afterwards the weights equal eager DP-SGD's."""
        for table in self.tables.values():
            self._flush_table(table)

    def _flush_table(self, table: _Table) -> None:
        behind = torch.nonzero(table.noised < self.steps).flatten()
        for chunk in behind.split(FLUSH_CHUNK_ROWS):
            self._materialise(table, chunk, self.steps, bulk=True)

    # --------------------------------------------------------------- stepping
    def prepare(self) -> None:
        """Before the base step: check every table's hyper-parameters (so a refusal happens before
        anything is updated) and drop the lazy tables' autograd gradients so the base skips them.

        Raises:
            ValueError: a param group now has nesterov, dampening, maximize, lr·weight_decay ≥ 1,
                momentum switched between zero and non-zero, or the run reaches 2**31 steps.
        """
        if self.steps + 1 > MAX_COUNTER:
            raise ValueError(f"lazy embedding noise supports < 2**31 steps; got step {self.steps + 1}")
        for table in self.tables.values():
            _check_group(table.group)
            if (table.hyper()[2] != 0) != (table.momentum is not None):
                raise ValueError(f"embedding {table.name!r}: SGD momentum must stay zero or stay non-zero "
                                 f"for lazy noise; it changed to {table.hyper()[2]}")
            table.weight.grad = None

    @torch.no_grad()
    def step(self, engine) -> None:
        """Sparse SGD update of every lazy table for the logical step ``self.steps``.

        Touched rows receive the step's decay and clipped-gradient update (once weight decay or
        momentum is in play they are first brought to the current step, normally done by the
        forward pre-hook already); their noise for this step stays pending like every other row's.

        Call :meth:`prepare` first.
        """
        t = self.steps
        for table in self.tables.values():
            lr, wd, mu = table.hyper()
            if table.segment is not None:
                self._step_momentum(table, *engine.sparse_clipped_rows(table.weight), t)
                continue
            table.history.append(lr, wd)
            if not table.history.decays:
                # w −= η/B̄ · Σ clipped rows. No step since the history's base decays, so the
                # update and the pending noise are plain additions that commute (no catch-up of
                # the rows needed), index_add_ sums repeated rows itself (no sort and merge), and
                # ``det`` may stay behind (every decay factor up to here is exactly 1)
                rows, sums = _clipped_rows(engine, table.weight)
                if rows.numel():  # the engine's rows are consumed here: scaled in place
                    step = sums.to(table.weight.dtype).mul_(-lr / self.expected_batch_size)
                    table.weight.index_add_(0, rows, step)  # no alpha: CPU index_add_ with alpha is ~3x slower
                continue
            rows, sums = engine.sparse_clipped_rows(table.weight)  # unique rows: decay once each
            if rows.numel():
                self._materialise(table, rows, t)
                w = table.weight.index_select(0, rows)
                w.mul_(1.0 - lr * wd).sub_(sums.to(w.dtype), alpha=lr / self.expected_batch_size)
                table.weight.index_copy_(0, rows, w)
                table.det.index_fill_(0, rows, t + 1)
        self.steps = t + 1
        for table in self.tables.values():
            if table.segment is None and table.history.needs_rebase():
                self._flush_table(table)
                table.history.rebase()

    def _step_momentum(self, table: _Table, rows, sums, t: int) -> None:
        """torch SGD with momentum (dampening 0) on the touched rows; a change of (η, λ, μ) first
        flushes the table and opens a new constant segment."""
        lr, wd, mu = table.hyper()
        if table.segment.params != (lr, wd, mu):
            self._flush_table(table)  # every row to step t under the old constants
            table.new_segment(t)
        table.segment.append()
        if rows.numel():
            self._materialise(table, rows, t)
            w = table.weight.index_select(0, rows)
            m = table.momentum.index_select(0, rows)
            m.mul_(mu).add_(sums.to(m.dtype), alpha=1.0 / self.expected_batch_size).add_(w, alpha=wd)
            w.sub_(m, alpha=lr)
            table.weight.index_copy_(0, rows, w)
            table.momentum.index_copy_(0, rows, m)
            table.det.index_fill_(0, rows, t + 1)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Flush, then the step count and noise key: a checkpoint never holds pending noise."""
        self.flush()
        return {"steps": self.steps, "row_noise": self.row_noise.state_dict(),
                "tables": sorted(t.name for t in self.tables.values()),
                "momentum": {t.name: t.momentum for t in self.tables.values() if t.momentum is not None}}

    def load_state_dict(self, state: dict | None, *, steps: int) -> None:
        """Resume from a checkpoint taken after ``steps`` steps; its weights are fully noised
        (saved by :meth:`state_dict`, which flushes, or by an eager optimizer: ``state`` None)."""
        if state is not None:
            names = sorted(t.name for t in self.tables.values())
            if state["tables"] != names:
                raise ValueError(f"checkpoint has lazy tables {state['tables']}; this optimizer has {names}")
            if int(state["steps"]) != steps:
                raise ValueError(f"lazy state was saved at step {state['steps']}, the optimizer at {steps}")
            self.row_noise.load_state_dict(state["row_noise"])
        self.steps = int(steps)
        buffers = (state or {}).get("momentum", {})
        for table in self.tables.values():
            table.det.fill_(self.steps)
            table.noised.fill_(self.steps)
            table.history = StepHistory(self.steps)
            if table.momentum is not None:
                if table.name not in buffers:
                    raise ValueError(f"checkpoint has no lazy momentum buffer for {table.name!r}")
                table.momentum.copy_(buffers[table.name])
                table.new_segment(self.steps)


def _clipped_rows(engine, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's clipped row sums of a lazy table as (rows, (n, d) vectors), rows may repeat:
    its parts concatenated, without the sort and merge of ``sparse_clipped_rows``."""
    parts = engine.sparse_sums.get(id(weight), [])
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return (torch.zeros(0, dtype=torch.long, device=weight.device),
                torch.zeros(0, weight.shape[1], dtype=weight.dtype, device=weight.device))
    return torch.cat([r for r, _ in parts]), torch.cat([v for _, v in parts])


class _ReleaseGuard:
    """Lives in a lazy embedding module's ``__dict__``: copying/pickling it with noise pending fails."""

    def __init__(self, lazy: LazyEmbeddingNoise, name: str):
        self._lazy, self._name = lazy, name

    def _check(self):
        if self._lazy.pending():
            raise NoisePendingError(
                f"embedding {self._name!r} is being copied or pickled while lazy DP noise is pending; "
                "call optimizer.flush() first (model.state_dict() flushes automatically)")

    def __deepcopy__(self, memo):
        self._check()
        return None  # the copy is detached from the optimizer: it carries no guard

    def __reduce_ex__(self, protocol):
        self._check()
        return (_no_guard, ())


def _no_guard():
    return None


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    if type(optimizer) is not torch.optim.SGD:
        raise ValueError(
            f"embedding_noise='lazy' needs torch.optim.SGD; got {type(optimizer).__name__}: "
            "its per-coordinate state of the noisy gradient has no exact lazy form, so lazy noise "
            "would not be DP-SGD. Use SGD, or embedding_noise='eager' (dense noise every step).")


def _check_group(group: dict) -> None:
    if group.get("nesterov", False) or (group.get("momentum", 0) != 0 and group.get("dampening", 0) != 0):
        raise ValueError(
            "embedding_noise='lazy' supports SGD momentum with dampening=0 and nesterov=False; got "
            f"momentum={group.get('momentum')}, dampening={group.get('dampening')}, "
            f"nesterov={group.get('nesterov')}. Use those settings or embedding_noise='eager'.")
    lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
    if lr * wd >= 1.0:
        raise ValueError(f"embedding_noise='lazy' needs lr * weight_decay < 1 (positive decay factor "
                         f"1 - lr*weight_decay); got lr={lr}, weight_decay={wd}")
    if group.get("maximize", False):
        raise ValueError("embedding_noise='lazy' needs maximize=False; got True. "
                         "Negate the loss instead.")


def build_lazy_embedding_noise(embedding_noise, *, optimizer, engine, noise, generator, secure_mode,
                               distributed, noise_std, expected_batch_size):
    """The :class:`LazyEmbeddingNoise` for :class:`dpkit.DPOptimizer`'s ``embedding_noise`` (None if eager).

    The default pending-noise source is :class:`~dpkit.mechanisms.lazy.GaussianRowNoise` (one
    aggregated draw per row from a checkpointed torch stream) seeded from ``generator``'s seed
    (a stream of its own) or 63 bits of OS entropy; pass a
    :class:`~dpkit.mechanisms.lazy.CounterGaussianRowNoise` for draws that do not depend on the
    order of reads.

    Raises:
        ValueError/TypeError: a bad ``embedding_noise``, or lazy noise combined with something it
            cannot honour (secure mode, distributed training, a correlated-noise mechanism,
            tracking of unclipped sums), each named.
    """
    from dpkit.mechanisms.lazy import GaussianRowNoise
    from dpkit.mechanisms.randomness import LAZY_ROWS, fresh_seed, mix, seed_from_generator
    from dpkit.mechanisms.noise import GaussianNoise

    if isinstance(embedding_noise, str):
        if embedding_noise not in ("eager", "lazy"):
            raise ValueError(f"embedding_noise must be 'eager', 'lazy' or a RowNoise; got {embedding_noise!r}")
        if embedding_noise == "eager":
            return None
        row_noise = None
    elif isinstance(embedding_noise, RowNoise):
        row_noise = embedding_noise
    else:
        raise TypeError(f"embedding_noise must be 'eager', 'lazy' or a RowNoise; got "
                        f"{type(embedding_noise).__name__}")
    if secure_mode:
        raise ValueError("embedding_noise='lazy' cannot use secure_mode=True: pending noise is drawn later "
                         "from a kept, seeded stream, which secure mode must not keep. Use "
                         "embedding_noise='eager' for secure noise.")
    if distributed:
        raise ValueError("embedding_noise='lazy' does not support distributed=True (the sparse row "
                         "sums are not all-reduced); use embedding_noise='eager'")
    if not isinstance(noise, (GaussianNoise, RowNoise)):
        raise ValueError(f"embedding_noise='lazy' adds i.i.d. Gaussian noise (DP-SGD); it cannot be "
                         f"combined with noise={type(noise).__name__}. Use embedding_noise='eager'.")
    if engine.track_unclipped:
        raise ValueError("embedding_noise='lazy' cannot track unclipped sums (error feedback); "
                         "use embedding_noise='eager'")
    if row_noise is None:
        # keyed like every dpkit stream: the generator's seed (a stream of its own) or OS entropy
        row_noise = GaussianRowNoise(fresh_seed() if generator is None
                                     else mix(seed_from_generator(generator), LAZY_ROWS))
    lazy = LazyEmbeddingNoise(optimizer, engine.model, row_noise=row_noise, noise_std=noise_std,
                              expected_batch_size=expected_batch_size,
                              names={id(p): engine.parameter_name(p) for p in engine.params})
    engine.sparse_params.update(lazy.tables)
    return lazy
