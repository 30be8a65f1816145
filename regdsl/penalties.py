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
tensor is one output); a CPU bucket of at most :data:`FEW` tensors of at most 64 KiB is plain
ops that autograd differentiates (there the Function's own cost is more than the kernels').
No full-size temporaries: memory freed after a step goes back to the OS, so each one
page-faults in again at every step, and a ``_foreach`` op (one kernel per tensor on CPU
anyway) holds all its results at once. The forward reads each weight
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

from collections.abc import Sequence
from typing import Any

import torch

from . import sharded
from .schedule import any_scheduled, live, strengths_at
from .term_math import (
    LossItem,
    _autocast_enabled,
    _ClosedForm,
    _Orthogonal,
    accumulation_dtype,
    autocast_device_type,
    group_lasso_value,
    unit_value,
)

# Bytes of a CPU tensor whose temporaries cost nothing to allocate: glibc serves blocks this size
# from its heap, not from fresh pages that fault in again at every step (regdsl.fold_kernels too).
SMALL = 64 << 10
# A closed-form CPU bucket of at most FEW tensors of at most SMALL bytes each is differentiated by
# autograd (measured inside a CPU training step: on the tiny MLP's 2 weights, 15 to 40 µs less
# per step; on 9 weights of 64x64, the Function is faster).
FEW = 3

__all__ = ["SMALL", "LossItem", "PenaltyPlan", "accumulation_dtype", "autocast_device_type", "moved", "unit_value"]


def moved(params: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``.to(...)`` since a bucket was made has cast or moved any of its ``params``.
    Every tensor is read, not only the first: casting one submodule (``model.head.double()``)
    would leave the others computed in the old dtype, silently (a float64 weight's ``w − w₀``
    rounded to float32, its strength too). A loop: 0.1 µs a tensor, 50 µs on 400 weights."""
    for p in params:
        if p.dtype is not dtype or p.device != device:
            return True
    return False


_CPU = torch.device("cpu")

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
        self.sharded = sharded.is_sharded(self.params[0])  # FSDP2: every parameter on one mesh, one placement
        self.scheduled = any_scheduled(i.term for i in items)
        self.weights = torch.tensor(self._values(step), dtype=self.acc, device=self.device)

    def set_step(self, step: int) -> None:
        if self.scheduled:
            with torch.no_grad():
                self.weights.copy_(torch.tensor(self._values(step), dtype=self.acc))

    def stale(self) -> bool:
        return moved(self.params, self.dtype, self.device)

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
        if not self.sharded:
            return _ClosedForm.apply(self.weights, self.layout, self.acc, len(self.params), *self.params, *refs)
        # Each rank sums its shards; one all-reduce of that scalar makes the whole weight's value.
        refs = [sharded.local_reference(r, self.items[j].param) for r, j in zip(refs, self.anchored)]
        shards = [p.to_local() for p in self.params]  # type: ignore[attr-defined]
        value = _ClosedForm.apply(self.weights, self.layout, self.acc, len(shards), *shards, *refs)
        return sharded.summed(value, self.params[0])


class _FewTensorsBucket(_ClosedFormBucket):
    """The same terms on at most :data:`FEW` small float32/float64 CPU tensors, written as plain torch
    ops that autograd differentiates: there an autograd Function's own cost (a Python forward and
    backward) is more than the kernels', and the temporaries autograd keeps are a few KiB."""

    @staticmethod
    def fits(items: list[LossItem]) -> bool:
        params = list({id(i.param): i.param for i in items}.values())
        return len(params) <= FEW and all(
            p.device.type == "cpu"
            and p.dtype in (torch.float32, torch.float64)
            and p.numel() * p.element_size() <= SMALL
            and not sharded.is_sharded(p)
            for p in params
        )

    def _evaluate(self) -> torch.Tensor:
        refs = [self.items[j].ref for j in self.anchored]
        sums: list[torch.Tensor | None] = [None] * len(self.items)
        for w, (l1, l2, r) in zip(self.params, self.layout):
            flat = w.reshape(-1)
            if l1 >= 0:
                sums[l1] = flat.abs().sum(dtype=self.acc)
            if l2 >= 0:
                d = flat if r < 0 else flat - refs[r].reshape(-1)
                sums[l2] = torch.dot(d, d)  # in the accumulation dtype already: float32 or float64
        return torch.dot(self.weights[0], torch.stack(sums))  # type: ignore[arg-type]


class _PerTensorBucket(_Bucket):
    """``group_lasso`` or ``orthogonal``: a reduction per tensor, summed with the strengths."""

    def _values(self, step: int) -> list[float]:
        return strengths_at((i.term for i in self.items), step)

    def _evaluate(self) -> torch.Tensor:
        # A sharded weight is gathered: slices and Gram matrices need all of it (regdsl.sharded).
        weights = [sharded.full(i.param) for i in self.items] if self.sharded else [i.param for i in self.items]
        values = [
            group_lasso_value(w, i.term, self.acc) if i.kind == "group_lasso" else _Orthogonal.apply(w, self.acc, self.autocast)
            for w, i in zip(weights, self.items)
        ]
        return torch.dot(self.weights, torch.stack(values))


class PenaltyPlan:
    """Evaluates every loss term with one autograd node per (device, dtype), plus per-tensor
    nodes for ``group_lasso`` and ``orthogonal``.

    Buckets are keyed by each parameter's dtype and device at build time. A
    ``model.to(...)`` after compiling changes them in place (the Parameter
    objects stay), so each call compares every parameter with its bucket's key
    (:func:`moved`: casting one submodule changes some of a bucket's tensors) and
    re-buckets when one differs. References (``w₀``) follow their parameter's device
    and dtype.
    """

    def __init__(self, items: Sequence[LossItem], step: int = 0):
        self.items = live(items)
        self._step = step
        self._zero: torch.Tensor | None = None
        self._build()

    def _build(self) -> None:
        for item in self.items:
            item.follow()
        grouped: dict[tuple[Any, ...], list[LossItem]] = {}
        distributed = sharded.active()
        for item in self.items:
            closed = item.kind in ("l1", "l2")
            p = item.param
            grouped.setdefault((closed, p.device, p.dtype, sharded.mesh_key(p) if distributed else None), []).append(item)
        self._buckets: list[_Bucket] = [
            (_PerTensorBucket if not key[0] else _FewTensorsBucket if _FewTensorsBucket.fits(items) else _ClosedFormBucket)(
                items, self._step
            )
            for key, items in grouped.items()
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
            # Everything folded: the same zero each step, as long as nobody changed it (an in-place add bumps
            # its version). A new one each step cost ~5 µs of the fold path's 40 on the tiny MLP.
            if torch.compiler.is_compiling():  # a graph makes its own: nothing kept, no version read
                return torch.zeros((), dtype=torch.float32, device=default_device)
            zero = self._zero
            if zero is None or zero._version or zero.requires_grad or zero.device != (default_device or _CPU):
                zero = self._zero = torch.zeros((), dtype=torch.float32, device=default_device)
            return zero
        if any(b.stale() for b in self._buckets):
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
