"""The loss penalties, at the cost of reading the weights and writing one gradient each.

Formulas (the contract; docs/language.md repeats them), for one parameter ``w``:

* ``l2 λ``: ``λ/2 · Σ w²``, gradient ``λ·w`` (= ``torch.optim.SGD(weight_decay=λ)``)
* ``l2 λ to init|ref``: ``λ/2 · Σ (w − w₀)²``, gradient ``λ·(w − w₀)``
* ``l1 λ``: ``λ · Σ |w|``, gradient ``λ·sign(w)`` (0 at 0)
* ``group_lasso λ dim=D``: ``λ · Σ_i ‖w_i‖₂`` over the slices ``w_i`` along D;
  gradient ``λ·w_i/‖w_i‖``, and 0 (not NaN) for an all-zero slice
* ``orthogonal λ``: ``λ · ‖G − I‖²_F`` with ``W = w.reshape(out, −1)`` and G the
  smaller of ``W Wᵀ`` and ``Wᵀ W``

Parameters are bucketed once, at compile time, by device and dtype. ``l1``, ``l2`` and
``l2 ... to`` of a bucket are one autograd Function whose closed-form backward allocates
one tensor per parameter, the gradient autograd must be handed (elastic net on one
tensor is one output). No full-size temporaries: memory freed after a step goes back to
the OS, so each one page-faults in again at every step, and a ``_foreach`` op (one kernel
per tensor on CPU anyway) holds all its results at once. The forward reads each weight
once per term (``abs().sum()``, a dot product; ``vector_norm`` is several times slower on
CPU), in 1 MiB slices on CPU, so that temporaries stay in cache and a long float32 dot
product stays accurate. ``group_lasso`` and ``orthogonal`` loop over their tensors.

Sums are accumulated in float32, or float64 for float64 parameters, so half-precision
weights cannot overflow, inside the caller's ``torch.autocast`` too: autocast is switched
off while a bucket is computed (else ``orthogonal``'s Gram matrix would be formed in
bfloat16 or float16). Strengths live in tensors that a schedule updates in place, so a
changing strength never becomes a constant baked into a ``torch.compile`` graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .schedule import any_scheduled, live, strengths_at

# Elements per slice of a CPU forward: 1 MiB of float32, which stays in cache, and short
# enough that a float32 dot product keeps about 1e-7 relative precision.
_SLICE = 1 << 18
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype penalties of ``dtype`` parameters are summed in: float32, or float64 for 64-bit."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def autocast_device_type(device: torch.device) -> str | None:
    """``device.type`` if ``torch.autocast`` accepts it (``meta`` has no autocast), else None."""
    available = getattr(torch.amp, "is_autocast_available", None)  # not in every torch >= 2.4
    if available is not None:
        return device.type if available(device.type) else None
    return device.type if device.type in ("cpu", "cuda") else None


def _autocast_enabled(kind: str) -> bool:
    try:
        return torch.is_autocast_enabled(kind)
    except TypeError:  # a torch whose is_autocast_enabled() takes no device type
        return True


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


# ---------------------------------------------------------------- per-term math, shared with values.py


def _flat(w: torch.Tensor) -> torch.Tensor | None:
    """``w``'s elements as a 1-D view in memory order (channels_last and transposed weights
    too: sums do not care about order), or None when its storage has gaps."""
    if w.is_contiguous():
        return w.view(-1)
    permuted = w.permute(sorted(range(w.ndim), key=w.stride, reverse=True))
    return permuted.view(-1) if permuted.is_contiguous() else None


def _slices(w: torch.Tensor) -> list[torch.Tensor]:
    flat = _flat(w)
    if flat is None:
        return [w]
    if w.device.type != "cpu" or flat.numel() <= _SLICE:
        return [flat]  # one kernel on an accelerator, whose allocator keeps its memory
    return list(flat.split(_SLICE))


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def _abs_sum(pieces: list[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """``Σ|w|`` in ``acc`` over the pieces of ``w`` (the modulus for complex ``w``)."""
    return _total([p.abs().sum(dtype=acc) for p in pieces])


def _square_sum(pieces: list[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    sums = []
    for p in pieces:
        if p.is_complex():
            p = torch.view_as_real(p)
        if p.dtype != acc:
            p = p.to(acc)
        if p.ndim != 1:
            p = p.reshape(-1)  # copies only a weight whose storage has gaps
        sums.append(torch.dot(p, p))
    return _total(sums)


def sum_squared_distance(w: torch.Tensor, ref: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``Σ|w − w₀|²`` in ``acc``; ``w − w₀`` one slice at a time when both share a layout."""
    if w.stride() != ref.stride():  # a contiguous saved reference for a channels_last weight
        return _square_sum(_slices(w - ref), acc)
    return _total([_square_sum([a - b], acc) for a, b in zip(_slices(w), _slices(ref), strict=True)])


