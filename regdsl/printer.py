"""Spec -> canonical ``.reg`` text."""

from __future__ import annotations

from typing import Any

from .parser import bare_pattern_ok
from .spec import (
    DepthNumber,
    DepthTerm,
    Exclude,
    LayerAtom,
    LrDecay,
    NoneTerm,
    Pattern,
    Rule,
    Schedule,
    Selector,
    TypeAtom,
    kind_label,
)


def format_number(value: float) -> str:
    # repr() is the shortest text that reads back as the same float.
    return repr(float(value))


def format_pattern(pattern: Pattern) -> str:
    return pattern.text if bare_pattern_ok(pattern.text) else f'"{pattern.text}"'


def format_selector(selector: Selector) -> str:
    parts = []
    for atom in selector.atoms:
        if isinstance(atom, (LayerAtom, TypeAtom)):
            parts.append(f"{atom.kind} " + ", ".join(format_pattern(p) for p in atom.patterns))
        else:
            parts.append(atom.kind)
    return " ".join(parts)


def format_schedule(schedule: Schedule) -> str:
    parts = []
    for step in schedule.steps:
        if step.kind == "cosine":
            parts.append(f"cosine to {format_number(step.end)} over {step.steps}")
        else:
            parts.append(f"{step.kind} {step.steps if step.kind == 'warmup' else step.step}")
    return " ".join(parts)


def format_space(space: Any, definition: bool = False) -> str:
    """``loguniform(1e-05, 0.01) as head_l2`` as the file defines it, a bare ``head_l2`` where
    a term reuses it; ``definition``: the space alone, ``loguniform(1e-05, 0.01)``."""
    if space.ref and not definition:
        return space.name
    numbers = space.choices if space.kind == "choice" else (space.low, space.high)
    text = f"{space.kind}({', '.join(map(format_number, numbers))})"
    return text + (f" as {space.name}" if space.name and not definition else "")


def format_value(term: Any) -> str:
    """A term's number, or the search space it is drawn from (also on a stand-in's copy)."""
    space = getattr(term, "space", None)
    return format_space(space) if space is not None else format_number(term.value)


def format_depth(term: DepthTerm) -> str:
    """``3``, ``i``, ``i + 1``, ``last``, ``last - 1``."""
    expr = term.expr
    if isinstance(expr, DepthNumber):
        return str(expr.value)
    base = expr.name if expr.kind == "capture" else "last"
    return f"{base} {expr.op} {expr.amount}" if expr.op else base


def format_lr_decay(statement: LrDecay) -> str:
    return f"lr_decay {format_value(statement)}"


def format_term_value(term: Any) -> str:
    """A term without its keyword: ``1e-4 prox warmup 100``, ``0.01 to init``, ``3.0 dim=1``, ``i + 1``."""
    if isinstance(term, DepthTerm):
        return format_depth(term)
    parts = [format_value(term)]
    if getattr(term, "prox", False):
        parts.append("prox")
    if getattr(term, "to", None):
        parts.append(f"to {term.to}")
    if getattr(term, "dim", 0):
        parts.append(f"dim={term.dim}")
    schedule = getattr(term, "schedule", None)
    if schedule is not None and schedule.steps:
        parts.append(format_schedule(schedule))
    return " ".join(parts)


def format_term(term: Any) -> str:
    if isinstance(term, NoneTerm):
        return "none"
    return f"{kind_label(term.kind)} {format_term_value(term)}"


def format_statement(statement: Rule | Exclude) -> str:
    if isinstance(statement, Exclude):
        return f"exclude {format_selector(statement.selector)}"
    return f"{format_selector(statement.selector)} {' '.join(format_term(t) for t in statement.terms)}"
