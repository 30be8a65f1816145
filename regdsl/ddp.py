"""Loss terms under ``DistributedDataParallel(find_unused_parameters=True)``.

With that setting DDP walks the autograd graph of the forward's output and marks every
parameter it does not reach as ready (unused) before backward starts. A penalty on such a
parameter then reaches it through autograd a second time, and the reducer fails with
"Expected to mark a variable ready only once". So here the penalty is computed on
*aliases*: leaves that share each parameter's storage but are not the parameter, so DDP's
hooks never fire for them. Their gradients (the same closed forms as on the plain loss path)
are added to ``p.grad`` when the backward pass has finished, after DDP's all-reduce. That is
exact: DDP keeps the weights equal on every rank, so each rank's term gradient is the same,
and averaging it would not change it.

``find_unused_parameters=False`` and ``static_graph=True`` need none of this: there a term on
a parameter the forward does not use is the autograd gradient DDP expects (docs/distributed.md).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .penalties import LossItem, PenaltyPlan


def ddp_of(model: nn.Module) -> weakref.ref[nn.Module] | None:
    """The DistributedDataParallel wrapper at ``model``'s root (through AveragedModel and
    torch.compile wrappers too), if there is one."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return weakref.ref(model)
        name = type(model).__name__
        inner = getattr(model, "_orig_mod" if name == "OptimizedModule" else "module", None)
        if not (isinstance(model, nn.DataParallel) or name in ("AveragedModel", "OptimizedModule")):
            return None
        if not isinstance(inner, nn.Module):
            return None
        model = inner


def defers(ddp: weakref.ref[nn.Module] | None) -> bool:
    """Whether the wrapper, as it is configured now, marks unused parameters before backward."""
    wrapper = ddp() if ddp is not None else None
    return bool(
        wrapper is not None
        and getattr(wrapper, "find_unused_parameters", False)
        and not getattr(wrapper, "static_graph", False)
    )


class DeferredPenalty:
    """``plan``'s terms evaluated on aliases of its parameters; their gradients are added to the
    parameters' ``.grad`` once the backward pass (and DDP's reduction in it) is over.

    The aliases are made once and made again when a parameter's storage, dtype, device or
    ``requires_grad`` changes (``model.to()``, a layer frozen or unfrozen), or when
    ``load_state_dict`` replaced a reference.
    """

    def __init__(self, plan: PenaltyPlan):
        self.source = plan
        self._step = plan._step
        self._queued = False
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # the trainable ones, whose gradients apply() adds
        self._aliases: list[tuple[torch.Tensor, torch.Tensor]] = []  # every one, frozen ones too
        self._items: list[LossItem] = []
        self._plan: PenaltyPlan | None = None

    def set_step(self, step: int) -> None:
        self._step = step
        if self._plan is not None:
            self._plan.set_step(step)

    def _stale(self) -> bool:
        if self._plan is None:
            return True
        # requires_grad too: an alias frozen or trainable as its parameter was when made would add a
        # frozen weight's term to its .grad, or never an unfrozen one's.
        if any(
            p.data_ptr() != a.data_ptr() or p.dtype != a.dtype or p.device != a.device or p.requires_grad != a.requires_grad
            for p, a in self._aliases
        ):
            return True
        return any(copy.reference is not item.reference for copy, item in zip(self._items, self.source.items))

    def _build(self) -> None:
        aliases: dict[int, torch.Tensor] = {}
        self._pairs, self._aliases = [], []
        hook = _QueueOnce(self)
        for item in self.source.items:
            p = item.param
            if id(p) not in aliases:
                alias = aliases[id(p)] = p.detach().requires_grad_(p.requires_grad)
                self._aliases.append((p, alias))
                if p.requires_grad:
                    alias.register_post_accumulate_grad_hook(hook)
                    self._pairs.append((p, alias))
        self._items = [
            LossItem(item.kind, aliases[id(item.param)], item.term, reference=item.reference) for item in self.source.items
        ]
        self._plan = PenaltyPlan(self._items, self._step)

    def __call__(self, default_device: torch.device | None = None) -> torch.Tensor:
        self._queued = False  # a backward that raised before its callbacks ran must not block the next
        if self._stale():
            self._build()
        assert self._plan is not None
        return self._plan(default_device)

    def queue(self) -> None:
        """Called from an alias's gradient hook, inside backward: apply after everything the
        backward queued, DDP's finalization included, by queueing from a queued callback."""
        if self._queued:
            return
        self._queued = True
        engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
        engine.queue_callback(lambda: engine.queue_callback(self.apply))

    @torch.no_grad()
    def apply(self) -> None:
        self._queued = False
        into: list[torch.Tensor] = []
        add: list[torch.Tensor] = []
        for p, alias in self._pairs:
            g = alias.grad
            if g is None:
                continue
            alias.grad = None
            if p.grad is None:
                p.grad = g
            else:
                into.append(p.grad)
                add.append(g)
        if into:
            torch._foreach_add_(into, add)


class _QueueOnce:
    def __init__(self, owner: DeferredPenalty):
        self.owner = weakref.ref(owner)

    def __call__(self, _alias: torch.Tensor) -> None:
        owner = self.owner()
        if owner is not None:
            owner.queue()
