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
needs: ``l2`` is one ``_foreach_add_`` per bucket; ``l1`` and ``l2 ... to`` write
``sign(w)`` or ``w − w₀`` of a large tensor into a scratch buffer kept across steps (CPU,
where a freed large block goes back to the OS and every step would fault it in again), and
otherwise into ``_foreach`` temporaries, a batch of at most :data:`SMALL_BATCH` bytes (CPU)
or :data:`CHUNK` bytes (devices with a caching allocator) at a time; ``group_lasso`` needs
one norm per slice and ``orthogonal`` its Gram matrix (``addmm_`` straight into the
gradient where it can).

Strengths are Python floats in eager mode (no host sync). Inside ``torch.compile``
(an optimizer step compiled with its hooks) the same terms are written with 0-dim
strength tensors that schedules update in place, so a moving strength never
recompiles; the same tensor path runs when a fused optimizer under ``GradScaler``
receives still-scaled gradients (``optimizer.grad_scale``), the terms scaled to match.
docs/fold.md says where this path differs from the loss path.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import sharded
from .penalties import LossItem, PenaltyPlan, accumulation_dtype, autocast_device_type
from .schedule import is_scheduled, live, strength_at

FAMILIES = ("l1", "l2", "l2_to", "group_lasso", "orthogonal")
# Bytes per _foreach batch off the CPU: bounds the temporaries a step holds at once.
CHUNK = 64 << 20
# On the CPU a tensor this small (bytes) gets its sign(w) or w − w₀ as a _foreach temporary:
# glibc serves blocks this size from its heap, not from fresh pages, and one _foreach call for
# many small tensors costs less than two kernels each. Batches stay under SMALL_BATCH bytes.
SMALL = 64 << 10
SMALL_BATCH = 1 << 20


def can_fold(item: LossItem) -> bool:
    """Complex parameters stay on the loss path: its Wirtinger gradients are the documented ones."""
    return item.family in FAMILIES and not item.param.is_complex()


