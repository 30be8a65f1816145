"""Penalties on module outputs, collected by forward hooks.

``activity l1 λ`` adds ``λ · Σ|a| / B`` and ``activity l2 λ`` adds
``λ/2 · Σa² / B`` for each output ``a`` of a selected module, ``B`` its first
(batch) dimension (1 for a 0-dim output). A module called several times in one
forward pass contributes once per call. Values are collected only while
autograd records (not under ``torch.no_grad()``/``inference_mode``, so
evaluation passes cost nothing and leave nothing behind) and are consumed by the
next ``penalty()``. Each value is also kept, detached, until the next forward pass after
that ``penalty()`` starts collecting: ``reg.values()`` reports it.

The hooks run inside the caller's ``torch.autocast``, so an output may be
bfloat16 or float16. Each value is still reduced in float32 (float64 for a
float64 output): the output is upcast before the sum, with autocast switched off
for its device, so the penalty has the precision the formula documents whatever
the autocast state. The output itself, and so its gradient, keeps the dtype the
model produced.

The hooks hold only a weak reference to the plan: dropping the regularizer
removes them, as does ``detach()``; ``attach()`` installs them again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .penalties import autocast_device_type
from .schedule import is_scheduled, strength_at


@dataclass(frozen=True)
class ActivityTarget:
    name: str
    module: nn.Module
    term: Any  # ActivityL1Term or ActivityL2Term
    on_bad_output: Callable[[str, str], Exception]  # (module name, output type) -> error to raise


class ActivityPlan:
    def __init__(self, targets: Sequence[ActivityTarget], step: int = 0):
        self.targets = list(targets)
        # Each value as (its strength, the rest of it): multiplied when taken, outside any checkpointed
        # region, whose recomputation in backward would run the hook again at a later step's strength.
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_from: list[int] = []  # each pending value's target index
        # (target index, strength, detached rest) of the latest forward pass(es), for reg.values().
        self._recent: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._taken = False  # a take() since the last collect: the next collect starts afresh
        self._strengths = [torch.tensor(strength_at(t.term, step), dtype=torch.float64) for t in self.targets]
        self._on_device: list[dict[tuple[torch.device, torch.dtype], torch.Tensor]] = [{} for _ in self.targets]
        self._scheduled = [i for i, t in enumerate(self.targets) if is_scheduled(t.term)]
        self._scheduled_set = frozenset(self._scheduled)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._finalizer = weakref.finalize(self, _remove, self._handles)
        self.register()

    def register(self) -> None:
        """Install the forward hooks (again, after :meth:`remove`); a no-op while installed."""
        if self._handles or not self.targets:
            return
        self._handles += [t.module.register_forward_hook(_Hook(self, i, t.module)) for i, t in enumerate(self.targets)]

    def __bool__(self) -> bool:
        return bool(self.targets)

    @property
    def listening(self) -> bool:
        """Whether the forward hooks are installed (always, with no targets)."""
        return bool(self._handles) or not self.targets

    def set_step(self, step: int) -> None:
        with torch.no_grad():
            for i in self._scheduled:  # a constant strength never changes
                self._strengths[i].fill_(strength_at(self.targets[i].term, step))
                for cached in self._on_device[i].values():
                    cached.copy_(self._strengths[i])

    def strength(self, index: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        cache = self._on_device[index]
        key = (device, dtype)
        if key not in cache:
            cache[key] = self._strengths[index].to(device=device, dtype=dtype)
        return cache[key]

    def collect(self, index: int, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        target = self.targets[index]
        if not isinstance(output, torch.Tensor):
            raise target.on_bad_output(target.name, type(output).__name__)
        if not output.is_floating_point():
            # Token ids or a mask: l2 would penalize the integers themselves, l1 fail inside torch.
            raise target.on_bad_output(target.name, f"{str(output.dtype).removeprefix('torch.')} tensor")
        autocast = autocast_device_type(output.device)
        if autocast is None:
            rest = self._rest(index, output)
        else:
            with torch.autocast(device_type=autocast, enabled=False):
                rest = self._rest(index, output)
        # Computed anyway: a checkpoint's recomputation must save the same tensors as its forward did.
        if not _in_backward():
            strength = self.strength(index, rest.device, rest.dtype)
            if index in self._scheduled_set:
                # A copy for autograd to keep: a step between this forward and its backward (another
                # optimizer's, in a GAN) updates the cached one in place, and backward would refuse it.
                strength = strength.clone()
            self._pending.append((strength, rest))
            self._pending_from.append(index)
            if self._taken:
                self._recent, self._taken = [], False
            self._recent.append((index, strength, rest.detach()))

    def _rest(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """The value without its strength: ``Σ|a| / B`` or ``½·Σa² / B``."""
        acc = torch.float64 if output.dtype == torch.float64 else torch.float32
        batch = output.shape[0] if output.ndim > 0 else 1
        if self.targets[index].term.kind == "activity_l1":
            total = torch.linalg.vector_norm(output, 1, dtype=acc)  # casts to acc before summing
            factor = 1.0
        else:
            total = output.to(acc).square().sum()
            factor = 0.5
        return total * (factor / max(batch, 1))

    def take(self) -> list[torch.Tensor]:
        """The values collected since the last call."""
        pending, self._pending, self._pending_from = self._pending, [], []
        self._taken = True
        return [strength * rest for strength, rest in pending]

    def drop(self, targets: frozenset[int] | None = None) -> list[Any]:
        """At an optimizer step: drop the values collected since the last :meth:`take`, which no penalty()
        took, and return them (as collected: strength and rest apart; the caller only tests for any);
        none is reported by :meth:`recent` any more either (they were applied by nothing).
        ``targets``: only those of these targets (the modules the stepping optimizer trains, with
        several attached); the others wait for their own network's ``penalty()`` (a GAN's generator's,
        after the discriminator's step)."""
        if targets is None:
            pending, self._pending, self._pending_from = self._pending, [], []
            self._taken = True
            if pending:
                self._recent = []
            return pending
        dropped = [v for v, i in zip(self._pending, self._pending_from) if i in targets]
        if dropped:
            kept = [(v, i) for v, i in zip(self._pending, self._pending_from) if i not in targets]
            self._pending, self._pending_from = [v for v, _ in kept], [i for _, i in kept]
            self._recent = [r for r in self._recent if r[0] not in targets]
        return dropped

    def recent(self) -> list[tuple[ActivityTarget, torch.Tensor]]:
        """Detached values of the latest forward pass(es): those the last :meth:`take` returned,
        or those collected since it."""
        return [(self.targets[i], strength * rest) for i, strength, rest in self._recent]

    def remove(self) -> None:
        _remove(self._handles)
        self._pending, self._pending_from, self._recent = [], [], []


class _Hook:
    """One target's forward hook. A copy of the model (``copy.deepcopy``: an ``AveragedModel``, an
    EMA, a distillation teacher) copies its modules' hooks: a copied hook is inert, and one called
    for a module other than its target (a shallow copy shares the hooks) does nothing, so only the
    compiled model's forwards are collected. Inert, a copy pickles too (``torch.save(model)``)."""

    __slots__ = ("index", "module", "plan")

    def __init__(self, plan: ActivityPlan, index: int, module: nn.Module):
        self.plan, self.index, self.module = weakref.ref(plan), index, weakref.ref(module)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        plan = self.plan()
        if plan is not None and module is self.module():
            plan.collect(self.index, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Inert:
        return _Inert()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_Inert, ())


class _Inert:
    """What a copied :class:`_Hook` becomes: a hook that collects nothing."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        return None


def _remove(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    while handles:
        handles.pop().remove()


def _in_backward() -> bool:
    """A forward pass inside backward is activation checkpointing recomputing what the real
    forward pass already reported; counting it again would double the term whenever another
    forward's penalty() comes before the optimizer step (gradient accumulation)."""
    if torch.compiler.is_compiling():
        return False  # traced into a graph, whose recomputation never runs this hook again
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1
