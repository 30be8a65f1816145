"""The loss penalties, vectorized where the math allows.

Formulas (the contract; docs/language.md repeats them), for one parameter ``w``:

* ``l2 λ``: ``λ/2 · Σ w²``, gradient ``λ·w`` (= ``torch.optim.SGD(weight_decay=λ)``)
* ``l2 λ to init|ref``: ``λ/2 · Σ (w − w₀)²``, gradient ``λ·(w − w₀)``
* ``l1 λ``: ``λ · Σ |w|``, gradient ``λ·sign(w)`` (0 at 0)
* ``group_lasso λ dim=D``: ``λ · Σ_i ‖w_i‖₂`` over the slices ``w_i`` along D;
  gradient ``λ·w_i/‖w_i‖``, and 0 (not NaN) for an all-zero slice
* ``orthogonal λ``: ``λ · ‖G − I‖²_F`` with ``W = w.reshape(out, −1)`` and G the
  smaller of ``W Wᵀ`` and ``Wᵀ W``

Parameters are bucketed once, at compile time, by (term, device, dtype). For
``l1``, ``l2`` and ``l2 to ...`` a call costs one ``torch._foreach_norm`` per
bucket (one fused kernel on CUDA) and a dot product with the strengths, with a
closed-form backward; ``group_lasso`` and ``orthogonal`` need per-tensor
reductions and loop over their (usually few) tensors. Sums are accumulated in
float32, or float64 for float64 parameters, so half-precision weights cannot
overflow. That holds inside the caller's ``torch.autocast`` too: autocast is
switched off, for each bucket's device type, while the bucket is computed (else
``orthogonal``'s Gram matrix would be formed in bfloat16 or float16). Strengths
live in tensors that a schedule updates in place, so a changing strength never
becomes a constant baked into a ``torch.compile`` graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .schedule import always_zero, is_scheduled, strength_at

# term -> (order of the vector norm, power applied to it, constant factor)
# l2: λ/2 · ‖w‖₂²   l1: λ · ‖w‖₁
FORMULAS: dict[str, tuple[int, int, float]] = {"l2": (2, 2, 0.5), "l1": (1, 1, 1.0)}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype penalties of ``dtype`` parameters are summed in: float32, or float64 for 64-bit."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def autocast_device_type(device: torch.device) -> str | None:
    """``device.type`` if ``torch.autocast`` accepts it (``meta`` has no autocast), else None."""
    available = getattr(torch.amp, "is_autocast_available", None)  # not in every torch >= 2.4
    if available is not None:
        return device.type if available(device.type) else None
    return device.type if device.type in ("cpu", "cuda") else None


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    # vector_norm wants a complex dtype for complex inputs; its result is real either way.
    real = accumulation_dtype(dtype)
    if dtype.is_complex:
        return torch.complex128 if real == torch.float64 else torch.complex64
    return real


@dataclass
class LossItem:
    """One loss term on one parameter. ``ref`` is ``w₀`` for ``l2 ... to``."""

    kind: str  # "l1", "l2", "group_lasso" or "orthogonal"
    param: torch.Tensor
    term: Any
    reference: torch.Tensor | None = None  # w₀ as captured or loaded, in its own precision
    ref: torch.Tensor | None = None  # w₀ in the parameter's current dtype and device

    def __post_init__(self) -> None:
        self.follow()

    def follow(self) -> None:
        """Put ``ref`` where the parameter is now. The reference keeps its own precision, so a
        ``model.half()`` and back does not round it; only its device follows the parameter."""
        if self.reference is None:
            return
        if self.reference.device != self.param.device:
            self.reference = self.reference.to(self.param.device)
        if self.ref is None or self.ref.device != self.param.device or self.ref.dtype != self.param.dtype:
            self.ref = self.reference.to(self.param.dtype)

    @property
    def family(self) -> str:
        return "l2_to" if self.reference is not None else self.kind


def _group_lasso(w: torch.Tensor, term: Any, acc: torch.dtype) -> torch.Tensor:
    keep = term.dim % w.ndim
    if w.ndim == 1:
        return torch.linalg.vector_norm(w, 1, dtype=acc)  # each element is its own group
    # vector_norm's backward is 0, not NaN, at an all-zero slice (tests/test_terms.py checks it).
    others = [d for d in range(w.ndim) if d != keep]
    return torch.linalg.vector_norm(w, 2, dim=others, dtype=acc).sum()


def _orthogonal(w: torch.Tensor, term: Any, acc: torch.dtype) -> torch.Tensor:
    return _Orthogonal.apply(w, acc, autocast_device_type(w.device))


# Terms without a foreach form: a reduction per tensor, summed with the strengths.
_PER_TENSOR = {"group_lasso": _group_lasso, "orthogonal": _orthogonal}


class _Bucket:
    def __init__(self, family: str, items: list[LossItem], step: int):
        self.family = family
        self.items = items
        self.params = [i.param for i in items]
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.acc = accumulation_dtype(self.dtype)
        self.autocast = autocast_device_type(self.device)
        self.factor = FORMULAS[family][2] if family in FORMULAS else (0.5 if family == "l2_to" else 1.0)
        self.scheduled = any(is_scheduled(i.term) for i in items)
        self.weights = torch.tensor(self._values(step), dtype=self.acc, device=self.device)

    def _values(self, step: int) -> list[float]:
        return [self.factor * strength_at(i.term, step) for i in self.items]

    def set_step(self, step: int) -> None:
        if self.scheduled:
            with torch.no_grad():
                self.weights.copy_(torch.tensor(self._values(step), dtype=self.acc))

    def stale(self) -> bool:
        p = self.params[0]
        return p.dtype != self.dtype or p.device != self.device

    def evaluate(self) -> torch.Tensor:
        # The caller's autocast would run the Gram matrices (and their backward) in its low
        # precision; the terms have their own, documented precision. One device per bucket, so
        # one context. torch.autocast itself, not a helper, so that torch.compile traces it.
        if self.autocast is None:
            return self._evaluate()
        with torch.autocast(device_type=self.autocast, enabled=False):
            return self._evaluate()

    def _evaluate(self) -> torch.Tensor:
        if self.family in FORMULAS:
            order, power, _ = FORMULAS[self.family]
            return _BucketPenalty.apply(self.weights, order, power, _norm_dtype(self.dtype), *self.params)
        if self.family == "l2_to":
            refs = [i.ref for i in self.items]
            return _AnchoredL2.apply(self.weights, _norm_dtype(self.dtype), len(refs), *refs, *self.params)
        per_tensor = _PER_TENSOR[self.family]
        values = torch.stack([per_tensor(i.param, i.term, self.acc) for i in self.items])
        return torch.dot(self.weights, values)


class PenaltyPlan:
    """Evaluates every loss term with a handful of kernels per (term, device, dtype).

    Buckets are keyed by each parameter's dtype and device at build time. A
    ``model.to(...)`` after compiling changes them in place (the Parameter
    objects stay), so each call compares one parameter per bucket with its key
    and re-buckets when they differ: O(buckets), not O(parameters). References
    (``w₀``) follow their parameter's device and dtype.
    """

    def __init__(self, items: Sequence[LossItem], step: int = 0):
        self.items = [i for i in items if not always_zero(i.term) and i.param.numel() > 0]
        self._step = step
        self._build()

    def _build(self) -> None:
        for item in self.items:
            item.follow()
        grouped: dict[tuple[str, torch.device, torch.dtype], list[LossItem]] = {}
        for item in self.items:
            grouped.setdefault((item.family, item.param.device, item.param.dtype), []).append(item)
        self._buckets = [_Bucket(family, items, self._step) for (family, _, _), items in grouped.items()]
        self._device = self._buckets[0].device if self._buckets else None
        self._dtype = torch.float64 if any(b.acc == torch.float64 for b in self._buckets) else torch.float32

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def set_step(self, step: int) -> None:
        self._step = step
        for bucket in self._buckets:
            bucket.set_step(step)

    def __call__(self, default_device: torch.device | None = None) -> torch.Tensor:
        if not self._buckets:
            return torch.zeros((), dtype=torch.float32, device=default_device)
        if any(b.stale() for b in self._buckets):
            self._build()
        try:
            return self._evaluate()
        except RuntimeError:
            # Only part of a bucket was converted (one submodule's .to()): re-bucket once, retry.
            self._build()
            return self._evaluate()

    def _evaluate(self) -> torch.Tensor:
        total: torch.Tensor | None = None
        for b in self._buckets:
            value = b.evaluate().to(device=self._device, dtype=self._dtype)
            total = value if total is None else total + value
        assert total is not None
        return total


class _BucketPenalty(torch.autograd.Function):
    """``Σ_i weights_i · ‖p_i‖_order^power`` with a hand-written backward.

    Autograd through ``_foreach_norm`` and ``square`` costs several passes per
    tensor (the norm's backward divides by the norm and masks zeros); the closed
    forms need one: ``2·weights_i·p_i`` for the squared L2 norm and
    ``weights_i·sign(p_i)`` for the L1 norm (0 at 0). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, order: int, power: int, norm_dtype: torch.dtype, *params: torch.Tensor):
        ctx.order = order
        ctx.save_for_backward(weights, *params)
        norms = torch.stack(torch._foreach_norm(params, order, dtype=norm_dtype))
        return torch.dot(weights, norms.square() if power == 2 else norms)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        weights, *params = ctx.saved_tensors
        if ctx.order == 2:
            scales = (2 * weights * grad).unbind()
            grads = torch._foreach_mul(params, list(scales))
        else:
            scales = (weights * grad).unbind()
            signs = [torch.sgn(p) for p in params] if params[0].is_complex() else torch._foreach_sign(params)
            grads = torch._foreach_mul(signs, list(scales))
        return (None, None, None, None, *grads)