class _Bucket:
    """Items of one family and one term (so one strength at every step) on one device and dtype."""

    def __init__(self, family: str, term: Any, items: list[LossItem], step: int, scratch_devices: Sequence[str]):
        self.family, self.term, self.items = family, term, items
        self.params = [i.param for i in items]
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.acc = accumulation_dtype(self.dtype)
        self.autocast = autocast_device_type(self.device) if family == "orthogonal" else None
        self.scheduled = is_scheduled(term)
        self.value = strength_at(term, step)
        # Read only inside torch.compile or under a fused GradScaler step.
        self.tensor = torch.tensor(self.value, dtype=self.acc, device=self.device)
        self.sharded = sharded.is_sharded(self.params[0])  # FSDP2: folded on the local shards (regdsl.sharded)
        self.on_scratch = self.device.type in scratch_devices and not self.sharded
        # Per parameter, its view of the plan's scratch buffer (set by the plan): made once, since
        # slicing a view at each step costs as much as the kernels on small tensors.
        self.views: list[torch.Tensor | None] = [None] * len(self.params)
        self.batch = SMALL_BATCH if self.on_scratch else CHUNK
        self.loose = list(range(len(self.params)))  # the parameters without a view
        self.chunks = _chunks(self.params, self.batch)
        # group_lasso: the dimensions each slice's norm runs over, worked out once.
        self.others = [_others(p, term.dim) if family == "group_lasso" else () for p in self.params]
        self.tiny = torch.finfo(self.acc).tiny
        # slice_norms' buffer, each parameter's (start, end, shape) in it and its view there: made on first use.
        self._norm_buffer: torch.Tensor | None = None
        self._spans: list[tuple[int, int, tuple[int, ...]] | None] = []
        self._norm_views: list[torch.Tensor | None] = []

    def needs_scratch(self, p: torch.Tensor) -> bool:
        if not self.on_scratch or self.family not in ("l1", "l2_to", "group_lasso"):
            return False
        if self.family == "group_lasso":
            return p.ndim == 1
        return p.numel() * p.element_size() > SMALL

    def set_views(self, views: list[torch.Tensor | None]) -> None:
        """Give each parameter its scratch view (None: a _foreach temporary), then batch the rest."""
        self.views = views
        self.loose = [k for k, v in enumerate(views) if v is None]
        self.chunks = _chunks([self.params[k] for k in self.loose], self.batch)

    def set_step(self, step: int) -> None:
        if self.scheduled:
            self.value = strength_at(self.term, step)
            self.tensor.fill_(self.value)

    def stale(self) -> bool:
        p = self.params[0]
        return p.dtype != self.dtype or p.device != self.device

    def strength(self, scale: torch.Tensor | None) -> torch.Tensor:
        """The strength as a 0-dim tensor (traced as a graph input), times a fused optimizer's ``grad_scale``."""
        return self.tensor if scale is None else self.tensor * scale.to(self.device)

    @torch.no_grad()
    def slice_norms(self) -> torch.Tensor | None:
        """``group_lasso``: ``‖w_i‖₂`` of every slice of every parameter of two or more dimensions, computed
        now into one flat buffer kept across steps (None for other terms). Only :mod:`regdsl.compiled_step`
        asks, eagerly before its graph: inductor fails to compile this reduction fused into an update."""
        if self.family != "group_lasso" or self.sharded:
            return None
        if self._norm_buffer is None:
            shapes = [
                None if p.ndim == 1 else tuple(1 if d in dims else n for d, n in enumerate(p.shape))
                for p, dims in zip(self.params, self.others)
            ]
            ends = list(itertools.accumulate(math.prod(s) if s else 0 for s in shapes))
            self._spans = [None if s is None else (end - math.prod(s), end, s) for s, end in zip(shapes, ends)]
            self._norm_buffer = torch.empty(ends[-1], dtype=self.acc, device=self.device)
            self._norm_views = self.norm_views(self._norm_buffer)
        for p, dims, out in zip(self.params, self.others, self._norm_views):
            if out is not None:
                torch.linalg.vector_norm(p, 2, dim=dims, keepdim=True, dtype=self.acc, out=out)
        return self._norm_buffer

    def norm_views(self, norms: torch.Tensor) -> list[torch.Tensor | None]:
        """Each parameter's slice norms in :meth:`slice_norms`' buffer (traced: slicing costs the graph nothing)."""
        return [None if span is None else norms[span[0] : span[1]].view(span[2]) for span in self._spans]

    def fold(self, scale: torch.Tensor | None, norms: torch.Tensor | None = None) -> None:
        """``norms``: this step's :meth:`slice_norms` (a compiled step), else they are computed here."""
        params, grads, kept = _gradients(self.params)
        if not params:
            return
        per_param = None
        if norms is not None:
            views = self.norm_views(norms)
            per_param = views if len(kept) == len(self.params) else [views[k] for k in kept]
        refs = (
            [self.items[k].ref for k in kept] if self.family == "l2_to" else []
        )  # read now: load_state_dict() replaces them
        if self.sharded:
            lam = self.value * (float(scale) if scale is not None else 1.0)
            if lam:  # eager even inside a compiled step: DTensor shards are not traced here
                (eager(sharded.fold) if torch.compiler.is_compiling() else sharded.fold)(
                    self.family, self.term, lam, params, grads, refs, self.acc
                )
        elif scale is not None or torch.compiler.is_compiling():
            self._fold_tensor(params, grads, refs, self.strength(scale), per_param)
        elif self.value:
            views = self.views if len(kept) == len(self.params) else [self.views[k] for k in kept]
            if self.autocast is None:
                self._fold_float(params, grads, refs, views)
            else:
                with torch.autocast(device_type=self.autocast, enabled=False):
                    self._fold_float(params, grads, refs, views)

    def _fold_float(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], refs: list[torch.Tensor], views: list[Any]
    ) -> None:
        lam, family = self.value, self.family
        if family == "l2":
            torch._foreach_add_(grads, params, alpha=lam)
        elif family in ("l1", "l2_to"):
            whole = len(params) == len(self.params)
            loose = self.loose if whole else [k for k, v in enumerate(views) if v is None]
            if len(loose) < len(params):  # the large ones, each through its scratch view
                for k, out in enumerate(views):
                    if out is not None:
                        delta = torch.sign(params[k], out=out) if not refs else torch.sub(params[k], refs[k], out=out)
                        grads[k].add_(delta, alpha=lam)
                params, grads = [params[k] for k in loose], [grads[k] for k in loose]
                refs = [refs[k] for k in loose] if refs else refs
            chunks = self.chunks if whole else _chunks(params, self.batch)
            for a, b in chunks:
                delta = torch._foreach_sign(params[a:b]) if not refs else torch._foreach_sub(params[a:b], refs[a:b])
                torch._foreach_add_(grads[a:b], delta, alpha=lam)
        elif family == "group_lasso":
            others = self.others if len(params) == len(self.params) else None
            for k, (p, g, out) in enumerate(zip(params, grads, views)):
                if p.ndim == 1:  # each element its own slice: λ·sign(w)
                    g.add_(torch.sign(p) if out is None else torch.sign(p, out=out), alpha=lam)
                else:
                    dims = others[k] if others is not None else _others(p, self.term.dim)
                    g.addcdiv_(p, self._norms(p, dims), value=lam)
        else:
            for p, g in zip(params, grads):
                m, gram, wide = _gram_minus_identity(p, self.acc)
                if g.dtype == self.acc and g.is_contiguous():
                    rows = g.view(m.shape)
                    rows.addmm_(gram, m, alpha=4 * lam) if wide else rows.addmm_(m, gram, alpha=4 * lam)
                else:
                    g.add_((gram @ m if wide else m @ gram).reshape(p.shape), alpha=4 * lam)

    def _norms(self, p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """``‖w_i‖₂`` per slice, an all-zero slice's read as the smallest normal number: its
        ``w_i/‖w_i‖`` is then 0 with no mask (two kernels fewer than a ``where``). A NaN stays NaN."""
        norms = torch.linalg.vector_norm(p, 2, dim=dims, keepdim=True, dtype=self.acc)
        return norms.clamp_min_(self.tiny)

    def _fold_tensor(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        refs: list[torch.Tensor],
        s: torch.Tensor,
        norms: list[torch.Tensor | None] | None,
    ) -> None:
        """The same terms with a tensor strength: under torch.compile these fuse, and no value
        read from Python becomes a constant of the graph."""
        family = self.family
        for k, (p, g) in enumerate(zip(params, grads)):
            if family == "l2":
                g.addcmul_(p, s)
            elif family == "l2_to":
                g.addcmul_(p - refs[k], s)
            elif family == "l1" or (family == "group_lasso" and p.ndim == 1):
                g.addcmul_(torch.sign(p), s)
            elif family == "group_lasso":
                n = norms[k] if norms is not None else None
                if n is None:
                    n = torch.linalg.vector_norm(p, 2, dim=_others(p, self.term.dim), keepdim=True, dtype=self.acc)
                # A where, not _norms: s/tiny overflows to inf at a GradScaler's scale, and inf·0 is NaN.
                g.addcmul_(p, torch.where(n > 0, s / n, torch.zeros_like(n)))
            else:
                m, gram, wide = _gram_minus_identity(p, self.acc)
                g.addcmul_((gram @ m if wide else m @ gram).reshape(p.shape), 4 * s)


def _gradients(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], range | list[int]]:
    """Each parameter's gradient, ready for in-place adds, and the indices of the parameters kept.
    A parameter without one gets zeros (the term alone is its gradient, as the loss path would
    give it); a sparse one (``Embedding(sparse=True)``) turns dense, as autograd's sum with a
    dense term would make it."""
    grads = [p.grad for p in params]
    if not any(g is None or g.layout != torch.strided for g in grads):
        return params, grads, range(len(params))  # type: ignore[return-value]
    kept, out = [], []
    for k, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            if not p.requires_grad:
                continue  # frozen since compile(): the loss path gives it no gradient either
            p.grad = g = torch.zeros_like(p)
        elif g.layout != torch.strided:
            p.grad = g = g.to_dense()
        kept.append(k)
        out.append(g)
    return [params[k] for k in kept], out, kept