def group_lasso_value(w: torch.Tensor, term: Any, acc: torch.dtype) -> torch.Tensor:
    """``Σ_i ‖w_i‖₂`` over the slices along ``term.dim``."""
    keep = term.dim % w.ndim
    if w.ndim == 1:
        return torch.linalg.vector_norm(w, 1, dtype=acc)  # each element is its own group
    # vector_norm's backward is 0, not NaN, at an all-zero slice (tests/test_terms.py checks it).
    others = [d for d in range(w.ndim) if d != keep]
    return torch.linalg.vector_norm(w, 2, dim=others, dtype=acc).sum()


def _gram_minus_identity(w: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, bool]:
    m = w.reshape(w.shape[0], -1).to(acc)
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    gram.diagonal().sub_(1)
    return gram, wide


def unit_value(item: LossItem, acc: torch.dtype) -> torch.Tensor:
    """``item``'s term at strength 1 (what ``λ`` multiplies), without autograd's help."""
    w = item.param.detach()
    if item.kind == "l1":
        return _abs_sum(_slices(w), acc)
    if item.kind == "l2":
        return 0.5 * (_square_sum(_slices(w), acc) if item.ref is None else sum_squared_distance(w, item.ref, acc))
    if item.kind == "group_lasso":
        return group_lasso_value(w, item.term, acc)
    return _gram_minus_identity(w, acc)[0].square().sum()


def _gradient(w: torch.Tensor, ref: torch.Tensor | None, l1: torch.Tensor | None, l2: torch.Tensor | None) -> torch.Tensor:
    """``l1·sign(w) + l2·(w − w₀)``; only the tensor it returns is allocated, except for ``l1``
    with ``l2 ... to`` or with ``l2`` on 16-bit weights (one more temporary)."""
    if l1 is None:
        assert l2 is not None
        return w.mul(l2) if ref is None else torch.sub(w, ref).mul_(l2)
    g = (torch.sgn(w) if w.is_complex() else torch.sign(w)).mul_(l1)
    if l2 is None:
        return g
    if ref is None and w.dtype not in _LOW_PRECISION:
        return g.addcmul_(w, l2)  # (addcmul_ would round l2 to a 16-bit w's dtype; mul keeps it)
    # w − w₀ before scaling, not l2·w − l2·w₀: exact (0) while w is still at w₀.
    return g.add_(w.mul(l2) if ref is None else torch.sub(w, ref).mul_(l2))


# ---------------------------------------------------------------- buckets


class _Bucket:
    """Items of one device and dtype, and their strengths as a tensor a schedule updates in place."""

    def __init__(self, items: list[LossItem], step: int):
        self.items = items
        self.params = [i.param for i in items]
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.acc = accumulation_dtype(self.dtype)
        self.autocast = autocast_device_type(self.device)
        self.scheduled = any_scheduled(i.term for i in items)
        self.weights = torch.tensor(self._values(step), dtype=self.acc, device=self.device)

    def set_step(self, step: int) -> None:
        if self.scheduled:
            with torch.no_grad():
                self.weights.copy_(torch.tensor(self._values(step), dtype=self.acc))

    def stale(self) -> bool:
        p = self.params[0]
        return p.dtype != self.dtype or p.device != self.device

    def evaluate(self) -> torch.Tensor:
        # The caller's autocast would form Gram matrices in its low precision. torch.autocast
        # itself, so that torch.compile traces it; only when on: entering costs a small kernel.
        if self.autocast is None or not _autocast_enabled(self.autocast):
            return self._evaluate()
        with torch.autocast(device_type=self.autocast, enabled=False):
            return self._evaluate()


class _ClosedFormBucket(_Bucket):
    """``l1``, ``l2`` and ``l2 ... to``: one :class:`_ClosedForm` call per bucket.

    ``layout`` says, per parameter, which items are its ``l1`` and its ``l2`` and which
    reference (if any) its ``l2`` pulls toward; -1 for none. It is a tuple of ints so that
    ``torch.compile`` treats it as a constant.
    """

    def __init__(self, items: list[LossItem], step: int):
        slots: dict[int, list[int]] = {}
        self.anchored: list[int] = []  # items with a reference, in the order of the refs
        for j, item in enumerate(items):
            slot = slots.setdefault(id(item.param), [-1, -1, -1, j])
            if item.kind == "l1":
                slot[0] = j
            else:
                slot[1] = j
                if item.reference is not None:
                    slot[2] = len(self.anchored)
                    self.anchored.append(j)
        super().__init__(items, step)
        self.params = [items[s[3]].param for s in slots.values()]
        self.layout = tuple((s[0], s[1], s[2]) for s in slots.values())

    def _values(self, step: int) -> list[list[float]]:
        # Row 0 multiplies the forward's sums (λ·Σ|w|, λ/2·Σw²); row 1 is each gradient's λ.
        strengths = strengths_at((i.term for i in self.items), step)
        return [[s * (0.5 if i.kind == "l2" else 1.0) for s, i in zip(strengths, self.items)], strengths]

    def _evaluate(self) -> torch.Tensor:
        # References are read at each call: load_state_dict() replaces them.
        refs = [self.items[j].ref for j in self.anchored]
        return _ClosedForm.apply(self.weights, self.layout, self.acc, len(self.params), *self.params, *refs)