class _AnchoredL2(torch.autograd.Function):
    """``Σ_i weights_i · ‖p_i − r_i‖₂²``; backward ``2·weights_i·(p_i − r_i)``, one pass per bucket."""

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, norm_dtype: torch.dtype, n: int, *tensors: torch.Tensor):
        refs, params = tensors[:n], tensors[n:]
        ctx.n = n
        ctx.save_for_backward(weights, *tensors)
        norms = torch.stack(torch._foreach_norm(torch._foreach_sub(params, refs), 2, dtype=norm_dtype))
        return torch.dot(weights, norms.square())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        weights, *tensors = ctx.saved_tensors
        refs, params = tensors[: ctx.n], tensors[ctx.n :]
        grads = torch._foreach_mul(torch._foreach_sub(params, refs), list((2 * weights * grad).unbind()))
        return (None, None, None, *([None] * ctx.n), *grads)


class _Orthogonal(torch.autograd.Function):
    """``‖G − I‖²_F`` for the smaller Gram matrix G of ``W = w.reshape(out, −1)``; backward
    ``4·(G − I)·W`` (``4·W·(G − I)`` when G is ``Wᵀ W``), G − I kept from the forward.

    Autograd's own backward would run its matmuls under the autocast state of the
    ``backward()`` call, in bfloat16 if that call sits inside ``torch.autocast``; this one
    switches autocast off, as the forward did, and needs one matmul instead of two. Not twice
    differentiable, like the other closed-form terms.
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, acc: torch.dtype, autocast: str | None) -> torch.Tensor:
        m = w.reshape(w.shape[0], -1).to(acc)
        wide = m.shape[0] <= m.shape[1]
        gram = m @ m.T if wide else m.T @ m
        gram.diagonal().sub_(1)
        ctx.wide, ctx.acc, ctx.autocast = wide, acc, autocast
        ctx.save_for_backward(w, gram)
        return gram.square().sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        w, diff = ctx.saved_tensors
        off = torch.autocast(device_type=ctx.autocast, enabled=False) if ctx.autocast else contextlib.nullcontext()
        with off:
            m = w.reshape(w.shape[0], -1).to(ctx.acc)
            g = diff @ m if ctx.wide else m @ diff
            g = g.mul_(4 * grad)
        return g.reshape(w.shape).to(w.dtype), None, None