def _others(p: torch.Tensor, dim: int) -> tuple[int, ...]:
    """The dimensions of ``p`` other than ``dim``: a slice's norm runs over them."""
    keep = dim % p.ndim if p.ndim else 0
    return tuple(d for d in range(p.ndim) if d != keep)


def _gram_minus_identity(p: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    m = p.reshape(p.shape[0], -1).to(acc)
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    if torch.compiler.is_compiling():  # inductor's lowering of diagonal() raises a FutureWarning of torch's own
        gram = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    else:
        gram.diagonal().sub_(1)
    return m, gram, wide


def _chunks(params: Sequence[torch.Tensor], limit: int) -> list[tuple[int, int]]:
    """Consecutive index ranges of at most ``limit`` bytes (a larger tensor alone)."""
    out, start, size = [], 0, 0
    for k, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if size and size + nbytes > limit:
            out.append((start, k))
            start, size = k, 0
        size += nbytes
    if start < len(params):
        out.append((start, len(params)))
    return out


class FoldPlan:
    """Every folded term, bucketed once by (family, term, device, dtype).

    Like :class:`~regdsl.penalties.PenaltyPlan`, a bucket whose first parameter has changed
    dtype or device (``model.to(...)`` after attaching) makes the plan re-bucket, at a cost
    of O(buckets) per step.
    """

    scratch_devices: tuple[str, ...] = ("cpu",)

    def __init__(self, items: Sequence[LossItem], step: int = 0):
        self.items = live(items)
        self._step = step
        # Set while a compiled step (regdsl.compiled_step) runs the pre-hooks: it folds inside its own graph.
        self.deferred = False
        self.retired = False  # detach() has run: penalty() holds these terms again
        self._build()

    def _build(self) -> None:
        for item in self.items:
            item.follow()
        grouped: dict[tuple[Any, ...], list[LossItem]] = {}
        distributed = sharded.active()
        for item in self.items:
            p = item.param
            key = (item.family, item.term, p.device, p.dtype, sharded.mesh_key(p) if distributed else None)
            grouped.setdefault(key, []).append(item)
        self._buckets = [
            _Bucket(family, term, items, self._step, self.scratch_devices)
            for (family, term, *_), items in grouped.items()
        ]
        self._scheduled = [b for b in self._buckets if b.scheduled]
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

    def set_step(self, step: int) -> None:
        self._step = step
        for bucket in self._scheduled:
            bucket.set_step(step)

    def __call__(self, scale: torch.Tensor | None = None) -> None:
        """Add every term's gradient to ``p.grad`` now; ``scale`` multiplies them (a fused
        optimizer's ``grad_scale`` under ``GradScaler``)."""
        if not self.deferred:
            self.refresh()
            self.apply(scale)

    def refresh(self) -> None:
        if any(b.stale() for b in self._buckets):
            self._build()

    def slice_norms(self) -> list[torch.Tensor | None]:
        return [b.slice_norms() for b in self._buckets]

    @torch.no_grad()
    def apply(self, scale: torch.Tensor | None, norms: list[torch.Tensor | None] | None = None) -> None:
        """The terms' gradients into ``p.grad``; ``norms``: :meth:`slice_norms` of this step."""
        for k, b in enumerate(self._buckets):
            b.fold(scale, norms[k] if norms is not None else None)


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


@functools.cache
def eager(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn``, always run eagerly. Traced into a compiled optimizer step, the bookkeeping would
    read the step counter, guard the graph on it and recompile at every step. Made on first
    use, not at import: ``torch.compiler.disable`` imports dynamo, as building an optimizer does."""
    return torch.compiler.disable(fn)
