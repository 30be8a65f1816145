"""The loss penalties, vectorized.

Formulas (the contract; docs/language.md repeats them):

* ``l2 λ``: ``λ/2 · Σ w²``, gradient ``λ·w`` (= ``torch.optim.SGD(weight_decay=λ)``)
* ``l1 λ``: ``λ · Σ |w|``, gradient ``λ·sign(w)`` (0 at 0)

Parameters are bucketed once, at compile time, by (term, device, dtype). A call
then costs one ``torch._foreach_norm`` per bucket (one fused kernel on CUDA)
plus a dot product with the precomputed strengths: there is no Python loop over
parameters. Norms are accumulated in float32, or float64 for float64
parameters, so half-precision weights cannot overflow the sum. The backward
pass is the closed-form gradient, one fused multiply per bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

# term -> (order of the vector norm, power applied to it, constant factor)
# l2: λ/2 · ‖w‖₂²   l1: λ · ‖w‖₁
FORMULAS: dict[str, tuple[int, int, float]] = {"l2": (2, 2, 0.5), "l1": (1, 1, 1.0)}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype penalties of ``dtype`` parameters are summed in: float32, or float64 for 64-bit."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    # vector_norm wants a complex dtype for complex inputs; its result is real either way.
    real = accumulation_dtype(dtype)
    if dtype.is_complex:
        return torch.complex128 if real == torch.float64 else torch.complex64
    return real


@dataclass(frozen=True)
class _Bucket:
    params: list[torch.Tensor]
    weights: torch.Tensor  # factor · λ per parameter, on the bucket's device
    norm_dtype: torch.dtype
    order: int
    power: int
    dtype: torch.dtype  # of the parameters when bucketed


class PenaltyPlan:
    """Evaluates ``Σ_terms Σ_params factor·λ·‖w‖^power`` with a handful of fused kernels.

    Buckets are keyed by each parameter's dtype and device at build time. A
    ``model.to(...)`` after compiling changes them in place (the Parameter
    objects stay), so each call compares one parameter per bucket with its key
    and re-buckets when they differ: O(buckets), not O(parameters).
    """

    def __init__(self, terms: Sequence[tuple[str, torch.Tensor, float]]):
        self._terms = [(kind, p, s) for kind, p, s in terms if s != 0.0 and p.numel() > 0]
        self._build()

    def _build(self) -> None:
        grouped: dict[tuple[str, torch.device, torch.dtype], tuple[list[torch.Tensor], list[float]]] = {}
        for kind, param, strength in self._terms:
            params, strengths = grouped.setdefault((kind, param.device, param.dtype), ([], []))
            params.append(param)
            strengths.append(strength)
        self._buckets = []
        for (kind, device, dtype), (params, strengths) in grouped.items():
            order, power, factor = FORMULAS[kind]
            weights = torch.tensor([factor * s for s in strengths], dtype=accumulation_dtype(dtype), device=device)
            self._buckets.append(_Bucket(params, weights, _norm_dtype(dtype), order, power, dtype))
        self._device = self._buckets[0].weights.device if self._buckets else None
        self._dtype = torch.float64 if any(b.weights.dtype == torch.float64 for b in self._buckets) else torch.float32

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def _stale(self) -> bool:
        return any(b.params[0].dtype != b.dtype or b.params[0].device != b.weights.device for b in self._buckets)

    def __call__(self, default_device: torch.device | None = None) -> torch.Tensor:
        if not self._buckets:
            return torch.zeros((), dtype=torch.float32, device=default_device)
        if self._stale():
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
            value = _BucketPenalty.apply(b.weights, b.order, b.power, b.norm_dtype, *b.params)
            value = value.to(device=self._device, dtype=self._dtype)
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