class _PerTensorBucket(_Bucket):
    """``group_lasso`` or ``orthogonal``: a reduction per tensor, summed with the strengths."""

    def _values(self, step: int) -> list[float]:
        return strengths_at((i.term for i in self.items), step)

    def _evaluate(self) -> torch.Tensor:
        values = [
            group_lasso_value(i.param, i.term, self.acc)
            if i.kind == "group_lasso"
            else _Orthogonal.apply(i.param, self.acc, self.autocast)
            for i in self.items
        ]
        return torch.dot(self.weights, torch.stack(values))


class PenaltyPlan:
    """Evaluates every loss term with one autograd node per (device, dtype), plus per-tensor
    nodes for ``group_lasso`` and ``orthogonal``.

    Buckets are keyed by each parameter's dtype and device at build time. A
    ``model.to(...)`` after compiling changes them in place (the Parameter
    objects stay), so each call compares one parameter per bucket with its key
    and re-buckets when they differ: O(buckets), not O(parameters). References
    (``w₀``) follow their parameter's device and dtype.
    """

    def __init__(self, items: Sequence[LossItem], step: int = 0):
        self.items = live(items)
        self._step = step
        self._build()

    def _build(self) -> None:
        for item in self.items:
            item.follow()
        grouped: dict[tuple[bool, torch.device, torch.dtype], list[LossItem]] = {}
        for item in self.items:
            closed = item.kind in ("l1", "l2")
            grouped.setdefault((closed, item.param.device, item.param.dtype), []).append(item)
        self._buckets: list[_Bucket] = [
            (_ClosedFormBucket if closed else _PerTensorBucket)(items, self._step)
            for (closed, _, _), items in grouped.items()
        ]
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
            value = b.evaluate()
            if value.dtype != self._dtype or value.device != self._device:
                value = value.to(device=self._device, dtype=self._dtype)
            total = value if total is None else total + value
        assert total is not None
        return total


# ---------------------------------------------------------------- autograd Functions


class _ClosedForm(torch.autograd.Function):
    """``Σ_j weights[0, j] · s_j`` over the sums ``s_j`` (``Σ|w|``, ``Σw²``, ``Σ(w − w₀)²``) that
    ``layout`` assigns, with a closed-form backward: each parameter's gradient is one fresh
    tensor, computed with two or three kernels and never through ``_foreach`` (which would keep
    every intermediate of the bucket alive at once). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, layout: tuple, acc: torch.dtype, n: int, *tensors: torch.Tensor):
        params, refs = tensors[:n], tensors[n:]
        sums: list[torch.Tensor | None] = [None] * weights.shape[1]
        for w, (l1, l2, r) in zip(params, layout):
            pieces = _slices(w)
            if l1 >= 0:
                sums[l1] = _abs_sum(pieces, acc)
            if l2 >= 0:
                sums[l2] = _square_sum(pieces, acc) if r < 0 else sum_squared_distance(w, refs[r], acc)
        ctx.layout, ctx.n = layout, n
        ctx.save_for_backward(weights, *tensors)
        return torch.dot(weights[0], torch.stack(sums))  # type: ignore[arg-type]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        weights, *tensors = ctx.saved_tensors
        n, needed = ctx.n, ctx.needs_input_grad
        scales = (weights[1] * grad).unbind()
        grads: list[torch.Tensor | None] = [None] * len(tensors)  # references get none
        for i, (l1, l2, r) in enumerate(ctx.layout):
            if needed[4 + i]:  # a parameter frozen since compile() needs no gradient
                ref = tensors[n + r] if r >= 0 else None
                grads[i] = _gradient(tensors[i], ref, scales[l1] if l1 >= 0 else None, scales[l2] if l2 >= 0 else None)
        return (None, None, None, None, *grads)


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
        gram, wide = _gram_minus_identity(w, acc)
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
