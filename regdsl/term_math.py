"""The math of the loss terms on one tensor: sums accumulated in float32 (float64 for 64-bit
weights), and the closed-form autograd Functions whose backward allocates only the gradient.

The formulas are :mod:`regdsl.penalties`' contract (docs/language.md repeats them); the
plans that bucket parameters and evaluate them per step live there, the folded form in
:mod:`regdsl.fold`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from . import sharded

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
        # Made outside inference mode even when called inside it (reg.values() in a validation step):
        # an inference tensor kept here could not be saved for the next training step's backward.
        with torch.inference_mode(False):
            if sharded.is_sharded(self.reference):
                self.reference = sharded.laid_out_like(self.reference, self.param)
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
    # A sharded (FSDP2) weight and its reference are gathered: values are read on demand only.
    w = sharded.full(item.param.detach())
    if item.kind == "l1":
        return _abs_sum(_slices(w), acc)
    if item.kind == "l2":
        return 0.5 * (_square_sum(_slices(w), acc) if item.ref is None else sum_squared_distance(w, sharded.full(item.ref), acc))
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
