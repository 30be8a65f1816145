"""``reg.values()``: each loss term's current value, labelled by term kind and rule line.

For logging what the regularization costs, without paying for it at every step::

    {"l2:3": tensor(0.0123), "l1:6": tensor(0.0004), "group_lasso:4": ..., "activity_l1:7": ...}

One 0-dim tensor per label ``"<kind>:<line>"``, the kind as the spec names it (``l1``,
``l2``, ``group_lasso``, ``orthogonal``, ``activity_l1``, ``activity_l2``; ``l2 ... to``
is an ``l2``) and the line of the rule that set the term; statements on one line share
a label. Parameter terms are computed on demand, under ``torch.no_grad()``, with the
strengths of the current step and the per-term math of :mod:`regdsl.penalties`, whether
``penalty()`` computes them or ``attach(optimizer, fold=True)`` folds them into the
optimizer step. Nothing is read back to the host: the caller's ``.item()`` is the sync.

Activity terms depend on a batch, so they cannot be recomputed: theirs are the values
collected since the last ``penalty()`` (summed over the passes), or those it took; values an
optimizer step dropped untaken are gone from here too. A label appears once a pass has run
with autograd recording.

Left out, being no loss terms: ``decay`` and ``lr_mult`` (the optimizer's), ``l1 ... prox``
and ``max_norm`` (applied after each step), and terms whose strength is 0 at every step.

So the values sum to what ``penalty()`` returns on the loss path (no fold) when called
between the forward pass and ``penalty()``, or after it with the weights unchanged. Each
is float32 (float64 where a float64 parameter or output contributes), on the device of
the model's first trainable parameter, like ``penalty()``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from .penalties import accumulation_dtype, autocast_device_type, unit_value
from .schedule import strength_at

if TYPE_CHECKING:
    from .compiler import Regularizer


def label(term: Any) -> str:
    """``"<kind>:<line>"`` of a term node, ``"<kind>:?"`` for one built without a position."""
    line = term.pos.line if getattr(term, "pos", None) is not None else "?"
    return f"{term.kind}:{line}"


def _position(term: Any) -> tuple[float, float]:
    pos = getattr(term, "pos", None)
    return (pos.line, pos.column) if pos is not None else (float("inf"), float("inf"))


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # The caller's autocast would form orthogonal's Gram matrix in bfloat16 or float16.
    kind = autocast_device_type(device)
    return torch.autocast(device_type=kind, enabled=False) if kind else contextlib.nullcontext()


def term_values(reg: Regularizer) -> dict[str, torch.Tensor]:
    """The values of :mod:`regdsl.values`'s contract, in the order of the rules."""
    parts: dict[str, list[torch.Tensor]] = {}
    where: dict[str, tuple[float, float]] = {}
    step = reg.step
    with torch.no_grad():
        for item in reg._loss_items:
            key = label(item.term)
            where.setdefault(key, _position(item.term))
            bucket = parts.setdefault(key, [])
            if item.param.numel() == 0:
                continue  # 0 by every formula (and orthogonal's reshape refuses an empty weight)
            item.follow()  # the parameter may have moved since compile: so does w₀
            with _autocast_off(item.param.device):
                bucket.append(unit_value(item, accumulation_dtype(item.param.dtype)) * strength_at(item.term, step))
        for target, value in reg._activity.recent():
            key = label(target.term)
            where.setdefault(key, _position(target.term))
            parts.setdefault(key, []).append(value)
    first = reg._first_trainable
    device = first.device if first is not None else None
    return {key: _sum(parts[key], device) for key in sorted(parts, key=where.__getitem__)}


def _sum(values: list[torch.Tensor], device: torch.device | None) -> torch.Tensor:
    if not values:
        return torch.zeros((), dtype=torch.float32, device=device)
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    moved = [v.to(device=device if device is not None else v.device, dtype=dtype) for v in values]
    return moved[0] if len(moved) == 1 else torch.stack(moved).sum()
