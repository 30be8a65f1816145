"""How a strength changes with the optimizer step: the formula of every schedule.

``t`` counts optimizer steps taken so far (0 before the first). With ``from S``
(default 0), ``until E``, ``warmup W`` and ``cosine to λ_end over N``, the
strength λ of a term is, at step ``t``::

    0                                            if t < S or t >= E
    λ · (t − S) / W                              if S <= t < S + W      (warmup)
    λ_end + (λ − λ_end) · (1 + cos(π·u)) / 2     afterwards, u = min(t − S − W, N) / N
    λ                                            afterwards, without cosine

So warmup and the anneal both start at ``from``, the anneal after the warmup,
and the strength holds at λ_end once the anneal is over. Pure Python: `check`
and `explain` use it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def strength_at(term: Any, step: int) -> float:
    """The effective strength of ``term`` (any term with ``strength`` and ``schedule``) at ``step``."""
    strength = term.strength
    schedule = getattr(term, "schedule", None)
    if schedule is None or not schedule.steps:
        return strength
    start = schedule.get("from")
    start = start.step if start is not None else 0
    until = schedule.get("until")
    if step < start or (until is not None and step >= until.step):
        return 0.0
    elapsed = step - start
    warmup = schedule.get("warmup")
    ramp = warmup.steps if warmup is not None else 0
    if elapsed < ramp:
        return strength * elapsed / ramp
    cosine = schedule.get("cosine")
    if cosine is None:
        return strength
    u = min(elapsed - ramp, cosine.steps) / cosine.steps
    return cosine.end + (strength - cosine.end) * (1 + math.cos(math.pi * u)) / 2


def is_scheduled(term: Any) -> bool:
    schedule = getattr(term, "schedule", None)
    return schedule is not None and bool(schedule.steps)


def peak(term: Any) -> float:
    """The largest strength ``term`` is given (its schedule's λ, or λ_end when a cosine anneals up);
    an upper bound when ``until`` cuts a warmup short."""
    cosine = term.schedule.get("cosine") if is_scheduled(term) else None
    return max(term.strength, cosine.end) if cosine is not None else term.strength


def always_zero(term: Any) -> bool:
    """True when the term is 0 at every step, so it can be left out entirely."""
    if not hasattr(term, "strength"):
        return False
    cosine = term.schedule.get("cosine") if is_scheduled(term) else None
    return term.strength == 0 and (cosine is None or cosine.end == 0)


# Thousands of parameters share the few term objects of a rule file: the helpers below work
# each distinct term out once, not once per parameter.


def strengths_at(terms: Iterable[Any], step: int) -> list[float]:
    """:func:`strength_at` of each term, in order."""
    memo: dict[int, float] = {}
    out = []
    for term in terms:
        value = memo.get(id(term))
        if value is None:
            value = memo[id(term)] = strength_at(term, step)
        out.append(value)
    return out


def any_scheduled(terms: Iterable[Any]) -> bool:
    return any(map(is_scheduled, {id(t): t for t in terms}.values()))


def live(items: Iterable[Any]) -> list[Any]:
    """The items (with ``.term`` and ``.param``) whose term is not 0 at every step and whose
    parameter has elements."""
    zero: dict[int, bool] = {}
    out = []
    for item in items:
        dead = zero.get(id(item.term))
        if dead is None:
            dead = zero[id(item.term)] = always_zero(item.term)
        if not dead and item.param.numel() > 0:
            out.append(item)
    return out
