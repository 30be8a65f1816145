"""Loss terms folded into the optimizer step: their closed-form gradients added to ``p.grad``.

``reg.attach(optimizer, fold=True)`` registers a step pre-hook that, right before the
optimizer updates, adds to each parameter's gradient what ``loss + reg.penalty()``
would have put there (the formulas of :mod:`regdsl.penalties`)::

    l2 λ               g += λ·w
    l2 λ to init|ref   g += λ·(w − w₀)
    l1 λ               g += λ·sign(w)                      (0 at 0)
    group_lasso λ      g += λ·w_i/‖w_i‖₂ on each slice      (0 on an all-zero slice)
    orthogonal λ       g += 4λ·(G − I)·W  (or 4λ·W·(G − I) when G = WᵀW)

Nothing goes through autograd and nothing is allocated per step beyond what the math
needs (:mod:`regdsl.fold_kernels` runs each bucket): ``l2`` is one ``_foreach_add_`` per bucket
(an ``add_`` per tensor in a CPU bucket of at most :data:`~regdsl.fold_kernels.FEW`); ``l1`` and ``l2 ... to`` write
``sign(w)`` or ``w − w₀`` of a large tensor into a scratch buffer kept across steps (CPU,
where a freed large block goes back to the OS and every step would fault it in again), and
otherwise into ``_foreach`` temporaries, a batch of at most ``SMALL_BATCH`` bytes (CPU)
or ``CHUNK`` bytes (devices with a caching allocator) at a time; ``group_lasso`` needs
one norm per slice (off the CPU, weights of one shape as one stack: :mod:`regdsl.fold_stacked`)
and ``orthogonal`` its Gram matrix (``addmm_`` straight into the
gradient where it can). ``l1`` and ``l2`` on the same large CPU tensor fold together, a slice
at a time while it is in cache (:mod:`regdsl.fold_elastic`).

Strengths are Python floats in eager mode (no host sync). Inside ``torch.compile``
(an optimizer step compiled with its hooks) the same terms are written with 0-dim
strength tensors that schedules update in place, so a moving strength never
recompiles; the same tensor path runs when a fused optimizer under ``GradScaler``
receives still-scaled gradients (``optimizer.grad_scale``), the terms scaled to match.
docs/fold.md says where this path differs from the loss path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import sharded
from .fold_elastic import ElasticBucket, elastic_pairs
from .fold_kernels import Bucket
from .penalties import LossItem, PenaltyPlan
from .schedule import live

FAMILIES = ("l1", "l2", "l2_to", "group_lasso", "orthogonal")

def can_fold(item: LossItem) -> bool:
    """Complex parameters stay on the loss path: its Wirtinger gradients are the documented ones."""
    return item.family in FAMILIES and not item.param.is_complex()

class FoldPlan:
    """Every folded term, bucketed once by (family, term, device, dtype).

    Like :class:`~regdsl.penalties.PenaltyPlan`, a bucket any of whose parameters has changed
    dtype or device (``model.to(...)``, or one submodule's, after attaching) makes the plan
    re-bucket; the check reads every parameter at each step (:func:`~regdsl.penalties.moved`).
    """

    scratch_devices: tuple[str, ...] = ("cpu",)

    def __init__(self, items: Sequence[LossItem], step: int = 0):
        self.items = live(items)
        self._step = step
        # Set while a compiled step (regdsl.compiled_step) runs the pre-hooks: it folds inside its own graph.
        self.deferred = False
        self.retired = False  # detach() has run: penalty() holds these terms again
        self.generation = 0  # rebuilds so far (model.to(...)): a compiled step's graphs are for one
        self._build()

    def _build(self) -> None:
        for item in self.items:
            item.follow()
        pairs = elastic_pairs(self.items, self.scratch_devices)
        paired = {id(i) for pair in pairs for i in pair}
        grouped: dict[tuple[Any, ...], list[LossItem]] = {}
        distributed = sharded.active()
        for item in self.items:
            if id(item) in paired:
                continue
            p = item.param
            key = (item.family, item.term, p.device, p.dtype, sharded.mesh_key(p) if distributed else None)
            grouped.setdefault(key, []).append(item)
        elastic: dict[tuple[Any, ...], list[tuple[LossItem, LossItem]]] = {}
        for l1, l2 in pairs:
            elastic.setdefault((l1.term, l2.term, l1.param.device, l1.param.dtype), []).append((l1, l2))
        self._buckets: list[Bucket | ElasticBucket] = [
            Bucket(family, term, items, self._step, self.scratch_devices)
            for (family, term, *_), items in grouped.items()
        ]
        self._buckets += [
            ElasticBucket(
                Bucket("l1", t1, [l1 for l1, _ in both], self._step, self.scratch_devices),
                Bucket("l2", t2, [l2 for _, l2 in both], self._step, self.scratch_devices),
            )
            for (t1, t2, *_), both in elastic.items()
        ]
        self._scheduled = [b for b in self._buckets if b.scheduled]
        self._note_layout()
        # One buffer per (device, dtype) for sign(w) and w − w₀, as large as the largest such tensor.
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for b in self._buckets:
            for p in b.params:
                if b.needs_scratch(p):
                    sizes[b.device, b.dtype] = max(sizes.get((b.device, b.dtype), 0), p.numel())
        self._scratch = {key: torch.empty(n, dtype=key[1], device=key[0]) for key, n in sizes.items()}
        for b in self._buckets:
            b.set_views(
                [
                    self._scratch[b.device, b.dtype][: p.numel()].view(p.shape) if b.needs_scratch(p) else None
                    for p in b.params
                ]
            )

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def params(self) -> list[torch.Tensor]:
        return [item.param for item in self.items]

    def set_step(self, step: int) -> None:
        self._step = step
        for bucket in self._scheduled:
            bucket.set_step(step)

    def _note_layout(self) -> None:
        # What :meth:`_checked` compares, per folded tensor once (the buckets of elastic net share theirs);
        # None while some bucket holds a frozen tensor (made so, or frozen since): then every step checks
        # through refresh() and each bucket's general path, which see it unfrozen.
        tensors = {id(p): (p, b.dtype, b.device) for b in self._buckets for p in b.params}
        trainable = all(t for b in self._buckets for t in b.trainable)
        self._layout: list[tuple[torch.Tensor, torch.dtype, torch.device]] | None = (
            list(tensors.values()) if trainable else None
        )

    def _checked(self) -> bool:
        """Every folded tensor as its bucket was made (device, dtype), trainable, with a dense gradient:
        what :meth:`refresh` and each bucket's gradient check would find, in one loop instead of two per
        bucket. Inside a tiny MLP's step those loops cost about 5 µs (its fold's kernels: 15)."""
        layout = self._layout
        if layout is None:
            return False
        for p, dtype, device in layout:
            g = p.grad
            if g is None or not p.requires_grad or p.dtype is not dtype or g.layout != torch.strided or p.device != device:
                return False
        return True

    def __call__(self, scale: torch.Tensor | None = None) -> None:
        """Add every term's gradient to ``p.grad`` now; ``scale`` multiplies them (a fused
        optimizer's ``grad_scale`` under ``GradScaler``)."""
        if self.deferred:
            return
        checked = self._checked()
        if not checked:
            self.refresh()
        self.apply(scale, checked=checked)

    def refresh(self) -> bool:
        """Re-bucket what moved or was cast; note what was frozen or unfrozen. True when either happened:
        a compiled step then takes the graph for the new state (:meth:`state`)."""
        changes = {b.stale() for b in self._buckets}
        if "moved" in changes:
            self._build()
            self.generation += 1
        elif "frozen" in changes:
            for b in self._buckets:
                b.retrain()
            self._note_layout()
        return bool(changes - {None})

    def state(self) -> tuple[Any, ...]:
        """What a compiled step's graph depends on beyond its guards: the buckets and each tensor's requires_grad."""
        return (self.generation, *(tuple(b.trainable) for b in self._buckets))

    def slice_norms(self) -> list[torch.Tensor | None]:
        return [b.slice_norms() for b in self._buckets]

    def apply(
        self, scale: torch.Tensor | None, norms: list[torch.Tensor | None] | None = None, checked: bool = False
    ) -> None:
        """The terms' gradients into ``p.grad``; ``norms``: :meth:`slice_norms` of this step; ``checked``:
        :meth:`_checked` held."""
        # A step pre-hook runs with gradients on, and adds reading the weights would record
        # history. Switched off directly: torch.no_grad() costs as much as a small tensor's kernel.
        enabled = torch.is_grad_enabled()
        if enabled:
            torch._C._set_grad_enabled(False)
        try:
            for k, b in enumerate(self._buckets):
                b.fold(scale, norms[k] if norms is not None else None, checked)
        finally:
            if enabled:
                torch._C._set_grad_enabled(True)


class Folding:
    """What ``attach(optimizers, fold=True)`` sets up: for each optimizer, the plan of the terms it
    folds (those of the parameters it steps, each term in the first optimizer holding it), and the
    penalty of every term no optimizer folds, which ``penalty()`` returns."""

    def __init__(self, items: Sequence[LossItem], stepped: Sequence[set[int]], step: int):
        chosen: set[int] = set()
        self.plans = []
        for ids in stepped:
            folded = [i for i in items if can_fold(i) and id(i.param) in ids and id(i) not in chosen]
            chosen.update(id(i) for i in folded)
            self.plans.append(FoldPlan(folded, step))
        self.rest = PenaltyPlan([i for i in items if id(i) not in chosen], step)

    def set_step(self, step: int) -> None:
        for plan in self.plans:
            plan.set_step(step)
        self.rest.set_step(step)


__all__ = ["FAMILIES", "FoldPlan", "Folding", "can_fold"]
