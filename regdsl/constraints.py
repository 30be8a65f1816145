"""What happens to the weights after each optimizer step: proximal L1, then max-norm.

* ``l1 λ prox``: soft-threshold by ``τ = lr_group · λ``:
  ``w ← sign(w) · max(|w| − τ, 0)``, computed as ``w − clamp(w, −τ, τ)`` so a
  weight within τ of 0 becomes exactly 0.
* ``max_norm c dim=D``: every slice along D whose L2 norm exceeds c is scaled
  to norm c (as ``torch.renorm(w, 2, D, c)``: Keras' ``MaxNorm`` for D=0 on a
  ``Linear`` weight). The constraint runs last, so it holds after every step.

Both run under ``torch.no_grad()`` in place, so optimizer state keyed on the
parameter objects is untouched. Proximal steps that share a threshold are one
``torch._foreach`` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import sharded
from .errors import RegUsageError
from .schedule import live, strength_at


@dataclass(frozen=True)
class PostStepItem:
    kind: str  # "prox" or "max_norm"
    name: str
    param: torch.Tensor
    term: Any


class PostStepPlan:
    def __init__(self, items: Sequence[PostStepItem]):
        kept = live(items)
        self.prox = [i for i in kept if i.kind == "prox"]
        self.max_norm = [i for i in kept if i.kind == "max_norm"]
        self._groups_key: tuple[tuple[int, int], ...] | None = None
        self._group_index: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.prox or self.max_norm)

    def locate(self, param_groups: Sequence[dict[str, Any]]) -> list[int]:
        """For each proximal parameter, the index of its optimizer group.

        Found once and kept while the optimizer's groups are the same objects, so a
        step costs O(groups), not O(parameters); ``add_param_group`` or an optimizer
        ``load_state_dict`` (which replaces the group dicts) makes it look again.
        """
        key = tuple((id(g), id(g["params"])) for g in param_groups)
        if key != self._groups_key:
            where = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
            missing = [item.name for item in self.prox if id(item.param) not in where]
            if missing:
                shown = ", ".join(f"'{n}'" for n in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                raise RegUsageError(f"'l1 ... prox' parameters are not in the optimizer: {shown}")
            self._group_index = [where[id(item.param)] for item in self.prox]
            self._groups_key = key
        return self._group_index

    @torch.no_grad()
    def apply(self, step: int, param_groups: Sequence[dict[str, Any]] | None) -> None:
        """Run the proximal steps with the strengths of ``step`` and each group's lr, then the constraints."""
        if self.prox:
            if param_groups is None:
                raise RegUsageError("'l1 ... prox' needs each group's learning rate: pass the optimizer")
            by_threshold: dict[tuple[float, torch.device, torch.dtype], list[torch.Tensor]] = {}
            for item, index in zip(self.prox, self.locate(param_groups)):
                tau = float(param_groups[index]["lr"]) * strength_at(item.term, step)
                if tau > 0 and item.param.requires_grad:  # frozen since compile: left as it is, as the fold leaves it
                    by_threshold.setdefault((tau, item.param.device, item.param.dtype), []).append(item.param)
            for (tau, _, _), params in by_threshold.items():
                params = [sharded.local(p) for p in params]  # elementwise: a shard at a time
                inside = torch._foreach_clamp_max(torch._foreach_clamp_min(params, -tau), tau)
                torch._foreach_sub_(params, inside)
        for item in self.max_norm:
            if not item.param.requires_grad:
                continue
            if sharded.is_sharded(item.param):
                sharded.renorm_(item.param, item.term.dim % item.param.ndim, item.term.norm, _renorm_)
            else:
                _renorm_(item.param, item.term.dim % item.param.ndim, item.term.norm)


def _renorm_(p: torch.Tensor, dim: int, limit: float) -> None:
    if p.ndim >= 2 and p.dtype in (torch.float32, torch.float64):
        p.renorm_(2, dim, limit)  # one fused kernel
        return
    # torch.renorm's rule (and its 1e-7, which keeps a float32 result at or below the limit) for what
    # renorm refuses (1-d tensors) or computes in a narrow dtype (half precision, where the factor and
    # the products round to the weights' 8 or 11 bits: a slice may end up to 2**-8 above the limit).
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    others = [d for d in range(p.ndim) if d != dim]
    norms = torch.linalg.vector_norm(p, 2, dim=others, keepdim=True, dtype=acc) if others else p.abs().to(acc)
    p.mul_(torch.where(norms > limit, limit / (norms + 1e-7), 1.0).to(p.dtype))
