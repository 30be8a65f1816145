"""Whether an optimizer's decoupled decay can move low-precision weights at all.

AdamW (and ``Adam(decoupled_weight_decay=True)``) decays with ``w ← w·(1 − lr·λ)`` in the
weights' own dtype. In bfloat16 (8 significant bits) that product rounds back to ``w`` for
every weight when ``lr·λ < 2⁻⁹`` (a quarter of ``torch.finfo(torch.bfloat16).eps``) and for
some of them up to ``2⁻⁸``: with ``lr = 1e-3`` and ``decay 0.01`` the decay does nothing at all.
Coupled decay (SGD, Adam) adds ``λ·w`` to the gradient instead, where it is not rounded alone.
"""

from __future__ import annotations

from typing import Any

import torch

_LOW = (torch.bfloat16, torch.float16)


def decay_underflows(
    optimizer: torch.optim.Optimizer, lines: dict[str, int], peaks: dict[str, float] | None = None
) -> list[str]:
    """One sentence per optimizer group whose decoupled decay rounds away on its 16-bit weights;
    ``lines`` gives the rule line of a group's decay by group name, ``peaks`` the largest value a
    scheduled one reaches (read instead of the group's value now)."""
    decoupled_class = isinstance(optimizer, torch.optim.AdamW)
    peaks = peaks or {}
    found = []
    for group in optimizer.param_groups:
        scheduled = group.get("name") in peaks
        decay = peaks[group["name"]] if scheduled else _number(group.get("weight_decay", 0.0))
        lr = _number(group.get("lr", 0.0))
        if not decay or not lr or not (decoupled_class or group.get("decoupled_weight_decay", False)):
            continue
        dtypes = sorted({p.dtype for p in group["params"] if p.dtype in _LOW}, key=str)
        for dtype in dtypes:
            half_eps = torch.finfo(dtype).eps / 2
            if lr * decay < half_eps:
                name = group.get("name")
                where = f"group '{name}'" + (f" (line {lines[name]})" if name in lines else "") if name else "a group"
                at_peak = " (its schedule's peak)" if scheduled else ""
                found.append(
                    f"{where}: lr·decay = {lr:g}·{decay:g}{at_peak} = {lr * decay:.3g} is below the resolution of its "
                    f"{str(dtype).removeprefix('torch.')} weights ({half_eps:.3g}), so {type(optimizer).__name__}'s "
                    "decoupled decay w ← w·(1 − lr·decay) rounds back to w: keep float32 master weights, "
                    "or use a larger decay"
                )
    return found


def _number(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
