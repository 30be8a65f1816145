"""The closed-form gradients one bucket of folded terms adds to ``p.grad`` (:mod:`regdsl.fold`
buckets the terms and runs them before each optimizer step).

A bucket holds the parameters of one term kind and one term (so one strength at every step)
on one device and dtype. Eagerly it folds with a Python float strength, batching small
tensors into ``_foreach`` calls and writing ``sign(w)`` or ``w − w₀`` of large ones into the
plan's scratch buffer; under ``torch.compile`` or a fused ``GradScaler`` step, with a 0-dim
strength tensor. :mod:`regdsl.fold`'s docstring has the formulas.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import sharded
from .fold_batching import chunks, gradients, same_shape_runs, slice_dims
from .fold_stacked import fold_stacked, shape_groups, stacked_norms
from .penalties import SMALL, LossItem, accumulation_dtype, autocast_device_type
from .schedule import is_scheduled, strength_at

# Bytes per _foreach batch off the CPU: bounds the temporaries a step holds at once.
CHUNK = 64 << 20
# On the CPU a tensor of at most SMALL bytes (penalties.SMALL: its temporaries come from glibc's
# heap) gets its sign(w) or w − w₀ as a _foreach temporary: one _foreach call for many small
# tensors costs less than two kernels each. Batches stay under SMALL_BATCH bytes.
SMALL_BATCH = 1 << 20
# On the CPU a bucket of at most this many tensors is folded one tensor at a time: measured inside
# a training step, a _foreach call over one to three small tensors costs more than their kernels.
FEW = 3


class Bucket:
    """Items of one family and one term (so one strength at every step) on one device and dtype."""

    def __init__(self, family: str, term: Any, items: list[LossItem], step: int, scratch_devices: Sequence[str]):
        self.family, self.term, self.items = family, term, items
        self.params = [i.param for i in items]
        self.trainable = [p.requires_grad for p in self.params]
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
        self.chunks = chunks(self.params, self.batch)
        # group_lasso: the dimensions each slice's norm runs over, worked out once, and the runs of
        # small same-shaped tensors whose norms one stacked kernel computes (the rest: one each).
        self.others = [slice_dims(p, term.dim) if family == "group_lasso" else () for p in self.params]
        stacks = family == "group_lasso" and self.on_scratch
        runs = same_shape_runs(self.params, SMALL, SMALL_BATCH) if stacks else []
        # (start, end, the norm's dimensions in the stacked copy)
        self.runs = [(a, b, tuple(d + 1 for d in self.others[a])) for a, b in runs]
        in_runs = {k for a, b in runs for k in range(a, b)}
        self.singles = [k for k in range(len(self.params)) if k not in in_runs]
        # Off the CPU, weights of one shape fold as one stack (regdsl.fold_stacked); float32 and float64 only.
        stacking = family == "group_lasso" and not self.on_scratch and not self.sharded and self.dtype == self.acc
        self.stacked = shape_groups(self.params, self.others) if stacking else []
        self.tiny = torch.finfo(self.acc).tiny
        # slice_norms' buffer, each parameter's (start, end, shape) in it and its views there: made on first use.
        self._norm_buffer: torch.Tensor | None = None
        self._spans: list[tuple[int, int, tuple[int, ...]] | None] = []
        self._norm_views: list[torch.Tensor | None] = []
        self._run_views: list[torch.Tensor] = []  # each run's norms, stacked
        self._single_norms: list[tuple[torch.Tensor, tuple[int, ...], torch.Tensor]] = []  # (p, dims, out)
        # The eager fold: on the CPU a parameter of more than SMALL bytes is folded alone, while it is in
        # cache (index, dims, its norms' view); the other ones of two or more dimensions are batched.
        self._large: list[tuple[int, tuple[int, ...], torch.Tensor]] = []
        self._small_norms: list[tuple[torch.Tensor, tuple[int, ...], torch.Tensor]] = []  # the batched singles
        self._batched: list[int] = []
        self._batched_norms: list[torch.Tensor] = []
        self._vectors: list[int] = []  # the 1-D parameters: λ·sign(w)
        # The eager fold of a bucket as simple as a tiny model's (params, grads, λ): fold()'s general branches
        # cost about 8 µs inside its training step, against 25 for the fold's kernels. None: no such bucket.
        self.quick: Callable[[list[torch.Tensor], list[torch.Tensor], float], None] | None = None

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
        self.chunks = chunks([self.params[k] for k in self.loose], self.batch)
        few = self.on_scratch and len(self.params) <= FEW
        if self.on_scratch and self.family == "group_lasso":
            self._lay_out_norms()
        self.quick = {
            "l2": self._each_l2 if few else None,
            "l1": self._each_l1 if few and len(self.loose) == len(self.params) else None,
            "group_lasso": self._all_batched if self.on_scratch and len(self._batched) == len(self.params) else None,
        }.get(self.family)

    def set_step(self, step: int) -> None:
        if self.scheduled:
            self.value = strength_at(self.term, step)
            self.tensor.fill_(self.value)

    def stale(self) -> str | None:
        """``"moved"`` (moved or cast since the bucket was made: the plan rebuilds), ``"frozen"`` (a
        ``requires_grad`` changed: :meth:`retrain`; a compiled graph keeps the one it was traced with)."""
        dtype, device, frozen = self.dtype, self.device, False
        for p, trainable in zip(self.params, self.trainable):  # one loop: it runs at every step
            if p.dtype is not dtype or p.device != device:
                return "moved"
            frozen = frozen or p.requires_grad is not trainable
        return "frozen" if frozen else None

    def retrain(self) -> None:
        self.trainable = [p.requires_grad for p in self.params]

    def strength(self, scale: torch.Tensor | None) -> torch.Tensor:
        """The strength as a 0-dim tensor (traced as a graph input), times a fused optimizer's ``grad_scale``."""
        return self.tensor if scale is None else self.tensor * scale.to(self.device)

    @torch.no_grad()
    def slice_norms(self) -> torch.Tensor | None:
        """``group_lasso``: ``‖w_i‖₂`` of every slice of every parameter of two or more dimensions, computed
        now into one flat buffer kept across steps (None for other terms). :mod:`regdsl.compiled_step`
        asks eagerly before its graph: inductor fails to compile this reduction fused into an update."""
        if self.family != "group_lasso" or self.sharded:
            return None
        return self._slice_norms()

    def _slice_norms(self, large: bool = True) -> torch.Tensor:
        """Into the buffer: every norm, or (``large=False``) all but those of :attr:`_large`."""
        if self._norm_buffer is None:
            self._lay_out_norms()
        for (a, b, dims), out in zip(self.runs, self._run_views):  # consecutive in the buffer too
            stacked = torch.stack(self.params[a:b])
            torch.linalg.vector_norm(stacked, 2, dim=dims, keepdim=True, dtype=self.acc, out=out)
        for p, dims, out in self._single_norms if large else self._small_norms:
            torch.linalg.vector_norm(p, 2, dim=dims, keepdim=True, dtype=self.acc, out=out)
        if large:  # the eager fold takes the stacks' norms itself
            stacked_norms(self.params, self.stacked, self._norm_views)
        assert self._norm_buffer is not None
        return self._norm_buffer

    def _lay_out_norms(self) -> None:
        """The norm buffer and every view into it, made once: slicing views at each step costs as much
        as the kernels on small tensors."""
        shapes = [
            None if p.ndim == 1 else tuple(1 if d in dims else n for d, n in enumerate(p.shape))
            for p, dims in zip(self.params, self.others)
        ]
        ends = list(itertools.accumulate(0 if s is None else math.prod(s) for s in shapes))
        self._spans = [None if s is None else (end - math.prod(s), end, s) for s, end in zip(shapes, ends)]
        buffer = self._norm_buffer = torch.empty(ends[-1], dtype=self.acc, device=self.device)
        self._norm_views = views = self.norm_views(buffer)
        self._run_views = []
        for a, b, _ in self.runs:
            first, last = self._spans[a], self._spans[b - 1]
            assert first is not None and last is not None
            self._run_views.append(buffer[first[0] : last[1]].view(b - a, *first[2]))
        norm = {k: (self.params[k], self.others[k], v) for k, v in enumerate(views) if v is not None}
        large = {k for k, (p, _, _) in norm.items() if self.on_scratch and p.numel() * p.element_size() > SMALL}
        stacked = {k for indices, _ in self.stacked for k in indices}
        self._single_norms = [norm[k] for k in self.singles if k in norm and k not in stacked]
        self._small_norms = [norm[k] for k in self.singles if k in norm and k not in large | stacked]
        self._large = [(k, norm[k][1], norm[k][2]) for k in norm if k in large]
        self._batched = [k for k in norm if k not in large | stacked]
        self._batched_norms = [norm[k][2] for k in self._batched]
        self._vectors = [k for k, v in enumerate(views) if v is None]

    def norm_views(self, norms: torch.Tensor) -> list[torch.Tensor | None]:
        """Each parameter's slice norms in :meth:`slice_norms`' buffer (traced: slicing costs the graph nothing).
        Laid out from the shapes, which the graph knows already: traced, reading ``_spans`` would add a
        guard for every offset (1,600 on the 400-layer MLP, checked before each call)."""
        views: list[torch.Tensor | None] = []
        start, dim = 0, self.term.dim
        for p in self.params:
            if p.ndim == 1:
                views.append(None)
                continue
            keep = dim % p.ndim
            n = p.shape[keep]
            views.append(norms[start : start + n].view([n if d == keep else 1 for d in range(p.ndim)]))
            start += n
        return views

    def fold(self, scale: torch.Tensor | None, norms: torch.Tensor | None = None, checked: bool = False) -> None:
        """``norms``: this step's :meth:`slice_norms` (a compiled step), else they are computed here.
        ``checked``: every gradient is there, dense, and every tensor trainable (the plan looked)."""
        if checked and self.quick is not None and scale is None and not torch.compiler.is_compiling():
            if self.value:
                self.quick(self.params, [p.grad for p in self.params], self.value)
            return
        params, grads, kept = gradients(self.params, checked)
        if not params:
            return
        whole = len(kept) == len(self.params)
        refs = [self.items[k].ref for k in kept] if self.family == "l2_to" else []  # now: load_state_dict() replaces them
        if not (self.sharded or scale is not None or torch.compiler.is_compiling()):  # eager, float strength
            if self.value:
                views = self.views if whole else [self.views[k] for k in kept]
                if self.autocast is None:
                    self._fold_float(params, grads, refs, views)
                else:
                    with torch.autocast(device_type=self.autocast, enabled=False):
                        self._fold_float(params, grads, refs, views)
        elif self.sharded:
            lam = self.value * (float(scale) if scale is not None else 1.0)
            if lam:  # eager even inside a compiled step: DTensor shards are not traced here
                eager(sharded.fold)(self.family, self.term, lam, params, grads, refs, self.acc)
        else:
            per_param = None
            if norms is not None:
                views = self.norm_views(norms)
                per_param = views if whole else [views[k] for k in kept]
            self._fold_tensor(params, grads, refs, self.strength(scale), per_param)

    def _fold_float(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], refs: list[torch.Tensor], views: list[Any]
    ) -> None:
        lam, family = self.value, self.family
        if family == "l2":
            if len(params) > FEW or not self.on_scratch:
                torch._foreach_add_(grads, params, alpha=lam)
            else:
                self._each_l2(params, grads, lam)
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
            if len(params) <= FEW and self.on_scratch:
                if not refs:
                    self._each_l1(params, grads, lam)
                    return
                for p, g, ref in zip(params, grads, refs):
                    g.add_(torch.sub(p, ref), alpha=lam)
                return
            for a, b in self.chunks if whole else chunks(params, self.batch):
                delta = torch._foreach_sign(params[a:b]) if not refs else torch._foreach_sub(params[a:b], refs[a:b])
                torch._foreach_add_(grads[a:b], delta, alpha=lam)
        elif family == "group_lasso":
            if len(params) == len(self.params):
                self._fold_group_lasso(grads, lam)
                return
            for p, g, out in zip(params, grads, views):  # some without a gradient: one at a time
                if p.ndim == 1:  # each element its own slice: λ·sign(w)
                    g.add_(torch.sign(p) if out is None else torch.sign(p, out=out), alpha=lam)
                else:
                    g.addcdiv_(p, self._norms(p, slice_dims(p, self.term.dim)), value=lam)
        else:
            for p, g in zip(params, grads):
                m, gram, wide = _gram_minus_identity(p, self.acc)
                if g.dtype == self.acc and g.is_contiguous():
                    rows = g.view(m.shape)
                    rows.addmm_(gram, m, alpha=4 * lam) if wide else rows.addmm_(m, gram, alpha=4 * lam)
                else:
                    g.add_((gram @ m if wide else m @ gram).reshape(p.shape), alpha=4 * lam)

    def _fold_group_lasso(self, grads: list[torch.Tensor], lam: float) -> None:
        """A CPU weight of more than ``SMALL`` bytes alone: its norms, their floor, its update, so that
        the update reads it again from cache (ResNet-50's weights: 14.6 ms against 17.2 batched, ViT-B's
        37 against 40). The others: their slice norms into the one buffer (a run of small same-shaped
        ones from a stacked copy), one clamp over it, then one ``_foreach_addcdiv_``. Timed inside a step
        against three kernels a weight: 34 µs against 37 on the tiny MLP's two weights, 3.9 ms against
        4.6 on the 400-layer MLP's. Off the CPU, weights of one shape go first, as stacks (regdsl.fold_stacked)."""
        if self._norm_buffer is None:
            self._lay_out_norms()
        params, batched = self.params, self._batched
        if len(batched) == len(params):  # neither stacks nor large ones nor 1-D ones
            self._all_batched(params, grads, lam)
            return
        fold_stacked(params, grads, self.stacked, lam, self.tiny)
        for k, dims, out in self._large:
            p = params[k]
            torch.linalg.vector_norm(p, 2, dim=dims, keepdim=True, dtype=self.acc, out=out)
            grads[k].addcdiv_(p, out.clamp_min_(self.tiny), value=lam)
        if batched:
            # The whole buffer: the large ones' norms, clamped already, are left as they are.
            self._slice_norms(large=False).clamp_min_(self.tiny)
            bg, bp = [grads[k] for k in batched], [params[k] for k in batched]
            torch._foreach_addcdiv_(bg, bp, self._batched_norms, value=lam)
        for k in self._vectors:  # each element its own slice: λ·sign(w)
            p, out = params[k], self.views[k]
            grads[k].add_(torch.sign(p) if out is None else torch.sign(p, out=out), alpha=lam)

    def _each_l2(self, params: list[torch.Tensor], grads: list[torch.Tensor], lam: float) -> None:
        for p, g in zip(params, grads):
            g.add_(p, alpha=lam)

    def _each_l1(self, params: list[torch.Tensor], grads: list[torch.Tensor], lam: float) -> None:
        for p, g in zip(params, grads):
            g.add_(torch.sign(p), alpha=lam)

    def _all_batched(self, params: list[torch.Tensor], grads: list[torch.Tensor], lam: float) -> None:
        """:meth:`_fold_group_lasso` of a bucket with neither stacks nor large nor 1-D tensors."""
        self._slice_norms(large=False).clamp_min_(self.tiny)
        if len(params) > FEW:
            torch._foreach_addcdiv_(grads, params, self._batched_norms, value=lam)
            return
        for p, g, norms in zip(params, grads, self._batched_norms):
            g.addcdiv_(p, norms, value=lam)

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
                    n = torch.linalg.vector_norm(p, 2, dim=slice_dims(p, self.term.dim), keepdim=True, dtype=self.acc)
                # A where, not _norms: s/tiny overflows to inf at a GradScaler's scale, and inf·0 is NaN.
                g.addcmul_(p, torch.where(n > 0, s / n, torch.zeros_like(n)))
            else:
                m, gram, wide = _gram_minus_identity(p, self.acc)
                g.addcmul_((gram @ m if wide else m @ gram).reshape(p.shape), 4 * s)


def _gram_minus_identity(p: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    m = p.reshape(p.shape[0], -1).to(acc)
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    if torch.compiler.is_compiling():  # inductor's lowering of diagonal() raises a FutureWarning of torch's own
        gram = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    else:
        gram.diagonal().sub_(1)
    return m, gram, wide


@functools.cache
def eager(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn``, run eagerly even inside a traced optimizer step: traced, the bookkeeping would read the
    step counter, guard the graph on it and recompile at every step. Outside a trace ``fn`` itself
    runs: through ``torch.compiler.disable`` a call cost ~10 µs inside a tiny MLP's training step, a
    fifth of its fold. Made on first use: ``torch.compiler.disable`` imports dynamo."""
    disabled = torch.compiler.disable(fn)

    def run(*args: Any, **kwargs: Any) -> None:
        (disabled if torch.compiler.is_compiling() else fn)(*args, **kwargs)

    return run
